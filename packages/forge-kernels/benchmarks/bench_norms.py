"""Benchmark: fused RMSNorm / LayerNorm (+ residual add) vs eager, torch.compile and Liger-Kernel.

For each op, hidden size and with/without the fused residual add, times the forward and the
forward + backward of every contender in the same run, and prints a table: median milliseconds,
speed-up over eager, peak extra memory, achieved GB/s against the op's minimal memory traffic and
that as a fraction of the HBM bandwidth measured here with a large device-to-device copy.

    # a GPU (bf16, 16k tokens, hidden 2048 ... 8192)
    python packages/forge-kernels/benchmarks/bench_norms.py
    # a quick check that the script runs (tiny sizes, CPU, Triton interpreted)
    python packages/forge-kernels/benchmarks/bench_norms.py --device cpu --smoke --no-compile

Eager is what a transformers model runs: ``LlamaRMSNorm``'s code (forge's reference) and
``F.layer_norm`` (``nn.LayerNorm``), with the residual add as a separate ``x + residual``.
On CPU the script sets ``TRITON_INTERPRET=1`` before importing forge-kernels, so the forge rows
time the Triton interpreter (meaningless as speed; it checks the code path). Peak memory is
measured on CUDA only. The table and harness (``run_benchmarks``) are shared with bench_glu.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def interpret_triton_on_cpu(argv: list[str]) -> None:
    """Set ``TRITON_INTERPRET=1`` when ``argv``'s ``--device`` (as :func:`base_parser` reads it)
    is the CPU.

    Triton fixes interpreted-or-compiled when a kernel is decorated, that is when forge_kernels
    is first imported, so this runs before this module's forge_kernels imports, which are also
    the first ones of every script that imports this module (bench_glu, bench_keyed_dropout,
    bench_moe, bench_attention). Set later (in :func:`prepare_environment`), the forge rows on
    CPU launched compiled kernels with no GPU: "0 active drivers".
    """
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--device", default=None)
    device = probe.parse_known_args(argv)[0].device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.split(":")[0] == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")


interpret_triton_on_cpu(sys.argv[1:])

# After the call above: see its docstring.
from forge_kernels.benchmarking import copy_bandwidth_gbps, time_ms  # noqa: E402
from forge_kernels.benchmarking import peak_memory_mib as peak_mib  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ============================================================================================
# Harness (shared with bench_glu.py)
# ============================================================================================

#: A contender: a callable taking the case's inputs as keywords and returning its output(s),
#: or a string saying why it is not run ("skipped: ...").
Provider = Callable[..., torch.Tensor | tuple[torch.Tensor, ...]] | str


@dataclass(kw_only=True)
class Case:
    """One benchmarked configuration: inputs, contenders and the op's minimal memory traffic."""

    name: str
    inputs: dict[str, torch.Tensor | None]
    providers: dict[str, Provider]
    fwd_bytes: int
    bwd_bytes: int
    #: Builds differentiable views of the leaves, e.g. chunks of one fused projection.
    prepare: Callable[[dict[str, torch.Tensor | None]], dict] = field(default=lambda leaves: leaves)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", help="comma-separated ROWSxCOLS, e.g. 16384x4096")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(eager)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes and 1 iteration: check the script runs"
    )
    return parser


def prepare_environment(
    args: argparse.Namespace, *, default_shapes: str, smoke_shapes: str
) -> torch.device:
    """Fill in shapes and the iteration counts of ``--smoke``. (The Triton interpreter of a CPU
    run is switched on at import, by :func:`interpret_triton_on_cpu`: here would be too late.)"""
    device = torch.device(args.device)
    if args.smoke:
        args.warmup, args.iters = 1, 2
    if args.shapes is None:
        args.shapes = smoke_shapes if args.smoke else default_shapes
    return device


def parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        rows, cols = item.lower().split("x")
        shapes.append((int(rows), int(cols)))
    return shapes


