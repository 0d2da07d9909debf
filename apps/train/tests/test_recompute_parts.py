"""forge-train's recompute settings across a model's parts and pipeline schedules.

A vision-language model's encoder and language model get the same ``parallel.recompute``
(torchtitan checkpoints both parts' blocks); with ``parallel.recompute_modules`` each part gets
the patterns that match a submodule of its blocks (Megatron-Core skips a ``--recompute-modules``
entry a layer lacks), and a pattern that matches in neither part stops the run naming it.
Zero-bubble pipeline schedules run whole-submodule checkpoints and refuse the per-op
(``selective`` without modules) policy at config time, as forge-parallel does at build time.
"""

from __future__ import annotations

import pytest

from forge_train.components import _part_recompute
from forge_train.compose import compose_run_config
from forge_train.config import ConfigError
from forge_train.data import load_run_tokenizer
from forge_train.modeling import build_model
from forge_train.vlm_model import vlm_model_config

PARTS = ("vision", "language_model")


@pytest.fixture(scope="module", autouse=True)
def data_cache(vlm_data_cache_dir):
    """The session's VLM data cache (demo tokenizer, image shard) for the module's runs."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGE_DATA_CACHE", str(vlm_data_cache_dir))
        yield


@pytest.fixture(scope="module")
def vlm(data_cache):
    """The tiny VLM of recipe=vlm (blocks: vision attn/mlp.fc1/fc2, language attn/mlp.*)."""
    cfg = compose_run_config(["recipe=vlm"])
    tokenizer = load_run_tokenizer(cfg.data, cfg.model)
    config = vlm_model_config(cfg.model, tokenizer, frozen=cfg.train.freeze)
    return build_model(cfg.model, config, seed=0)[0]


def _parts(model, *overrides: str):
    cfg = compose_run_config(["recipe=vlm", "parallel.recompute=selective", *overrides])
    return _part_recompute(model, cfg, PARTS)


def test_each_part_gets_the_patterns_matching_its_blocks(vlm):
    both = _parts(vlm, "parallel.recompute_modules=[attn,mlp]")
    assert {p: c.modules for p, c in both.items()} == dict.fromkeys(PARTS, ("attn", "mlp"))
    assert both["vision"].ops is None  # whole submodules
    only_vision = _parts(vlm, "parallel.recompute_modules=[mlp.fc1]")
    assert only_vision["vision"].modules == ("mlp.fc1",)
    assert only_vision["language_model"] is None
    mixed = _parts(vlm, "parallel.recompute_modules=[attn,mlp.gate_up_proj,mlp.fc*]")
    assert mixed["vision"].modules == ("attn", "mlp.fc*")
    assert mixed["language_model"].modules == ("attn", "mlp.gate_up_proj")
    # without modules every part gets the run's recompute as it is
    plain = _parts(vlm)
    assert plain["vision"] is plain["language_model"]
    assert plain["vision"].ops == "pointwise"


def test_a_pattern_matching_no_part_names_it(vlm):
    with pytest.raises(
        ConfigError,
        match=r"recompute_modules: \['mlp\.up_proj'\] match no submodule of any block of "
        r"vision or language_model.*vision: attn, .*mlp\.fc1.*language_model: .*gate_up_proj",
    ):
        _parts(vlm, "parallel.recompute_modules=[attn,mlp.up_proj]")


@pytest.mark.parametrize("schedule", ["zero_bubble", "zbv"])
def test_zero_bubble_refuses_per_op_selective_and_takes_whole_submodules(schedule):
    layout = ["parallel=pp2-fsdp", f"parallel.pp_schedule={schedule}"]
    if schedule == "zbv":
        layout.append("parallel.pp_virtual_stages=2")
    with pytest.raises(
        ConfigError,
        match=r"parallel.recompute: selective without recompute_modules runs a per-op policy.*"
        r"recompute_modules=\[attn,mlp\]",
    ):
        compose_run_config([*layout, "parallel.recompute=selective"])
    compose_run_config(
        [*layout, "parallel.recompute=selective", "parallel.recompute_modules=[attn,mlp]"]
    )
    compose_run_config([*layout, "parallel.recompute=full"])
    compose_run_config(["parallel=pp2-fsdp", "parallel.recompute=selective"])  # 1f1b


def test_one_process_vlm_checkpoints_both_parts_with_exact_gradients(tmp_path):
    """parallelize finds the language model's blocks only: the vision encoder's are
    checkpointed apart (components._recompute_vision_apart), gradients unchanged."""
    import torch

    from forge_train.components import build_components
    from forge_train.config import ParallelSettings
    from forge_train.data import model_inputs

    cpu = torch.device("cpu")
    base = ["recipe=vlm", "train.freeze=[]", f"train.output_dir={tmp_path}"]
    grads = []
    for extra in (
        [],
        ["parallel.recompute=selective", "parallel.recompute_modules=[mlp.fc1,attn]"],
    ):
        torch.manual_seed(0)
        parts = build_components(
            compose_run_config([*base, *extra]),
            world_size=1,
            degrees=ParallelSettings().resolve(1),
            device=cpu,
        )
        model = parts.model
        kwargs, n = model_inputs(next(parts.loader)[0], cpu)
        (model(**kwargs, loss_reduction="sum") / n).backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        if extra:
            assert model.vision.blocks[0].mlp.fc1._forge_recompute == "full"
            assert model.vision.blocks[1].attn._forge_recompute == "full"
            assert not hasattr(model.vision.blocks[0].mlp, "_forge_recompute")
            assert model.language_model.layers[1].attn._forge_recompute == "full"
            assert not hasattr(model.language_model.layers[0].mlp, "_forge_recompute")
            # the summary lists the vision checkpoints made before parallelize, too
            summary = parts.parallel.summary
            assert summary.row("vision.blocks.0.mlp.fc1").recompute == "full"
            assert summary.row("language_model.layers.1.attn").recompute == "full"
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert grad is not None, name
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-7, msg=name)
