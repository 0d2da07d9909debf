"""MFU and ``flops`` of a vision-language run count the vision encoder and projector: per
micro-batch (forge_train.throughput.VisualFlops) they equal what ``FlopCounterMode`` measures on
the model's own encoder + projector for the visual inputs the step hands it, and the loop's rows
add them to the language model's ``tokens x flops_per_token``. An LLM's figures are unchanged.
No training run: the loop's steps run with a stand-in step runner."""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import forge_models
from forge_core.testing import import_path
from forge_models.vision import qwen2_5_vit
from forge_models.vlm import VisionLanguageModel, vlm_config_from_dict
from forge_train.config import DataConfig
from forge_train.evaluation import input_tokens
from forge_train.loop import Trainer
from forge_train.progress import Progress, TrainResult
from forge_train.throughput import VisualFlops, mfu, window_figures
from forge_train.vlm_data import vlm_model_inputs
from forge_train.vlm_processing import build_processor

CPU = torch.device("cpu")
tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


def _segment_attention(q, k, v, *, causal=False, cu_seqlens=None, max_seqlen=None):
    """Attention one window / frame at a time with explicit matmuls: the work a
    variable-length kernel does (the CPU dispatch computes dense masked scores instead)."""
    bounds = cu_seqlens.tolist()
    out = []
    for a, b in itertools.pairwise(bounds):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax((qs @ ks.transpose(1, 2)) * qs.shape[-1] ** -0.5, dim=-1)
        out.append((probs @ vs).transpose(0, 1))
    return torch.cat(out)


@pytest.fixture(scope="module")
def vlm():
    """A tiny Qwen2.5-VL (windowed ViT, merger, Qwen2 text) with a frozen encoder (recipe=vlm's
    ``train.freeze=[vision]``), and micro-batches from its processor: one with two images of
    different sizes, one text-only with the stand-in image ``dummy_visual``."""
    config = vlm_config_from_dict(
        {
            "vision": {
                "name": "qwen2_5_vit", "depth": 2, "hidden_size": 32, "intermediate_size": 40,
                "num_heads": 2, "patch_size": 14, "window_size": 56,
                "fullatt_block_indexes": [1],
            },
            "projector": {"name": "qwen2_5_vl_merger"},
            "text": {"size": "qwen2-debug", "mrope_section": [2, 3, 3]},
            "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7,
            "frozen": ["vision"],
        }
    )  # fmt: skip
    processor = build_processor(config, DataConfig(max_tiles=4))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, size, dtype=np.uint8) for size in ((90, 150, 3), (60, 60, 3))]
    visual = processor(images)
    ids = torch.zeros(1, 40, dtype=torch.long)
    documents = torch.cat([torch.zeros(1, 30), -torch.ones(1, 10)], dim=1).long()  # padding
    with_images = {"input_ids": ids, "document_ids": documents, "visual": visual}
    dummy = processor([np.zeros((28, 28, 3), dtype=np.uint8)])
    text_only = {"input_ids": ids, "document_ids": documents, "visual": {}, "dummy_visual": dummy}
    return config, [with_images, text_only]


def _measured_visual_flops(config, micro_batch) -> int:
    """FlopCounterMode over the model's encoder + projector, forward and backward, on the
    visual inputs forge-train passes the model for ``micro_batch``."""
    torch.manual_seed(0)
    model = VisionLanguageModel(config.replace(**{"text.num_layers": 1}))
    images = vlm_model_inputs(micro_batch, CPU)["images"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qwen2_5_vit, "attention", _segment_attention)
        with FlopCounterMode(display=False) as counter:
            model.visual_features(images).square().sum().backward()
    assert model.trainable_parts() == ["projector", "language_model"]
    return counter.get_total_flops()


def test_visual_flops_of_a_micro_batch_are_the_measured_ones(vlm):
    config, batch = vlm
    counted = VisualFlops(config)
    assert counted.unsupported is None
    measured = _measured_visual_flops(config, batch[0])
    assert measured > 0
    # The text-only micro-batch's stand-in image is not counted (as padding is not).
    assert counted(batch) == counted(batch[:1]) == measured
    assert counted(batch[1:]) == 0


