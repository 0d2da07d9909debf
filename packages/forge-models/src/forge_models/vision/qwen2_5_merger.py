"""The Qwen2.5-VL patch merger: the projector from vision patches to language-model tokens.

Qwen2.5-VL Technical Report (Bai et al. 2025, arXiv:2502.13923), as in Qwen2-VL (Wang et al.
2024, arXiv:2409.12191): each ``spatial_merge_size x spatial_merge_size`` square of neighbouring
patches (a *merge unit*, consecutive rows of the encoder output) becomes one token. Every patch
feature is RMS-normalized, the unit's features are concatenated and a two-layer MLP with exact
GELU (Hendrycks & Gimpel 2016, arXiv:1606.08415) maps them to the language model's width.

Input: the per-patch features of
:class:`~forge_models.vision.qwen2_5_vit.Qwen2_5VisionEncoder` ``[patches, vision_hidden]`` and
the batch's ``grid_thw``. Output: ``[tokens, out_hidden_size]`` with ``t * h * w / merge**2``
tokens per item, items in order and each item's tokens row-major (t, row, column): the order of
its placeholder tokens.

Module tree (the names forge-ckpt maps; transformers' names in brackets)::

    norm    RMSNorm [vision_hidden]                                      [merger.ln_q]
    fc1     nn.Linear [vision_hidden * merge**2, vision_hidden * merge**2] [merger.mlp.0]
    fc2     nn.Linear [out_hidden_size, vision_hidden * merge**2]          [merger.mlp.2]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from forge_models.blocks.norm import RMSNorm
from forge_models.init import init_
from forge_models.vlm.inputs import VisualInputs

__all__ = [
    "Qwen2_5MergerConfig",
    "Qwen2_5VLPatchMerger",
    "qwen2_5_merger_config_from_hf",
    "qwen2_5_merger_config_to_hf",
]


@dataclass(frozen=True, kw_only=True)
class Qwen2_5MergerConfig:  # noqa: N801 (transformers' family name)
    """Shape of the patch merger: ``vision_hidden_size`` in (the encoder's ``hidden_size``),
    ``out_hidden_size`` out (the language model's ``hidden_size``)."""

    vision_hidden_size: int = 1280
    out_hidden_size: int = 3584
    spatial_merge_size: int = 2
    norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vision_hidden_size", "out_hidden_size", "spatial_merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"Qwen2_5MergerConfig.{name} must be a positive int, got {value!r}"
                )
        if self.norm_eps <= 0:
            raise ValueError(f"Qwen2_5MergerConfig.norm_eps must be > 0, got {self.norm_eps}")

    @property
    def unit_size(self) -> int:
        """Patches per merge unit."""
        return self.spatial_merge_size**2


def qwen2_5_merger_config_from_hf(hf_vision_config: Mapping[str, Any]) -> Qwen2_5MergerConfig:
    """The merger config from the ``vision_config`` dict of a Qwen2.5-VL ``config.json``."""
    hf = hf_vision_config
    for key in ("hidden_size", "out_hidden_size"):
        if hf.get(key) is None:
            raise ValueError(f"the vision config lacks {key!r}, which the Qwen2.5-VL merger needs")
    return Qwen2_5MergerConfig(
        vision_hidden_size=int(hf["hidden_size"]),
        out_hidden_size=int(hf["out_hidden_size"]),
        spatial_merge_size=int(hf.get("spatial_merge_size", 2)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
    )


def qwen2_5_merger_config_to_hf(config: Qwen2_5MergerConfig) -> dict[str, Any]:
    """The merger's keys of a transformers ``Qwen2_5_VLVisionConfig``."""
    return {
        "hidden_size": config.vision_hidden_size,
        "out_hidden_size": config.out_hidden_size,
        "spatial_merge_size": config.spatial_merge_size,
    }


class Qwen2_5VLPatchMerger(nn.Module):  # noqa: N801 (transformers' family name)
    """``fc2(gelu(fc1(concat(norm(patch) for patch in unit))))`` per merge unit (see the module
    docstring). ``num_tokens(visual)`` gives the tokens per item from ``grid_thw``."""

    def __init__(self, config: Qwen2_5MergerConfig) -> None:
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size  # read by M-RoPE position builders
        unit_width = config.vision_hidden_size * config.unit_size
        self.norm = RMSNorm(config.vision_hidden_size, eps=config.norm_eps)
        self.fc1 = nn.Linear(unit_width, unit_width, bias=True)
        self.fc2 = nn.Linear(unit_width, config.out_hidden_size, bias=True)
        if not self.fc1.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, *, generator: torch.Generator | None = None) -> None:
        """transformers' init: weights ``normal(0, initializer_range)``, biases zero, norm one."""
        std = self.config.initializer_range
        for linear in (self.fc1, self.fc2):
            init_(linear.weight, nn.init.normal_, mean=0.0, std=std, generator=generator)
            nn.init.zeros_(linear.bias)
        self.norm.reset_parameters()

    def reset_parameters(self) -> None:
        self.init_weights()

    def _patches_per_item(self, visual: VisualInputs) -> list[int]:
        visual.require("grid_thw", who="Qwen2_5VLPatchMerger")
        m = self.config.spatial_merge_size
        counts = []
        for k, (t, h, w) in enumerate(visual.grid_thw.tolist()):
            if min(t, h, w) < 1 or h % m or w % m:
                raise ValueError(
                    f"Qwen2_5VLPatchMerger: grid_thw[{k}] = {[t, h, w]} must be positive with "
                    f"height and width (in patches) divisible by spatial_merge_size {m}; resize "
                    f"the item to multiples of patch_size * {m} pixels (the processor does)"
                )
            counts.append(t * h * w)
        return counts

    def num_tokens(self, visual: VisualInputs) -> list[int]:
        """Placeholder tokens per item: ``t * h * w // spatial_merge_size**2``."""
        return [n // self.config.unit_size for n in self._patches_per_item(visual)]

    def forward(self, features: torch.Tensor, visual: VisualInputs) -> torch.Tensor:
        """``features`` ``[patches, vision_hidden]`` (encoder order) -> ``[tokens, out_hidden]``."""
        patches = sum(self._patches_per_item(visual))
        width = self.config.vision_hidden_size
        if features.dim() != 2 or features.shape != (patches, width):
            raise ValueError(
                f"Qwen2_5VLPatchMerger: expected encoder features [{patches}, {width}] (the "
                f"patches of grid_thw {visual.grid_thw.tolist()} x vision_hidden_size), got "
                f"{tuple(features.shape)}; check that vision_hidden_size equals the encoder's "
                "hidden_size and that grid_thw belongs to these features"
            )
        units = self.norm(features).reshape(-1, width * self.config.unit_size)
        return self.fc2(F.gelu(self.fc1(units)))
