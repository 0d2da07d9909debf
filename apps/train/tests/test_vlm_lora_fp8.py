"""LoRA and FP8 on vision-language models (forge-train, ``recipe=vlm-lora``; ``train.fp8``).

One process: a LoRA run of the Qwen2.5-VL preset trains only the language model's adapters and
the projector (vision encoder frozen, the language model's base weights unchanged), its loss
falls, and its merged Hugging Face export loads in transformers with the trained model's
logits. FP8 converts the language model's linears only. On 4 gloo ranks (the worker pool):
LoRA under FSDP4 and TP2 + SP x FSDP2 (the adapters split with their layers:
``forge_train.lora.lora_tp_styles``), per-tensor FP8 under TP2 + SP x FSDP2 and LoRA with FP8
under CP2 x FSDP2 give the single process's per-step losses and gradient norms. On 2 ranks:
LoRA dropout on the language model's, the vision encoder's and the projector's layers (masks
keyed by the data, ``forge_train.lora_dropout``) under TP2 (+ SP) and PP2 gives them too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forge_core.testing import import_path
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError

pytest.importorskip("skimage")

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")

#: A short ``recipe=vlm-lora`` run (Qwen2.5-VL tiny, adapters on the language model's
#: projections, projector trained whole, vision frozen).
_LORA = (
    "recipe=vlm-lora",
    "data.global_batch_rows=4",
    "data.micro_batch_rows=1",
    "train.eval_batches=0",
    "checkpoint.interval=0",
    "checkpoint.save_final=false",
    "logging.progress=plain",
    "logging.tensorboard=false",
)


def _lora_run(output_dir: str, *overrides: str) -> dict:
    """Per-step ``[loss, gradient norm]`` and the merged export's tensors of a 3-step
    ``_LORA`` run (a pool job: rank 0's)."""
    from safetensors.torch import load_file

    rows = tiny.train_losses_and_norms(
        *_LORA, "train.steps=3", f"train.output_dir={output_dir}", *overrides
    )
    files = sorted(Path(output_dir).glob("hf/*.safetensors"))
    metrics = Path(output_dir) / "metrics.jsonl"
    logged = [json.loads(line) for line in metrics.read_text().splitlines()] if rows else []
    return {
        "rows": rows,
        "weights": {k: v for f in files for k, v in load_file(f).items()},
        "evals": [r["eval_loss"] for r in logged if "eval_loss" in r],
    }


def test_vlm_lora_trains_adapters_and_exports_a_merged_model(tmp_path):
    """Only the adapters and the projector train; the merged export is a plain Qwen2.5-VL
    folder that transformers loads and that gives the trained model's logits."""
    import transformers

    from forge_core import init_distributed, shutdown_distributed
    from forge_models.vlm import VisualInputs
    from forge_train.data import load_run_tokenizer
    from forge_train.loop import Trainer
    from forge_train.modeling import build_model
    from forge_train.vlm_model import vlm_model_config

    cfg = compose_run_config([*_LORA, "train.steps=4", f"train.output_dir={tmp_path / 'run'}"])
    import torch.distributed as dist

    owns_group = not dist.is_initialized()
    if owns_group:
        init_distributed()
    trainer = Trainer(cfg)
    try:
        with tiny.reference_kernels():
            result = trainer.run()
    finally:
        trainer.close()
        if owns_group:
            shutdown_distributed()
    model, config = trainer.parts.model.eval(), trainer.parts.model_config
    projections = [f"{a}_proj" for a in "qkvo"] + ["gate_up_proj", "down_proj"]
    assert sorted(trainer.parts.lora_targets) == sorted(
        f"language_model.layers.{i}.{'attn' if p[0] in 'qkvo' else 'mlp'}.{p}"
        for i in range(2)
        for p in projections
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {n for n in trainable if n.endswith((".lora_A", ".lora_B"))}
    assert len(adapters) == 2 * len(trainer.parts.lora_targets)
    assert trainable - adapters == {
        n for n, _ in model.projector.named_parameters(prefix="projector")
    }
    assert sum(result.losses[-2:]) < sum(result.losses[:2]) - 0.2, result.losses

    # The frozen weights (vision encoder, the language model's base) are the initial ones.
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    initial, _ = build_model(
        cfg.model, vlm_model_config(cfg.model, tokenizer, frozen=[]), seed=cfg.train.seed
    )
    initial = initial.state_dict()
    for name, p in model.named_parameters():
        plain = name.replace(".base.", ".")
        if name in adapters:
            continue
        if name.startswith("projector."):
            assert not torch.equal(p, initial[plain]), name
        else:
            assert torch.equal(p, initial[plain]), name

    reference = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        result.hf_dir, dtype=torch.float32
    ).eval()
    sample = trainer.parts.data.train.samples[0]
    ids = sample["input_ids"][None]
    image = sample["visual"]["image"]
    with torch.no_grad():
        ours = model(ids, images=VisualInputs(**image))
        theirs = reference(
            input_ids=ids,
            pixel_values=image["pixel_values"],
            image_grid_thw=image["grid_thw"],
            mm_token_type_ids=(ids == config.image_token_id).int(),
        ).logits
    vocab = theirs.shape[-1]
    error = (ours[..., :vocab] - theirs).norm() / theirs.norm()
    assert error < 1e-5, error


def test_vlm_lora_refuses_adapters_in_a_frozen_part(tmp_path):
    from forge_train.components import _apply_lora

    cfg = compose_run_config(
        [*_LORA, "model=llava-ov-tiny", "lora.targets=[*.q_proj]", f"train.output_dir={tmp_path}"]
    )  # SigLIP's attention has q_proj too, and recipe=vlm-lora freezes the vision encoder
    from forge_train.data import load_run_tokenizer
    from forge_train.modeling import build_model
    from forge_train.vlm_model import vlm_model_config

    config = vlm_model_config(cfg.model, load_run_tokenizer(cfg.data, cfg.model), frozen=["vision"])
    model, _ = build_model(cfg.model, config, seed=0)
    with pytest.raises(ConfigError, match=r"vision\.blocks\.0\.attn\.q_proj in the vision part"):
        _apply_lora(model, cfg, vlm=True)


def test_vlm_fp8_converts_the_language_model_only(tmp_path):
    from forge_train.components import build_components

    cfg = compose_run_config(
        [*_LORA, "lora=null", "train.fp8=per_tensor", f"train.output_dir={tmp_path}"]
    )
    parts = build_components(
        cfg, world_size=1, degrees=cfg.parallel.resolve(1), device=torch.device("cpu")
    )
    from forge_kernels.fp8 import Fp8Linear

    converted = sorted(n for n, m in parts.model.named_modules() if isinstance(m, Fp8Linear))
    assert converted == sorted(parts.fp8_layers)
    assert len(converted) == 12  # 2 layers x (q, k, v, o, gate_up, down); not lm_head
    assert all(n.startswith("language_model.layers.") for n in converted), converted


def _close(got: list[list[float]], single: list[list[float]]) -> None:
    assert len(single) == 3, single
    torch.testing.assert_close(torch.tensor(got), torch.tensor(single), rtol=1e-5, atol=1e-6)


def test_vlm_lora_and_fp8_layouts_match_one_process(tmp_path, dist_pool):
    """LoRA: FSDP4 (adapters, the whole projector and the frozen rest sharded together) and
    TP2 + SP x FSDP2 on the meta device (adapters split with their column- / row-parallel
    layers, the encoder and projector data-parallel over all 4 ranks), whose merged export
    holds the single process's tensors. FP8 per-tensor (lr 1e-5, see test_fp8_tp.py): TP2 + SP x
    FSDP2 (amaxes all-reduced over the tensor-parallel ranks) and, inside the LoRA layers,
    CP2 x FSDP2 (the amaxes of the language model's sequence shards all-reduced over cp)."""
    pool = dist_pool(4)
    single = _lora_run(f"{tmp_path}/lora_single")
    assert single["rows"][2][0] != single["rows"][0][0]
    assert single["weights"]
    got = pool.run(
        _lora_run, f"{tmp_path}/lora_fsdp", "parallel=fsdp", "checkpoint.export_hf=false"
    )
    _close(got[0]["rows"], single["rows"])
    got = pool.run(_lora_run, f"{tmp_path}/lora_tp2", "parallel=tp2-fsdp", "model.init_device=meta")
    _close(got[0]["rows"], single["rows"])
    # The merged export gathered from the TP x FSDP shards: Adam's normalized steps amplify the
    # adapters' reduction-order rounding (as in test_lora_tp.py), hence rtol 1e-4.
    assert got[0]["weights"].keys() == single["weights"].keys()
    for key, value in single["weights"].items():
        torch.testing.assert_close(got[0]["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)

    fp8 = ("train.fp8=per_tensor", "optim.lr=1e-5", "checkpoint.export_hf=false")
    for name, overrides, layout in (
        ("fp8_tp2", ("lora=null", *fp8), "parallel=tp2-fsdp"),
        ("lora_fp8_cp2", fp8, "parallel=cp2-fsdp"),
    ):
        single = _lora_run(f"{tmp_path}/{name}_single", *overrides)["rows"]
        _close(pool.run(_lora_run, f"{tmp_path}/{name}", *overrides, layout)[0]["rows"], single)


#: LoRA dropout on every part's layers: the language model's projections (keyed by their
#: tokens), the vision encoder's and the projector's (keyed by their rows' pixel blocks), all
#: parts trained (``train.freeze=[]``).
_DROPOUT = ("lora.dropout=0.1", "train.freeze=[]", "checkpoint.export_hf=false")


def test_vlm_lora_dropout_under_tp2_and_pp2_matches_one_process(tmp_path, dist_pool):
    """TP2 + SP and PP2 with recomputation (Qwen2.5-VL: windowed encoder rows, 2x2-merged
    projector rows) and TP2 without SP (InternVL-style vlm-tiny: a tile's patches,
    pixel-shuffled projector rows) draw the single process's masks: the tensor-parallel ranks
    those of the replicated activations (the column-parallel layers' inputs, the encoder and
    the projector, which both ranks run whole; per-rank drawn masks gave other losses) and the
    row-parallel layers' feature slices; the pipeline's decoupled encoder those of the
    micro-batch it encodes, also in the blocks recomputed in backward."""
    pool = dist_pool(2)
    # (one held-out batch before and after training: the pipeline's replica encoder must run
    # it without dropout, as the stage does)
    qwen = "lora.targets=[language_model.*_proj,vision.*_proj,projector.fc1,projector.fc2]"
    tiles = "lora.targets=[language_model.*_proj,vision.*_proj,vision.*.fc1,projector.fc2]"
    for name, run, layouts in (
        (
            "qwen",
            (qwen, "train.eval_batches=1"),
            {
                "tp2_sp": ("parallel=tp2-fsdp", "parallel.sequence_parallel=true"),
                "pp2": ("parallel=pp2-fsdp", "parallel.recompute=full"),
            },
        ),
        (
            "tiles",
            ("model=vlm-tiny", tiles),
            {"tp2": ("parallel=tp2-fsdp", "parallel.sequence_parallel=false")},
        ),
    ):
        single = _lora_run(f"{tmp_path}/{name}_single", *_DROPOUT, *run)
        for layout, overrides in layouts.items():
            got = pool.run(_lora_run, f"{tmp_path}/{name}_{layout}", *_DROPOUT, *run, *overrides)
            _close(got[0]["rows"], single["rows"])
            torch.testing.assert_close(got[0]["evals"], single["evals"], rtol=1e-5, atol=1e-6)
