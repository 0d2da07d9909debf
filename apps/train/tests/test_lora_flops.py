"""The ``flops`` and MFU of a run count what it trains (forge_train.throughput.
language_model_flops_options, which components hands to ``forge_models.flops_per_token``): a
LoRA run's language model is counted with frozen base weights plus its adapters, and equals what
``FlopCounterMode`` measures on the model with forge-train's own adapters; a vision-language
model's language model per ``train.freeze`` and ``lora.targets``. No training run."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import forge_models
from forge_train.compose import compose_run_config
from forge_train.lora import apply_lora
from forge_train.modeling import model_config
from forge_train.throughput import language_model_flops_options

SEQ = 16


def _projections(config, *, mlp: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The attention projections (and ``mlp``'s linears) of every layer, in module order."""
    parts = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", mlp))
    return tuple(
        f"layers.{i}.{part}.{name}"
        for i in range(config.num_layers)
        for part, names in parts
        for name in names
    )


def test_lora_run_counts_frozen_base_and_adapters(monkeypatch):
    """recipe=lora (q/k/v/o adapters of rank 8): the options name every adapted layer and
    freeze the rest, and the count is the measured forward + backward of the model as
    forge-train adapts it (attention: every projection adapted, so the eager reference's
    backward computes dq, dk and dv, as a fused kernel does)."""
    monkeypatch.setenv("FORGE_KERNELS_IMPL", "reference")
    cfg = compose_run_config(["recipe=lora", "data.paths=[c.jsonl]", "model.config.num_layers=2"])
    config = model_config(cfg.model, 512)
    options = language_model_flops_options(cfg, config)
    assert options == {
        "input_grad": False,
        "trainable": (),
        "lora_rank": 8,
        "lora_targets": _projections(config),
    }
    torch.manual_seed(0)
    model = forge_models.build_model(config)
    lora = cfg.lora
    apply_lora(model, targets=lora.targets, rank=lora.rank, alpha=lora.alpha)
    ids = torch.randint(0, config.vocab_size, (1, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(ids).square().sum().backward()
    full = forge_models.flops_per_token(config, SEQ)
    counted = forge_models.flops_per_token(config, SEQ, **options)
    assert SEQ * counted == counter.get_total_flops()
    assert counted < 0.8 * full  # what the MFU used to count: every weight's gradient
    # What the run logs (components: causal, at data.seq_len).
    assert forge_models.flops_per_token(
        config, cfg.data.seq_len, causal=True, **options
    ) < forge_models.flops_per_token(config, cfg.data.seq_len, causal=True)


def test_without_lora_or_freeze_the_count_is_full_training():
    cfg = compose_run_config(["data.paths=[c.jsonl]"])
    config = model_config(cfg.model, 512)
    options = language_model_flops_options(cfg, config)
    assert options == {"input_grad": False}
    assert forge_models.flops_per_token(config, 512, **options) == forge_models.flops_per_token(
        config, 512
    )


# A stand-in for the VLM's text config: the mapping reads only its module names.
TEXT = forge_models.get_config("qwen2-debug")
ALL_PROJ = _projections(TEXT, mlp=("gate_up_proj", "down_proj"))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # LLaVA's LoRA recipe: adapters on the language model, the projector trained whole.
        (
            ["recipe=vlm-lora"],
            {"input_grad": True, "trainable": (), "lora_rank": 8, "lora_targets": ALL_PROJ},
        ),
        # PEFT's Qwen2.5-VL recipe: only the language model's adapters train, so no gradient
        # reaches its input.
        (
            ["recipe=vlm-lora", "train.freeze=[vision,projector]"],
            {"input_grad": False, "trainable": (), "lora_rank": 8, "lora_targets": ALL_PROJ},
        ),
        # Adapters only on the vision encoder: the language model trains whole.
        (["recipe=vlm-lora", "lora.targets=[vision.*]"], {"input_grad": True}),
        # A frozen language model behind a trained projector: forward + input gradient.
        (
            ["recipe=vlm", "train.freeze=[vision,language_model]"],
            {"input_grad": True, "trainable": ()},
        ),
        # recipe=vlm trains the projector and the language model whole.
        (["recipe=vlm"], {"input_grad": True}),
    ],
    ids=["llava_lora", "peft_lora", "vision_adapters", "frozen_lm", "vlm"],
)
def test_vision_language_options(overrides, expected):
    cfg = compose_run_config(overrides)
    assert language_model_flops_options(cfg, TEXT) == expected
    forge_models.flops_per_token(TEXT, 64, **expected)  # valid options
