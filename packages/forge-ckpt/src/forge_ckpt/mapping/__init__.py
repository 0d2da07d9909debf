"""Checkpoint mappings as data: per-family name patterns and invertible layout transforms.

::

    from forge_ckpt.mapping import get_mapping

    spec = get_mapping("llama")
    ctx = spec.context(hf_config, vocab_pad_multiple=128)
    print(spec.describe(ctx))                       # the mapping, one line per tensor
    spec.check_hf(shapes, ctx)                      # missing / unexpected / mis-shaped
    forge_tensors = spec.hf_to_forge(ckpt.iter_tensors(), ctx)   # streaming
    hf_tensors = spec.forge_to_hf(forge_tensors, ctx)            # the exact inverse
"""

from forge_ckpt.mapping.registry import (
    get_mapping,
    list_mappings,
    mapping_for_hf_config,
    register_mapping,
)
from forge_ckpt.mapping.spec import (
    PAD_VOCAB,
    REQUIRED,
    BoundRule,
    Concat,
    GroupedQKV,
    HFCopy,
    MappingSpec,
    PadDim,
    Rule,
    StackExperts,
    TensorTransform,
    Transpose,
)

__all__ = [
    "PAD_VOCAB",
    "REQUIRED",
    "BoundRule",
    "Concat",
    "GroupedQKV",
    "HFCopy",
    "MappingSpec",
    "PadDim",
    "Rule",
    "StackExperts",
    "TensorTransform",
    "Transpose",
    "get_mapping",
    "list_mappings",
    "mapping_for_hf_config",
    "register_mapping",
]
