"""Which image processor and placeholder style a vision-language run uses, chosen from the
model config.

The projector decides: it fixes how many placeholder tokens an image takes, and the processor
must produce exactly that many (and pixels in the layout the encoder reads). So

* ``pixel_shuffle_mlp``: ``InternVLProcessor`` (InternVL's placeholders), tiles of
  ``vision.image_size``;
* ``qwen2_5_vl_merger``: ``Qwen2VLProcessor`` (Qwen2-VL's), patches at the image's own
  resolution, with M-RoPE positions;
* ``llava_onevision``: ``LlavaOnevisionProcessor`` (LLaVA-OneVision's), AnyRes tiles on the
  projector's ``image_grid_pinpoints``;

each set up from the encoder's and projector's sizes, so a YAML never repeats them.
``data.max_tiles`` bounds an image's size: InternVL tiles per image; for Qwen2-VL a pixel
budget of that many attention windows (``max_tiles * vision.window_size**2`` pixels); a
LLaVA-OneVision image takes the tiles of the projector's ``image_grid_pinpoints`` (processor
and projector must agree on them, so ``max_tiles`` does not apply).

The run's tokenizer gets the special tokens of the model's style only (``forge_train.data``):
a family's own tokenizer already holds them and keeps its vocabulary.
"""

from __future__ import annotations

from typing import Any

from forge_data.vision.placeholders import (
    INTERN_VL,
    LLAVA_ONEVISION,
    QWEN2_VL,
    PlaceholderStyle,
)
from forge_train.config import ConfigError, DataConfig

__all__ = [
    "PROJECTOR_STYLES",
    "build_processor",
    "hf_processor_files",
    "mrope_settings",
    "placeholder_style",
    "style_token_names",
]

#: Projector name -> the placeholder style of the processor that feeds it.
PROJECTOR_STYLES = {
    "pixel_shuffle_mlp": INTERN_VL,
    "qwen2_5_vl_merger": QWEN2_VL,
    "llava_onevision": LLAVA_ONEVISION,
}


def _projector_name(model: Any) -> str | None:
    """The projector name of a ``VLMConfig`` or of a model config's plain data."""
    if hasattr(model, "projector_name"):
        return model.projector_name
    projector = dict(model).get("projector") or {}
    return dict(projector).get("name")


def placeholder_style(model: Any) -> PlaceholderStyle:
    """The placeholder style of ``model`` (a ``VLMConfig`` or its plain-data config), chosen by
    its projector."""
    name = _projector_name(model)
    style = PROJECTOR_STYLES.get(name)
    if style is None:
        raise ConfigError(
            f"model.config.projector: data.kind=skimage_captions has no image processor for "
            f"projector {name!r}; use one of {sorted(PROJECTOR_STYLES)}"
        )
    return style


def style_token_names(style: PlaceholderStyle) -> dict[str, str | None]:
    """``VLMConfig`` token field -> the special token of ``style`` it holds: the feature
    tokens, and the token that opens an image (InternVL's ``<img>``, Qwen2-VL's
    ``<|vision_start|>``; ``None`` where the style has none)."""
    opening = style.image_open or style.image_part.split(style.image_anchor)[0]
    return {
        "image_token_id": style.image_token,
        "video_token_id": style.video_token,
        "vision_start_token_id": opening or None,
    }


def _need(model_config, part: str, *names: str) -> None:
    config = getattr(model_config, part)
    missing = [n for n in names if not hasattr(config, n)]
    if missing:
        raise ConfigError(
            f"model.config.{part}: projector {model_config.projector_name!r} is fed by a "
            f"processor that needs the {part}'s {missing}, which "
            f"{getattr(model_config, f'{part}_name', part)!r} lacks; pair "
            f"{model_config.projector_name!r} with its family's encoder"
        )


def _intern_vl(model_config, config: DataConfig):
    from forge_data.vision import InternVLProcessor, InternVLProcessorConfig

    _need(model_config, "vision", "image_size", "patch_size")
    size = model_config.vision.image_size
    side = size if isinstance(size, tuple) else (size, size)
    return InternVLProcessor(
        InternVLProcessorConfig(
            tile_size=side,
            patch_size=model_config.vision.patch_size,
            downsample_ratio=model_config.projector.downsample_ratio,
            max_patches=config.max_tiles,
            use_thumbnail=config.max_tiles > 1,
        )
    )


def _qwen2_vl(model_config, config: DataConfig):
    from forge_data.vision import Qwen2VLProcessor, Qwen2VLProcessorConfig

    _need(model_config, "vision", "patch_size", "temporal_patch_size", "window_size")
    vision = model_config.vision
    merge = model_config.projector.spatial_merge_size
    max_pixels = config.max_tiles * vision.window_size**2
    return Qwen2VLProcessor(
        Qwen2VLProcessorConfig(
            patch_size=vision.patch_size,
            temporal_patch_size=vision.temporal_patch_size,
            merge_size=merge,
            min_pixels=min(Qwen2VLProcessorConfig.min_pixels, max_pixels),
            max_pixels=max_pixels,
        )
    )


