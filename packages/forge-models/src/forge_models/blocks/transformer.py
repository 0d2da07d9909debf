"""The pre-norm decoder block shared by the families (Llama 2, arXiv:2307.09288).

Its attention is the GQA :class:`Attention`, or :class:`MultiHeadLatentAttention` for a config
with ``mla`` (DeepSeek-V2/V3). Its MLP is the dense :class:`GatedMLP`, or a :class:`MoEBlock` on
the mixture-of-experts layers of a config with ``moe`` (``TransformerConfig.is_moe_layer``).
"""

from __future__ import annotations

import torch
from torch import nn

from forge_models.blocks.attention import Attention, AttentionInputs
from forge_models.blocks.mla import MultiHeadLatentAttention
from forge_models.blocks.mlp import GatedMLP
from forge_models.blocks.moe import MoEBlock, RouterOutput
from forge_models.blocks.norm import RMSNorm
from forge_models.config import TransformerConfig, YarnRopeScaling

__all__ = ["TransformerBlock"]


def _attention(config: TransformerConfig) -> Attention | MultiHeadLatentAttention:
    mla = config.mla
    if mla is None:
        return Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            bias=config.attention_bias,
            out_bias=config.attention_out_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.rms_norm_eps,
        )
    scale = mla.qk_head_dim**-0.5
    if isinstance(config.rope_scaling, YarnRopeScaling):
        mscale = config.rope_scaling.softmax_mscale
        scale = scale * mscale * mscale
    return MultiHeadLatentAttention(
        config.hidden_size,
        config.num_heads,
        q_lora_rank=mla.q_lora_rank,
        kv_lora_rank=mla.kv_lora_rank,
        qk_nope_head_dim=mla.qk_nope_head_dim,
        qk_rope_head_dim=mla.qk_rope_head_dim,
        v_head_dim=mla.v_head_dim,
        bias=config.attention_bias,
        softmax_scale=scale,
        rope_layout="interleaved" if mla.rope_interleave else "half",
    )


class TransformerBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``.

    Submodules ``attn_norm``, ``attn``, ``mlp_norm``, ``mlp`` are the targets of the parallel
    plans (``layers.*.attn.q_proj`` ...).

    ``forward`` returns the output tensor on a dense layer and ``(output, RouterOutput)`` on a
    mixture-of-experts layer (``is_moe``).
    """

    def __init__(self, config: TransformerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = _attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        if self.is_moe:
            moe = config.moe
            self.mlp = MoEBlock(
                config.hidden_size,
                num_experts=moe.num_experts,
                top_k=moe.num_experts_per_tok,
                intermediate_size=moe.moe_intermediate_size,
                norm_topk_prob=moe.norm_topk_prob,
                shared_expert_intermediate_size=moe.shared_expert_intermediate_size,
                shared_expert_gate=moe.shared_expert_gate,
                score_func=moe.score_func,
                routed_scaling_factor=moe.routed_scaling_factor,
                n_group=moe.n_group,
                topk_group=moe.topk_group,
                expert_bias=moe.expert_bias,
            )
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, inputs: AttentionInputs
    ) -> torch.Tensor | tuple[torch.Tensor, RouterOutput]:
        x = x + self.attn(self.attn_norm(x), inputs)
        if not self.is_moe:
            return x + self.mlp(self.mlp_norm(x))
        out, router = self.mlp(self.mlp_norm(x))
        return x + out, router
