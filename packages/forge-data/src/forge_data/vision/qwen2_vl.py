"""Qwen2-VL / Qwen2.5-VL image and video processing (Wang et al. 2024, "Qwen2-VL", arXiv:2409.12191;
Bai et al. 2025, "Qwen2.5-VL Technical Report", arXiv:2502.13923).

Naive dynamic resolution: an image keeps its aspect ratio and is resized so both sides are
multiples of ``patch_size * merge_size`` and its area lies in ``[min_pixels, max_pixels]``
(:func:`smart_resize`). It is cut into ``patch_size`` squares; each patch is flattened together
with ``temporal_patch_size`` consecutive frames (an image is repeated to that many frames, a
video's frames are grouped, the last frame repeated to fill the final group) into one row of
``pixel_values [patches, C * T * P * P]``. Rows are ordered so that the ``merge_size x
merge_size`` patches the model merges into one token are consecutive: (temporal group, block row,
block column, row in block, column in block). ``grid_thw`` is each item's (groups, rows, columns)
in patches and the item takes ``t * h * w / merge_size**2`` placeholder tokens.

Images follow ``Qwen2VLImageProcessorPil`` and videos ``Qwen2VLVideoProcessor`` of transformers
5.x bit for bit (see :mod:`forge_data.vision.pixels` for the two pixel paths).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
from forge_data.vision.placeholders import QWEN2_VL
from forge_data.vision.processing import (
    COMMON_PIXEL_KEYS,
    VisionProcessor,
    VisualItem,
    hf_processor_settings,
)

__all__ = ["Qwen2VLProcessor", "Qwen2VLProcessorConfig", "patchify", "smart_resize"]


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """The (height, width) closest to the input's aspect ratio with both sides multiples of
    ``factor`` and an area in ``[min_pixels, max_pixels]``."""
    if min(height, width) < 1:
        raise ValueError(f"an image needs at least 1 x 1 pixels, got {height} x {width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"aspect ratio {max(height, width) / min(height, width):.1f} of a {height} x {width} "
            "image is above 200, which Qwen2-VL does not process: crop or pad it"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(
    frames: torch.Tensor, *, patch_size: int, merge_size: int, temporal_patch_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flatten ``(T, C, H, W)`` float frames (T a multiple of ``temporal_patch_size``; H, W of
    ``patch_size * merge_size``) to ``[t * h * w, C * temporal_patch_size * P * P]`` and
    ``(t, h, w)``."""
    T, C, H, W = frames.shape
    p, m, tp = patch_size, merge_size, temporal_patch_size
    if T % tp or H % (p * m) or W % (p * m):
        raise ValueError(
            f"frames {tuple(frames.shape)} do not tile into {tp} frames x {p * m} pixels"
        )
    t, h, w = T // tp, H // p, W // p
    x = frames.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    # -> (t, block row, block col, row in block, col in block, C, tp, P, P)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * tp * p * p), (t, h, w)


