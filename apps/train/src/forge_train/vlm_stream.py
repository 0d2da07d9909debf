"""The user's own webdataset shards for a vision-language run (``data.kind=vlm_shards``),
streamed: nothing but a bounded buffer of samples is held in memory, so a set of millions of
samples trains as a demo set does.

A sample is the webdataset group of files sharing a key (decoded by
:class:`forge_data.vision.VLMDataset` with the model family's processor and placeholders,
:mod:`forge_train.vlm_processing`): a conversation ``key.json`` ``{"messages": [...]}`` (loss on
the assistant turns, ``<image>`` / ``<video>`` markers where the items go) or a caption
``key.txt`` / ``{"text": ...}``, beside any number of images ``key.jpg`` / ``key.0.png`` ... and at
most one video, or none (a text-only sample, normal in VLM SFT mixtures).

How a rank reads (as webdataset / Megatron-Energon do):

* ``data.paths`` (and ``data.val_paths``) resolve to shard files (:func:`resolve_shards`); every
  epoch the shard list is shuffled with ``(seed, epoch)`` and data-parallel rank ``r`` of ``n``
  reads shards ``r, r + n, ...`` of it, in order, sample by sample. Every rank needs a shard
  (fewer shards than ranks is a ``ConfigError``); an even split (a multiple of ``n`` shards of
  equal size) keeps each sample's frequency equal, an uneven one makes the ranks with fewer
  shards cycle theirs faster. Each rank's stream is endless (epoch after epoch), so no rank
  runs dry before the others.
* ``data.pack_buffer`` decoded samples at a time are packed into rows of ``seq_len`` tokens by
  first fit (:func:`forge_data.vision.pack_vlm_samples`) in a seeded order: the buffer bounds
  memory and is the shuffle window. A rank takes ``global_batch_rows / dp`` rows per step and
  collates them as the demo data is collated (:func:`forge_train.vlm_data.collate_micro_batches`).
* A sample is known by its shard's index in the whole shard list and its raw index in the
  shard (with the epoch): the identity its micro-batch's ``pieces`` give, which keys its LoRA
  dropout masks (:func:`forge_train.vlm_data.sample_pieces`), the same on a resume.
* So, unlike ``skimage_captions``, the sample order depends on the data-parallel size: a
  checkpoint resumes at the data-parallel size that wrote it (refused otherwise);
  ``micro_batch_rows`` may change.
* Bad data (a corrupt or truncated shard, an undecodable image, a placeholder mismatch, an
  over-long sample) is counted in the loader's :attr:`VLMStreamLoader.bad_data` and skipped,
  and the run log reports the counts (summed over the ranks); ``data.on_bad_data=raise`` stops
  at the first one instead. Each is logged as a warning by one rank of those reading the same
  shards (``log_bad_data``, :func:`log_bad_data_here`), not once per tensor-, context- or
  pipeline-parallel peer. A rank whose shards hold no usable sample in a whole epoch is a
  ``ConfigError``.
* Evaluation (``data.val_paths``, read in order from the start each time) also takes fewer
  shards than ranks (a held-out set is often one file): then every rank reads all of them and
  keeps every ``n``-th sample (:attr:`VLMStreamLoader.by_sample`).

Resuming: the loader's state is, per data-parallel rank, where its current packing buffer
started (epoch, shard, raw sample) and how many of that buffer's rows it has handed out. On
resume the rank skips the raw samples before the buffer undecoded (the tar bytes are read,
no image decoded), decodes and packs the buffer again and goes on at the same row, so a
resumed run gets exactly the batches of the uninterrupted one. The state also keeps the rank's
bad-data counts from before that buffer (the buffer's own bad samples are counted again as it
is decoded again), so a resumed run reports the uninterrupted run's counts.

Decoding ahead (``data.prefetch_buffers``, default 1): a background thread of the training
process reads, decodes (PIL, the processor's resizing and patching, tokenizing) and packs the
next buffer(s) while the step runs on the current one, as the DataLoader workers of LLaVA /
Qwen-VL trainers do; 0 decodes in the step, when a buffer runs out. A thread, not processes:
PIL decoding, torch resizing and the tar reads release the GIL, and decoded pixels need no
copying between processes (``apps/train/benchmarks/bench_vlm_prefetch.py`` measures it). The
thread reads the stream as the step would, alone and in order, so the batches, the bad-data
counts and the state are the same with or without it: the loader hands out a buffer's rows, and
adds the bad data met while decoding it to :attr:`VLMStreamLoader.bad_data`, only when the
step reaches that buffer; ``state_dict`` describes what the step has taken, never what was
decoded ahead; an error of the thread (``data.on_bad_data=raise``, a ``ConfigError``) is raised
by the ``next()`` that reaches the buffer it happened in. At most ``prefetch_buffers`` buffers
are decoded ahead (memory: ``1 + prefetch_buffers`` buffers of ``pack_buffer`` samples), and
the thread stops when the loader is closed (:meth:`VLMStreamLoader.close`, at the end of a run),
loads a state or is garbage-collected (an evaluation's loader).

Decoding in worker processes (``data.decode_workers``, default 0: in the training process):
with ``N > 0`` the rank's samples are decoded by a pool of ``N`` processes
(:mod:`forge_train.vlm_decode_workers`), for the share of decoding that holds the GIL (the
processor's Python, tokenizing), with either of the above. Only the decoding moves: the reader
(the step or the prefetch thread) still reads the tar stream, sends each raw sample to the
pool (up to ``2 N`` ahead of the one it waits for) and takes the decoded samples back in
order, packs them, keeps the state and counts the bad data (a worker sends back what its
decoder met, replayed where the sample is taken). So the batches, the state, the bad-data
counts and records, and the point where ``data.on_bad_data=raise`` raises are those of
``decode_workers=0``, and a resume is unchanged. The workers stop with the reader: on
:meth:`VLMStreamLoader.close`, ``load_state_dict``, garbage collection, the process's exit or
death; a worker that dies raises an error naming the sample it held. Loaders that take turns
on a split, each evaluation's (:meth:`VLMShardData.sharing_decode_workers`, which the trainer
uses), share one pool instead: each borrows it on its first ``next()`` and gives it back when
it stops, and the pool stops when the split's :meth:`VLMShardData.close` is called (the end of
the run), so the ``N`` processes start once per run, not once per evaluation.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import glob
import hashlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from forge_train.config import ConfigError, DataConfig
from forge_train.vlm_data import collate_micro_batches, dummy_visual
from forge_train.vlm_processing import build_processor, mrope_settings

log = logging.getLogger(__name__)

__all__ = [
    "StreamPosition",
    "VLMShardData",
    "VLMStreamLoader",
    "build_shard_data",
    "log_bad_data_here",
    "resolve_shards",
]

SHARD_SUFFIX = ".tar"


def log_bad_data_here(mesh) -> bool:
    """Whether this rank logs each bad sample it meets (``VLMStreamLoader(log_bad_data=...)``):
    the ranks of one data-parallel rank's tensor-, context- and pipeline-parallel groups read
    the same shards (only ``dp`` splits the data), so each would print the same warning; the
    first of them (index 0 on every one of these axes of the ``ParallelMesh`` ``mesh``; no
    mesh: a single process) logs it. Every rank still counts it (the run log's counts are
    summed over the data-parallel ranks only)."""
    if mesh is None:
        return True
    return all(mesh.size(axis) == 1 or mesh.local_rank(axis) == 0 for axis in ("pp", "cp", "tp"))


def _remote(path: str) -> bool:
    """A shard URL webdataset opens itself (``s3://``, ``http(s)://``, ``pipe:``), not globbed."""
    return "://" in path or path.startswith("pipe:")


def resolve_shards(paths: list[str], key: str) -> list[str]:
    """The shard files of ``paths`` in order: each a ``.tar`` file, a glob (``*``, ``**``), a
    brace pattern (``shard-{000..099}.tar``) or a folder (its ``.tar`` files, recursively,
    sorted); remote URLs pass as they are. ``ConfigError`` naming a path that gives no
    ``.tar`` file (``key``: the config key, ``data.paths`` or ``data.val_paths``)."""
    from forge_data.tar_shards import expand_shard_urls

    shards: list[str] = []
    for path in paths:
        if _remote(str(path)):
            shards += expand_shard_urls(str(path))
            continue
        found: list[str] = []
        for pattern in expand_shard_urls(os.path.expanduser(str(path))):
            matches = (
                sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            )
            for match in matches:
                if os.path.isdir(match):
                    tars = Path(match).rglob(f"*{SHARD_SUFFIX}")
                    found += sorted(str(p) for p in tars if p.is_file())
                elif match.endswith(SHARD_SUFFIX) and os.path.isfile(match):
                    found.append(match)
        if not found:
            what = (
                "does not exist"
                if not glob.has_magic(str(path)) and not os.path.exists(str(path))
                else f"holds or matches no {SHARD_SUFFIX} file"
            )
            raise ConfigError(
                f"{key}: {path!r} {what}; give webdataset shards: {SHARD_SUFFIX} files, a glob "
                f"(/data/train/*{SHARD_SUFFIX}), a brace pattern (shard-{{000..099}}"
                f"{SHARD_SUFFIX}) or a folder of {SHARD_SUFFIX} files"
            )
        shards += found
    return list(dict.fromkeys(shards))  # a shard given twice is read once


@dataclass
class VLMShardData:
    """One split (training or held-out) of ``data.kind=vlm_shards``: its shard files and the
    decoder of their samples, not the samples (they are streamed by :class:`VLMStreamLoader`).
    ``dataset``: a :class:`forge_data.vision.VLMDataset` over all the shards, used only to
    decode (each loader splits the shards over the ranks itself). The other fields are
    :class:`forge_train.vlm_data.VLMSamples`' (``dummy``: the stand-in image of a micro-batch
    without visual items); ``prefetch_buffers``: ``data.prefetch_buffers``, how many buffers a
    loader decodes ahead in a background thread (0: none); ``decode_workers``:
    ``data.decode_workers``, how many processes decode a loader's samples (0: its reader);
    ``decode_pools``: the :class:`forge_train.vlm_decode_workers.DecodePools` its loaders
    borrow their workers from (:meth:`sharing_decode_workers`), or ``None``: each loader
    starts and stops its own."""

    urls: list[str]
    dataset: Any
    seq_len: int
    bidirectional: bool
    mrope: dict[str, Any] | None
    dummy: dict[str, Any] | None
    pack_buffer: int
    key: str
    prefetch_buffers: int = 1
    decode_workers: int = 0
    decode_pools: Any = None

    def sharing_decode_workers(self) -> VLMShardData:
        """This split for loaders that take turns on it (each held-out evaluation's, read
        every ``train.eval_every`` steps): with decode workers, a copy whose loaders borrow one
        pool of them, started by the first and kept between them until :meth:`close`, instead
        of starting ``decode_workers`` processes each (without: this split)."""
        if not self.decode_workers:
            return self
        from forge_train.vlm_decode_workers import DecodePools

        pools = DecodePools(self.dataset, self.decode_workers)
        return dataclasses.replace(self, decode_pools=pools)

    def close(self) -> None:
        """Stop the decode workers its loaders share (:meth:`sharing_decode_workers`; none:
        nothing to do). Each loader's own stop with the loader."""
        if self.decode_pools is not None:
            self.decode_pools.close()


def build_shard_data(
    config: DataConfig, tokenizer, model_config, *, paths: list[str], key: str
) -> VLMShardData:
    """The :class:`VLMShardData` of the shards ``paths`` (config key ``key``) for a model of
    ``model_config`` (its family's processor and placeholders)."""
    from forge_data.multimodal import MultimodalConfig
    from forge_data.vision import VLMDataset

    urls = resolve_shards(paths, key)
    processor = build_processor(model_config, config)
    dataset = VLMDataset(
        MultimodalConfig(
            urls=urls,
            seq_len=config.seq_len,
            shuffle_shards=False,
            chat_template=config.chat_template,
            on_error=config.on_bad_data,
        ),
        tokenizer,
        processor,
    )
    return VLMShardData(
        urls=urls,
        dataset=dataset,
        seq_len=config.seq_len,
        bidirectional=model_config.image_attention == "bidirectional",
        mrope=mrope_settings(model_config),
        dummy=dummy_visual(processor),
        pack_buffer=config.pack_buffer,
        key=key,
        prefetch_buffers=config.prefetch_buffers,
        decode_workers=config.decode_workers,
    )


@dataclass(frozen=True)
class StreamPosition:
    """A place in one rank's stream: ``shard`` indexes the rank's shards of ``epoch``,
    ``sample`` counts the raw (undecoded) samples of that shard already read."""

    epoch: int = 0
    shard: int = 0
    sample: int = 0


@dataclass
class _Buffer:
    """The packed rows of the samples read from ``start`` to ``end`` (up to ``pack_buffer`` of
    them); ``found``: the bad data met while decoding them (a ``BadDataReport``), which the
    loader counts when the step reaches the buffer; ``row``: how many rows were handed out;
    ``bad``: the rank's bad-data counts before ``start`` (what a resume at this buffer starts
    counting from), set when the step reaches the buffer."""

    start: StreamPosition
    end: StreamPosition
    samples: list[dict[str, Any]]
    rows: list[list[int]]
    found: Any
    #: Each sample's ``(epoch, sample id)``: the shard's index in ``data.urls`` times 2**32
    #: plus the raw sample's index in the shard (its LoRA dropout masks' key,
    #: :func:`forge_train.vlm_data.sample_pieces`: the same on a resume, at any micro-batching).
    identities: list[tuple[int, int]] = field(default_factory=list)
    bad: dict[str, int] | None = None
    row: int = 0


@dataclass(frozen=True)
class _Split:
    """Which shards, and which of their samples, a data-parallel rank reads each epoch."""

    urls: list[str]
    seed: int
    dp_rank: int
    dp_size: int
    shuffle: bool
    by_sample: bool

    def shards(self, epoch: int) -> list[str]:
        order = np.arange(len(self.urls))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
        if self.by_sample:
            return [self.urls[i] for i in order]
        return [self.urls[i] for i in order[self.dp_rank :: self.dp_size]]

    def mine(self, shard: int, sample: int) -> bool:
        """Whether raw sample ``sample`` of the rank's ``shard``-th shard is the rank's."""
        return not self.by_sample or (sample + shard) % self.dp_size == self.dp_rank


class _StoppedError(Exception):
    """The reader was stopped (:attr:`_Reader.stop`) in the middle of a buffer."""


@dataclass(frozen=True)
class _ShardDamage:
    """In the raw stream after a damaged shard's last readable sample: counted (or raised)
    by the reader when it gets there, so that reading ahead for the decode workers counts it
    in the buffer it belongs to."""

    url: str
    error: Exception


class _Reader:
    """One rank's stream from a position on, buffer after buffer: reading the raw samples,
    decoding them (its own copy of the split's decoder, or ``decode_workers`` processes'
    copies) and packing them. Only one thread uses a reader (the step, or the loader's
    prefetch thread); it holds no reference to the loader, so a loader dropped while its thread
    decodes is still garbage-collected, and its finalizer stops the thread (:attr:`stop`,
    looked at before every raw sample) and the workers (:meth:`close`)."""

    def __init__(
        self,
        data: VLMShardData,
        split: _Split,
        start: StreamPosition,
        counts: dict[str, int],
        *,
        log_bad_data: bool = True,
        decode_workers: int = 0,
    ) -> None:
        self.data, self.split = data, split
        self.cursor = start  # where the next buffer starts
        self.counts = dict(counts)  # the rank's bad data before the cursor (for messages)
        self.log_bad_data = log_bad_data
        self.decoder = copy.copy(data.dataset)
        self.stop = threading.Event()
        self.decode_workers = decode_workers
        # The loaders' shared pools to borrow from, if any (of as many workers as this reader's)
        pools = data.decode_pools
        self.shared = pools if pools is not None and pools.workers == decode_workers else None
        self._pool = None  # the decode workers' DecodePool, started (or borrowed) on first use
        self._pool_lock = threading.Lock()
        self._raw: Iterator[tuple[StreamPosition | None, Any, Any]] | None = None
        self._epoch_shards: tuple[int, list[int]] | None = None  # (epoch, shard indices)

    def _raw_samples(
        self, start: StreamPosition
    ) -> Iterator[tuple[StreamPosition | None, dict[str, Any] | _ShardDamage | None]]:
        """``(position after it, raw sample)`` from ``start`` on, endlessly, ``(start of the
        next epoch, None)`` at each epoch's end and ``(None, _ShardDamage)`` after a damaged
        shard's readable samples; the raw samples before ``start`` in its shard are read
        past, not decoded."""
        from forge_data.tar_shards import ShardError, tar_samples

        epoch, shard, skip = start.epoch, start.shard, start.sample
        while True:
            shards = self.split.shards(epoch)
            while shard < len(shards):
                url, damage = shards[shard], None
                try:
                    for i, raw in enumerate(tar_samples(url)):
                        if self.stop.is_set():  # also while reading past a resume's samples
                            raise _StoppedError
                        if i >= skip and self.split.mine(shard, i):
                            yield StreamPosition(epoch, shard, i + 1), raw
                except ShardError as err:
                    damage = err
                if damage is not None:
                    yield None, _ShardDamage(url, damage)
                shard, skip = shard + 1, 0
            epoch, shard = epoch + 1, 0
            yield StreamPosition(epoch, 0, 0), None

    @staticmethod
    def _checked(call, *args):
        """``call(*args)`` with ``data.on_bad_data=raise``'s error naming the setting."""
        from forge_data.multimodal import BadSampleError

        try:
            return call(*args)
        except BadSampleError as err:
            raise BadSampleError(
                f"{err}; data.on_bad_data=skip counts and skips bad samples instead"
            ) from None

    def _stream(
        self, start: StreamPosition
    ) -> Iterator[tuple[StreamPosition | None, dict[str, Any] | _ShardDamage | None, Any]]:
        """:meth:`_raw_samples` with, for each raw sample, its decode workers' ticket (None
        without workers: decoded when taken). With workers, up to the pool's window of raw
        samples are read and sent ahead of the one taken, so the workers decode while the
        reader waits for the oldest; an error of the reading is raised where it happened,
        after the samples read before it."""
        raws = self._raw_samples(start)
        if not self.decode_workers:
            for after, raw in raws:
                yield after, raw, None
            return
        pool = self._decode_pool()
        ahead: collections.deque = collections.deque()
        failure: Exception | None = None
        while True:
            while failure is None and len(ahead) < pool.window:
                try:
                    after, raw = next(raws)
                except Exception as err:  # a reading error, or _StoppedError
                    failure = err
                    break
                ticket = pool.submit(raw) if isinstance(raw, dict) else None
                ahead.append((after, raw, ticket))
            if not ahead:
                assert failure is not None
                raise failure
            yield ahead.popleft()

    def _decode_pool(self):
        """The decode workers' pool, started (or borrowed from :attr:`shared`) here, in the
        thread that reads, on first use."""
        from forge_train.vlm_decode_workers import DecodePool

        with self._pool_lock:
            if self.stop.is_set():
                raise _StoppedError
            if self.shared is not None:
                self._pool = self.shared.borrow()
            else:
                self._pool = DecodePool(self.data.dataset, self.decode_workers)
            return self._pool

    def _decoded(self, raw: dict[str, Any], ticket) -> dict[str, Any] | None:
        """The decoded sample of ``raw`` (None: bad), with its bad data in the decoder's
        report: decoded here, or taken from the decode workers (``ticket``) and replayed."""
        if ticket is None:
            return self.decoder.decode(raw)
        from forge_train.vlm_decode_workers import DecodeStoppedError

        pool = self._pool
        if pool is None:  # closed (let go of) meanwhile
            raise _StoppedError
        try:
            decoded = pool.result(ticket, stop=self.stop)
        except DecodeStoppedError:
            raise _StoppedError from None
        return decoded.replay(self.decoder.report)

    def close(self, *, in_use: bool = False) -> None:
        """Stop reading (:attr:`stop`) and let go of the decode workers, if any: stop the
        reader's own (which wakes a thread waiting on them); give shared ones back for the
        next reader, unless ``in_use`` (a thread may still wait on them): then stop them."""
        with self._pool_lock:
            self.stop.set()
            pool, self._pool = self._pool, None
        if pool is None:
            return
        if self.shared is not None and not in_use:
            self.shared.give_back(pool)
        else:
            pool.close()

    def fill(self) -> _Buffer:
        """Read, decode and pack the next buffer (from :attr:`cursor`)."""
        from forge_data.multimodal import BadDataReport
        from forge_data.vision import pack_vlm_samples

        start = self.cursor
        found = self.decoder.report = BadDataReport(log=self.log_bad_data)  # this buffer's
        if self._raw is None:
            self._raw = self._stream(start)
        samples: list[dict[str, Any]] = []
        identities: list[tuple[int, int]] = []
        position, idle_epoch_ends = start, 0
        for after, raw, ticket in self._raw:
            if self.stop.is_set():
                raise _StoppedError
            if isinstance(raw, _ShardDamage):
                self._checked(self.decoder.shard_failed, raw.url, raw.error)
                continue
            position = after  # where the next buffer starts, if this one stops here
            if raw is None:
                idle_epoch_ends += 1
                if idle_epoch_ends >= 2:  # a whole epoch of this rank's shards gave nothing
                    raise self._no_sample(found)
                continue
            sample = self._checked(self._decoded, raw, ticket)
            if sample is None:
                continue
            samples.append(sample)
            identities.append(self._identity(after))
            idle_epoch_ends = 0
            if len(samples) == self.data.pack_buffer:
                break
        self.cursor = position
        self.counts = _summed(self.counts, found.counts)
        order = None
        if self.split.shuffle:
            split = self.split
            key = [split.seed, split.dp_rank, start.epoch, start.shard, start.sample]
            order = np.random.default_rng(key).permutation(len(samples))
        rows, _ = pack_vlm_samples(samples, seq_len=self.data.seq_len, order=order)
        return _Buffer(start, position, samples, rows, found, identities)

    def _identity(self, after: StreamPosition) -> tuple[int, int]:
        """``(epoch, sample id)`` of the raw sample just before ``after`` (see
        :class:`_Buffer`): its shard's index in the whole shard list, not in this rank's."""
        if self._epoch_shards is None or self._epoch_shards[0] != after.epoch:
            index = {url: i for i, url in enumerate(self.data.urls)}
            shards = [index[url] for url in self.split.shards(after.epoch)]
            self._epoch_shards = (after.epoch, shards)
        return after.epoch, (self._epoch_shards[1][after.shard] << 32) + after.sample - 1

    def _no_sample(self, found) -> ConfigError:
        split, n = self.split, len(self.split.shards(0))
        what = (
            f"data-parallel rank {split.dp_rank}'s share of the samples of the {n} shard(s) holds"
            if split.by_sample
            else f"the {n} shard(s) of data-parallel rank {split.dp_rank} hold"
        )
        counts = _summed(self.counts, found.counts)
        return ConfigError(
            f"{self.data.key}: {what} no usable sample (bad data so far: "
            f"{counts or 'none: the shards are empty'}); check the shards (a sample is key.json "
            "/ key.txt with its images, see forge_data.vision.VLMDataset)"
        )


def _summed(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    out = dict(a)
    for reason, n in b.items():
        out[reason] = out.get(reason, 0) + n
    return out


#: How long closing a loader waits for its prefetch thread to finish the sample it decodes.
_JOIN_SECONDS = 60.0


class _Prefetcher:
    """A daemon thread that fills a :class:`_Reader`'s buffers ahead of the step, in order, at
    most ``depth`` of them filled or being filled and not yet taken (:meth:`get`). An
    exception of the reader is handed out in place of the buffer it happened in, and ends the
    thread. Holds no reference to the loader (see :class:`_Reader`)."""

    def __init__(self, reader: _Reader, depth: int) -> None:
        self._reader = reader
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._slots = threading.Semaphore(depth)  # buffers the thread may fill before a get()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="forge-vlm-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        reader = self._reader
        while True:
            self._slots.acquire()
            if reader.stop.is_set():
                return
            try:
                item: _Buffer | BaseException = reader.fill()
            except _StoppedError:
                return
            except BaseException as err:  # handed to the step, which raises it
                err.add_note(
                    "(raised while decoding ahead in forge_train.vlm_stream's prefetch thread, "
                    "data.prefetch_buffers; at the step that reaches this buffer)"
                )
                item = err
            self._ready.put(item)
            if isinstance(item, BaseException):
                return

    def get(self) -> _Buffer:
        """The next buffer, waiting for it if needed; raises the reader's error there."""
        if self._error is not None:
            raise self._error
        while True:
            try:
                item = self._ready.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self._ready.empty():
                    raise RuntimeError(
                        "forge_train.vlm_stream: the data prefetch thread ended without a "
                        "buffer (the loader was closed or stopped); this is a bug"
                    ) from None
        self._slots.release()
        if isinstance(item, BaseException):
            self._error = item
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (after the raw sample it is at) and wait for it."""
        self._reader.stop.set()
        self._slots.release()  # wakes a thread waiting for a free slot
        if threading.current_thread() is self.thread:  # collected from inside the thread
            return
        self.thread.join(_JOIN_SECONDS)
        if self.thread.is_alive():
            log.warning(
                "forge_train.vlm_stream: the data prefetch thread is still reading after "
                "%.0f s (a slow shard read?); leaving it, a daemon thread, behind",
                _JOIN_SECONDS,
            )


def _stop_reading(prefetcher: _Prefetcher | None, reader: _Reader) -> None:
    """Stop a loader's reader and its decode workers (which wakes a prefetch thread waiting
    for a worker), then the prefetch thread, waiting for it. Shared workers
    (:attr:`_Reader.shared`) are not stopped but given back, once the thread is done with
    them: it is stopped and waited for first (a worker it waits on answers within a sample's
    decoding), and if it does not end in time they are stopped after all."""
    if reader.shared is not None and prefetcher is not None:
        reader.stop.set()
        prefetcher.close()
        reader.close(in_use=prefetcher.thread.is_alive())
        return
    reader.close()
    if prefetcher is not None:
        prefetcher.close()


class VLMStreamLoader:
    """Each ``next()`` is this rank's micro-batches of one optimizer step, streamed from its
    own shards (see the module doc); ``state_dict`` / ``load_state_dict`` resume it exactly
    (at the same data-parallel size). With ``prefetch_buffers`` (default: the data's,
    ``data.prefetch_buffers``) > 0 a background thread decodes that many buffers ahead;
    :meth:`close` stops it (so does garbage collection). With ``decode_workers`` (default: the
    data's, ``data.decode_workers``) > 0 that many processes decode the samples
    (:mod:`forge_train.vlm_decode_workers`), started on the first ``next()``, stopped as the
    thread is. ``log_bad_data``: whether this rank logs a warning for each bad sample
    (:func:`log_bad_data_here`: one rank of those reading the same shards); it counts them
    either way."""

    def __init__(
        self,
        data: VLMShardData,
        *,
        global_batch_rows: int,
        micro_batch_rows: int,
        seed: int,
        dp_rank: int,
        dp_size: int,
        pad_id: int,
        shuffle: bool = True,
        prefetch_buffers: int | None = None,
        log_bad_data: bool = True,
        decode_workers: int | None = None,
    ) -> None:
        n = len(data.urls)
        # Evaluation (no shuffling, never resumed) takes whatever shards it is given, as a
        # held-out set is often one file: with fewer shards than ranks every rank reads them all
        # and keeps its share of the samples (sample i of the j-th shard goes to rank
        # (i + j) % dp), the tar bytes of the others read past undecoded.
        self.by_sample = n < dp_size and not shuffle
        if n < dp_size and shuffle:
            raise ConfigError(
                f"{data.key}: {n} shard file(s) for {dp_size} data-parallel ranks; each rank "
                f"reads its own shards, so the data needs at least {dp_size} {SHARD_SUFFIX} "
                f"files (best a multiple of {dp_size}, of equal size): split it into more "
                "shards or use fewer data-parallel ranks"
            )
        self.prefetch_buffers = (
            data.prefetch_buffers if prefetch_buffers is None else prefetch_buffers
        )
        if self.prefetch_buffers < 0:
            raise ValueError(
                f"prefetch_buffers={self.prefetch_buffers} must be >= 0 (0: decode in the step)"
            )
        self.decode_workers = data.decode_workers if decode_workers is None else decode_workers
        if self.decode_workers < 0:
            raise ValueError(
                f"decode_workers={self.decode_workers} must be >= 0 (0: decode in the training "
                "process)"
            )
        self.data = data
        self.rows_per_rank = global_batch_rows // dp_size
        self.micro_batch_rows = micro_batch_rows
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.pad_id, self.shuffle = pad_id, shuffle
        self._split = _Split(list(data.urls), seed, dp_rank, dp_size, shuffle, self.by_sample)
        # This loader's own bad-data counts (an evaluation's loader over the same shards counts
        # apart): those of the buffers the step has reached.
        from forge_data.multimodal import BadDataReport

        self._report = BadDataReport()
        self._buffer: _Buffer | None = None  # the buffer the step takes rows of
        self._next_start = StreamPosition()  # where the buffer after it starts
        # Every rank reading this rank's shards counts their bad data; one of them logs it
        # (log_bad_data_here).
        self.log_bad_data = log_bad_data
        self._reader = _Reader(
            data,
            self._split,
            self._next_start,
            {},
            log_bad_data=log_bad_data,
            decode_workers=self.decode_workers,
        )
        self._prefetcher: _Prefetcher | None = None
        # Stops the prefetch thread and the decode workers (_stop_reading) once, on close(),
        # a resume or the loader's collection; set when they may start (the first _take).
        self._stop_reading: weakref.finalize | None = None

    @property
    def bad_data(self):
        """This rank's :class:`forge_data.multimodal.BadDataReport` (skipped shards and
        samples by reason, their first locations) up to the end of the buffer the step takes
        rows of (not of the buffers decoded ahead)."""
        return self._report

    # -- reading ----------------------------------------------------------------------------
    def shards(self, epoch: int) -> list[str]:
        """This rank's shards of ``epoch``, in reading order (all of them when it keeps a
        share of their samples, :attr:`by_sample`)."""
        return self._split.shards(epoch)

    def _take(self) -> _Buffer:
        """The next buffer (decoded here, or by the prefetch thread, started on first use),
        its bad data now counted."""
        if self._stop_reading is None and (self.prefetch_buffers or self.decode_workers):
            if self.prefetch_buffers:
                self._prefetcher = _Prefetcher(self._reader, self.prefetch_buffers)
            # stops the thread and the workers when the loader is collected; holds the
            # prefetcher and the reader only
            self._stop_reading = weakref.finalize(
                self, _stop_reading, self._prefetcher, self._reader
            )
        buffer = self._reader.fill() if self._prefetcher is None else self._prefetcher.get()
        buffer.bad = dict(self._report.counts)
        self._report.counts = _summed(self._report.counts, buffer.found.counts)
        room = max(self._report.max_records - len(self._report.records), 0)
        self._report.records += buffer.found.records[:room]
        self._next_start = buffer.end
        return buffer

    def _next_row(self) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
        """The next packed row's samples and their identities (:class:`_Buffer`)."""
        while self._buffer is None or self._buffer.row >= len(self._buffer.rows):
            self._buffer = self._take()
        buffer = self._buffer
        row = buffer.rows[buffer.row]
        buffer.row += 1
        return [buffer.samples[i] for i in row], [buffer.identities[i] for i in row]

    def __iter__(self):
        return self

    def __next__(self) -> list[dict[str, Any]]:
        rows = [self._next_row() for _ in range(self.rows_per_rank)]
        return collate_micro_batches(
            [samples for samples, _ in rows],
            self.data,
            micro_batch_rows=self.micro_batch_rows,
            pad_id=self.pad_id,
            identities=[ids for _, ids in rows],
        )

    def _restart(self, start: StreamPosition, counts: dict[str, int]) -> None:
        """Stop the prefetch thread and the decode workers (what they decoded ahead is
        dropped) and read on from ``start`` (the rank's bad data before it: ``counts``)."""
        if self._stop_reading is not None:
            self._stop_reading()  # runs _stop_reading once
        self._prefetcher = self._stop_reading = None
        self._reader = _Reader(
            self.data,
            self._split,
            start,
            counts,
            log_bad_data=self.log_bad_data,
            decode_workers=self.decode_workers,
        )

    def close(self) -> None:
        """Stop the prefetch thread and the decode workers and drop what they decoded ahead
        (at the end of a run; garbage collection does it too). A later ``next()`` goes on
        where the step is."""
        if self._stop_reading is not None:
            self._restart(self._next_start, self._report.counts)

    # -- state ------------------------------------------------------------------------------
    def _position(self) -> dict[str, Any]:
        """Where this rank resumes: its buffer's start, the rows handed out of it and the
        bad-data counts before it (the buffer's own bad samples are counted again when it is
        decoded again, so a resumed run's counts are the uninterrupted run's). The step's
        buffer, not the ones decoded ahead."""
        if self._buffer is None:
            return {**asdict(self._next_start), "row": 0, "bad": dict(self._report.counts)}
        buffer = self._buffer
        return {**asdict(buffer.start), "row": buffer.row, "bad": dict(buffer.bad or {})}

    def _pinned(self) -> dict[str, Any]:
        """What the sample order depends on; ``micro_batch_rows`` (and ``prefetch_buffers``,
        ``decode_workers``) may change on resume."""
        digest = hashlib.sha256("\n".join(self.data.urls).encode()).hexdigest()[:16]
        return {
            "seed": self.seed,
            "seq_len": self.data.seq_len,
            "global_batch_rows": self.rows_per_rank * self.dp_size,
            "dp_size": self.dp_size,
            "pack_buffer": self.data.pack_buffer,
            "shuffle": self.shuffle,
            "shards": digest,
        }

    def state_dict(self) -> dict[str, Any]:
        """Every data-parallel rank's position (gathered from all ranks: a collective, which
        every rank's checkpoint save calls), so the state is the same on every rank and is
        stored once."""
        mine = self._position()
        ranks: list[dict[str, Any] | None] = [None] * self.dp_size
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.dp_rank, mine))
        else:
            gathered = [(self.dp_rank, mine)]
        for rank, position in gathered:
            # the ranks of one data-parallel rank (tensor / context / pipeline) read alike
            assert ranks[rank] in (None, position), (rank, ranks[rank], position)
            ranks[rank] = position
        return {"ranks": ranks, "config": self._pinned()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self._pinned()
        for key, value in state["config"].items():
            if mine.get(key) != value:
                raise ConfigError(
                    f"cannot resume: the checkpoint's data.kind=vlm_shards loader has "
                    f"{key}={value!r} but this one {mine.get(key)!r}; its sample order depends "
                    "on it (each data-parallel rank streams its own shards, so the "
                    "data-parallel size may not change either; data.micro_batch_rows may): "
                    "resume with the checkpoint's setting, or start a new run in another "
                    "train.output_dir"
                )
        position = state["ranks"][self.dp_rank]
        start = StreamPosition(position["epoch"], position["shard"], position["sample"])
        # The counts before the buffer (none in a checkpoint written before they were kept).
        counts = {k: int(n) for k, n in position.get("bad", {}).items()}
        self._restart(start, counts)
        self._next_start, self._buffer = start, None
        self._report.counts, self._report.records = dict(counts), []
        if position["row"]:
            self._buffer = self._take()
            self._buffer.row = int(position["row"])