def test_row_flops_are_language_model_plus_encoder(vlm):
    config, batch = vlm
    fpt = forge_models.flops_per_token(config.text, 40, causal=True)
    tokens, visual = input_tokens(batch), VisualFlops(config)(batch)
    assert tokens == 60  # non-padding positions of both micro-batches
    figures = window_figures(
        tokens=tokens, visual_flops=visual, seconds=2.0, flops_per_token=fpt, world_size=2,
        peak=1e12,
    )  # fmt: skip
    assert figures["flops"] == tokens * fpt + visual
    assert figures["tokens_per_s"] == 30.0
    assert figures["mfu"] == pytest.approx(figures["flops"] / 2.0 / (2 * 1e12), rel=1e-12)
    assert figures["mfu"] > mfu(30.0, fpt, 2, 1e12)  # the language model's alone


def test_llm_figures_are_unchanged():
    """No visual FLOPs: exactly the language-model formula as before (tokens/s x
    flops_per_token / (devices x peak)), bit for bit."""
    for tokens, seconds, fpt, world in ((4096, 1.7, 6.1e9, 8), (123, 0.3, 1234567, 1)):
        figures = window_figures(
            tokens=tokens, visual_flops=0, seconds=seconds, flops_per_token=fpt,
            world_size=world, peak=989e12,
        )  # fmt: skip
        assert figures["mfu"] == (tokens / seconds) * fpt / (world * 989e12)
        assert figures["tokens_per_s"] == tokens / seconds
        assert figures["flops"] == tokens * fpt
    assert (
        window_figures(
            tokens=1, visual_flops=5, seconds=1.0, flops_per_token=1.0, world_size=1, peak=None
        )["mfu"]
        is None
    )


class _Rows:
    def __init__(self):
        self.rows = []

    def log(self, row, show):
        self.rows.append(row)

    def message(self, text):
        raise AssertionError(text)


def test_loop_rows_add_the_encoder_flops_of_the_window(vlm, tmp_path):
    """The loop's own steps (Trainer._steps), with a stand-in step runner: each row's
    ``flops`` is the window's tokens x flops_per_token plus its micro-batches' visual FLOPs."""
    config, batch = vlm
    cfg = tiny.tiny_config(tmp_path, "train.steps=4", "train.eval_every=0", "logging.log_every=2")
    trainer = Trainer.__new__(Trainer)
    fpt = 1000
    schedule = SimpleNamespace(
        config=SimpleNamespace(lr=1.0), factor=lambda step: 1.0, step=lambda: None
    )
    trainer.cfg, trainer.rank, trainer.device, trainer.world_size = cfg, 0, CPU, 1
    trainer.run_dir, trainer.peak, trainer._bad_reported = tmp_path, 1e12, 0
    trainer.progress, trainer.log = Progress(), _Rows()
    trainer.accelerator = SimpleNamespace(memory_stats=lambda: {"peak_allocated": 0})
    trainer.runner = SimpleNamespace(run=lambda step, b: (1.0, 1.0, 7))
    trainer.parts = SimpleNamespace(
        loader=itertools.cycle([batch]), schedule=schedule, flops_per_token=fpt,
        visual_flops=VisualFlops(config), dp_size=1, dp_group=None,
    )  # fmt: skip
    trainer._steps(TrainResult(run_dir=tmp_path), None)
    visual = VisualFlops(config)(batch)
    assert visual > 0
    rows = trainer.log.rows
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["flops"] == 2 * (input_tokens(batch) * fpt + visual)
        assert row["mfu"] == pytest.approx(
            row["tokens_per_s"] * (fpt + visual / input_tokens(batch)) / 1e12, rel=1e-9
        )
    trainer.parts.visual_flops = None  # an LLM: the language model's figure alone
    trainer.log, trainer.progress.step = _Rows(), 0
    trainer._steps(TrainResult(run_dir=tmp_path), None)
    for row in trainer.log.rows:
        assert row["flops"] == 2 * input_tokens(batch) * fpt
        assert row["mfu"] == mfu(row["tokens_per_s"], fpt, 1, 1e12)
