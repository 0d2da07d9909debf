"""Pieces every vision-language family module shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from forge_models.config import TransformerConfig
from forge_models.vlm.hf_text import text_config_from_vlm_hf, text_config_to_vlm_hf

__all__ = ["text_from_hf", "text_to_hf", "token_id"]


def text_from_hf(
    hf: Mapping[str, Any],
    view: Callable[[Mapping[str, Any]], dict[str, Any]],
    *,
    mrope_default: tuple[int, int, int] | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """The language model's config through forge-ckpt's view of ``hf`` (which resolves where
    the family keeps its settings and how transformers decides the tied head)."""
    return text_config_from_vlm_hf(
        {"text_config": view(hf)}, mrope_default=mrope_default, **overrides
    )


def text_to_hf(config: TransformerConfig, *, model_type: str | None = None) -> dict[str, Any]:
    """``text_config`` for ``config.json``."""
    return text_config_to_vlm_hf(config, model_type=model_type)


def token_id(hf: Mapping[str, Any], *names: str, required: bool = True) -> int | None:
    """The first of ``names`` set in the root or ``text_config`` (old files say ``*_index``)."""
    for source in (hf, hf.get("text_config") or {}):
        for name in names:
            if source.get(name) is not None:
                return int(source[name])
    if required:
        raise ValueError(
            f"config.json names none of {list(names)}: which token is the placeholder?"
        )
    return None
