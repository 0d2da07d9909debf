"""``attention`` against its eager reference, forward and backward, on every backend that runs here.

The reference itself is checked against explicit Python loops over heads and queries with masks
written from their definitions (flash-attn's causal / window conventions), and the multimodal
mask against a hand-built matrix. fp32 results are compared with the reference in fp64 (tight);
bf16 / fp16 with the reference on the same inputs (fp32 inside, loose). Every dispatch test checks
which backend ran, through ``record_attention_backends``. CUDA-only tests (flash-attn, compiled
FlexAttention with backward) are marked ``gpu`` and skipped without a GPU.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
import zlib

import pytest
import torch

from forge_kernels import registry
from forge_kernels.attention import (
    AttentionMask,
    attention,
    attention_reference,
    dense_mask,
    document_mask,
    last_attention_backend,
    multimodal_mask,
    record_attention_backends,
    segment_ids_from_cu_seqlens,
    sliding_window_mask,
)

CUDA = torch.cuda.is_available()

# Tolerances relative to the largest expected magnitude: (output, gradients).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 1e-2), torch.bfloat16: (3e-2, 5e-2)}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _randn(shape, dtype=torch.float32, *, seed, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _qkv(q_shape, kv_shape, dtype=torch.float32, *, seed, device="cpu"):
    return (
        _randn(q_shape, dtype, seed=seed, device=device),
        _randn(kv_shape, dtype, seed=seed + 1, device=device),
        _randn(kv_shape, dtype, seed=seed + 2, device=device),
    )


def _forward_backward(fn, q, k, v, grad_out, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), grads


def _assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, what
    expected = expected.to(actual.dtype)
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}"
    )


def _check_against_reference(q, k, v, *, backend, seed, **kwargs):
    """Forward and q/k/v gradients of ``attention(backend=...)`` vs the reference."""
    out_shape = q.shape[:-1] + v.shape[-1:]
    grad_out = _randn(out_shape, seed=seed + 7, device=q.device)
    with record_attention_backends() as log:
        out, grads = _forward_backward(attention, q, k, v, grad_out, backend=backend, **kwargs)
    ref_dtype = torch.float64 if q.dtype == torch.float32 else q.dtype
    ref_inputs = [t.to(ref_dtype) for t in (q, k, v)]
    ref_out, ref_grads = _forward_backward(attention_reference, *ref_inputs, grad_out, **kwargs)
    out_tol, grad_tol = TOL[q.dtype]
    assert out.dtype == q.dtype
    _assert_close(out, ref_out, out_tol, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        _assert_close(g, rg, grad_tol, f"d{name}")
    return log


def _naive_attention(q, k, v, allowed, scale=None):
    """Loops over batch, heads and queries; ``allowed[b][i][j]`` says if query i sees key j."""
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(bsz, sq, hq, v.shape[-1], dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            hk = h // (hq // hkv)
            for i in range(sq):
                keys = [j for j in range(sk) if allowed[b][i][j]]
                if not keys:
                    continue
                scores = torch.stack([q[b, i, h].double() @ k[b, j, hk].double() for j in keys])
                probs = torch.softmax(scores * scale, dim=0)
                out[b, i, h] = sum(
                    p * v[b, j, hk].double() for p, j in zip(probs, keys, strict=True)
                )
    return out


def _flash_allowed(sq, sk, causal, window):
    """flash-attn's documented rule: query i sees [i + sk - sq - left, i + sk - sq + right]."""
    left, right = window if window is not None else (-1, -1)
    rows = []
    for i in range(sq):
        row = []
        for j in range(sk):
            shifted = i + sk - sq
            ok = (not causal or j <= shifted) and (left < 0 or j >= shifted - left)
            row.append(ok and (right < 0 or j <= shifted + right))
        rows.append(row)
    return [rows]


# ============================================================================================
# The reference and the mask builders
# ============================================================================================


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (2, 0), (1, 2)])
@pytest.mark.parametrize(("sq", "sk"), [(7, 7), (4, 9), (9, 4)])
def test_reference_matches_explicit_loops(causal, window, sq, sk):
    q, k, v = _qkv((1, sq, 4, 8), (1, sk, 2, 8), torch.float64, seed=_seed(causal, window, sq, sk))
    out, lse = attention_reference(q, k, v, causal=causal, window=window, return_lse=True)
    expected = _naive_attention(q, k, v, _flash_allowed(sq, sk, causal, window))
    torch.testing.assert_close(out, expected)
    allowed = torch.tensor(_flash_allowed(sq, sk, causal, window)[0])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(2, dim=2)) / math.sqrt(8)
    expected_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(dim=-1)
    torch.testing.assert_close(lse, expected_lse)
    assert lse.shape == (1, 4, sq)


