"""A fake XPyTorch (``torch_xmlir``) injected into ``sys.modules``, for tests without hardware.

Its fused functions mimic the calling conventions the adapters target, and reject anything
else the way the real kernels are reported to (3-D q, 4-D cos, int64 cu_seqlens, 2-D SwiGLU
input, matching dtypes), so a test that passes here shows the arguments were adapted. They
compute with the forge-kernels reference formulas in eager torch, so autograd works and the
outputs can be compared with the references.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from forge_core import backends


@dataclass
class FakeRuntime:
    calls: list[tuple[str, dict]] = field(default_factory=list)
    monkeypatch: pytest.MonkeyPatch | None = None

    def remove(self, module: str) -> None:
        """Make ``import <module>`` fail, as if that part of the runtime were not installed."""
        self.monkeypatch.setitem(sys.modules, module, None)


def _require(condition: bool, message: str) -> None:
    """The fake kernels' argument checks (raising like a vendor kernel's check would)."""
    if not condition:
        raise RuntimeError(f"fake torch_xmlir kernel: {message}")


def _make_modules(runtime: FakeRuntime) -> dict[str, types.ModuleType]:
    calls = runtime.calls

    class RMSNormFunction:
        @staticmethod
        def apply(x, eps, weight, flag_a, flag_b):
            _require(x.is_contiguous(), "x must be contiguous")
            _require(weight.dim() == 1 and weight.dtype == x.dtype, "weight: 1-D, x's dtype")
            _require(flag_a is False and flag_b is False, "flag_a is False and flag_b is False")
            calls.append(("rms_norm", {"x": tuple(x.shape), "eps": eps}))
            x32 = x.float()
            normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
            return weight * normed

    class SwiGLUFunction:
        @staticmethod
        def apply(x):
            _require(x.dim() == 2 and x.shape[1] % 2 == 0, "expects [N, 2d]")
            calls.append(("swiglu", {"x": tuple(x.shape)}))
            gate, up = x.float().chunk(2, dim=-1)
            return (F.silu(gate) * up).to(x.dtype)

    class FusedRoPEFunc:
        @staticmethod
        def apply(x, freqs, extra, cos, sin, cu_seqlens, fmt, interleaved):
            _require(freqs is None and extra is None, "freqs is None and extra is None")
            _require(x.dim() == 3, "query must be [T, H, D]")
            _require(cos.dim() == 4, "expected 4D tensor")
            _require(cos.shape == (x.shape[0], 1, 1, x.shape[-1]), "cos must be [T, 1, 1, D]")
            _require(cos.dtype == x.dtype == sin.dtype, "cos/sin in x's dtype")
            _require(cu_seqlens.dtype == torch.int64, "expected Long type")
            _require(fmt == "THD" and interleaved is False, "THD format, not interleaved")
            calls.append(("apply_rope", {"x": tuple(x.shape), "cos": tuple(cos.shape)}))
            half = x.shape[-1] // 2
            x32 = x.float()
            rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
            c, s = cos.float()[:, 0], sin.float()[:, 0]  # [T, 1, D]: broadcast over heads
            return (x32 * c + rotated * s).to(x.dtype), None

    root = types.ModuleType("torch_xmlir")
    nn = types.ModuleType("torch_xmlir.nn")
    rms_norm = types.ModuleType("torch_xmlir.nn.rms_norm")
    swiglu = types.ModuleType("torch_xmlir.nn.swiglu")
    rope = types.ModuleType("torch_xmlir.nn.rope")
    rms_norm.RMSNormFunction = RMSNormFunction
    swiglu.SwiGLUFunction = SwiGLUFunction
    rope.FusedRoPEFunc = FusedRoPEFunc
    root.nn = nn
    nn.rms_norm, nn.swiglu, nn.rope = rms_norm, swiglu, rope
    return {m.__name__: m for m in (root, nn, rms_norm, swiglu, rope)}


@pytest.fixture
def fake_xpytorch(monkeypatch):
    """Install the fake runtime for one test; the ``kunlun`` backend cache is reset around it."""
    runtime = FakeRuntime(monkeypatch=monkeypatch)
    for name, module in _make_modules(runtime).items():
        monkeypatch.setitem(sys.modules, name, module)
    backends._instances.pop("kunlun", None)
    yield runtime
    backends._instances.pop("kunlun", None)
    backends.set_accelerator(None)


@pytest.fixture
def no_xpytorch(monkeypatch):
    """XPyTorch is not installed (as on every machine without Kunlun hardware)."""
    monkeypatch.setitem(sys.modules, "torch_xmlir", None)
    backends._instances.pop("kunlun", None)
    yield
    backends._instances.pop("kunlun", None)
    backends.set_accelerator(None)
