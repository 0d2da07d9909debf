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
with padded tokens is refused (pack the sequences instead).

A sliding window is refused where it would take effect. Which layers slide differs per family
(Mistral, Mixtral, Phi3 and Starcoder2 apply ``config.sliding_window`` to every layer whenever it
is set; Qwen2/Qwen3 only with ``use_sliding_window``, to the layers ``layer_types`` marks;
Gemma2/3 to alternate layers), but every one of them asks the mask builder for a windowed mask
(``local_size=`` the window), so the check sits there, at forward time, where the global
sequence length is known: a window of ``W`` tokens with a sequence of at most ``W`` tokens is
plain causal attention (Mistral-7B-v0.1's 4096-token window at sequence length 4096 runs), a
longer sequence is refused, since dropping the window mask would change what the model computes.
Layer types other than full and sliding attention (chunked, linear, ...) are refused at setup.
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


def _no_mask(
    *args: Any,
    attention_mask: torch.Tensor | None = None,
    q_length: int | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> None:
    """``AttentionMaskInterface`` entry: no mask (causality is SDPA's ``is_causal`` flag).

    ``local_size`` is the window ``transformers`` passes when it builds a sliding-window (or
    chunked) mask: that mask is dropped too, which is exact only while the whole sequence fits
    in the window (:func:`_check_window`)."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            "the attention_mask pads some tokens, which context parallelism does not support: "
            "pack the sequences without padding (documents as ContextParallelHandle.packed("
            "cu_seqlens)) or drop the padded positions"
        )
    if local_size is not None and q_length is not None:
        _check_window(int(local_size), int(q_length))
    return None


@torch.compiler.disable
def _check_window(window: int, local_length: int) -> None:
    """Refuse a sliding window shorter than the global sequence (``local_length`` tokens on each
    of the context-parallel ranks of the forward running now; one rank outside a router)."""
    from forge_parallel.context_parallel.apply import active_cp_size

    cp_size = active_cp_size() or 1
    length = local_length * cp_size
    if length > window:
        raise ValueError(
            f"the model applies a sliding attention window of {window} tokens "
            f"(config.sliding_window) to a sequence of {length} tokens ({local_length} per rank "
            f"x cp={cp_size}); context parallelism runs full causal attention, which equals the "
            f"windowed attention only while the sequence is at most {window} tokens long. Train "
            f"with sequences of at most {window} tokens under context parallelism, or without "
            "context parallelism (a model trained with full attention may also set "
            "config.sliding_window=None)"
        )


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


#: Layer types context parallelism runs: full attention, and sliding windows as long as the
#: sequence (checked at forward time by :func:`_check_window`).
_SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def _check_full_attention(config: Any, name: str = "config") -> None:
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t not in _SUPPORTED_LAYER_TYPES})
    if other:
        raise ValueError(
            f"{name} has {', '.join(other)} layers; context parallelism supports only full "
            "(causal or bidirectional) attention, whose mask it expresses as a flag, and sliding "
            "windows at least as long as the sequence. Use a model with full attention only, or "
            "no context parallelism"
        )
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        # Gemma2's tanh cap on the attention scores: the SDPA-based context-parallel kernels
        # have no such term, so running them would silently drop it.
        raise ValueError(
            f"{name}.attn_logit_softcapping={softcap}: the model caps its attention scores "
            "(tanh soft-capping), which the context-parallel attention kernels do not compute; "
            "use no context parallelism for this model"
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
