"""Rotary position embedding (RoPE) frequencies and per-token cos/sin, in pure PyTorch.

Every RoPE variant forge supports reduces to the same two steps: build per-token ``cos`` and
``sin`` of shape ``[*token_dims, rotary_dim // 2]`` (one angle per rotated channel pair) with a
builder from this module, then rotate q and k with :func:`forge_kernels.rope.apply_rope`. The
builders:

- :func:`rope_inv_freq` / :func:`rope_cos_sin`: 1D RoPE (RoFormer, Su et al. 2021,
  arXiv:2104.09864), ``theta_i = theta ** (-2i / rotary_dim)``, with optional Llama 3 frequency
  scaling (:class:`Llama3RopeScaling`, "The Llama 3 Herd of Models", Dubey et al. 2024,
  arXiv:2407.21783). Partial rotary (GPT-NeoX, Phi) is ``rotary_dim < head_dim``.
- :func:`packed_position_ids`: positions for packed (varlen) batches that restart at 0 for each
  document, from ``cu_seqlens``.
- :func:`mrope_cos_sin`: multimodal 3D RoPE (M-RoPE) of Qwen2-VL / Qwen2.5-VL ("Qwen2-VL:
  Enhancing Vision-Language Model's Perception of the World at Any Resolution", Wang et al. 2024,
  arXiv:2409.12191): position ids ``[3, ...]`` (temporal, height, width), ``mrope_section`` picks
  which component drives which frequency band.
- :func:`factorized_3d_cos_sin` / :func:`wan_rope_cos_sin`: the factorized 3D RoPE of video DiTs
  ("Wan: Open and Advanced Large-Scale Video Generative Models", Wan Team 2025,
  arXiv:2503.20314): the head dim is split into frame / height / width parts, each with its own
  1D frequencies over its own axis. Wan applies it with ``layout="interleaved"``.

The arithmetic (dtypes and operation order) follows transformers' ``modeling_rope_utils`` /
``Qwen2VLRotaryEmbedding`` and diffusers' ``WanRotaryPosEmbed``, so the cos/sin here are
bitwise identical to theirs; tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Llama3RopeScaling",
    "factorized_3d_cos_sin",
    "grid_position_ids",
    "llama3_scale_inv_freq",
    "mrope_cos_sin",
    "packed_position_ids",
    "rope_cos_sin",
    "rope_inv_freq",
    "wan_rope_axis_dims",
    "wan_rope_cos_sin",
]


@dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling (transformers ``rope_type="llama3"``).

    Wavelengths shorter than ``original_max_position_embeddings / high_freq_factor`` are kept,
    those longer than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``, and the band in between is interpolated smoothly. Defaults are Llama 3.1's.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"Llama3RopeScaling.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(
                "Llama3RopeScaling needs 0 < low_freq_factor < high_freq_factor, got "
                f"low_freq_factor={self.low_freq_factor}, high_freq_factor={self.high_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError(
                "Llama3RopeScaling.original_max_position_embeddings must be > 0, got "
                f"{self.original_max_position_embeddings}"
            )


def _check_rotary_dim(rotary_dim: int, what: str = "rotary_dim") -> None:
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"{what} must be a positive even number, got {rotary_dim}")


def rope_inv_freq(
    rotary_dim: int,
    *,
    theta: float = 10000.0,
    llama3_scaling: Llama3RopeScaling | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Inverse frequencies ``theta ** (-2i / rotary_dim)`` for ``i < rotary_dim // 2``, float32.

    ``rotary_dim`` is the number of rotated channels per head: ``head_dim`` for full RoPE, fewer
    for partial rotary (``int(head_dim * partial_rotary_factor)`` in transformers' configs).
    With ``llama3_scaling`` the result is :func:`llama3_scale_inv_freq` of the plain frequencies.
    """
    _check_rotary_dim(rotary_dim)
    exponent = (
        torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float)
        / rotary_dim
    )
    inv_freq = 1.0 / (theta**exponent)
    if llama3_scaling is not None:
        inv_freq = llama3_scale_inv_freq(inv_freq, llama3_scaling)
    return inv_freq


