"""Dropout whose mask is a hash of (token key, feature index): the same mask under any split
of the tokens or features over processes, regenerated in backward instead of saved.

``keyed_dropout(x, token_keys, p=, salt=, feature_offset=)`` drops element ``(t, f)`` of
``x`` (``[..., features]``, tokens flattened in order) when the hash of ``token_keys[t]``,
``salt`` and feature index ``feature_offset + f`` falls below ``p * 2**32``, and scales the
kept ones by ``1 / (1 - p)`` (inverted dropout, Srivastava et al. 2014, JMLR 15). The hash is
murmur3's 32-bit finalizer (Appleby 2008) used as a counter-based generator (Salmon et al.
2011, "Parallel random numbers: as easy as 1, 2, 3", the idea behind Philox)::

    per_token   = mix32(uint32(key) ^ salt)
    per_feature = mix32(uint32(index) * 0x61C88647 + 0x7F4A7C15)
    keep        = mix32(per_token ^ per_feature) >= int(p * 2**32)

in uint32 wraparound arithmetic (``uint32(key)``: the key's low 32 bits, so a padding key of
``-1`` is ``0xFFFFFFFF``). A caller that keys tokens by their place in the data (forge-train's
LoRA dropout) gets one process's mask on any data-, tensor- or sequence-parallel layout: a
feature shard passes its first feature's index as ``feature_offset``.

The Triton kernel (:mod:`forge_kernels.dropout.keyed_dropout_kernels`) hashes the mask in
registers in the forward and again in the backward: autograd saves only the token keys, not a
``[tokens, features]`` mask. :func:`keyed_dropout_reference` is the eager definition (int64
lanes masked to 32 bits) and :func:`keyed_dropout_mask` its mask.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton, plain_tensor

__all__ = ["keyed_dropout", "keyed_dropout_mask", "keyed_dropout_reference", "mix32"]

_MASK32 = 0xFFFFFFFF

#: Dtypes the kernel takes (it computes in fp32); others, such as fp64, use the reference.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer (Appleby 2008) on int64 lanes: the low 32 bits of ``h`` in,
    a value in ``[0, 2**32)`` out."""
    h = h & _MASK32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def _check_args(
    x: torch.Tensor, token_keys: torch.Tensor, p: float, salt: int, feature_offset: int
) -> None:
    if not 0 <= p < 1:
        raise ValueError(
            f"keyed_dropout needs a drop probability 0 <= p < 1, got p={p} (p=1 would drop "
            "everything and scale by 1/0)"
        )
    if not 0 <= salt <= _MASK32:
        raise ValueError(
            f"keyed_dropout salt must be a uint32 value in [0, 2**32), got {salt}; hash or "
            "mask a larger seed down to 32 bits"
        )
    if feature_offset < 0:
        raise ValueError(
            f"keyed_dropout feature_offset is the index of x's first feature and must be >= 0, "
            f"got {feature_offset}"
        )
    if x.dim() == 0:
        raise ValueError("keyed_dropout needs x of shape [..., features], got a 0-d tensor")
    if (
        token_keys.dtype.is_floating_point
        or token_keys.dtype.is_complex
        or (token_keys.dtype == torch.bool)
    ):
        raise ValueError(
            f"keyed_dropout token_keys must be an integer tensor (int64 keys), got "
            f"{token_keys.dtype}"
        )
    tokens = x.shape[:-1].numel()
    if token_keys.numel() != tokens:
        raise ValueError(
            f"keyed_dropout needs one key per token: x {tuple(x.shape)} has {tokens} tokens "
            f"(all dims but the last) but token_keys has {token_keys.numel()} elements"
        )
    if token_keys.device != x.device:
        raise ValueError(
            f"keyed_dropout token_keys are on {token_keys.device} but x is on {x.device}; "
            "move the keys to x's device"
        )


def keyed_dropout_mask(
    token_keys: torch.Tensor, *, features: int, p: float, salt: int, feature_offset: int = 0
) -> torch.Tensor:
    """The ``[tokens, features]`` bool keep-mask of :func:`keyed_dropout` for features
    ``feature_offset .. feature_offset + features`` (eager, int64 lanes)."""
    device = token_keys.device
    per_token = mix32(token_keys.reshape(-1).to(torch.int64) ^ salt)
    index = torch.arange(feature_offset, feature_offset + features, device=device)
    per_feature = mix32(index * 0x61C88647 + 0x7F4A7C15)
    h = mix32(per_token[:, None] ^ per_feature[None, :])
    return h >= int(p * 2**32)


