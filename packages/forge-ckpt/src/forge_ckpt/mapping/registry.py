"""Mappings by name, built-ins imported lazily; registering a duplicate name raises."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families import BUILTIN_MAPPINGS as _FAMILY_MAPPINGS
from forge_ckpt.mapping.spec import MappingSpec

__all__ = ["get_mapping", "list_mappings", "mapping_for_hf_config", "register_mapping"]

#: Registry name -> module defining ``MAPPING``: the single-model families (each with a
#: Megatron-Core counterpart), then the vision-language models composed of them
#: (:class:`~forge_ckpt.mapping.composed.ComposedMapping`).
BUILTIN_MAPPINGS = {
    **_FAMILY_MAPPINGS,
    "qwen2_5_vl": "forge_ckpt.mapping.families.qwen2_5_vl",
    "llava_onevision": "forge_ckpt.mapping.families.llava_onevision",
    "internvl": "forge_ckpt.mapping.families.internvl",
}

_MAPPINGS: dict[str, MappingSpec] = {}


def register_mapping(spec: MappingSpec) -> MappingSpec:
    """Add ``spec`` under ``spec.name``; ``ValueError`` if the name is taken."""
    if not isinstance(spec, MappingSpec):
        raise TypeError(f"expected a MappingSpec, got {type(spec).__name__}")
    if spec.name in _MAPPINGS or spec.name in BUILTIN_MAPPINGS:
        raise ValueError(f"a checkpoint mapping named {spec.name!r} is already registered")
    _MAPPINGS[spec.name] = spec
    return spec


def _load_builtin(name: str) -> MappingSpec:
    module = importlib.import_module(BUILTIN_MAPPINGS[name])
    spec = module.MAPPING
    _MAPPINGS.setdefault(name, spec)
    return spec


def get_mapping(name: str) -> MappingSpec:
    """The mapping registered as ``name`` (built-ins: :data:`BUILTIN_MAPPINGS`)."""
    if name in _MAPPINGS:
        return _MAPPINGS[name]
    if name in BUILTIN_MAPPINGS:
        return _load_builtin(name)
    raise KeyError(f"no checkpoint mapping {name!r}; known: {', '.join(list_mappings())}")


def list_mappings() -> list[str]:
    """Names of all mappings (built-in and registered), sorted."""
    return sorted(set(_MAPPINGS) | set(BUILTIN_MAPPINGS))


def mapping_for_hf_config(config: Mapping[str, Any]) -> MappingSpec:
    """The mapping whose ``hf_model_types`` contains ``config["model_type"]``."""
    model_type = config.get("model_type")
    for name in list_mappings():
        spec = get_mapping(name)
        if model_type in spec.hf_model_types:
            return spec
    known = sorted({t for n in list_mappings() for t in get_mapping(n).hf_model_types})
    raise ValueError(
        f"no checkpoint mapping reads model_type={model_type!r} (config architectures: "
        f"{config.get('architectures')}); supported model types: {known}"
    )
