"""LLaVA-OneVision (Li et al. 2024, arXiv:2408.03326): SigLIP (Zhai et al. 2023,
arXiv:2303.15343) + AnyRes tiling with a 2-layer MLP projector + a Qwen2 decoder.
transformers: ``LlavaOnevisionForConditionalGeneration``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families.llava_onevision import TEXT_CONFIG
from forge_models.registry import ModelFamily
from forge_models.vision.llava_onevision_projector import (
    llava_onevision_projector_config_from_hf,
    llava_onevision_projector_config_to_hf,
)
from forge_models.vision.siglip import siglip_config_from_hf, siglip_config_to_hf
from forge_models.vlm.config import VLMConfig
from forge_models.vlm.families.common import text_from_hf, text_to_hf, token_id
from forge_models.vlm.model import VisionLanguageModel

__all__ = ["FAMILY", "SIZES"]


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> VLMConfig:
    return VLMConfig(
        family="llava_onevision",
        vision_name="siglip",
        vision=siglip_config_from_hf(
            hf["vision_config"], feature_layer=hf.get("vision_feature_layer", -1)
        ),
        projector_name="llava_onevision",
        projector=llava_onevision_projector_config_from_hf(hf),
        text=text_from_hf(hf, TEXT_CONFIG, **overrides),
        image_token_id=token_id(hf, "image_token_id", "image_token_index"),
        video_token_id=token_id(hf, "video_token_id", "video_token_index", required=False),
    )


def config_to_hf(config: VLMConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        **llava_onevision_projector_config_to_hf(config.projector),
        "vision_config": {
            **siglip_config_to_hf(config.vision),
            "model_type": "siglip_vision_model",
        },
        "vision_feature_layer": config.vision.feature_layer,
        "text_config": text_to_hf(config.text),
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "tie_word_embeddings": config.text.tie_word_embeddings,
    }


FAMILY = ModelFamily(
    name="llava_onevision",
    description="LLaVA-OneVision: SigLIP + AnyRes MLP projector + Qwen2 (arXiv:2408.03326)",
    model_cls=VisionLanguageModel,
    ckpt_mapping="llava_onevision",
    hf_model_types=("llava_onevision",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)

SIZES: dict[str, VLMConfig] = {}
