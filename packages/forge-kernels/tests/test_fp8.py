"""FP8 quantization, Fp8Linear, convert_to_fp8 and the FP8 policy.

On CPU everything runs through the exact FP8 emulation (real ``torch.float8_*`` casts, fp32
GEMMs), which is checked two ways: against fp32 ``nn.Linear`` with FP8-sized tolerances, and
against an independent, loop-based fake-quant implementation written here, tightly. CPU also
has a per-tensor ``torch._scaled_mm`` kernel, which checks the real GEMM path's plumbing
(operand layouts, inverse scales, token padding). GPU-only tests (real FP8 GEMMs, the Triton
quantizer compiled, Transformer Engine) are marked ``gpu`` and skipped without CUDA.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton
from forge_kernels.fp8 import (
    FP8_E4M3,
    FP8_E5M2,
    CalibrationEntry,
    DelayedScalingState,
    Fp8BlockwiseScaling,
    Fp8CurrentScaling,
    Fp8DelayedScaling,
    Fp8Linear,
    Fp8Policy,
    Fp8PolicyDeviceMismatchError,
    amax_to_scale,
    calibrate_fp8_policy,
    convert_to_fp8,
    fp8_linear,
    fp8_linear_reference,
    quantize_blockwise,
    quantize_blockwise_reference,
    quantize_tensorwise,
)
from forge_kernels.fp8 import quantize as quantize_module

CUDA = torch.cuda.is_available()
FMAX = {FP8_E4M3: 448.0, FP8_E5M2: 57344.0}
#: (mantissa bits, smallest normal exponent)
BITS = {FP8_E4M3: (3, -6), FP8_E5M2: (2, -14)}
HAS_TE = importlib.util.find_spec("transformer_engine") is not None


# ============================================================================================
# An independent fake-quant implementation (loops over blocks; no code shared with the package)
# ============================================================================================


def fq(x: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` with one scale (from its amax unless given), in fp32."""
    x = x.detach().float()
    if scale is None:
        amax = x.abs().max().item()
        scale = FMAX[dtype] / amax if amax > 0 else 1.0
    s = torch.tensor(scale, dtype=torch.float32)
    q = (x * s).clamp(-FMAX[dtype], FMAX[dtype]).to(dtype)
    return q.float() / s


def fq_blocks(x: torch.Tensor, dtype: torch.dtype, rows: int, cols: int) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32)
    for i in range(0, x.shape[0], rows):
        for j in range(0, x.shape[1], cols):
            out[i : i + rows, j : j + cols] = fq(x[i : i + rows, j : j + cols], dtype)
    return out


def fake_quant_linear(x, w, b, dy, recipe):
    """(y, dx, dw, db) of an FP8 linear under ``recipe`` (current or blockwise), in fp32."""
    gdt = FP8_E5M2 if recipe.fp8_format == "hybrid" else FP8_E4M3
    if isinstance(recipe, Fp8BlockwiseScaling):
        bs = recipe.block_size
        xf, wf = fq_blocks(x, FP8_E4M3, 1, bs), fq_blocks(w, FP8_E4M3, bs, bs)
        dx = fq_blocks(dy, gdt, 1, bs) @ wf
        dw = fq_blocks(dy, gdt, bs, 1).t() @ fq_blocks(x, FP8_E4M3, bs, 1)
    else:
        xf, wf = fq(x, FP8_E4M3), fq(w, FP8_E4M3)
        dyf = fq(dy, gdt)
        dx, dw = dyf @ wf, dyf.t() @ xf
    y = xf @ wf.t() + b.detach().float()
    return y, dx, dw, dy.float().sum(0)


def _run(fn, x, w, b, dy):
    """Output and (dx, dw, db) of ``fn(x, w, b)`` on fresh leaves."""
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), dy.to(y.dtype)))


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.float()
    return ((actual.float() - expected).norm() / expected.norm()).item()