@dataclass(frozen=True, kw_only=True)
class Qwen2VLProcessorConfig:
    """Settings of ``preprocessor_config.json`` (images) and of the video processor; the
    defaults are those of the transformers reference classes."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 28 * 28 * 768
    video_resample: str = "bicubic"
    # The reference assumes 24 frames per second for a video given without metadata.
    video_fps: float = 24.0
    cap_pixels_per_frame: bool = False
    max_video_tokens: int = 128000

    def __post_init__(self):
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_pixels < self.min_pixels or self.video_max_pixels < self.video_min_pixels:
            raise ValueError(
                f"max_pixels must be >= min_pixels, got image [{self.min_pixels}, "
                f"{self.max_pixels}], video [{self.video_min_pixels}, {self.video_max_pixels}]"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        if self.video_fps <= 0:
            raise ValueError(f"video_fps must be > 0, got {self.video_fps}")
        object.__setattr__(self, "resample", resample_name(self.resample))
        object.__setattr__(self, "video_resample", resample_name(self.video_resample))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], video_config: Mapping[str, Any] | None = None
    ) -> Qwen2VLProcessorConfig:
        """From ``preprocessor_config.json`` and, if the model has one,
        ``video_preprocessor_config.json`` (without it the video processor reads the image
        file, as transformers does, with the video defaults for what that file lacks)."""
        kw: dict[str, Any] = {}
        kw.update(_pixels(config, "min_pixels", "max_pixels"))
        kw.update(
            hf_processor_settings(
                config, ("patch_size", "temporal_patch_size", "merge_size", *COMMON_PIXEL_KEYS)
            )
        )
        video = config if video_config is None else video_config
        kw.update(_pixels(video, "video_min_pixels", "video_max_pixels"))
        if video.get("resample") is not None:
            kw["video_resample"] = video["resample"]
        for key in ("cap_pixels_per_frame", "max_video_tokens"):
            if video.get(key) is not None:
                kw[key] = video[key]
        if video.get("fps") is not None:
            kw["video_fps"] = float(video["fps"])
        return cls(**kw)


def _pixels(config: Mapping[str, Any], lo: str, hi: str) -> dict[str, int]:
    """``min_pixels`` / ``max_pixels`` (or ``size.shortest_edge`` / ``longest_edge``)."""
    size = config.get("size") or {}
    out = {}
    low = config.get("min_pixels", size.get("shortest_edge"))
    high = config.get("max_pixels", size.get("longest_edge"))
    if low is not None:
        out[lo] = int(low)
    if high is not None:
        out[hi] = int(high)
    return out


class Qwen2VLProcessor(VisionProcessor):
    """Qwen2-VL / Qwen2.5-VL processor: ``pixel_values [patches, C*T*P*P]`` and ``grid_thw``."""

    style = QWEN2_VL

    def __init__(self, config: Qwen2VLProcessorConfig | None = None):
        self.config = config or Qwen2VLProcessorConfig()

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], video_config: Mapping[str, Any] | None = None
    ) -> Qwen2VLProcessor:
        return cls(Qwen2VLProcessorConfig.from_hf(config, video_config))

    def image_size(self, height: int, width: int) -> tuple[int, int]:
        """The resized (height, width) of an image of this size."""
        c = self.config
        if not c.do_resize:
            return height, width
        return smart_resize(
            height, width, factor=c.factor, min_pixels=c.min_pixels, max_pixels=c.max_pixels
        )

    def image(self, image: Any) -> VisualItem:
        c = self.config
        pixels = as_rgb_chw(image)
        size = self.image_size(*pixels.shape[1:])
        if c.do_resize:
            pixels = resize(pixels, size, c.resample)
        x = rescale_normalize(
            pixels,
            rescale_factor=c.rescale_factor if c.do_rescale else None,
            mean=c.image_mean if c.do_normalize else None,
            std=c.image_std if c.do_normalize else None,
        )
        frames = torch.from_numpy(np.ascontiguousarray(x))[None]
        frames = frames.expand(c.temporal_patch_size, *frames.shape[1:])
        return self._item("image", frames)

    def video(self, frames: Any, *, fps: float | None = None) -> VisualItem:
        c = self.config
        x = as_frames(frames)
        if c.do_resize:
            max_pixels = c.video_max_pixels
            if c.cap_pixels_per_frame:  # the total-video pixel budget of qwen-vl-utils
                total = int(c.max_video_tokens * c.factor * c.factor * 0.9)
                share = total * c.temporal_patch_size // x.shape[0]
                max_pixels = max(min(max_pixels, share), int(c.video_min_pixels * 1.05))
            size = smart_resize(
                *x.shape[-2:], factor=c.factor, min_pixels=c.video_min_pixels, max_pixels=max_pixels
            )
            x = resize_frames(x, size, c.video_resample)
        x = normalize_frames(
            x,
            rescale_factor=c.rescale_factor if c.do_rescale else None,
            mean=c.image_mean if c.do_normalize else None,
            std=c.image_std if c.do_normalize else None,
        )
        if pad := -x.shape[0] % c.temporal_patch_size:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        fps = c.video_fps if fps is None else float(fps)
        if fps <= 0:
            raise ValueError(f"a video's fps must be > 0, got {fps}")
        return self._item("video", x, second_per_grid_ts=c.temporal_patch_size / fps)

    def _item(self, kind: str, frames: torch.Tensor, **extras: float) -> VisualItem:
        c = self.config
        pixel_values, (t, h, w) = patchify(
            frames,
            patch_size=c.patch_size,
            merge_size=c.merge_size,
            temporal_patch_size=c.temporal_patch_size,
        )
        return VisualItem(
            kind=kind,
            stream=kind,
            fields={
                "pixel_values": pixel_values,
                "grid_thw": torch.tensor([[t, h, w]], dtype=torch.long),
            },
            num_tokens=t * h * w // c.merge_size**2,
            frames=frames.shape[0],
            # Full-attention blocks of the Qwen2.5-VL ViT attend within each temporal group.
            encoder_seqlens=(h * w,) * t,
            extras=extras,
        )
