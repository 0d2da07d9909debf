"""Vision encoders and projectors registered by name, built-ins imported on first use.

A VLM config names its parts (``vision: {name: siglip, ...}``); this registry turns a name and a
dict of settings into the part's config dataclass and module. Registering a taken name raises.

::

    from forge_models.vlm.components import register_vision_encoder

    register_vision_encoder("my_vit", MyViTConfig, MyViT)   # then `vision: {name: my_vit, ...}`
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = [
    "Component",
    "get_component",
    "list_components",
    "register_projector",
    "register_vision_encoder",
]

Kind = Literal["vision", "projector"]


@dataclass(frozen=True, kw_only=True)
class Component:
    """One registered part.

    Attributes:
        name: the registry name used in configs.
        kind: ``"vision"`` (encoder) or ``"projector"``.
        config_cls: its keyword-only config dataclass.
        module_cls: the ``nn.Module`` built as ``module_cls(config)``.
        wire: for projectors: ``(settings, vision_config, text_hidden_size) -> settings`` filling
            the widths a projector takes from its neighbours, so a YAML never repeats them.
    """

    name: str
    kind: Kind
    config_cls: type
    module_cls: type[nn.Module]
    wire: Callable[[dict[str, Any], Any, int], dict[str, Any]] | None = None

    def make_config(self, settings: Mapping[str, Any] | Any) -> Any:
        """The config dataclass from a dict (``ValueError`` naming unknown keys), or as given."""
        if isinstance(settings, self.config_cls):
            return settings
        settings = dict(settings)
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(
                f"unknown {self.kind} setting(s) {unknown} for {self.name!r} "
                f"({self.config_cls.__name__}); valid: {sorted(fields)}"
            )
        return self.config_cls(**settings)


#: name -> (kind, module, config class, module class, wire function or None), imported lazily.
BUILTIN_COMPONENTS: dict[str, tuple[Kind, str, str, str, str | None]] = {
    "qwen2_5_vit": (
        "vision", "forge_models.vision.qwen2_5_vit", "Qwen2_5VisionConfig",
        "Qwen2_5VisionEncoder", None,
    ),
    "siglip": ("vision", "forge_models.vision.siglip", "SiglipVisionConfig", "SiglipVisionEncoder", None),
    "siglip2": (
        "vision", "forge_models.vision.siglip2", "Siglip2VisionConfig", "Siglip2VisionEncoder", None,
    ),
    "intern_vit": (
        "vision", "forge_models.vision.intern_vit", "InternVisionConfig", "InternVisionEncoder", None,
    ),
    "qwen2_5_vl_merger": (
        "projector", "forge_models.vision.qwen2_5_merger", "Qwen2_5MergerConfig",
        "Qwen2_5VLPatchMerger", None,
    ),
    "llava_onevision": (
        "projector", "forge_models.vision.llava_onevision_projector",
        "LlavaOnevisionProjectorConfig", "LlavaOnevisionProjector", None,
    ),
    "pixel_shuffle_mlp": (
        "projector", "forge_models.vision.pixel_shuffle_projector", "PixelShuffleProjectorConfig",
        "PixelShuffleProjector", None,
    ),
}  # fmt: skip

_COMPONENTS: dict[str, Component] = {}


def _load_builtin(name: str) -> None:
    kind, module_name, config_name, module_cls_name, wire_name = BUILTIN_COMPONENTS[name]
    module = importlib.import_module(module_name)
    _COMPONENTS[name] = Component(
        name=name,
        kind=kind,
        config_cls=getattr(module, config_name),
        module_cls=getattr(module, module_cls_name),
        wire=None if wire_name is None else getattr(module, wire_name),
    )


def _register(component: Component) -> Component:
    if component.name in _COMPONENTS or component.name in BUILTIN_COMPONENTS:
        raise ValueError(f"{component.kind} {component.name!r} is already registered")
    _COMPONENTS[component.name] = component
    return component


def register_vision_encoder(name: str, config_cls: type, module_cls: type[nn.Module]) -> Component:
    """Add a vision encoder (see :mod:`forge_models.vlm.inputs` for its forward protocol)."""
    return _register(
        Component(name=name, kind="vision", config_cls=config_cls, module_cls=module_cls)
    )


def register_projector(
    name: str,
    config_cls: type,
    module_cls: type[nn.Module],
    *,
    wire: Callable[[dict[str, Any], Any, int], dict[str, Any]] | None = None,
) -> Component:
    """Add a projector; ``wire`` fills its input/output widths from the encoder and the LLM."""
    return _register(
        Component(
            name=name, kind="projector", config_cls=config_cls, module_cls=module_cls, wire=wire
        )
    )


def get_component(name: str, kind: Kind) -> Component:
    """The registered part ``name`` of ``kind`` (``ValueError`` listing the known ones)."""
    if name not in _COMPONENTS and name in BUILTIN_COMPONENTS:
        _load_builtin(name)
    component = _COMPONENTS.get(name)
    if component is None or component.kind != kind:
        raise ValueError(f"unknown {kind} {name!r}; registered: {', '.join(list_components(kind))}")
    return component


def list_components(kind: Kind) -> list[str]:
    """Registered names of ``kind``, sorted."""
    names = {n for n, c in _COMPONENTS.items() if c.kind == kind}
    names |= {n for n, spec in BUILTIN_COMPONENTS.items() if spec[0] == kind}
    return sorted(names)
