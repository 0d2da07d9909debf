"""fp16 loss scaling (forge_train.step.loss_scaler: Micikevicius et al. 2018, "Mixed Precision
Training") under DDP, ZeRO-1, ZeRO-2 and TP2 + SP x FSDP2, and of a MoE model with the switch
balance loss and the expert bias under PP2 x FSDP2, each against one fp16 process across a step
that overflows: per-step losses, gradient norms and the skipped steps; that MoE model in bf16;
and a run resumed in another precision than its checkpoint was written in (forge-ckpt's
``optional_extra``)."""

from __future__ import annotations

import math
from pathlib import Path
from unittest import mock

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Three fp16 steps of 8 rows (2 micro-batches per rank at dp 2) of a tiny run; the model's
#: overrides come with each run.
_RUN = (*tiny.TINY_RUN, *tiny.TWO_STEPS, "train.precision=fp16", "train.steps=3")

#: A loss scale that doubles after every step without an overflow and drops 16-fold after one:
#: from 2^21 the tiny run's second step overflows (at 2^22) and is skipped, the third runs at
#: 2^18 (test_pipeline_mtp_fp16 starts one step earlier).
_SCALER_STATE = {
    "scale": 2.0**21,
    "growth_factor": 2.0,
    "backoff_factor": 1 / 16,
    "growth_interval": 1,
    "_growth_tracker": 0,
}


#: tiny-moe (every layer MoE, top-2 of 8 experts) with transformers' switch balance loss weighted
#: so that it moves the losses and DeepSeek-V3's aux-loss-free expert bias.
_MOE = (
    "model=tiny-moe",
    "+model.config.moe.aux_loss=switch",
    "model.config.moe.router_aux_loss_coef=0.5",
    "+model.config.moe.expert_bias=true",
)


def _fp16_metrics(
    output_dir: str, *overrides: str, data_parallel: int = 1, scale: float = _SCALER_STATE["scale"]
) -> list[list[float]]:
    """Per-step ``[loss, grad norm]`` of the fp16 tiny run with the scaler started from
    ``_SCALER_STATE`` at ``scale`` (also a pool job: rank 0's are the run's), its scale divided by
    ``data_parallel``: a data-parallel rank's loss is its share of the global batch's mean
    (forge_train.step), ``data_parallel`` times one process's weight per token (the ranks'
    gradients are averaged after the backward), so the same fp16 products, up to a power of
    two, overflow or not at a scale that many times lower."""
    import forge_train.step as step_module

    make = step_module.loss_scaler
    state = {**_SCALER_STATE, "scale": scale / data_parallel}

    def scaler(device, precision):
        made = make(device, precision)
        made.load_state_dict(state)
        return made

    with mock.patch.object(step_module, "loss_scaler", scaler):
        return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={output_dir}", *overrides)


def _assert_matches(ranks: list[list[list[float]]], single: torch.Tensor, rtol: float) -> None:
    """Rank 0's metrics against one process's: the same overflowing (non-finite norm, skipped)
    steps, the same losses (a step one layout applied and the other skipped moves every later
    loss) and the same finite gradient norms, within ``rtol`` (the losses within 1e-4 at most)."""
    layout = torch.tensor(ranks[0])
    finite = torch.isfinite(single[:, 1])
    assert torch.equal(torch.isfinite(layout[:, 1]), finite), (layout, single)
    loss_rtol = min(rtol, 1e-4)
    torch.testing.assert_close(layout[:, 0], single[:, 0], rtol=loss_rtol, atol=1e-6)
    torch.testing.assert_close(layout[finite, 1], single[finite, 1], rtol=rtol, atol=1e-6)


def test_fp16_under_ddp_zero1_zero2_and_tp2_sp_fsdp2(tmp_path, dist_pool):
    """DDP, ZeRO-1 and ZeRO-2 over 4 ranks (ZeRO's optimizer holds shards: the gradients are
    reduced before the scaler unscales them and looks for infinities,
    forge_train.step.StepRunner.unscale) skip the overflowing step one fp16 process skips and
    give its losses and gradient norms; so does TP2 + SP x FSDP2, within fp16's rounding of
    the sharded matmuls' partial sums: the row-parallel linears' partial products are rounded
    to fp16 before the all-reduce, one process rounds the fp32-accumulated sum once. Measured
    without loss scaling: norms 3.8e-4 and losses 1.1e-5 apart (bf16, the same layout: norms
    2.3e-3, about fp16's 8-fold coarser precision); fp32 TP matches to 1e-5
    (test_train_parallel)."""
    root = str(tmp_path)
    single = torch.tensor(_fp16_metrics(f"{root}/single", *tiny.TINY_MODEL))
    assert torch.isfinite(single[:, 1]).tolist() == [True, False, True], single
    pool = dist_pool(4)
    for name, layout, dp, rtol in (
        ("ddp", ("parallel=ddp",), 4, 1e-5),
        ("zero1", ("parallel=ddp", "parallel.data_parallel=zero1"), 4, 1e-5),
        ("zero2", ("parallel=ddp", "parallel.data_parallel=zero2"), 4, 1e-5),
        ("tp2_sp", ("parallel=tp2-fsdp", "parallel.sequence_parallel=true"), 2, 2e-3),
    ):
        ranks = pool.run(
            _fp16_metrics, f"{root}/{name}", *tiny.TINY_MODEL, *layout, data_parallel=dp
        )
        _assert_matches(ranks, single, rtol)


