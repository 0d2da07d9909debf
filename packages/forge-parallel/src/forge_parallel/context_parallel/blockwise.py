"""Attention of one query block against one key/value block, with its log-sum-exp.

The building block of ring attention (Liu et al. 2023, arXiv:2310.01889): each rank attends
its queries to one K/V block at a time and merges the partial results with the online-softmax
rule of FlashAttention (Dao et al. 2022, arXiv:2205.14135): for two partial outputs
``(o_1, lse_1)`` and ``(o_2, lse_2)`` over disjoint key sets,
``lse = log(exp(lse_1) + exp(lse_2))`` and ``o = exp(lse_1 - lse) o_1 + exp(lse_2 - lse) o_2``.

The backward is FlashAttention's, per block, given the final output ``o`` and ``lse``:
``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * o))``,
``dQ = scale * dS K``, ``dK = scale * dS^T Q``.

Shapes follow ``scaled_dot_product_attention``: ``q`` is (B, H, Sq, D), ``k``/``v`` are
(B, Hkv, Sk, D) with ``H`` a multiple of ``Hkv`` (grouped-query attention: query head ``h``
uses key/value head ``h // (H / Hkv)``). Masks are boolean (Sq, Sk), ``True`` = attend, or
``None`` for no mask. Arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import torch

__all__ = ["block_attention_backward", "block_attention_forward", "block_mask", "merge_blocks"]


def block_mask(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    *,
    causal: bool,
    q_documents: torch.Tensor | None = None,
    k_documents: torch.Tensor | None = None,
    q_blocks: torch.Tensor | None = None,
    k_blocks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Which keys each query may attend to, from their global positions (and documents).

    ``q_blocks``/``k_blocks``: bidirectional block ids of the tokens (``-1``: none); under
    ``causal`` a query also sees the later keys of its own block (one image's tokens see each
    other), the predicate of ``forge_kernels.attention.AttentionMask``:
    ``same document and (k <= q or same block >= 0)``. ``None`` when everything is visible
    (bidirectional, one document).
    """
    if (q_blocks is None) != (k_blocks is None):
        raise ValueError(
            "block_mask takes the block ids of both the queries and the keys, or neither"
        )
    mask = None
    if causal:
        mask = k_positions[None, :] <= q_positions[:, None]
        if q_blocks is not None:
            same_block = (q_blocks[:, None] == k_blocks[None, :]) & (q_blocks[:, None] >= 0)
            mask = mask | same_block
    if q_documents is not None:
        same = q_documents[:, None] == k_documents[None, :]
        mask = same if mask is None else mask & same
    return mask


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, Hkv, H / Hkv, S, D)."""
    b, h, s, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, s, d)


def _probabilities(
    q5: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float, lse: torch.Tensor
) -> torch.Tensor:
    scores = (q5 @ k.unsqueeze(2).transpose(-1, -2)) * scale
    p = torch.exp(scores - lse.unsqueeze(-1))
    return p if mask is None else p.masked_fill(~mask, 0.0)


def block_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H, Sq, D) and log-sum-exp (B, H, Sq), both float32.

    Rows with no visible key get output 0 and log-sum-exp ``-inf``.
    """
    q5 = _grouped(q.float(), k.shape[1])
    scores = (q5 @ k.float().unsqueeze(2).transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe.unsqueeze(-1))  # exp(-inf) = 0 on masked entries
    out = p @ v.float().unsqueeze(2)
    return out.flatten(1, 2), lse.flatten(1, 2)


def merge_blocks(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online-softmax merge of two partial results over disjoint keys (float32)."""
    new_lse = torch.logaddexp(lse, block_lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse - safe).unsqueeze(-1)
    w_new = torch.exp(block_lse - safe).unsqueeze(-1)
    return w_old * out + w_new * block_out, new_lse


def block_attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    delta: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (float32) of the loss w.r.t. ``q``, ``k``, ``v`` through this block.

    ``lse`` is the *final* (merged over all blocks) log-sum-exp of the queries and
    ``delta = (grad_out * out).sum(-1)`` with the final output ``out``; the blocks' gradients
    then add up to the exact gradients.
    """
    kv_heads = k.shape[1]
    q5 = _grouped(q.float(), kv_heads)
    k32, v32 = k.float().unsqueeze(2), v.float().unsqueeze(2)
    lse5 = _grouped(lse.unsqueeze(-1), kv_heads).squeeze(-1)
    safe = torch.where(torch.isinf(lse5), torch.zeros_like(lse5), lse5)
    p = _probabilities(q5, k.float(), mask, scale, safe)
    do5 = _grouped(grad_out.float(), kv_heads)
    grad_v = (p.transpose(-1, -2) @ do5).sum(2)
    grad_p = do5 @ v32.transpose(-1, -2)
    grad_s = p * (grad_p - _grouped(delta.unsqueeze(-1), kv_heads))
    grad_q = (grad_s @ k32) * scale
    grad_k = (grad_s.transpose(-1, -2) @ q5).sum(2) * scale
    return grad_q.flatten(1, 2), grad_k, grad_v
