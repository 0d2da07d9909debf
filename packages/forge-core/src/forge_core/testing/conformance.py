"""The conformance suite every Forge accelerator plugin must pass.

It checks what Forge relies on, through the :class:`~forge_core.Accelerator` interface only:

- **device checks** (:data:`CHECKS`, one process): identity and capability flags, device
  discovery, host -> device -> host round trips in several dtypes, a computation on the device,
  RNG state round trip, the shape of the memory statistics, the plugin hooks' types;
- **collectives** (:func:`check_collectives`): every op of :mod:`forge_core.collectives`
  (all-reduce, all-gather with its backward, reduce-scatter, all-to-all even and uneven,
  send/recv, barrier) on the plugin's own ``dist_backend``, on a :class:`WorkerPool` of
  ``world_size`` ranks started with that backend;
- **kernel overrides** (:func:`check_kernel_overrides`): each op the plugin overrides against
  a reference implementation, outputs and gradients. forge-core does not import
  forge-kernels, so the caller passes ``reference_for(op) -> callable`` (for Forge's ops:
  ``forge_kernels.registry.get_reference``) and a :class:`KernelCase` per op that builds
  sample inputs. An override that hands calls it cannot serve to the reference says so in an
  int attribute ``fallback_calls`` (forge-xpu's ``KernelOverride`` does); an op whose every
  checked call fell back fails the check, since only the reference was compared with itself.

Run it with pytest (Forge's runner is ``tests/test_accelerator_conformance.py``; on hardware:
``FORGE_CONFORMANCE_BACKEND=<name> uv run pytest tests/test_accelerator_conformance.py``) or
call :func:`run_conformance` from a script and print the report.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from forge_core import collectives
from forge_core.accelerator import Accelerator, Capabilities
from forge_core.backends import get_backend

__all__ = [
    "CHECKS",
    "ENV_VAR",
    "CheckResult",
    "ConformanceReport",
    "KernelCase",
    "check_capabilities",
    "check_collectives",
    "check_device_compute",
    "check_device_discovery",
    "check_kernel_override",
    "check_kernel_overrides",
    "check_memory_stats",
    "check_plugin_hooks",
    "check_rng_round_trip",
    "check_tensor_round_trip",
    "collective_job",
    "round_trip_dtypes",
    "run_conformance",
]

#: The backend the repository's runner checks besides ``cpu`` and ``testdev`` (for hardware).
ENV_VAR = "FORGE_CONFORMANCE_BACKEND"

MEMORY_STAT_KEYS = frozenset({"allocated", "reserved", "peak_allocated"})


# --------------------------------------------------------------------------------------------
# Device checks (one process). Each returns a short description or raises AssertionError.
# --------------------------------------------------------------------------------------------


def check_capabilities(acc: Accelerator) -> str:
    """Name, device type, backend name and capability flags are present and well typed."""
    for attr in ("name", "device_type", "dist_backend"):
        value = getattr(acc, attr, None)
        assert isinstance(value, str), f"{type(acc).__name__}.{attr} must be a str"
        assert value, f"{type(acc).__name__}.{attr} is empty"
    caps = acc.capabilities
    assert isinstance(caps, Capabilities), (
        f"capabilities must be a forge_core.Capabilities (or a subclass), got {type(caps)}"
    )
    flags = {f: getattr(caps, f) for f in ("bf16", "fp16", "fp8", "triton", "p2p")}
    assert all(isinstance(v, bool) for v in flags.values()), f"flags must be bools: {flags}"
    return ", ".join(f"{k}={v}" for k, v in flags.items())


def check_device_discovery(acc: Accelerator) -> str:
    """The device is visible, counted, addressable by index and can be made current."""
    assert acc.is_available(), (
        f"{acc.name!r}.is_available() is False: no device visible or its runtime is missing"
    )
    count = acc.device_count()
    assert isinstance(count, int), f"device_count() returned {type(count)}, not an int"
    assert count >= 1, f"device_count() = {count}, expected >= 1"
    current = acc.device()
    assert isinstance(current, torch.device), f"device() returned {type(current)}"
    assert current.type == acc.device_type, (
        f"device() is {current}, but device_type is {acc.device_type!r}"
    )
    if acc.device_type != "cpu":
        assert acc.device(0) == torch.device(acc.device_type, 0), f"device(0) = {acc.device(0)}"
        acc.set_device(0)
        assert acc.device().index == 0, f"after set_device(0), device() is {acc.device()}"
        try:
            acc.set_device(count)
        except ValueError:
            pass
        else:
            raise AssertionError(f"set_device({count}) with {count} device(s) should raise")
    acc.synchronize()
    return f"{count} device(s), current {current}"


def round_trip_dtypes(acc: Accelerator) -> list[torch.dtype]:
    """The dtypes tensors must survive host -> device -> host in (bf16/fp16 per capabilities)."""
    dtypes = [torch.float32, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
    caps = acc.capabilities
    if caps.fp16:
        dtypes.append(torch.float16)
    if caps.bf16:
        dtypes.append(torch.bfloat16)
    return dtypes


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g).to(dtype)


def check_tensor_round_trip(acc: Accelerator, dtypes: Iterable[torch.dtype] | None = None) -> str:
    """Host -> device -> host copies are exact, keep dtype and shape, land on the device."""
    device = acc.device()
    dtypes = list(round_trip_dtypes(acc) if dtypes is None else dtypes)
    for i, dtype in enumerate(dtypes):
        host = _sample(dtype, (3, 5), seed=i)
        on_device = host.to(device)
        assert on_device.device.type == acc.device_type, f"{dtype}: landed on {on_device.device}"
        assert on_device.dtype == dtype, f"{dtype}: became {on_device.dtype} on the device"
        back = on_device.cpu()
        assert torch.equal(back, host), f"{dtype}: values changed in the round trip"
        strided = host.t().to(device, non_blocking=True)  # non-contiguous source, async copy
        acc.synchronize()
        assert torch.equal(strided.cpu(), host.t()), f"{dtype}: non-contiguous copy differs"
        host_copy = torch.empty_like(host)
        host_copy.copy_(on_device)
        assert torch.equal(host_copy, host), f"{dtype}: copy_ from the device differs"
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_device_compute(acc: Accelerator) -> str:
    """A matmul and a reduction on the device match the host within float32 tolerance."""
    device = acc.device()
    a, b = _sample(torch.float32, (16, 32), 1), _sample(torch.float32, (32, 8), 2)
    got = (a.to(device) @ b.to(device)).softmax(-1).sum(0)
    acc.synchronize()
    torch.testing.assert_close(got.cpu(), (a @ b).softmax(-1).sum(0), rtol=1e-4, atol=1e-5)
    return "matmul + softmax + sum"


def check_rng_round_trip(acc: Accelerator) -> str:
    """Seeding is reproducible and get/set_rng_state restores the device's random stream."""
    device = acc.device()
    acc.manual_seed(1234)
    first = torch.rand(8, device=device).cpu()
    acc.manual_seed(1234)
    assert torch.equal(torch.rand(8, device=device).cpu(), first), "manual_seed not reproducible"
    state = acc.get_rng_state()
    assert isinstance(state, Mapping), f"get_rng_state() returned {type(state)}"
    assert "cpu" in state, "get_rng_state() needs a 'cpu' entry (the host RNG)"
    assert all(isinstance(v, torch.Tensor) for v in state.values()), "RNG states are tensors"
    expected = (torch.rand(8, device=device).cpu(), torch.rand(8).clone())
    torch.rand(100, device=device)  # move both streams on
    torch.rand(100)
    acc.set_rng_state(state)
    again = (torch.rand(8, device=device).cpu(), torch.rand(8))
    assert torch.equal(again[0], expected[0]), "device RNG not restored by set_rng_state"
    assert torch.equal(again[1], expected[1]), "host RNG not restored by set_rng_state"
    return f"state keys {sorted(state)}"


def check_memory_stats(acc: Accelerator) -> str:
    """``memory_stats()`` has the keys Forge reads, as non-negative ints; peaks can be reset."""
    held = torch.ones(1024, 256, device=acc.device())  # something to account for
    acc.synchronize()
    stats = acc.memory_stats()
    del held
    assert isinstance(stats, Mapping), f"memory_stats() returned {type(stats)}"
    missing = MEMORY_STAT_KEYS - set(stats)
    assert not missing, f"memory_stats() lacks {sorted(missing)}"
    bad = {k: stats[k] for k in MEMORY_STAT_KEYS if not isinstance(stats[k], int) or stats[k] < 0}
    assert not bad, f"memory_stats() values must be non-negative ints (bytes): {bad}"
    acc.reset_peak_memory_stats()
    return ", ".join(f"{k}={stats[k]}" for k in sorted(MEMORY_STAT_KEYS))


def check_plugin_hooks(acc: Accelerator) -> str:
    """``environment_defaults()`` is str -> str and ``kernel_overrides()`` is str -> callable."""
    env = acc.environment_defaults()
    assert isinstance(env, Mapping), f"environment_defaults() returned {type(env)}"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()), (
        f"environment_defaults() must map str to str: {dict(env)}"
    )
    overrides = acc.kernel_overrides()
    assert isinstance(overrides, Mapping), f"kernel_overrides() returned {type(overrides)}"
    bad = [k for k, v in overrides.items() if not isinstance(k, str) or not callable(v)]
    assert not bad, f"kernel_overrides() entries must be op name -> callable: {bad}"
    return f"env defaults {sorted(env)}, overrides {sorted(overrides)}"


