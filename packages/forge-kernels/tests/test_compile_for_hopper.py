"""Every Triton kernel forge-kernels launches compiles for Hopper (sm90), with the exact
specializations its launchers use, on a machine without a GPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which executes them as numpy and never
runs Triton's compiler: code only the compiler rejects (a non-constexpr enum argument, a
``tl.dot`` shape the MMA lowering refuses, a block too large for the hardware) passes every
interpreted test. Here each op's launcher runs once per dtype on small CPU tensors while a shim
on the interpreter's launch records, per launch, the argument types and attributes Triton's own
JIT binder derives for an sm90 target (pointer dtypes, i32/i64, 16-divisibility, the value-1
specialization), the constexprs and the launch options. One subprocess without the interpreter
then compiles every distinct specialization for ``GPUTarget("cuda", 90, 32)`` (front end to
cubin, no GPU needed; a fresh Triton cache so a warm one cannot hide a failure), and fails with
the kernel's name and the compiler's error.

What the launchers choose only because they run interpreted is switched to its CUDA value while
recording: every ``triton_interpret_mode()`` a launcher module imported answers ``False`` (the
FP8 quantizers' fp32 rounding, the grouped GEMM's upcast), and an autotuned kernel is compiled
with each of the configs the autotuner tries on a GPU (the subprocess imports the module without
the interpreter, so it sees that config list).
"""

from __future__ import annotations

import ast
import os
import pathlib
import pickle
import subprocess
import sys
import time

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "forge_kernels"
HOPPER = ("cuda", 90, 32)


# ============================================================================================
# Recording (in the test process, under the interpreter)
# ============================================================================================


def _kernel_id(fn) -> tuple[str, str]:
    return fn.__module__, fn.__qualname__


def _runtime_option_kwargs() -> dict:
    """The options ``JITFunction.run`` adds to every launch's keyword arguments."""
    from triton import knobs

    return {
        "debug": knobs.runtime.debug,
        "instrumentation_mode": knobs.compilation.instrumentation_mode,
        "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts,
    }