def measure_hbm_gbps(device: torch.device, *, smoke: bool) -> float:
    """Device memory bandwidth from a large device-to-device copy (read + write), in GB/s."""
    return copy_bandwidth_gbps(device, smoke=smoke)


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _run_mode(case: Case, fn: Callable, mode: str, out_grads) -> Callable[[], object]:
    """A no-argument closure running the forward, or forward + backward, of ``fn``."""
    leaves = {k: None if v is None else v.detach().requires_grad_() for k, v in case.inputs.items()}
    grad_leaves = [v for v in leaves.values() if v is not None]

    def forward():
        return fn(**case.prepare(leaves))

    def forward_backward():
        outs = _as_tuple(forward())
        return torch.autograd.grad(outs, grad_leaves, out_grads)

    return forward if mode == "fwd" else forward_backward


def _measure(case: Case, fn: Callable, mode: str, eager_outs, out_grads, args) -> tuple | str:
    """(median ms, peak MiB or None, max |output - eager output|), or why it failed."""
    device = out_grads[0].device
    try:
        run = _run_mode(case, fn, mode, out_grads)
        ms = time_ms(run, device, warmup=args.warmup, iters=args.iters)
        peak = peak_mib(run, device)
        with torch.no_grad():
            outs = _as_tuple(fn(**case.prepare(case.inputs)))
        diff = max(
            (o.float() - e.float()).abs().max().item()
            for o, e in zip(outs, eager_outs, strict=True)
        )
    except Exception as exc:  # a benchmark reports a contender's failure and goes on
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    return ms, peak, diff


def run_benchmarks(cases: list[Case], args: argparse.Namespace, device: torch.device) -> None:
    """Time every case's contenders, forward and forward + backward, and print one table."""
    hbm = measure_hbm_gbps(device, smoke=args.smoke)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device={device} ({name})  dtype={args.dtype}  measured copy bandwidth={hbm:.0f} GB/s")
    header = (
        f"{'case':<34}{'mode':<9}{'provider':<22}{'ms':>9}{'x eager':>9}{'GB/s':>9}"
        f"{'% HBM':>7}{'peak MiB':>10}{'max|out-eager|':>17}"
    )
    print(header)
    print("-" * len(header))
    for case in cases:
        torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no stale graphs
        with torch.no_grad():
            eager_outs = _as_tuple(case.providers["eager"](**case.prepare(case.inputs)))
        gen = torch.Generator(device=device).manual_seed(1)
        out_grads = [
            torch.randn(o.shape, device=device, dtype=o.dtype, generator=gen) for o in eager_outs
        ]
        for mode in ("fwd", "fwd+bwd"):
            n_bytes = case.fwd_bytes + (case.bwd_bytes if mode == "fwd+bwd" else 0)
            results = {
                provider: fn
                if isinstance(fn, str)
                else _measure(case, fn, mode, eager_outs, out_grads, args)
                for provider, fn in case.providers.items()
            }
            eager = results["eager"]
            for provider, r in results.items():
                prefix = f"{case.name:<34}{mode:<9}{provider:<22}"
                if isinstance(r, str):
                    print(prefix + r)
                    continue
                ms, peak, diff = r
                gbps = n_bytes / (ms * 1e-3) / 1e9
                ratio = f"{eager[0] / ms:.2f}" if not isinstance(eager, str) else "-"
                peak_text = "n/a" if peak is None else f"{peak:.1f}"
                print(
                    prefix + f"{ms:>9.3f}{ratio:>9}{gbps:>9.1f}{100 * gbps / hbm:>6.0f}%"
                    f"{peak_text:>10}{diff:>17.2e}"
                )
        print()


def compiled_or_reason(fn: Callable, args: argparse.Namespace) -> Provider:
    return "skipped: --no-compile" if args.no_compile else torch.compile(fn)


# ============================================================================================
# Norm cases
# ============================================================================================


