"""When FP8 pays off: a per-GEMM-shape decision table calibrated on the actual GPU.

An FP8 linear layer saves GEMM time but adds casts (amax reductions, scaling, transposes) whose
cost does not shrink with the GEMM, so small GEMMs (few tokens, narrow layers) are often faster
in bf16. :func:`calibrate_fp8_policy` times the forward + backward (the three GEMMs and the FP8
casts around them) of bf16 and FP8 linears on a grid of shapes ``(M tokens, N out_features,
K in_features)`` on the GPU it runs on and records the speed-ups in an :class:`Fp8Policy`.

:meth:`Fp8Policy.use_fp8` answers for any shape: it looks up the nearest calibrated shape that is
no larger in every dimension (the largest such one by FLOPs; FP8's advantage grows with size, so
this errs towards bf16) and picks FP8 when that shape's speed-up exceeds ``1 + margin``; shapes
smaller than every calibrated one stay in bf16. :meth:`Fp8Policy.min_tokens` gives the same table
as a minimum token count per calibrated ``(N, K)``.

Tables are device-specific: :meth:`Fp8Policy.save` writes JSON with the device name, torch
version and date, and :meth:`Fp8Policy.load` refuses a table measured on another device kind
unless ``force=True``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from forge_kernels.benchmarking import time_ms
from forge_kernels.fp8.quantize import Fp8Recipe, resolve_recipe

__all__ = [
    "CalibrationEntry",
    "Fp8Policy",
    "Fp8PolicyDeviceMismatchError",
    "calibrate_fp8_policy",
    "current_device_name",
    "time_linear_fwd_bwd",
]

_FORMAT = "forge-kernels/fp8-policy"
_VERSION = 1


class Fp8PolicyDeviceMismatchError(ValueError):
    """A policy table measured on one device kind was loaded for another."""


@dataclass(frozen=True, kw_only=True)
class CalibrationEntry:
    """One calibrated GEMM shape: median fwd+bwd milliseconds in bf16 and in FP8."""

    m: int
    n: int
    k: int
    bf16_ms: float
    fp8_ms: float

    @property
    def speedup(self) -> float:
        """bf16 time over FP8 time (> 1: FP8 is faster)."""
        return self.bf16_ms / self.fp8_ms if self.fp8_ms > 0 else float("inf")


def current_device_name(device: torch.device | str | None = None) -> str:
    """The name a policy table is keyed by: the CUDA device name, or ``"cpu"``."""
    device = torch.device(device) if device is not None else None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class Fp8Policy:
    """Per-GEMM-shape FP8-or-bf16 decisions from a calibration table (see the module docstring).

    Args:
        entries: the calibrated shapes and timings.
        device_name: the device they were measured on (``torch.cuda.get_device_name``).
        margin: FP8 is chosen where the speed-up exceeds ``1 + margin``.
        recipe: name of the recipe that was timed.
        device_capability, torch_version, date: provenance, written to the JSON.
        emulated: True for a table from ``calibrate_fp8_policy(emulate=True)`` (plumbing only).
    """

    entries: tuple[CalibrationEntry, ...]
    device_name: str
    margin: float = 0.05
    recipe: str = "current"
    device_capability: tuple[int, int] | None = None
    torch_version: str = field(default_factory=lambda: torch.__version__)
    date: str = field(default_factory=_now)
    emulated: bool = False
    _cache: dict[tuple[int, int, int], bool] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.entries = tuple(self.entries)
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        for e in self.entries:
            if min(e.m, e.n, e.k) < 1 or not (e.bf16_ms > 0 and e.fp8_ms > 0):
                raise ValueError(f"invalid calibration entry {e}: sizes >= 1, times > 0")

    # ---------------------------------------------------------------- decisions

    def nearest_entry(self, m: int, n: int, k: int) -> CalibrationEntry | None:
        """The largest (by FLOPs) calibrated shape with ``m' <= m, n' <= n, k' <= k``."""
        below = [e for e in self.entries if e.m <= m and e.n <= n and e.k <= k]
        if not below:
            return None
        return max(below, key=lambda e: (e.m * e.n * e.k, e.m, e.n, e.k))

    def speedup(self, m: int, n: int, k: int) -> float | None:
        """The FP8 speed-up assumed for this GEMM shape, or ``None`` below every calibrated one."""
        entry = self.nearest_entry(m, n, k)
        return None if entry is None else entry.speedup

    def use_fp8(self, m: int, n: int, k: int) -> bool:
        """Run a linear with ``m`` tokens, ``n`` out and ``k`` in features in FP8?"""
        key = (int(m), int(n), int(k))
        decision = self._cache.get(key)
        if decision is None:
            s = self.speedup(*key)
            decision = s is not None and s > 1.0 + self.margin
            self._cache[key] = decision
        return decision

    def min_tokens(self, n: int, k: int) -> int | None:
        """Smallest calibrated token count from which FP8 is chosen for every larger calibrated
        count at this exact ``(n, k)`` (``None``: never, or ``(n, k)`` was not calibrated)."""
        ms = sorted({e.m for e in self.entries if e.n == n and e.k == k})
        threshold = None
        for m in reversed(ms):
            if not self.use_fp8(m, n, k):
                break
            threshold = m
        return threshold

    def thresholds(self) -> dict[tuple[int, int], int | None]:
        """:meth:`min_tokens` for every calibrated ``(n, k)``."""
        return {
            (n, k): self.min_tokens(n, k) for n, k in sorted({(e.n, e.k) for e in self.entries})
        }

    # ---------------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "device_name": self.device_name,
            "device_capability": list(self.device_capability) if self.device_capability else None,
            "torch_version": self.torch_version,
            "date": self.date,
            "recipe": self.recipe,
            "margin": self.margin,
            "emulated": self.emulated,
            "entries": [asdict(e) | {"speedup": e.speedup} for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict) -> Fp8Policy:
        if data.get("format") != _FORMAT or data.get("version") != _VERSION:
            raise ValueError(
                f"not an FP8 policy table (expected format {_FORMAT!r} version {_VERSION}, got "
                f"{data.get('format')!r} version {data.get('version')!r})"
            )
        entries = tuple(
            CalibrationEntry(m=e["m"], n=e["n"], k=e["k"], bf16_ms=e["bf16_ms"], fp8_ms=e["fp8_ms"])
            for e in data["entries"]
        )
        cap = data.get("device_capability")
        return cls(
            entries=entries,
            device_name=data["device_name"],
            margin=data.get("margin", 0.05),
            recipe=data.get("recipe", "current"),
            device_capability=tuple(cap) if cap else None,
            torch_version=data.get("torch_version", "unknown"),
            date=data.get("date", "unknown"),
            emulated=bool(data.get("emulated", False)),
        )

    def save(self, path: str | Path) -> None:
        """Write the table as JSON (with device name, capability, torch version and date)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device_name: str | None = None,
        force: bool = False,
        recipe: str | Fp8Recipe | None = None,
    ) -> Fp8Policy:
        """Read a table written by :meth:`save`, checking it was measured on this device kind.

        ``device_name`` is the device it will be used on (default: the current CUDA device; no
        check without CUDA). A table from another device raises
        :class:`Fp8PolicyDeviceMismatchError` unless ``force=True`` (:meth:`check_device`
        runs the same check later, on the loaded table). ``recipe``: the recipe it will be
        used with; a table timed with another raises ``ValueError`` (the recipes' quantization
        costs differ, so do their speed-ups; ``force`` does not skip this check).
        """
        policy = cls.from_dict(json.loads(Path(path).read_text()))
        if recipe is not None and policy.recipe != resolve_recipe(recipe).name:
            expected = resolve_recipe(recipe).name
            raise ValueError(
                f"FP8 policy {str(path)!r} was calibrated for the {policy.recipe!r} recipe, but "
                f"it would be used with {expected!r}: FP8 speed-ups differ between recipes. "
                f"Recalibrate with calibrate_fp8_policy(recipe={expected!r})."
            )
        if not force:
            policy.check_device(device_name, source=path)
        return policy

    def check_device(
        self, device_name: str | None = None, *, source: str | Path | None = None
    ) -> None:
        """Raise :class:`Fp8PolicyDeviceMismatchError` if this table was measured on another
        device kind than ``device_name`` (default: the current CUDA device; no check without
        CUDA). The check :meth:`load` runs, for a caller that loaded with ``force=True`` (to
        look at the table first) and checks the same object afterwards instead of reading the
        file again. ``source`` names the table in the message (its path)."""
        if device_name is None and torch.cuda.is_available():
            device_name = current_device_name()
        if device_name is None or self.device_name == device_name:
            return
        what = "this FP8 policy" if source is None else f"FP8 policy {str(source)!r}"
        raise Fp8PolicyDeviceMismatchError(
            f"{what} was calibrated on {self.device_name!r} ({self.date}), but this device is "
            f"{device_name!r}: FP8 speed-ups differ between GPUs. Recalibrate with "
            "calibrate_fp8_policy() (or benchmarks/bench_fp8.py --write-policy) on this "
            "device, or pass force=True to use it anyway."
        )


# ============================================================================================
# Calibration
# ============================================================================================


def time_linear_fwd_bwd(
    linear_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    m: int,
    n: int,
    k: int,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    warmup: int = 3,
    iters: int = 10,
) -> float:
    """Median milliseconds of ``linear_fn(x, w)`` forward + backward (dx and dw) at (m, n, k)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=gen).requires_grad_()
    w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(weight_dtype or dtype)
    w.requires_grad_()
    dy = torch.randn(m, n, device=device, dtype=dtype, generator=gen)

    def step() -> None:
        torch.autograd.grad(linear_fn(x, w), (x, w), dy)

    return time_ms(step, device, warmup=warmup, iters=iters, flush_l2=False)


