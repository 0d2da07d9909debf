"""The language-model half of a vision-language ``config.json``.

transformers 5 nests the LLM's settings in ``text_config``; the checkpoints as first published
(Qwen2-VL / Qwen2.5-VL) keep them at the root. Both are read: root keys, overlaid by
``text_config``. M-RoPE's ``mrope_section`` lives in the RoPE settings (``rope_scaling`` with
``type: mrope`` in the original files, ``rope_parameters`` in transformers 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_models.config import TransformerConfig

__all__ = ["text_config_from_vlm_hf", "text_config_to_vlm_hf", "text_hf_config"]

#: ``model_type`` of a VLM's text config -> the forge family that reads it. The bare VLM types
#: are what a flat ``config.json`` (the original Qwen2-VL / Qwen2.5-VL uploads: text settings at
#: the root, no ``text_config``) shows as the text settings' ``model_type``. LLaVA-OneVision and
#: InternVL always nest their language model in ``text_config`` with its own ``model_type``.
TEXT_MODEL_TYPES = {
    "qwen2_5_vl_text": "qwen2",
    "qwen2_vl_text": "qwen2",
    "qwen2_5_vl": "qwen2",
    "qwen2_vl": "qwen2",
}

_VLM_ONLY_KEYS = ("vision_config", "text_config", "architectures", "model_type", "auto_map")


def text_hf_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The text model's ``config.json`` settings: root keys overlaid by ``text_config``."""
    merged = {k: v for k, v in hf.items() if k not in _VLM_ONLY_KEYS}
    text = hf.get("text_config") or {}
    merged.update(text)
    merged.setdefault("model_type", text.get("model_type"))
    return merged


def _pop_mrope(text: dict[str, Any]) -> tuple[int, int, int] | None:
    """Remove ``mrope_section`` from the RoPE settings (returned), leaving a plain RoPE."""
    section = None
    for key in ("rope_parameters", "rope_scaling"):
        params = text.get(key)
        if isinstance(params, Mapping) and "mrope_section" in params:
            params = dict(params)
            section = tuple(int(s) for s in params.pop("mrope_section"))
            for type_key in ("rope_type", "type"):
                if params.get(type_key) in ("mrope", "default"):
                    params[type_key] = "default"
            text[key] = params
    return section


def text_config_from_vlm_hf(
    hf: Mapping[str, Any], *, mrope_default: tuple[int, int, int] | None = None, **overrides: Any
) -> TransformerConfig:
    """A :class:`TransformerConfig` for a VLM's language model from the VLM ``config.json``.

    ``mrope_default``: the family's M-RoPE section when the file names none (transformers'
    Qwen2.5-VL falls back to ``[16, 24, 24]``); ``None`` for 1-D RoPE families.
    """
    from forge_models.registry import family_for_hf_config, get_family
    from forge_models.vlm.model import VisionLanguageModel

    text = text_hf_config(hf)
    section = _pop_mrope(text) or mrope_default
    model_type = text.get("model_type")
    if model_type in TEXT_MODEL_TYPES:
        family = get_family(TEXT_MODEL_TYPES[model_type])
    else:
        family = family_for_hf_config(text)
    if issubclass(family.model_cls, VisionLanguageModel):
        raise ValueError(
            f"the language model's settings in this config.json have model_type="
            f"{model_type!r}, a vision-language family ({family.name!r}), so forge cannot tell "
            f"which text family reads them; put them in text_config with the text model's "
            f"model_type (a text family's, e.g. 'qwen2', 'llama', or one of "
            f"{sorted(t for t in TEXT_MODEL_TYPES if t.endswith('_text'))})"
        )
    if section is not None:
        overrides["mrope_section"] = section
    return family.config_from_hf(text, **overrides)


def text_config_to_vlm_hf(config: TransformerConfig, *, model_type: str | None = None) -> dict:
    """The ``text_config`` dict of ``config`` (with ``mrope_section`` in its RoPE settings)."""
    from forge_models.registry import get_family

    text = get_family(config.family).config_to_hf(config.replace(mrope_section=None))
    text.pop("architectures", None)
    if model_type is not None:
        text["model_type"] = model_type
    if config.mrope_section is not None:
        section = list(config.mrope_section)
        params = dict(text.get("rope_parameters") or {"rope_type": "default"})
        params["mrope_section"] = section
        text["rope_parameters"] = params
        scaling = dict(text.get("rope_scaling") or {"rope_type": "default"})
        scaling["mrope_section"] = section
        text["rope_scaling"] = scaling
    return text