def keyed_dropout_reference(
    x: torch.Tensor, token_keys: torch.Tensor, *, p: float, salt: int, feature_offset: int = 0
) -> torch.Tensor:
    """Eager keyed dropout: ``x * keep / (1 - p)`` in ``x``'s dtype with
    :func:`keyed_dropout_mask` (autograd saves the mask)."""
    _check_args(x, token_keys, p, salt, feature_offset)
    keep = keyed_dropout_mask(
        token_keys, features=x.shape[-1], p=p, salt=salt, feature_offset=feature_offset
    )
    return x * keep.reshape(x.shape).to(x.dtype) / (1 - p)


class _KeyedDropoutFunction(torch.autograd.Function):
    """y = keep * x / (1 - p); dx = keep * dy / (1 - p), the mask hashed again from the keys."""

    @staticmethod
    def forward(ctx, x, keys, salt, feature_offset, threshold, keep_prob):
        from forge_kernels.dropout.keyed_dropout_kernels import keyed_dropout_rows

        n_cols = x.shape[-1]
        rows = x.reshape(-1, n_cols)
        if rows.stride(-1) != 1 and n_cols != 1:
            rows = rows.contiguous()
        ctx.save_for_backward(keys)
        ctx.hash = {"salt": salt, "feature_offset": feature_offset, "threshold": threshold}
        ctx.keep_prob, ctx.shape = keep_prob, x.shape
        out = keyed_dropout_rows(
            rows, keys, **ctx.hash, keep_prob=keep_prob, kernel_name="keyed_dropout_fwd"
        )
        return out.view(x.shape)

    @staticmethod
    @once_differentiable  # the kernel's dx has no graph: a double backward raises, not drops
    def backward(ctx, dy):
        from forge_kernels.dropout.keyed_dropout_kernels import keyed_dropout_rows

        (keys,) = ctx.saved_tensors
        n_cols = ctx.shape[-1]
        rows = dy.reshape(-1, n_cols)
        if rows.stride(-1) != 1 and n_cols != 1:
            rows = rows.contiguous()
        dx = keyed_dropout_rows(
            rows, keys, **ctx.hash, keep_prob=ctx.keep_prob, kernel_name="keyed_dropout_bwd"
        )
        return dx.view(ctx.shape), None, None, None, None, None


def _keyed_dropout_default(
    x: torch.Tensor, token_keys: torch.Tensor, *, p: float, salt: int, feature_offset: int = 0
) -> torch.Tensor:
    """The Triton kernel where it can run, else :func:`keyed_dropout_reference`."""
    _check_args(x, token_keys, p, salt, feature_offset)
    x = plain_tensor(x)
    if x.numel() == 0 or x.dtype not in _KERNEL_DTYPES or not can_use_triton(x, token_keys):
        return keyed_dropout_reference(x, token_keys, p=p, salt=salt, feature_offset=feature_offset)
    keys = token_keys.reshape(-1).to(torch.int64).contiguous()
    # 1 - p rounded to fp32 once: the kernel divides by it as the reference divides an fp32 x.
    keep_prob = torch.tensor(1 - p, dtype=torch.float32).item()
    return _KeyedDropoutFunction.apply(x, keys, salt, feature_offset, int(p * 2**32), keep_prob)


registry.define_op(
    "keyed_dropout",
    default=_keyed_dropout_default,
    reference=keyed_dropout_reference,
    doc="Dropout with a mask hashed from (token key, feature index), regenerated in backward.",
)


def keyed_dropout(
    x: torch.Tensor, token_keys: torch.Tensor, *, p: float, salt: int, feature_offset: int = 0
) -> torch.Tensor:
    """Inverted dropout of ``x`` with the mask hashed from per-token keys and feature indices.

    Args:
        x: ``[..., features]``; bf16, fp16 or fp32 (computed in fp32) take the Triton kernel.
        token_keys: integer, one key per token of ``x`` (all dims but the last, in order); only
            a key's low 32 bits count (``-1``, a padding slot, hashes as ``0xFFFFFFFF``).
        p: drop probability, ``0 <= p < 1``.
        salt: a uint32 mixed into every token's hash (e.g. from a seed and a layer index), so
            layers and runs draw different masks.
        feature_offset: the index of ``x``'s first feature in the whole feature dim (a shard's
            offset under tensor parallelism), so a shard draws its slice of the whole mask.

    Returns:
        ``x * keep / (1 - p)`` in ``x``'s dtype; autograd keeps only ``token_keys``.

    Dispatches through ``registry.get_op("keyed_dropout")``, so a plugin override takes effect.
    """
    return registry.get_op("keyed_dropout")(
        x, token_keys, p=p, salt=salt, feature_offset=feature_offset
    )
