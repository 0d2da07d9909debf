"""``data.kind=vlm_shards``: a vision-language model trained on the user's own webdataset
shards, streamed (forge_train.vlm_stream), on shards written here with tarfile + PIL: image
captions, a two-image conversation, text-only conversations and one undecodable image.

- a short run trains (the loss falls), counts the bad image in its metrics and run log, and
  its step-2 checkpoint resumes to the uninterrupted run's steps 3-4 (losses, gradient norms
  and bad-data counts); the loader alone resumes mid-buffer to the same batches and counts;
- a micro-batch without images runs the encoder on the stand-in image (``dummy_visual``): the
  loss is the same, the encoder and projector get zero gradients instead of none, and under
  FSDP2 a rank whose micro-batch is text-only neither hangs nor changes the step (2 ranks give
  one process's loss and gradient norm on the same global batch), and the run log's bad-data
  counts are summed over the ranks with a location from whichever rank has one;
- decoding ahead (``data.prefetch_buffers``): the same batches, states and bad-data counts as
  decoding in the step, over several buffers and a resume mid-buffer, with the thread as far
  ahead as it may go; ``data.on_bad_data=raise``'s error of the thread raised by the step that
  reaches the bad sample, with the same message; no thread left after ``close()``, a resume, or
  a dropped loader (an evaluation's), nor after a run;
- configuration errors: no paths, a path without ``.tar`` files, fewer shards than ranks (but
  evaluation splits one held-out shard's samples over the ranks), a resume at another
  data-parallel size.
"""

from __future__ import annotations

import gc
import io
import json
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")
shard_files = import_path(
    Path(__file__).with_name("vlm_shard_files.py"), "forge_train_tests_vlm_shard_files"
)

CPU = torch.device("cpu")


