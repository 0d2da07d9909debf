"""PyTorch ``F.scaled_dot_product_attention`` (SDPA): torch picks flash / cuDNN / efficient / math.

* No mask, or causal with ``Sq == Sk``: SDPA's own ``is_causal`` (its fused kernels, FlashAttention 2
  among them, Dao 2023). Grouped-query attention goes in as ``enable_gqa=True`` (GQA, Ainslie et
  al. 2023).
* Everything else (sliding windows, packed documents, block masks, causal with ``Sq != Sk``,
  which flash-attn aligns to the bottom right but ``is_causal`` to the top left) runs with an
  explicit dense boolean ``attn_mask`` materialized from the mask description. For packed
  documents this is the block-diagonal (+ causal / window) mask over all ``T`` tokens: exact,
  one kernel call, differentiable, no host synchronization, at the cost of ``T x T`` mask memory
  and of computing the masked-out blocks (no block skipping; on GPU the auto dispatch prefers
  FlexAttention for these). With a mask on CUDA the key/value heads are expanded rather than
  passed with ``enable_gqa``, so the memory-efficient kernel (which takes masks but not GQA)
  stays eligible.

SDPA returns no log-sum-exp, so ``return_lse=True`` is not supported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge_kernels.attention.backends import AttentionProblem
from forge_kernels.attention.masks import AttentionMask, dense_mask

__all__ = ["run", "sdpa_supports_gqa", "unsupported_reason"]


def sdpa_supports_gqa() -> bool:
    """``enable_gqa`` arrived in torch 2.5."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def unsupported_reason(problem: AttentionProblem) -> str | None:
    if problem.return_lse:
        return (
            "SDPA does not return the log-sum-exp (return_lse=True); use backend='flash_attn', "
            "'flex' or 'eager'"
        )
    return None


def _native_causal(problem: AttentionProblem, mask) -> bool:
    """True if the mask is exactly SDPA's ``is_causal`` (top-left aligned; equal lengths)."""
    return (
        isinstance(mask, AttentionMask)
        and mask.is_structural
        and mask.causal
        and mask.window is None
        and problem.q_len == problem.kv_len
    )


def run(problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v = problem.bshd()
    q_BHSD, k_BHSD, v_BHSD = (t.transpose(1, 2) for t in (q, k, v))
    mask = problem.effective_mask()
    attn_mask, is_causal = None, False
    if mask is not None:
        if _native_causal(problem, mask):
            is_causal = True
        else:
            attn_mask = dense_mask(
                mask, problem.q_len, problem.kv_len, batch=q.shape[0], device=q.device
            )

    kwargs = {}
    groups = problem.heads_q // problem.heads_kv
    if groups > 1:
        if sdpa_supports_gqa() and not (attn_mask is not None and q.is_cuda):
            kwargs["enable_gqa"] = True
        else:
            k_BHSD = k_BHSD.repeat_interleave(groups, dim=1)
            v_BHSD = v_BHSD.repeat_interleave(groups, dim=1)

    out_BHSD = F.scaled_dot_product_attention(
        q_BHSD,
        k_BHSD,
        v_BHSD,
        attn_mask=attn_mask,
        dropout_p=problem.dropout_p,
        is_causal=is_causal,
        scale=problem.scale,
        **kwargs,
    )
    return problem.finish(out_BHSD.transpose(1, 2).contiguous(), None)