class LaunchRecorder:
    """Records the sm90 specialization of every interpreted launch (the interpreter still runs
    the kernel afterwards, so launchers that read a kernel's output go on as usual)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backend = make_backend(GPUTarget(*HOPPER))
        self.specs: dict[tuple, dict] = {}
        self._binders: dict = {}
        self._autotuned_fns: dict[int, object] = {}

    def _binder(self, fn):
        from triton.runtime.jit import JITFunction, create_function_from_signature

        if fn not in self._binders:
            jit_fn = JITFunction(fn)  # the GPU JIT's binder for the same Python function
            binder = create_function_from_signature(jit_fn.signature, jit_fn.params, self.backend)
            self._binders[fn] = (jit_fn, binder)
        return self._binders[fn]

    def find_autotuners(self):
        from triton.runtime.autotuner import Autotuner

        for name, module in list(sys.modules.items()):
            if not name.startswith("forge_kernels"):
                continue
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    self._autotuned_fns[id(value.fn)] = value

    def record(self, interpreted, args, kwargs):
        jit_fn, binder = self._binder(interpreted.fn)
        autotuner = self._autotuned_fns.get(id(interpreted))
        config_keys = set()
        if autotuner is not None:
            for config in autotuner.configs:
                config_keys |= set(config.all_kwargs())
        launch_kwargs = {**kwargs, **_runtime_option_kwargs()}
        bound_args, specialization, options = binder(*args, **launch_kwargs)
        _, signature, constexprs, attrs = jit_fn._pack_args(
            self.backend, launch_kwargs, bound_args, specialization, options
        )
        names = jit_fn.arg_names
        spec = {
            "kernel": _kernel_id(interpreted.fn),
            "arg_names": list(names),
            "signature": signature,
            "constexprs": dict(constexprs.items()),
            "attrs": attrs,
            "options": {
                k: v for k, v in launch_kwargs.items() if k not in names and k not in config_keys
            },
            "config_args": sorted(k for k in config_keys if k in names),
            "autotuned": autotuner is not None,
        }
        if spec["autotuned"]:  # the GPU configs replace the interpreter's one
            drop = {(names.index(k),) for k in spec["config_args"]}
            spec["constexprs"] = {p: v for p, v in spec["constexprs"].items() if p not in drop}
        key = repr(dict(sorted(spec.items())))
        self.specs.setdefault(key, spec)


def _patch_interpreter_launches(monkeypatch, recorder: LaunchRecorder):
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        recorder.record(self, args, kwargs)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)


def _launchers_take_cuda_branches(monkeypatch):
    """Every ``triton_interpret_mode`` a forge_kernels module imported answers ``False`` (but
    ``can_use_triton`` itself still sees the interpreter, so the Triton path is taken)."""
    from forge_kernels import _triton_support

    for name, module in list(sys.modules.items()):
        if (
            name.startswith("forge_kernels")
            and module is not _triton_support
            and (
                getattr(module, "triton_interpret_mode", None)
                is _triton_support.triton_interpret_mode
            )
        ):
            monkeypatch.setattr(module, "triton_interpret_mode", lambda: False)


# ============================================================================================
# The launches: every op's Triton path, forward and backward, per dtype
# ============================================================================================

#: Hidden sizes: a small one that is not a multiple of 16 (no divisibility attribute, several
#: rows per program) and a production one (one wide row per program, more warps).
HIDDEN_SIZES = (40, 4096)


def _backward(*outputs):
    import torch

    torch.autograd.backward(
        [o for o in outputs if o is not None],
        [torch.ones_like(o) for o in outputs if o is not None],
    )


def _run_norms(dtype, hidden):
    import torch

    from forge_kernels import layer_norm, rms_norm

    weight_dtypes = {dtype, torch.float32}  # a bf16 model's norm weight may stay fp32
    for weight_dtype in weight_dtypes:
        x = torch.randn(6, hidden, dtype=dtype, requires_grad=True)
        r = torch.randn(6, hidden, dtype=dtype, requires_grad=True)
        w = torch.rand(hidden, dtype=weight_dtype, requires_grad=True)
        b = torch.randn(hidden, dtype=weight_dtype, requires_grad=True)
        _backward(rms_norm(x, w))
        _backward(*rms_norm(x, w, residual=r))
        _backward(rms_norm(x, w, residual=r)[1])  # only the residual stream is used
        _backward(layer_norm(x, w, b))
        _backward(*layer_norm(x, w, b, residual=r))
        _backward(layer_norm(x, w, None))
    x = torch.randn(6, hidden, dtype=dtype, requires_grad=True)
    _backward(rms_norm(x))
    _backward(layer_norm(x))


def _run_glu(dtype, hidden):
    import torch

    from forge_kernels import geglu, swiglu

    gate_up = torch.randn(6, 2 * hidden, dtype=dtype, requires_grad=True)
    gate, up = gate_up.chunk(2, dim=-1)  # halves of a fused projection (row stride 2 * hidden)
    _backward(swiglu(gate, up))
    _backward(geglu(gate, up))
    _backward(geglu(gate, up, approximate="tanh"))


def _run_dropout(dtype, hidden):
    import torch

    from forge_kernels import keyed_dropout

    x = torch.randn(6, hidden, dtype=dtype, requires_grad=True)
    keys = torch.arange(6, dtype=torch.int64)
    _backward(keyed_dropout(x, keys, p=0.1, salt=12345))
    _backward(keyed_dropout(x, keys, p=0.1, salt=2**32 - 1, feature_offset=2**31))  # i64


def _run_rope(dtype, head_dim):
    import torch

    from forge_kernels import apply_rope, apply_rope_, rope_cos_sin, rope_inv_freq

    head_dim = min(head_dim, 128)
    seq = 5
    positions = torch.arange(seq)
    for rotary_dim in (head_dim, head_dim // 2):  # partial rotary: a pass-through part
        cos, sin = rope_cos_sin(positions, rope_inv_freq(rotary_dim))
        for layout in ("half", "interleaved"):
            q = torch.randn(2, seq, 4, head_dim, dtype=dtype, requires_grad=True)
            k = torch.randn(2, seq, 2, head_dim, dtype=dtype, requires_grad=True)
            _backward(*apply_rope(q, k, cos, sin, layout=layout))
            _backward(apply_rope(q, None, cos, sin, layout=layout)[0])
            with torch.no_grad():
                apply_rope_(q.detach().clone(), k.detach().clone(), cos, sin, layout=layout)


def _run_cross_entropy(dtype, hidden):
    import torch

    from forge_kernels import fused_linear_cross_entropy

    # one small odd vocabulary block; the widest block (32768) over an aligned vocabulary
    for vocab in (100,) if hidden % 16 else (40000,):
        h = torch.randn(6, 16, dtype=dtype, requires_grad=True)
        w = torch.randn(vocab, 16, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (6,))
        labels[0] = -100
        _backward(fused_linear_cross_entropy(h, w, labels))
        _backward(fused_linear_cross_entropy(h, w, labels, logit_softcap=30.0, z_loss_weight=1e-4))
        with torch.no_grad():
            fused_linear_cross_entropy(h, w, labels)


def _run_moe(dtype, hidden):
    import torch

    from forge_kernels import grouped_mm, moe_permute, moe_unpermute

    n_tokens, top_k, n_experts = 6, 2, 4
    x = torch.randn(n_tokens, hidden, dtype=dtype, requires_grad=True)
    indices = torch.randint(0, n_experts, (n_tokens, top_k))
    routing_weights = torch.rand(n_tokens, top_k, dtype=dtype, requires_grad=True)
    perm = moe_permute(x, indices, num_experts=n_experts)
    _backward(moe_unpermute(perm.hidden, perm.slot_positions, routing_weights=routing_weights))
    perm = moe_permute(x, indices, num_experts=n_experts)
    _backward(moe_unpermute(perm.hidden, perm.slot_positions))
    # The GEMMs' tiles come from the autotuner's GPU configs: a narrow model is enough here.
    model = min(hidden, 48)
    rows = torch.randn(n_tokens * top_k, model, dtype=dtype, requires_grad=True)
    w_up = torch.randn(n_experts, model, 32, dtype=dtype, requires_grad=True)
    w_down = torch.randn(n_experts, model, 32, dtype=dtype, requires_grad=True)  # [E, N, K]
    y = grouped_mm(rows, w_up, perm.tokens_per_expert, backend="triton")
    _backward(
        grouped_mm(y, w_down, perm.tokens_per_expert, transpose_weight=True, backend="triton")
    )


def _run_fp8(dtype, hidden):
    import torch

    from forge_kernels.fp8.quantize import quantize_blockwise, quantize_tensorwise

    x = torch.randn(40, 200, dtype=dtype) if hidden % 16 else torch.randn(48, 256, dtype=dtype)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e5m2):
        quantize_tensorwise(x, fp8, transpose=True, use_triton=True)
        quantize_tensorwise(x, fp8, scale=torch.tensor(2.0), use_triton=True)
        for block in ((1, 128), (128, 1), (128, 128)):
            quantize_blockwise(x, fp8, block, use_triton=True)


OPS = (_run_norms, _run_glu, _run_dropout, _run_rope, _run_cross_entropy, _run_moe, _run_fp8)


# ============================================================================================
# Compiling (in a subprocess, without the interpreter)
# ============================================================================================


def _resolve_kernel(module_name: str, qualname: str):
    """The JIT object (a ``JITFunction`` or an ``Autotuner``) named ``qualname``; a kernel built
    by a cached factory (``factory.<locals>.kernel``) comes from calling the factory."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    module = importlib.import_module(module_name)
    if ".<locals>." in qualname:
        factory = getattr(module, qualname.split(".<locals>.")[0])
        found = factory()
    else:
        found = getattr(module, qualname)
    fn = found.fn if isinstance(found, Autotuner) else found
    assert fn.fn.__qualname__ == qualname, (qualname, fn.fn.__qualname__)
    return found


