"""Model families and named sizes, registered by name; built-ins imported on first use.

::

    from forge_models import build_model, get_config, list_sizes

    list_sizes("llama")                          # ['llama-debug', 'llama2-13b', ...]
    model = build_model("llama3-8b", device="meta")     # no memory allocated
    model = build_model("qwen3-debug", num_layers=1)    # overrides, materialized and initialized

Registering a family or size name that is already taken raises ``ValueError``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from forge_models.config import TransformerConfig
from forge_models.parallel_plan import plan_without_sequence_parallel
from forge_models.vlm.config import VLMConfig

__all__ = [
    "ModelFamily",
    "build_model",
    "family_for_hf_config",
    "get_config",
    "get_family",
    "list_families",
    "list_sizes",
    "materialize",
    "register_family",
    "register_size",
]

#: Built-in family name -> module defining ``FAMILY`` and ``SIZES``.
BUILTIN_FAMILIES = {
    "llama": "forge_models.families.llama",
    "qwen2": "forge_models.families.qwen2",
    "qwen3": "forge_models.families.qwen3",
    "qwen2_moe": "forge_models.families.qwen2_moe",
    "qwen3_moe": "forge_models.families.qwen3_moe",
    "deepseek_v3": "forge_models.families.deepseek_v3",
    "qwen2_5_vl": "forge_models.vlm.families.qwen2_5_vl",
    "llava_onevision": "forge_models.vlm.families.llava_onevision",
    "internvl": "forge_models.vlm.families.internvl",
}

#: What a family's configs are: a decoder-only LM's, or a vision-language model's.
ModelConfig = TransformerConfig | VLMConfig


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """Everything forge knows about one family besides its size table.

    Attributes:
        name: registry name, also ``TransformerConfig.family`` / ``VLMConfig.family``.
        description: one line, with the paper.
        model_cls: the module class built from a config.
        ckpt_mapping: the forge-ckpt mapping name (``forge_ckpt.get_mapping``).
        hf_model_types: ``config.json`` ``model_type`` values of this family.
        config_from_hf: ``config.json`` dict -> :class:`TransformerConfig` (or
            :class:`~forge_models.vlm.VLMConfig` for a vision-language family).
        config_to_hf: that config -> ``config.json`` dict.
        tp_plan: default tensor + sequence parallel plan (see :mod:`forge_models.parallel_plan`).
    """

    name: str
    description: str
    model_cls: type[nn.Module]
    ckpt_mapping: str
    hf_model_types: tuple[str, ...]
    config_from_hf: Callable[..., ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    tp_plan: Mapping[str, str] = field(default_factory=dict)

    def parallel_plan(self, *, sequence_parallel: bool = True) -> dict[str, str]:
        """A copy of the default plan; without sequence parallelism the norm entries go."""
        plan = dict(self.tp_plan)
        return plan if sequence_parallel else plan_without_sequence_parallel(plan)


_FAMILIES: dict[str, ModelFamily] = {}
_SIZES: dict[str, ModelConfig] = {}
_LOADED: set[str] = set()


def _load_builtin(name: str) -> None:
    if name in _LOADED:
        return
    _LOADED.add(name)
    module = importlib.import_module(BUILTIN_FAMILIES[name])
    family: ModelFamily = module.FAMILY
    _FAMILIES[family.name] = family
    for size, config in module.SIZES.items():
        _add_size(size, config)


def _load_all() -> None:
    for name in BUILTIN_FAMILIES:
        _load_builtin(name)


def _add_size(name: str, config: ModelConfig) -> None:
    if name in _SIZES:
        raise ValueError(f"model size {name!r} is already registered")
    if not isinstance(config, TransformerConfig | VLMConfig):
        raise TypeError(
            f"size {name!r}: expected a TransformerConfig or VLMConfig, got {type(config).__name__}"
        )
    _SIZES[name] = config


def register_family(family: ModelFamily) -> ModelFamily:
    """Add a family (``ValueError`` if its name is taken)."""
    _load_all()
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def register_size(name: str, config: ModelConfig) -> ModelConfig:
    """Add a named size (``ValueError`` if the name is taken or its family is unknown)."""
    _load_all()
    get_family(config.family)
    _add_size(name, config)
    return config


def get_family(name: str) -> ModelFamily:
    """The family registered as ``name``."""
    if name not in _FAMILIES and name in BUILTIN_FAMILIES:
        _load_builtin(name)
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; known: {', '.join(list_families())}")
    return _FAMILIES[name]


def list_families() -> list[str]:
    """All family names, sorted."""
    return sorted(set(_FAMILIES) | set(BUILTIN_FAMILIES))


def list_sizes(family: str | None = None) -> list[str]:
    """All size names (of one family), sorted."""
    _load_all()
    return sorted(n for n, c in _SIZES.items() if family is None or c.family == family)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The config of size ``name``, with ``overrides`` applied (``num_layers=2`` ...)."""
    _load_all()
    if name not in _SIZES:
        raise KeyError(f"unknown model size {name!r}; known sizes: {', '.join(list_sizes())}")
    config = _SIZES[name]
    return config.replace(**overrides) if overrides else config


