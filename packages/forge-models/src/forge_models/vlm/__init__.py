"""Vision-language models composed from a vision encoder, a projector and a forge language model.

::

    from forge_models.vlm import VisualInputs, build_vlm

    model = build_vlm({
        "vision": {"name": "siglip", ...}, "projector": {"name": "mlp"},
        "text": {"size": "qwen3-debug"}, "image_token_id": 151655,
    })
    loss = model(input_ids, labels=input_ids, images=VisualInputs(pixel_values=..., ...))
"""

from forge_models.vlm.build import build_vlm
from forge_models.vlm.components import (
    Component,
    get_component,
    list_components,
    register_projector,
    register_vision_encoder,
)
from forge_models.vlm.config import VLMConfig, vlm_config_from_dict
from forge_models.vlm.inputs import VisualInputs
from forge_models.vlm.model import VisionLanguageModel, visual_block_ids

__all__ = [
    "Component",
    "VLMConfig",
    "VisionLanguageModel",
    "VisualInputs",
    "build_vlm",
    "get_component",
    "list_components",
    "register_projector",
    "register_vision_encoder",
    "visual_block_ids",
    "vlm_config_from_dict",
]
