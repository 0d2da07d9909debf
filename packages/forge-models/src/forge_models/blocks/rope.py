"""Rotary position embedding tables for the dense families (RoFormer, Su et al. 2021).

The per-token ``cos``/``sin`` (``[*positions, head_dim // 2]``, fp32) are built once per forward
from the positions (which restart per document in a packed batch) and shared by every layer;
``forge_kernels.apply_rope`` rotates q and k with them. Llama 3.1/3.2 rescale the frequencies
("The Llama 3 Herd of Models", Dubey et al. 2024, arXiv:2407.21783).
"""

from __future__ import annotations

import torch

from forge_kernels import Llama3RopeScaling, rope_cos_sin, rope_inv_freq

__all__ = ["RotaryEmbedding"]


class RotaryEmbedding:
    """Builds RoPE cos/sin from positions. Holds no tensors (nothing to materialize or shard)."""

    def __init__(
        self,
        head_dim: int,
        *,
        theta: float = 10000.0,
        llama3_scaling: Llama3RopeScaling | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.llama3_scaling = llama3_scaling

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[head_dim // 2]`` fp32 inverse frequencies (as transformers computes them)."""
        return rope_inv_freq(
            self.head_dim, theta=self.theta, llama3_scaling=self.llama3_scaling, device=device
        )

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[*position_ids.shape, head_dim // 2]``, fp32."""
        return rope_cos_sin(position_ids, self.inv_freq(position_ids.device))
