"""Vision-language data: processors matching the reference ones, placeholder expansion, webdataset
samples, packing with attention blocks and encoder-aware balancing.

Submodules are imported lazily (``import forge_data.vision`` stays cheap). forge-data never
imports forge-models: visual tensors carry the field names of
``forge_models.vlm.inputs.VisualInputs``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VisionProcessor": "processing",
    "VisualItem": "processing",
    "concat_items": "processing",
    "concat_visuals": "processing",
    "Qwen2VLProcessor": "qwen2_vl",
    "Qwen2VLProcessorConfig": "qwen2_vl",
    "smart_resize": "qwen2_vl",
    "LlavaOnevisionProcessor": "llava_onevision",
    "LlavaOnevisionProcessorConfig": "llava_onevision",
    "InternVLProcessor": "intern_vl",
    "InternVLProcessorConfig": "intern_vl",
    "PlaceholderStyle": "placeholders",
    "QWEN2_VL": "placeholders",
    "LLAVA_ONEVISION": "placeholders",
    "INTERN_VL": "placeholders",
    "VLMSample": "placeholders",
    "encode_vlm_chat": "placeholders",
    "encode_vlm_text": "placeholders",
    "with_vision_tokens": "placeholders",
    "VLMDataset": "vlm_dataset",
    "collate_vlm": "packing",
    "pack_vlm_samples": "packing",
    "vlm_attention_mask": "packing",
    "VisionCost": "cost",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"forge_data.vision.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'forge_data.vision' has no attribute {name!r}")
