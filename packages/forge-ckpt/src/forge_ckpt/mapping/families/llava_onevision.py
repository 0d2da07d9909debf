"""LLaVA-OneVision (transformers ``LlavaOnevisionForConditionalGeneration``) <-> forge's VLM.

LLaVA-OneVision (Li et al. 2024, arXiv:2408.03326). Parts: the SigLIP tower with the
two-layer projector and ``image_newline``
(:mod:`~forge_ckpt.mapping.families.siglip_vision`, ``{i}`` over the vision config's
``num_hidden_layers``, blocks after ``vision_feature_layer`` dropped) and the language model
(Qwen2 in the published models; Llama and Qwen3 text configs map too, chosen by
``text_config.model_type``). Forge names: ``vision.*``, ``projector.*``, ``language_model.*``.
Checkpoint layouts:

- ``transformers``: ``vision_tower.*``, ``multi_modal_projector.*``, ``image_newline``,
  ``language_model.model.*``, ``language_model.lm_head.weight``: the llava-hf uploads (tower
  under ``vision_tower.vision_model.``) and what transformers 5.23 ``save_pretrained`` writes
  (tower under ``vision_tower.``); the SigLIP part's flag ``vision_model_prefix`` tells them
  apart (detected from the names; a context without detection writes the 5.23 form).
- ``modules``: transformers' module paths (``model.state_dict()``): ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.image_newline``, ``model.language_model.*``,
  ``lm_head.weight``.

The root ``vision_feature_layer`` and ``multimodal_projector_bias`` reach the SigLIP part as its
``feature_layer`` and ``projector_bias`` options. The output head is tied when the root's or
``text_config``'s ``tie_word_embeddings`` says so (as transformers 5.23 decides).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.composed import ComposedMapping, Part, language_model_config, sub_config
from forge_ckpt.mapping.families import llama, qwen2, qwen3, siglip_vision

__all__ = ["MAPPING", "TEXT_CONFIG", "TEXT_HF_PREFIX", "TEXT_SPECS"]

#: The dense language models a LLaVA-style checkpoint may hold, by ``text_config.model_type``.
TEXT_SPECS = {"qwen2": qwen2.MAPPING, "llama": llama.MAPPING, "qwen3": qwen3.MAPPING}

#: Where a LLaVA-style checkpoint keeps the language model, by layout.
TEXT_HF_PREFIX = {
    "transformers": "language_model.",
    "modules": (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
}

#: The text part's config view (also what forge_models should build its language model from).
TEXT_CONFIG = language_model_config(tie_default=False, tie_from_text=True)


def _vision_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """Root settings of the SigLIP part, and the transformers 5.23 tower layout by default."""
    return {
        "feature_layer": config.get("vision_feature_layer", -1),
        "projector_bias": config.get("multimodal_projector_bias", True),
        "vision_model_prefix": False,
    }


def _projector_at(root: str) -> tuple[tuple[str, str], ...]:
    return (
        ("multi_modal_projector.", f"{root}multi_modal_projector."),
        ("image_newline", f"{root}image_newline"),
        ("", f"{root}vision_tower."),
    )


MAPPING = ComposedMapping(
    name="llava_onevision",
    hf_model_types=("llava_onevision",),
    parts=(
        Part(
            name="vision",
            spec={"siglip_vision_model": siglip_vision.MAPPING},
            config=sub_config("vision_config"),
            options=_vision_options,
            forge_prefix=(("projector.", "projector."), ("", "vision.")),
            hf_prefix={"transformers": _projector_at(""), "modules": _projector_at("model.")},
        ),
        Part(
            name="text",
            spec=TEXT_SPECS,
            config=TEXT_CONFIG,
            forge_prefix="language_model.",
            hf_prefix=TEXT_HF_PREFIX,
        ),
    ),
    layouts={
        "transformers": "vision_tower.*, multi_modal_projector.*, image_newline, "
        "language_model.model.*, language_model.lm_head (hub uploads; transformers 5.23 save)",
        "modules": "model.vision_tower.*, model.multi_modal_projector.*, model.image_newline, "
        "model.language_model.*, lm_head (module paths)",
    },
    description="LLaVA-OneVision (LlavaOnevisionForConditionalGeneration)",
)
