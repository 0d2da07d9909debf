"""Image-caption data for a vision-language run (``data=skimage-captions``): scikit-image's
bundled sample images, each with a caption derived from its name, as a webdataset shard.

On first use rank 0 writes ``skimage-captions-<version>/shard-000000.tar`` under the run's data
cache (as the standard-library BPE data is cached); every rank then reads it with
:class:`forge_data.vision.VLMDataset` and the processor of the model's family, chosen from its
projector and sized from its encoder (:mod:`forge_train.vlm_processing`: InternVL tiles,
Qwen2-VL dynamic resolution or LLaVA-OneVision AnyRes, each with its own placeholders).
Samples are packed into rows with :func:`forge_data.vision.pack_vlm_samples` and batched by
:func:`collate_micro_batches` (:func:`forge_data.vision.collate_vlm`, plus Qwen2-VL's 3-D M-RoPE
positions, :func:`forge_models.vlm.mrope.mrope_position_ids`, per packed document, for a model
that uses them, and a stand-in image for a micro-batch without any); :class:`VLMLoader` yields
each optimizer step's micro-batches, like ``forge_data.PackedLoader``. The user's own shards
(``data.kind=vlm_shards``) are streamed by :mod:`forge_train.vlm_stream` through the same
collation.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from forge_train.config import ConfigError, DataConfig
from forge_train.vlm_processing import build_processor, mrope_settings, placeholder_style

__all__ = [
    "CAPTIONS",
    "VLMLoader",
    "VLMSamples",
    "build_caption_data",
    "collate_micro_batches",
    "dummy_visual",
    "mrope_positions",
    "placeholder_style",
    "sample_pieces",
    "vlm_model_inputs",
    "write_skimage_shard",
]

#: ``skimage.data`` loader -> caption. All ship with scikit-image (no download).
CAPTIONS = {
    "astronaut": "a photo of an astronaut",
    "camera": "a photo of a cameraman",
    "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket",
    "horse": "a silhouette of a horse",
    "brick": "a photo of a brick wall",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
    "moon": "a photo of the moon",
    "page": "a scan of a printed page",
    "text": "a photo of text",
    "clock": "a photo of a clock",
    "coins": "a photo of coins",
    "hubble_deep_field": "a photo of galaxies",
    "immunohistochemistry": "a microscope image of tissue",
    "logo": "a logo",
    "colorwheel": "a color wheel",
    "microaneurysms": "a photo of a retina",
    "checkerboard": "a checkerboard",
}
#: Bump when the shard's contents change, so cached shards are rewritten.
SHARD_VERSION = "v1"
#: Longest image side stored in the shard (the processor resizes to tiles anyway).
MAX_SIDE = 256


def _skimage_data():
    try:
        import skimage.data
    except ImportError as exc:
        raise ImportError(
            "data=skimage-captions needs scikit-image: pip install 'forge-train[vlm-demo]'"
        ) from exc
    return skimage.data


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array).convert("RGB")
    image.thumbnail((MAX_SIDE, MAX_SIDE))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_skimage_shard(path: Path) -> int:
    """Write the captioned sample images to the webdataset tar ``path`` (``<name>.png`` and
    ``<name>.txt`` per sample); returns how many samples it holds."""
    data = _skimage_data()
    with tarfile.open(path, "w") as tar:
        for i, (name, caption) in enumerate(CAPTIONS.items()):
            for ext, payload in (("png", _png(getattr(data, name)())), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:04d}_{name}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return len(CAPTIONS)


def _cached_shard(root: Path) -> Path:
    """The shard under ``root`` (rank 0 writes it on first use, the others wait)."""
    folder = root / f"skimage-captions-{SHARD_VERSION}"
    shard = folder / "shard-000000.tar"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and not shard.exists():
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        write_skimage_shard(tmp / shard.name)
        try:
            tmp.replace(folder)
        except OSError:  # another run cached it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return shard


def dummy_visual(processor) -> dict[str, Any]:
    """The processed visual fields of one small black image (``concat_items``' layout), in the
    layout the model's encoder reads: what a micro-batch without images or videos passes as
    ``dummy_visual`` (see :meth:`forge_models.vlm.VisionLanguageModel.forward`), so that its
    rank runs the encoder as the others do. The processor makes it, so it fits every family
    (InternVL tiles, Qwen2-VL patches, LLaVA-OneVision crops) without model-specific code."""
    from PIL import Image

    return processor([Image.new("RGB", (28, 28))])


@dataclass
class VLMSamples:
    """Every processed sample of the shard, in memory (the demo set is a few dozen images).
    ``bidirectional``: the model's ``image_attention``; the batches carry ``block_ids`` (an
    image's tokens see each other) only then. ``mrope``: the model's arguments of
    :func:`forge_models.vlm.mrope.mrope_position_ids` (``None``: no M-RoPE). ``dummy``:
    :func:`dummy_visual` of the run's processor (``None``: a micro-batch without visual items
    runs the language model alone)."""

    samples: list[dict[str, Any]]
    seq_len: int
    bidirectional: bool
    mrope: dict[str, Any] | None = None
    dummy: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.samples)


def build_caption_data(config: DataConfig, tokenizer, model_config, cache_root: Path):
    """``(train samples, description)`` of the scikit-image captions for ``model_config``."""
    from forge_data.multimodal import MultimodalConfig
    from forge_data.vision import VLMDataset

    shard = _cached_shard(cache_root)
    dataset = VLMDataset(
        MultimodalConfig(
            urls=[str(shard)], seq_len=config.seq_len, shuffle_shards=False, on_error="raise"
        ),
        tokenizer,
        build_processor(model_config, config),
    )
    samples = list(dataset)
    if not samples:
        raise ConfigError(f"data.kind=skimage_captions: no usable samples in {shard}")
    what = f"{len(samples)} captioned scikit-image sample images ({shard})"
    bidirectional = model_config.image_attention == "bidirectional"
    data = VLMSamples(
        samples,
        config.seq_len,
        bidirectional,
        mrope_settings(model_config),
        dummy_visual(dataset.processor),
    )
    return data, what


def collate_micro_batches(
    rows: list[list[dict[str, Any]]],
    data: Any,
    *,
    micro_batch_rows: int,
    pad_id: int,
    identities: list[list[tuple[int, int]]] | None = None,
) -> list[dict[str, Any]]:
    """This rank's micro-batches of one step from its packed ``rows`` (lists of samples), for
    both VLM data kinds (``data``: a :class:`VLMSamples` or a
    :class:`forge_train.vlm_stream.VLMShardData`, whose ``seq_len``, ``bidirectional``,
    ``mrope`` and ``dummy`` it reads): :func:`forge_data.vision.collate_vlm` per
    ``micro_batch_rows`` rows, ``block_ids`` kept only for bidirectional image attention, the
    M-RoPE positions added for a model with ``mrope`` settings, and ``dummy``
    (:func:`dummy_visual`) as ``batch["dummy_visual"]`` on a micro-batch with neither images
    nor videos. With ``identities`` (per row, each sample's ``(epoch, sample id)``: what the
    loader knows it by, the same whatever the data-parallel split or micro-batching) each
    micro-batch carries the keys of its LoRA dropout masks (:mod:`forge_train.lora_dropout`):
    :func:`sample_pieces`' ``pieces`` and ``visual_pieces``."""
    from forge_data.vision import collate_vlm

    batches = [
        collate_vlm(rows[i : i + micro_batch_rows], seq_len=data.seq_len, pad_id=pad_id)
        for i in range(0, len(rows), micro_batch_rows)
    ]
    if identities is not None:
        for batch, i in zip(batches, range(0, len(rows), micro_batch_rows), strict=True):
            pieces, visual = sample_pieces(
                rows[i : i + micro_batch_rows], identities[i : i + micro_batch_rows]
            )
            batch["pieces"], batch["visual_pieces"] = pieces, visual
    for batch in batches:
        if not data.bidirectional:
            del batch["block_ids"]
        if data.mrope is not None:
            batch["mrope_position_ids"] = mrope_positions(batch, data.mrope)
        visual = batch["visual"]
        if data.dummy is not None and "image" not in visual and "video" not in visual:
            batch["dummy_visual"] = data.dummy
    return batches


