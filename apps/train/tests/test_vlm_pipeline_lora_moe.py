"""The decoupled VLM pipeline (forge_train.vlm_pipeline) with a mixture-of-experts language
model under tensor parallelism: a 4-process run of the Qwen2.5-VL preset, PP2 x TP2 with
sequence parallelism, gives one process's per-step losses and gradient norms.

- Its MoE blocks run whole on each tensor-parallel rank's sequence shard
  (:func:`forge_train.vlm_model.vlm_text_plan`); the switch balance loss's per-expert sums
  travel with the hidden states and are summed over the tensor-parallel ranks on the last
  stage, the expert biases follow the load summed over them (forge_train.pipeline_moe,
  forge_train.sharded_routing).
- DeepSeek-V3's sequence-wise balance loss: each MoE block sums its per-document sums over the
  tensor-parallel ranks (``PipelineMoE.set_documents``), the documents those of the whole row.

- LoRA (``recipe=vlm-lora``): the adapters go to the stages with their layers, split with
  them over the tensor-parallel ranks (``forge_train.lora.lora_tp_styles``); the Hugging
  Face export streams the stages' tensors and merges the adapters: one process's weights.
- LoRA with per-tensor FP8 (lr 1e-5, see test_fp8_tp.py) under PP2 x TP2 + SP and PP2 x
  CP2: the FP8 linears live on the stages, their amaxes reduced over the ranks that split
  their tokens (``forge_train.fp8.set_fp8_token_groups``, the plan checked by
  ``check_fp8_tensor_parallel`` as without pipeline stages).

(Balance losses are compared at data-parallel 1: the VLM loader deals rows to the
data-parallel ranks in turn, so under data parallelism the micro-batches over which the loss
is formed hold other rows than one process's.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: Qwen2.5-VL tiny with 4 language model layers, every part trained, two micro-batches per
#: pipeline rank.
_RUN = (
    "recipe=vlm",
    "model=qwen2_5-vl-tiny",
    "+model.config.text.num_layers=4",
    "train.freeze=[]",
    *tiny.TWO_STEPS,
    "optim.warmup_steps=1",
    "logging.progress=plain",
    "logging.tensorboard=false",
)
#: 4 experts, top 2, with a balance loss that weighs enough to show.
_MOE = "num_experts:4,num_experts_per_tok:2,moe_intermediate_size:32,output_router_logits:true,"
#: The switch loss with expert-bias balancing moving quickly enough to change step 2's routing.
_SWITCH = _MOE + "router_aux_loss_coef:0.5,expert_bias:true,bias_update_speed:0.05"
_SEQUENCE = _MOE + "router_aux_loss_coef:0.5,aux_loss:sequence"
_PP2_TP2_SP = ("parallel=pp2-fsdp", "parallel.tp=2", "parallel.sequence_parallel=true")


def _runs(root: str, name: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` (a pool job: rank 0's are the run's)."""
    return tiny.train_losses_and_norms(*_RUN, f"train.output_dir={root}/{name}", *overrides)


def _close(ranks: list[list[list[float]]], single: list[list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single), rtol=1e-5, atol=0)


@pytest.mark.parametrize("moe", [_SWITCH, _SEQUENCE], ids=["switch_expert_bias", "sequence"])
def test_vlm_pipeline_moe_under_tensor_parallel_matches_one_process(tmp_path, dist_pool, moe):
    pytest.importorskip("skimage")
    root = str(tmp_path)
    run = (f"+model.config.text.moe={{{moe}}}",)
    single = _runs(root, "single", *run)
    _close(dist_pool(4).run(_runs, root, "pp2_tp2", *run, *_PP2_TP2_SP), single)


def _lora_run(root: str, name: str, *overrides: str) -> dict:
    """Per-step ``[loss, gradient norm]`` and the merged export's tensors of a LoRA run (a
    pool job: rank 0's)."""
    from safetensors.torch import load_file

    out = Path(root) / name
    rows = _runs(root, name, "recipe=vlm-lora", "checkpoint.export_hf=true", *overrides)
    files = sorted(out.glob("hf/*.safetensors"))
    return {"rows": rows, "weights": {k: v for f in files for k, v in load_file(f).items()}}


def test_vlm_pipeline_lora_under_tensor_parallel_matches_one_process(tmp_path, dist_pool):
    pytest.importorskip("skimage")
    root = str(tmp_path)
    single = _lora_run(root, "single")
    (ours, *_) = dist_pool(4).run(_lora_run, root, "pp2_tp2", *_PP2_TP2_SP)
    _close([ours["rows"]], single["rows"])
    # The merged export (no adapter names): the single process's weights. Adam turns float
    # noise in near-zero gradients into up to ~8e-5 differences (the projector's first layer;
    # measured alike for PP2 x TP2 + SP without LoRA).
    theirs = single["weights"]
    assert ours["weights"].keys() == theirs.keys()
    assert not any("lora" in key for key in theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours["weights"][key], value, rtol=1e-4, atol=1e-4, msg=key)


#: ``recipe=vlm-lora`` with per-tensor FP8 (its 2-layer Qwen2.5-VL tiny, the vision encoder
#: frozen), as test_vlm_lora_fp8.py runs it without pipeline stages.
_LORA_FP8 = (
    "recipe=vlm-lora",
    "train.fp8=per_tensor",
    "optim.lr=1e-5",
    "data.global_batch_rows=4",
    "data.micro_batch_rows=1",
    "train.steps=3",
    "train.eval_batches=0",
    "checkpoint.export_hf=false",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    "logging.progress=plain",
    "logging.tensorboard=false",
)


def _fp8_runs(root: str, name: str, *overrides: str) -> list[list[float]]:
    """Per-step ``[loss, gradient norm]`` of a ``_LORA_FP8`` run (a pool job: rank 0's)."""
    return tiny.train_losses_and_norms(*_LORA_FP8, f"train.output_dir={root}/{name}", *overrides)


def test_vlm_pipeline_lora_with_fp8_matches_one_process(tmp_path, dist_pool):
    pytest.importorskip("skimage")
    root = str(tmp_path)
    single = _fp8_runs(root, "single")
    pool = dist_pool(4)
    _close(pool.run(_fp8_runs, root, "pp2_tp2", *_PP2_TP2_SP), single)
    _close(pool.run(_fp8_runs, root, "pp2_cp2", "parallel=pp2-fsdp", "parallel.cp=2"), single)