def test_causal_is_bottom_right_aligned_like_flash_attn():
    # The two examples of flash-attn's docstring.
    mask = AttentionMask(causal=True)
    assert dense_mask(mask, 2, 5)[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    expected = [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert dense_mask(mask, 5, 2)[0, 0].int().tolist() == expected


def test_fully_masked_rows_give_zero_output():
    q, k, v = _qkv((1, 5, 2, 8), (1, 2, 2, 8), seed=3)
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, causal=True, backend=backend)
        assert out[:, :3].abs().max().item() == 0.0
        assert out[:, 3:].abs().min().item() > 0.0
    _, lse = attention_reference(q, k, v, causal=True, return_lse=True)
    assert torch.isneginf(lse[:, :, :3]).all()
    assert torch.isfinite(lse[:, :, 3:]).all()


def test_sliding_window_mask_matches_hand_built():
    expected = [[1 if 0 <= i - j <= 2 else 0 for j in range(6)] for i in range(6)]
    assert sliding_window_mask(2).to_dense(6, 6)[0, 0].int().tolist() == expected
    symmetric = [[1 if abs(i - j) <= 1 else 0 for j in range(5)] for i in range(5)]
    assert sliding_window_mask(1, 1).to_dense(5, 5)[0, 0].int().tolist() == symmetric


def test_document_mask_from_cu_seqlens():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert segment_ids_from_cu_seqlens(cu).tolist() == [0, 0, 1, 1, 1]
    assert segment_ids_from_cu_seqlens(cu, total=6).tolist() == [0, 0, 1, 1, 1, -1]
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]
    assert document_mask(cu, causal=True).to_dense(5, 5)[0, 0].int().tolist() == expected
    bidirectional = document_mask(cu).to_dense(5, 5)[0, 0].int().tolist()
    assert bidirectional == [[1, 1, 0, 0, 0]] * 2 + [[0, 0, 1, 1, 1]] * 3


# Two documents: "t t [i i i] t" and "t [i i]" (t: text, [..]: one image, bidirectional).
MM_SEGMENTS = [0, 0, 0, 0, 0, 0, 1, 1, 1]
MM_BLOCKS = [-1, -1, 0, 0, 0, -1, -1, 7, 7]
MM_EXPECTED = [
    # t  t  i  i  i  t  t  i  i
    [1, 0, 0, 0, 0, 0, 0, 0, 0],  # t
    [1, 1, 0, 0, 0, 0, 0, 0, 0],  # t
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # i: all of its image, and the text before
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # i
    [1, 1, 1, 1, 1, 0, 0, 0, 0],  # i
    [1, 1, 1, 1, 1, 1, 0, 0, 0],  # t
    [0, 0, 0, 0, 0, 0, 1, 0, 0],  # t (second document)
    [0, 0, 0, 0, 0, 0, 1, 1, 1],  # i
    [0, 0, 0, 0, 0, 0, 1, 1, 1],  # i
]


def _mm_mask() -> AttentionMask:
    return multimodal_mask(block_ids=torch.tensor(MM_BLOCKS), segment_ids=torch.tensor(MM_SEGMENTS))


def test_multimodal_mask_dense_and_flex_agree_with_hand_built():
    from torch.nn.attention.flex_attention import create_mask

    mask = _mm_mask()
    assert mask.to_dense(9, 9)[0, 0].int().tolist() == MM_EXPECTED
    assert (
        create_mask(mask.mask_mod(9, 9), 1, 1, 9, 9, device="cpu")[0, 0].int().tolist()
        == MM_EXPECTED
    )
    # Through a BlockMask with blocks smaller than the sequence (partial and skipped blocks).
    block_mask = mask.to_block_mask(9, 9, block_size=4)
    assert dense_mask(block_mask, 9, 9)[0, 0].int().tolist() == MM_EXPECTED
    # Batched ids: the second row has no image at all (plain causal).
    batched = multimodal_mask(block_ids=torch.tensor([MM_BLOCKS, [-1] * 9]))
    dense = batched.to_dense(9, 9)
    assert dense.shape == (2, 1, 9, 9)
    assert dense[1, 0].equal(torch.ones(9, 9, dtype=torch.bool).tril())