def family_for_hf_config(config: Mapping[str, Any]) -> ModelFamily:
    """The family whose ``hf_model_types`` has ``config["model_type"]``."""
    _load_all()
    model_type = config.get("model_type")
    for family in _FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    known = sorted(t for f in _FAMILIES.values() for t in f.hf_model_types)
    raise ValueError(
        f"no forge model family for model_type={model_type!r} (architectures "
        f"{config.get('architectures')}); supported: {known}"
    )


def materialize(
    model: nn.Module, device: torch.device | str | None = None, *, init: bool = True
) -> nn.Module:
    """Allocate a meta-device model on ``device`` (``to_empty``) and, with ``init``, initialize it.

    ``init_weights`` runs parameter by parameter in place, so on a model whose parameters were
    already sharded (e.g. by FSDP) each process only allocates and initializes its own shards.
    """
    device = torch.device("cpu") if device is None else torch.device(device)

    # model.to_empty(device=device), with torch.empty instead of empty_like: on meta tensors
    # empty_like goes through torch's Python reference implementations, whose first use
    # imports them (seconds).
    def empty(t: torch.Tensor) -> torch.Tensor:
        dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
        if dtensor is not None and isinstance(t, dtensor):  # sharded: allocate the local shard
            return torch.empty_like(t, device=device)
        return torch.empty(t.shape, dtype=t.dtype, device=device)

    ties = _tied_slots(model)
    model._apply(empty)
    # _apply gives each module its own new meta -> device parameter: tie them again.
    for module, name, first_module, first_name in ties:
        module._parameters[name] = first_module._parameters[first_name]
    if init:
        model.init_weights()
    return model


def _tied_slots(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """``(module, name, first module, first name)`` of each parameter slot holding a
    parameter an earlier slot holds (a tied embedding and head)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in first:
                ties.append((module, name, *first[id(param)]))
            else:
                first[id(param)] = (module, name)
    return ties


def build_model(
    name_or_config: str | ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    init: bool = True,
    **overrides: Any,
) -> nn.Module:
    """Build a model by size name or config.

    Args:
        name_or_config: a registered size (``"llama3-8b"``, ``"qwen2.5-vl-3b"``) or a
            :class:`TransformerConfig` / :class:`~forge_models.vlm.VLMConfig`.
        device: ``"meta"`` constructs without allocating any memory (materialize later with
            :func:`materialize`, e.g. after sharding); default CPU.
        dtype: parameter dtype (default: torch's default dtype, normally float32).
        init: initialize the weights (:meth:`CausalLM.init_weights`); ``False`` leaves them
            uninitialized (for loading a checkpoint into them).
        overrides: config fields to change (``num_layers=2``).
    """
    if isinstance(name_or_config, str):
        config = get_config(name_or_config, **overrides)
    elif isinstance(name_or_config, TransformerConfig | VLMConfig):
        config = name_or_config.replace(**overrides) if overrides else name_or_config
    else:
        raise TypeError(
            "build_model takes a size name, a TransformerConfig or a VLMConfig, got "
            f"{type(name_or_config).__name__}"
        )
    family = get_family(config.family)
    with torch.device("meta"):
        model = family.model_cls(config)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None and torch.device(device).type == "meta":
        return model
    return materialize(model, device, init=init)