#: The single-process checks, in order, by name.
CHECKS: dict[str, Callable[[Accelerator], str]] = {
    "capabilities": check_capabilities,
    "device_discovery": check_device_discovery,
    "tensor_round_trip": check_tensor_round_trip,
    "device_compute": check_device_compute,
    "rng_round_trip": check_rng_round_trip,
    "memory_stats": check_memory_stats,
    "plugin_hooks": check_plugin_hooks,
}


# --------------------------------------------------------------------------------------------
# Collectives on the plugin's backend (run on every rank of a WorkerPool).
# --------------------------------------------------------------------------------------------


def _same(op: str, got: torch.Tensor, expected: torch.Tensor) -> None:
    got = got.detach().cpu()
    if got.shape != expected.shape or not torch.equal(got, expected.to(got.dtype)):
        raise AssertionError(
            f"{op} on rank {dist.get_rank()}: got {got.tolist()}, expected {expected.tolist()}"
        )


def collective_job(backend_name: str) -> list[str]:
    """Every collective of :mod:`forge_core.collectives` on the default group; runs on each rank.

    Module-level so a :class:`~forge_core.testing.WorkerPool` can import it. Binds the rank to
    its device (``LOCAL_RANK``), checks exact values, and returns the names of the ops checked.
    """
    acc = get_backend(backend_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    if acc.device_type != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dev = acc.device()
    done = []

    x = torch.full((3,), float(rank + 1), device=dev)
    _same("all_reduce", collectives.all_reduce(x), torch.full((3,), world * (world + 1) / 2))
    done.append("all_reduce")

    x = (torch.arange(2.0, device=dev) + 10 * rank).requires_grad_()
    y = collectives.all_gather(x)
    _same("all_gather", y, torch.cat([torch.arange(2.0) + 10 * r for r in range(world)]))
    weights = torch.arange(1.0, 2 * world + 1)
    (y * weights.to(dev)).sum().backward()  # backward: reduce-scatter of every rank's grad
    _same("all_gather backward", x.grad, world * weights[2 * rank : 2 * rank + 2])
    done.append("all_gather (+ backward reduce-scatter)")

    x = torch.arange(2.0 * world, device=dev) + rank
    full = world * torch.arange(2.0 * world) + world * (world - 1) / 2
    _same("reduce_scatter", collectives.reduce_scatter(x), full[2 * rank : 2 * rank + 2])
    done.append("reduce_scatter")

    x = torch.tensor([100.0 * rank + j for j in range(world)], device=dev)
    _same(
        "all_to_all",
        collectives.all_to_all(x),
        torch.tensor([100.0 * j + rank for j in range(world)]),
    )
    done.append("all_to_all")

    # Uneven: rank r sends j + 1 rows to rank j; output sizes are exchanged first.
    x = torch.cat([torch.full((j + 1,), 100.0 * rank + j) for j in range(world)]).to(dev)
    got = collectives.all_to_all(x, input_split_sizes=[j + 1 for j in range(world)])
    _same(
        "all_to_all (uneven)",
        got,
        torch.cat([torch.full((rank + 1,), 100.0 * j + rank) for j in range(world)]),
    )
    done.append("all_to_all (uneven splits)")

    if world > 1 and acc.capabilities.p2p:
        payload = torch.arange(4.0) * (rank + 1)
        if rank % 2 == 0 and rank + 1 < world:
            collectives.send(payload.to(dev), dst=rank + 1)
        elif rank % 2 == 1:
            got = collectives.recv((4,), src=rank - 1, device=dev, requires_grad=False)
            _same("send/recv", got, torch.arange(4.0) * rank)
        done.append("send/recv")

    dist.barrier()
    acc.synchronize()
    done.append("barrier")
    return done


def check_collectives(pool: Any, backend_name: str) -> str:
    """Run :func:`collective_job` on every rank of ``pool``; every rank must check every op."""
    results = pool.run(collective_job, backend_name)
    assert all(r == results[0] for r in results), f"ranks checked different ops: {results}"
    return f"{pool.world_size} ranks on {getattr(pool, 'backend', '?')}: " + ", ".join(results[0])


# --------------------------------------------------------------------------------------------
# Kernel overrides against a caller-provided reference.
# --------------------------------------------------------------------------------------------

InputFactory = Callable[[torch.device, torch.dtype], tuple[tuple[Any, ...], dict[str, Any]]]


@dataclass(frozen=True, kw_only=True)
class KernelCase:
    """Sample inputs for one op: ``make_inputs(device, dtype) -> (args, kwargs)``.

    Tensors that require grad are differentiated through (outputs and input gradients are
    compared with the reference). ``atol``/``rtol`` default to ``torch.testing``'s per dtype.
    """

    make_inputs: InputFactory
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    atol: float | None = None
    rtol: float | None = None
    grad: bool = True


def _clone_inputs(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, tuple | list):
        return type(value)(_clone_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone_inputs(v) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple | list):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _assert_close(what: str, got: torch.Tensor, expected: torch.Tensor, case: KernelCase) -> None:
    tol = {} if case.atol is None and case.rtol is None else {"atol": case.atol, "rtol": case.rtol}
    torch.testing.assert_close(
        got.detach().cpu(), expected.detach().cpu(), **tol, msg=lambda m: f"{what}: {m}"
    )


def check_kernel_override(
    op: str,
    implementation: Callable[..., Any],
    reference: Callable[..., Any],
    case: KernelCase,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """``implementation`` matches ``reference`` on ``case``'s inputs: outputs and gradients."""
    torch.manual_seed(0)
    args, kwargs = case.make_inputs(device, dtype)
    ref_args, ref_kwargs = _clone_inputs(args), _clone_inputs(kwargs)
    out = _tensors(implementation(*args, **kwargs))
    ref = _tensors(reference(*ref_args, **ref_kwargs))
    assert len(out) == len(ref), f"{op} ({dtype}): {len(out)} output tensors, reference {len(ref)}"
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        what = f"{op} ({dtype}) output {i}"
        assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)}, reference {tuple(r.shape)}"
        assert o.dtype == r.dtype, f"{what}: dtype {o.dtype}, reference {r.dtype}"
        _assert_close(what, o, r, case)
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    ref_leaves = [t for t in _tensors((ref_args, ref_kwargs)) if t.requires_grad]
    pairs = [(o, r) for o, r in zip(out, ref, strict=True) if o.requires_grad and r.requires_grad]
    if not case.grad or not leaves or not pairs:
        return
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g).to(o.dtype).to(o.device) for o, _ in pairs]
    grads = torch.autograd.grad([o for o, _ in pairs], leaves, cotangents, allow_unused=True)
    ref_grads = torch.autograd.grad(
        [r for _, r in pairs], ref_leaves, [c.clone() for c in cotangents], allow_unused=True
    )
    for i, (gi, ri) in enumerate(zip(grads, ref_grads, strict=True)):
        assert (gi is None) == (ri is None), f"{op} ({dtype}) grad {i}: one side is None"
        if gi is not None:
            _assert_close(f"{op} ({dtype}) grad of input {i}", gi, ri, case)


