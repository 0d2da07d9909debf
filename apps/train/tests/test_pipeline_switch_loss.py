"""transformers' switch balance loss under pipeline parallelism (forge_train.pipeline_moe): the
per-expert sums, carried from stage to stage with the hidden states, give the loss and the
gradients one process computes over all layers at once."""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Qwen3-MoE-style tiny model (every layer MoE, top-2 of 8 experts) with the switch loss
#: weighted so that it moves the losses; 2 micro-batches per data-parallel rank.
_SWITCH = (
    *tiny.TINY_RUN,
    "model=tiny-moe",
    "+model.config.moe.aux_loss=switch",
    "model.config.moe.output_router_logits=true",
    "model.config.moe.router_aux_loss_coef=0.5",
    "data.global_batch_rows=4",
    "data.micro_batch_rows=1",
    "train.steps=3",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
)


def _losses(output_dir: str, *overrides: str) -> list[float]:
    """Losses of a tiny switch-loss run (a pool job)."""
    return tiny.train_losses(*_SWITCH, f"train.output_dir={output_dir}", *overrides)


def _close(ranks: list[list[float]], single: list[float]) -> None:
    assert all(r == ranks[0] for r in ranks), ranks  # every rank reports the global loss
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-5)


def test_switch_loss_under_pp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    """PP2 x FSDP2 gives the single-process losses with 1F1B (one MoE layer per stage, and a
    multi-token prediction module whose MoE block on the last stage adds to the sums), with
    two virtual stages per rank (interleaved 1F1B) and with the zero-bubble schedule (the last
    stage outputs the logits and the backward is split), those two on four layers, the first
    dense (its stage passes the zero sums on)."""
    root = str(tmp_path)
    pool = dist_pool(4)
    mtp = "+model.config.mtp_depth=1"
    single = _losses(f"{root}/single", mtp)
    _close(pool.run(_losses, f"{root}/pp2", mtp, "parallel=pp2-fsdp"), single)
    dense_first = ("model.config.num_layers=4", "+model.config.moe.mlp_only_layers=[0]")
    single = _losses(f"{root}/single4", *dense_first)
    for schedule, virtual in (("interleaved_1f1b", 2), ("zero_bubble", 1)):
        layout = (
            "parallel=pp2-fsdp",
            f"parallel.pp_schedule={schedule}",
            f"parallel.pp_virtual_stages={virtual}",
        )
        _close(pool.run(_losses, f"{root}/{schedule}", *dense_first, *layout), single)
