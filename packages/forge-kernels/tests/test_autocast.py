"""forge-kernels' matmul-like ops under ``torch.autocast`` cast their inputs as torch's own ops
do (``forge_kernels._autocast``): attention as ``scaled_dot_product_attention``, the grouped
expert GEMM as a matmul. Without it, a Qwen3-style attention (an RMSNorm with an fp32 weight on
q and k, none on v) or a MoE layer with fp32 expert weights stopped on mixed dtypes in every
bf16 / fp16 training run (forge-train's precisions run under autocast)."""

from __future__ import annotations

import pytest
import torch

from forge_kernels.attention import attention
from forge_kernels.moe import grouped_mm

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_attention_casts_mixed_inputs_like_sdpa(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 7, 4, 16, requires_grad=True)  # fp32, as after q_norm's fp32 weight
    k = torch.randn(2, 7, 2, 16, requires_grad=True)
    v = torch.randn(2, 7, 2, 16).to(dtype).requires_grad_()  # a projection's autocast output
    with torch.autocast("cpu", dtype=dtype):
        out = attention(q, k, v, causal=True)
    expected = attention(q.detach().to(dtype), k.detach().to(dtype), v.detach(), causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().square().sum().backward()
    assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32, torch.float32, dtype)


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES)
def test_grouped_mm_casts_like_a_matmul(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5])
    x = torch.randn(8, 16).to(dtype).requires_grad_()
    weight = torch.randn(3, 16, 12, requires_grad=True)  # an fp32 master weight
    with torch.autocast("cpu", dtype=dtype):
        out = grouped_mm(x, weight, counts)
    expected = grouped_mm(x.detach(), weight.detach().to(dtype), counts)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype) == (dtype, torch.float32)


def test_outside_autocast_mixed_dtypes_are_still_refused():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="share a dtype"):
        attention(q, q, q.to(torch.bfloat16))
    with pytest.raises(ValueError, match="one dtype"):
        grouped_mm(torch.randn(4, 8).to(torch.bfloat16), torch.randn(2, 8, 4), torch.tensor([2, 2]))


def test_float64_and_meta_tensors_are_left_alone():
    """As torch's autocast: double precision is not cast; a meta tensor (a shape-only forward)
    has no autocast state to ask."""
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention(q, q, q).dtype == torch.float64
        assert torch.mm(q[0, 0], q[0, 0].T).dtype == torch.float64  # torch's own rule
    meta = torch.empty(1, 4, 2, 8, device="meta")
    assert attention(meta, meta, meta, causal=True).shape == (1, 4, 2, 8)