def _close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float) -> None:
    """Elementwise ``|actual - expected| <= atol + rtol * |expected|`` (a light assert_close)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.float(), expected.float()
    excess = (actual - expected).abs() - (atol + rtol * expected.abs())
    assert (excess <= 0).all(), f"max excess {excess.max().item():.3g} over tolerance"


def _tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 accumulation order."""
    _close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def _case(m=37, k=256, n=160, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    b = torch.randn(n, generator=gen)
    dy = torch.randn(m, n, generator=gen)
    return x, w, b, dy


# ============================================================================================
# Quantization
# ============================================================================================


def _assert_fp8_error_bound(x, t, dtype):
    """|dequant - x| within half an FP8 ulp of each element (relative for normals, absolute in
    the subnormal range), in units of the element's block scale."""
    mantissa, min_exp = BITS[dtype]
    s_inv = t.expanded_scale_inv().float()
    bound = torch.maximum(x.abs() * 2.0 ** -(mantissa + 1), s_inv * 2.0 ** (min_exp - mantissa - 1))
    err = (t.dequantize() - x).abs()
    assert (err <= bound * (1 + 1e-6)).all(), (err / bound).max()


@pytest.mark.parametrize("dtype", [FP8_E4M3, FP8_E5M2])
def test_tensorwise_round_trip_and_saturation(dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(33, 70, generator=gen) * torch.logspace(-3, 2, 70)
    t = quantize_tensorwise(x, dtype)
    assert t.data.dtype == dtype
    assert t.scale_inv.dim() == 0
    assert t.block is None
    _assert_fp8_error_bound(x, t, dtype)
    # current scaling maps the amax onto fp8_max exactly: the full range is used
    assert t.data.float().abs().max().item() == FMAX[dtype]
    _close(t.scale_inv, x.abs().max() / FMAX[dtype], rtol=1e-6, atol=0)
    # a stale (too large) scale saturates at +-fp8_max instead of overflowing to inf/NaN
    big = torch.tensor([1e9, -1e9, 3.0, -0.5])
    sat = quantize_tensorwise(big, dtype, scale=torch.tensor(2.0))
    assert sat.data.float().tolist() == [FMAX[dtype], -FMAX[dtype], 6.0, -1.0]
    assert torch.isfinite(sat.dequantize()).all()


def test_zero_and_non_finite_amax_keep_a_usable_scale():
    z = quantize_tensorwise(torch.zeros(4, 8), FP8_E4M3)
    assert z.scale_inv.item() == 1.0
    assert (z.dequantize() == 0).all()
    zb = quantize_blockwise(torch.zeros(3, 130), FP8_E4M3, (1, 128))
    assert (zb.scale_inv == 1.0).all()
    assert (zb.dequantize() == 0).all()
    amax = torch.tensor([0.0, float("inf"), float("nan"), 4.0])
    assert amax_to_scale(amax, FP8_E4M3, fallback=7.0).tolist() == [7.0, 7.0, 7.0, 112.0]
    assert amax_to_scale(torch.tensor(4.0), FP8_E4M3, margin=2).item() == 28.0


BLOCK_CASES = [
    ((37, 200), (1, 128)),  # rows not a multiple of anything, a partial last column block
    ((130, 48), (128, 1)),  # the weight-gradient layout, partial row block
    ((130, 260), (128, 128)),  # weights, partial blocks both ways
    ((5, 7), (1, 128)),  # smaller than one block
]


@pytest.mark.parametrize("dtype", [FP8_E4M3, FP8_E5M2])
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES)
def test_blockwise_round_trip_and_independent_loop(shape, block, dtype):
    gen = torch.Generator().manual_seed(2)
    # columns spanning 6 decades: one per-tensor scale would flush the small ones to zero
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 2, shape[1])
    t = quantize_blockwise(x, dtype, block)
    br, bc = block
    assert t.data.shape == x.shape
    assert t.data.dtype == dtype
    assert t.block == block
    assert t.scale_inv.shape == (math.ceil(shape[0] / br), math.ceil(shape[1] / bc))
    _assert_fp8_error_bound(x, t, dtype)
    # each block (partial ones too) uses its own amax: its largest element lands on fp8_max
    _close(t.dequantize(), fq_blocks(x, dtype, br, bc), rtol=1e-6, atol=0)
    for i in range(t.scale_inv.shape[0]):
        for j in range(t.scale_inv.shape[1]):
            q = t.data[i * br : (i + 1) * br, j * bc : (j + 1) * bc].float()
            assert q.abs().max().item() == FMAX[dtype]


def test_blockwise_beats_tensorwise_on_outliers():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=gen)
    x[:, 0] *= 1e5  # one outlier channel, as in LLM activations
    err_t = _rel(quantize_tensorwise(x, FP8_E4M3).dequantize()[:, 128:], x[:, 128:])
    err_b = _rel(quantize_blockwise(x, FP8_E4M3, (1, 128)).dequantize()[:, 128:], x[:, 128:])
    assert err_b < 0.05
    assert err_t > 0.2


@pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device="cuda" if CUDA else "cpu")),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)
@pytest.mark.parametrize("dtype", [FP8_E4M3, FP8_E5M2])
@pytest.mark.parametrize(("shape", "block"), BLOCK_CASES[:3])
def test_triton_block_quant_matches_eager_bitwise(shape, block, dtype):
    device = "cuda" if CUDA else "cpu"
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton FP8 casts need sm89+")
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * torch.logspace(-5, 3, shape[1])).to(torch.bfloat16)
    x = x.to(device)
    before = quantize_module.KERNEL_LAUNCHES["fp8_block_quant"]
    got = quantize_blockwise(x, dtype, block, use_triton=True)
    assert quantize_module.KERNEL_LAUNCHES["fp8_block_quant"] == before + 1
    ref = quantize_blockwise_reference(x, dtype, block)
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert torch.equal(got.scale_inv, ref.scale_inv)


@pytest.mark.skipif(
    not can_use_triton(torch.empty(0, device="cuda" if CUDA else "cpu")),
    reason="Triton cannot run here (needs CUDA, or TRITON_INTERPRET=1 on CPU)",
)
@pytest.mark.parametrize("dtype", [FP8_E4M3, FP8_E5M2])
@pytest.mark.parametrize(
    ("shape", "given_scale", "special"),
    [
        ((70, 133), False, None),
        ((64, 64), True, None),
        ((33, 5), False, "nan"),
        ((9, 17), False, "zero"),
    ],
)
def test_triton_tensor_quant_matches_eager_bitwise(shape, given_scale, special, dtype):
    """The two-launch per-tensor quantizer: same FP8 bits, transposed copy and scale as eager
    (odd shapes, a strided input, a given delayed-scaling scale, NaN and all-zero inputs)."""
    device = "cuda" if CUDA else "cpu"
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton FP8 casts need sm89+")
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape[1], shape[0], generator=gen) * torch.logspace(-5, 3, shape[0])
    x = x.to(torch.bfloat16).t()  # a non-contiguous input
    if special == "nan":
        x[3, 1] = float("nan")
    elif special == "zero":
        x = torch.zeros(shape, dtype=torch.bfloat16)
    x = x.to(device)
    scale = torch.tensor(3.5, device=device) if given_scale else None
    before = dict(quantize_module.KERNEL_LAUNCHES)
    got = quantize_tensorwise(x, dtype, scale=scale, transpose=True, use_triton=True)
    launches = {k: v - before.get(k, 0) for k, v in quantize_module.KERNEL_LAUNCHES.items()}
    assert launches.get("fp8_tensor_cast") == 1
    assert launches.get("fp8_tensor_amax", 0) == (0 if given_scale else 1)
    ref = quantize_tensorwise(x, dtype, scale=scale, transpose=True, use_triton=False)
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8))
    assert got.data_t.is_contiguous()
    assert got.data_t.shape == (shape[1], shape[0])
    assert torch.equal(got.data_t.view(torch.uint8), ref.data_t.view(torch.uint8))
    assert torch.equal(got.scale_inv, ref.scale_inv)
    assert torch.equal(got.t().data.view(torch.uint8), got.data.t().view(torch.uint8))
    assert got.t().t().data is got.data


# ============================================================================================
# Delayed scaling
# ============================================================================================


def _x_with_amax(a: float) -> torch.Tensor:
    return torch.tensor([a, -a / 2, a / 4, 0.1 * a])


def test_delayed_scaling_amax_history_window():
    recipe = Fp8DelayedScaling(amax_history_len=3, amax_compute_algo="max")
    state = DelayedScalingState.create(1, 3)
    amaxes = [2.0, 8.0, 1.0, 1.0, 1.0, 1.0]
    # the scale used at step t comes from the amaxes of steps t-3 .. t-1 (initially 1)
    used = [1.0, 448 / 2, 448 / 8, 448 / 8, 448 / 8, 448 / 1]
    window_max = [2.0, 8.0, 8.0, 8.0, 1.0, 1.0]
    for step, (a, scale) in enumerate(zip(amaxes, used, strict=True)):
        t = state.quantize(0, _x_with_amax(a), FP8_E4M3, recipe)
        assert t.scale_inv.item() == pytest.approx(1 / scale, rel=1e-6), step
        assert state.scale.item() == pytest.approx(448 / window_max[step], rel=1e-6), step
        # the ring keeps the last history_len - 1 amaxes (oldest first) and a free slot 0
        newest = ([0.0, 0.0, *amaxes[: step + 1]])[-2:]
        assert state.amax_history[0].tolist() == [0.0, *newest]
        if step == 1:  # the spike (8) exceeds the stale range (448 / 224 = 2): it saturates
            assert t.data.float()[0].item() == 448.0
            assert t.dequantize()[0].item() == pytest.approx(2.0)


