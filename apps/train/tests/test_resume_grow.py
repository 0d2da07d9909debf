"""A checkpoint resumed on more processes than wrote it: every rank's data loader goes on from
the saved step (forge-ckpt stores the loader's state once, the same on every rank), so the
resumed data-parallel run has the losses and gradient norms the uninterrupted one had."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (
    *tiny.TINY,
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "train.steps=4",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "checkpoint.keep_last_n=null",
)


def _norms(output_dir: str, *overrides: str) -> list[list[float]]:
    return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={output_dir}", *overrides)


def test_one_process_checkpoint_resumes_on_two_ddp_ranks(tmp_path, dist_pool):
    single = _norms(str(tmp_path / "single"), "checkpoint.interval=2")
    assert len(single) == 4
    step = "step_00000002"
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    shutil.copytree(tmp_path / "single" / "checkpoints" / step, resumed / step)
    # Before forge-ckpt stored the loader once, rank 1 restarted its loader at step 0.
    ranks = dist_pool(2).run(_norms, str(tmp_path / "resumed"), "parallel=ddp")
    torch.testing.assert_close(
        torch.tensor(ranks[0]), torch.tensor(single[2:]), rtol=1e-5, atol=1e-6
    )
