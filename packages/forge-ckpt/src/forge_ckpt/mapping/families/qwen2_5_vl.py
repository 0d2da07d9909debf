"""Qwen2.5-VL (transformers ``Qwen2_5_VLForConditionalGeneration``) <-> forge's VLM.

Qwen2.5-VL Technical Report (Bai et al. 2025, arXiv:2502.13923). Parts: the vision tower and
patch merger (:mod:`~forge_ckpt.mapping.families.qwen2_5_vl_vision`, ``{i}`` over the vision
config's ``depth``) and a Qwen2 language model (:mod:`~forge_ckpt.mapping.families.qwen2`,
``{i}`` over the text config's ``num_hidden_layers``). Forge names: ``vision.*``,
``projector.*``, ``language_model.*``. Checkpoint layouts:

- ``transformers``: the original Qwen uploads, which transformers 5.23 ``save_pretrained``
  also writes: ``visual.*``, ``model.layers.*``, ``model.embed_tokens``, ``model.norm``,
  ``lm_head.weight``.
- ``modules``: transformers' module paths (``model.state_dict()``): ``model.visual.*``,
  ``model.language_model.*``, ``lm_head.weight``.

The text settings sit in ``text_config`` (transformers 5) or at the root (the original uploads);
the output head is tied when the root's or ``text_config``'s ``tie_word_embeddings`` says so
(as transformers 5.23 decides).
"""

from __future__ import annotations

from forge_ckpt.mapping.composed import ComposedMapping, Part, language_model_config, sub_config
from forge_ckpt.mapping.families import qwen2, qwen2_5_vl_vision

__all__ = ["MAPPING", "TEXT_CONFIG"]

#: The text part's config view (also what forge_models should build its language model from).
TEXT_CONFIG = language_model_config(tie_default=False, tie_from_text=True)

MAPPING = ComposedMapping(
    name="qwen2_5_vl",
    hf_model_types=("qwen2_5_vl",),
    parts=(
        Part(
            name="vision",
            spec=qwen2_5_vl_vision.MAPPING,
            config=sub_config("vision_config"),
            forge_prefix=(("projector.", "projector."), ("", "vision.")),
            hf_prefix={"transformers": "visual.", "modules": "model.visual."},
        ),
        Part(
            name="text",
            spec=qwen2.MAPPING,
            config=TEXT_CONFIG,
            forge_prefix="language_model.",
            hf_prefix={
                "transformers": "",
                "modules": (("model.", "model.language_model."), ("lm_head.", "lm_head.")),
            },
        ),
    ),
    layouts={
        "transformers": "visual.*, model.layers.*, lm_head (hub uploads; transformers 5.23 save)",
        "modules": "model.visual.*, model.language_model.*, lm_head (module paths)",
    },
    description="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration)",
)
