"""Aux-loss-free balancing in the loop: after each optimizer step the expert biases move by
``bias_update_speed * sign(mean_load - load)`` with the load of all the step's micro-batches."""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path
from forge_train.compose import compose_run_config
from forge_train.data import model_inputs
from forge_train.loop import Trainer

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


def test_expert_bias_follows_the_load_of_the_whole_step(tmp_path):
    cfg = compose_run_config(
        ["model=tiny-deepseek", *tiny.TINY_RUN, f"train.output_dir={tmp_path}"]
    )
    trainer = Trainer(cfg)
    try:
        trainer._build()
        model, runner = trainer.parts.model, trainer.runner
        assert runner.balancer is not None
        micro_batches = next(trainer.parts.loader)
        assert len(micro_batches) == 2
        # The load, recomputed independently: the same forward of every micro-batch.
        load = 0
        with torch.no_grad():
            for mb in micro_batches:
                kwargs, _ = model_inputs(mb, trainer.device)
                model(**kwargs)
                load = load + model.moe_stats.tokens_per_expert
        layers = model.moe_stats.layers
        assert layers == (1,)  # layer 0 is dense
        moe = model.config.moe
        tokens = sum(int(mb["input_ids"].numel()) for mb in micro_batches)
        assert load.sum() == tokens * moe.num_experts_per_tok  # both micro-batches counted
        blocks = model.moe_blocks()
        before = {i: blocks[i].expert_bias.clone() for i in layers}
        weight = blocks[1].router.weight.detach().clone()
        runner.run(0, micro_batches)
        assert not torch.equal(blocks[1].router.weight, weight)  # the optimizer stepped
        for row, i in zip(load, layers, strict=True):
            row = row.float()
            expected = before[i] + moe.bias_update_speed * torch.sign(row.mean() - row)
            torch.testing.assert_close(blocks[i].expert_bias, expected, rtol=0, atol=1e-7)
            assert not torch.equal(blocks[i].expert_bias, before[i])
    finally:
        trainer.close()
