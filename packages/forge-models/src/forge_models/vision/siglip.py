"""SigLIP vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
arXiv:2303.15343): a fixed-resolution pre-LayerNorm ViT (Dosovitskiy et al. 2020,
arXiv:2010.11929), the vision encoder of LLaVA-OneVision, PaliGemma and Idefics3.

Matches transformers' ``SiglipVisionModel`` (without its attention-pooling head, which the
VLMs do not use). Module tree (the names forge-ckpt's ``siglip_vision`` mapping fills)::

    patch_embed.weight                [hidden, channels, patch, patch]  (the Conv2d's)
    patch_embed.bias                  [hidden]
    pos_embed.weight                  [(image_size // patch) ** 2, hidden]
    blocks.{i}.norm1 / attn / norm2 / mlp ...   (forge_models.vision.vit_blocks.VitBlock)
    unapplied_blocks.{k}. ...         the checkpoint's blocks after feature_layer (buffers, carried)
    post_layernorm.{weight,bias}      applied only with feature_layer=None (else buffers, carried)

Reads ``VisualInputs.pixel_values`` ``[tiles, channels, image_size, image_size]`` (images,
anyres crops or video frames: every tile is encoded on its own) and returns the features
packed as ``[tiles * patches, hidden]``, patches in row-major order within each tile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from forge_models.init import init_
from forge_models.vision.vit_blocks import (
    ConvPatchEmbed,
    PreNormVitEncoder,
    VitConfig,
    square_size,
    vit_config_kwargs_from_hf,
    vit_config_to_hf,
)
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "SiglipVisionConfig",
    "SiglipVisionEncoder",
    "siglip_config_from_hf",
    "siglip_config_to_hf",
]


@dataclass(frozen=True, kw_only=True)
class SiglipVisionConfig(VitConfig):
    """A SigLIP tower: the :class:`~forge_models.vision.vit_blocks.VitConfig` fields plus the
    input resolution ``image_size`` (square, in pixels; ``image_size // patch_size`` patches
    per side, trailing pixels dropped as by a ``"valid"`` convolution)."""

    image_size: int

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.image_size, int) or self.image_size < self.patch_size:
            raise ValueError(
                f"SiglipVisionConfig.image_size must be an int >= patch_size={self.patch_size}, "
                f"got {self.image_size!r}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2


def siglip_config_from_hf(
    hf_vision_config: Mapping[str, Any], *, feature_layer: int | None = -1
) -> SiglipVisionConfig:
    """A :class:`SiglipVisionConfig` from transformers' ``SiglipVisionConfig`` dict (the
    ``vision_config`` of a VLM's ``config.json``). ``feature_layer``: the VLM's
    ``vision_feature_layer`` (int), or ``None`` for the standalone tower's output."""
    owner = "SiglipVisionConfig"
    return SiglipVisionConfig(
        **vit_config_kwargs_from_hf(hf_vision_config, owner=owner, feature_layer=feature_layer),
        image_size=square_size(hf_vision_config, "image_size", owner),
    )


def siglip_config_to_hf(config: SiglipVisionConfig) -> dict[str, Any]:
    """The transformers ``SiglipVisionConfig`` dict (``vision_use_head`` off: forge builds no
    pooling head; ``feature_layer`` is the VLM config's ``vision_feature_layer``)."""
    return {
        "model_type": "siglip_vision_model",
        **vit_config_to_hf(config),
        "image_size": config.image_size,
        "vision_use_head": False,
    }


class SiglipVisionEncoder(PreNormVitEncoder):
    """SigLIP's vision tower; see the module docstring. ``hidden_size``: the output width."""

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__(config)
        self.patch_embed = ConvPatchEmbed(
            config.num_channels, config.patch_size, config.hidden_size
        )
        self.pos_embed = nn.Embedding(config.num_patches, config.hidden_size)
        self.init_weights()

    def forward(self, visual: VisualInputs) -> torch.Tensor:
        """``visual.pixel_values`` ``[tiles, C, S, S]`` -> ``[tiles * patches, hidden]``."""
        pixels = visual.pixel_values
        c, s = self.config.num_channels, self.config.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (c, s, s):
            raise ValueError(
                f"SiglipVisionEncoder expects pixel_values [tiles, {c}, {s}, {s}], got "
                f"{tuple(pixels.shape)}: resize / crop every tile to image_size={s} (the "
                "LLaVA-OneVision processor does)"
            )
        x = self.patch_embed(pixels) + self.pos_embed.weight
        return self.encode(x).flatten(0, 1)

    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """SigLIP's init in place (works after ``to_empty``): LeCun-normal patch embedding,
        ``normal(0, 1 / sqrt(hidden))`` position embeddings, the blocks as ``VitBlock``."""
        with torch.no_grad():
            self.patch_embed.reset_parameters(generator=generator)
            std = 1.0 / math.sqrt(self.config.hidden_size)
            init_(self.pos_embed.weight, nn.init.normal_, std=std, generator=generator)
        self.reset_blocks(generator=generator)
