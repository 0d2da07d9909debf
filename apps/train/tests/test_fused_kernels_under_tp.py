"""forge-kernels' Triton kernels (interpreted here, compiled on a GPU) inside tensor-parallel
layouts. Tensor parallelism hands the first norm a pending collective (the vocab-parallel
embedding's ``AsyncCollectiveTensor``) and, with sequence parallelism, ran the norms on
DTensors: a Triton launch on either has no storage to read ("Attempted to access the data
pointer on an invalid python storage" here, the same failed launch on a GPU). The rest of the
suite runs the eager references, so only this test sees the fused path under TP.

TP2 and TP2 + SP (x FSDP2) with the fused kernels give the single process's losses and gradient
norms, and the fused RMSNorm ran forward and backward on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

_RUN = (
    *tiny.TINY_RUN,
    "data.global_batch_rows=4",
    "data.micro_batch_rows=2",
    "train.steps=1",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
)


def _fused_run(output_dir: str, *overrides: str) -> tuple[list[list[float]], int, int]:
    """Per-step ``[loss, gradient norm]`` with the fused kernels, and how many times this
    rank launched the fused RMSNorm's forward and backward kernels (a pool job)."""
    from forge_kernels.norms.rms_norm_kernels import KERNEL_LAUNCHES

    forward, backward = KERNEL_LAUNCHES["rms_norm_fwd"], KERNEL_LAUNCHES["rms_norm_bwd"]
    rows = tiny.train_losses_and_norms(
        *tiny.TINY_MODEL, *_RUN, f"train.output_dir={output_dir}", *overrides, fused=True
    )
    return (
        rows,
        KERNEL_LAUNCHES["rms_norm_fwd"] - forward,
        KERNEL_LAUNCHES["rms_norm_bwd"] - backward,
    )


def test_fused_kernels_under_tp2_match_one_process(tmp_path, dist_pool):
    single, forward, backward = _fused_run(f"{tmp_path}/single")
    assert forward > 0
    assert backward > 0
    pool = dist_pool(4)
    for sp in ("false", "true"):
        ranks = pool.run(
            _fused_run, f"{tmp_path}/tp2_sp_{sp}", "parallel=tp2-fsdp",
            f"parallel.sequence_parallel={sp}",
        )  # fmt: skip
        torch.testing.assert_close(
            torch.tensor(ranks[0][0]), torch.tensor(single), rtol=1e-5, atol=1e-6
        )
        # every norm of every micro-batch through the fused kernel, as on one process (each
        # of the 2 data-parallel ranks runs half of the micro-batches)
        assert all(rank[1:] == (forward // 2, backward // 2) for rank in ranks), (sp, ranks)
