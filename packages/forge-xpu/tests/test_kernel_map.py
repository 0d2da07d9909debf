"""The Kunlun kernel table: vendor kernels get adapted arguments, and every path falls back to
forge-kernels' torch-native reference (vendor op absent, or a call it cannot serve)."""

from __future__ import annotations

import sys

import pytest
import torch

from forge_core.testing.conformance import check_kernel_override
from forge_kernels import registry
from forge_xpu.conformance import KERNEL_CASES
from forge_xpu.kunlun_kernels import KUNLUN_KERNELS
from forge_xpu.overrides import FALLBACK, VendorKernel, build_overrides, resolve_vendor


def _overrides(device_type: str = "cpu"):
    """The Kunlun table resolved against whatever ``torch_xmlir`` is importable now.

    ``device_type="cpu"`` lets the adapters serve CPU tensors (on hardware it is ``cuda``).
    """
    return build_overrides(
        KUNLUN_KERNELS, device_type=device_type, reference_for=registry.get_reference
    )


def test_the_table_maps_known_forge_ops_once():
    ops = [row.op for row in KUNLUN_KERNELS]
    assert len(ops) == len(set(ops))
    assert set(ops) <= set(registry.list_ops())
    assert all(row.vendor.startswith("torch_xmlir.") and row.source for row in KUNLUN_KERNELS)
    with pytest.raises(ValueError, match=r"package\.module:attr"):
        VendorKernel(op="rms_norm", vendor="torch_xmlir.nn.rms_norm", adapter=lambda *a: None)


@pytest.mark.parametrize("op", [row.op for row in KUNLUN_KERNELS])
def test_vendor_kernels_match_the_reference_with_gradients(fake_xpytorch, op):
    override = _overrides()[op]
    assert override.has_vendor_kernel, override
    cases = KERNEL_CASES[op]
    for case in cases:
        for dtype in case.dtypes:
            check_kernel_override(
                op,
                override,
                registry.get_reference(op),
                case,
                device=torch.device("cpu"),
                dtype=dtype,
            )
    assert override.fallback_calls == 0
    assert override.vendor_calls == sum(len(c.dtypes) for c in cases)


def test_arguments_are_adapted_to_the_vendor_conventions(fake_xpytorch):
    overrides = _overrides()
    x, w, r = torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 3, 8)
    y, h = overrides["rms_norm"](x, w, eps=1e-5, residual=r)
    assert torch.equal(h, x + r)  # the residual add happens before the kernel
    torch.testing.assert_close(y, registry.get_reference("rms_norm")(x + r, w, eps=1e-5))

    gate, up = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert overrides["swiglu"](gate, up).shape == (2, 3, 8)

    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)
    cos, sin = torch.rand(5, 4), torch.rand(5, 4)  # shared by the batch: broadcast per token
    q_out, k_out = overrides["apply_rope"](q, k, cos, sin)
    ref_q, ref_k = registry.get_reference("apply_rope")(q, k, cos, sin)
    torch.testing.assert_close(q_out, ref_q)
    torch.testing.assert_close(k_out, ref_k)
    q_only, none = overrides["apply_rope"](q, None, cos, sin)
    assert none is None
    torch.testing.assert_close(q_only, ref_q)

    assert fake_xpytorch.calls == [
        ("rms_norm", {"x": (2, 3, 8), "eps": 1e-5}),
        ("swiglu", {"x": (6, 16)}),  # [N, 2d], gate half first
        ("apply_rope", {"x": (10, 4, 8), "cos": (10, 1, 1, 8)}),  # tokens flattened, cos doubled
        ("apply_rope", {"x": (10, 2, 8), "cos": (10, 1, 1, 8)}),  # one call per tensor
        ("apply_rope", {"x": (10, 4, 8), "cos": (10, 1, 1, 8)}),
    ]


def test_absent_vendor_ops_fall_back_to_the_reference(fake_xpytorch):
    fake_xpytorch.remove("torch_xmlir.nn.swiglu")  # module missing
    del sys.modules["torch_xmlir.nn.rms_norm"].RMSNormFunction  # symbol missing
    overrides = _overrides()
    assert not overrides["swiglu"].has_vendor_kernel
    assert not overrides["rms_norm"].has_vendor_kernel
    assert overrides["apply_rope"].has_vendor_kernel
    assert "reference" in repr(overrides["swiglu"])

    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    assert torch.equal(overrides["swiglu"](gate, up), registry.get_reference("swiglu")(gate, up))
    x, w = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(overrides["rms_norm"](x, w), registry.get_reference("rms_norm")(x, w))
    assert (overrides["swiglu"].fallback_calls, overrides["rms_norm"].fallback_calls) == (1, 1)
    assert fake_xpytorch.calls == []


def test_without_any_runtime_every_op_is_the_reference(no_xpytorch):
    overrides = _overrides()
    assert set(overrides) == {row.op for row in KUNLUN_KERNELS}
    assert not any(o.has_vendor_kernel for o in overrides.values())


def test_calls_the_kernel_cannot_serve_fall_back(fake_xpytorch):
    ref = registry.get_reference
    cpu = _overrides("cpu")
    x, w = torch.randn(3, 8), torch.randn(8)
    cases = [
        ("rms_norm", (x, None), {}),  # no weight
        ("rms_norm", (x.double(), w.double()), {}),  # fp64: not a kernel dtype
        ("rms_norm", (x, w.half()), {}),  # mixed dtypes
        ("swiglu", (torch.randn(3, 8), torch.randn(3, 8).bfloat16()), {}),  # dtypes differ
        ("apply_rope", (torch.randn(5, 2, 8), None, torch.rand(5, 4), torch.rand(5, 4)),
         {"layout": "interleaved"}),
        ("apply_rope", (torch.randn(5, 2, 8), None, torch.rand(5, 2), torch.rand(5, 2)), {}),  # partial rotary
    ]  # fmt: skip
    for op, args, kwargs in cases:
        before = cpu[op].fallback_calls
        got, expected = cpu[op](*args, **kwargs), ref(op)(*args, **kwargs)
        torch.testing.assert_close(got, expected)
        assert cpu[op].fallback_calls == before + 1, (op, kwargs)
    # Invalid arguments reach the reference, which raises forge's own error.
    with pytest.raises(ValueError, match="gate and up of the same shape"):
        cpu["swiglu"](torch.randn(3, 8), torch.randn(3, 4))
    # Tensors on another device than the accelerator's: the reference runs.
    on_device = _overrides("cuda")
    torch.testing.assert_close(on_device["rms_norm"](x, w), ref("rms_norm")(x, w))
    assert on_device["rms_norm"].fallback_calls == 1
    assert fake_xpytorch.calls == []


def test_resolve_vendor_follows_attribute_paths(fake_xpytorch):
    assert resolve_vendor("torch_xmlir.nn.rope:FusedRoPEFunc.apply") is not None
    assert resolve_vendor("torch_xmlir.nn.rope:FusedRoPEFunc.missing") is None
    assert resolve_vendor("no_such_vendor_package:fn") is None
    assert repr(FALLBACK) == "FALLBACK"
