"""SigLIP 2 NaFlex vision tower (transformers ``Siglip2VisionModel``) <-> forge's
``Siglip2VisionEncoder`` (Tschannen et al. 2025, arXiv:2502.14786).

The tower rules of :mod:`forge_ckpt.mapping.families.siglip_vision` (same checkpoint names;
the patch embedding is a Linear ``[hidden, patch * patch * channels]`` instead of a Conv2d, which
the names do not show), without a projector. Checkpoint names are relative to the vision
tower, in the Hub layout (``vision_model.``-prefixed, the default) or transformers 5.x's
(detected). Context: ``num_layers`` from the vision config's ``num_hidden_layers``; caller
option ``feature_layer`` (default ``-1``; ``None`` for the standalone output with
``post_layernorm``, which is otherwise carried unapplied), from which the blocks run are
derived; the checkpoint's later blocks map to ``unapplied_blocks.{k}`` (carried, never run;
``carry_unapplied_layers=False`` drops them instead).
The attention-pooling head is not built; its tensors are dropped on import.
"""

from __future__ import annotations

from forge_ckpt.mapping.families.siglip_vision import (
    CONTEXT_KEYS,
    IGNORED_HF,
    LAYOUT_PROBES,
    derive_tower_context,
    tower_rules,
)
from forge_ckpt.mapping.spec import MappingSpec

__all__ = ["MAPPING"]

MAPPING = MappingSpec(
    name="siglip2_vision",
    hf_model_types=("siglip2_vision_model",),
    rules=tower_rules(),
    context_keys=CONTEXT_KEYS,
    ignored_hf=IGNORED_HF,
    derive=derive_tower_context,
    layout_probes=LAYOUT_PROBES,
    description="SigLIP 2 NaFlex vision tower (Siglip2VisionModel)",
)
