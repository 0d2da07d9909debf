"""LoRA under tensor parallelism (forge_parallel's ``adapter:`` styles): TP2 x FSDP2, with and
without sequence parallelism, on 4 ranks gives the single process's per-step losses and
gradient norms (the adapters' only: the base stays frozen), and the merged Hugging Face export
holds the single process's tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: LoRA on every attention projection (q/k/v column-, o row-parallel) and on the MLP's packed
#: gate_up (``colwise_packed``) and down projection, with a learning rate that moves the
#: adapters visibly in 3 steps; q/k/v biases (Qwen2's) exercise the column-parallel bias.
_LORA = (
    "recipe=lora",
    "data=stdlib",
    "model.config.family=qwen2",
    "+model.config.attention_bias=true",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.targets=[*.q_proj,*.k_proj,*.v_proj,*.o_proj,*.gate_up_proj,*.down_proj]",
    "optim.lr=5e-2",
    "optim.weight_decay=0",
)
_RUN = (
    "data.global_batch_rows=8",
    "data.micro_batch_rows=2",
    "train.steps=3",
    "train.eval_batches=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
)


def _run(output_dir: str, *overrides: str) -> dict:
    """Per-step ``[loss, gradient norm]`` and the exported merged weights (rank 0's; a pool
    job)."""
    from safetensors.torch import load_file

    rows = tiny.train_losses_and_norms(
        *tiny.TINY, *_RUN, *_LORA, f"train.output_dir={output_dir}", *overrides
    )
    files = sorted(Path(output_dir).glob("**/hf/*.safetensors"))
    weights = {k: v for f in files for k, v in load_file(f).items()}
    return {"rows": rows, "weights": weights}


def test_lora_under_tp2_fsdp2_matches_one_process(tmp_path, dist_pool):
    pool = dist_pool(4)
    model = ("model.init_device=meta",)
    single = _run(f"{tmp_path}/single", *model)
    assert single["weights"], "the single-process run exported no weights"
    # The adapters moved the merged weights away from the base: the comparison below is not
    # between copies of the initial model.
    assert len(single["rows"]) == 3
    assert single["rows"][2][0] != single["rows"][0][0]
    for name, layout in (
        ("tp2", ("parallel=tp2-fsdp", "parallel.sequence_parallel=false")),
        ("tp2_sp", ("parallel=tp2-fsdp", "parallel.sequence_parallel=true")),
    ):
        got = pool.run(_run, f"{tmp_path}/{name}", *model, *layout)[0]
        torch.testing.assert_close(
            torch.tensor(got["rows"]), torch.tensor(single["rows"]), rtol=1e-5, atol=1e-6
        )
        # Adam's normalized steps amplify the reduction-order rounding of the adapters'
        # gradients: FSDP4 alone (no TP) differs from one process by up to 4e-5 relative.
        assert got["weights"].keys() == single["weights"].keys()
        for key, value in single["weights"].items():
            torch.testing.assert_close(got["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_lora_dropout_with_tensor_parallelism_composes_for_language_and_vision_language_models():
    """LoRA dropout's masks are keyed by the data under any layout (forge_train.lora_dropout):
    a language model's by its tokens (test_lora_tp_more.py: TP2 beside FSDP, pipeline stages,
    context-parallel shards), a vision-language model's by its samples' tokens and pixel blocks
    (test_vlm_lora_fp8.py: TP2), so tensor parallelism is no longer refused for either."""
    from forge_train.compose import compose_run_config

    lora = ("recipe=lora", "data=stdlib", "parallel=tp2-fsdp", "lora.dropout=0.1")
    for layout in ((), ("parallel.cp=2",), ("parallel.pp=2",)):
        tiny.tiny_config("unused", *lora, *layout)
    vlm = ("recipe=vlm-lora", "parallel=tp2-fsdp", "lora.dropout=0.1", "train.output_dir=unused")
    assert compose_run_config(list(vlm)).lora.dropout == 0.1
