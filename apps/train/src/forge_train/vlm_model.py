"""The model side of a vision-language run (``model.kind=vlm``): a
:class:`forge_models.vlm.VLMConfig` from the model group's plain-data config, with the parts the
run's tokenizer decides (vocabulary size, placeholder token ids) filled in, and ``train.freeze``
mapped to ``VLMConfig.frozen``.
"""

from __future__ import annotations

from typing import Any

from forge_train.config import ConfigError, ModelSettings

__all__ = ["VLM_TOKEN_KEYS", "vlm_model_config"]

#: VLMConfig token fields that a null in the YAML takes from the tokenizer (special token text).
VLM_TOKEN_KEYS = {"image_token_id": "image_token", "vision_start_token_id": "image_open"}


def vlm_model_config(settings: ModelSettings, tokenizer, *, style, frozen: list[str]):
    """The ``VLMConfig`` of ``model.config``: ``text.vocab_size`` null (or absent) takes
    ``model.vocab_size`` or the tokenizer's, and null token ids the tokenizer's ids of the
    placeholder ``style``'s tokens (a freshly trained tokenizer gets them added)."""
    from forge_models.vlm import vlm_config_from_dict

    fields: dict[str, Any] = dict(settings.config)
    text = dict(fields.get("text") or {})
    if text.get("vocab_size") is None and "size" not in text:
        text["vocab_size"] = settings.vocab_size or tokenizer.vocab_size
    fields["text"] = text
    for key, attr in VLM_TOKEN_KEYS.items():
        if key in fields and fields[key] is None:
            fields[key] = tokenizer.token_to_id(getattr(style, attr))
    if frozen:
        fields["frozen"] = list(frozen)
    try:
        return vlm_config_from_dict(fields)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"model.config: {exc}") from exc
