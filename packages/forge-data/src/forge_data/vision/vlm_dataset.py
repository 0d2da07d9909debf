"""Image-text and video-text samples from webdataset shards, ready for a vision-language model.

The shards are those of :class:`forge_data.multimodal.MultimodalDataset` (same sharding over
ranks and workers, seeded shuffling, and bad data counted in a ``BadDataReport`` and skipped, or
raised with ``on_error="raise"``). A sample's files:

* ``key.json`` with ``{"messages": [...]}`` (a conversation: string contents with ``<image>`` /
  ``<video>`` markers, or lists of ``{"type": "text" | "image" | "video"}`` parts; trained on
  assistant turns) or ``{"text": ...}`` (a caption or interleaved document, markers optional;
  trained on its text); an optional ``"fps"`` gives the frame rate of ``frames.npy``;
* or ``key.txt``: a caption;
* images ``key.jpg`` / ``key.0.png`` / ... (the i-th image placeholder is the i-th file in
  name order) and a video: a file ``key.mp4`` (decoded and sampled by ``config.video``, see
  :mod:`forge_data.video`; its sampled frame rate sets the video's time positions) or
  ``key.frames.npy`` (``T x H x W x C`` uint8, frames already sampled).

Each sample goes through the family's processor and placeholder expansion
(:mod:`forge_data.vision.placeholders`) to a dict with ``input_ids``, ``loss_mask``,
``block_ids`` (the item's index on its feature tokens, -1 on text) and ``visual`` (see
:func:`forge_data.vision.processing.concat_items`). A sample longer than ``seq_len`` is truncated
(``overlong="truncate"``) only when the cut keeps every placeholder whole, and skipped otherwise:
an item's feature count must match its placeholders.
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from forge_data.multimodal import (
    MEDIA_ERRORS,
    MultimodalConfig,
    MultimodalDataset,
    unread_members,
)
from forge_data.tokenizer import Tokenizer
from forge_data.vision.placeholders import anchor_ids, encode_vlm_chat, encode_vlm_text
from forge_data.vision.processing import VisionProcessor, concat_items

__all__ = ["VLMDataset"]


class VLMDataset(MultimodalDataset):
    """Tokenized, processed VLM samples of webdataset shards (see the module doc).

    ``tokenizer`` must hold the processor's placeholder tokens as single tokens (a model's own
    tokenizer does; see :func:`forge_data.vision.placeholders.with_vision_tokens`).
    """

    def __init__(
        self,
        config: MultimodalConfig,
        tokenizer: Tokenizer,
        processor: VisionProcessor,
        *,
        system_prompt: str | None = None,
    ):
        if config.image_size is not None:
            raise ValueError(
                "MultimodalConfig.image_size must be None for VLM samples: the processor "
                "resizes images as the model expects"
            )
        super().__init__(config, tokenizer)
        anchor_ids(tokenizer, processor.style)  # fail early if the tokens are missing
        self.processor = processor
        self.system_prompt = system_prompt

    def _image(self, data: bytes) -> Any:
        from PIL import Image

        image = Image.open(io.BytesIO(data))
        image.load()  # decode now, so a broken file is reported here
        return image

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        out: dict[str, Any] = {"key": raw.get("__key__"), "url": raw.get("__url__")}
        try:
            media = self._media(raw)
        except MEDIA_ERRORS as err:
            self._fail("undecodable media", where, f"{type(err).__name__}: {err}")
            return None
        try:
            record = self._record(raw)
        except (ValueError, UnicodeDecodeError) as err:
            self._fail("undecodable text", where, str(err))
            return None
        if record is None:
            self._fail(
                "no text", where, f"files: {sorted(k for k in raw if not k.startswith('__'))}"
            )
            return None
        images = media.get("images", [])
        videos = [media["frames"]] if "frames" in media else []
        try:
            items = self.processor.process(
                images, videos, video_fps=[media.get("video_fps", record.get("fps"))] * len(videos)
            )
        except ValueError as err:
            self._fail("unusable media", where, str(err))
            return None
        by_kind = {k: [it for it in items if it.kind == k] for k in ("image", "video")}
        try:
            if "messages" in record:
                sample = encode_vlm_chat(
                    self.tokenizer,
                    record["messages"],
                    self.processor.style,
                    images=by_kind["image"],
                    videos=by_kind["video"],
                    template=self.config.chat_template,
                    system_prompt=self.system_prompt,
                )
            else:
                sample = encode_vlm_text(
                    self.tokenizer,
                    record["text"],
                    self.processor.style,
                    images=by_kind["image"],
                    videos=by_kind["video"],
                )
        except ValueError as err:
            unread = unread_members(raw)
            if unread:  # the likely cause: an image the reader did not take for one
                self._fail("unknown member type", where, f"{unread} ({err})")
            else:
                self._fail("placeholder mismatch", where, str(err))
            return None
        ids, mask, blocks = sample.input_ids, sample.loss_mask, sample.block_ids
        if not ids:
            self._fail("empty text", where)
            return None
        n = self.config.seq_len
        if len(ids) > n:
            visual_end = max((i + 1 for i, b in enumerate(blocks) if b >= 0), default=0)
            if self.config.overlong == "skip" or visual_end > n:
                self._fail("over-long sample", where, f"{len(ids)} > seq_len={n}")
                return None
            self.report.add("truncated sample", where, f"{len(ids)} -> {n}")
            ids, mask, blocks = ids[:n], mask[:n], blocks[:n]
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        out["loss_mask"] = torch.tensor(mask, dtype=torch.uint8)
        out["block_ids"] = torch.tensor(blocks, dtype=torch.long)
        out["visual"] = concat_items(sample.items)
        if "actions" in media:
            out["actions"] = media["actions"]
        return out

    def _record(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """``{"messages": ...}`` or ``{"text": ...}`` (plus ``fps``) of a sample, None if it has
        no text file."""
        if "json" in raw:
            try:
                record = json.loads(raw["json"])
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid json: {err}") from err
            if not isinstance(record, dict):
                raise ValueError("the json file must hold an object")
            if "messages" in record or isinstance(record.get("text"), str):
                return record
            raise ValueError("json has neither 'messages' nor a string 'text'")
        if "txt" in raw:
            return {"text": raw["txt"].decode("utf-8")}
        return None
