"""Multimodal samples (text + images / video frames / action arrays) from webdataset shards.

A sample is the group of files sharing a key in a tar shard (the webdataset convention,
Breuel et al., github.com/webdataset): ``key.txt`` (text) or ``key.json`` (``{"text": ...}`` or a
chat ``{"messages": [...]}``), any number of images ``key.jpg`` / ``key.png`` / ``key.0.jpg`` ...,
a video, either as a file ``key.mp4`` (also ``.mkv`` / ``.webm`` / ``.mov``; decoded with PyAV, the
``[video]`` extra, and sampled by :class:`~forge_data.video.FrameSampling`, see
:mod:`forge_data.video`) or as frames already sampled, ``key.frames.npy`` (``T x H x W x C``
uint8), and actions ``key.actions.npy`` (``T x action_dim``). Shards are local paths or anything webdataset opens (``http(s)://``,
``pipe:``, and fsspec URLs such as ``s3://`` / ``gs://`` with the matching fsspec backend).

Shards are shuffled per epoch with the seed, split over data-parallel ranks (passed explicitly;
the shard count must be a multiple of ``dp_size``, so every rank reads as many shards) and then
over DataLoader workers; samples go through a seeded shuffle buffer. :meth:`set_epoch` reaches
DataLoader workers, persistent ones included (the epoch is held in shared memory). Equal shard
counts give equal sample counts only when every shard holds as many usable samples: write shards
of equal size, and stop a data-parallel epoch after a fixed number of steps rather than at the
first rank to run dry (a rank that stops early leaves the others waiting in a collective).

Bad data never crashes a run silently: a corrupt shard (truncated, even exactly between two
members, or malformed: see :mod:`forge_data.tar_shards`), an undecodable image, video or array,
an empty text and a text longer than ``seq_len`` are counted in :class:`BadDataReport` with their
location and logged, and skipped (or truncated, for long texts); ``on_error="raise"`` stops at the
first one instead. A corrupt shard counts once, under its URL, and the sample being assembled
when it failed is dropped (the samples before it are complete and kept). Counts are per process:
with DataLoader workers each worker logs its own.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from forge_data.tar_shards import ShardError, expand_shard_urls, tar_samples
from forge_data.tokenizer import Tokenizer
from forge_data.video import VIDEO_EXTENSIONS, FrameSampling, decode_video

__all__ = ["BadDataReport", "MultimodalConfig", "MultimodalDataset", "unread_members"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
# What decoding a broken file raises: PIL raises UnidentifiedImageError (an OSError) or
# SyntaxError on broken headers, numpy ValueError, forge_data.video VideoDecodeError (a ValueError).
MEDIA_ERRORS = (OSError, ValueError, SyntaxError)


@dataclass
class BadDataReport:
    """Counts of skipped / truncated samples by reason, and their first locations.

    ``log``: whether :meth:`add` logs a warning for each one. Ranks that read the same data
    (the tensor-, context- or pipeline-parallel peers of one data-parallel rank) each count
    it, but only one of them need say so: the others pass ``log=False`` (the counts and
    records are the same either way)."""

    counts: dict[str, int] = field(default_factory=dict)
    records: list[dict[str, str]] = field(default_factory=list)
    max_records: int = 1000
    log: bool = True

    def add(self, reason: str, location: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.records) < self.max_records:
            self.records.append({"reason": reason, "location": location, "detail": detail})
        if self.log:
            log.warning("%s at %s %s", reason, location, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True, kw_only=True)
class MultimodalConfig:
    """``urls``: shard list or brace pattern (``"data/shard-{000..099}.tar"``); ``video``: which
    frames of a video file to keep (default: 2 per second, Qwen2-VL's policy)."""

    urls: str | Sequence[str]
    seq_len: int
    dp_rank: int = 0
    dp_size: int = 1
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 0
    chat_template: str | None = None
    overlong: Literal["truncate", "skip"] = "truncate"
    on_error: Literal["skip", "raise"] = "skip"
    image_size: tuple[int, int] | None = None
    video: FrameSampling = field(default_factory=FrameSampling)

    def __post_init__(self):
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.dp_size < 1 or not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got {self.dp_rank}, {self.dp_size}")
        if self.overlong not in ("truncate", "skip"):
            raise ValueError(f"overlong must be 'truncate' or 'skip', got {self.overlong!r}")
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


class BadSampleError(ValueError):
    """A sample or shard could not be used and ``on_error="raise"``."""


class MultimodalDataset(torch.utils.data.IterableDataset):
    """Decoded, tokenized samples of webdataset shards (see the module doc)."""

    def __init__(self, config: MultimodalConfig, tokenizer: Tokenizer):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        urls = config.urls if isinstance(config.urls, str) else list(config.urls)
        self.urls = expand_shard_urls(urls) if isinstance(urls, str) else urls
        _check_shard_split(len(self.urls), config.dp_size)
        # In shared memory, so that set_epoch reaches DataLoader workers, which hold copies of
        # this dataset (persistent workers keep theirs from epoch to epoch).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.report = BadDataReport()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Shard order and shuffle buffer follow ``(seed, epoch)``; call it before iterating
        (before ``iter(loader)`` with a DataLoader)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    # -- shard selection ----------------------------------------------------------------------
    def shards(self, epoch: int | None = None) -> list[str]:
        """This rank's and this DataLoader worker's shards for ``epoch`` (default: the
        current one)."""
        epoch = self.epoch if epoch is None else epoch
        urls = list(self.urls)
        if self.config.shuffle_shards:
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(urls))
            urls = [urls[i] for i in order]
        mine = urls[self.config.dp_rank :: self.config.dp_size]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            if len(mine) < info.num_workers:
                raise ValueError(
                    f"rank {self.config.dp_rank} has {len(mine)} shards for {info.num_workers} "
                    "DataLoader workers: use fewer workers or more shards"
                )
            mine = mine[info.id :: info.num_workers]
        return mine

    # -- iteration ----------------------------------------------------------------------------
    def _fail(self, reason: str, location: str, detail: str = "") -> None:
        if self.config.on_error == "raise":
            raise BadSampleError(f"{reason} at {location}: {detail} (on_error='skip' skips it)")
        self.report.add(reason, location, detail)

    def _raw_samples(self, urls: list[str]) -> Iterator[dict[str, Any]]:
        """The complete samples of ``urls`` in order; a damaged shard is counted once (or
        raises) and its samples up to the damage are kept."""
        for url in urls:
            damage = None
            try:
                yield from tar_samples(url)
            except ShardError as err:
                damage = str(err)
            if damage is not None:  # outside the except: a raised error is not nested in it
                self._fail("corrupt shard", url, damage)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        epoch = self.epoch
        samples: Iterator[dict[str, Any]] = self._raw_samples(self.shards(epoch))
        if self.config.shuffle_buffer:
            key = [self.config.seed, epoch, self.config.dp_rank, worker]
            seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            shuffle = wds.shuffle(
                self.config.shuffle_buffer, initial=self.config.shuffle_buffer, seed=seed
            )
            samples = shuffle(samples)
        for raw in samples:
            sample = self._decode(raw)
            if sample is not None:
                yield sample

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """One raw sample of :func:`forge_data.tar_shards.tar_samples` decoded as
        :meth:`__iter__` decodes it, or ``None`` when it is bad (counted in :attr:`report`, or
        raised with ``on_error="raise"``): for a reader that walks the shards itself, e.g. a
        resumable loader that skips the raw samples it has read without decoding them."""
        return self._decode(raw)

    def shard_failed(self, url: str, error: Exception) -> None:
        """Count a damaged shard (a :class:`~forge_data.tar_shards.ShardError` of
        ``tar_samples(url)``) once, as :meth:`__iter__` does, or raise per ``on_error``."""
        self._fail("corrupt shard", url, str(error))

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        where = f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"
        out: dict[str, Any] = {"key": raw.get("__key__"), "url": raw.get("__url__")}
        try:
            ids, mask = self._text(raw)
        except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as err:
            self._fail("undecodable text", where, str(err))
            return None
        if ids is None:
            self._fail(
                "no text", where, f"files: {sorted(k for k in raw if not k.startswith('__'))}"
            )
            return None
        if len(ids) == 0:
            self._fail("empty text", where)
            return None
        if len(ids) > self.config.seq_len:
            if self.config.overlong == "skip":
                self._fail("over-long sample", where, f"{len(ids)} > seq_len={self.config.seq_len}")
                return None
            self.report.add("truncated sample", where, f"{len(ids)} -> {self.config.seq_len}")
            ids, mask = (
                ids[: self.config.seq_len],
                None if mask is None else mask[: self.config.seq_len],
            )
        out["input_ids"] = torch.tensor(ids, dtype=torch.long)
        if mask is not None:
            out["loss_mask"] = torch.tensor(mask, dtype=torch.uint8)
        try:
            out.update(self._media(raw))
        except MEDIA_ERRORS as err:
            self._fail("undecodable media", where, f"{type(err).__name__}: {err}")
            return None
        return out

    def _media(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Decoded ``images`` (in file-name order, numbers compared as numbers: ``key.2.jpg``
        before ``key.10.jpg``), video ``frames`` (``T x H x W x C`` uint8; from a video file also
        ``video_fps``, the rate of the sampled frames, and ``frame_times``, their timestamps in
        seconds) and ``actions`` of a raw sample; raises one of :data:`MEDIA_ERRORS` on
        undecodable data."""
        out: dict[str, Any] = {}
        images = sorted((k for k in raw if k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS), key=_natural)
        if images:
            out["images"] = [self._image(raw[k]) for k in images]
        videos = [k for k in raw if k.rsplit(".", 1)[-1] in VIDEO_EXTENSIONS]
        if len(videos) + ("frames.npy" in raw) > 1:
            found = sorted([*videos, *(["frames.npy"] if "frames.npy" in raw else [])])
            raise ValueError(f"a sample holds at most one video, found {found}")
        if videos:
            video = decode_video(raw[videos[0]], self.config.video)
            out["frames"] = torch.from_numpy(video.frames)
            out["video_fps"] = video.sampled_fps
            out["frame_times"] = torch.from_numpy(video.timestamps)
        if "frames.npy" in raw:
            out["frames"] = torch.from_numpy(_npy(raw["frames.npy"], ndim=4, dtype=np.uint8))
        if "actions.npy" in raw:
            out["actions"] = torch.from_numpy(_npy(raw["actions.npy"], ndim=2).astype(np.float32))
        return out

    def _text(self, raw: dict[str, Any]) -> tuple[list[int] | None, list[int] | None]:
        from forge_data.chat import encode_chat

        if "txt" in raw:
            return self.tokenizer.encode(raw["txt"].decode("utf-8")), None
        if "json" in raw:
            record = json.loads(raw["json"])
            if "messages" in record:
                sample = encode_chat(
                    self.tokenizer, record["messages"], template=self.config.chat_template
                )
                return sample.input_ids, sample.loss_mask
            if isinstance(record.get("text"), str):
                return self.tokenizer.encode(record["text"]), None
            raise ValueError("json has neither 'messages' nor a string 'text'")
        return None, None

    def _image(self, data: bytes) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            if self.config.image_size is not None:
                im = im.resize(self.config.image_size[::-1], Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)  # C x H x W uint8


def _check_shard_split(num_shards: int, dp_size: int) -> None:
    """Every rank must read as many shards (else one runs dry first and the others wait)."""
    if num_shards == 0:
        raise ValueError("no shards: urls is empty")
    if num_shards % dp_size == 0:
        return
    divisors = [d for d in range(1, num_shards + 1) if num_shards % d == 0]
    lower, upper = num_shards - num_shards % dp_size, num_shards - num_shards % dp_size + dp_size
    shard_counts = " or ".join(str(n) for n in (lower, upper) if n > 0)
    raise ValueError(
        f"{num_shards} shards do not split evenly over dp_size={dp_size} ranks: write a "
        f"multiple of {dp_size} shards (e.g. {shard_counts}, of equal size) or use a dp_size "
        f"that divides {num_shards}: one of {divisors}"
    )


#: Member names (after the sample key) the readers use besides images and videos.
OTHER_MEMBERS = ("txt", "json", "frames.npy", "actions.npy")


def unread_members(raw: dict[str, Any]) -> str:
    """A sentence naming the members of a raw sample that no reader reads (an image saved as
    ``key.webp2``, a typo'd extension), or ``""``: said where the sample then fails (its
    image placeholders find fewer images), since the member is otherwise silently passed
    over."""
    known = set(IMAGE_EXTENSIONS) | set(VIDEO_EXTENSIONS)
    odd = sorted(
        k
        for k in raw
        if not k.startswith("__") and k not in OTHER_MEMBERS and k.rsplit(".", 1)[-1] not in known
    )
    if not odd:
        return ""
    key = raw.get("__key__", "key")
    names = ", ".join(f"{key}.{k}" for k in odd)
    return (
        f"member(s) {names} not read: the extension is not one this reader reads (images: "
        f"{', '.join(IMAGE_EXTENSIONS)}; videos: {', '.join(VIDEO_EXTENSIONS)}; also "
        f"{', '.join(OTHER_MEMBERS)}); rename an image to its type's extension"
    )


def _natural(name: str) -> list[Any]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name)]


def _npy(data: bytes, *, ndim: int, dtype=None) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-D array, got shape {arr.shape}")
    if dtype is not None and arr.dtype != dtype:
        raise ValueError(f"expected dtype {np.dtype(dtype)}, got {arr.dtype}")
    return arr