def llama3_scale_inv_freq(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    """Llama 3.1 scaling of ``inv_freq`` (Dubey et al. 2024), as transformers'
    ``_compute_llama3_parameters`` computes it (same float32 operations in the same order)."""
    factor = scaling.factor
    low_freq_factor = scaling.low_freq_factor
    high_freq_factor = scaling.high_freq_factor
    old_context_len = scaling.original_max_position_embeddings

    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    # wavelen < high_freq_wavelen: keep; wavelen > low_freq_wavelen: divide by factor.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # In between: interpolate with a smooth factor.
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    smoothed_inv_freq = (
        1 - smooth_factor
    ) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


def rope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    *,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``cos`` and ``sin`` of ``position * inv_freq``, float32, shape ``[*P, R]``.

    ``position_ids`` has any shape ``P`` (``[tokens]`` for a packed batch, ``[batch, seq]``) and
    holds each token's position, so packed sequences whose positions restart per document (see
    :func:`packed_position_ids`) need nothing special. ``R = inv_freq.numel()`` is
    ``rotary_dim // 2``. ``attention_scaling`` multiplies both (1 except for YaRN-like types).
    """
    if inv_freq.dim() != 1:
        raise ValueError(
            f"inv_freq must be 1D [rotary_dim // 2], got shape {tuple(inv_freq.shape)}"
        )
    freqs = position_ids[..., None].float() * inv_freq.to(
        device=position_ids.device, dtype=torch.float
    )
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def packed_position_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions ``[total_tokens]`` (int64) that restart at 0 at each document of a packed batch.

    ``cu_seqlens`` holds the cumulative document lengths starting at 0 (the flash-attention varlen
    convention), e.g. ``[0, 3, 7]`` gives ``[0, 1, 2, 0, 1, 2, 3]``.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1D [num_docs + 1], got shape {tuple(cu_seqlens.shape)}"
        )
    cu = cu_seqlens.to(torch.int64)
    if bool((cu[1:] < cu[:-1]).any()) or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu.tolist()}")
    total = int(cu[-1])
    idx = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu[1:], idx, right=True)
    return idx - cu[doc]


def mrope_cos_sin(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: Sequence[int],
    *,
    attention_scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL multimodal RoPE (M-RoPE, Wang et al. 2024): cos/sin ``[*P, R]``, float32.

    ``position_ids`` is ``[3, *P]``: temporal, height and width positions of each token (text
    tokens carry the same value in all three). The ``R = inv_freq.numel()`` frequencies are cut
    into consecutive bands of sizes ``mrope_section`` (e.g. ``[16, 24, 24]`` for head_dim 128);
    band ``i`` uses position component ``i % 3``. Identical to transformers'
    ``Qwen2VLRotaryEmbedding`` (and the older ``apply_multimodal_rotary_pos_emb``) with
    ``cos[..., :R]`` of theirs being this ``cos``; apply it with ``layout="half"``.
    """
    if position_ids.dim() < 2 or position_ids.shape[0] != 3:
        raise ValueError(
            "M-RoPE position_ids must be [3, *token_dims] (temporal, height, width); got shape "
            f"{tuple(position_ids.shape)}. For text-only tokens expand the positions to 3 rows."
        )
    num_freqs = inv_freq.numel()
    if any(s < 0 for s in mrope_section) or sum(mrope_section) != num_freqs:
        raise ValueError(
            f"mrope_section {list(mrope_section)} must be non-negative and sum to "
            f"rotary_dim // 2 = {num_freqs}"
        )
    # Which position component drives each frequency: band i -> component i % 3. Selecting the
    # positions before the multiply gives the same float32 products as transformers' selecting
    # the cos/sin afterwards, for a third of the trigonometry.
    component = torch.cat(
        [torch.full((s,), i % 3, dtype=torch.int64) for i, s in enumerate(mrope_section)]
    ).to(position_ids.device)
    positions = position_ids.float()[component]  # [R, *P]
    positions = positions.movedim(0, -1)  # [*P, R]
    freqs = positions * inv_freq.to(device=position_ids.device, dtype=torch.float)
    return freqs.cos() * attention_scaling, freqs.sin() * attention_scaling


def grid_position_ids(
    frames: int, height: int, width: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """``[3, frames * height * width]`` int64 (frame, row, column) of each token of a video grid,
    in the row-major order a patch embedding flattens ``(F, H, W)`` into (width fastest)."""
    f, h, w = torch.meshgrid(
        torch.arange(frames, device=device),
        torch.arange(height, device=device),
        torch.arange(width, device=device),
        indexing="ij",
    )
    return torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)])


def wan_rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of each axis in Wan's 3D RoPE: ``(t, h, w)`` with ``h = w = 2 * (head_dim // 6)``
    and ``t = head_dim - h - w`` (diffusers ``WanRotaryPosEmbed``); 44/42/42 for head_dim 128."""
    _check_rotary_dim(head_dim, "head_dim")
    h = w = 2 * (head_dim // 6)
    return head_dim - h - w, h, w


def factorized_3d_cos_sin(
    position_ids: torch.Tensor,
    axis_dims: Sequence[int],
    *,
    theta: float = 10000.0,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorized N-axis RoPE (Wan 2025 uses 3 axes): cos/sin ``[*P, sum(axis_dims) // 2]``, float32.

    ``position_ids`` is ``[len(axis_dims), *P]``. Axis ``a`` gets ``axis_dims[a]`` channels
    (even) with its own 1D frequencies ``theta ** (-2i / axis_dims[a])`` over its own positions;
    the bands are concatenated in axis order. The angles are computed in ``compute_dtype``
    (float64 like diffusers, so cos/sin match its buffers bitwise) and returned as float32.
    """
    if position_ids.dim() < 2 or position_ids.shape[0] != len(axis_dims):
        raise ValueError(
            f"position_ids must be [{len(axis_dims)}, *token_dims] (one row per axis), got shape "
            f"{tuple(position_ids.shape)}"
        )
    for d in axis_dims:
        _check_rotary_dim(d, "each of axis_dims")
    angles = []
    for axis, dim in enumerate(axis_dims):
        inv_freq = 1.0 / (
            theta
            ** (torch.arange(0, dim, 2, dtype=compute_dtype, device=position_ids.device) / dim)
        )
        angles.append(position_ids[axis].to(compute_dtype)[..., None] * inv_freq)
    freqs = torch.cat(angles, dim=-1)
    return freqs.cos().float(), freqs.sin().float()


def wan_rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan 2.1 video RoPE for a latent grid ``(frames, height, width)`` in patches: cos/sin
    ``[frames * height * width, head_dim // 2]`` float32, to apply with ``layout="interleaved"``.

    Equals diffusers' ``WanRotaryPosEmbed`` output ``freqs_cos[0, :, 0, 0::2]`` (its cos/sin are
    each value repeated twice for the interleaved channel pairs).
    """
    positions = grid_position_ids(*grid, device=device)
    return factorized_3d_cos_sin(positions, wan_rope_axis_dims(head_dim), theta=theta)