def _variants(spec: dict, kernel):
    """(constexprs, options) of each launch the GPU makes for one recorded specialization."""
    from triton.runtime.autotuner import Autotuner

    if not spec["autotuned"]:
        yield spec["constexprs"], spec["options"]
        return
    assert isinstance(kernel, Autotuner), f"{spec['kernel']} is no longer autotuned"
    names = spec["arg_names"]
    for config in kernel.configs:
        all_kwargs = config.all_kwargs()
        constexprs = dict(spec["constexprs"])
        for name in spec["config_args"]:
            constexprs[(names.index(name),)] = all_kwargs[name]
        options = {**spec["options"], **{k: v for k, v in all_kwargs.items() if k not in names}}
        yield constexprs, options


def _features(spec: dict, constexprs: dict, options: dict) -> set[tuple]:
    """What one launch specializes on: its pointer dtypes together, each other argument's type
    and constexpr value, and its launch options. (Not the 16-divisibility attributes: covering
    each of those too doubles the compile time; every compiled launch keeps its own.)"""
    names, kernel = spec["arg_names"], spec["kernel"]
    values = {names[path[0]]: value for path, value in constexprs.items()}
    pointers = tuple(t for t in spec["signature"].values() if t.startswith("*"))
    found = {(kernel, "pointers", pointers), (kernel, "options", repr(sorted(options.items())))}
    for name, sig_type in spec["signature"].items():
        if not sig_type.startswith("*"):
            found.add((kernel, name, sig_type, repr(values.get(name))))
    return found


def _cost(constexprs: dict, spec: dict) -> float:
    """A compile-time estimate: the elements of the kernel's tiles (wide tiles compile slowly)."""
    names, tile = spec["arg_names"], 1
    for path, value in constexprs.items():
        if names[path[0]].startswith("BLOCK") and isinstance(value, int):
            tile *= value
    return 1.0 + tile / 16384