def _fallback_calls(override: Callable[..., Any]) -> int | None:
    """How many calls ``override`` has handed to the reference so far, if it counts them.

    forge-core cannot see how a plugin decides to fall back, so it relies on the override
    counting: an int attribute ``fallback_calls`` (forge-xpu's ``KernelOverride`` keeps one,
    beside ``vendor_calls``). ``None`` for an override that keeps no count (a plain function,
    which is its own kernel unless it falls back internally, unseen).
    """
    count = getattr(override, "fallback_calls", None)
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def check_kernel_overrides(
    acc: Accelerator,
    *,
    reference_for: Callable[[str], Callable[..., Any]],
    kernel_cases: Mapping[str, KernelCase | Sequence[KernelCase]],
    allow_fallback: bool = False,
) -> str:
    """Every op in ``acc.kernel_overrides()`` against ``reference_for(op)`` on its case(s).

    Dtypes the accelerator's capabilities rule out (bf16, fp16) are skipped. A case whose call
    the override handed to the reference (its ``fallback_calls`` count rose, see
    :func:`_fallback_calls`) is marked ``(fell back)`` in the returned description: it matched
    trivially. An op that fell back on *every* case fails the check (its own kernel never ran:
    vendor runtime absent, or it declines every input), unless ``allow_fallback`` (a host
    without the vendor runtime, checking the fallback path on purpose). Some cases falling
    back (a layout or dtype the kernel does not take) is reported, not failed.
    """
    overrides = acc.kernel_overrides()
    missing = sorted(set(overrides) - set(kernel_cases))
    assert not missing, (
        f"{acc.name!r} overrides {missing} but no KernelCase builds inputs for them; pass "
        "kernel_cases[op] so the conformance suite can check each override"
    )
    caps = acc.capabilities
    ruled_out = {torch.bfloat16: not caps.bf16, torch.float16: not caps.fp16}
    checked: list[str] = []
    fell_back: dict[str, int] = {}  # op -> cases that fell back
    runs: dict[str, int] = {}  # op -> cases checked
    unobserved: list[str] = []
    for op in sorted(overrides):
        fn = overrides[op]
        if _fallback_calls(fn) is None:
            unobserved.append(op)
        cases = kernel_cases[op]
        for case in [cases] if isinstance(cases, KernelCase) else cases:
            for dtype in case.dtypes:
                if ruled_out.get(dtype, False):
                    continue
                before = _fallback_calls(fn)
                check_kernel_override(
                    op, fn, reference_for(op), case, device=acc.device(), dtype=dtype
                )
                label = f"{op}[{str(dtype).removeprefix('torch.')}]"
                runs[op] = runs.get(op, 0) + 1
                if before is not None and _fallback_calls(fn) != before:
                    fell_back[op] = fell_back.get(op, 0) + 1
                    label += " (fell back)"
                checked.append(label)
    never = sorted(op for op, n in fell_back.items() if n == runs[op])
    if never and not allow_fallback:
        raise AssertionError(
            f"{acc.name!r}: the override of {', '.join(never)} fell back to the reference on "
            f"every call ({', '.join(f'{op}: {runs[op]} case(s)' for op in never)}), so its own "
            "kernel never ran and was never checked (vendor kernel not installed, or it "
            "declines every input it was given); install the vendor runtime, or pass "
            "allow_fallback=True to accept a check of the fallback path only"
        )
    detail = ", ".join(checked) or "no overrides"
    if never:
        detail += f"; fell back to the reference on every call: {', '.join(never)}"
    if unobserved:
        detail += f"; no fallback_calls count, fallback not observable: {', '.join(unobserved)}"
    return detail