def sample_pieces(
    rows: list[list[dict[str, Any]]], identities: list[list[tuple[int, int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pieces, visual_pieces)`` of one micro-batch's packed ``rows`` of samples whose
    ``identities`` are ``(epoch, sample id)``: what the LoRA dropout masks are keyed by
    (:mod:`forge_train.lora_dropout`), int64 ``[n, 5]`` each. ``pieces``: ``(row, epoch,
    sample, 0, tokens)`` per sample, in row order, as forge_data's ``PackedLoader`` gives a
    language model's document pieces (a VLM sample is never split: its tokens start at 0).
    ``visual_pieces``: ``(stream, epoch, sample, 0, pixel rows)`` per sample and stream (0:
    the image stream, 1: the video stream) with ``pixel_values``, in the order the encoder
    reads them (:func:`forge_data.vision.collate_vlm` joins each stream's samples in row
    order, and the model encodes the images, then the videos)."""
    pieces, visual = [], []
    for r, (row, ids) in enumerate(zip(rows, identities, strict=True)):
        for sample, (epoch, doc) in zip(row, ids, strict=True):
            pieces.append((r, epoch, doc, 0, len(sample["input_ids"])))
    for stream, name in enumerate(("image", "video")):
        for row, ids in zip(rows, identities, strict=True):
            for sample, (epoch, doc) in zip(row, ids, strict=True):
                fields = sample.get("visual", {}).get(name)
                if fields is not None:
                    visual.append((stream, epoch, doc, 0, int(fields["pixel_values"].shape[0])))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64).reshape(-1, 5)  # noqa: E731
    return as_tensor(pieces), as_tensor(visual)


class VLMLoader:
    """Each ``next()`` is this rank's micro-batches of one optimizer step: ``global_batch_rows``
    packed rows, cut into ``micro_batch_rows`` per micro-batch and dealt over the data-parallel
    ranks. Every epoch packs the samples in a new seeded order (an endless stream);
    ``state_dict`` / ``load_state_dict`` resume it."""

    def __init__(
        self,
        data: VLMSamples,
        *,
        global_batch_rows: int,
        micro_batch_rows: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        pad_id: int,
        shuffle: bool = True,
    ) -> None:
        self.data = data
        self.rows_per_rank = global_batch_rows // dp_size
        self.micro_batch_rows = micro_batch_rows
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.pad_id, self.shuffle = pad_id, shuffle
        self.epoch, self.position = 0, 0
        self._rows: list[list[int]] | None = None

    def _epoch_rows(self) -> list[list[int]]:
        from forge_data.vision import pack_vlm_samples

        n = len(self.data)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        rows, _ = pack_vlm_samples(self.data.samples, seq_len=self.data.seq_len, order=order)
        if not rows:
            raise ConfigError(
                f"data.seq_len={self.data.seq_len}: no sample fits in a row; raise data.seq_len"
            )
        return rows

    def _next_row(self) -> tuple[int, list[int]]:
        """``(epoch, sample indices)`` of the next packed row."""
        if self._rows is None:
            self._rows = self._epoch_rows()
        if self.position >= len(self._rows):
            self.epoch, self.position = self.epoch + 1, 0
            self._rows = self._epoch_rows()
        row = self._rows[self.position]
        self.position += 1
        return self.epoch, row

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        rows = [self._next_row() for _ in range(self.rows_per_rank * self.dp_size)]
        # Contiguous, as forge_data's PackedLoader deals them: micro-batch i of rank r holds the
        # rows of the single process's micro-batch r x (rows_per_rank / micro_batch_rows) + i,
        # so a per-micro-batch statistic (a MoE balance loss) is the same at any dp size.
        start = self.dp_rank * self.rows_per_rank
        mine = rows[start : start + self.rows_per_rank]
        return collate_micro_batches(
            [[self.data.samples[i] for i in row] for _, row in mine],
            self.data,
            micro_batch_rows=self.micro_batch_rows,
            pad_id=self.pad_id,
            # a sample's identity: (epoch, its index in the set)
            identities=[[(epoch, i) for i in row] for epoch, row in mine],
        )

    def _pinned(self) -> dict[str, Any]:
        """What the sample order depends on (as forge_data's PackedLoader pins its own):
        ``micro_batch_rows`` and the data-parallel size may change on resume, these may not."""
        import hashlib

        digest = hashlib.sha256()
        for sample in self.data.samples:
            digest.update(f"{sample.get('key')}:{len(sample['input_ids'])};".encode())
        return {
            "seed": self.seed,
            "seq_len": self.data.seq_len,
            "global_batch_rows": self.rows_per_rank * self.dp_size,
            "shuffle": self.shuffle,
            "samples": digest.hexdigest()[:16],
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the stream; the same on every rank (stored once)."""
        return {"epoch": self.epoch, "position": self.position, "config": self._pinned()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._pinned()
        # (the states of earlier builds hold no "config": they resume unchecked, as before)
        for key, value in state.get("config", {}).items():
            if mine.get(key) != value:
                raise ValueError(
                    f"cannot resume: the checkpoint's image-caption loader has {key}={value!r} "
                    f"but this one {mine.get(key)!r}; the sample order depends on it "
                    "(data-parallel size and data.micro_batch_rows may change, it may not)"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._rows = self._epoch_rows()


def mrope_positions(batch: dict[str, Any], mrope: dict[str, Any]) -> torch.Tensor:
    """``[3, 1, tokens]`` M-RoPE positions of a collated batch, flattened into one packed row
    as :func:`forge_train.data.model_inputs` feeds it; each document's positions start at 0,
    as the reference (``Qwen2_5_VLModel.get_rope_index``) gives a sequence of its own."""
    from forge_models.vlm.mrope import mrope_position_ids

    visual = batch["visual"]
    image, video = visual.get("image"), visual.get("video")
    positions, _ = mrope_position_ids(
        batch["input_ids"].reshape(1, -1),
        image_grid_thw=None if image is None else image["grid_thw"],
        video_grid_thw=None if video is None else video["grid_thw"],
        second_per_grid_ts=visual.get("second_per_grid_ts"),
        cu_seqlens=batch["cu_seqlens"],
        **mrope,
    )
    return positions


def visual_inputs(stream: dict[str, Any], **extra: Any):
    """A collated micro-batch's image or video fields (``batch["visual"]["image"]``) as the
    model's :class:`forge_models.vlm.VisualInputs` (``extra``: ``kind="video"``, ...), on the
    host: what the model is given and what ``forge_train.throughput.VisualFlops`` counts."""
    from forge_models.vlm import VisualInputs

    fields = ("pixel_values", "grid_thw", "tiles_per_item", "image_sizes")
    values = {k: stream[k] for k in fields if stream.get(k) is not None}
    return VisualInputs(**values, **extra)


def _visual_inputs(stream: dict[str, Any], device: torch.device, **extra: Any):
    return visual_inputs(stream, **extra).to(device)


def vlm_model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The visual keyword arguments of :class:`forge_models.vlm.VisionLanguageModel` for one
    collated micro-batch (the text ones are :func:`forge_train.data.model_inputs`'): ``images``,
    ``videos`` (with Qwen2.5-VL's seconds per temporal patch), ``dummy_visual`` for a
    micro-batch with neither, and the 3-D ``position_ids`` in place of the text ones for a
    model with M-RoPE."""
    extra: dict[str, Any] = {}
    if "mrope_position_ids" in batch:
        extra["position_ids"] = batch["mrope_position_ids"].to(device, non_blocking=True)
    if "block_ids" in batch:
        extra["block_ids"] = batch["block_ids"].reshape(1, -1).to(device, non_blocking=True)
    visual = batch["visual"]
    if visual.get("image") is not None:
        extra["images"] = _visual_inputs(visual["image"], device)
    if visual.get("video") is not None:
        seconds = visual.get("second_per_grid_ts")
        extra["videos"] = _visual_inputs(
            visual["video"],
            device,
            kind="video",
            second_per_grid_ts=None if seconds is None else seconds.to(device),
        )
    if "dummy_visual" in batch:
        extra["dummy_visual"] = _visual_inputs(batch["dummy_visual"]["image"], device)
    return extra
