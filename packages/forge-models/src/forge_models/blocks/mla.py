"""Multi-head latent attention (MLA): DeepSeek-V2 (DeepSeek-AI 2024, arXiv:2405.04434,
section 2.1) as used by DeepSeek-V3 (arXiv:2412.19437, section 2.1.1, eqs. 1-11).

Per token ``h`` (``n`` heads, ``d_c = kv_lora_rank``, ``d_c' = q_lora_rank``)::

    c_kv = RMSNorm(h W_DKV)                  [d_c]     the compressed latent (all a cache keeps)
    [k_C, v] = c_kv W_UKV                    [n, d_nope] and [n, d_v]
    k_R = RoPE(h W_KR)                       [d_rope]  one decoupled RoPE key shared by all heads
    c_q = RMSNorm(h W_DQ)                    [d_c']    (q_lora_rank None: q = h W_Q directly)
    [q_C, q_R] = c_q W_UQ                    [n, d_nope] and [n, d_rope]
    q = [q_C; RoPE(q_R)],  k = [k_C; k_R]    per head
    o = softmax(q kᵀ * scale) v,  out = o W_O

``W_DKV`` and ``W_KR`` are one projection (``kv_a_proj``, ``[d_c + d_rope, hidden]``), as in the
checkpoints. ``scale`` is ``1/sqrt(d_nope + d_rope)``, times YaRN's ``mscale_all_dim`` factor
squared when the RoPE is YaRN-scaled (DeepSeek-V2 appendix; transformers' ``yarn_apply_mscale``).
DeepSeek's checkpoints pair RoPE channels as ``(2i, 2i + 1)`` (``layout="interleaved"``). The
latent norms use eps 1e-6 whatever the model's ``rms_norm_eps`` (as transformers builds them).

Training computes full keys and values per head (the "naive" form); the absorbed form that
attends in latent space is an inference optimisation with the same result.
"""

from __future__ import annotations

import torch
from torch import nn

import forge_kernels
from forge_kernels.attention import attention
from forge_models.blocks.attention import AttentionInputs
from forge_models.blocks.norm import RMSNorm

__all__ = ["MultiHeadLatentAttention"]

#: Epsilon of the q/kv latent RMSNorms (transformers' ``DeepseekV3RMSNorm`` default).
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """MLA (see the module docstring). Submodules (the names parallel plans target)::

        q_proj                 [heads * qk_head_dim, hidden]        (q_lora_rank None)
        q_a_proj, q_a_norm, q_b_proj                                (q_lora_rank set)
        kv_a_proj              [kv_lora_rank + qk_rope_head_dim, hidden]
        kv_a_norm              RMSNorm [kv_lora_rank]
        kv_b_proj              [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank]
        o_proj                 [hidden, heads * v_head_dim]

    ``bias`` puts biases on ``q_a_proj``, ``kv_a_proj`` and ``o_proj`` (``attention_bias``).
    The head count is read from the ``q``/``kv_b`` projection outputs, so the module also runs
    on a tensor-parallel shard holding a subset of the heads.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        bias: bool = False,
        softmax_scale: float | None = None,
        rope_layout: str = "interleaved",
    ) -> None:
        super().__init__()
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim**-0.5 if softmax_scale is None else softmax_scale
        self.rope_layout = rope_layout
        q_out = num_heads * self.qk_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=False)
            self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        else:
            self.q_proj = None
            self.q_a_proj = nn.Linear(hidden_size, q_lora_rank, bias=bias)
            self.q_a_norm = RMSNorm(q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=False)
        self.kv_a_proj = nn.Linear(hidden_size, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_norm = RMSNorm(kv_lora_rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=bias)
        #: Identity on the rotary key, the one tensor every head reads: a named point where a
        #: tensor-parallel plan sums its gradient over the ranks that hold the other heads.
        self.shared_rope_key = nn.Identity()

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        """``x``: ``[B, S, hidden]`` -> ``[B, S, hidden]``."""
        batch, seq = x.shape[:2]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(batch, seq, -1, self.qk_head_dim)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.kv_a_proj(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(c_kv))
        kv = kv.view(batch, seq, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q_rope, k_rope = forge_kernels.apply_rope(
            q_rope, k_rope.reshape(batch, seq, 1, -1), inputs.cos, inputs.sin,
            layout=self.rope_layout,
        )  # fmt: skip
        k_rope = self.shared_rope_key(k_rope)
        heads = q.shape[2]
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(batch, seq, heads, -1)), dim=-1)
        scale = self.softmax_scale
        if inputs.mask is not None:  # padding, or bidirectional blocks (also when packed)
            out = attention(q, k, v, block_mask=inputs.mask, softmax_scale=scale)
        elif inputs.cu_seqlens is not None:
            out = attention(
                q[0], k[0], v[0], causal=True, softmax_scale=scale,
                cu_seqlens=inputs.cu_seqlens, max_seqlen=inputs.max_seqlen,
            )[None]  # fmt: skip
        else:
            out = attention(q, k, v, causal=True, softmax_scale=scale)
        return self.o_proj(out.reshape(batch, seq, -1))
