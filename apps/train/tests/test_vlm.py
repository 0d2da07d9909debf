"""forge-train on a vision-language model: recipe=vlm (vlm-tiny on scikit-image captions);
the steps are run by hand (constant learning rate) to compare the weights before and after."""

from __future__ import annotations

import pytest
import torch

from forge_train.components import build_components
from forge_train.compose import compose_run_config
from forge_train.data import model_inputs

pytest.importorskip("skimage")


def test_vlm_recipe_trains_with_frozen_vision(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_DATA_CACHE", str(tmp_path / "cache"))
    cfg = compose_run_config(
        ["recipe=vlm", "train.steps=12", f"train.output_dir={tmp_path / 'run'}"]
    )
    assert cfg.model.kind == "vlm"
    assert cfg.train.freeze == ["vision"]
    parts = build_components(
        cfg, world_size=1, degrees={"dp_replicate": 1, "dp_shard": 1, "tp": 1},
        device=torch.device("cpu"),
    )  # fmt: skip
    model = parts.model
    assert model.trainable_parts() == ["projector", "language_model"]
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    for group in parts.optimizer.param_groups:  # no warmup schedule in this hand-run loop
        group["lr"] = cfg.optim.lr
    losses = []
    for _ in range(cfg.train.steps):
        micro_batches = next(parts.loader)
        assert "images" in model_inputs(micro_batches[0], torch.device("cpu"))[0]
        total, count = 0.0, 0
        for mb in micro_batches:
            kwargs, n = model_inputs(mb, torch.device("cpu"))
            loss = model(**kwargs, loss_reduction="sum")
            (loss / n).backward()
            total, count = total + float(loss), count + int(n)
        parts.optimizer.step()
        parts.optimizer.zero_grad(set_to_none=True)
        losses.append(total / count)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    for k, v in model.vision.state_dict().items():
        torch.testing.assert_close(v, vision_before[k], rtol=0, atol=0)
    assert any(
        not torch.equal(v, projector_before[k]) for k, v in model.projector.state_dict().items()
    )