def select_launches(specs: list[dict], resolve) -> tuple[list, int]:
    """A small set of recorded launches (autotuned ones with each GPU config) that covers every
    feature (:func:`_features`) some launch has: every pointer dtype combination, every constexpr
    value (tile sizes, flags), every integer type, every warps / stages option is compiled at
    least once, in a real launch of its kernel. Greedy set cover, cheap first."""
    candidates = []
    for spec in specs:
        kernel = resolve(spec)
        for constexprs, options in _variants(spec, kernel):
            candidates.append((spec, constexprs, options, _features(spec, constexprs, options)))
    uncovered = set().union(*(c[3] for c in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda c: len(c[3] & uncovered) / _cost(c[1], c[0]))
        chosen.append(best[:3])
        uncovered -= best[3]
    return chosen, len(candidates)


def compile_all(spec_path: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner

    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compile without the interpreter"
    with open(spec_path, "rb") as f:
        specs = pickle.load(f)
    target = GPUTarget(*HOPPER)
    backend = make_backend(target)
    failures, kernels = [], {}
    for spec in specs:
        kernel = kernels.setdefault(tuple(spec["kernel"]), _resolve_kernel(*spec["kernel"]))
        jit_fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        if list(jit_fn.arg_names) != spec["arg_names"]:
            failures.append(f"{spec['kernel']}: its arguments changed since recording")
    if failures:
        print("FAILED", *failures, sep="\n", file=sys.stderr)
        return 1
    start = time.perf_counter()
    chosen, n_launches = select_launches(specs, lambda spec: kernels[tuple(spec["kernel"])])
    for spec, constexprs, option_kwargs in chosen:
        kernel = kernels[tuple(spec["kernel"])]
        jit_fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
        options = backend.parse_options(dict(option_kwargs))
        source = ASTSource(jit_fn, spec["signature"], constexprs, spec["attrs"])
        where = f"{'.'.join(spec['kernel'])} {spec['signature']} {constexprs} {option_kwargs}"
        try:
            compiled = triton.compile(source, target=target, options=options.__dict__)
        except Exception as e:  # the compiler's error, with the kernel that raised it
            failures.append(f"{where}\n    {type(e).__name__}: {e}")
            continue
        ptx = compiled.asm["ptx"]
        pointers = {t for t in spec["signature"].values() if t.startswith("*")}
        if ".f64" in ptx and "*fp64" not in pointers:
            failures.append(
                f"{where}\n    fp64 arithmetic in the PTX of a kernel without fp64 data"
            )
    seconds = time.perf_counter() - start
    print(
        f"compiled {len(chosen)} launches (covering all {n_launches} recorded) for sm90 "
        f"({len(failures)} failed) "
        f"in {seconds:.1f} s"
    )
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(compile_all(sys.argv[1]))


# ============================================================================================
# The test
# ============================================================================================


def _jit_functions_in_source() -> dict[str, set[str]]:
    """``{name: names of the jit functions it calls}`` for every ``@triton.jit`` function."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(
                "triton.jit" in ast.unparse(d) for d in node.decorator_list
            ):
                calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
                found[node.name] = calls
    return found


@pytest.mark.sm90_compile
def test_every_kernel_compiles_for_hopper(monkeypatch, tmp_path):
    import pytest

    pytest.importorskip("triton")
    import torch

    from forge_kernels._triton_support import triton_interpret_mode

    if not triton_interpret_mode():
        pytest.skip("records launches under TRITON_INTERPRET=1 (on a GPU the kernel tests compile)")
    import forge_kernels  # noqa: F401  (every op module, so the autotuners can be found)
    from forge_kernels.moe import grouped_gemm_triton  # noqa: F401  (imported lazily otherwise)

    recorder = LaunchRecorder()
    recorder.find_autotuners()
    _patch_interpreter_launches(monkeypatch, recorder)
    _launchers_take_cuda_branches(monkeypatch)
    torch.manual_seed(0)
    # fp16 takes the same launcher branches as bf16 (only the pointer dtype differs): not run
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in HIDDEN_SIZES:
            for op in OPS:
                op(dtype, hidden)
    specs = list(recorder.specs.values())

    # Every jit function is launched by an op above, or called by one that is.
    jit_functions = _jit_functions_in_source()
    launched = {spec["kernel"][1].split(".")[-1] for spec in specs}
    reached = set(launched)
    for name in launched:
        reached |= {callee for callee in jit_functions.get(name, ()) if callee in jit_functions}
    missing = sorted(set(jit_functions) - reached)
    assert not missing, f"no op above launches the Triton kernels {missing}: add their launcher"

    spec_path = tmp_path / "specs.pkl"
    spec_path.write_bytes(pickle.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # cold: nothing is skipped
    done = subprocess.run(
        [sys.executable, __file__, str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-6000:]
    assert "compiled" in done.stdout
