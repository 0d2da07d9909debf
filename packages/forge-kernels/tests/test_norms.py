"""Fused RMSNorm / LayerNorm (+ residual add) against their eager references, forward and backward.

On a machine without CUDA the root conftest sets ``TRITON_INTERPRET=1``, so the Triton kernels run
interpreted on CPU; every parity test also checks the kernel launch counters, so it cannot pass by
falling back to the reference.
"""

from __future__ import annotations

import importlib
import zlib

import pytest
import torch

pytest.importorskip("triton")

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.norms.layer_norm_kernels import layer_norm, layer_norm_reference
from forge_kernels.norms.rms_norm_kernels import rms_norm, rms_norm_reference

# The package re-exports the functions under the submodules' names, so import the modules by path.
rms_norm_module = importlib.import_module("forge_kernels.norms.rms_norm_kernels")
layer_norm_module = importlib.import_module("forge_kernels.norms.layer_norm_kernels")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device=DEVICE)),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest expected magnitude. bf16 is loose because the interpreter truncates
# fp32 -> bf16 instead of rounding to nearest (1 ulp), on top of the reference's own roundings.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}
# 1-D rows, 2-D, 3-D batches; hidden sizes 1, 7, 96, 257 (non powers of two, odd) and a row count
# above the backward's program count so the per-program weight-grad partials are really summed.
SHAPES = [(7,), (1,), (4, 1), (3, 7), (2, 3, 96), (37, 257)]


def _seed(*params) -> int:
    """A fixed seed per test case (``hash`` of a str differs between processes)."""
    return zlib.crc32(repr(params).encode())


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[dtype]
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def _leaf(shape, dtype, seed_gen, scale=1.0):
    t = torch.randn(shape, generator=seed_gen, dtype=torch.float32) * scale
    return t.to(device=DEVICE, dtype=dtype).requires_grad_()


def _run(fn, inputs: dict, out_grads_from, n_outputs: int):
    """Call ``fn`` on cloned leaves; return outputs and gradients of every leaf input."""
    leaves = {
        k: (v.detach().clone().requires_grad_() if v is not None else None)
        for k, v in inputs.items()
    }
    out = fn(**leaves)
    outs = (out,) if n_outputs == 1 else out
    assert len(outs) == n_outputs
    grads_out = out_grads_from(outs)
    with_grad = [v for v in leaves.values() if v is not None]
    grads = torch.autograd.grad(outs, with_grad, grads_out)
    return outs, grads


def _check_parity(kernel_fn, reference_fn, inputs, dtype, counters, prefix, n_outputs, seed):
    gen = torch.Generator().manual_seed(seed + 1)

    def out_grads(outs):
        return [torch.randn(o.shape, generator=gen).to(device=DEVICE, dtype=o.dtype) for o in outs]

    before = dict(counters)
    outs, grads = _run(kernel_fn, inputs, out_grads, n_outputs)
    assert counters[f"{prefix}_fwd"] == before.get(f"{prefix}_fwd", 0) + 1, (
        "Triton forward did not run"
    )
    assert counters[f"{prefix}_bwd"] == before.get(f"{prefix}_bwd", 0) + 1, (
        "Triton backward did not run"
    )

    gen.manual_seed(seed + 1)  # the same output gradients for the reference
    if dtype == torch.float32:
        # The fp32 reference computes in fp32 too, so run it in fp64 for a cleaner target: torch's
        # own fp32 layer_norm backward has ~1e-4 noise at hidden 1 (where rstd = eps**-0.5).
        inputs = {k: None if v is None else v.double() for k, v in inputs.items()}
    ref_outs, ref_grads = _run(reference_fn, inputs, out_grads, n_outputs)
    for got, want in zip(outs + grads, ref_outs + ref_grads, strict=True):
        want = want.to(got.dtype) if dtype == torch.float32 else want
        _assert_close(got, want, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("with_weight", [False, True], ids=["no_weight", "weight"])
def test_rms_norm_matches_reference(shape, dtype, with_residual, with_weight):
    gen = torch.Generator().manual_seed(_seed(shape, dtype, with_residual, with_weight))
    inputs = {
        "x": _leaf(shape, dtype, gen, scale=2.0),
        "weight": _leaf(shape[-1:], dtype, gen) if with_weight else None,
        "residual": _leaf(shape, dtype, gen) if with_residual else None,
    }
    _check_parity(
        lambda **kw: rms_norm(**kw, eps=1e-6),
        lambda **kw: rms_norm_reference(**kw, eps=1e-6),
        inputs, dtype, rms_norm_module.KERNEL_LAUNCHES, "rms_norm",
        n_outputs=2 if with_residual else 1, seed=len(shape),
    )  # fmt: skip


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("affine", ["none", "weight", "weight_bias"])
def test_layer_norm_matches_reference(shape, dtype, with_residual, affine):
    gen = torch.Generator().manual_seed(_seed(shape, dtype, with_residual, affine))
    inputs = {
        "x": _leaf(shape, dtype, gen, scale=2.0),
        "weight": _leaf(shape[-1:], dtype, gen) if affine != "none" else None,
        "bias": _leaf(shape[-1:], dtype, gen) if affine == "weight_bias" else None,
        "residual": _leaf(shape, dtype, gen) if with_residual else None,
    }
    _check_parity(
        lambda **kw: layer_norm(**kw, eps=1e-5),
        lambda **kw: layer_norm_reference(**kw, eps=1e-5),
        inputs, dtype, layer_norm_module.KERNEL_LAUNCHES, "layer_norm",
        n_outputs=2 if with_residual else 1, seed=len(shape),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("fn", "reference", "module", "prefix"),
    [
        (rms_norm, rms_norm_reference, rms_norm_module, "rms_norm"),
        (layer_norm, layer_norm_reference, layer_norm_module, "layer_norm"),
    ],
    ids=["rms_norm", "layer_norm"],
)
def test_mixed_dtypes_and_strided_input(fn, reference, module, prefix):
    """bf16 activations with an fp32 residual stream and fp32 weight; x a strided slice."""
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "x": _leaf((6, 5, 200), torch.bfloat16, gen, scale=2.0),
        "weight": _leaf((97,), torch.float32, gen),
        "residual": _leaf((6, 5, 97), torch.float32, gen),
    }

    def sliced(impl):
        # Row stride 200, hidden 97: the kernels must read x in place through its strides.
        return lambda x, **kw: impl(x[:, :, 50:147], **kw)

    _check_parity(
        sliced(fn), sliced(reference), inputs, torch.bfloat16, module.KERNEL_LAUNCHES, prefix,
        n_outputs=2, seed=3,
    )  # fmt: skip
    y, h = sliced(fn)(**inputs)
    assert y.dtype == h.dtype == torch.float32  # bf16 + fp32 residual promotes, as torch's `+`