# ============================================================================================
# Backend parity: forward and backward vs the reference
# ============================================================================================

HEADS = [(4, 4), (4, 2), (4, 1)]  # MHA, GQA, MQA
SEQ_DIM = [(7, 16), (13, 24)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("heads_q", "heads_kv"), HEADS)
@pytest.mark.parametrize(("seq", "head_dim"), SEQ_DIM)
def test_backend_matches_reference_fp32(backend, causal, heads_q, heads_kv, seq, head_dim):
    seed = _seed(backend, causal, heads_q, heads_kv, seq, head_dim)
    q, k, v = _qkv((2, seq, heads_q, head_dim), (2, seq, heads_kv, head_dim), seed=seed)
    log = _check_against_reference(q, k, v, backend=backend, seed=seed, causal=causal)
    assert log.backends == [backend]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backend_matches_reference_low_precision(backend, dtype):
    seed = _seed(backend, dtype)
    q, k, v = _qkv((2, 13, 4, 16), (2, 13, 2, 16), dtype, seed=seed)
    _check_against_reference(q, k, v, backend=backend, seed=seed, causal=True)
    _check_against_reference(q, k, v, backend=backend, seed=seed, window=(3, 0))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize(("window", "causal"), [((3, 0), False), ((2, 2), False), ((4, 1), True)])
def test_sliding_window_matches_reference(backend, window, causal):
    seed = _seed(backend, window, causal)
    q, k, v = _qkv((1, 13, 4, 16), (1, 13, 2, 16), seed=seed)
    _check_against_reference(q, k, v, backend=backend, seed=seed, window=window, causal=causal)
    with torch.no_grad():
        out = attention(q, k, v, window=window, causal=causal, backend=backend).double()
    expected = _naive_attention(q, k, v, _flash_allowed(13, 13, causal, window))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_softmax_scale_is_used():
    q, k, v = _qkv((1, 7, 2, 16), (1, 7, 2, 16), seed=5)
    for backend in ("sdpa", "eager"):
        out = attention(q, k, v, softmax_scale=0.3, backend=backend)
        torch.testing.assert_close(out, attention_reference(q, k, v, softmax_scale=0.3))
        assert not torch.allclose(out, attention_reference(q, k, v))


# ============================================================================================
# Packed documents (varlen)
# ============================================================================================

