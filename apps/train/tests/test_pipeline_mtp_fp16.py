"""A language model's pipeline (forge_train.pipeline_model) with multi-token prediction under
tensor parallelism and under the zero-bubble schedule (forge_train.pipeline_head computes the
main and the depths' losses from their logits there), and with fp16 loss scaling (the last
stage's loss multiplied by the scale, the found-inf flags summed over every rank so that every
stage skips the same overflowing step: forge_train.step.loss_scaler), each against one process:
per-step losses and gradient norms."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Two steps of the tiny run with 2 micro-batches per data-parallel rank (pp2: dp 2 or tp 2).
_RUN = (*tiny.TINY, *tiny.TWO_STEPS)
_MTP = ("+model.config.mtp_depth=1", "+model.config.mtp_loss_weight=0.5")


def _metrics(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, grad norm]`` of the tiny run (a pool job; rank 0's are the run's)."""
    return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={output_dir}", *overrides)


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_multi_token_prediction_under_pp2_tp2_and_zero_bubble(tmp_path, dist_pool):
    """The module on the last stage: PP2 x TP2 + SP (split like a decoder layer on the rank's
    sequence shard, its and the main head's logits vocabulary-sharded, the vocabulary-parallel
    cross-entropy) and PP2 x FSDP2 under the zero-bubble schedule (its backward split into
    input and weight gradients through the loss of the logits) give the single process's
    losses and gradient norms."""
    root = str(tmp_path)
    pool = dist_pool(4)
    single = _metrics(f"{root}/single", *_MTP)
    # the logged loss: the main cross-entropy alone, about ln(vocab) (the module's is logged
    # apart and weighted into the gradient only); the pipeline's must subtract it alike
    assert abs(single[0][0] - math.log(8192)) < 0.2 * math.log(8192)
    for name, layout in (
        ("pp2_tp2_sp", ("parallel.tp=2", "parallel.sequence_parallel=true")),
        ("pp2_zero_bubble", ("parallel.pp_schedule=zero_bubble",)),
    ):
        ranks = pool.run(_metrics, f"{root}/{name}", *_MTP, "parallel=pp2-fsdp", *layout)
        _close(ranks, single)


#: fp16 from a loss scale that doubles after every step without an overflow and drops 16-fold
#: after one: from 2^20 the tiny run's third step overflows (at 2^22) and is skipped, the fourth
#: runs at 2^18.
_SCALER_STATE = {
    "scale": 2.0**20,
    "growth_factor": 2.0,
    "backoff_factor": 1 / 16,
    "growth_interval": 1,
    "_growth_tracker": 0,
}


def _fp16_metrics(output_dir: str, *overrides: str, data_parallel: int = 1) -> list[list[float]]:
    """``_metrics`` in fp16 with the scaler started from ``_SCALER_STATE`` (a pool job), its
    scale divided by ``data_parallel``: a data-parallel rank's loss is its share of the global
    batch's mean (forge_train.step), ``data_parallel`` times one process's weight per token
    (the ranks' gradients are averaged after the backward), so the same fp16 products, up to a
    power of two, overflow or not at a scale that many times lower."""
    import forge_train.step as step_module

    make = step_module.loss_scaler
    state = {**_SCALER_STATE, "scale": _SCALER_STATE["scale"] / data_parallel}

    def scaler(device, precision):
        made = make(device, precision)
        made.load_state_dict(state)
        return made

    with mock.patch.object(step_module, "loss_scaler", scaler):
        return _metrics(output_dir, "train.precision=fp16", "train.steps=4", *overrides)


def test_fp16_loss_scaling_under_pp2_fsdp2(tmp_path, dist_pool):
    """PP2 x FSDP2 in fp16 gives the losses and gradient norms of one fp16 process with the
    same scaler, through a step that overflows (its norm non-finite; skipped on every rank, or
    the next step's loss would differ) and the step after it (the same scale on every rank)."""
    root = str(tmp_path)
    single = torch.tensor(_fp16_metrics(f"{root}/single"))
    finite = torch.isfinite(single[:, 1])
    assert finite.tolist() == [True, True, False, True], single  # overflow, then recovery
    ranks = dist_pool(4).run(_fp16_metrics, f"{root}/pp2", "parallel=pp2-fsdp", data_parallel=2)
    pipeline = torch.tensor(ranks[0])
    assert torch.equal(torch.isfinite(pipeline[:, 1]), finite), (pipeline, single)
    torch.testing.assert_close(pipeline[:, 0], single[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pipeline[finite, 1], single[finite, 1], rtol=1e-5, atol=1e-6)


def _scaler_after_an_overflow_on_rank_0() -> tuple[list[float], float]:
    """``(parameter after the step, next scale)`` of a one-parameter SGD step under
    ``loss_scaler`` whose gradient overflowed on rank 0 only (a pool job)."""
    import torch.distributed as dist

    from forge_train.step import loss_scaler

    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scaler = loss_scaler(torch.device("cpu"), "fp16")
    scaler.scale(weight.sum()).backward()
    if dist.get_rank() == 0:  # e.g. one stage's or one shard's gradients
        weight.grad[0] = math.inf
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    return weight.detach().tolist(), scaler.get_scale()


def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(dist_pool):
    """The found-inf flags are summed over all ranks: no rank steps, every rank halves the
    scale (a rank stepping alone would leave the stages or shards out of step)."""
    ranks = dist_pool(4).run(_scaler_after_an_overflow_on_rank_0)
    assert ranks == [([1.0, 1.0], 2.0**15)] * 4, ranks
