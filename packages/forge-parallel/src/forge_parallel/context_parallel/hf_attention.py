"""Context parallelism on ``transformers`` models: attention through SDPA, masks as flags.

``transformers`` builds the attention mask itself (``masking_utils.create_causal_mask``) from the
*local* sequence it sees. Under context parallelism that goes wrong in two ways:

- the position ids of a zigzag shard (rank 0 of 2 holds positions ``0 1 6 7`` of 8) look like
  two packed documents, so ``transformers`` builds a dense block-diagonal mask instead of
  passing ``is_causal=True`` (it does so whenever the call has no KV cache, e.g.
  ``use_cache=False`` as training code passes), and the SDPA router must refuse a mask that
  covers only the local shard;
- a model loaded with ``attn_implementation="eager"`` (or a flash kernel) never calls
  ``scaled_dot_product_attention``, so the router would not see its attention at all and each
  rank would attend within its own shard only.

:func:`use_context_parallel_attention` switches such a model to an attention implementation
registered under :data:`CP_ATTENTION` through ``transformers``' own extension points
(``AttentionInterface`` / ``AttentionMaskInterface``): attention is ``transformers``' SDPA
function (which the router answers), and the mask builder returns no mask, so SDPA gets
``is_causal`` from the module, applied on global positions by the context-parallel kernels.
Packed documents are given as ``cu_seqlens`` (``ContextParallelHandle.packed``); a padding mask
with padded tokens is refused (pack the sequences instead). Models with sliding-window or other
non-full attention layers are refused: dropping their mask would change what they compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CP_ATTENTION", "is_transformers_model", "use_context_parallel_attention"]

#: The ``attn_implementation`` name a ``transformers`` model runs under context parallelism.
CP_ATTENTION = "forge_context_parallel"


def is_transformers_model(model: nn.Module) -> bool:
    """A ``transformers`` model whose attention implementation can be switched."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and hasattr(config, "_attn_implementation")
        and callable(getattr(model, "set_attn_implementation", None))
    )


def _no_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """``AttentionMaskInterface`` entry: no mask (causality is SDPA's ``is_causal`` flag)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "the attention_mask pads some tokens, which context parallelism does not support: "
            "pack the sequences without padding (documents as ContextParallelHandle.packed("
            "cu_seqlens)) or drop the padded positions"
        )
    return None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CP_ATTENTION, sdpa_attention_forward)
    AttentionMaskInterface.register(CP_ATTENTION, _no_mask)


def _implementations(config: Any) -> dict[str, Any]:
    """The model's attention implementation per (nested) sub-config, in the format
    ``set_attn_implementation`` accepts."""
    out: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _implementations(sub)
    return out


def _check_full_attention(config: Any, name: str = "config") -> None:
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other or getattr(config, "use_sliding_window", False):
        kinds = other or ["sliding_attention"]
        raise ValueError(
            f"{name} has {', '.join(kinds)} layers; context parallelism supports only full "
            "(causal or bidirectional) attention, whose mask it expresses as a flag. Use a "
            "model with full attention only, or no context parallelism"
        )
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            _check_full_attention(sub, f"{name}.{key}")


def use_context_parallel_attention(model: nn.Module) -> Callable[[], None]:
    """Switch the ``transformers`` ``model`` (and its sub-models) to :data:`CP_ATTENTION`;
    returns the function that restores the previous implementations."""
    _check_full_attention(model.config)
    previous = _implementations(model.config)
    _register()
    model.set_attn_implementation(CP_ATTENTION)

    def restore() -> None:
        model.set_attn_implementation(previous)

    return restore
