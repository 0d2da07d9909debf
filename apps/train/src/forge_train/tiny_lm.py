"""The bootstrap model of the default job: a small Llama-style decoder built on forge-kernels.

Pre-norm blocks with RMSNorm, rotary position embeddings, causal self-attention and a SwiGLU
MLP (the Llama recipe: Touvron et al. 2023), and the loss computed by forge-kernels' fused
linear cross-entropy, which never materializes the logits. It stands in until forge-models
provides the model zoo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forge_kernels import (
    apply_rope,
    fused_linear_cross_entropy,
    rms_norm,
    rope_cos_sin,
    rope_inv_freq,
    swiglu,
)

__all__ = ["TinyLM", "TinyLMConfig"]


@dataclass(frozen=True, kw_only=True)
class TinyLMConfig:
    vocab_size: int = 256
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 6
    intermediate_size: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, eps=self.eps)


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = apply_rope(q, k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(y.transpose(1, 2).reshape(b, t, -1))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(swiglu(gate, up))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer(
            "inv_freq",
            rope_inv_freq(cfg.hidden_size // cfg.num_heads, theta=cfg.rope_theta),
            persistent=False,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; output projections scaled by 1/sqrt(2 * layers) (GPT-2)."""
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
                continue
            std = self.cfg.init_std
            if name.endswith(("out.weight", "down.weight")):
                std /= math.sqrt(2 * self.cfg.num_layers)
            nn.init.normal_(p, std=std)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, V]``, or the mean next-token loss when ``labels`` are given."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if labels is None:
            return self.lm_head(x)
        return fused_linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, labels.flatten())
