"""Build a :class:`VisionLanguageModel` from a config or plain data (YAML)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from forge_models.vlm.config import VLMConfig, vlm_config_from_dict
from forge_models.vlm.model import VisionLanguageModel

__all__ = ["build_vlm"]


def build_vlm(
    config: VLMConfig | Mapping[str, Any],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    init: bool = True,
) -> VisionLanguageModel:
    """A VLM from a :class:`VLMConfig` or its plain-data form (see :func:`vlm_config_from_dict`).

    ``device="meta"`` allocates nothing (materialize later, e.g. after sharding); ``init=False``
    leaves the weights uninitialized for loading a checkpoint.
    """
    from forge_models.registry import materialize  # the registry imports this package

    if not isinstance(config, VLMConfig):
        config = vlm_config_from_dict(config)
    with torch.device("meta"):
        model = VisionLanguageModel(config)
    if dtype is not None:
        model.to(dtype=dtype)
    if device is not None and torch.device(device).type == "meta":
        return model
    return materialize(model, device, init=init)