def test_fp16_moe_switch_loss_and_expert_bias_under_pp2_fsdp2(tmp_path, dist_pool):
    """PP2 x FSDP2 (data parallel 2) skips the overflowing step one fp16 process skips and gives
    its losses and gradient norms with a MoE model: the switch loss's gradient weight is
    multiplied by the loss scale as the last stage's loss is (forge_train.pipeline_step), and
    the expert biases move by the step's load on both (also after the skipped step, whose
    forward routed its tokens: Megatron-Core updates them before its optimizer step too)."""
    root = str(tmp_path)
    # from 2^20 tiny-moe's second step overflows (at 2^21) and is skipped, the third runs at 2^17
    single = torch.tensor(_fp16_metrics(f"{root}/single", *_MOE, scale=2.0**20))
    assert torch.isfinite(single[:, 1]).tolist() == [True, False, True], single
    ranks = dist_pool(4).run(
        _fp16_metrics, f"{root}/pp2", *_MOE, "parallel=pp2-fsdp", data_parallel=2, scale=2.0**20
    )
    _assert_matches(ranks, single, 1e-5)


def test_moe_trains_in_bf16(tmp_path):
    """tiny-moe with the switch loss and the expert bias trains under bf16 autocast (its
    attention and grouped expert GEMMs take autocast's dtype, forge_kernels._autocast; without
    that the attention refused the fp32 q/k of the qk-norm beside a bf16 v): two steps' losses
    and gradient norms are fp32's within bf16's rounding (measured: losses 4.6e-5, norms
    3.2e-3 apart; bf16's unit roundoff is 3.9e-3)."""
    run = (*tiny.TINY_RUN, *tiny.TWO_STEPS, *_MOE)
    fp32, bf16 = (
        tiny.train_losses_and_norms(
            *run, f"train.output_dir={tmp_path}/{p}", f"train.precision={p}"
        )
        for p in ("fp32", "bf16")
    )
    fp32, bf16 = torch.tensor(fp32), torch.tensor(bf16)
    assert bf16.isfinite().all(), bf16
    torch.testing.assert_close(bf16[:, 0], fp32[:, 0], rtol=5e-4, atol=0)
    torch.testing.assert_close(bf16[:, 1], fp32[:, 1], rtol=1e-2, atol=0)


def test_resume_across_precisions(tmp_path, capsys):
    """A bf16 checkpoint resumed in fp16 (no loss scale saved: the scaler starts fresh, one log
    line) and that run's fp16 checkpoint resumed in bf16 (the saved scale left unused, one log
    line): each run resumes where the last stopped and trains."""
    from forge_ckpt import CheckpointConfig, CheckpointManager
    from forge_train.trainer import train

    def saved_global_objects(checkpoint: Path) -> tuple[str, ...]:
        manager = CheckpointManager(CheckpointConfig(directory=checkpoint.parent, save_rng=False))
        return manager.load(checkpoint).unread  # asked for nothing: every global object

    def run(steps: int, precision: str):
        common = ("data.global_batch_rows=2", "train.eval_batches=0", "checkpoint.interval=0",
                  "checkpoint.export_hf=false", "checkpoint.keep_last_n=null")  # fmt: skip
        config = tiny.tiny_config(
            tmp_path, *common, f"train.steps={steps}", f"train.precision={precision}"
        )
        result = train(config)
        assert (result.start_step, result.steps_done) == (steps - 1, steps), result
        assert [math.isfinite(loss) for loss in result.losses] == [True], result.losses
        return capsys.readouterr().out

    checkpoints = tmp_path / "checkpoints"
    assert "loss scale" not in run(1, "bf16")
    assert "loss_scaler" not in saved_global_objects(checkpoints / "step_00000001")
    fresh = [line for line in run(2, "fp16").splitlines() if "loss scale" in line]
    assert fresh == [
        f"{checkpoints / 'step_00000001'} holds no fp16 loss scale (written in another "
        "precision): the loss scaler starts fresh at 65536"
    ]
    assert "loss_scaler" in saved_global_objects(checkpoints / "step_00000002")
    unused = [line for line in run(3, "bf16").splitlines() if "loss scale" in line]
    assert unused == [
        f"{checkpoints / 'step_00000002'} holds an fp16 loss scale; this run is bf16 (no loss "
        "scaling): the scale is not used"
    ]
