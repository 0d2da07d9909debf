"""The LLaVA-OneVision projector: everything between the vision tower and the LLM embeddings.

LLaVA-OneVision (Li et al. 2024, "LLaVA-OneVision: Easy Visual Task Transfer",
arXiv:2408.03326), after LLaVA-NeXT's "AnyRes" tiling (Liu et al. 2024, "Improved Baselines
with Visual Instruction Tuning", arXiv:2310.03744). Matches transformers'
``LlavaOnevisionModel.get_image_features`` / ``get_video_features`` (with
``vision_feature_select_strategy="full"``, ``vision_aspect_ratio="anyres_max_N"``) and the
placeholder counts of ``LlavaOnevisionProcessor``:

- every tile's patch features go through a 2-layer MLP ``linear_2(act(linear_1(x)))``;
- an **image** with several tiles (AnyRes: a base tile of the whole image, then the crops of
  the best-fitting ``image_grid_pinpoints`` resolution, row-major) gives the base tile's
  features, then the crops' features stitched into one grid, the padding rows / columns the
  processor added to keep the aspect ratio cut away ("unpadding"), downscaled bilinearly when
  larger than ``max_num_patches`` tiles (by the factor ``ratio = sqrt(h * w / (N * p^2))``,
  when it exceeds 1.1), with ``image_newline`` appended after every row;
- an image with one tile (several images in one sample) gives its features and one
  ``image_newline``;
- a **video** gives, for each frame, its patch grid pooled bilinearly to half size (rounded
  up), the frames one after another, and one ``image_newline`` at the end.

Module tree (forge names under the VLM's ``projector.`` prefix)::

    linear_1.{weight,bias}    [text_hidden, vision_hidden], [text_hidden]
    linear_2.{weight,bias}    [text_hidden, text_hidden], [text_hidden]
    image_newline             [text_hidden]

Reads ``VisualInputs.image_sizes`` (original ``(height, width)`` per image) and
``tiles_per_item`` (tiles per image, optional: AnyRes for all when omitted; frames per video,
required for videos). Features come from the vision encoder packed as
``[tiles * patches, vision_hidden]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge_models.init import init_
from forge_models.vision.vit_blocks import activation
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "AnyresLayout",
    "LlavaOnevisionProjector",
    "LlavaOnevisionProjectorConfig",
    "llava_onevision_projector_config_from_hf",
    "llava_onevision_projector_config_to_hf",
    "select_best_resolution",
]


def select_best_resolution(
    height: int, width: int, candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The ``(height, width)`` among ``candidates`` an image is resized into for AnyRes.

    The one keeping the most original pixels once the image is scaled to fit it (never
    counting more than the original has), ties broken by the least padding (LLaVA-NeXT's
    rule; the first candidate wins a full tie).
    """
    best: tuple[int, int] | None = None
    best_key: tuple[int, int] | None = None
    for cand_h, cand_w in candidates:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(cand_h * cand_w - kept))
        if best_key is None or key > best_key:
            best, best_key = (int(cand_h), int(cand_w)), key
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