def _write(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.write_bytes(shard_files.tar_bytes(members))
    return path


def _text_only(shard: int, n: int) -> list[tuple[str, bytes]]:
    return [
        (f"{shard}_t{i}.json", shard_files.chat(f"say {i}", f"number {i} said")) for i in range(n)
    ]


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    """The session's VLM data cache (the demo tokenizer, built once for every VLM module)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """3 shards: captions, a two-image conversation, text-only chats, one undecodable image."""
    root = tmp_path_factory.mktemp("vlm-shards")
    two_images = [("pair.0.png", shard_files.png(90)), ("pair.1.png", shard_files.png(91)),
                  ("pair.json", shard_files.chat("<image> and <image>: same?", "no, they differ"))]  # fmt: skip
    broken = [("broken.png", b"not a png at all"), ("broken.txt", b"lost caption")]
    _write(root / "a.tar", shard_files.captions(0, 4) + two_images + _text_only(0, 1))
    _write(root / "b.tar", shard_files.captions(1, 4) + broken + _text_only(1, 1))
    _write(root / "c.tar", shard_files.captions(2, 3) + _text_only(2, 2))
    return root


#: vlm-tiny, every part trained, on the shards; 4 steps of 2 micro-batches of 2 rows.
_RUN = (
    "recipe=vlm",
    "data=vlm-shards",
    "data.seq_len=64",
    "data.pack_buffer=6",
    "train.freeze=[]",
    "train.steps=4",
    "train.eval_batches=0",
    "optim.warmup_steps=1",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "checkpoint.export_hf=false",
)


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "grad_norm" in r]


def test_shards_train_count_bad_data_and_resume(tmp_path, shards, capsys):
    from forge_train.trainer import train

    def run(name: str, *extra: str):
        overrides = [*_RUN, f"data.paths=[{shards}]", f"train.output_dir={tmp_path / name}"]
        with tiny.reference_kernels():
            return train(tiny.compose_run_config([*overrides, "logging.log_every=1", *extra]))

    straight = run("straight", "checkpoint.interval=2", "checkpoint.keep_last_n=null")
    assert not _prefetch_threads()  # the run closed its loader's (and its evaluations')
    rows = _rows(Path(straight.run_dir))
    losses = [r["loss"] for r in rows]
    assert len(losses) == 4, losses
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
    # The undecodable image: counted (every pass of its shard), reported, never fatal.
    bad = [r["bad_samples"] for r in rows]
    assert bad[-1] >= 1, bad
    assert bad == sorted(bad), bad
    log = capsys.readouterr().out  # the run log's messages
    assert "undecodable media" in log, log
    assert "b.tar:broken" in log, log
    # Step 2's checkpoint resumes to the uninterrupted run's steps 3 and 4.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    step = "step_00000002"
    import shutil

    shutil.copytree(Path(straight.run_dir) / "checkpoints" / step, resumed_dir / step)
    resumed = run("resumed")
    assert resumed.start_step == 2
    resumed_rows = _rows(Path(resumed.run_dir))
    got = [[r["loss"], r["grad_norm"]] for r in resumed_rows]
    want = [[r["loss"], r["grad_norm"]] for r in rows[2:]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    # ... and reports its bad-data counts (the checkpoint keeps those before the buffer).
    assert [r["bad_samples"] for r in resumed_rows] == bad[2:], (resumed_rows, bad)


def _shard_data(shards: Path, *extra: str, paths: str | None = None):
    """``(run config, tokenizer, VLM config, VLMShardData)`` of vlm-tiny on ``shards``."""
    from forge_train.data import load_run_tokenizer
    from forge_train.vlm_model import vlm_model_config
    from forge_train.vlm_stream import build_shard_data

    cfg = tiny.compose_run_config(
        [*_RUN, f"data.paths=[{paths or shards}]", "train.output_dir=/nonexistent", *extra]
    )
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    data = build_shard_data(cfg.data, tokenizer, config, paths=cfg.data.paths, key="data.paths")
    return cfg, tokenizer, config, data


def _loader(data, *, dp_rank=0, dp_size=1, micro=1, shuffle=True, prefetch=None, log=True):
    from forge_train.vlm_stream import VLMStreamLoader

    return VLMStreamLoader(
        data, global_batch_rows=2, micro_batch_rows=micro, seed=3, dp_rank=dp_rank,
        dp_size=dp_size, pad_id=0, shuffle=shuffle, prefetch_buffers=prefetch, log_bad_data=log,
    )  # fmt: skip


def _flat(step: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's token ids and pixels, each joined over its micro-batches."""
    ids = [mb["input_ids"].reshape(-1) for mb in step]
    pixels = [mb["visual"]["image"]["pixel_values"].reshape(-1)
              for mb in step if "image" in mb["visual"]]  # fmt: skip
    return torch.cat(ids), torch.cat(pixels) if pixels else torch.zeros(0)


def _samples_of(step: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """A step's samples' ``(epoch, sample id, 0, tokens)`` and pixel blocks' ``(stream, epoch,
    sample id, 0, rows)`` (``pieces`` without the row, ``visual_pieces``), joined over its
    micro-batches."""
    return (
        torch.cat([mb["pieces"][:, 1:] for mb in step]),
        torch.cat([mb["visual_pieces"] for mb in step]),
    )


def test_loader_resumes_mid_buffer_to_the_same_batches(shards):
    """Positions inside a packing buffer, across buffers and epochs (5-sample buffers, 3
    shards): the resumed loader yields the uninterrupted one's batches."""
    _, _, _, data = _shard_data(shards, "data.pack_buffer=5")
    straight = _loader(data)
    for _ in range(3):
        next(straight)
    state = straight.state_dict()
    assert state["ranks"][0]["row"] > 0  # mid-buffer: the buffer is decoded again on resume
    assert state["ranks"][0]["bad"], state  # bad data read before the checkpoint
    steps = [(next(straight), dict(straight.bad_data.counts)) for _ in range(12)]
    expected = [(_flat(step), _samples_of(step), counts) for step, counts in steps]
    assert len({p[1] >> 32 for _, (p, _), _ in expected for p in p.tolist()}) > 1  # shards
    resumed = _loader(data, micro=2)  # micro_batch_rows may change
    resumed.load_state_dict(json.loads(json.dumps(state)))  # plain data, as checkpoints store it
    for want, samples, counts in expected:
        step = next(resumed)
        got = _flat(step)
        assert torch.equal(got[0], want[0])
        assert torch.equal(got[1], want[1])
        # the samples' identities, which key their LoRA dropout masks (forge_train.lora_dropout)
        for mine, theirs in zip(_samples_of(step), samples, strict=True):
            assert torch.equal(mine, theirs)
        # the bad data read before the checkpoint is still counted (not from 0 again)
        assert resumed.bad_data.counts == counts, (resumed.bad_data.counts, counts)
    assert straight.shards(0) != straight.shards(1) or len(data.urls) == 1  # reshuffled per epoch


def test_one_rank_of_those_reading_the_same_shards_logs_bad_data(shards, caplog):
    """Tensor-, context- and pipeline-parallel peers read one data-parallel rank's shards: each
    counts the undecodable image (the run log sums the counts over the data-parallel ranks
    only), and only the first of them (index 0 on pp, cp and tp) logs its warning."""
    from forge_train.vlm_stream import log_bad_data_here

    def mesh(**ranks):
        return SimpleNamespace(size=lambda axis: 2, local_rank=lambda axis: ranks.get(axis, 0))

    assert log_bad_data_here(None)
    assert log_bad_data_here(mesh(dp=1))  # another data-parallel rank reads other shards
    for axis in ("tp", "cp", "pp"):
        assert not log_bad_data_here(mesh(**{axis: 1})), axis
    _, _, _, data = _shard_data(shards, paths=str(shards / "b.tar"))  # the shard with it
    for logs in (False, True):
        loader = _loader(data, prefetch=0, log=logs)
        caplog.clear()
        with caplog.at_level("WARNING", logger="forge_data"):
            for _ in range(20):
                if loader.bad_data.counts:
                    break
                next(loader)
        assert loader.bad_data.counts == {"undecodable media": 1}, loader.bad_data.counts
        warned = [r for r in caplog.records if "undecodable media" in r.getMessage()]
        assert len(warned) == logs, warned


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "forge-vlm-prefetch"]


def _settled(loader):
    """``loader`` once its prefetch thread has decoded as far ahead as it may (or stopped), so
    that a state or count taken from the thread's progress instead of the step's would show."""
    prefetcher = loader._prefetcher
    if prefetcher is not None:
        deadline = time.monotonic() + 30
        while prefetcher.thread.is_alive() and time.monotonic() < deadline:
            if prefetcher._ready.qsize() >= loader.prefetch_buffers:
                break
            time.sleep(0.005)
    return loader


def test_prefetch_gives_the_same_batches_state_and_counts(shards):
    """Buffers decoded ahead (1 and 2) give the batches, ``state_dict`` and bad-data counts of
    decoding in the step, step after step over several 4-sample buffers and epochs, with the
    thread as far ahead as it goes; a resume mid-buffer from a prefetching loader's state
    gives them too, with or without prefetching."""
    _, _, _, data = _shard_data(shards, "data.pack_buffer=4")
    loaders = {n: _loader(data, prefetch=n) for n in (0, 1, 2)}
    for step in range(14):
        got = {}
        for n, loader in loaders.items():
            ids, pixels = _flat(next(loader))
            _settled(loader)
            got[n] = (ids, pixels, loader.state_dict(), dict(loader.bad_data.counts))
        for n in (1, 2):
            assert torch.equal(got[n][0], got[0][0]), (step, n)
            assert torch.equal(got[n][1], got[0][1]), (step, n)
            assert got[n][2:] == got[0][2:], (step, n, got[n][2:], got[0][2:])
        if step == 4:
            state = got[1][2]
    assert state["ranks"][0]["row"] > 0, state  # mid-buffer
    assert loaders[0].bad_data.counts, "the shards' bad image was met"
    assert loaders[0].state_dict()["ranks"][0]["epoch"] >= 1, "several epochs were read"
    for n in (0, 1):
        straight, resumed = _loader(data, prefetch=0), _loader(data, prefetch=n)
        straight.load_state_dict(state)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        for _ in range(6):
            want, got = _flat(next(straight)), _flat(next(resumed))
            assert torch.equal(got[0], want[0])
            assert torch.equal(got[1], want[1])
            _settled(resumed)
            assert resumed.state_dict() == straight.state_dict()
            assert resumed.bad_data.counts == straight.bad_data.counts
        resumed.close()
    for loader in loaders.values():
        loader.close()


def test_prefetch_raises_bad_data_at_the_step_that_reaches_it(shards):
    """``data.on_bad_data=raise`` with the bad image decoded ahead: the step that reaches it
    raises the error decoding in the step raises, at the same step, with the same message;
    no step before it does (though the thread met it long before), and a later ``next()``
    raises it again instead of waiting for a thread that has stopped."""
    from forge_data.multimodal import BadSampleError

    _, _, _, data = _shard_data(shards, "data.pack_buffer=4", "data.on_bad_data=raise")

    def first_error(prefetch: int) -> tuple[int, str, object, bool]:
        """The step that raises, its message (no object address), the loader, and whether
        the thread had met the error (and stopped) before that step."""
        loader, met = _loader(data, prefetch=prefetch), False
        for step in range(40):
            try:
                next(loader)
            except BadSampleError as err:
                return step, re.sub(r"0x[0-9a-f]+", "0x?", str(err)), loader, met
            met = prefetch > 0 and not _settled(loader)._prefetcher.thread.is_alive()
        raise AssertionError("the bad image was never reached")

    step, message, _, _ = first_error(0)
    assert "b.tar:broken" in message, message
    assert "data.on_bad_data=skip" in message, message
    assert step > 0
    got_step, got_message, loader, met = first_error(1)
    assert met, "the thread decodes ahead: it met the bad image a step before"
    assert (got_step, got_message) == (step, message)
    with pytest.raises(BadSampleError, match=r"b\.tar:broken"):
        next(loader)
    loader.close()
    assert not _prefetch_threads()


def test_prefetch_thread_stops_on_close_resume_and_collection(shards):
    """The prefetch thread ends when the loader is closed (a later ``next()`` goes on with
    the batches it would have given), when it loads a state (the thread decoding the old
    position is replaced, not added to) and when the loader is dropped, as an evaluation's
    loader is after its batches."""
    _, _, _, data = _shard_data(shards, "data.pack_buffer=4")
    assert not _prefetch_threads()
    reference = _loader(data, prefetch=0)
    want = [_flat(next(reference)) for _ in range(4)]
    loader = _loader(data, prefetch=1)
    next(loader)
    assert len(_prefetch_threads()) == 1
    _settled(loader).close()
    assert not _prefetch_threads()
    for ids, pixels in want[1:]:
        got = _flat(next(loader))  # starts a new thread where the step is
        assert torch.equal(got[0], ids)
        assert torch.equal(got[1], pixels)
    state = loader.state_dict()
    loader.load_state_dict(state)
    next(loader)
    assert len(_prefetch_threads()) == 1
    loader.close()

    def evaluate():  # forge_train.evaluation.held_out_loss's use: a loader per evaluation
        held_out = _loader(data, prefetch=1, shuffle=False)
        return [next(held_out) for _ in range(2)]

    evaluate()
    # The end of a run: forge_train.loop.Trainer.close closes the training loader, which the
    # trainer (kept by its caller) still references.
    from forge_train.loop import Trainer

    loader = _loader(data, prefetch=1)
    next(loader)
    trainer = SimpleNamespace(log=SimpleNamespace(close=lambda: None), parts=SimpleNamespace())
    trainer.parts.loader = loader
    Trainer.close(trainer)
    assert not _prefetch_threads()
    loader = _loader(data, prefetch=2)
    next(_settled(loader))
    del loader
    gc.collect()  # not needed on CPython (reference counting); other interpreters
    assert not _prefetch_threads()


def test_text_only_micro_batch_runs_the_encoder_with_zero_gradients(shards):
    """A micro-batch of text-only samples carries ``dummy_visual``: the model's loss is the
    one without it (bit for bit) and the encoder and projector get zero gradients instead of
    ``None`` (which, under FSDP / TP of the encoder, meant a rank skipping its collectives);
    with the encoder frozen it runs too."""
    from forge_data.tar_shards import tar_samples
    from forge_models.vlm import build_vlm
    from forge_train.data import model_inputs
    from forge_train.vlm_data import collate_micro_batches

    _, _, config, data = _shard_data(shards)
    texts = [data.dataset.decode(raw) for raw in tar_samples(str(shards / "c.tar"))]
    texts = [s for s in texts if s is not None and "image" not in s["visual"]]
    assert len(texts) == 2
    (batch,) = collate_micro_batches([texts], data, micro_batch_rows=1, pad_id=0)
    assert "dummy_visual" in batch
    kwargs, _ = model_inputs(batch, CPU)
    assert "images" not in kwargs
    assert "dummy_visual" in kwargs
    torch.manual_seed(0)
    model = build_vlm(config)
    plain = {k: v for k, v in kwargs.items() if k != "dummy_visual"}
    with torch.no_grad():
        assert torch.equal(model(**kwargs), model(**plain))
    model(**kwargs).backward()
    for part in (model.vision, model.projector):
        for name, p in part.named_parameters():
            assert p.grad is not None, name
            assert not p.grad.any(), name
    model.zero_grad(set_to_none=True)
    model.set_trainable(vision=False)  # train.freeze=[vision]
    model(**kwargs).backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None for p in model.projector.parameters())


