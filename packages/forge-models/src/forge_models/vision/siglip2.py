"""SigLIP 2 NaFlex vision tower (Tschannen et al. 2025, "SigLIP 2: Multilingual Vision-Language
Encoders with Improved Semantic Understanding, Localization, and Dense Features",
arXiv:2502.14786): the SigLIP ViT (arXiv:2303.15343) at a variable resolution per image.

Each image keeps (about) its aspect ratio and becomes its own ``h x w`` grid of patches; the
learned square position-embedding table is resized to every image's grid (bilinear with
anti-aliasing, as the reference), and the images are packed into one sequence whose attention
stays within each image (``cu_seqlens``) instead of padding them to a common length.

Matches transformers' ``Siglip2VisionModel`` (without its attention-pooling head). Module tree
(the names forge-ckpt's ``siglip2_vision`` mapping fills)::

    patch_embed.weight                [hidden, patch * patch * channels]  (a Linear)
    patch_embed.bias                  [hidden]
    pos_embed.weight                  [num_patches, hidden]  (a sqrt(num_patches)^2 grid)
    blocks.{i}.norm1 / attn / norm2 / mlp ...   (forge_models.vision.vit_blocks.VitBlock)
    unapplied_blocks.{k}. ...         the checkpoint's blocks after feature_layer (buffers, carried)
    post_layernorm.{weight,bias}      applied only with feature_layer=None (else buffers, carried)

Reads ``VisualInputs.pixel_values`` ``[total_patches, patch * patch * channels]`` (each
patch flattened as the ``Siglip2ImageProcessor`` does, the patches of each image in row-major
order, images one after another) and ``grid_thw`` ``[images, 3]`` = ``(1, h, w)``; returns
``[total_patches, hidden]`` in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge_models.init import init_
from forge_models.vision.vit_blocks import (
    PreNormVitEncoder,
    VitConfig,
    lecun_normal_,
    vit_config_kwargs_from_hf,
    vit_config_to_hf,
)
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "Siglip2VisionConfig",
    "Siglip2VisionEncoder",
    "siglip2_config_from_hf",
    "siglip2_config_to_hf",
]


@dataclass(frozen=True, kw_only=True)
class Siglip2VisionConfig(VitConfig):
    """A SigLIP 2 NaFlex tower: the :class:`~forge_models.vision.vit_blocks.VitConfig` fields
    plus ``num_patches``, the size of the learned position-embedding table (a square number:
    a ``sqrt(num_patches)``-sided grid, resized to each image's patch grid)."""

    num_patches: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        side = math.isqrt(self.num_patches) if isinstance(self.num_patches, int) else 0
        if side < 1 or side * side != self.num_patches:
            raise ValueError(
                "Siglip2VisionConfig.num_patches must be a positive square number (the "
                f"position embeddings form a square grid), got {self.num_patches!r}"
            )

    @property
    def position_grid_size(self) -> int:
        return math.isqrt(self.num_patches)


def siglip2_config_from_hf(
    hf_vision_config: Mapping[str, Any], *, feature_layer: int | None = -1
) -> Siglip2VisionConfig:
    """A :class:`Siglip2VisionConfig` from transformers' ``Siglip2VisionConfig`` dict.
    ``feature_layer``: the VLM's vision feature layer, or ``None`` for the standalone output."""
    owner = "Siglip2VisionConfig"
    return Siglip2VisionConfig(
        **vit_config_kwargs_from_hf(hf_vision_config, owner=owner, feature_layer=feature_layer),
        num_patches=int(hf_vision_config.get("num_patches", 256)),
    )


def siglip2_config_to_hf(config: Siglip2VisionConfig) -> dict[str, Any]:
    """The transformers ``Siglip2VisionConfig`` dict (``vision_use_head`` off)."""
    return {
        "model_type": "siglip2_vision_model",
        **vit_config_to_hf(config),
        "num_patches": config.num_patches,
        "vision_use_head": False,
    }


class Siglip2VisionEncoder(PreNormVitEncoder):
    """SigLIP 2's NaFlex vision tower; see the module docstring."""

    def __init__(self, config: Siglip2VisionConfig) -> None:
        super().__init__(config)
        p, c = config.patch_size, config.num_channels
        self.patch_embed = nn.Linear(c * p * p, config.hidden_size)
        self.pos_embed = nn.Embedding(config.num_patches, config.hidden_size)
        self.init_weights()

    def position_embeddings(self, grids: list[tuple[int, int]]) -> torch.Tensor:
        """``[sum(h * w), hidden]``: the table resized to each ``(h, w)`` grid, row-major.

        Bilinear with anti-aliasing and ``align_corners=False`` (the reference's), computed in
        float32 and cast to the table's dtype; each distinct grid size is resized once.
        """
        side = self.config.position_grid_size
        weight = self.pos_embed.weight
        table = weight.reshape(side, side, -1).permute(2, 0, 1)[None].float()
        resized: dict[tuple[int, int], torch.Tensor] = {}
        for grid in dict.fromkeys(grids):
            out = F.interpolate(
                table, size=grid, mode="bilinear", align_corners=False, antialias=True
            )
            resized[grid] = out[0].flatten(1).t().to(weight.dtype)
        return torch.cat([resized[g] for g in grids])

    def forward(self, visual: VisualInputs) -> torch.Tensor:
        """``pixel_values`` ``[total_patches, P * P * C]`` + ``grid_thw`` -> ``[total_patches, hidden]``."""
        visual.require("grid_thw", who="Siglip2VisionEncoder")
        pixels, grid_thw = visual.pixel_values, visual.grid_thw
        width = self.patch_embed.in_features
        if pixels.dim() != 2 or pixels.shape[1] != width:
            raise ValueError(
                f"Siglip2VisionEncoder expects pixel_values [total_patches, {width}] "
                f"(patch_size^2 * num_channels), got {tuple(pixels.shape)}"
            )
        thw = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        if any(t != 1 for t, _, _ in thw):
            raise ValueError(
                f"Siglip2VisionEncoder encodes images: every grid_thw row must have t = 1, got "
                f"{grid_thw.tolist()}; pass video frames as separate images"
            )
        grids = [(h, w) for _, h, w in thw]
        if not grids or min(h * w for h, w in grids) < 1:
            raise ValueError(f"grid_thw must list at least one non-empty image, got {thw}")
        sizes = [h * w for h, w in grids]
        if sum(sizes) != pixels.shape[0]:
            raise ValueError(
                f"grid_thw gives {sum(sizes)} patches but pixel_values has {pixels.shape[0]}"
            )
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))
        x = x + self.position_embeddings(grids)
        cu_seqlens = torch.tensor([0, *sizes], device=x.device).cumsum(0).to(torch.int32)
        return self.encode(x, cu_seqlens=cu_seqlens, max_seqlen=max(sizes))

    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """SigLIP's init in place (works after ``to_empty``); see ``SiglipVisionEncoder``."""
        with torch.no_grad():
            lecun_normal_(self.patch_embed.weight, generator=generator)
            nn.init.zeros_(self.patch_embed.bias)
            std = 1.0 / math.sqrt(self.config.hidden_size)
            init_(self.pos_embed.weight, nn.init.normal_, std=std, generator=generator)
        self.reset_blocks(generator=generator)
