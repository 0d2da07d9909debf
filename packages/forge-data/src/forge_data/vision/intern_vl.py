"""InternVL image and video processing (Chen et al. 2024, "InternVL: Scaling up Vision Foundation
Models", arXiv:2312.14238; dynamic high resolution from Chen et al. 2024, "InternVL 1.5" /
"InternVL 2.5", arXiv:2412.05271).

Dynamic tiling: among the grids of ``columns x rows`` tiles with ``min_patches <= tiles <=
max_patches`` (ordered by tile count), the one whose aspect ratio is closest to the image's is
chosen (on a tie, the larger grid while the image's area exceeds half of the grid's); the image
is resized to that grid of ``tile_size`` tiles and cut row by row, and with ``use_thumbnail``
the whole image resized to one tile is appended when there is more than one tile. A video's
frames are single tiles. ``pixel_values`` is ``[tiles, C, H, W]`` with ``tiles_per_item``.

Each tile takes ``(tile / patch_size)**2 * downsample_ratio**2`` placeholder tokens (256 for 448
pixels, patch 14, pixel shuffle 0.5); InternVL feeds video frames through the image stream, in
placeholder order with the images, as its reference model does.

Images follow ``GotOcr2ImageProcessorPil`` (with ``crop_to_patches``, as ``InternVLProcessor``
calls it) of transformers 5.x bit for bit; videos follow ``InternVLVideoProcessor`` (see
:mod:`forge_data.vision.pixels`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from forge_data.vision.pixels import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RESAMPLE,
    as_frames,
    as_rgb_chw,
    normalize_frames,
    resample_name,
    rescale_normalize,
    resize,
    resize_frames,
)
from forge_data.vision.placeholders import INTERN_VL
from forge_data.vision.processing import (
    COMMON_PIXEL_KEYS,
    VisionProcessor,
    VisualItem,
    hf_processor_settings,
)

__all__ = ["HF_TOKENIZER_TOKENS", "InternVLProcessor", "InternVLProcessorConfig", "tile_grid"]

#: The tokens transformers' ``InternVLProcessor`` reads from its tokenizer's attributes
#: (``tokenizer_config.json`` ``extra_special_tokens``), InternVL's placeholders: without them
#: ``AutoProcessor.from_pretrained`` of a folder fails.
HF_TOKENIZER_TOKENS = {
    "start_image_token": INTERN_VL.image_open,
    "end_image_token": INTERN_VL.image_close,
    "context_image_token": INTERN_VL.image_token,
    "video_token": INTERN_VL.video_anchor,
}


@lru_cache(maxsize=256)
def tile_grid(
    size: tuple[int, int], tile: tuple[int, int], min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """(columns, rows) of the tile grid for an image of ``size = (height, width)``."""
    grids = sorted(
        (
            (c, r)
            for c in range(1, max_tiles + 1)
            for r in range(1, max_tiles + 1)
            if min_tiles <= c * r <= max_tiles
        ),
        key=lambda g: g[0] * g[1],
    )
    if not grids:
        raise ValueError(f"no tile grid has between {min_tiles} and {max_tiles} tiles")
    height, width = size
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and width * height > 0.5 * tile[0] * tile[1] * c * r:
            best = (c, r)
    return best


@dataclass(frozen=True, kw_only=True)
class InternVLProcessorConfig:
    """Settings of ``preprocessor_config.json`` plus the vision config's patch size and pixel
    shuffle ratio (which fix the tokens per tile). Defaults: those of the transformers reference
    classes, except the tile size: 448, InternVL's (the class default 384 is GOT-OCR2's)."""

    tile_size: tuple[int, int] = (448, 448)
    crop_to_patches: bool = True
    min_patches: int = 1
    max_patches: int = 12
    use_thumbnail: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    patch_size: int = 14
    downsample_ratio: float = 0.5
    video_size: tuple[int, int] | None = None  # None: tile_size
    video_resample: str = "bicubic"

    def __post_init__(self):
        if len(self.tile_size) != 2 or min(self.tile_size) < 1:
            raise ValueError(f"tile_size must be (height, width) >= 1, got {self.tile_size}")
        if not 1 <= self.min_patches <= self.max_patches:
            raise ValueError(
                f"need 1 <= min_patches <= max_patches, got {self.min_patches}, {self.max_patches}"
            )
        h, w = self.tile_size
        side_h, side_w = (
            h / self.patch_size * self.downsample_ratio,
            w / self.patch_size * self.downsample_ratio,
        )
        if (
            h % self.patch_size
            or w % self.patch_size
            or not (side_h.is_integer() and side_w.is_integer())
        ):
            raise ValueError(
                f"tile_size {self.tile_size} must be a multiple of patch_size {self.patch_size} "
                f"whose patch grid scales by downsample_ratio {self.downsample_ratio} to whole tokens"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")
        object.__setattr__(self, "tile_size", (int(h), int(w)))
        if self.video_size is not None:
            object.__setattr__(self, "video_size", tuple(int(x) for x in self.video_size))
        object.__setattr__(self, "resample", resample_name(self.resample))
        object.__setattr__(self, "video_resample", resample_name(self.video_resample))
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def tokens_per_tile(self) -> int:
        h, w = self.tile_size
        r = self.downsample_ratio
        return int(h / self.patch_size * r) * int(w / self.patch_size * r)

    @classmethod
    def from_hf(
        cls,
        config: Mapping[str, Any],
        model_config: Mapping[str, Any] | None = None,
        video_config: Mapping[str, Any] | None = None,
    ) -> InternVLProcessorConfig:
        """From ``preprocessor_config.json``, the model's ``config.json`` (``downsample_ratio``
        and ``vision_config.patch_size``) and ``video_preprocessor_config.json``."""
        kw: dict[str, Any] = {}
        if config.get("size") is not None:
            kw["tile_size"] = _size(config["size"])
        kw.update(
            hf_processor_settings(
                config, ("crop_to_patches", "min_patches", "max_patches", *COMMON_PIXEL_KEYS)
            )
        )
        if model_config is not None:
            vision = model_config.get("vision_config") or {}
            if vision.get("patch_size") is not None:
                p = vision["patch_size"]
                kw["patch_size"] = p[0] if isinstance(p, (list, tuple)) else p
            if model_config.get("downsample_ratio") is not None:
                kw["downsample_ratio"] = model_config["downsample_ratio"]
        if video_config is not None:
            if video_config.get("size") is not None:
                kw["video_size"] = _size(video_config["size"])
            if video_config.get("resample") is not None:
                kw["video_resample"] = video_config["resample"]
        return cls(**kw)

    def to_hf(self) -> dict[str, dict[str, Any]]:
        """The transformers files that load as these settings, the inverse of :meth:`from_hf`:
        ``preprocessor_config.json`` (``GotOcr2ImageProcessor``, which ``InternVLProcessor``
        calls with ``crop_to_patches``), ``processor_config.json`` (``image_seq_length``: the
        placeholder tokens per tile, which ``InternVLProcessor`` does not derive itself) and
        ``video_preprocessor_config.json`` (``InternVLVideoProcessor``). ``patch_size`` and
        ``downsample_ratio`` belong to the model's ``config.json``.

        ``ValueError`` for settings transformers cannot express: a tiled image without its
        thumbnail (``crop_to_patches`` always appends one to more than one tile)."""
        if self.crop_to_patches and self.max_patches > 1 and not self.use_thumbnail:
            raise ValueError(
                "use_thumbnail=False has no transformers GotOcr2ImageProcessor setting (it "
                "appends the thumbnail to every image cut into more than one tile)"
            )
        pixels = {
            "do_convert_rgb": True,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }
        h, w = self.tile_size
        vh, vw = self.video_size or self.tile_size
        return {
            "preprocessor_config.json": {
                "image_processor_type": "GotOcr2ImageProcessor",
                "processor_class": "InternVLProcessor",
                "size": {"height": h, "width": w},
                "crop_to_patches": self.crop_to_patches,
                "min_patches": self.min_patches,
                "max_patches": self.max_patches,
                "resample": RESAMPLE[self.resample],
                **pixels,
            },
            "processor_config.json": {
                "processor_class": "InternVLProcessor",
                "image_seq_length": self.tokens_per_tile,
            },
            "video_preprocessor_config.json": {
                "video_processor_type": "InternVLVideoProcessor",
                "processor_class": "InternVLProcessor",
                "size": {"height": vh, "width": vw},
                "resample": RESAMPLE[self.video_resample],
                **pixels,
            },
        }


def _size(size: Mapping[str, int]) -> tuple[int, int]:
    if "height" in size:
        return int(size["height"]), int(size["width"])
    return int(size["shortest_edge"]), int(size["shortest_edge"])


class InternVLProcessor(VisionProcessor):
    """InternVL processor: dynamic tiles ``[tiles, C, H, W]`` and ``tiles_per_item``."""

    style = INTERN_VL

    def __init__(self, config: InternVLProcessorConfig | None = None):
        self.config = config or InternVLProcessorConfig()

    @classmethod
    def from_hf(
        cls,
        config: Mapping[str, Any],
        model_config: Mapping[str, Any] | None = None,
        video_config: Mapping[str, Any] | None = None,
    ) -> InternVLProcessor:
        return cls(InternVLProcessorConfig.from_hf(config, model_config, video_config))

    def num_tiles(self, height: int, width: int) -> int:
        """Tiles of an image of this size (thumbnail included)."""
        c = self.config
        if not (c.crop_to_patches and c.max_patches > 1):
            return 1
        cols, rows = tile_grid((height, width), c.tile_size, c.min_patches, c.max_patches)
        n = cols * rows
        return n + 1 if c.use_thumbnail and n > 1 else n

    def _normalize(self, tile: np.ndarray) -> np.ndarray:
        c = self.config
        return rescale_normalize(
            tile,
            rescale_factor=c.rescale_factor if c.do_rescale else None,
            mean=c.image_mean if c.do_normalize else None,
            std=c.image_std if c.do_normalize else None,
        )

    def image(self, image: Any) -> VisualItem:
        c = self.config
        pixels = as_rgb_chw(image)
        th, tw = c.tile_size
        if c.crop_to_patches and c.max_patches > 1:
            cols, rows = tile_grid(pixels.shape[1:], c.tile_size, c.min_patches, c.max_patches)
            canvas = resize(pixels, (th * rows, tw * cols), c.resample)
            tiles = [
                canvas[:, r * th : (r + 1) * th, k * tw : (k + 1) * tw]
                for r in range(rows)
                for k in range(cols)
            ]
            if c.use_thumbnail and len(tiles) != 1:
                tiles.append(resize(pixels, c.tile_size, c.resample))
        else:
            tiles = [resize(pixels, c.tile_size, c.resample) if c.do_resize else pixels]
        pixel_values = torch.from_numpy(np.stack([self._normalize(t) for t in tiles]))
        return self._item("image", pixel_values)

    def video(self, frames: Any, *, fps: float | None = None) -> VisualItem:
        c = self.config
        x = as_frames(frames)
        if c.do_resize:
            x = resize_frames(x, c.video_size or c.tile_size, c.video_resample)
        x = normalize_frames(
            x,
            rescale_factor=c.rescale_factor if c.do_rescale else None,
            mean=c.image_mean if c.do_normalize else None,
            std=c.image_std if c.do_normalize else None,
        )
        return self._item("video", x)

    def _item(self, kind: str, pixel_values: torch.Tensor) -> VisualItem:
        c = self.config
        tiles = pixel_values.shape[0]
        h, w = pixel_values.shape[-2:]
        return VisualItem(
            kind=kind,
            stream="image",
            fields={
                "pixel_values": pixel_values,
                "tiles_per_item": torch.tensor([tiles], dtype=torch.long),
            },
            num_tokens=tiles * c.tokens_per_tile,
            frames=tiles if kind == "video" else 1,
            encoder_seqlens=((h // c.patch_size) * (w // c.patch_size),) * tiles,
        )