def _one_step(shards: str, output_dir: str, *layout: str) -> list[float]:
    """``[loss, gradient norm]`` of one step on a fixed global batch of 2 rows: an image row
    and a text-only row (each data-parallel rank takes its own: rank 1's is text-only). Also
    a pool job."""
    from forge_data.tar_shards import tar_samples
    from forge_train.loop import Trainer
    from forge_train.vlm_data import collate_micro_batches

    cfg = tiny.compose_run_config(
        [*_RUN, f"data.paths=[{shards}]", f"train.output_dir={output_dir}",
         "data.global_batch_rows=2", "data.micro_batch_rows=1", *layout]
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        with tiny.reference_kernels():
            trainer._build()
            parts = trainer.parts
            data = parts.data.train
            decoded = [data.dataset.decode(r) for r in tar_samples(str(Path(shards) / "a.tar"))]
            decoded = [s for s in decoded if s is not None]
            images = [s for s in decoded if "image" in s["visual"]][:3]
            texts = [s for s in decoded if "image" not in s["visual"]]
            batches = collate_micro_batches(
                [images, texts], data, micro_batch_rows=1, pad_id=parts.pad_id
            )
            assert "dummy_visual" in batches[1]
            assert "dummy_visual" not in batches[0]
            mine = batches if parts.dp_size == 1 else [batches[parts.dp_rank]]
            loss, grad_norm, _ = trainer.runner.run(0, mine)
            # The run log's bad data: only the last data-parallel rank has met any.
            if parts.dp_size > 1 and parts.dp_rank == parts.dp_size - 1:
                parts.loader.bad_data.add("undecodable media", f"rank{parts.dp_rank}.tar:x")
            bad = trainer._bad_data()
    finally:
        trainer.close()
    return [float(loss), float(grad_norm)], bad


def test_text_only_rank_under_fsdp2_matches_one_process(tmp_path, shards, video_shards, dist_pool):
    """FSDP2 over 2 ranks, rank 1's micro-batch text-only: the encoder's all-gathers and
    reduce-scatters run on both ranks (without the stand-in image rank 1 skipped them: a
    collective mismatch, gloo's "Received data size doesn't match expected size", a hang on
    NCCL), and the loss and gradient norm are one process's on the same global batch. Also
    CP2, whose ranks both run the text-only micro-batch.

    Then rank 0's micro-batch holds an image and a video, rank 1's an image only, under EP2
    (a MoE language model: the encoder and the projector are sharded apart, the encoder block
    by block, over the 2 data-parallel ranks): Qwen2.5-VL encodes both kinds in one call (two
    calls made two sets of the encoder's all-gathers on rank 0, one on rank 1: the mismatch
    above), and LLaVA-OneVision, whose projector takes each kind apart, runs its projector for
    both kinds on every micro-batch (a stand-in for the missing one)."""
    single, bad = _one_step(str(shards), str(tmp_path / "single"))
    assert bad == ({}, None)
    pool = dist_pool(2)
    ranks = pool.run(_one_step, str(shards), str(tmp_path / "fsdp2"), "parallel=fsdp", timeout=240)
    for rank, bad in ranks:
        torch.testing.assert_close(torch.tensor(rank), torch.tensor(single), rtol=1e-5, atol=1e-6)
        # summed over the ranks, and rank 1's location given though rank 0 has none
        assert bad == ({"undecodable media": 1}, "rank1.tar:x"), bad
    # CP2: the text-only micro-batch's row is cut over the context-parallel ranks like an
    # image row (the whole row's stand-in features, then this rank's positions).
    ranks = pool.run(
        _one_step, str(shards), str(tmp_path / "cp2"), "parallel=cp2-fsdp", timeout=240
    )
    torch.testing.assert_close(
        torch.tensor(ranks[0][0]), torch.tensor(single), rtol=1e-5, atol=1e-6
    )
    videos, ep2 = str(video_shards), ("parallel=ep2-fsdp", _MOE)
    single = _mixed_step(videos, str(tmp_path / "qwen"), "qwen2_5-vl-tiny", _MOE)
    ranks = pool.run(_mixed_step, videos, str(tmp_path / "qwen-ep2"), "qwen2_5-vl-tiny", *ep2)
    for rank in ranks:
        torch.testing.assert_close(torch.tensor(rank), torch.tensor(single), rtol=1e-5, atol=1e-6)
    ranks = pool.run(_mixed_step, videos, str(tmp_path / "llava-ep2"), "llava-ov-tiny", *ep2)
    assert ranks[0] == ranks[1], ranks
    assert all(np.isfinite(ranks[0])), ranks


#: A mixture-of-experts language model (for EP2, which shards the encoder on its own).
_MOE = "+model.config.text.moe={num_experts:4,num_experts_per_tok:2,moe_intermediate_size:32}"


def _frames(seed: int, n: int = 2, size=(28, 28)) -> bytes:
    """``n`` RGB frames as the ``key.frames.npy`` of a webdataset sample."""
    out = io.BytesIO()
    frames = np.random.default_rng(seed).integers(0, 255, (n, *size, 3), dtype=np.uint8)
    np.save(out, frames)
    return out.getvalue()


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory) -> Path:
    """2 shards: a conversation about an image and a video; two image captions."""
    root = tmp_path_factory.mktemp("vlm-video-shards")
    both = [("both.png", shard_files.png(70)), ("both.frames.npy", _frames(71)),
            ("both.json", shard_files.chat("<image> then <video>: what moved?", "the dots"))]  # fmt: skip
    _write(root / "v.tar", both)
    _write(root / "w.tar", shard_files.captions(7, 2))
    return root