DOC_LENS = [5, 9, 3]


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, (2, 0)])
@pytest.mark.parametrize(("heads_q", "heads_kv"), [(4, 2), (2, 1)])
def test_packed_documents_match_separate_runs(backend, causal, window, heads_q, heads_kv):
    seed = _seed(backend, causal, window, heads_q, heads_kv)
    total = sum(DOC_LENS)
    q, k, v = _qkv((total, heads_q, 16), (total, heads_kv, 16), seed=seed)
    cu = _cu(DOC_LENS)
    grad_out = _randn((total, heads_q, 16), seed=seed + 9)
    kwargs = {"causal": causal, "window": window}
    with record_attention_backends() as log:
        out, grads = _forward_backward(
            attention, q, k, v, grad_out, cu_seqlens=cu, backend=backend, **kwargs
        )
    assert log.backends == ["sdpa" if backend == "auto" else backend]
    assert out.shape == (total, heads_q, 16)

    # Each document on its own, through the reference in fp64.
    def per_document(q, k, v):
        outs = [
            attention_reference(q[None, s:e], k[None, s:e], v[None, s:e], **kwargs)[0]
            for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)
        ]
        return torch.cat(outs)

    ref_out, ref_grads = _forward_backward(
        per_document, q.double(), k.double(), v.double(), grad_out
    )
    _assert_close(out, ref_out, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        _assert_close(g, rg, 2e-5, f"d{name}")


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_with_separate_query_and_key_documents(backend):
    # Chunked prefill: fewer queries than keys per document, causal aligned to each doc's end.
    q_lens, k_lens = [2, 3, 1], [5, 3, 4]
    seed = _seed("q!=k", backend)
    q, k, v = _qkv((sum(q_lens), 4, 16), (sum(k_lens), 2, 16), seed=seed)
    cu_q, cu_k = _cu(q_lens), _cu(k_lens)
    out = attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True, backend=backend)
    expected = []
    for (qs, qe), (ks, ke) in zip(
        zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True),
        zip(cu_k[:-1].tolist(), cu_k[1:].tolist(), strict=True),
        strict=True,
    ):
        allowed = _flash_allowed(qe - qs, ke - ks, True, None)
        expected.append(
            _naive_attention(q[None, qs:qe], k[None, ks:ke], v[None, ks:ke], allowed)[0]
        )
    torch.testing.assert_close(out.double(), torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_packed_lse_layout_is_heads_by_tokens():
    total = sum(DOC_LENS)
    q, k, v = _qkv((total, 4, 16), (total, 2, 16), seed=11)
    out, lse = attention(q, k, v, cu_seqlens=_cu(DOC_LENS), causal=True, return_lse=True)
    assert last_attention_backend().backend == "eager"
    assert out.shape == (total, 4, 16)
    assert lse.shape == (4, total)
    assert lse.dtype == torch.float32
    first = attention_reference(q[None, :5], k[None, :5], v[None, :5], causal=True, return_lse=True)
    torch.testing.assert_close(lse[:, :5], first[1][0])


# ============================================================================================
# Block masks: multimodal (forge description) and FlexAttention BlockMask
# ============================================================================================


@pytest.mark.parametrize("backend", ["sdpa", "eager", "auto"])
@pytest.mark.parametrize("packed", [False, True])
def test_multimodal_block_mask_matches_reference(backend, packed):
    seed = _seed("mm", backend, packed)
    shape_q, shape_kv = (9, 4, 16), (9, 2, 16)
    if not packed:
        shape_q, shape_kv = (1, *shape_q), (1, *shape_kv)
    q, k, v = _qkv(shape_q, shape_kv, seed=seed)
    log = _check_against_reference(q, k, v, backend=backend, seed=seed, block_mask=_mm_mask())
    assert log.backends == ["sdpa" if backend == "auto" else backend]
    with torch.no_grad():
        out = attention(q, k, v, block_mask=_mm_mask(), backend=backend)
    as_batch = (t if not packed else t[None] for t in (q, k, v))
    expected = _naive_attention(*as_batch, [MM_EXPECTED])
    torch.testing.assert_close(out.double().reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


def test_multimodal_mask_combines_with_cu_seqlens():
    q, k, v = _qkv((9, 4, 16), (9, 2, 16), seed=21)
    cu = _cu([6, 3])
    via_cu = attention(
        q, k, v, cu_seqlens=cu, block_mask=multimodal_mask(block_ids=torch.tensor(MM_BLOCKS))
    )
    via_ids = attention(q, k, v, block_mask=_mm_mask())
    torch.testing.assert_close(via_cu, via_ids)


def test_structural_mask_equals_the_flags():
    q, k, v = _qkv((9, 4, 16), (9, 2, 16), seed=25)
    cu, mask = _cu([4, 5]), AttentionMask(causal=True, window=(2, 0))
    via_mask = attention(q, k, v, cu_seqlens=cu, block_mask=mask)
    torch.testing.assert_close(
        via_mask, attention(q, k, v, cu_seqlens=cu, causal=True, window=(2, 0))
    )
    # Packed tokens with a causal mask and no cu_seqlens: one sequence.
    one_sequence = attention(q, k, v, block_mask=AttentionMask(causal=True))
    torch.testing.assert_close(one_sequence, attention(q[None], k[None], v[None], causal=True)[0])


def test_flex_block_mask_runs_through_sdpa_on_cpu():
    from torch.nn.attention.flex_attention import create_block_mask

    segments, blocks = torch.tensor(MM_SEGMENTS), torch.tensor(MM_BLOCKS)

    def mask_mod(b, h, q_idx, kv_idx):
        same_block = (blocks[q_idx] == blocks[kv_idx]) & (blocks[q_idx] >= 0)
        return (segments[q_idx] == segments[kv_idx]) & ((kv_idx <= q_idx) | same_block)

    block_mask = create_block_mask(mask_mod, None, None, 9, 9, device="cpu", BLOCK_SIZE=4)
    q, k, v = _qkv((1, 9, 4, 16), (1, 9, 2, 16), seed=31)
    grad_out = _randn((1, 9, 4, 16), seed=32)
    with record_attention_backends() as log:
        out, grads = _forward_backward(attention, q, k, v, grad_out, block_mask=block_mask)
    assert log.backends == ["sdpa"]
    ref_inputs = (t.double() for t in (q, k, v))
    ref_out, ref_grads = _forward_backward(
        attention_reference, *ref_inputs, grad_out, block_mask=_mm_mask()
    )
    _assert_close(out, ref_out, 2e-5, "out")
    for name, g, rg in zip("qkv", grads, ref_grads, strict=True):
        _assert_close(g, rg, 2e-5, f"d{name}")


@pytest.mark.parametrize("case", ["causal_gqa", "window", "packed", "multimodal", "block_mask"])
def test_flex_forward_on_cpu_matches_reference(case):
    q, k, v = _qkv((1, 13, 4, 16), (1, 13, 2, 16), seed=_seed("flex", case))
    kwargs = {
        "causal_gqa": {"causal": True},
        "window": {"window": (3, 1)},
        "packed": {"cu_seqlens": _cu([*DOC_LENS[:2], 13 - sum(DOC_LENS[:2])]), "causal": True},
        "multimodal": {
            "block_mask": multimodal_mask(block_ids=torch.tensor([-1] * 4 + [0] * 5 + [-1] * 4))
        },
        "block_mask": {
            "block_mask": AttentionMask(causal=True).to_block_mask(13, 13, block_size=4)
        },
    }[case]
    if case == "packed":
        q, k, v = q[0], k[0], v[0]
    with torch.no_grad(), record_attention_backends() as log:
        out, lse = attention(q, k, v, backend="flex", return_lse=True, **kwargs)
        # A second layer of the same step reuses the cached block mask of the same owner
        # (cu_seqlens tensor or AttentionMask): it used to fail for a tensor owner.
        again, _ = attention(q, k, v, backend="flex", return_lse=True, **kwargs)
    assert log.backends == ["flex", "flex"]
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    if case == "block_mask":
        kwargs = {"causal": True}
    ref_out, ref_lse = attention_reference(q, k, v, return_lse=True, **kwargs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_flex_on_cpu_refuses_backward():
    q, k, v = _qkv((1, 7, 2, 16), (1, 7, 2, 16), seed=41)
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q.requires_grad_(), k, v, backend="flex")


# ============================================================================================
# Dispatch, recording, errors, registry
# ============================================================================================


def test_auto_picks_sdpa_on_cpu_and_records_it(caplog):
    q, k, v = _qkv((1, 7, 4, 16), (1, 7, 2, 16), seed=51)
    logger = "forge_kernels.attention.dispatch"
    with caplog.at_level(logging.DEBUG, logger=logger), record_attention_backends() as log:
        attention(q, k, v)
        attention(q, k, v, causal=True)
        attention(q, k, v, block_mask=AttentionMask(causal=True, window=(2, 0)))
        with record_attention_backends() as inner:
            attention(q[0], k[0], v[0], cu_seqlens=_cu([3, 4]))
    assert log.backends == ["sdpa"] * 4
    assert inner.backends == ["sdpa"]
    choice = last_attention_backend()
    assert (choice.backend, choice.requested) == ("sdpa", "auto")
    assert any("'sdpa'" in record.getMessage() for record in caplog.records)


def test_auto_uses_eager_for_lse_on_cpu_and_sdpa_refuses_it():
    q, k, v = _qkv((1, 7, 4, 16), (1, 7, 2, 16), seed=61)
    out, lse = attention(q, k, v, causal=True, return_lse=True)
    choice = last_attention_backend()
    assert choice.backend == "eager"
    assert [name for name, _ in choice.skipped] == ["sdpa"]
    ref_out, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    with pytest.raises(ValueError, match="log-sum-exp"):
        attention(q, k, v, return_lse=True, backend="sdpa")


def test_flash_attn_backend_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # `import flash_attn` now fails
    q, k, v = _qkv((1, 7, 2, 16), (1, 7, 2, 16), seed=71)
    with pytest.raises(ImportError, match=r'pip install "forge-kernels\[flash-attn\]"'):
        attention(q, k, v, backend="flash_attn")


def test_dropout_is_applied_and_flex_refuses_it():
    q, k, v = _qkv((1, 13, 2, 16), (1, 13, 2, 16), seed=81)
    plain = attention(q, k, v)
    for backend in ("sdpa", "eager"):
        torch.manual_seed(0)
        dropped = attention(q, k, v, dropout_p=0.5, backend=backend)
        assert torch.isfinite(dropped).all()
        assert not torch.allclose(dropped, plain)
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout_p=0.1, backend="flex")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k_heads": 3}, "divisible"),
        (
            {"block_mask": AttentionMask(causal=True), "causal": True},
            "put causal/window into the mask",
        ),
        ({"packed_without_cu": True}, "cu_seqlens"),
        ({"cu_seqlens": torch.tensor([0, 7], dtype=torch.int32)}, "packed"),
        ({"backend": "cudnn"}, "unknown attention backend"),
        ({"window": (-2, 0)}, "window"),
        ({"dropout_p": 1.0}, "dropout_p"),
    ],
)
def test_user_errors_raise_value_error(kwargs, match):
    kwargs = dict(kwargs)
    heads_kv = kwargs.pop("k_heads", 2)
    q, k, v = _qkv((1, 7, 4, 16), (1, 7, heads_kv, 16), seed=91)
    if kwargs.pop("packed_without_cu", False):
        q, k, v = q[0], k[0], v[0]
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, **kwargs)


