"""Fused SwiGLU / GeGLU against their eager references, forward and backward.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the Triton kernels run
interpreted on CPU; every parity test also checks the kernel launch counters, so it cannot pass by
falling back to the reference.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.activations.glu import geglu, geglu_reference, swiglu, swiglu_reference

# The package re-exports functions next to the submodule, so import the module by path.
glu_module = importlib.import_module("forge_kernels.activations.glu")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = [
    pytest.mark.skipif(
        not can_use_triton(torch.empty(0, device=DEVICE)),
        reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
    ),
    # The interpreter evaluates sigmoid's exp in numpy, which warns where it saturates to inf.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest expected magnitude. bf16 is loose because the interpreter truncates
# fp32 -> bf16 instead of rounding to nearest (1 ulp), on top of the reference's own roundings.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# 1-D, 2-D and 3-D; last dims 1, 7, 96, 257 and one wider than a tile (2048 columns).
SHAPES = [(7,), (1,), (5, 1), (3, 7), (2, 3, 96), (4, 257), (2, 2500)]
VARIANTS = {
    "swiglu": (swiglu, swiglu_reference, {}),
    "geglu_erf": (geglu, geglu_reference, {"approximate": "none"}),
    "geglu_tanh": (geglu, geglu_reference, {"approximate": "tanh"}),
}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _check_parity(variant, gate_up, split, dtype, seed):
    """Kernel vs reference on ``split(gate_up)``; gradients w.r.t. the leaf ``gate_up``."""
    fn, reference, kwargs = VARIANTS[variant]

    def forward_backward(impl, leaf):
        leaf = leaf.detach().clone().requires_grad_()
        out = impl(*split(leaf), **kwargs)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (grad,) = torch.autograd.grad(out, leaf, grad_out.to(device=DEVICE, dtype=out.dtype))
        return out, grad

    before = dict(glu_module.KERNEL_LAUNCHES)
    out, grad = forward_backward(fn, gate_up)
    assert glu_module.KERNEL_LAUNCHES["glu_fwd"] == before.get("glu_fwd", 0) + 1, (
        "no Triton forward"
    )
    assert glu_module.KERNEL_LAUNCHES["glu_bwd"] == before.get("glu_bwd", 0) + 1, (
        "no Triton backward"
    )

    # fp32 has no rounding of its own to reproduce: aim the reference at fp64 instead.
    ref_input = gate_up.double() if dtype == torch.float32 else gate_up
    ref_out, ref_grad = forward_backward(reference, ref_input)
    _assert_close(out, ref_out.to(out.dtype), dtype)
    _assert_close(grad, ref_grad.to(grad.dtype), dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_glu_matches_reference(variant, shape, dtype):
    """``gate`` and ``up`` as separate contiguous tensors (stacked in one leaf)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((variant, shape, str(dtype))).encode()))
    # Scale 3 reaches the saturated tails of silu/gelu as well as the curved middle.
    gate_up = (torch.randn((2, *shape), generator=gen) * 3).to(device=DEVICE, dtype=dtype)
    _check_parity(variant, gate_up, lambda t: (t[0], t[1]), dtype, seed=len(shape))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_glu_on_chunks_of_fused_projection(variant):
    """The halves of a fused gate/up projection are strided views; the kernel reads them in place."""
    gen = torch.Generator().manual_seed(5)
    gate_up = (torch.randn((2, 3, 2 * 43), generator=gen) * 3).to(DEVICE, torch.bfloat16)
    _check_parity(variant, gate_up, lambda t: t.chunk(2, dim=-1), torch.bfloat16, seed=6)


def test_mixed_dtypes_promote():
    gen = torch.Generator().manual_seed(7)
    gate = torch.randn((4, 10), generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    up = torch.randn((4, 10), generator=gen).to(DEVICE, torch.float32).requires_grad_()
    out = swiglu(gate, up)
    assert out.dtype == torch.float32
    _assert_close(out, swiglu_reference(gate, up), torch.bfloat16)
    dgate, dup = torch.autograd.grad(out.sum(), (gate, up))
    assert (dgate.dtype, dup.dtype) == (torch.bfloat16, torch.float32)


def test_references_are_the_textbook_formulas():
    """Guard the references themselves: silu(g) * u and the two GELUs of F.gelu."""
    g = torch.linspace(-6, 6, 101, dtype=torch.float64)
    u = torch.cos(g)
    torch.testing.assert_close(swiglu_reference(g, u), g * torch.sigmoid(g) * u)
    torch.testing.assert_close(geglu_reference(g, u), 0.5 * g * (1 + torch.erf(g / 2**0.5)) * u)
    tanh_gelu = 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g**3)))
    torch.testing.assert_close(geglu_reference(g, u, approximate="tanh"), tanh_gelu * u)
    assert not torch.allclose(geglu_reference(g, u), geglu_reference(g, u, approximate="tanh"))


def test_fallback_uses_reference(monkeypatch):
    monkeypatch.setattr(glu_module, "can_use_triton", lambda *tensors: False)
    gate, up = torch.randn(3, 9), torch.randn(3, 9)
    before = dict(glu_module.KERNEL_LAUNCHES)
    out = geglu(gate, up, approximate="tanh")
    assert dict(glu_module.KERNEL_LAUNCHES) == before
    torch.testing.assert_close(out, F.gelu(gate, approximate="tanh") * up, rtol=0, atol=0)


def test_registry_override_swaps_swiglu():
    def vendor_swiglu(gate, up):
        return torch.full_like(gate, 42.0)

    gate, up = torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE)
    assert registry.implementation_of("swiglu") == "default"
    with registry.overridden("swiglu", vendor_swiglu, source="acme-npu"):
        assert registry.implementation_of("swiglu") == "acme-npu"
        assert torch.all(swiglu(gate, up) == 42.0)
    assert registry.implementation_of("swiglu") == "default"
    before = glu_module.KERNEL_LAUNCHES["glu_fwd"]
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
    assert glu_module.KERNEL_LAUNCHES["glu_fwd"] == before + 1


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: swiglu(torch.randn(2, 8), torch.randn(2, 4)), "same shape"),
        (lambda: geglu(torch.randn(8), torch.randn(8), approximate="sigmoid"), "approximate"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