def _mixed_step(shards: str, output_dir: str, model: str, *layout: str) -> list[float]:
    """``[loss, gradient norm]`` of one step of ``model`` on a global batch of 2 rows: one
    holding an image and a video, one an image only (each data-parallel rank takes its own).
    A pool job."""
    from forge_data.tar_shards import tar_samples
    from forge_train.loop import Trainer
    from forge_train.vlm_data import collate_micro_batches

    cfg = tiny.compose_run_config(
        [*_RUN, f"model={model}", f"data.paths=[{shards}]", f"train.output_dir={output_dir}",
         "data.seq_len=256", "data.global_batch_rows=2", "data.micro_batch_rows=1", *layout]
    )  # fmt: skip
    trainer = Trainer(cfg)
    try:
        with tiny.reference_kernels():
            trainer._build()
            parts = trainer.parts
            data = parts.data.train
            raw = [r for name in ("v", "w") for r in tar_samples(str(Path(shards) / f"{name}.tar"))]
            decoded = [data.dataset.decode(r) for r in raw]
            both = [s for s in decoded if "video" in s["visual"]]
            images = [s for s in decoded if "video" not in s["visual"]]
            assert len(both) == 1, decoded
            assert "image" in both[0]["visual"], decoded
            batches = collate_micro_batches(
                [both, images[:1]], data, micro_batch_rows=1, pad_id=parts.pad_id
            )
            assert set(batches[0]["visual"]) >= {"image", "video"}
            assert "video" not in batches[1]["visual"]
            mine = batches if parts.dp_size == 1 else [batches[parts.dp_rank]]
            loss, grad_norm, _ = trainer.runner.run(0, mine)
    finally:
        trainer.close()
    return [float(loss), float(grad_norm)]


