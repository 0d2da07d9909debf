"""The Hydra config tree composes, validates into typed configs, and names wrong keys."""

from __future__ import annotations

import pytest

from forge_train.cli import main
from forge_train.compose import compose_run_config, list_presets
from forge_train.config import ConfigError, ParallelSettings


def test_default_config_and_presets_compose():
    cfg = compose_run_config([])
    assert cfg.model.config["family"] == "llama"
    assert cfg.data.kind == "stdlib"
    assert cfg.lora is None
    assert cfg.parallel.data_parallel is None
    presets = list_presets()
    for group, names in presets.items():
        if group in ("recipe", "model"):
            continue
        for name in names:
            compose_run_config([f"{group}={name}", "data.paths=[x.jsonl]"])
    # A preset that leaves out a setting would refuse it as a command-line override.
    fields = set(ParallelSettings.__dataclass_fields__)
    for name in presets["parallel"]:
        keys = set(compose_run_config([f"parallel={name}"]).to_dict()["parallel"])
        assert keys == fields, (name, fields ^ keys)
    lora = compose_run_config(["recipe=lora", "data.paths=[c.jsonl]"])
    assert lora.data.kind == "chat"
    assert lora.lora.rank == 8
    assert lora.optim.weight_decay == 0.0
    big = compose_run_config(["model=llama3.2-1b", "parallel=tp2-fsdp", "train.steps=100"])
    assert big.model.name == "llama3.2-1b"
    assert big.parallel.tp == 2
    assert big.train.steps == 100


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lr=-1"], "optim.lr: must be > 0, got -1.0"),
        (["train.steps=0"], "train.steps: must be >= 1, got 0"),
        (["parallel.tp=two"], "parallel.tp: expected an int, got 'two'"),
        (["train.precision=fp8"], "train.precision: must be one of fp32, bf16, fp16, got 'fp8'"),
        (["data.global_batch_rows=6"], "data.global_batch_rows: must be a multiple of"),
        (["recipe=sft"], "data.paths: is required"),
        (["data.nope=1"], "unknown key data.nope; valid keys under data"),
        (["model=nope"], "Could not find 'model/nope'"),
        (["+model.config.bogus=1"], None),  # unknown model fields surface when the model is built
        (
            ["parallel.recompute_modules=[attn]"],
            "parallel.recompute_modules: checkpoints the listed submodules of each block under "
            "parallel.recompute=selective; set parallel.recompute=selective",
        ),
    ],
)
def test_invalid_values_name_the_key(overrides, message):
    if message is None:
        compose_run_config(overrides)
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        compose_run_config(overrides)


def test_expert_parallelism_takes_every_recompute():
    """forge-parallel replays the expert all-to-all under per-op policies too (exact at EP2,
    forge-parallel's test_expert_parallel.py): every recompute setting is accepted with ep > 1
    (was a ConfigError for selective without recompute_modules and for auto)."""
    ep = {"ep": 2, "data_parallel": "fsdp"}
    ParallelSettings(**ep, recompute="selective")
    ParallelSettings(**ep, recompute="auto", recompute_budget_mib=8)
    ParallelSettings(**ep, recompute="full")
    ParallelSettings(**ep, recompute="selective", recompute_modules=["attn", "mlp"])


def test_world_size_must_fit_the_layout():
    tp2 = compose_run_config(["parallel=tp2-fsdp"]).parallel
    one = {"cp": 1, "ep": 1}
    assert tp2.resolve(4) == {"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2, **one}
    pp2 = compose_run_config(["parallel=pp2-fsdp"]).parallel
    assert pp2.resolve(4) == {"pp": 2, "dp_replicate": 1, "dp_shard": 2, "tp": 1, **one}
    cp2 = compose_run_config(["parallel=cp2-fsdp", "parallel.ep=4"]).parallel
    assert cp2.resolve(8) == {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "cp": 2, "tp": 1, "ep": 4}
    with pytest.raises(ConfigError, match=r"parallel.ep: .* dp_shard x cp = 4, which 3 does not"):
        cp2.__class__(**{**cp2.__dict__, "ep": 3}).resolve(4)
    with pytest.raises(ConfigError, match=r"parallel\.cp: cannot be inferred"):
        ParallelSettings(cp=-1, data_parallel="fsdp")
    with pytest.raises(ConfigError, match=r"context parallelism \(cp > 1\) needs fsdp or hsdp"):
        ParallelSettings(cp=2, data_parallel="ddp")
    with pytest.raises(
        ConfigError, match=r"parallel.dp_shard: cannot be inferred: the world size 3"
    ):
        tp2.resolve(3)
    with pytest.raises(ConfigError, match="1 processes, but the world size is 2"):
        ParallelSettings().resolve(2)


def test_cli_prints_config_help_and_errors(capsys):
    assert main(["--cfg", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "tp2-fsdp" in capsys.readouterr().out
    assert main(["optim.lr=-1"]) == 2
    assert "optim.lr: must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel=pp2-fsdp", "parallel.pp_schedule=interleaved_1f1b"],
            "parallel.pp_virtual_stages: schedule interleaved_1f1b runs several stages",
        ),
        (
            ["parallel=pp2-fsdp", "parallel.pp_virtual_stages=2"],
            "parallel.pp_virtual_stages: schedule 1f1b runs one stage per rank",
        ),
    ],
)
def test_pipeline_layouts_are_validated(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose_run_config(overrides)


@pytest.mark.parametrize("mode", ["ddp", "hsdp", "zero1", "zero2", "fsdp"])
def test_every_data_parallel_mode_runs_on_pipeline_stages(mode):
    parallel = compose_run_config(["parallel=pp2-fsdp", f"parallel.data_parallel={mode}"]).parallel
    assert (parallel.pp, parallel.data_parallel) == (2, mode)
