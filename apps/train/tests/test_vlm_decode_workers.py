"""``data.decode_workers``: a data-parallel rank's VLM samples decoded by worker processes
(forge_train.vlm_decode_workers) while the rank reads, packs and counts, on shards written
here: captions, a two-image conversation, text-only chats, an undecodable image, a sample
with broken json and a shard cut short in the middle of a member (a corrupt shard).

- the same batches (token ids and pixels), loader states, bad-data counts and records as
  ``decode_workers=0``, with and without the prefetch thread, over several buffers and
  epochs, and a resume mid-buffer; ``data.on_bad_data=raise`` raises at the same step with
  the same message;
- a worker killed mid-stream raises an error naming the shard and sample it held (no hang);
  ``close()`` and garbage collection leave no worker process, and the config refuses a
  negative count;
- successive evaluations (``Trainer.evaluate``, and loaders of the split it keeps) borrow one
  pool, started once: the same worker processes, the same batches as decoding in process,
  a pool that lost a worker replaced, no worker left after the trainer closes.

Each pool start costs a fork from the fork server (the first one also starts the server), so
the tests share their loaders' pools where they can.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")
shard_files = import_path(
    Path(__file__).with_name("vlm_shard_files.py"), "forge_train_tests_vlm_shard_files"
)


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 shards; bad data: an undecodable image (b), broken json (c), a cut shard (d)."""
    root = tmp_path_factory.mktemp("vlm-decode-workers")
    pair = [("pair.0.png", shard_files.png(90)), ("pair.1.png", shard_files.png(91)),
            ("pair.json", shard_files.chat("<image> and <image>: same?", "no, they differ"))]  # fmt: skip
    chats = [(f"t{i}.json", shard_files.chat(f"say {i}", f"number {i} said")) for i in range(2)]
    (root / "a.tar").write_bytes(shard_files.tar_bytes(shard_files.captions(0, 3) + pair))
    broken = [("broken.png", b"not a png at all"), ("broken.txt", b"lost caption")]
    (root / "b.tar").write_bytes(shard_files.tar_bytes(shard_files.captions(1, 2) + broken + chats))
    bad_json = [("badjson.json", b"{not json"), ("badjson.png", shard_files.png(7))]
    (root / "c.tar").write_bytes(
        shard_files.tar_bytes(shard_files.captions(2, 2) + bad_json + shard_files.captions(3, 1))
    )
    whole = shard_files.tar_bytes(shard_files.captions(4, 4))
    (root / "d.tar").write_bytes(whole[: len(whole) * 2 // 3])  # cut inside a member
    return root


def _config_and_data(shards: Path, *extra: str):
    """The run config and the shard data of ``shards`` (4-sample buffers)."""
    from forge_train.data import load_run_tokenizer
    from forge_train.vlm_model import vlm_model_config
    from forge_train.vlm_stream import build_shard_data

    cfg = tiny.compose_run_config(
        ["recipe=vlm", "data=vlm-shards", "data.seq_len=64", "data.pack_buffer=4",
         f"data.paths=[{shards}]", "train.output_dir=/nonexistent", *extra]
    )  # fmt: skip
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    data = build_shard_data(cfg.data, tokenizer, config, paths=cfg.data.paths, key="data.paths")
    return cfg, data


def _data(shards: Path, *extra: str):
    return _config_and_data(shards, *extra)[1]


def _loader(data, *, prefetch: int, workers: int):
    from forge_train.vlm_stream import VLMStreamLoader

    return VLMStreamLoader(
        data, global_batch_rows=2, micro_batch_rows=1, seed=3, dp_rank=0, dp_size=1, pad_id=0,
        prefetch_buffers=prefetch, decode_workers=workers,
    )  # fmt: skip


def _flat(step: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [mb["input_ids"].reshape(-1) for mb in step]
    pixels = [mb["visual"]["image"]["pixel_values"].reshape(-1)
              for mb in step if "image" in mb["visual"]]  # fmt: skip
    return torch.cat(ids), torch.cat(pixels) if pixels else torch.zeros(0)


def _seen(loader) -> tuple:
    """The state, bad-data counts and records (PIL's messages name an object's address)."""
    records = [{k: re.sub(r"0x[0-9a-f]+", "0x?", v) for k, v in record.items()}
               for record in loader.bad_data.records]  # fmt: skip
    return loader.state_dict(), dict(loader.bad_data.counts), records


def _gone(pids: list[int], within: float = 10.0) -> bool:
    """Whether none of ``pids`` runs (or waits to be reaped) any more."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.05)


def _pids(loader) -> list[int]:
    pool = loader._reader._pool
    return [] if pool is None else pool.pids


@pytest.mark.multiprocess
def test_decode_workers_give_the_same_batches_state_and_bad_data(shards):
    """2 workers, with and without the prefetch thread, against decoding in process: step
    after step over 4-sample buffers and several epochs, the same batches, state, bad-data
    counts and records (an undecodable image, broken json, a corrupt shard, each in the
    buffer it belongs to); a resume mid-buffer from a worker loader's state; and
    ``on_bad_data=raise`` raises at the same step with the same message."""
    from forge_data.multimodal import BadSampleError

    data = _data(shards)
    loaders = {(0, 0): _loader(data, prefetch=0, workers=0),
               (0, 2): _loader(data, prefetch=0, workers=2),
               (1, 2): _loader(data, prefetch=1, workers=2)}  # fmt: skip
    for step in range(12):
        got = {key: (_flat(next(loader)), _seen(loader)) for key, loader in loaders.items()}
        (want_ids, want_pixels), want_seen = got[0, 0]
        for key in [(0, 2), (1, 2)]:
            (ids, pixels), seen = got[key]
            assert torch.equal(ids, want_ids), (step, key)
            assert torch.equal(pixels, want_pixels), (step, key)
            assert seen == want_seen, (step, key, seen, want_seen)
        if step == 4:
            state = want_seen[0]
    counts = loaders[0, 0].bad_data.counts
    assert set(counts) == {"undecodable media", "undecodable text", "corrupt shard"}, counts
    assert loaders[0, 0].state_dict()["ranks"][0]["epoch"] >= 1, "several epochs were read"
    assert state["ranks"][0]["row"] > 0, state  # mid-buffer
    pids = _pids(loaders[0, 2]) + _pids(loaders[1, 2])
    assert len(pids) == 4, pids
    assert not _gone(pids, within=0), pids
    loaders[0, 2].load_state_dict(state)  # re-seek: the old workers stop, new ones start
    straight = _loader(data, prefetch=0, workers=0)
    straight.load_state_dict(state)
    for _ in range(4):
        want, got_ = _flat(next(straight)), _flat(next(loaders[0, 2]))
        assert torch.equal(got_[0], want[0])
        assert torch.equal(got_[1], want[1])
        assert _seen(loaders[0, 2]) == _seen(straight)
    for loader in loaders.values():
        loader.close()
    assert _gone(pids), "close() and load_state_dict stop the workers"

    # data.on_bad_data=raise (what build_shard_data gives; one config composition less)
    decoder = copy.copy(data.dataset)
    decoder.config = dataclasses.replace(decoder.config, on_error="raise")
    raising = dataclasses.replace(data, dataset=decoder)

    def first_error(prefetch: int, workers: int) -> tuple[int, str]:
        loader = _loader(raising, prefetch=prefetch, workers=workers)
        try:
            for step in range(30):
                try:
                    next(loader)
                except BadSampleError as err:
                    return step, re.sub(r"0x[0-9a-f]+", "0x?", str(err))
            raise AssertionError("no bad sample was reached")
        finally:
            loader.close()

    step, message = first_error(0, 0)
    assert "data.on_bad_data=skip" in message, message
    assert first_error(1, 2) == (step, message)


@pytest.mark.multiprocess
def test_killed_decode_worker_names_the_sample_and_workers_stop(shards):
    """SIGKILL of a worker mid-stream: ``next()`` raises an error naming the shard and the
    sample the worker held, at once (not a hang), and again on a later ``next()``;
    ``close()`` and a dropped loader leave no worker process; a negative count is refused."""
    from forge_train.config import ConfigError, DataConfig
    from forge_train.vlm_decode_workers import DecodeWorkerError

    data = _data(shards)
    loader = _loader(data, prefetch=0, workers=1)
    next(loader)
    (pid,) = _pids(loader)
    os.kill(pid, signal.SIGKILL)
    start = time.monotonic()

    def until_it_fails(loader):
        for _ in range(20):  # the samples already sent back are taken first
            next(loader)

    with pytest.raises(DecodeWorkerError) as caught:
        until_it_fails(loader)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "killed by SIGKILL" in message, message
    key = r"'(\d_\d|pair|broken|t\d|badjson)'"
    assert re.search(rf"sample {key} of shard \S+/[abcd]\.tar", message), message
    with pytest.raises(DecodeWorkerError):
        next(loader)
    loader.close()
    assert _gone([pid])

    loader = _loader(data, prefetch=1, workers=2)
    next(loader)
    pids = _pids(loader)
    assert len(pids) == 2
    del loader
    gc.collect()
    assert _gone(pids), "a dropped loader stops its workers"

    with pytest.raises(ConfigError, match=r"data.decode_workers.*must be >= 0"):
        DataConfig(kind="vlm_shards", paths=["x.tar"], decode_workers=-1)


def _workers_alive() -> set[int]:
    """The decode worker processes of this process that run now."""
    children = multiprocessing.active_children()
    return {child.pid for child in children if child.name.startswith("forge-vlm-decode-")}


class _Runner:
    """What ``held_out_loss`` needs of a step runner; keeps each batch it is given and the
    decode workers running while it evaluates."""

    def __init__(self) -> None:
        self.model = SimpleNamespace(eval=lambda: None, train=lambda: None)
        self.device, self.dp_group = torch.device("cpu"), None
        self.batches, self.workers = [], set()

    def eval_sums(self, batch) -> torch.Tensor:
        self.batches.append(_flat(batch))
        self.workers |= _workers_alive()
        return torch.ones(2)


@pytest.mark.multiprocess
def test_evaluations_share_one_decode_pool(shards):
    """``Trainer.evaluate`` every ``eval_every`` steps reads the held-out split through a new
    loader each time; with ``data.decode_workers`` they borrow one pool: the second
    evaluation and loaders of the same kept split (with the prefetch thread, and dropped
    without ``close()``) find the first one's worker processes, and read the batches that
    decoding in process gives, although each stopped with samples still in flight. A pool
    whose worker died meanwhile is replaced; ``Trainer.close`` stops the workers."""
    from forge_train.loop import Trainer
    from forge_train.vlm_stream import VLMStreamLoader

    cfg, data = _config_and_data(shards, "data.decode_workers=2", "train.eval_batches=2")
    trainer = Trainer.__new__(Trainer)  # what evaluate() and close() use of a built trainer
    trainer.cfg, trainer.runner, trainer._eval_data = cfg, _Runner(), None
    trainer.parts = SimpleNamespace(data=SimpleNamespace(val=data, train=data), dp_rank=0,
                                    dp_size=1, pad_id=0)  # fmt: skip
    trainer.log = SimpleNamespace(close=lambda: None)

    def eval_loader(data, **kwargs):
        return VLMStreamLoader(
            data, global_batch_rows=cfg.data.global_batch_rows, dp_rank=0, dp_size=1,
            micro_batch_rows=cfg.data.micro_batch_rows, seed=0, pad_id=0, shuffle=False,
            **kwargs,
        )  # fmt: skip

    straight = eval_loader(data, decode_workers=0)
    want = [_flat(next(straight)) for _ in range(3)]

    def same_batches(got: list, n: int) -> None:
        assert len(got) == n
        for (ids, pixels), (want_ids, want_pixels) in zip(got, want[:n], strict=True):
            assert torch.equal(ids, want_ids)
            assert torch.equal(pixels, want_pixels)

    before = _workers_alive()  # another test's, if any
    trainer.evaluate()
    trainer.evaluate()
    pids = trainer.runner.workers - before
    assert len(pids) == 2, f"two evaluations started {len(pids)} workers, not 2 once: {pids}"
    assert _workers_alive() - before == pids, "kept between evaluations"
    same_batches(trainer.runner.batches[:2], 2)
    same_batches(trainer.runner.batches[2:], 2)

    loader = eval_loader(trainer._eval_data, prefetch_buffers=1)  # the thread's pool, given back
    same_batches([_flat(next(loader)) for _ in range(3)], 3)
    assert set(_pids(loader)) == pids
    loader.close()
    loader = eval_loader(trainer._eval_data, prefetch_buffers=0)
    same_batches([_flat(next(loader))], 1)
    assert set(_pids(loader)) == pids
    del loader  # garbage collection gives the pool back too
    gc.collect()
    assert _workers_alive() - before == pids

    os.kill(min(pids), signal.SIGKILL)  # between evaluations: the next one gets a new pool
    assert _gone([min(pids)])
    trainer.runner.batches, trainer.runner.workers = [], set()
    trainer.evaluate()
    same_batches(trainer.runner.batches, 2)
    fresh = trainer.runner.workers - before
    assert len(fresh) == 2, fresh
    assert not fresh & pids, (fresh, pids)
    assert _gone(list(pids)), "the broken pool was stopped"
    trainer.close()
    assert _gone(list(fresh)), "Trainer.close stops the evaluations' workers"
