"""The decoupled VLM pipeline (forge_train.vlm_pipeline) with a mixture-of-experts language
model, under context parallelism, with the language model frozen: a 4-process run of the
Qwen2.5-VL preset, PP2 x CP2 (ring, zigzag; FSDP over the context-parallel ranks), gives one
process's per-step losses and gradient norms.

- The language model frozen (``train.freeze=[language_model]``): the last rank's stage has
  nothing to train (its optimizer steps nothing, its checkpoint holds no optimizer state)
  but still runs backward, so the projector is trained through it.
- Its MoE layers carry the switch balance loss's sums with the hidden states, summed over
  the context-parallel ranks on the last stage (forge_train.pipeline_moe); the loss's
  gradient reaches the projector through the frozen routers; their expert biases follow the
  load summed over the context-parallel ranks.
- Every context-parallel rank encodes all of a row's images and embeds the whole row; stage 0
  takes its positions; the bidirectional image blocks and the documents of the whole row go
  to the ring attention.

(A balance loss is compared at data-parallel 1: the VLM loader deals rows to the
data-parallel ranks in turn, so under data parallelism the micro-batches over which the loss
is formed hold other rows than one process's, with or without pipeline stages. The fully
trained PP2 x CP2 layout is in test_vlm_pipeline.py, zero bubble.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Qwen2.5-VL tiny with 4 language model layers, two micro-batches per pipeline rank.
_RUN = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "+model.config.text.num_layers=4",
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=2",
    "train.eval_batches=0",
    "optim.warmup_steps=1",
    "logging.progress=plain",
    "logging.tensorboard=false",
)
#: A MoE language model (4 experts, top 2) whose switch balance loss weighs enough to show,
#: with expert-bias balancing moving quickly enough to change step 2's routing.
_MOE = (
    "num_experts:4,num_experts_per_tok:2,moe_intermediate_size:32,output_router_logits:true,"
    "router_aux_loss_coef:0.5,expert_bias:true,bias_update_speed:0.05"
)


def _runs(root: str, name: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={root}/{name}", *overrides)


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=0)


def test_vlm_pipeline_moe_frozen_lm_under_context_parallel_matches_one_process(tmp_path, dist_pool):
    pytest.importorskip("skimage")
    root = str(tmp_path)
    run = (
        "train.freeze=[vision,language_model]",
        f"+model.config.text.moe={{{_MOE}}}",
        "+model.config.image_attention=bidirectional",
    )
    single = _runs(root, "single", *run)
    layout = ("parallel=pp2-fsdp", "parallel.cp=2")
    _close(dist_pool(4).run(_runs, root, "pp2_cp2", *run, *layout), single)
