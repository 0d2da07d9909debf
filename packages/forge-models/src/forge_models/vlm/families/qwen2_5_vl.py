"""Qwen2.5-VL (Bai et al. 2025, arXiv:2502.13923): the Qwen2.5 ViT with window attention and a
2x2 patch merger feeding a Qwen2.5 decoder with M-RoPE positions (Qwen2-VL, arXiv:2409.12191).
transformers: ``Qwen2_5_VLForConditionalGeneration``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from forge_ckpt.mapping.families.qwen2_5_vl import TEXT_CONFIG
from forge_models.registry import ModelFamily
from forge_models.vision.qwen2_5_merger import (
    qwen2_5_merger_config_from_hf,
    qwen2_5_merger_config_to_hf,
)
from forge_models.vision.qwen2_5_vit import (
    qwen2_5_vision_config_from_hf,
    qwen2_5_vision_config_to_hf,
)
from forge_models.vlm.config import VLMConfig
from forge_models.vlm.families.common import text_from_hf, text_to_hf, token_id
from forge_models.vlm.model import VisionLanguageModel

__all__ = ["FAMILY", "SIZES"]

#: transformers' fallback when a config names no section (head_dim 128).
DEFAULT_MROPE_SECTION = (16, 24, 24)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> VLMConfig:
    vision_hf = hf["vision_config"]
    return VLMConfig(
        family="qwen2_5_vl",
        vision_name="qwen2_5_vit",
        vision=qwen2_5_vision_config_from_hf(vision_hf),
        projector_name="qwen2_5_vl_merger",
        projector=qwen2_5_merger_config_from_hf(vision_hf),
        text=text_from_hf(hf, TEXT_CONFIG, mrope_default=DEFAULT_MROPE_SECTION, **overrides),
        image_token_id=token_id(hf, "image_token_id"),
        video_token_id=token_id(hf, "video_token_id"),
        vision_start_token_id=token_id(hf, "vision_start_token_id"),
        tokens_per_second=float(vision_hf.get("tokens_per_second", 2)),
    )


def config_to_hf(config: VLMConfig) -> dict[str, Any]:
    vision = {
        **qwen2_5_vision_config_to_hf(config.vision),
        **qwen2_5_merger_config_to_hf(config.projector),
        # transformers declares an int (every release uses 2); a fractional step stays a float
        "tokens_per_second": (
            int(config.tokens_per_second)
            if float(config.tokens_per_second).is_integer()
            else config.tokens_per_second
        ),
        "model_type": "qwen2_5_vl",
    }
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "vision_config": vision,
        "text_config": text_to_hf(config.text, model_type="qwen2_5_vl_text"),
        "image_token_id": config.image_token_id,
        "video_token_id": config.video_token_id,
        "vision_start_token_id": config.vision_start_token_id,
        "tie_word_embeddings": config.text.tie_word_embeddings,
    }


FAMILY = ModelFamily(
    name="qwen2_5_vl",
    description="Qwen2.5-VL: window-attention ViT + patch merger + Qwen2.5 with M-RoPE "
    "(arXiv:2502.13923)",
    model_cls=VisionLanguageModel,
    ckpt_mapping="qwen2_5_vl",
    hf_model_types=("qwen2_5_vl",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)

SIZES: dict[str, VLMConfig] = {}
