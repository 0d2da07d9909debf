"""``VLMConfig``: a vision-language model as three named parts plus the tokens that join them.

Any registered vision encoder, any projector and any forge language-model family combine; the
YAML of a combination none of the reference models has looks like::

    vision: {name: siglip, hidden_size: 64, intermediate_size: 128, num_layers: 2,
             num_heads: 2, patch_size: 14, image_size: 56}
    projector: {name: pixel_shuffle_mlp, downsample_ratio: 0.5}  # widths, patch wired in
    text: {size: qwen3-debug, num_layers: 2}     # a registered size plus overrides
    image_token_id: 500                          # the tokenizer's id of the image token

(``tests/vlm/test_vlm_compose.py`` builds this example.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from forge_models.config import TransformerConfig
from forge_models.vlm.components import get_component

__all__ = ["VLMConfig", "text_config_from_settings", "vlm_config_from_dict"]

_COMPONENTS = ("vision", "projector", "language_model")


@dataclass(frozen=True, kw_only=True)
class VLMConfig:
    """A vision-language model (LLaVA, Liu et al. 2023, arXiv:2304.08485: encoder -> projector
    -> LLM, with the projected visual tokens in place of placeholder tokens).

    Attributes:
        vision_name, vision: registered encoder name and its config dataclass.
        projector_name, projector: registered projector name and its config dataclass.
        text: the language model's :class:`~forge_models.config.TransformerConfig` (any family;
            ``mrope_section`` set for Qwen2-VL style 3-D positions).
        image_token_id, video_token_id: the placeholder tokens the image / video features
            replace, one feature row per placeholder (``video_token_id`` ``None``: no videos).
        vision_start_token_id: the token before each image/video (M-RoPE positions need it).
        tokens_per_second: temporal position step of a video's frames under M-RoPE
            (Qwen2.5-VL's absolute time alignment).
        image_attention: ``"causal"`` (as the references) or ``"bidirectional"``: the tokens of
            one image / video see each other (a block mask), text stays causal.
        frozen: components left out of training (``"vision"``, ``"projector"``,
            ``"language_model"``); see :meth:`VisionLanguageModel.set_trainable`.
        family: a name for logs and checkpoints (the reference family, or ``"custom"``).
    """

    vision_name: str
    vision: Any
    projector_name: str
    projector: Any
    text: TransformerConfig
    image_token_id: int
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    tokens_per_second: float = 2.0
    image_attention: Literal["causal", "bidirectional"] = "causal"
    frozen: tuple[str, ...] = field(default_factory=tuple)
    family: str = "custom"

    def __post_init__(self) -> None:
        if not isinstance(self.text, TransformerConfig):
            raise ValueError(f"VLMConfig.text must be a TransformerConfig, got {type(self.text)}")
        vocab = self.text.vocab_size
        for name in ("image_token_id", "video_token_id", "vision_start_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < vocab:
                raise ValueError(
                    f"VLMConfig.{name} = {value} is outside the language model's vocabulary "
                    f"[0, {vocab}); use the tokenizer's id of that special token"
                )
        if self.image_attention not in ("causal", "bidirectional"):
            raise ValueError(
                f"image_attention must be 'causal' or 'bidirectional', got {self.image_attention!r}"
            )
        frozen = tuple(self.frozen)
        unknown = sorted(set(frozen) - set(_COMPONENTS))
        if unknown:
            raise ValueError(f"frozen: unknown component(s) {unknown}; choose from {_COMPONENTS}")
        object.__setattr__(self, "frozen", frozen)
        if self.text.mrope_section is not None and self.vision_start_token_id is None:
            raise ValueError(
                "M-RoPE positions (text.mrope_section) need vision_start_token_id, the token "
                "that opens every image / video"
            )
        get_component(self.vision_name, "vision")
        get_component(self.projector_name, "projector")

    @property
    def vocab_pad_multiple(self) -> int:
        """The language model's (what checkpoint loading pads the vocabulary to)."""
        return self.text.vocab_pad_multiple

    def replace(self, **changes: Any) -> VLMConfig:
        """A copy with ``changes``; ``text.<field>`` / ``vision.<field>`` / ``projector.<field>``
        keys change one field of a part (``replace(**{"text.num_layers": 2})``)."""
        parts: dict[str, dict[str, Any]] = {}
        for key in [k for k in changes if "." in k]:
            part, name = key.split(".", 1)
            if part not in ("text", "vision", "projector"):
                raise ValueError(f"unknown VLMConfig part {part!r} in {key!r}")
            parts.setdefault(part, {})[name] = changes.pop(key)
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ValueError(
                f"unknown VLMConfig field(s) {unknown}; valid fields: {sorted(fields)}"
            )
        for part, values in parts.items():
            current = changes.get(part, getattr(self, part))
            changes[part] = (
                current.replace(**values)
                if isinstance(current, TransformerConfig)
                else dataclasses.replace(current, **values)
            )
        return dataclasses.replace(self, **changes)


def text_config_from_settings(settings: Mapping[str, Any] | TransformerConfig) -> TransformerConfig:
    """A language-model config from ``{size: <registered size>, **overrides}`` or full fields."""
    from forge_models.registry import get_config

    if isinstance(settings, TransformerConfig):
        return settings
    settings = dict(settings)
    size = settings.pop("size", None)
    if size is not None:
        return get_config(size, **settings)
    try:
        return TransformerConfig(**settings)
    except TypeError as err:
        raise ValueError(
            f"text: {err}; give `size: <registered size>` plus overrides, or every "
            "TransformerConfig field"
        ) from None


#: Projector config field -> where its value comes from when a YAML leaves it out.
_WIRED_FROM_VISION = ("patch_size", "image_size", "spatial_merge_size")


def _wire_projector(
    config_cls: type, settings: dict[str, Any], vision: Any, text: TransformerConfig
) -> dict[str, Any]:
    """Fill the widths and geometry a projector shares with its neighbours (if it has them).

    A value the YAML gives must equal its neighbour's: a projector merging other units than the
    encoder orders its patches in (``spatial_merge_size``), or tiling at another size, builds a
    model that runs and computes something else."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    filled = dict(settings)
    wired = {"vision_hidden_size": ("vision.hidden_size", vision.hidden_size)}
    for name in ("text_hidden_size", "out_hidden_size"):
        wired[name] = ("text.hidden_size", text.hidden_size)
    for name in _WIRED_FROM_VISION:
        if hasattr(vision, name):
            value = getattr(vision, name)
            wired[name] = (f"vision.{name}", value[0] if isinstance(value, tuple) else value)
    for name, (source, value) in wired.items():
        if name not in fields:
            continue
        if name not in filled:
            filled[name] = value
        elif filled[name] != value:
            raise ValueError(
                f"projector.{name}={filled[name]!r} but {source}={value!r}: the projector takes "
                f"it from its neighbour; drop projector.{name} (it is filled in) or give both "
                "the same value"
            )
    return filled


def _make_config(part: Any, settings: dict[str, Any]) -> Any:
    """``part.make_config(settings)`` (unknown keys: its ``ValueError``), with a missing required
    field a ``ValueError`` naming the component and the fields (a dataclass says only
    ``TypeError: missing ... argument``)."""
    try:
        return part.make_config(settings)
    except TypeError:
        missing = [
            f.name
            for f in dataclasses.fields(part.config_cls)
            if f.init
            and f.name not in settings
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if not missing:
            raise
        raise ValueError(
            f"{part.kind} {part.name!r} ({part.config_cls.__name__}) needs {missing}; give "
            f"them under `{part.kind}:` in the VLM config"
        ) from None


def vlm_config_from_dict(settings: Mapping[str, Any]) -> VLMConfig:
    """Build a :class:`VLMConfig` from plain data (a Hydra/YAML node).

    ``vision`` and ``projector`` are ``{name: <registered>, **their config}``; ``text`` is
    ``{size: <registered size>, **overrides}`` or a full TransformerConfig. The projector's
    input / output widths are filled from the encoder and the language model.
    """
    settings = dict(settings)
    for key in ("vision", "projector", "text", "image_token_id"):
        if key not in settings:
            raise ValueError(f"a VLM config needs `{key}`; got keys {sorted(settings)}")
    vision_settings = dict(settings.pop("vision"))
    projector_settings = dict(settings.pop("projector"))
    vision_name = vision_settings.pop("name", None)
    projector_name = projector_settings.pop("name", None)
    if vision_name is None or projector_name is None:
        raise ValueError("`vision` and `projector` each need a `name` (a registered component)")
    text = text_config_from_settings(settings.pop("text"))
    vision_part = get_component(vision_name, "vision")
    vision = _make_config(vision_part, vision_settings)
    projector_part = get_component(projector_name, "projector")
    if projector_part.wire is not None:
        projector_settings = projector_part.wire(projector_settings, vision, text.hidden_size)
    projector_settings = _wire_projector(
        projector_part.config_cls, projector_settings, vision, text
    )
    projector = _make_config(projector_part, projector_settings)
    if "frozen" in settings:
        settings["frozen"] = tuple(settings["frozen"])
    return VLMConfig(
        vision_name=vision_name,
        vision=vision,
        projector_name=projector_name,
        projector=projector,
        text=text,
        **settings,
    )
