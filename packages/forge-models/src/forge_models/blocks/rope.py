"""Rotary position embedding tables shared by every layer (RoFormer, Su et al. 2021).

The per-token ``cos``/``sin`` (``[*positions, rope_dim // 2]``, fp32) are built once per forward
from the positions (which restart per document in a packed batch) and shared by every layer;
``forge_kernels.apply_rope`` rotates q and k with them. Llama 3.1/3.2 rescale the frequencies
("The Llama 3 Herd of Models", Dubey et al. 2024, arXiv:2407.21783); DeepSeek-V2/V3 use YaRN
(Peng et al. 2023, arXiv:2309.00071), which also scales ``cos``/``sin`` by an attention factor.
Qwen2-VL / Qwen2.5-VL's multimodal RoPE (M-RoPE, Wang et al. 2024, arXiv:2409.12191) takes
``[3, ...]`` (temporal, height, width) positions and gives each band of frequencies one of them.
"""

from __future__ import annotations

import math

import torch

from forge_kernels import Llama3RopeScaling, mrope_cos_sin, rope_cos_sin, rope_inv_freq
from forge_models.config import YarnRopeScaling

__all__ = ["RotaryEmbedding", "yarn_inv_freq"]


def yarn_inv_freq(
    rotary_dim: int,
    *,
    theta: float,
    scaling: YarnRopeScaling,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """YaRN inverse frequencies ``[rotary_dim // 2]`` fp32, with the float32 operations of
    transformers' ``_compute_yarn_parameters`` in the same order (so the tables are identical).

    Each frequency blends the interpolated ``1 / (factor * theta^(2i/d))`` and the original
    ``1 / theta^(2i/d)`` with a linear ramp over the channel range whose number of rotations in
    ``original_max_position_embeddings`` lies between ``beta_slow`` and ``beta_fast``.
    """
    dim, base = rotary_dim, theta
    original = scaling.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (scaling.factor * pos_freqs)
    extrapolation_factor = 1 - ramp.to(device=device, dtype=torch.float)
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


class RotaryEmbedding:
    """Builds RoPE cos/sin from positions. Holds no tensors (nothing to materialize or shard)."""

    def __init__(
        self,
        head_dim: int,
        *,
        theta: float = 10000.0,
        scaling: Llama3RopeScaling | YarnRopeScaling | None = None,
        mrope_section: tuple[int, int, int] | None = None,
    ) -> None:
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.mrope_section = mrope_section

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[head_dim // 2]`` fp32 inverse frequencies (as transformers computes them)."""
        if isinstance(self.scaling, YarnRopeScaling):
            return yarn_inv_freq(
                self.head_dim, theta=self.theta, scaling=self.scaling, device=device
            )
        return rope_inv_freq(
            self.head_dim, theta=self.theta, llama3_scaling=self.scaling, device=device
        )

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``[*position_ids.shape, head_dim // 2]``, fp32 (times YaRN's
        attention factor, as transformers' ``attention_scaling``). With ``mrope_section`` the
        positions are ``[3, *token_dims]`` and the tables ``[*token_dims, head_dim // 2]``."""
        if self.mrope_section is not None:
            return mrope_cos_sin(
                position_ids, self.inv_freq(position_ids.device), self.mrope_section
            )
        cos, sin = rope_cos_sin(position_ids, self.inv_freq(position_ids.device))
        if isinstance(self.scaling, YarnRopeScaling):
            factor = self.scaling.cos_sin_factor
            if factor != 1.0:
                cos, sin = cos * factor, sin * factor
        return cos, sin