# --------------------------------------------------------------------------------------------
# Everything at once, as a report (for scripts on hardware).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


@dataclass
class ConformanceReport:
    backend: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise AssertionError(str(self))

    def __str__(self) -> str:
        lines = [f"conformance of backend {self.backend!r}:"]
        for r in self.results:
            lines.append(f"  [{'ok' if r.passed else 'FAIL'}] {r.name}: {r.detail}")
        return "\n".join(lines)


def run_conformance(
    backend: str | Accelerator,
    *,
    pool: Any | None = None,
    reference_for: Callable[[str], Callable[..., Any]] | None = None,
    kernel_cases: Mapping[str, KernelCase | Sequence[KernelCase]] | None = None,
    allow_fallback: bool = False,
) -> ConformanceReport:
    """All checks on one accelerator; collectives only with a ``pool``, kernels only with
    ``reference_for`` (``allow_fallback``: see :func:`check_kernel_overrides`). Failures are
    recorded with their traceback, not raised."""
    acc = get_backend(backend) if isinstance(backend, str) else backend
    report = ConformanceReport(backend=acc.name)
    steps: list[tuple[str, Callable[[], str]]] = [
        (name, lambda fn=fn: fn(acc)) for name, fn in CHECKS.items()
    ]
    if pool is not None:
        steps.append(("collectives", lambda: check_collectives(pool, acc.name)))
    if reference_for is not None:
        steps.append(
            (
                "kernel_overrides",
                lambda: check_kernel_overrides(
                    acc,
                    reference_for=reference_for,
                    kernel_cases=kernel_cases or {},
                    allow_fallback=allow_fallback,
                ),
            )
        )
    for name, step in steps:
        try:
            report.results.append(CheckResult(name, True, step()))
        except Exception:
            report.results.append(CheckResult(name, False, traceback.format_exc(limit=4)))
    return report