@pytest.mark.parametrize(
    ("fn", "reference", "module", "prefix", "out_dtype"),
    [
        (rms_norm, rms_norm_reference, rms_norm_module, "rms_norm", torch.float32),
        (layer_norm, layer_norm_reference, layer_norm_module, "layer_norm", torch.bfloat16),
    ],
    ids=["rms_norm", "layer_norm"],
)
def test_output_dtype_with_fp32_weight(fn, reference, module, prefix, out_dtype):
    """bf16 x, fp32 weight: LlamaRMSNorm's output promotes to fp32, F.layer_norm's stays bf16."""
    gen = torch.Generator().manual_seed(8)
    inputs = {"x": _leaf((3, 40), torch.bfloat16, gen), "weight": _leaf((40,), torch.float32, gen)}
    _check_parity(fn, reference, inputs, torch.bfloat16, module.KERNEL_LAUNCHES, prefix, 1, seed=9)
    assert fn(**inputs).dtype == out_dtype


@pytest.mark.parametrize("fn", [rms_norm, layer_norm], ids=["rms_norm", "layer_norm"])
def test_gradient_through_residual_stream_only(fn):
    """When only the returned ``h`` is used, x and residual each get exactly its gradient."""
    gen = torch.Generator().manual_seed(1)
    x, residual = _leaf((4, 33), torch.float32, gen), _leaf((4, 33), torch.float32, gen)
    weight = _leaf((33,), torch.float32, gen)
    _, h = fn(x, weight, residual=residual)
    grad_h = torch.randn(h.shape, generator=gen).to(DEVICE)
    h.backward(grad_h)
    torch.testing.assert_close(x.grad, grad_h)
    torch.testing.assert_close(residual.grad, grad_h)
    # The two .grad fields must be independent tensors, not one buffer seen twice.
    x.grad.add_(1.0)
    torch.testing.assert_close(residual.grad, grad_h)


def test_rms_norm_reference_follows_llama_cast_order():
    """transformers' LlamaRMSNorm: normalise in fp32, cast to the input dtype, then scale."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 40, generator=gen).to(torch.bfloat16)
    weight = torch.randn(40, generator=gen)  # fp32 weight, bf16 activations
    x32 = x.to(torch.float32)
    llama = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(
        torch.bfloat16
    )
    out = rms_norm_reference(x, weight, eps=1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, llama, rtol=0, atol=0)
    torch.testing.assert_close(
        rms_norm_reference(x32, None, eps=1e-6), torch.nn.functional.rms_norm(x32, (40,), eps=1e-6)
    )


def test_fallback_uses_reference(monkeypatch):
    """Where Triton cannot run, the default implementation is the reference, bit for bit."""
    monkeypatch.setattr(rms_norm_module, "can_use_triton", lambda *tensors: False)
    gen = torch.Generator().manual_seed(4)
    x, weight = _leaf((3, 10), torch.bfloat16, gen), _leaf((10,), torch.bfloat16, gen)
    before = dict(rms_norm_module.KERNEL_LAUNCHES)
    out = rms_norm(x, weight)
    assert dict(rms_norm_module.KERNEL_LAUNCHES) == before
    torch.testing.assert_close(out, rms_norm_reference(x, weight), rtol=0, atol=0)


def test_registry_override_swaps_rms_norm():
    calls = []

    def vendor_rms_norm(x, weight=None, *, eps=1e-6, residual=None):
        calls.append(eps)
        return rms_norm_reference(x, weight, eps=eps, residual=residual)

    x = torch.randn(2, 8, device=DEVICE)
    assert registry.implementation_of("rms_norm") == "default"
    before = rms_norm_module.KERNEL_LAUNCHES["rms_norm_fwd"]
    with registry.overridden("rms_norm", vendor_rms_norm, source="acme-npu"):
        assert registry.implementation_of("rms_norm") == "acme-npu"
        rms_norm(x, eps=1e-3)
    assert calls == [1e-3]
    assert rms_norm_module.KERNEL_LAUNCHES["rms_norm_fwd"] == before
    assert registry.implementation_of("rms_norm") == "default"
    rms_norm(x)
    assert rms_norm_module.KERNEL_LAUNCHES["rms_norm_fwd"] == before + 1
    assert registry.get_reference("layer_norm") is layer_norm_reference


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: rms_norm(torch.randn(2, 8), torch.ones(4)), "weight must have shape"),
        (lambda: rms_norm(torch.randn(2, 8), residual=torch.randn(8)), "residual must have"),
        (lambda: layer_norm(torch.randn(2, 8), None, torch.ones(3)), "bias must have shape"),
        (lambda: layer_norm(torch.tensor(1.0)), "at least 1-D"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
