"""LLaVA-OneVision image and video processing (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task
Transfer", arXiv:2408.03326; AnyRes from Liu et al. 2024, "LLaVA-NeXT").

AnyRes for a sample with one image: the grid resolution of ``image_grid_pinpoints`` that keeps
the most of the image's pixels (and wastes the least) is chosen, the image is resized into it
keeping its aspect ratio, centered on black padding, and cut into tiles of the encoder's input
size, row by row; the whole image resized to that size comes first ("base"). A sample with
several images gives each one tile: the image padded to a square with the mean color, resized.
Video frames are resized to the tile size. ``pixel_values`` is ``[tiles, C, H, W]`` with
``tiles_per_item`` and each image's original ``image_sizes`` (height, width).

Placeholder tokens (the reference processor's count): an AnyRes image takes the base tile's
``num_image_tokens``, plus the tile grid's features with the padding rows / columns removed
("unpadding"), downscaled when they exceed ``anyres_max_N`` tiles' worth, plus one newline token
per feature row. A multi-image tile takes ``num_image_tokens + 1``; a video takes
``frames * ceil(side / 2)**2 + 1`` (2x2 pooling per frame, one newline). The ``"default"``
feature strategy (drop a CLS feature) takes one token less per image.

Images follow ``LlavaOnevisionImageProcessorPil`` of transformers 5.x bit for bit; videos follow
``LlavaOnevisionVideoProcessor`` (see :mod:`forge_data.vision.pixels`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from forge_data.vision.pixels import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    as_frames,
    as_rgb_chw,
    normalize_frames,
    resample_name,
    rescale_normalize,
    resize,
    resize_frames,
)
from forge_data.vision.placeholders import LLAVA_ONEVISION
from forge_data.vision.processing import (
    COMMON_PIXEL_KEYS,
    VisionProcessor,
    VisualItem,
    hf_processor_settings,
)

__all__ = [
    "DEFAULT_PINPOINTS",
    "LlavaOnevisionProcessor",
    "LlavaOnevisionProcessorConfig",
    "anyres_num_tokens",
    "select_best_resolution",
]

DEFAULT_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))


def select_best_resolution(
    size: tuple[int, int], resolutions: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The (height, width) in ``resolutions`` that shows the most of an image of ``size`` when
    fitted into it (ties: the least padding); the first such one."""
    height, width = size
    best, best_shown, best_waste = None, 0, math.inf
    for h, w in resolutions:
        scale = min(w / width, h / height)
        shown = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - shown
        if shown > best_shown or (shown == best_shown and waste < best_waste):
            best, best_shown, best_waste = (h, w), shown, waste
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def _fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of an image of ``size`` scaled to fit ``target`` keeping aspect ratio."""
    height, width = size
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def anyres_num_tokens(
    size: tuple[int, int],
    *,
    pinpoints: Sequence[tuple[int, int]],
    tile: tuple[int, int],
    num_image_tokens: int,
    max_tiles: int,
) -> int:
    """Features of an AnyRes image of original ``size``: base tile + unpadded grid + newlines."""
    height, width = size
    best_h, best_w = select_best_resolution(size, pinpoints)
    side = int(math.sqrt(num_image_tokens))
    cur_h, cur_w = side * (best_h // tile[0]), side * (best_w // tile[1])
    if width / height > cur_w / cur_h:
        pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
        cur_h -= 2 * pad
    else:
        pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
        cur_w -= 2 * pad
    grid, newlines = cur_h * cur_w, cur_h
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:
        grid = int(cur_h // ratio) * int(cur_w // ratio)
        newlines = int(cur_h // ratio)
    return num_image_tokens + grid + newlines


@dataclass(frozen=True, kw_only=True)
class LlavaOnevisionProcessorConfig:
    """Settings of ``preprocessor_config.json`` and ``processor_config.json``; the defaults are
    those of the transformers reference classes (SigLIP at 384 pixels, 27 x 27 features)."""

    size: tuple[int, int] = (384, 384)
    image_grid_pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    num_image_tokens: int = 729
    vision_feature_select_strategy: Literal["full", "default"] = "full"
    vision_aspect_ratio: str = "anyres_max_9"
    # The reference gives AnyRes only to samples with a single image (several images of one
    # sample are one tile each); True gives it to every image.
    anyres_for_multi_image: bool = False
    video_resample: str = "bicubic"

    def __post_init__(self):
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1, got {self.size}")
        if not self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints needs at least one (height, width)")
        side = math.isqrt(self.num_image_tokens)
        if self.num_image_tokens < 1 or side * side != self.num_image_tokens:
            raise ValueError(
                f"num_image_tokens must be a square (side x side features), got "
                f"{self.num_image_tokens}"
            )
        if self.vision_feature_select_strategy not in ("full", "default"):
            raise ValueError(
                "vision_feature_select_strategy must be 'full' or 'default', got "
                f"{self.vision_feature_select_strategy!r}"
            )
        if not re.fullmatch(r"anyres_max_\d+", self.vision_aspect_ratio):
            raise ValueError(
                f"vision_aspect_ratio must look like 'anyres_max_9', got "
                f"{self.vision_aspect_ratio!r}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        object.__setattr__(self, "size", tuple(int(x) for x in self.size))
        object.__setattr__(
            self,
            "image_grid_pinpoints",
            tuple((int(h), int(w)) for h, w in self.image_grid_pinpoints),
        )
        object.__setattr__(self, "resample", resample_name(self.resample))
        object.__setattr__(self, "video_resample", resample_name(self.video_resample))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def max_tiles(self) -> int:
        return int(self.vision_aspect_ratio.removeprefix("anyres_max_"))

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], processor_config: Mapping[str, Any] | None = None
    ) -> LlavaOnevisionProcessorConfig:
        """From ``preprocessor_config.json`` (and ``processor_config.json`` for the token
        count keys, which may also sit in the first dict)."""
        if config.get("do_center_crop"):
            raise ValueError("do_center_crop is not supported: LLaVA-OneVision does not crop")
        kw: dict[str, Any] = {}
        size = config.get("size")
        if size is not None:
            if "height" in size:
                kw["size"] = (size["height"], size["width"])
            else:
                kw["size"] = (size["shortest_edge"], size["shortest_edge"])
        if config.get("image_grid_pinpoints") is not None:
            kw["image_grid_pinpoints"] = tuple(tuple(p) for p in config["image_grid_pinpoints"])
        kw.update(hf_processor_settings(config, COMMON_PIXEL_KEYS))
        merged = {**config, **(processor_config or {})}
        for key in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio"):
            if merged.get(key) is not None:
                kw[key] = merged[key]
        return cls(**kw)


class LlavaOnevisionProcessor(VisionProcessor):
    """LLaVA-OneVision processor: AnyRes tiles ``[tiles, C, H, W]``, ``tiles_per_item``,
    ``image_sizes``. :meth:`__call__` treats its images as one sample's."""

    style = LLAVA_ONEVISION

    def __init__(self, config: LlavaOnevisionProcessorConfig | None = None):
        self.config = config or LlavaOnevisionProcessorConfig()

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], processor_config: Mapping[str, Any] | None = None
    ) -> LlavaOnevisionProcessor:
        return cls(LlavaOnevisionProcessorConfig.from_hf(config, processor_config))

    def sample_image(self, image: Any, *, num_images: int) -> VisualItem:
        if num_images > 1 and not self.config.anyres_for_multi_image:
            return self.multi_image(image)
        return self.image(image)

    # -- images ---------------------------------------------------------------------------------
    def _finish(self, tiles: list[np.ndarray]) -> torch.Tensor:
        c = self.config
        out = []
        for tile in tiles:
            if c.do_resize:
                tile = resize(tile, c.size, c.resample)
            out.append(
                rescale_normalize(
                    tile,
                    rescale_factor=c.rescale_factor if c.do_rescale else None,
                    mean=c.image_mean if c.do_normalize else None,
                    std=c.image_std if c.do_normalize else None,
                )
            )
        return torch.from_numpy(np.stack(out))

    def _tokens(self, n: int) -> int:
        return n - 1 if self.config.vision_feature_select_strategy == "default" else n

    def image(self, image: Any) -> VisualItem:
        """An image of a single-image sample: AnyRes tiles."""
        c = self.config
        pixels = as_rgb_chw(image)
        size = pixels.shape[1], pixels.shape[2]
        best = select_best_resolution(size, c.image_grid_pinpoints)
        fitted = resize(pixels, _fit_size(size, best), c.resample)
        h, w = fitted.shape[1:]
        top, left = (best[0] - h) // 2, (best[1] - w) // 2
        canvas = np.zeros((3, *best), dtype=np.uint8)
        canvas[:, top : top + h, left : left + w] = fitted
        th, tw = c.size
        tiles = [
            canvas[:, y : y + th, x : x + tw]
            for y in range(0, best[0], th)
            for x in range(0, best[1], tw)
        ]
        base = resize(pixels, c.size, c.resample)
        pixel_values = self._finish([base, *tiles])
        n = anyres_num_tokens(
            size,
            pinpoints=c.image_grid_pinpoints,
            tile=c.size,
            num_image_tokens=c.num_image_tokens,
            max_tiles=c.max_tiles,
        )
        return self._item("image", pixel_values, self._tokens(n), size)

    def multi_image(self, image: Any) -> VisualItem:
        """An image of a sample with several: padded to a square with the mean color, 1 tile."""
        c = self.config
        pixels = as_rgb_chw(image)
        size = pixels.shape[1], pixels.shape[2]
        side = max(size)
        square = np.empty((3, side, side), dtype=np.uint8)
        square[:] = np.array([int(x * 255) for x in c.image_mean], dtype=np.uint8)[:, None, None]
        top, left = (side - size[0]) // 2, (side - size[1]) // 2
        square[:, top : top + size[0], left : left + size[1]] = pixels
        pixel_values = self._finish([square])
        return self._item("image", pixel_values, self._tokens(c.num_image_tokens + 1), size)

    def _item(
        self, kind: str, pixel_values: torch.Tensor, tokens: int, size: tuple[int, int] | None
    ) -> VisualItem:
        tiles = pixel_values.shape[0]
        fields = {
            "pixel_values": pixel_values,
            "tiles_per_item": torch.tensor([tiles], dtype=torch.long),
        }
        if kind == "image":
            fields["image_sizes"] = torch.tensor([size], dtype=torch.long)
        return VisualItem(
            kind=kind,
            stream=kind,
            fields=fields,
            num_tokens=tokens,
            frames=tiles if kind == "video" else 1,
            encoder_seqlens=(self.config.num_image_tokens,) * tiles,
        )

    # -- videos ---------------------------------------------------------------------------------
    def video(self, frames: Any, *, fps: float | None = None) -> VisualItem:
        c = self.config
        x = as_frames(frames)
        if c.do_resize:
            x = resize_frames(x, c.size, c.video_resample)
        x = normalize_frames(
            x,
            rescale_factor=c.rescale_factor if c.do_rescale else None,
            mean=c.image_mean if c.do_normalize else None,
            std=c.image_std if c.do_normalize else None,
        )
        pooled = math.ceil(math.isqrt(c.num_image_tokens) / 2)
        tokens = x.shape[0] * pooled * pooled + 1
        return self._item("video", x, tokens, None)
