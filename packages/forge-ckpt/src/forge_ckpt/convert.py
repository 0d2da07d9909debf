"""Whole-checkpoint conversion between a Hugging Face folder and a forge state dict.

These hold the full state in memory; :func:`forge_models.from_pretrained` streams into a model
instead. Useful for conversion scripts and for checking a mapping round trip.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from forge_ckpt.hf.io import HFCheckpoint, save_hf_checkpoint
from forge_ckpt.mapping.registry import get_mapping, mapping_for_hf_config
from forge_ckpt.mapping.spec import MappingSpec

__all__ = ["load_hf_as_forge", "save_forge_as_hf"]


def _spec(mapping: str | MappingSpec | None, config: Mapping[str, Any]) -> MappingSpec:
    if mapping is None:
        return mapping_for_hf_config(config)
    return get_mapping(mapping) if isinstance(mapping, str) else mapping


def load_hf_as_forge(
    hf_dir: str | os.PathLike,
    *,
    mapping: str | MappingSpec | None = None,
    **options: Any,
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(forge state dict, config.json)`` of a Hugging Face folder.

    ``mapping`` defaults to the one for the config's ``model_type``; ``options`` go into the
    mapping context (``vocab_pad_multiple=...``). Raises
    :class:`~forge_ckpt.errors.CheckpointMismatchError` before reading any data if the
    checkpoint's tensors do not fit the mapping, the shapes its config.json implies, or are
    not floating-point.
    """
    ckpt = HFCheckpoint(hf_dir)
    config = ckpt.config
    spec = _spec(mapping, config)
    # What the tensor names say (stacked experts, DeepSeek's MTP layers); options override it.
    ctx = spec.context(config, **{**spec.detect_context(ckpt.names()), **options})
    info = ckpt.tensor_info()
    spec.check_hf(
        {n: i.shape for n, i in info.items()},
        ctx,
        hf_config=config,
        hf_dtypes={n: i.dtype for n, i in info.items()},
    )
    return dict(spec.hf_to_forge(ckpt.iter_tensors(), ctx)), config


def save_forge_as_hf(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    mapping: str | MappingSpec | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write a forge state dict as a Hugging Face folder with ``config`` as its config.json."""
    spec = _spec(mapping, config)
    ctx = spec.context(config, **options)
    spec.check_forge({n: t.shape for n, t in state_dict.items()}, ctx)
    return save_hf_checkpoint(
        out_dir,
        spec.forge_to_hf(state_dict.items(), ctx),
        config=config,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )
