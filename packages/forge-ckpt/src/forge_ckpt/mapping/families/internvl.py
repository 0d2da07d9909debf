"""InternVL (transformers ``InternVLForConditionalGeneration``) <-> forge's VLM.

InternVL (Chen et al. 2024, arXiv:2312.14238), InternVL 2.5 (arXiv:2412.05271). Parts: the
InternViT tower with the pixel-shuffle projector
(:mod:`~forge_ckpt.mapping.families.intern_vit_vision`, ``{i}`` over the vision config's
``num_hidden_layers``, layers after the root ``vision_feature_layer`` dropped) and the
language model (Qwen2 in InternVL 3; Llama and Qwen3 text configs map too, chosen by
``text_config.model_type``). Forge names: ``vision.*``, ``projector.*``, ``language_model.*``.
Checkpoint layouts:

- ``transformers``: ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight`` (the OpenGVLab ``-hf`` uploads; transformers 5.23
  ``save_pretrained``).
- ``modules``: transformers' module paths (``model.state_dict()``): ``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``.

The output head is tied by the root ``tie_word_embeddings`` alone, ``True`` when absent (as
transformers 5.23 decides for InternVL; ``text_config``'s flag plays no part).
"""

from __future__ import annotations

from forge_ckpt.mapping.composed import ComposedMapping, Part, language_model_config, sub_config
from forge_ckpt.mapping.families import intern_vit_vision
from forge_ckpt.mapping.families.llava_onevision import TEXT_HF_PREFIX, TEXT_SPECS

__all__ = ["MAPPING", "TEXT_CONFIG"]

#: The text part's config view (also what forge_models should build its language model from).
TEXT_CONFIG = language_model_config(tie_default=True, tie_from_text=False)


def _vision_at(root: str) -> tuple[tuple[str, str], ...]:
    return (
        ("multi_modal_projector.", f"{root}multi_modal_projector."),
        ("", f"{root}vision_tower."),
    )


MAPPING = ComposedMapping(
    name="internvl",
    hf_model_types=("internvl",),
    parts=(
        Part(
            name="vision",
            spec={"internvl_vision": intern_vit_vision.MAPPING},
            config=sub_config("vision_config", root_keys=("vision_feature_layer",)),
            forge_prefix=(("projector.", "projector."), ("", "vision.")),
            hf_prefix={"transformers": _vision_at(""), "modules": _vision_at("model.")},
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
        "transformers": "vision_tower.*, multi_modal_projector.*, language_model.model.*, "
        "language_model.lm_head (-hf uploads; transformers 5.23 save)",
        "modules": "model.vision_tower.*, model.multi_modal_projector.*, "
        "model.language_model.*, lm_head (module paths)",
    },
    description="InternVL 2.5 / 3 (InternVLForConditionalGeneration)",
)
