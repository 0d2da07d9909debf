"""4-process layouts of the tiny run against one process (issue 8's acceptance): tensor x data
parallel (TP2 x FSDP2) and pipeline x data parallel (PP2 x FSDP2) give the single-process
losses, and a checkpoint saved by the pipeline run resumes in one process with the losses the
pipeline run went on to have."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Two micro-batches per data-parallel rank (the pipeline's micro-batches), tiny steps.
_RUN = (
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=4",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
)
#: The input and output embeddings of a pipeline live on different stages: untied.
_UNTIED = ("model.config.tie_word_embeddings=false",)


def _losses(root: str, name: str, *overrides: str) -> list[float]:
    return tiny.run_losses(f"{root}/{name}", *_RUN, *overrides)


def _close(ranks: list[list[float]], single: list[float]) -> None:
    assert all(r == ranks[0] for r in ranks), ranks  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-5)


def test_tp2_fsdp2_and_pp2_fsdp2_match_one_process(tmp_path, dist_pool):
    pool = dist_pool(4)
    root = str(tmp_path)
    _close(pool.run(_losses, root, "tp2", "parallel=tp2-fsdp"), _losses(root, "tied"))
    pipeline = pool.run(
        _losses, root, "pp2", "parallel=pp2-fsdp", "checkpoint.interval=2", *_UNTIED
    )
    single = _losses(root, "untied", *_UNTIED)
    _close(pipeline, single)
    # Resume the pipeline run's step-2 checkpoint (PP2 x FSDP2) in one process.
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(
        tmp_path / "pp2" / "checkpoints" / "step_00000002", resumed_dir / "step_00000002"
    )
    resumed = _losses(root, "resumed", *_UNTIED)
    torch.testing.assert_close(
        torch.tensor(resumed), torch.tensor(pipeline[0][2:]), rtol=1e-5, atol=1e-5
    )
