"""The pre-norm decoder block shared by the dense families (Llama 2, arXiv:2307.09288)."""

from __future__ import annotations

import torch
from torch import nn

from forge_models.blocks.attention import Attention, AttentionInputs
from forge_models.blocks.mlp import GatedMLP
from forge_models.blocks.norm import RMSNorm
from forge_models.config import TransformerConfig

__all__ = ["TransformerBlock"]


class TransformerBlock(nn.Module):
    """``h = x + attn(attn_norm(x)); out = h + mlp(mlp_norm(h))``.

    Submodules ``attn_norm``, ``attn``, ``mlp_norm``, ``mlp`` are the targets of the parallel
    plans (``layers.*.attn.q_proj`` ...).
    """

    def __init__(self, config: TransformerConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            bias=config.attention_bias,
            out_bias=config.attention_out_bias,
            qk_norm=config.qk_norm,
            norm_eps=config.rms_norm_eps,
        )
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), inputs)
        return x + self.mlp(self.mlp_norm(x))
