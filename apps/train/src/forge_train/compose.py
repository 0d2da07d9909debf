"""Compose the Hydra config tree (:mod:`forge_train.conf`) with command-line overrides.

Uses Hydra's compose API (``initialize_config_module`` + ``compose``), so there is no Hydra
run directory, no working-directory change and no logging set-up: the run's folder is
``train.output_dir``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from typing import Any

from forge_train.config import ConfigError, ModelSettings, RunConfig, run_config_from_dict

__all__ = [
    "compose_dict",
    "compose_run_config",
    "compose_yaml",
    "list_presets",
    "unknown_key_hint",
]

CONFIG_MODULE = "forge_train.conf"
GROUPS = ("model", "parallel", "data", "optim", "train", "checkpoint", "logging", "recipe")


def _compose(overrides: Sequence[str]):
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        refused = re.search(r"Could not override '([^']+)'", str(exc))
        hint = unknown_key_hint(refused.group(1)) if refused else None
        if hint is not None:
            raise ConfigError(hint) from exc
        raise ConfigError(f"cannot compose the config from {list(overrides)}: {exc}") from exc


def _dataclass_in(hint: Any) -> type | None:
    """The config dataclass a field holds (``LoraConfig | None`` -> ``LoraConfig``), if any."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _model_config_fields() -> set[str]:
    """Every key ``model.config`` may hold: a language model's ``TransformerConfig`` fields and
    a vision-language model's ``VLMConfig`` ones."""
    from forge_models import TransformerConfig
    from forge_models.vlm import VLMConfig

    return {f.name for cls in (TransformerConfig, VLMConfig) for f in dataclasses.fields(cls)}


def unknown_key_hint(key: str) -> str | None:
    """``unknown key train.stepz; did you mean train.steps?`` for a ``group.key=value``
    override whose key is not a field of the run config's dataclasses (:class:`RunConfig`,
    nested: ``logging.wandb.project``; ``model.config.<name>`` against the model config's
    fields), the nearest field by ``difflib``; ``None`` for a key that exists there (Hydra
    refuses a valid key the chosen preset leaves out, e.g. ``lora.rank`` while ``lora`` is
    null, and its advice to add it with ``+key=value`` then stands).

    Hydra's own message for a typo ("Could not override 'train.stepz'. To append to your config
    use +train.stepz=3") sends the user to a second error instead of the key they meant."""
    parts = key.split(".")
    cls: type = RunConfig
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        names = [f.name for f in dataclasses.fields(cls)]
        if depth == 0:  # the root also holds the preset-only groups (recipe)
            names += [g for g in GROUPS if g not in names]
        if part not in names:
            return _did_you_mean(key, part, prefix, names, list_all=True)
        inner = _dataclass_in(typing.get_type_hints(cls)[part])
        if inner is None:
            if (cls, part) == (ModelSettings, "config") and depth + 1 < len(parts):
                name = parts[depth + 1]
                fields = _model_config_fields()
                if name not in fields:  # only a near miss: a VLM's keys are nested dicts
                    return _did_you_mean(key, name, f"{prefix}.{part}", sorted(fields))
            return None
        cls = inner
    return None


#: Other trainers' names (Hugging Face ``TrainingArguments``, Megatron-LM, torchtitan) for keys
#: that spelling distance alone does not reach (``learning_rate`` is far from ``lr``).
ALIASES = {
    "learning_rate": "lr",
    "max_steps": "steps",
    "num_steps": "steps",
    "training_steps": "steps",
    "train_steps": "steps",
    "seq_length": "seq_len",
    "max_seq_len": "seq_len",
    "max_seq_length": "seq_len",
    "sequence_length": "seq_len",
    "global_batch_size": "global_batch_rows",
    "micro_batch_size": "micro_batch_rows",
    "batch_size": "micro_batch_rows",
    "clip_grad": "grad_clip",
    "max_grad_norm": "grad_clip",
    "clip_grad_norm": "grad_clip",
    "warmup": "warmup_steps",
    "lr_warmup_steps": "warmup_steps",
    "tensor_parallel": "tp",
    "tensor_model_parallel_size": "tp",
    "pipeline_parallel": "pp",
    "pipeline_model_parallel_size": "pp",
    "context_parallel": "cp",
    "context_parallel_size": "cp",
    "expert_parallel": "ep",
    "expert_model_parallel_size": "ep",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "lora_rank": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
}


def _did_you_mean(
    key: str, name: str, prefix: str, names: list[str], *, list_all: bool = False
) -> str | None:
    """The message for the unknown ``name`` under ``prefix``: the closest of ``names`` (a
    known alias first; the rest of ``key`` kept when the corrected key is valid), or
    (``list_all``) all of them when none is close; ``None`` when neither applies."""
    alias = ALIASES.get(name.lower())
    close = [alias] if alias in names else difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    full = f"{prefix}." if prefix else ""
    if close:
        rest = key.removeprefix(f"{full}{name}")  # ".steps" of "trian.steps"
        fixed = f"{full}{close[0]}{rest}"
        meant = fixed if rest and unknown_key_hint(fixed) is None else f"{full}{close[0]}"
        return f"unknown key {key}; did you mean {meant}?"
    if list_all:
        return f"unknown key {key}; valid keys under {prefix or 'the root'}: {', '.join(names)}"
    return None


def compose_dict(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed config as plain data (interpolations resolved, ``???`` kept as a string)."""
    from omegaconf import OmegaConf

    cfg = _compose(overrides)
    return OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)


def compose_yaml(overrides: Sequence[str] = ()) -> str:
    """The composed config as YAML, for ``--cfg``."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(_compose(overrides))


def compose_run_config(overrides: Sequence[str] = ()) -> RunConfig:
    """Compose and validate: ``ConfigError`` names the wrong key and why."""
    return run_config_from_dict(compose_dict(overrides))


def list_presets() -> dict[str, list[str]]:
    """Preset names of each config group, from the package's YAML files."""
    from importlib.resources import files

    root = files(CONFIG_MODULE)
    return {
        group: sorted(
            p.name.removesuffix(".yaml")
            for p in root.joinpath(group).iterdir()
            if p.name.endswith(".yaml")
        )
        for group in GROUPS
    }
