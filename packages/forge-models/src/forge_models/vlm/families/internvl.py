"""InternVL (Chen et al. 2024, arXiv:2312.14238; InternVL 2.5, arXiv:2412.05271): InternViT on
448-pixel tiles, a pixel-shuffle MLP projector and a Qwen2/Llama decoder.
transformers: ``InternVLForConditionalGeneration``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families.internvl import TEXT_CONFIG
from forge_models.registry import ModelFamily
from forge_models.vision.intern_vit import intern_vit_config_from_hf, intern_vit_config_to_hf
from forge_models.vision.pixel_shuffle_projector import (
    pixel_shuffle_projector_config_from_hf,
    pixel_shuffle_projector_config_to_hf,
)
from forge_models.vlm.config import VLMConfig
from forge_models.vlm.families.common import text_from_hf, text_to_hf, token_id
from forge_models.vlm.model import VisionLanguageModel

__all__ = ["FAMILY", "SIZES"]


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> VLMConfig:
    return VLMConfig(
        family="internvl",
        vision_name="intern_vit",
        vision=intern_vit_config_from_hf(
            hf["vision_config"],
            vision_feature_layer=hf.get("vision_feature_layer", -1),
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        ),
        projector_name="pixel_shuffle_mlp",
        projector=pixel_shuffle_projector_config_from_hf(hf),
        text=text_from_hf(hf, TEXT_CONFIG, **overrides),
        image_token_id=token_id(hf, "image_token_id"),
    )


def config_to_hf(config: VLMConfig) -> dict[str, Any]:
    return {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        **pixel_shuffle_projector_config_to_hf(config.projector),
        "vision_config": intern_vit_config_to_hf(config.vision),
        "vision_feature_layer": config.vision.feature_layer,
        "vision_feature_select_strategy": "default" if config.vision.drop_cls_token else "full",
        "text_config": text_to_hf(config.text),
        "image_token_id": config.image_token_id,
        "tie_word_embeddings": config.text.tie_word_embeddings,
    }


FAMILY = ModelFamily(
    name="internvl",
    description="InternVL: InternViT + pixel-shuffle MLP + Qwen2/Llama (arXiv:2312.14238)",
    model_cls=VisionLanguageModel,
    ckpt_mapping="internvl",
    hf_model_types=("internvl",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)

SIZES: dict[str, VLMConfig] = {}
