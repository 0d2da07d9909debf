"""The eager backend and :func:`attention_reference`: attention in plain PyTorch, the numerics spec.

Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need")::

    out = softmax(scale * q kᵀ + mask) v,     lse = logsumexp(scale * q kᵀ + mask)

computed in fp32 (fp64 for fp64 inputs) with an explicit dense boolean mask, grouped-query
attention by ``repeat_interleave`` of the key/value heads (GQA, Ainslie et al. 2023: query head
``h`` uses key/value head ``h // (heads_q // heads_kv)``), and the output rounded once to the input
dtype. A fully masked query row gets a zero output and ``lse = -inf``. It materializes the
``[B, H, Sq, Sk]`` scores: meant for tests, debugging and small shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from forge_kernels.attention.backends import AttentionProblem
from forge_kernels.attention.masks import AttentionMask, dense_mask

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

__all__ = ["attention_reference", "run", "unsupported_reason"]


def unsupported_reason(problem: AttentionProblem) -> str | None:
    """The eager path runs everything."""
    return None


def run(problem: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor | None]:
    q, k, v = problem.bshd()
    out_dtype = q.dtype
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    q_BHSD, k_BHSD, v_BHSD = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))
    groups = problem.heads_q // problem.heads_kv
    if groups > 1:
        k_BHSD = k_BHSD.repeat_interleave(groups, dim=1)
        v_BHSD = v_BHSD.repeat_interleave(groups, dim=1)

    scores = torch.matmul(q_BHSD, k_BHSD.transpose(-1, -2)) * problem.scale
    mask = problem.effective_mask()
    if mask is not None:
        allowed = dense_mask(mask, problem.q_len, problem.kv_len, batch=q.shape[0], device=q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))

    # Softmax with the row max subtracted (detached: softmax does not depend on it), written out
    # so that fully masked rows give zero probabilities and lse = -inf without NaN gradients.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    nonempty = total > 0
    probs = weights / torch.where(nonempty, total, torch.ones_like(total))
    log_total = torch.log(torch.where(nonempty, total, torch.ones_like(total)))
    lse = torch.where(nonempty, log_total + row_max, torch.full_like(total, float("-inf")))

    if problem.dropout_p > 0.0:
        probs = F.dropout(probs, p=problem.dropout_p, training=True)
    out_BHSD = torch.matmul(probs, v_BHSD)
    out = out_BHSD.transpose(1, 2).to(out_dtype)
    return problem.finish(out, lse.squeeze(-1) if problem.return_lse else None)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    window: tuple[int, int] | None = None,
    block_mask: AttentionMask | BlockMask | None = None,
    backend: str | None = None,
    dropout_p: float = 0.0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eager PyTorch attention with :func:`forge_kernels.attention.attention`'s signature.

    The definition of the numerics every backend is tested against (see the module docstring).
    ``backend`` is accepted for signature parity and ignored; ``max_seqlen*`` are unused.
    """
    del backend, max_seqlen, max_seqlen_q, max_seqlen_k
    problem = AttentionProblem.from_args(
        q,
        k,
        v,
        causal=causal,
        softmax_scale=softmax_scale,
        cu_seqlens=cu_seqlens,
        cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        window=window,
        block_mask=block_mask,
        dropout_p=dropout_p,
        return_lse=return_lse,
    )
    out, lse = run(problem)
    return (out, lse) if return_lse else out