def liger_providers() -> dict[str, Provider]:
    """Liger-Kernel's RMSNorm (plain and fused-add) and LayerNorm, or why they are skipped."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except ImportError:
        reason = "skipped: liger-kernel not installed"
        return {
            "rms_norm": reason,
            "rms_norm+res": reason,
            "layer_norm": reason,
            "layer_norm+res": reason,
        }
    try:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    except ImportError:
        LigerFusedAddRMSNormFunction = None

    # in_place=False: Liger's in-place backward would overwrite the reused output gradients.
    def rms(x, weight, eps):
        return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)

    def rms_res(x, weight, eps, residual):
        return LigerFusedAddRMSNormFunction.apply(x, residual, weight, eps, 0.0, "llama", False)

    def ln(x, weight, bias, eps):
        return LigerLayerNormFunction.apply(x, weight, bias, eps)

    def ln_res(x, weight, bias, eps, residual):  # Liger has no fused add for LayerNorm
        h = x + residual
        return LigerLayerNormFunction.apply(h, weight, bias, eps), h

    return {
        "rms_norm": rms,
        "rms_norm+res": rms_res
        if LigerFusedAddRMSNormFunction is not None
        else "skipped: this liger-kernel has no fused add RMSNorm",
        "layer_norm": ln,
        "layer_norm+res": ln_res,
    }


def norm_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    from forge_kernels.norms import layer_norm, rms_norm, rms_norm_reference

    def eager_layer_norm(x, weight, bias, eps, residual=None):
        h = x if residual is None else x + residual
        y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        return y if residual is None else (y, h)

    dtype = DTYPES[args.dtype]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    liger = liger_providers()
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, device=device, dtype=dtype, generator=gen)

    cases = []
    for rows, cols in parse_shapes(args.shapes):
        for op in ("rms_norm", "layer_norm"):
            for with_residual in (False, True):
                inputs = {"x": randn(rows, cols), "weight": 1 + 0.1 * randn(cols)}
                if op == "layer_norm":
                    inputs["bias"] = 0.1 * randn(cols)
                if with_residual:
                    inputs["residual"] = randn(rows, cols)
                eps = 1e-6 if op == "rms_norm" else 1e-5

                def bind(fn, eps=eps):
                    return lambda **kw: fn(**kw, eps=eps)

                if op == "rms_norm":
                    providers = {"forge": bind(rms_norm), "eager": bind(rms_norm_reference)}
                    providers["torch.compile(eager)"] = compiled_or_reason(
                        bind(rms_norm_reference), args
                    )
                else:
                    providers = {"forge": bind(layer_norm), "eager": bind(eager_layer_norm)}
                    providers["torch.compile(eager)"] = compiled_or_reason(
                        bind(eager_layer_norm), args
                    )
                key = op + ("+res" if with_residual else "")
                providers["liger"] = liger[key] if isinstance(liger[key], str) else bind(liger[key])
                # Minimal traffic: read x (+ residual), write y (+ h); backward reads dy, h
                # (+ dh) and writes dx (+ dresidual, the same values in a buffer of its own);
                # parameters and fp32 row stats are small.
                tensor_bytes = rows * cols * itemsize
                n_params = 2 if op == "layer_norm" else 1
                param_bytes = n_params * cols * itemsize
                stats_bytes = rows * 4 * (2 if op == "layer_norm" else 1)
                res = 1 if with_residual else 0
                cases.append(
                    Case(
                        name=f"{key} {rows}x{cols}",
                        inputs=inputs,
                        providers=providers,
                        fwd_bytes=tensor_bytes * (2 + 2 * res) + param_bytes + stats_bytes,
                        bwd_bytes=tensor_bytes * (3 + 2 * res) + 2 * param_bytes + stats_bytes,
                    )
                )
    return cases


def main() -> None:
    args = base_parser(__doc__.split("\n")[0]).parse_args()
    device = prepare_environment(
        args,
        default_shapes="16384x2048,16384x4096,16384x5120,16384x8192",
        smoke_shapes="24x96,5x257",
    )
    run_benchmarks(norm_cases(args, device), args, device)


if __name__ == "__main__":
    main()