def fp8_device_unsupported_reason(device: torch.device) -> str | None:
    """Why FP8 GEMM speed cannot be measured on ``device`` (``None``: it can)."""
    if device.type != "cuda":
        return f"{device.type} has no FP8 tensor cores (its FP8 GEMMs are emulated)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"FP8 tensor cores need compute capability >= 8.9; this GPU is sm{cap[0]}{cap[1]}"
    return None


def calibrate_fp8_policy(
    shapes: Iterable[tuple[int, int, int]],
    *,
    device: torch.device | str | None = None,
    recipe: str | Fp8Recipe = "current",
    dtype: torch.dtype = torch.bfloat16,
    margin: float = 0.05,
    warmup: int = 3,
    iters: int = 10,
    emulate: bool = False,
) -> Fp8Policy:
    """Time bf16 vs FP8 linear forward + backward for each ``(M, N, K)`` and build a policy.

    Both sides take the same ``dtype`` input and weight (bf16 by default) and compute dx and dW;
    the FP8 side includes its casts. Raises ``RuntimeError`` on a device without FP8 tensor
    cores (CPU, or CUDA below sm89) unless ``emulate=True``, which times the emulated path to
    test the plumbing (the resulting table says nothing about FP8 speed and is marked so).
    """
    from forge_kernels.fp8.linear import fp8_linear, scaled_mm_unsupported_reason

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    recipe = resolve_recipe(recipe)
    if not emulate:
        reason = fp8_device_unsupported_reason(device)
        if reason is not None:
            raise RuntimeError(
                f"calibrate_fp8_policy measures real FP8 GEMMs, which cannot run on {device}: "
                f"{reason}. Run it on an FP8 GPU (Ada, Hopper, Blackwell), or pass emulate=True "
                "to exercise the calibration plumbing (timings then say nothing about FP8 speed)."
            )
    shapes = [tuple(int(d) for d in shape) for shape in shapes]
    if not shapes:
        raise ValueError("calibrate_fp8_policy needs at least one (M, N, K) shape")
    for m, n, k in shapes:
        if min(m, n, k) < 1:
            raise ValueError(f"shape {(m, n, k)}: M, N, K must be >= 1")
        if not emulate:
            reason = scaled_mm_unsupported_reason(recipe, device, in_features=k, out_features=n)
            if reason is not None:
                raise ValueError(f"shape (M={m}, N={n}, K={k}): {reason}")

    gemm = "emulate" if emulate else "scaled_mm"
    if recipe.name == "delayed":
        from forge_kernels.fp8.quantize import DelayedScalingState

        state = DelayedScalingState.create(3, recipe.amax_history_len, device)
    else:
        state = None

    def fp8_fn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, w, recipe=recipe, state=state, gemm=gemm)

    timing = {"device": device, "dtype": dtype, "warmup": warmup, "iters": iters}
    entries = []
    for m, n, k in shapes:
        bf16_ms = time_linear_fwd_bwd(F.linear, m, n, k, **timing)
        fp8_ms = time_linear_fwd_bwd(fp8_fn, m, n, k, **timing)
        entries.append(CalibrationEntry(m=m, n=n, k=k, bf16_ms=bf16_ms, fp8_ms=fp8_ms))
    name = current_device_name(device)
    return Fp8Policy(
        entries=tuple(entries),
        device_name=f"{name} (emulated)" if emulate else name,
        margin=margin,
        recipe=recipe.name,
        device_capability=(
            torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        ),
        emulated=emulate,
    )