def test_configuration_errors(tmp_path, shards):
    from forge_train.config import ConfigError
    from forge_train.vlm_stream import resolve_shards

    with pytest.raises(ConfigError, match=r"data\.paths.*data\.kind=vlm_shards needs"):
        tiny.compose_run_config([*_RUN, "train.output_dir=/nonexistent"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no shards here")
    for path, what in [
        (tmp_path / "empty", "holds or matches no .tar file"),
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "empty" / "*.tar", "holds or matches no .tar file"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"data.val_paths: '{path}' {what}")):
            resolve_shards([str(shards), str(path)], "data.val_paths")
    assert resolve_shards([f"{shards}/{{a,b}}.tar", str(shards)], "data.paths") == [
        str(shards / n) for n in ("a.tar", "b.tar", "c.tar")
    ]
    _, _, _, data = _shard_data(shards, paths=f"{shards}/a.tar")
    with pytest.raises(
        ConfigError, match=r"1 shard file\(s\) for 2 data-parallel ranks.*at least 2"
    ):
        _loader(data, dp_size=2)
    # ... but evaluation (no shuffling) of a one-shard held-out set at dp=2 reads it: each
    # rank its share of the samples (6 in a.tar: 3 each), none read twice.
    keys = [
        {s["key"] for s in _loader(data, dp_rank=r, dp_size=2, shuffle=False)._take().samples}
        for r in (0, 1)
    ]
    assert len(keys[0]) == len(keys[1]) == 3, keys
    assert not keys[0] & keys[1], keys
    # The order depends on the data-parallel size: a resume at another one is refused (a
    # ConfigError: the command line prints it, no traceback).
    _, _, _, data = _shard_data(shards)
    state = _loader(data).state_dict()
    with pytest.raises(ConfigError, match=r"cannot resume.*dp_size=1.*new run"):
        _loader(data, dp_size=2).load_state_dict(state)