def test_registry_override_replaces_attention():
    calls = []

    def vendor_attention(q, k, v, **kwargs):
        calls.append(kwargs)
        return torch.zeros_like(q)

    q, k, v = _qkv((1, 7, 2, 16), (1, 7, 2, 16), seed=101)
    assert registry.implementation_of("attention") == "default"
    assert registry.get_reference("attention") is attention_reference
    attention(q, k, v)  # a default call first: its choice must not be reported for the next
    with registry.overridden("attention", vendor_attention, source="acme-npu"):
        assert registry.implementation_of("attention") == "acme-npu"
        with record_attention_backends() as log:
            assert attention(q, k, v, causal=True).abs().max().item() == 0.0
    assert log.backends == ["acme-npu"]
    assert last_attention_backend().backend == "acme-npu"
    with registry.reference_implementations(), record_attention_backends() as log:
        attention(q, k, v, backend="sdpa")  # the reference runs, whatever backend is asked
    assert [(c.backend, c.requested) for c in log] == [("reference", "sdpa")]
    assert len(calls) == 1
    assert calls[0]["causal"] is True
    assert calls[0]["backend"] is None
    assert registry.implementation_of("attention") == "default"
    assert attention(q, k, v).abs().max().item() > 0.0


# ============================================================================================
# GPU: flash-attn and compiled FlexAttention (with backward)
# ============================================================================================


