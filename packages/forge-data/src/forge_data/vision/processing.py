"""Processed visual items and the interface every VLM processor implements.

A processor turns one image or one video into a :class:`VisualItem`: its pixel tensors under the
field names of ``forge_models.vlm.inputs.VisualInputs`` (``pixel_values``, ``grid_thw``,
``tiles_per_item``, ``image_sizes``), how many placeholder tokens it takes in the text, and the
lengths of the attention sequences its vision encoder runs (for the cost model). Items are kept
in the order their placeholders appear in the token stream, and :func:`concat_items` joins them
per *stream*: the ``VisualInputs`` they feed (``"image"`` or ``"video"``; InternVL feeds video
frames through the image stream, as its reference model does).

forge-data does not import forge-models; the model side builds its inputs with
``VisualInputs(**visual["image"], kind="image")`` (and the same for ``"video"``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from forge_data.vision.placeholders import PlaceholderStyle

__all__ = ["VISUAL_FIELDS", "VisionProcessor", "VisualItem", "concat_items", "concat_visuals"]

Kind = Literal["image", "video"]
VISUAL_FIELDS = ("pixel_values", "grid_thw", "tiles_per_item", "image_sizes")


@dataclass(frozen=True, kw_only=True)
class VisualItem:
    """One processed image or video.

    Attributes:
        kind: which placeholder it has in the text (``"image"`` or ``"video"``).
        stream: which ``VisualInputs`` its pixels join (``"image"`` or ``"video"``).
        fields: ``VisualInputs`` fields of this single item (per-item fields have 1 row).
        num_tokens: feature (placeholder) tokens it takes in the text.
        frames: frames after processing (1 for images); InternVL labels each frame.
        encoder_seqlens: patches in each attention sequence the vision encoder runs on it
            (one per tile, or per temporal patch group).
        extras: per-item scalars some models need besides ``VisualInputs`` (Qwen2.5-VL:
            ``second_per_grid_ts``, seconds per temporal patch of a video).
    """

    kind: Kind
    stream: Kind
    fields: Mapping[str, torch.Tensor]
    num_tokens: int
    frames: int = 1
    encoder_seqlens: tuple[int, ...] = ()
    extras: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("image", "video") or self.stream not in ("image", "video"):
            raise ValueError(f"kind and stream must be 'image' or 'video', got {self.kind!r}")
        unknown = set(self.fields) - set(VISUAL_FIELDS)
        if unknown:
            raise ValueError(f"unknown visual fields {sorted(unknown)}: use {VISUAL_FIELDS}")
        if "pixel_values" not in self.fields:
            raise ValueError("a visual item needs pixel_values")
        if self.num_tokens < 1 or self.frames < 1:
            raise ValueError(
                f"an item needs >= 1 token and frame, got {self.num_tokens}, {self.frames}"
            )


#: Pixel settings every reference image processor shares (``preprocessor_config.json`` keys).
COMMON_PIXEL_KEYS = ("rescale_factor", "resample", "do_resize", "do_rescale", "do_normalize")


def hf_processor_settings(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The set ``keys`` of a ``preprocessor_config.json`` dict, plus ``image_mean`` /
    ``image_std`` as tuples: the keyword arguments of a processor's ``from_hf``."""
    kw = {key: config[key] for key in keys if config.get(key) is not None}
    for key in ("image_mean", "image_std"):
        if config.get(key) is not None:
            kw[key] = tuple(config[key])
    return kw


