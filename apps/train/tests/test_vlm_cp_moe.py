"""Vision-language models whose language model has MoE layers (Qwen3-VL-MoE, DeepSeek-VL2
style) or multi-token prediction, with each batch's tokens split over ranks: 4-process runs
give the single process's losses and gradient norms.

- The balance statistics (the switch loss's sums, DeepSeek-V3's sequence-wise per-document
  sums, the expert-bias load) of the language model's routers are summed over the ranks that
  split the packed row (``forge_train.sharded_routing``): the context-parallel ranks (CP2 x
  FSDP2, ring attention, zigzag) and the tensor-parallel ranks under sequence parallelism
  (TP2 + SP x FSDP2, each routing its sequence shard, its MoE blocks whole on every rank).
  The row's documents are those of ``input_ids``: the visual features replace the
  placeholder embeddings one for one.
- Multi-token prediction (DeepSeek-V3 section 2.2) under CP2: each depth's input ids (at image
  positions the placeholder token's embedding, as in one process) and targets are moved on
  the whole row, then cut like the shard (``forge_train.context_parallel``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Qwen2.5-VL tiny (M-RoPE, windowed ViT) on captioned images, every part trained.
_VLM = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "train.freeze=[]",
    "data.global_batch_rows=4",
    # One row per micro-batch: the balance loss is a micro-batch's, and the VLM loader deals
    # a step's rows to the data-parallel ranks in turn (rank r: rows r, r + dp, ...), so with
    # several rows per micro-batch the single process's micro-batches hold other rows
    # (forge_train.vlm_data.VLMLoader; dealt contiguously, as forge_data's PackedLoader
    # deals them, 2 rows per micro-batch match too).
    "data.micro_batch_rows=1",
    "logging.progress=plain",
    "logging.tensorboard=false",
    "train.steps=2",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
)
#: Its language model with MoE layers (4 experts, top-2), a balance loss weighted so that it
#: moves the losses and expert biases updated fast enough to change step 2's routing.
_MOE = (
    "+model.config.text.moe={num_experts:4,num_experts_per_tok:2,moe_intermediate_size:32,"
    "output_router_logits:true,router_aux_loss_coef:0.5,expert_bias:true,bias_update_speed:0.05}"
)


def _losses(output_dir: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of the ``_VLM`` run (a pool job: rank 0's)."""
    return tiny.train_losses_and_norms(*_VLM, f"train.output_dir={output_dir}", *overrides)


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    assert len(single) == 2, single  # both steps logged: the comparison is not vacuous
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_vlm_moe_balance_under_cp2_and_tp2_sp_matches_one_process(tmp_path, dist_pool):
    """The switch loss and the expert-bias load of the language model's routers, summed over
    the context-parallel ranks (CP2 x FSDP2) and over the tensor-parallel ranks of a
    sequence-parallel layout (TP2 + SP x FSDP2)."""
    pool = dist_pool(4)
    single = _losses(f"{tmp_path}/single", _MOE)
    _close(pool.run(_losses, f"{tmp_path}/cp2", _MOE, "parallel=cp2-fsdp"), single)
    _close(pool.run(_losses, f"{tmp_path}/tp2_sp", _MOE, "parallel=tp2-fsdp"), single)


def test_vlm_sequence_balance_and_mtp_under_cp2_match_one_process(tmp_path, dist_pool):
    """A DeepSeek-V3-style language model: the sequence-wise balance loss (each rank's tokens
    mapped to their documents of the whole zigzag-cut row, the per-document sums summed over
    cp; the MTP module's MoE block among the routers) and a multi-token prediction module."""
    pool = dist_pool(4)
    deepseek = (_MOE, "+model.config.text.moe.aux_loss=sequence", "+model.config.text.mtp_depth=1")
    single = _losses(f"{tmp_path}/single", *deepseek)
    _close(pool.run(_losses, f"{tmp_path}/cp2", *deepseek, "parallel=cp2-fsdp"), single)


def test_vlm_mtp_on_sequence_shards_is_refused():
    """Under TP + SP a VLM's embedding output stays whole (the visual features go in over the
    whole sequence), so its MTP modules would get whole depth embeddings beside a shard of the
    hidden states: refused with the settings to change (TP without SP works). A MoE block is
    styled whole (``replicate``) rather than by the family's dense MLP entries."""
    import forge_models
    from forge_train.config import ConfigError
    from forge_train.vlm_model import vlm_text_plan

    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
    language_model = forge_models.build_model("qwen2-debug", device="meta", moe=moe)
    styles = vlm_text_plan(language_model, sequence_parallel=True).styles
    assert styles["layers.0.mlp"] == styles["layers.1.mlp"] == "replicate"
    assert not any(k == "layers.*.mlp" or k.startswith("layers.*.mlp.") for k in styles)
    language_model = forge_models.build_model("qwen2-debug", device="meta", mtp_depth=1)
    with pytest.raises(ConfigError, match="multi-token prediction modules do not run on sequence"):
        vlm_text_plan(language_model, sequence_parallel=True)
    vlm_text_plan(language_model, sequence_parallel=False)  # TP alone
