"""Set-up checks of forge-train that need no run: the learning-rate schedules' values, the
weight-decay groups (``no_weight_decay()``), config refusals, the LoRA refusal of a tied layer
and the GPU peak FLOP/s table."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import forge_models
from forge_train.config import ConfigError, OptimConfig, TrainSettings
from forge_train.lora import apply_lora
from forge_train.optim import LRSchedule, param_groups
from forge_train.throughput import known_peak_flops

T, W, FLOOR = 10, 2, 0.1


def _factors(schedule: str, total: int = T, warmup: int = W) -> list[float]:
    config = OptimConfig(
        lr=1.0, schedule=schedule, warmup_steps=warmup, min_lr_ratio=FLOOR, decay_fraction=0.2
    )
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule_ = LRSchedule(optimizer, config, total)
    return [schedule_.factor(step) for step in range(total)]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
def test_schedule_warmup_peak_and_last_step(schedule):
    f = _factors(schedule)
    assert f[0] == pytest.approx(1 / W)  # the first step: lr / W
    assert f[W - 1] == pytest.approx(1.0)  # warmup ends at the peak
    assert max(f) == pytest.approx(1.0)
    # The last step (T - 1), as optim.py's docstring states it.
    last = {
        # Hugging Face convention: the floor is reached at step T, one past the last step run.
        "cosine": FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (T - 1 - W) / (T - W))),
        "linear": 1 - (1 - FLOOR) * (T - 1 - W) / (T - W),
        "wsd": FLOOR,  # decays onto the floor at the last step
    }[schedule]
    assert f[-1] == pytest.approx(last, abs=1e-12)
    assert (f[-1] > FLOOR) == (schedule != "wsd")
    # Decay is monotone after the peak.
    assert all(a >= b for a, b in zip(f[W - 1 :], f[W:], strict=False))


def test_wsd_is_stable_before_its_decay():
    f = _factors("wsd")
    decay_start = T - round(0.2 * T)  # decay_fraction of the steps
    assert f[W - 1 : decay_start] == [1.0] * (decay_start - W + 1)
    assert f[decay_start] < 1.0


def test_warmup_longer_than_the_run_never_reaches_the_peak():
    f = _factors("cosine", total=5, warmup=20)
    assert f == pytest.approx([(s + 1) / 20 for s in range(5)])


# -- weight-decay groups ---------------------------------------------------------------------
def _names(model: nn.Module, groups) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    return by_decay.get(0.1, set()), by_decay.get(0.0, set())


def test_intern_vit_position_table_and_cls_token_are_not_decayed():
    from forge_models.vision.intern_vit import InternVisionConfig, InternVisionEncoder

    encoder = InternVisionEncoder(
        InternVisionConfig(
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            image_size=(28, 28),
            patch_size=14,
        )
    )
    decayed, undecayed = _names(encoder, param_groups(encoder, 0.1))
    assert {"cls_token", "pos_embed"} <= undecayed
    assert {"patch_embed.weight", "blocks.0.attn.q_proj.weight"} <= decayed
    assert {"blocks.0.ls1", "blocks.0.norm1.weight"} <= undecayed  # dim < 2


class _Declares(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(4, 3))
        self.proj = nn.Linear(3, 3)

    def no_weight_decay(self):
        return ["table"]


def test_no_weight_decay_of_any_submodule_and_embeddings():
    model = nn.ModuleDict({"inner": _Declares(), "embed": nn.Embedding(5, 3)})
    decayed, undecayed = _names(model, param_groups(model, 0.1))
    assert decayed == {"inner.proj.weight"}
    assert undecayed == {"inner.table", "inner.proj.bias", "embed.weight"}


def test_no_weight_decay_naming_a_missing_parameter_is_refused():
    class Wrong(_Declares):
        def no_weight_decay(self):
            return ["tabel"]

    with pytest.raises(ValueError, match="'tabel', which is not a parameter"):
        param_groups(nn.Sequential(Wrong()), 0.1)


# -- config refusals ---------------------------------------------------------------------------
def test_eval_every_without_eval_batches_is_refused():
    with pytest.raises(ConfigError, match=r"train\.eval_every: .* train\.eval_batches=0"):
        TrainSettings(eval_every=2, eval_batches=0)
    TrainSettings(eval_every=0, eval_batches=0)  # no evaluation at all: fine
    TrainSettings(eval_every=2, eval_batches=1)


def test_negative_seed_is_refused():
    with pytest.raises(ConfigError, match=r"train\.seed: must be >= 0"):
        TrainSettings(seed=-1)


# -- LoRA on a tied layer --------------------------------------------------------------------
def _tiny_lm(tied: bool) -> forge_models.CausalLM:
    config = forge_models.TransformerConfig(
        family="llama",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=tied,
    )
    return forge_models.CausalLM(config)


def test_lora_on_a_tied_head_is_refused_at_setup():
    with pytest.raises(ValueError, match=r"'lm_head'.*tied to embed_tokens.*tie_word_embeddings"):
        apply_lora(_tiny_lm(tied=True), targets=["*q_proj", "lm_head"], rank=2, alpha=4.0)
    # Tied, the other layers are fine.
    wrapped = apply_lora(_tiny_lm(tied=True), targets=["*q_proj"], rank=2, alpha=4.0)
    assert wrapped == ["layers.0.attn.q_proj"]


def test_lora_on_a_layer_whose_weight_the_model_reads_is_refused_at_setup():
    """The fused loss reads ``lm_head.weight`` and sigmoid routing ``router.weight``: an
    adapter there would never run (the first step failed on the wrapper's missing weight)."""
    with pytest.raises(ValueError, match=r"'lm_head' cannot take a LoRA adapter.*fused linear"):
        apply_lora(_tiny_lm(tied=False), targets=["*q_proj", "lm_head"], rank=2, alpha=4.0)
    moe = forge_models.build_model(forge_models.get_config("deepseek-v3-debug"))
    with pytest.raises(ValueError, match=r"mlp.router' cannot take a LoRA adapter.*sigmoid"):
        apply_lora(moe, targets=["*router"], rank=2, alpha=4.0)
    softmax = forge_models.build_model(forge_models.get_config("qwen2-moe-debug"))
    wrapped = apply_lora(softmax, targets=["*router"], rank=2, alpha=4.0)
    assert wrapped
    assert all(name.endswith("router") for name in wrapped)


# -- peak FLOP/s -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "tflops"),
    # The table and its name matching are forge-kernels' (tests/test_peak_tflops.py): here,
    # that the loop reads it in FLOP/s and passes an unknown GPU through as None.
    [("NVIDIA H100 PCIe", 756), ("NVIDIA GeForce RTX 4090", None)],
)
def test_peak_flops_by_device_name(name, tflops):
    expected = None if tflops is None else tflops * 1e12
    assert known_peak_flops(name) == expected
