"""The visual part of a vision-language batch, shared by every encoder and projector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch

__all__ = ["VisualInputs"]


@dataclass(frozen=True, eq=False, kw_only=True)
class VisualInputs:
    """The visual items (images or videos) of one batch, in the order their placeholder tokens
    appear in the token stream.

    Each encoder documents which fields it reads and the layout of ``pixel_values`` it expects
    (forge-data's processors produce them); a missing field is a ``ValueError`` there.

    Attributes:
        pixel_values: the pixels, in the encoder's layout (Qwen2.5-VL: flattened patches
            ``[patches, C * T * P * P]``; SigLIP / InternViT: tiles ``[tiles, C, H, W]``).
        grid_thw: int64 ``[items, 3]``: each item's (temporal, height, width) size in encoder
            patches (variable-resolution encoders).
        tiles_per_item: int64 ``[items]``: how many tiles / crops / frames of ``pixel_values``
            belong to each item (InternVL dynamic tiling, LLaVA-OneVision anyres crops).
        image_sizes: int64 ``[items, 2]``: each item's original (height, width) in pixels
            (LLaVA-OneVision unpadding).
        kind: ``"image"`` or ``"video"``: which placeholder token the items replace.
        second_per_grid_ts: float ``[items]``: seconds per temporal patch of each video
            (Qwen2.5-VL's M-RoPE time alignment; default 1).
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor | None = None
    tiles_per_item: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None
    kind: Literal["image", "video"] = "image"
    second_per_grid_ts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("image", "video"):
            raise ValueError(f"VisualInputs.kind must be 'image' or 'video', got {self.kind!r}")
        for name in ("grid_thw", "tiles_per_item", "image_sizes"):
            value = getattr(self, name)
            if value is not None and value.dtype.is_floating_point:
                raise ValueError(
                    f"VisualInputs.{name} must be an integer tensor, got {value.dtype}"
                )
        if self.grid_thw is not None and (self.grid_thw.dim() != 2 or self.grid_thw.shape[1] != 3):
            raise ValueError(
                f"VisualInputs.grid_thw must be [items, 3] (t, h, w), got {tuple(self.grid_thw.shape)}"
            )

    @property
    def num_items(self) -> int:
        """How many images / videos (from whichever per-item field is set)."""
        for value in (self.grid_thw, self.tiles_per_item, self.image_sizes):
            if value is not None:
                return int(value.shape[0])
        return int(self.pixel_values.shape[0])

    def require(self, *names: str, who: str) -> None:
        """Raise ``ValueError`` if any of the fields ``names`` is ``None`` (``who`` needs them)."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"{who} needs VisualInputs.{', '.join(missing)}; the processor of this model "
                "family produces it (see forge_data.vision)"
            )

    @staticmethod
    def join(inputs: Sequence[VisualInputs]) -> VisualInputs:
        """The items of several inputs as one, in order: what a single encoder call takes for a
        micro-batch's images and videos together
        (:meth:`forge_models.vlm.VisionLanguageModel.encode_visual`).

        ``pixel_values`` are concatenated (they must share the encoder's per-row layout, as a
        family's processor makes them for images and video frames), and so is each per-item
        field that every input has (one missing anywhere: ``None``). ``kind`` is the first
        input's: encoders read no kind, and a projector that does gets each input apart."""
        if not inputs:
            raise ValueError("VisualInputs.join needs at least one input")
        shapes = {tuple(v.pixel_values.shape[1:]) for v in inputs}
        if len(shapes) > 1:
            described = ", ".join(f"{v.kind}s {list(v.pixel_values.shape[1:])}" for v in inputs)
            raise ValueError(
                f"VisualInputs.join: the inputs' pixel_values rows differ ({described}), so one "
                "encoder call cannot take them; give images and video frames in the encoder's "
                "one layout (the family's processor does: video frames resized to its tile / "
                "patch size)"
            )

        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(v, name) for v in inputs]
            return None if any(t is None for t in values) else torch.cat(values)

        return VisualInputs(
            pixel_values=torch.cat([v.pixel_values for v in inputs]),
            grid_thw=cat("grid_thw"),
            tiles_per_item=cat("tiles_per_item"),
            image_sizes=cat("image_sizes"),
            kind=inputs[0].kind,
            second_per_grid_ts=cat("second_per_grid_ts"),
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        """A copy on ``device``; ``dtype`` applies to ``pixel_values`` only."""

        def move(t):
            return None if t is None else t.to(device)

        return replace(
            self,
            pixel_values=self.pixel_values.to(device=device, dtype=dtype),
            grid_thw=move(self.grid_thw),
            tiles_per_item=move(self.tiles_per_item),
            image_sizes=move(self.image_sizes),
        )