def test_delayed_scaling_most_recent_margin_and_zero_step():
    recipe = Fp8DelayedScaling(amax_history_len=4, amax_compute_algo="most_recent", margin=1)
    state = DelayedScalingState.create(2, 4)
    for a in (4.0, 16.0, 2.0):
        state.quantize(1, _x_with_amax(a), FP8_E5M2, recipe)
        assert state.scale[1].item() == pytest.approx(57344 / a / 2, rel=1e-6)
    state.quantize(1, torch.zeros(4), FP8_E5M2, recipe)  # amax 0: keep the previous scale
    assert state.scale[1].item() == pytest.approx(57344 / 2.0 / 2, rel=1e-6)
    assert state.scale[0].item() == 1.0
    assert (state.amax_history[0] == 0).all()
    with pytest.raises(ValueError, match="amax_history_len"):
        state.quantize(0, torch.ones(3), FP8_E4M3, Fp8DelayedScaling(amax_history_len=5))


def test_fp8_linear_delayed_scaling_uses_previous_step_scales():
    torch.manual_seed(0)
    recipe = Fp8DelayedScaling(amax_history_len=4)
    layer = Fp8Linear(64, 48, recipe=recipe)
    (x1, _, _, g1), (x2, _, _, g2) = _case(20, 64, 48, seed=1), _case(20, 64, 48, seed=2)
    x1 = x1 * 3  # amax well above 1 so the initial scale (1) and the next one differ
    x2, g2 = x2 * 5, g2 * 2  # larger than step 1: a scale from step 2's own amax would differ
    layer(x1).backward(g1)
    w = layer.weight.detach()
    amaxes = torch.stack([x1.abs().max(), w.abs().max(), g1.abs().max()])
    assert torch.equal(layer.fp8_amax_history[:, -1], amaxes)
    assert {"fp8_amax_history", "fp8_scale"} <= set(layer.state_dict())

    x2 = x2.requires_grad_()
    layer.weight.grad = None
    y2 = layer(x2)
    dx2, dw2 = torch.autograd.grad(y2, (x2, layer.weight), g2)
    xs, ws, gs = (448 / amaxes[0]).item(), (448 / amaxes[1]).item(), (57344 / amaxes[2]).item()
    xf, wf, gf = fq(x2, FP8_E4M3, xs), fq(w, FP8_E4M3, ws), fq(g2, FP8_E5M2, gs)
    _tight(y2, xf @ wf.t() + layer.bias.detach())
    _tight(dx2, gf @ wf)
    _tight(dw2, gf.t() @ xf)


# ============================================================================================
# Fp8Linear numerics
# ============================================================================================

