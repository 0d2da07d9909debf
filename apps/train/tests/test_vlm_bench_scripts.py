"""The scripts of ``tools/device/session.sh vlm`` (``apps/train/benchmarks``), checked cheaply
here, since the GPU machine runs them unattended and a mistake there costs a session's figures:

- ``make_vlm_shards.py``: every kind of sample it writes (one- and two-image conversations,
  captions, text-only) decodes through forge-train's ``data=vlm-shards`` reader with no bad
  data (a marker without its image would be skipped silently on the GPU and the figures would
  be of less data), and the same flags write the same bytes;
- ``bench_vlm_train.py``: the loader wrapper times each ``next()`` and forwards the rest, stops
  at ``--deadline``, and the summary joins each ``metrics.jsonl`` row with its steps' waits, on
  forge-train's clock, leaving the first (warm-up) window out of the steady state.
"""

from __future__ import annotations

import tarfile
import time
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
shards_script = import_path(BENCHMARKS / "make_vlm_shards.py", "forge_train_make_vlm_shards")
train_script = import_path(BENCHMARKS / "bench_vlm_train.py", "forge_train_bench_vlm_train")

SMALL = ["--shards", "2", "--per-shard", "8", "--min-px", "32", "--max-px", "72",
         "--two-image-fraction", "0.3", "--caption-fraction", "0.3",
         "--text-only-fraction", "0.2", "--png-fraction", "0.5", "--workers", "1"]  # fmt: skip


def test_synthetic_shards_decode_without_bad_data(tmp_path, capsys):
    """All samples of a mixed shard set decode and pack (``qwen2_5-vl-tiny``'s processor, the
    demo tokenizer), each kind is present, and a second write is byte-identical."""
    from forge_train.compose import compose_run_config
    from forge_train.data import load_run_tokenizer
    from forge_train.vlm_model import vlm_model_config
    from forge_train.vlm_stream import VLMStreamLoader, build_shard_data

    assert shards_script.main(["--out", str(tmp_path / "a"), *SMALL]) == 0
    assert shards_script.main(["--out", str(tmp_path / "b"), *SMALL]) == 0
    assert "2 shards x 8 = 16 samples" in capsys.readouterr().out
    for name in ("shard-0000.tar", "shard-0001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    names = []
    for shard in sorted((tmp_path / "a").glob("*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    kinds = {
        "two images": any(n.endswith((".1.jpg", ".1.png")) for n in names),
        "caption": any(n.endswith(".txt") for n in names),
        "png": any(n.endswith(".png") for n in names),
        "text only": any(
            n.endswith(".json") and not any(m.startswith(n[:-5] + ".") and m != n for m in names)
            for n in names
        ),
    }
    assert all(kinds.values()), kinds

    cfg = compose_run_config(
        [
            "recipe=vlm",
            "model=qwen2_5-vl-tiny",
            "data=vlm-shards",
            f"data.paths=[{tmp_path / 'a'}]",
            "data.seq_len=512",
            "data.max_tiles=4",
            "data.pack_buffer=16",
            "train.output_dir=/nonexistent",
        ]
    )
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=[])
    data = build_shard_data(cfg.data, tokenizer, config, paths=cfg.data.paths, key="data.paths")
    loader = VLMStreamLoader(
        data, global_batch_rows=2, micro_batch_rows=2, seed=0, dp_rank=0, dp_size=1, pad_id=0,
        prefetch_buffers=0,
    )  # fmt: skip
    try:
        images = 0
        for _ in range(3):  # more rows than the 16 samples fill: the whole buffer is decoded
            for mb in next(loader):
                grid = (mb["visual"].get("image") or {}).get("grid_thw")
                images += 0 if grid is None else grid.shape[0]
        assert loader.bad_data.total == 0, loader.bad_data.records[:3]
        assert images > 0
    finally:
        loader.close()


class _Batches:
    """A loader stand-in: each ``next()`` sleeps ``wait`` s and returns one micro-batch of 10
    input tokens with two images of 4 patches each."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.closed = False

    def __next__(self):
        time.sleep(self.wait)
        grid = torch.tensor([[1, 2, 2], [1, 2, 2]])
        return [
            {
                "input_ids": torch.ones(1, 10, dtype=torch.long),
                "visual": {"image": {"grid_thw": grid}},
            }
        ]

    def close(self) -> None:
        self.closed = True


def test_timed_loader_and_summary(capsys):
    """Waits are timed per ``next()``, other attributes forwarded; windows are printed as they
    end; the deadline stops the run; the summary's wall time is the row's tokens over its
    tokens/s, and the steady state is the median of the windows after the first."""
    inner = _Batches(0.02)
    loader = train_script.TimedLoader(inner, log_every=2, deadline=None)
    for _ in range(6):
        next(loader)
    loader.close()
    assert inner.closed
    assert len(loader.waits) == 6
    assert min(loader.waits) >= 0.02
    assert (loader.tokens, loader.images, loader.patches) == ([10] * 6, [2] * 6, [8] * 6)
    printed = capsys.readouterr().out
    assert "loader | steps 1-2 |" in printed
    assert "loader | steps 3-4 |" in printed
    assert "2.0 images, 8 patches per step" in printed

    # Rows at steps 2, 4, 6: 20 tokens per window; 10 tokens/s is 1 s per step.
    rows = [
        {"step": s, "loss": 1.0, "tokens_per_s": tps, "mfu": m, "memory_gb": 2.0}
        for s, tps, m in ((2, 2.0, 0.1), (4, 10.0, 0.4), (6, 10.0, 0.5))
    ]
    rows[-1]["bad_samples"] = 0
    lines = train_script.summary(rows, loader, 2)
    step4 = next(line for line in lines if line.split()[0] == "4")
    assert step4.split()[5] == "1.000"  # wall s per step: 20 tokens / 10 tokens/s / 2 steps
    wait4 = (loader.waits[2] + loader.waits[3]) / 2
    assert step4.split()[6] == f"{wait4:.3f}"
    steady = lines[-1]
    assert steady.startswith("steady state (median of 2 windows of 2 steps after the first)")
    for figure in ("10 tokens/s", "MFU 45.0%", "0 bad samples"):
        assert figure in steady

    late = train_script.TimedLoader(_Batches(0.0), log_every=2, deadline=time.perf_counter() - 1)
    with pytest.raises(train_script.StopRunError, match="after 0 steps"):
        next(late)