def concat_items(items: Sequence[VisualItem]) -> dict[str, Any]:
    """Join items (in placeholder order) into per-stream ``VisualInputs`` fields.

    Returns ``{"image": {...}, "video": {...}}`` (streams with items only), ``num_tokens`` (int64
    ``[items]``), ``encoder_seqlens`` (int64, all items' sequences in order) and each extra as a
    float32 tensor over the items that have it.
    """
    out: dict[str, Any] = {}
    for stream in ("image", "video"):
        mine = [it for it in items if it.stream == stream]
        if not mine:
            continue
        names = set(mine[0].fields)
        if any(set(it.fields) != names for it in mine):
            raise ValueError(f"{stream} items of one batch must have the same fields")
        out[stream] = {
            n: torch.cat([it.fields[n] for it in mine]) for n in VISUAL_FIELDS if n in names
        }
    out["num_tokens"] = torch.tensor([it.num_tokens for it in items], dtype=torch.long)
    out["encoder_seqlens"] = torch.tensor(
        [n for it in items for n in it.encoder_seqlens], dtype=torch.long
    )
    for name in sorted({k for it in items for k in it.extras}):
        out[name] = torch.tensor(
            [it.extras[name] for it in items if name in it.extras], dtype=torch.float32
        )
    return out


def concat_visuals(visuals: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Join outputs of :func:`concat_items` (several samples, in order) into one."""
    out: dict[str, Any] = {}
    for stream in ("image", "video"):
        parts = [v[stream] for v in visuals if stream in v]
        if parts:
            out[stream] = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    keys = {k for v in visuals for k in v} - {"image", "video"}
    for name in sorted(keys):
        parts = [v[name] for v in visuals if name in v]
        out[name] = torch.cat(parts)
    out.setdefault("num_tokens", torch.zeros(0, dtype=torch.long))
    out.setdefault("encoder_seqlens", torch.zeros(0, dtype=torch.long))
    return out


class VisionProcessor(ABC):
    """Images and videos to :class:`VisualItem` the way one model family's reference does.

    Subclasses set :attr:`style` (how the family writes placeholders) and implement
    :meth:`image` and :meth:`video`.
    """

    style: ClassVar[PlaceholderStyle]

    @abstractmethod
    def image(self, image: Any) -> VisualItem:
        """Process one image: a PIL image or an ``(H, W, C)`` uint8 array."""

    @abstractmethod
    def video(self, frames: Any, *, fps: float | None = None) -> VisualItem:
        """Process one video: ``(T, H, W, C)`` uint8 frames (already sampled); ``fps`` is the
        rate of those frames (``None``: the processor's default)."""

    def sample_image(self, image: Any, *, num_images: int) -> VisualItem:
        """Process one of the ``num_images`` images of a sample (families that treat samples
        with several images differently override this)."""
        return self.image(image)

    def __call__(
        self,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        order: Sequence[Kind] | None = None,
        video_fps: Sequence[float | None] | None = None,
    ) -> dict[str, Any]:
        """Process the images and videos of one sample and join them (see :func:`concat_items`).

        ``order`` lists the kinds in placeholder order (default: all images, then all videos);
        the i-th ``"image"`` in it is ``images[i]``.
        """
        items = self.process(images, videos, order=order, video_fps=video_fps)
        return concat_items(items)

    def process(
        self,
        images: Sequence[Any] = (),
        videos: Sequence[Any] = (),
        *,
        order: Sequence[Kind] | None = None,
        video_fps: Sequence[float | None] | None = None,
    ) -> list[VisualItem]:
        """The items of :meth:`__call__`, before joining, in placeholder order."""
        if order is None:
            order = ["image"] * len(images) + ["video"] * len(videos)
        order = list(order)
        if set(order) - {"image", "video"}:
            raise ValueError(f"order holds kinds 'image' / 'video' only, got {sorted(set(order))}")
        if order.count("image") != len(images) or order.count("video") != len(videos):
            raise ValueError(
                f"order has {order.count('image')} images and {order.count('video')} videos "
                f"but {len(images)} images and {len(videos)} videos were given"
            )
        if video_fps is not None and len(video_fps) != len(videos):
            raise ValueError(f"video_fps has {len(video_fps)} entries for {len(videos)} videos")
        done_images = [self.sample_image(im, num_images=len(images)) for im in images]
        done_videos = [
            self.video(v, fps=None if video_fps is None else video_fps[i])
            for i, v in enumerate(videos)
        ]
        by_kind = {"image": iter(done_images), "video": iter(done_videos)}
        return [next(by_kind[k]) for k in order]