RECIPES = {
    "current": Fp8CurrentScaling(),
    "current_e4m3": Fp8CurrentScaling(fp8_format="e4m3"),
    "blockwise": Fp8BlockwiseScaling(),
    "blockwise_hybrid": Fp8BlockwiseScaling(fp8_format="hybrid"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fp8_linear_matches_independent_fake_quant(name):
    recipe = RECIPES[name]
    x, w, b, dy = _case()
    got = _run(lambda x, w, b: fp8_linear(x, w, b, recipe=recipe), x, w, b, dy)
    expected = fake_quant_linear(x, w, b, dy, recipe)
    for g, e in zip(got, expected, strict=True):
        _tight(g, e)


@pytest.mark.parametrize("name", ["current", "blockwise", "delayed"])
def test_fp8_linear_close_to_fp32_linear(name):
    recipe = RECIPES.get(name) or Fp8DelayedScaling()
    x, w, b, dy = _case(seed=5)
    ref = _run(F.linear, x, w, b, dy)
    layer = nn.Linear(256, 160)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    fp8 = Fp8Linear.from_linear(layer, recipe=recipe)
    for _ in range(2):  # delayed scaling: the second step uses calibrated scales
        x_ = x.detach().clone().requires_grad_()
        y = fp8(x_)
        got = (y, *torch.autograd.grad(y, (x_, fp8.weight, fp8.bias), dy))
    # FP8 errors: E4M3 keeps 3 mantissa bits (~3-4% relative on a GEMM of random data), E5M2
    # 2 bits; a wrong scale, transpose or format gives O(1) errors.
    assert _rel(got[0], ref[0]) < 0.06
    assert _rel(got[1], ref[1]) < 0.1
    assert _rel(got[2], ref[2]) < 0.1
    _close(got[3], ref[3], rtol=1e-5, atol=1e-5)
    assert fp8.weight.grad is None  # torch.autograd.grad leaves .grad alone


def test_fp8_linear_dtypes_shapes_and_autocast():
    x, w, b, dy = _case(m=24, k=64, n=32)
    xb = x.to(torch.bfloat16).reshape(2, 12, 64).requires_grad_()
    wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
    y = fp8_linear(xb, wp, bp)
    assert y.shape == (2, 12, 32)
    assert y.dtype == torch.bfloat16
    dx, dw, db = torch.autograd.grad(y, (xb, wp, bp), dy.reshape(2, 12, 32).to(torch.bfloat16))
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert _rel(y.reshape(24, 32), F.linear(x, w, b)) < 0.06
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = fp8_linear(x, w, b)
    assert ya.dtype == torch.bfloat16
    with torch.no_grad():
        assert fp8_linear(x[:0], w, b).shape == (0, 32)
        assert Fp8Linear(64, 32, recipe="blockwise")(x).shape == (24, 32)


@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_cpu_scaled_mm_matches_emulation(recipe):
    """torch._scaled_mm has a per-tensor CPU kernel: the real-GEMM path (contiguous/transposed
    FP8 operands, inverse scales, tokens zero-padded to 16) must agree with emulation."""
    x, w, b, dy = _case(m=37, k=64, n=48, seed=6)

    def run(gemm):
        state = DelayedScalingState.create(3, 1024) if recipe == "delayed" else None
        return _run(
            lambda x, w, b: fp8_linear(x, w, b, recipe=recipe, state=state, gemm=gemm), x, w, b, dy
        )

    for got, expected in zip(run("scaled_mm"), run("emulate"), strict=True):
        _tight(got, expected)


def test_registry_op_and_errors():
    assert "fp8_linear" in registry.list_ops()
    assert registry.get_reference("fp8_linear") is fp8_linear_reference
    calls = []

    def fake(x, weight, bias=None, *, recipe, state, gemm):
        calls.append(recipe.name)
        return F.linear(x, weight, bias)

    layer = Fp8Linear(16, 16)
    with registry.overridden("fp8_linear", fake, source="test"):
        layer(torch.randn(3, 16))
    assert calls == ["current"]

    x, w, _b, _ = _case(m=4, k=32, n=16)
    with pytest.raises(ValueError, match="DelayedScalingState"):
        fp8_linear(x, w, recipe="delayed")
    with pytest.raises(ValueError, match="in_features=32"):
        fp8_linear(x[:, :16], w)
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        fp8_linear(x, w, recipe="mxfp8")
    with pytest.raises(ValueError, match="gemm='scaled_mm' cannot run here"):
        fp8_linear(x, w, recipe="blockwise", gemm="scaled_mm")
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8_linear(x[:, :24], w[:, :24], gemm="scaled_mm")


@pytest.mark.parametrize("recipe", ["current", "blockwise", "delayed"])
def test_fp8_linear_saves_its_fp8_operands_for_backward(recipe, monkeypatch):
    """The FP8 copies the backward uses go through ``save_for_backward``, hence through the
    saved-tensor hooks with which non-reentrant activation checkpointing (torch.utils.checkpoint,
    forge-parallel's recompute) drops them after the forward and recomputes them in the backward;
    a hook stashing every saved tensor must hold every FP8 tensor still alive after the forward.
    Delayed scaling too: its recomputation replays the forward's scales (test_fp8_delayed_state
    checks it under torch.utils.checkpoint). The gradients through the hooks are bit-equal to a
    plain run. (The hooks stand in for the checkpoint itself, whose first use imports
    torch._dynamo: tens of seconds.)"""
    import weakref

    import forge_kernels.fp8.linear as linear_module

    made: list[weakref.ref] = []

    def spy(quantize):
        def wrapped(*args, **kwargs):
            q = quantize(*args, **kwargs)
            made.extend(weakref.ref(t) for t in (q.data, q.data_t) if t is not None)
            return q

        return wrapped

    for module, name in [
        (linear_module, "quantize_tensorwise"),
        (linear_module, "quantize_blockwise"),
        (quantize_module, "quantize_tensorwise"),  # delayed scaling's state.quantize
    ]:
        monkeypatch.setattr(module, name, spy(getattr(module, name)))

    def run(hooked: bool):
        torch.manual_seed(0)
        layer = Fp8Linear(128, 128, recipe=recipe, gemm="emulate")
        grads, outside = [], []
        for step in range(2):
            x = (torch.randn(128, 128) * (1 + step)).requires_grad_()
            made.clear()
            stash: list[torch.Tensor] = []

            def pack(t, stash=stash):
                stash.append(t)
                return len(stash) - 1

            if hooked:
                with torch.autograd.graph.saved_tensors_hooks(pack, stash.__getitem__):
                    y = layer(x)
            else:
                y = layer(x)
            stashed = {id(t) for t in stash} | {id(t._base) for t in stash if t._base is not None}
            outside.append(sum(r() is not None and id(r()) not in stashed for r in made))
            y.square().sum().backward()
            grads.append([x.grad, layer.weight.grad.clone(), layer.bias.grad.clone()])
            layer.weight.grad = layer.bias.grad = None
        history = layer.fp8_amax_history.clone() if recipe == "delayed" else None
        return grads, outside, history

    grads, outside_plain, history = run(False)
    grads_hooked, outside_hooked, history_hooked = run(True)
    assert all(n > 0 for n in outside_plain), "the spy must see the FP8 copies kept for backward"
    for plain, hooked in zip(grads, grads_hooked, strict=True):
        for a, b in zip(plain, hooked, strict=True):
            assert torch.equal(a, b)
    if recipe == "delayed":
        assert torch.equal(history, history_hooked)
    assert outside_hooked == [0, 0], f"FP8 copies kept outside the hooks: {outside_hooked}"


# ============================================================================================
# convert_to_fp8 and training
# ============================================================================================


class _Block(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.gate = nn.Linear(dim, 16)  # a router-like gate: stays in high precision

    def forward(self, h):
        g = torch.sigmoid(self.gate(h)).mean(-1, keepdim=True)
        return h + g * self.down(F.gelu(self.up(h)))


class _TinyLM(nn.Module):
    def __init__(self, vocab=32, dim=128, hidden=256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([_Block(dim, hidden) for _ in range(2)])
        self.narrow = nn.Linear(dim, 40)  # 40 is not a multiple of 16: not FP8-eligible
        self.lm_head = nn.Linear(40, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(F.gelu(self.narrow(h)))


def test_convert_to_fp8_swaps_the_right_modules():
    torch.manual_seed(0)
    model = _TinyLM()
    up = model.layers[0].up.weight
    convert_to_fp8(model, recipe="current")
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Fp8Linear))
    assert converted == ["layers.0.down", "layers.0.up", "layers.1.down", "layers.1.up"]
    assert type(model.lm_head) is nn.Linear
    assert type(model.narrow) is nn.Linear
    assert type(model.layers[0].gate) is nn.Linear
    assert model.layers[0].up.weight is up  # parameters are shared, not copied
    assert "recipe=current" in repr(model.layers[0].up)
    # converting again is a no-op; a filter and custom skip patterns are honoured
    convert_to_fp8(model)
    other = convert_to_fp8(
        _TinyLM(), skip=("*.up", "*.gate"), filter_fn=lambda name, m: "1." not in name
    )
    assert sorted(n for n, m in other.named_modules() if isinstance(m, Fp8Linear)) == [
        "layers.0.down"
    ]
    assert isinstance(convert_to_fp8(nn.Linear(32, 32)), Fp8Linear)


@pytest.mark.parametrize("recipe", ["current", "delayed", "blockwise"])
def test_fp8_training_lowers_the_loss_like_fp32(recipe):
    vocab, steps = 32, 12

    def train(convert: bool) -> list[float]:
        torch.manual_seed(0)
        model = _TinyLM(vocab)
        if convert:
            convert_to_fp8(model, recipe=recipe)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(0, vocab, (4, 16), generator=gen)
            loss = F.cross_entropy(
                model(tokens).flatten(0, 1), ((3 * tokens + 1) % vocab).flatten()
            )
            model.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD (torch.optim's first step imports dynamo: slow)
                for p in model.parameters():
                    p -= 0.3 * p.grad
            losses.append(loss.item())
        return losses

    fp8, fp32 = train(True), train(False)
    assert fp8[-1] < 0.5 * fp8[0]
    assert abs(fp8[-1] - fp32[-1]) < 0.05 * fp32[0]


# ============================================================================================
# Policy
# ============================================================================================

H100 = "NVIDIA H100 80GB HBM3"


def _synthetic_policy(margin=0.05) -> Fp8Policy:
    def e(m, n, k, speedup):
        return CalibrationEntry(m=m, n=n, k=k, bf16_ms=speedup, fp8_ms=1.0)

    entries = [
        e(256, 4096, 4096, 0.6),
        e(1024, 4096, 4096, 0.95),
        e(4096, 4096, 4096, 1.3),
        e(16384, 4096, 4096, 1.6),
        e(256, 14336, 4096, 0.8),
        e(1024, 14336, 4096, 1.2),
        e(4096, 14336, 4096, 1.7),
        e(2048, 4096, 14336, 1.04),
    ]
    return Fp8Policy(entries=entries, device_name=H100, margin=margin, device_capability=(9, 0))


def test_policy_decisions():
    p = _synthetic_policy()
    assert p.use_fp8(8192, 4096, 4096)  # nearest below: (4096, 4096, 4096), 1.3
    assert not p.use_fp8(1024, 4096, 4096)  # 0.95
    assert not p.use_fp8(100, 4096, 4096)  # smaller than every calibrated shape
    assert not p.use_fp8(10**6, 4096, 2048)  # K below every calibrated K
    assert p.use_fp8(2048, 14336, 4096)  # nearest below: (1024, 14336, 4096), 1.2
    assert p.use_fp8(5000, 8192, 4096)  # N=14336 rows are larger: (4096, 4096, 4096)
    assert not p.use_fp8(2048, 4096, 14336)  # 1.04 is within the 5% margin
    assert _synthetic_policy(margin=0.0).use_fp8(2048, 4096, 14336)
    assert p.speedup(100, 4096, 4096) is None
    assert p.min_tokens(4096, 4096) == 4096
    assert p.min_tokens(14336, 4096) == 1024
    assert p.min_tokens(1, 1) is None
    assert p.thresholds()[(4096, 14336)] is None


def test_policy_save_load_round_trip_and_device_check(tmp_path):
    p = _synthetic_policy()
    path = tmp_path / "fp8_policy.json"
    p.save(path)
    data = json.loads(path.read_text())
    assert data["device_name"] == H100
    assert data["torch_version"] == torch.__version__
    assert data["date"]
    assert data["device_capability"] == [9, 0]
    assert data["entries"][2]["speedup"] == pytest.approx(1.3)

    loaded = Fp8Policy.load(path, device_name=H100)
    assert loaded.entries == p.entries
    assert loaded.margin == p.margin
    grid = [(m, n, k) for m in (128, 2048, 9000) for n in (4096, 14336) for k in (4096, 14336)]
    assert [loaded.use_fp8(*s) for s in grid] == [p.use_fp8(*s) for s in grid]

    with pytest.raises(
        Fp8PolicyDeviceMismatchError, match=r"calibrated on 'NVIDIA H100.*force=True"
    ):
        Fp8Policy.load(path, device_name="NVIDIA A100-SXM4-80GB")
    assert (
        Fp8Policy.load(path, device_name="NVIDIA A100-SXM4-80GB", force=True).entries == p.entries
    )

    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not an FP8 policy table"):
        Fp8Policy.load(tmp_path / "bad.json", force=True)


def test_policy_check_device_on_a_loaded_table(monkeypatch):
    """``check_device`` is the check ``load`` runs, on a table already in hand (one loaded with
    ``force=True``): the current CUDA device by default, nothing to check without CUDA."""
    import forge_kernels.fp8.policy as policy_module

    p = _synthetic_policy()
    p.check_device(H100)
    with pytest.raises(
        Fp8PolicyDeviceMismatchError, match=r"^this FP8 policy was calibrated on 'NVIDIA H100"
    ):
        p.check_device("NVIDIA A100-SXM4-80GB")
    with pytest.raises(Fp8PolicyDeviceMismatchError, match=r"^FP8 policy 'p.json' was calib"):
        p.check_device("NVIDIA A100-SXM4-80GB", source="p.json")
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: False)
    p.check_device()  # no CUDA: no device to compare with
    monkeypatch.setattr(policy_module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(policy_module, "current_device_name", lambda: "NVIDIA L40S")
    with pytest.raises(Fp8PolicyDeviceMismatchError, match=r"this device is 'NVIDIA L40S'"):
        p.check_device()


def test_policy_load_checks_the_recipe(tmp_path):
    path = tmp_path / "fp8_policy.json"
    _synthetic_policy().save(path)  # timed with the "current" recipe
    assert Fp8Policy.load(path, device_name=H100, recipe="current").recipe == "current"
    assert Fp8Policy.load(path, device_name=H100, recipe=Fp8CurrentScaling()).recipe == "current"
    with pytest.raises(
        ValueError,
        match=r"calibrated for the 'current' recipe, but it would be used with 'blockwise'.*"
        r"calibrate_fp8_policy\(recipe='blockwise'\)",
    ):
        Fp8Policy.load(path, device_name=H100, recipe=Fp8BlockwiseScaling(), force=True)


def test_fp8_linear_follows_the_policy():
    entries = [
        CalibrationEntry(m=32, n=48, k=64, bf16_ms=1.0, fp8_ms=2.0),
        CalibrationEntry(m=128, n=48, k=64, bf16_ms=2.0, fp8_ms=1.0),
    ]
    policy = Fp8Policy(entries=entries, device_name="cpu")
    torch.manual_seed(0)
    layer = Fp8Linear(64, 48, policy=policy)
    small, large = torch.randn(2, 30, 64), torch.randn(2, 100, 64)  # 60 and 200 tokens
    w, b = layer.weight, layer.bias
    assert not layer.uses_fp8(small)
    assert layer.uses_fp8(large)
    assert torch.equal(layer(small), F.linear(small, w, b))  # 60 tokens: bf16 path
    assert torch.equal(layer(large), fp8_linear(large, w, b))  # 200 tokens: FP8
    assert not torch.equal(layer(large), F.linear(large, w, b))


def test_calibration_needs_an_fp8_device_unless_emulated(tmp_path):
    if not CUDA:
        with pytest.raises(RuntimeError, match="emulate=True"):
            calibrate_fp8_policy([(64, 32, 32)], device="cpu")
    policy = calibrate_fp8_policy(
        [(16, 32, 32), (64, 32, 32)], device="cpu", emulate=True, warmup=0, iters=1
    )
    assert policy.emulated
    assert policy.device_name == "cpu (emulated)"
    assert [(e.m, e.n, e.k) for e in policy.entries] == [(16, 32, 32), (64, 32, 32)]
    assert all(e.bf16_ms > 0 and e.fp8_ms > 0 for e in policy.entries)
    policy.save(tmp_path / "p.json")
    assert (
        Fp8Policy.load(tmp_path / "p.json", device_name="cpu (emulated)").entries == policy.entries
    )


# ============================================================================================
# Transformer Engine backend, imports
# ============================================================================================


@pytest.mark.skipif(HAS_TE, reason="transformer_engine is installed")
def test_te_backend_missing_names_the_extra():
    with pytest.raises(ImportError, match=r'pip install "forge-kernels\[transformer-engine\]"'):
        Fp8Linear(16, 16, backend="te")
    with pytest.raises(ImportError, match="transformer-engine"):
        Fp8Linear.from_linear(nn.Linear(16, 16), backend="te")


def test_import_neither_warns_nor_imports_transformer_engine():
    script = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error")
        import forge_kernels.fp8
        from forge_kernels.fp8 import Fp8Linear
        Fp8Linear(16, 16)
        assert "transformer_engine" not in sys.modules
        print("ok")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


# ============================================================================================
# GPU
# ============================================================================================


def _cap() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if CUDA else (0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["current", "delayed", "blockwise"])
def test_gpu_scaled_mm_matches_emulation(recipe):
    if _cap() < (8, 9):
        pytest.skip("FP8 GEMMs need sm89+")
    if recipe == "blockwise" and _cap()[0] != 9:
        pytest.skip("torch's block-wise FP8 GEMM needs sm90")
    x, w, b, dy = (t.cuda() for t in _case(m=300, k=512, n=384, seed=7))
    x = x.to(torch.bfloat16)

    def run(gemm):
        state = DelayedScalingState.create(3, 1024, "cuda") if recipe == "delayed" else None
        return _run(
            lambda x, w, b: fp8_linear(x, w, b, recipe=recipe, state=state, gemm=gemm), x, w, b, dy
        )

    real, emulated, ref = run("scaled_mm"), run("emulate"), _run(F.linear, x.float(), w, b, dy)
    for r, e, f in zip(real, emulated, ref, strict=True):
        assert r.dtype == e.dtype
        assert _rel(r, e) < 1e-2  # bf16 output rounding and Hopper's FP8 accumulation
        assert _rel(r, f) < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TE or not CUDA, reason="needs transformer_engine and CUDA")
@pytest.mark.parametrize("recipe", ["current", "delayed"])
def test_gpu_te_backend_close_to_fp32(recipe):
    if _cap() < (8, 9):
        pytest.skip("FP8 needs sm89+")
    x, w, b, dy = (t.cuda() for t in _case(m=256, k=512, n=384, seed=8))
    linear = nn.Linear(512, 384).cuda()
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(b)
    te_layer = Fp8Linear.from_linear(linear, recipe=recipe, backend="te")
    xb = x.to(torch.bfloat16).requires_grad_()
    for _ in range(2):
        y = te_layer(xb)
        (dx,) = torch.autograd.grad(y, (xb,), dy.to(y.dtype))
    ref = _run(F.linear, x, w, b, dy)
    assert _rel(y, ref[0]) < 0.06
    assert _rel(dx, ref[1]) < 0.1


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_calibration_and_policy_round_trip(tmp_path):
    if _cap() < (8, 9):
        with pytest.raises(RuntimeError, match="emulate=True"):
            calibrate_fp8_policy([(256, 256, 256)])
        return
    policy = calibrate_fp8_policy([(256, 256, 256), (4096, 2048, 2048)], warmup=2, iters=5)
    assert all(math.isfinite(e.speedup) and e.speedup > 0 for e in policy.entries)
    policy.save(tmp_path / "p.json")
    loaded = Fp8Policy.load(tmp_path / "p.json")  # same device: no error
    assert loaded.device_name == torch.cuda.get_device_name()
