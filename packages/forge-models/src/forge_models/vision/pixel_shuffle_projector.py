"""InternVL's projector: pixel shuffle, then LayerNorm + MLP (transformers
``InternVLMultiModalProjector`` with ``InternVLModel.pixel_shuffle``).

Papers: InternVL 1.5, Chen et al. 2024, arXiv:2404.16821 (pixel shuffle to a quarter of the
visual tokens); InternVL 2.5, Chen et al. 2024, arXiv:2412.05271; InternVL, Chen et al. 2023,
arXiv:2312.14238.

Pixel shuffle (space-to-depth) with ``downsample_ratio = 1 / s`` folds every ``s x s`` block of
a tile's patch grid into one token of ``s * s`` times the width: the features of a tile
``[h, w, D]`` become ``[h / s, w / s, s * s * D]``, channel order (row offset, column offset,
channel) as in InternVL. The tokens then go through ``fc2(gelu(fc1(norm(x))))``.

Module tree (forge-ckpt names under the VLM's ``projector.`` prefix)::

    norm.weight [s*s*Dv], norm.bias      <- multi_modal_projector.layer_norm.*
    fc1.weight [Dl, s*s*Dv], fc1.bias    <- multi_modal_projector.linear_1.*
    fc2.weight [Dl, Dl], fc2.bias        <- multi_modal_projector.linear_2.*
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from forge_models.init import init_
from forge_models.vision.vit_blocks import LayerNorm, activation, square_size
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "PixelShuffleProjector",
    "PixelShuffleProjectorConfig",
    "pixel_shuffle",
    "pixel_shuffle_projector_config_from_hf",
    "pixel_shuffle_projector_config_to_hf",
]


@dataclass(frozen=True, kw_only=True)
class PixelShuffleProjectorConfig:
    """Attributes:
    vision_hidden_size: the encoder's feature width ``Dv``.
    text_hidden_size: the language model's hidden size ``Dl``.
    patch_size: the encoder's (square) patch side, to count tokens from the tile size alone.
    downsample_ratio: ``1 / s`` for an integer ``s`` (InternVL: 0.5).
    hidden_act: the activation's transformers name (InternVL: ``"gelu"``, exact).
    norm_eps: the LayerNorm epsilon (transformers uses torch's default 1e-5).
    initializer_range: std of the linear weights at initialization.
    """

    vision_hidden_size: int
    text_hidden_size: int
    patch_size: int = 14
    downsample_ratio: float = 0.5
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vision_hidden_size", "text_hidden_size", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"PixelShuffleProjectorConfig.{name} must be >= 1, got {getattr(self, name)}"
                )
        if not 0 < self.downsample_ratio <= 1 or abs(self.scale * self.downsample_ratio - 1) > 1e-6:
            raise ValueError(
                f"downsample_ratio {self.downsample_ratio} must be 1 / s for an integer s >= 1 "
                "(InternVL uses 0.5)"
            )
        activation(self.hidden_act)

    @property
    def scale(self) -> int:
        """``s``: the side of the patch blocks folded into one token."""
        return round(1 / self.downsample_ratio)


def pixel_shuffle_projector_config_from_hf(
    hf_config: Mapping[str, Any],
) -> PixelShuffleProjectorConfig:
    """From a whole InternVL ``config.json`` dict (``downsample_ratio``, ``projector_hidden_act``
    and the hidden sizes / patch size of its ``vision_config`` and ``text_config``)."""
    for key in ("vision_config", "text_config"):
        if not isinstance(hf_config.get(key), Mapping):
            raise ValueError(
                f"the InternVL config has no {key!r} dict; pass the whole config.json of an "
                "InternVLForConditionalGeneration checkpoint"
            )
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    return PixelShuffleProjectorConfig(
        vision_hidden_size=int(vision.get("hidden_size", 1024)),
        text_hidden_size=int(text["hidden_size"]),
        patch_size=square_size(vision, "patch_size", "PixelShuffleProjectorConfig")
        if "patch_size" in vision
        else 14,
        downsample_ratio=float(hf_config.get("downsample_ratio", 0.5)),
        hidden_act=str(hf_config.get("projector_hidden_act", "gelu")),
    )


def pixel_shuffle_projector_config_to_hf(config: PixelShuffleProjectorConfig) -> dict[str, Any]:
    """The projector's top-level InternVL ``config.json`` keys (the hidden sizes and the patch
    size live in ``vision_config`` / ``text_config``)."""
    return {"downsample_ratio": config.downsample_ratio, "projector_hidden_act": config.hidden_act}


def pixel_shuffle(x_BHWD: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, h, w, D] -> [B, h / s, w / s, s * s * D]``: each ``s x s`` block of the grid becomes
    one vector ordered (row offset, column offset, channel), as InternVL's ``pixel_shuffle``."""
    b, h, w, d = x_BHWD.shape
    if h % scale or w % scale:
        raise ValueError(
            f"pixel shuffle: a {h}x{w} patch grid does not divide into {scale}x{scale} blocks "
            f"(downsample_ratio 1/{scale}); use tiles whose sides in patches are multiples of "
            f"{scale}"
        )
    x = x_BHWD.reshape(b, h, w // scale, scale * d).transpose(1, 2)  # fold column pairs
    x = x.reshape(b, w // scale, h // scale, scale * scale * d)  # fold row pairs
    return x.transpose(1, 2)


class PixelShuffleProjector(nn.Module):
    """``forward(features, visual) -> [tokens, text_hidden_size]`` for InternViT features.

    ``features`` are the encoder's packed ``[tiles * h * w, Dv]`` (CLS token dropped) for
    ``visual.pixel_values`` ``[tiles, C, H, W]`` with ``h, w = H / P, W / P``; every tile gives
    ``(h / s) * (w / s)`` tokens, in tile order (the placeholder order).
    """

    def __init__(self, config: PixelShuffleProjectorConfig) -> None:
        super().__init__()
        self.config = config
        folded = config.vision_hidden_size * config.scale**2
        self.norm = LayerNorm(folded, eps=config.norm_eps)
        self.fc1 = nn.Linear(folded, config.text_hidden_size)
        self.fc2 = nn.Linear(config.text_hidden_size, config.text_hidden_size)
        self.act = activation(config.hidden_act)
        if not self.fc1.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Linear weights ``normal(0, initializer_range)``, biases zero, the norm at one / zero
        (in place: runs after ``to_empty``)."""
        for linear in (self.fc1, self.fc2):
            init_(
                linear.weight,
                nn.init.normal_,
                std=self.config.initializer_range,
                generator=generator,
            )
            nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights()

    def _grid(self, visual: VisualInputs) -> tuple[int, int, int]:
        """``(tiles, h, w)``: the tile count and the patch grid of one tile."""
        pixel_values = visual.pixel_values
        if pixel_values.dim() != 4:
            raise ValueError(
                f"PixelShuffleProjector reads pixel_values [tiles, C, H, W], got "
                f"{tuple(pixel_values.shape)}"
            )
        p, (height, width) = self.config.patch_size, pixel_values.shape[-2:]
        if height % p or width % p:
            raise ValueError(
                f"PixelShuffleProjector: tile size {height}x{width} is not a multiple of the "
                f"patch size {p}x{p}; resize the tiles to a multiple of it"
            )
        h, w, s = height // p, width // p, self.config.scale
        if h % s or w % s:
            raise ValueError(
                f"PixelShuffleProjector: a tile of {height}x{width} pixels is a {h}x{w} patch "
                f"grid, which does not divide into {s}x{s} blocks (downsample_ratio "
                f"{self.config.downsample_ratio}); use tiles whose sides are multiples of "
                f"{p * s} pixels"
            )
        return pixel_values.shape[0], h, w

    def num_tokens(self, visual: VisualInputs) -> list[int]:
        """Placeholder tokens per item: ``tiles_per_item * (h / s) * (w / s)`` (metadata only)."""
        visual.require("tiles_per_item", who="PixelShuffleProjector.num_tokens")
        tiles, h, w = self._grid(visual)
        per_item = [int(t) for t in visual.tiles_per_item.tolist()]
        if visual.tiles_per_item.dim() != 1 or min(per_item, default=0) < 0:
            raise ValueError(
                f"VisualInputs.tiles_per_item must be a 1-D tensor of counts >= 0, got {per_item}"
            )
        if sum(per_item) != tiles:
            raise ValueError(
                f"VisualInputs.tiles_per_item {per_item} sums to {sum(per_item)} tiles, but "
                f"pixel_values holds {tiles}; give each item's tile count, in pixel_values order"
            )
        per_tile = (h // self.config.scale) * (w // self.config.scale)
        return [t * per_tile for t in per_item]

    def forward(self, features: torch.Tensor, visual: VisualInputs) -> torch.Tensor:
        tiles, h, w = self._grid(visual)
        d = self.config.vision_hidden_size
        if features.dim() != 2 or features.shape != (tiles * h * w, d):
            raise ValueError(
                f"PixelShuffleProjector expects features [{tiles} tiles * {h}x{w} patches, {d}] "
                f"= [{tiles * h * w}, {d}], got {tuple(features.shape)}; the encoder must drop "
                "the CLS token (InternVisionConfig.drop_cls_token=True) and have hidden size "
                f"{d}"
            )
        x = pixel_shuffle(features.reshape(tiles, h, w, d), self.config.scale)
        x = self.norm(x.reshape(-1, x.shape[-1]))
        return self.fc2(self.act(self.fc1(x)))