@dataclass(frozen=True)
class AnyresLayout:
    """Where an AnyRes image's crop features go (all in units of vision patches).

    Attributes:
        crops_h, crops_w: the crop grid (tiles after the base tile: ``crops_h * crops_w``).
        rows, cols: ``[start, stop)`` of the stitched feature grid kept after unpadding.
        resized: ``(h, w)`` the kept grid is downscaled to, or ``None``.
    """

    crops_h: int
    crops_w: int
    rows: tuple[int, int]
    cols: tuple[int, int]
    resized: tuple[int, int] | None

    @property
    def num_tiles(self) -> int:
        """Tiles of the image: the base tile plus the crops."""
        return self.crops_h * self.crops_w + 1

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the final feature grid (before the newline column)."""
        if self.resized is not None:
            return self.resized
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


@dataclass(frozen=True, kw_only=True)
class LlavaOnevisionProjectorConfig:
    """The LLaVA-OneVision projector.

    Attributes:
        vision_hidden_size: the vision encoder's output width.
        text_hidden_size: the language model's hidden size.
        image_size: the vision tower's tile side in pixels.
        patch_size: the vision tower's patch side (``image_size // patch_size`` patches per
            tile side).
        image_grid_pinpoints: AnyRes resolutions ``(height, width)``, multiples of
            ``image_size``.
        hidden_act: the MLP activation (transformers ``projector_hidden_act``).
        bias: the MLP has biases (``multimodal_projector_bias``).
        max_num_patches: ``N`` of ``vision_aspect_ratio="anyres_max_N"``: crop features
            beyond ``N`` tiles' worth are downscaled.
        initializer_range: std of the MLP weights at init.
    """

    vision_hidden_size: int
    text_hidden_size: int
    image_size: int
    patch_size: int
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    hidden_act: str = "gelu"
    bias: bool = True
    max_num_patches: int = 9
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        owner = "LlavaOnevisionProjectorConfig"
        for name in (
            "vision_hidden_size",
            "text_hidden_size",
            "image_size",
            "patch_size",
            "max_num_patches",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
        if self.patch_size > self.image_size:
            raise ValueError(
                f"{owner}: patch_size={self.patch_size} exceeds image_size={self.image_size}"
            )
        pinpoints = tuple(tuple(int(v) for v in p) for p in self.image_grid_pinpoints)
        object.__setattr__(self, "image_grid_pinpoints", pinpoints)
        if not pinpoints:
            raise ValueError(f"{owner}.image_grid_pinpoints must list at least one resolution")
        for p in pinpoints:
            if len(p) != 2 or min(p) < 1 or p[0] % self.image_size or p[1] % self.image_size:
                raise ValueError(
                    f"{owner}: image_grid_pinpoints entry {list(p)} must be a (height, width) "
                    f"pair of positive multiples of image_size={self.image_size}"
                )
        activation(self.hidden_act)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def patches_per_tile(self) -> int:
        return self.patches_per_side**2


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for a dict or a transformers config object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def llava_onevision_projector_config_from_hf(
    hf_config: Mapping[str, Any],
) -> LlavaOnevisionProjectorConfig:
    """The projector's config from a ``LlavaOnevisionConfig`` dict (top-level ``config.json``).

    Raises ``ValueError`` for settings the projector does not implement: a list
    ``vision_feature_layer`` (concatenated layers), ``vision_feature_select_strategy="default"``
    (drops a CLS token SigLIP does not have) or a ``vision_aspect_ratio`` other than
    ``"anyres_max_N"``.
    """
    vision, text = hf_config["vision_config"], hf_config["text_config"]
    layer = hf_config.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(
            f"vision_feature_layer={layer!r}: concatenating several layers is not supported; "
            "use one int layer"
        )
    strategy = hf_config.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} is not supported (SigLIP has no CLS "
            "token to drop); use 'full'"
        )
    aspect = str(hf_config.get("vision_aspect_ratio", "anyres_max_9"))
    if not aspect.startswith("anyres_max_") or not aspect[len("anyres_max_") :].isdigit():
        raise ValueError(
            f"vision_aspect_ratio={aspect!r} is not supported; use 'anyres_max_N' (e.g. "
            "'anyres_max_9')"
        )
    pinpoints = hf_config.get("image_grid_pinpoints")
    if not pinpoints:
        raise ValueError("config.json lacks image_grid_pinpoints, which LLaVA-OneVision needs")
    return LlavaOnevisionProjectorConfig(
        vision_hidden_size=int(_get(vision, "hidden_size")),
        text_hidden_size=int(_get(text, "hidden_size")),
        image_size=int(_get(vision, "image_size")),
        patch_size=int(_get(vision, "patch_size")),
        image_grid_pinpoints=tuple(tuple(p) for p in pinpoints),
        hidden_act=hf_config.get("projector_hidden_act", "gelu"),
        bias=bool(hf_config.get("multimodal_projector_bias", True)),
        max_num_patches=int(aspect[len("anyres_max_") :]),
        initializer_range=float(_get(text, "initializer_range", 0.02)),
    )


def llava_onevision_projector_config_to_hf(
    config: LlavaOnevisionProjectorConfig,
) -> dict[str, Any]:
    """The ``LlavaOnevisionConfig`` keys the projector owns; ``vision_config`` /
    ``text_config`` hold only the sizes it reads (merge them into the full sub-configs)."""
    return {
        "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
        "projector_hidden_act": config.hidden_act,
        "multimodal_projector_bias": config.bias,
        "vision_aspect_ratio": f"anyres_max_{config.max_num_patches}",
        "vision_feature_select_strategy": "full",
        "vision_config": {
            "hidden_size": config.vision_hidden_size,
            "image_size": config.image_size,
            "patch_size": config.patch_size,
        },
        "text_config": {
            "hidden_size": config.text_hidden_size,
            "initializer_range": config.initializer_range,
        },
    }


class LlavaOnevisionProjector(nn.Module):
    """Vision features -> LLM placeholder embeddings; see the module docstring."""

    def __init__(self, config: LlavaOnevisionProjectorConfig) -> None:
        super().__init__()
        self.config = config
        self.act = activation(config.hidden_act)
        self.linear_1 = nn.Linear(
            config.vision_hidden_size, config.text_hidden_size, bias=config.bias
        )
        self.linear_2 = nn.Linear(
            config.text_hidden_size, config.text_hidden_size, bias=config.bias
        )
        self.image_newline = nn.Parameter(torch.empty(config.text_hidden_size))
        self.init_weights()

    # -- metadata -----------------------------------------------------------------------------
    def anyres_layout(self, height: int, width: int) -> AnyresLayout:
        """The AnyRes layout of an image of ``height x width`` original pixels."""
        cfg = self.config
        best_h, best_w = select_best_resolution(height, width, cfg.image_grid_pinpoints)
        crops_h, crops_w = best_h // cfg.image_size, best_w // cfg.image_size
        p = cfg.patches_per_side
        cur_h, cur_w = crops_h * p, crops_w * p
        rows, cols = (0, cur_h), (0, cur_w)
        # Unpadding: the processor letterboxed the image into the crops, centred.
        if width / height > cur_w / cur_h:
            pad = (cur_h - int(round(height * (cur_w / width), 7))) // 2
            rows = (pad, cur_h - pad)
        else:
            pad = (cur_w - int(round(width * (cur_h / height), 7))) // 2
            cols = (pad, cur_w - pad)
        h, w = rows[1] - rows[0], cols[1] - cols[0]
        ratio = math.sqrt(h * w / (cfg.max_num_patches * p**2))
        resized = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None
        return AnyresLayout(crops_h, crops_w, rows, cols, resized)

    def _image_plan(self, visual: VisualInputs) -> list[tuple[int, AnyresLayout | None]]:
        """``(tiles, layout or None for a single-tile image)`` per image."""
        visual.require("image_sizes", who="LlavaOnevisionProjector (images)")
        sizes = visual.image_sizes.tolist()
        given = None if visual.tiles_per_item is None else visual.tiles_per_item.tolist()
        if given is not None and len(given) != len(sizes):
            raise ValueError(
                f"VisualInputs.tiles_per_item has {len(given)} entries for {len(sizes)} images"
            )
        plan: list[tuple[int, AnyresLayout | None]] = []
        for k, (h, w) in enumerate(sizes):
            if given is not None and given[k] == 1:
                plan.append((1, None))
                continue
            layout = self.anyres_layout(int(h), int(w))
            if given is not None and given[k] != layout.num_tiles:
                raise ValueError(
                    f"image {k} of size {h}x{w} has {given[k]} tiles, but AnyRes with "
                    f"image_grid_pinpoints gives {layout.num_tiles} (1 base + "
                    f"{layout.crops_h}x{layout.crops_w} crops); or pass 1 tile (base image only)"
                )
            plan.append((layout.num_tiles, layout))
        return plan

    def _frames(self, visual: VisualInputs) -> list[int]:
        visual.require("tiles_per_item", who="LlavaOnevisionProjector (videos: frames per video)")
        return [int(f) for f in visual.tiles_per_item.tolist()]

    @property
    def pooled_side(self) -> int:
        """Patches per side of a video frame after the 2x bilinear pooling (rounded up)."""
        return math.ceil(self.config.patches_per_side / 2)

    def num_tokens(self, visual: VisualInputs) -> list[int]:
        """Placeholder tokens per item, from the metadata only (as the processor counts them)."""
        pp = self.config.patches_per_tile
        if visual.kind == "video":
            return [f * self.pooled_side**2 + 1 for f in self._frames(visual)]
        counts = []
        for _, layout in self._image_plan(visual):
            if layout is None:
                counts.append(pp + 1)
            else:
                h, w = layout.grid
                counts.append(pp + h * (w + 1))
        return counts

    # -- forward ------------------------------------------------------------------------------
    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))

    def forward(self, features: torch.Tensor, visual: VisualInputs) -> torch.Tensor:
        """``features`` ``[tiles * patches, vision_hidden]`` -> ``[placeholders, text_hidden]``."""
        if visual.kind == "video":
            tiles = self._frames(visual)
        else:
            plan = self._image_plan(visual)
            tiles = [n for n, _ in plan]
        pp = self.config.patches_per_tile
        want = (sum(tiles) * pp, self.config.vision_hidden_size)
        if tuple(features.shape) != want:
            raise ValueError(
                f"LlavaOnevisionProjector expects features {list(want)} ({sum(tiles)} tiles of "
                f"{pp} patches), got {list(features.shape)}: check tiles_per_item / image_sizes"
            )
        x = self.mlp(features)
        newline = self.image_newline.to(x.dtype)
        if visual.kind == "video":
            return self._videos(x, tiles, newline)
        return self._images(x, plan, newline)

    def _images(
        self,
        x: torch.Tensor,
        plan: list[tuple[int, AnyresLayout | None]],
        newline: torch.Tensor,
    ) -> torch.Tensor:
        p, pp = self.config.patches_per_side, self.config.patches_per_tile
        out: list[torch.Tensor] = []
        for tile_x, (_, layout) in zip(x.split([n * pp for n, _ in plan]), plan, strict=True):
            out.append(tile_x[:pp])  # the base tile (the whole image)
            if layout is None:
                out.append(newline[None])
                continue
            # Stitch the crops into one [D, crops_h * p, crops_w * p] grid, row-major.
            grid = tile_x[pp:].view(layout.crops_h, layout.crops_w, p, p, -1)
            grid = grid.permute(4, 0, 2, 1, 3).reshape(-1, layout.crops_h * p, layout.crops_w * p)
            grid = grid[:, layout.rows[0] : layout.rows[1], layout.cols[0] : layout.cols[1]]
            if layout.resized is not None:
                grid = F.interpolate(grid[None], size=layout.resized, mode="bilinear")[0]
            column = newline[:, None, None].expand(-1, grid.shape[1], 1)
            out.append(torch.cat([grid, column], dim=2).flatten(1).t())
        return torch.cat(out)

    def _videos(self, x: torch.Tensor, frames: list[int], newline: torch.Tensor) -> torch.Tensor:
        p, q = self.config.patches_per_side, self.pooled_side
        grid = x.view(-1, p, p, x.shape[-1]).permute(0, 3, 1, 2)
        pooled = F.interpolate(grid, size=(q, q), mode="bilinear").permute(0, 2, 3, 1)
        pooled = pooled.reshape(-1, q * q, x.shape[-1])
        out: list[torch.Tensor] = []
        for video in pooled.split(frames):
            out += [video.flatten(0, 1), newline[None]]
        return torch.cat(out)

    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """In place (works after ``to_empty``): MLP weights ``normal(0, initializer_range)``,
        biases zero, ``image_newline`` ``normal(0, 1 / sqrt(text_hidden))`` (the reference's)."""
        with torch.no_grad():
            for linear in (self.linear_1, self.linear_2):
                init_(
                    linear.weight,
                    nn.init.normal_,
                    std=self.config.initializer_range,
                    generator=generator,
                )
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            std = 1.0 / math.sqrt(self.config.text_hidden_size)
            init_(self.image_newline, nn.init.normal_, std=std, generator=generator)