def _llava_onevision(model_config, config: DataConfig):
    from forge_data.vision import LlavaOnevisionProcessor, LlavaOnevisionProcessorConfig

    _need(model_config, "vision", "image_size", "patch_size")
    projector = model_config.projector
    side = projector.image_size
    return LlavaOnevisionProcessor(
        LlavaOnevisionProcessorConfig(
            size=(side, side),
            image_grid_pinpoints=projector.image_grid_pinpoints,
            num_image_tokens=projector.patches_per_tile,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=f"anyres_max_{projector.max_num_patches}",
        )
    )


_PROCESSORS = {
    "pixel_shuffle_mlp": _intern_vl,
    "qwen2_5_vl_merger": _qwen2_vl,
    "llava_onevision": _llava_onevision,
}


def build_processor(model_config, config: DataConfig):
    """The ``forge_data.vision`` processor whose images ``model_config`` (a ``VLMConfig``)
    reads, sized from its encoder and projector (see the module doc)."""
    placeholder_style(model_config)  # ConfigError for a projector without a processor
    return _PROCESSORS[model_config.projector_name](model_config, config)


def mrope_settings(model_config) -> dict[str, Any] | None:
    """The model-side arguments of :func:`forge_models.vlm.mrope.mrope_position_ids` for a
    model with M-RoPE (``text.mrope_section`` set), else ``None``."""
    if model_config.text.mrope_section is None:
        return None
    merge = getattr(model_config.projector, "spatial_merge_size", None)
    if merge is None:
        raise ConfigError(
            f"model.config.text.mrope_section: M-RoPE positions need the projector's "
            f"spatial_merge_size; projector {model_config.projector_name!r} has none (drop "
            "mrope_section or use qwen2_5_vl_merger)"
        )
    return {
        "image_token_id": model_config.image_token_id,
        "video_token_id": model_config.video_token_id,
        "vision_start_token_id": model_config.vision_start_token_id,
        "spatial_merge_size": merge,
        "tokens_per_second": model_config.tokens_per_second,
    }


def _pixel_settings(config) -> dict[str, Any]:
    """The ``preprocessor_config.json`` pixel keys every reference image processor shares."""
    from forge_data.vision.pixels import RESAMPLE

    return {
        "do_convert_rgb": True,
        "do_resize": config.do_resize,
        "resample": RESAMPLE[config.resample],
        "do_rescale": config.do_rescale,
        "rescale_factor": config.rescale_factor,
        "do_normalize": config.do_normalize,
        "image_mean": list(config.image_mean),
        "image_std": list(config.image_std),
    }


def _qwen2_vl_files(config) -> dict[str, dict[str, Any]]:
    preprocessor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "min_pixels": config.min_pixels,
        "max_pixels": config.max_pixels,
        "size": {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels},
        "patch_size": config.patch_size,
        "temporal_patch_size": config.temporal_patch_size,
        "merge_size": config.merge_size,
        **_pixel_settings(config),
    }
    return {"preprocessor_config.json": preprocessor}


def _llava_onevision_files(config) -> dict[str, dict[str, Any]]:
    if config.anyres_for_multi_image:
        raise ValueError(
            "anyres_for_multi_image=True has no transformers LlavaOnevisionProcessor setting "
            "(it gives AnyRes tiles to single images only)"
        )
    height, width = config.size
    preprocessor = {
        "image_processor_type": "LlavaOnevisionImageProcessor",
        "processor_class": "LlavaOnevisionProcessor",
        "size": {"height": height, "width": width},
        "image_grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
        "do_pad": True,
        **_pixel_settings(config),
    }
    processor = {
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": config.num_image_tokens,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "vision_aspect_ratio": config.vision_aspect_ratio,
    }
    return {"preprocessor_config.json": preprocessor, "processor_config.json": processor}


_HF_PROCESSOR_FILES = {
    "Qwen2VLProcessor": _qwen2_vl_files,
    "LlavaOnevisionProcessor": _llava_onevision_files,
    "InternVLProcessor": lambda config: config.to_hf(),
}


def hf_processor_files(processor) -> tuple[dict[str, str], str | None]:
    """``(files, why_not)``: the Hugging Face processor files (``preprocessor_config.json``,
    and ``processor_config.json`` where the transformers processor reads its token count
    there; InternVL's ``video_preprocessor_config.json`` too) holding the settings of
    ``processor`` (a :func:`build_processor` result), so that
    ``transformers.AutoProcessor.from_pretrained`` of an export prepares images as training did
    (pixel budget, AnyRes grid, tile size and limits). ``files`` is empty and ``why_not`` says
    why for a processor whose settings a transformers processor config cannot express exactly."""
    import json

    write = _HF_PROCESSOR_FILES.get(type(processor).__name__)
    if write is None:
        return {}, (
            f"no transformers processor config is written for {type(processor).__name__}: its "
            "settings are not checked against a transformers processor"
        )
    try:
        files = write(processor.config)
    except ValueError as exc:
        return {}, f"no transformers processor config is written: {exc}"
    return {name: json.dumps(body, indent=2) + "\n" for name, body in files.items()}, None
