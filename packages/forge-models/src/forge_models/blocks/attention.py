"""Causal self-attention with RoPE, grouped-query heads, optional q/k/v bias and q/k RMSNorm.

- Scaled dot-product attention: Vaswani et al. 2017, arXiv:1706.03762.
- Rotary position embedding: RoFormer, Su et al. 2021, arXiv:2104.09864.
- Grouped-query attention (GQA): Ainslie et al. 2023, arXiv:2305.13245 (Llama 2 70B, Llama 3).
- q/k/v projection bias: Qwen2 Technical Report, Yang et al. 2024, arXiv:2407.10671.
- Per-head RMSNorm of q and k (QK-norm): Qwen3 Technical Report, Yang et al. 2025,
  arXiv:2505.09388 (after Dehghani et al. 2023, arXiv:2302.05442).

The attention itself is ``forge_kernels.attention.attention``, which picks flash-attn, SDPA,
FlexAttention or eager for the call: causal for an ordinary batch, ``cu_seqlens`` for packed
documents, a document/padding mask for padded batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import forge_kernels
from forge_kernels.attention import AttentionMask, attention
from forge_models.blocks.norm import RMSNorm

__all__ = ["Attention", "AttentionInputs"]


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """What every attention layer of one forward pass shares.

    Attributes:
        cos, sin: RoPE tables ``[*token_dims, rope_dim // 2]`` broadcastable to ``[B, S]``
            (``rope_dim``: ``head_dim``, or MLA's ``qk_rope_head_dim``).
        cu_seqlens: ``int32 [documents + 1]`` for a packed batch (``B == 1``), else ``None``.
        max_seqlen: longest document of the packed batch (optional; flash-attn wants it).
        mask: an :class:`~forge_kernels.attention.AttentionMask` (causal + padding for a padded
            batch; documents + bidirectional image/video blocks with ``block_ids``), else
            ``None``. When set it decides the attention pattern (``cu_seqlens`` then only marks
            the documents for the loss).
    """

    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    mask: AttentionMask | None = None


class Attention(nn.Module):
    """Multi-head causal self-attention: ``o_proj(attention(rope(q), rope(k), v))``.

    Parameters: ``q_proj`` ``[num_heads * head_dim, hidden]``, ``k_proj`` / ``v_proj``
    ``[num_kv_heads * head_dim, hidden]`` (with biases if ``bias``), ``o_proj``
    ``[hidden, num_heads * head_dim]`` (with a bias if ``out_bias``), and with ``qk_norm`` the RMSNorm weights
    ``q_norm`` / ``k_norm`` ``[head_dim]``. Head counts are read from the projection outputs,
    so the module also runs on a tensor-parallel shard holding a subset of the heads.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """``x``: ``[B, S, hidden]`` -> ``[B, S, hidden]``."""
        batch, seq = x.shape[:2]
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim)
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = forge_kernels.apply_rope(q, k, inputs.cos, inputs.sin)
        if inputs.mask is not None:  # padding, or bidirectional blocks (also when packed)
            out = attention(q, k, v, block_mask=inputs.mask)
        elif inputs.cu_seqlens is not None:
            out = attention(
                q[0],
                k[0],
                v[0],
                causal=True,
                cu_seqlens=inputs.cu_seqlens,
                max_seqlen=inputs.max_seqlen,
            )[None]
        else:
            out = attention(q, k, v, causal=True)
        return self.o_proj(out.reshape(batch, seq, -1))