def _gpu_case(seed, *, packed=False, dtype=torch.bfloat16):
    if packed:
        return _qkv((300, 8, 64), (300, 2, 64), dtype, seed=seed, device="cuda")
    return _qkv((2, 257, 8, 64), (2, 257, 2, 64), dtype, seed=seed, device="cuda")


@pytest.mark.parametrize(
    "kwargs", [{"causal": True}, {"causal": False}, {"window": (64, 0)}, {"packed": True}]
)
@pytest.mark.parametrize("backend", ["flash_attn", "flex", "sdpa"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_backends_match_reference(backend, kwargs):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    kwargs = dict(kwargs)
    packed = kwargs.pop("packed", False)
    q, k, v = _gpu_case(_seed(backend, kwargs, packed), packed=packed)
    if packed:
        kwargs.update(cu_seqlens=_cu([100, 37, 163]).cuda(), causal=True)
    log = _check_against_reference(q, k, v, backend=backend, seed=3, **kwargs)
    assert log.backends == [backend]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_flex_multimodal_backward_and_auto_dispatch():
    blocks = torch.full((300,), -1)
    blocks[20:120] = 0  # an image
    blocks[200:260] = 1  # a video chunk
    segments = torch.zeros(300, dtype=torch.long)
    segments[150:] = 1
    mask = multimodal_mask(block_ids=blocks.cuda(), segment_ids=segments.cuda())
    q, k, v = _gpu_case(7, packed=True)
    log = _check_against_reference(q, k, v, backend="auto", seed=8, block_mask=mask)
    assert log.backends == ["flex"]
    with record_attention_backends() as log:
        attention(*_gpu_case(9), causal=True)
        attention(*_gpu_case(9, packed=True), cu_seqlens=_cu([100, 200]).cuda(), causal=True)
    has_flash = importlib.util.find_spec("flash_attn") is not None
    assert log.backends == (["flash_attn"] * 2 if has_flash else ["sdpa", "flex"])
