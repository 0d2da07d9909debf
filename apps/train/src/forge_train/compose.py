"""Compose the Hydra config tree (:mod:`forge_train.conf`) with command-line overrides.

Uses Hydra's compose API (``initialize_config_module`` + ``compose``), so there is no Hydra
run directory, no working-directory change and no logging set-up: the run's folder is
``train.output_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from forge_train.config import ConfigError, RunConfig, run_config_from_dict

__all__ = ["compose_dict", "compose_run_config", "compose_yaml", "list_presets"]

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
        raise ConfigError(f"cannot compose the config from {list(overrides)}: {exc}") from exc


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
