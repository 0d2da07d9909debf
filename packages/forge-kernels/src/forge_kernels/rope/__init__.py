"""Rotary position embeddings (RoPE): cos/sin builders for every variant, one apply kernel.

Build per-token ``cos``/``sin`` ``[*token_dims, rotary_dim // 2]`` with a builder, then rotate::

    from forge_kernels.rope import (
        Llama3RopeScaling, apply_rope_, packed_position_ids, rope_cos_sin, rope_inv_freq,
    )

    inv_freq = rope_inv_freq(head_dim, theta=500000.0, llama3_scaling=Llama3RopeScaling())
    cos, sin = rope_cos_sin(packed_position_ids(cu_seqlens), inv_freq)  # [tokens, head_dim // 2]
    q, k = apply_rope_(q, k, cos, sin)  # q, k: [tokens, heads, head_dim], rotated in place

Papers: RoFormer (Su et al. 2021) for RoPE; "The Llama 3 Herd of Models" (2024) for the frequency
scaling; Qwen2-VL (Wang et al. 2024) for M-RoPE; Wan (2025) for the factorized 3D video RoPE.
Importing this package does not import Triton; the kernel is compiled on first use.
"""

from forge_kernels.rope.apply import Layout, apply_rope, apply_rope_, apply_rope_reference
from forge_kernels.rope.frequencies import (
    Llama3RopeScaling,
    factorized_3d_cos_sin,
    grid_position_ids,
    llama3_scale_inv_freq,
    mrope_cos_sin,
    packed_position_ids,
    rope_cos_sin,
    rope_inv_freq,
    wan_rope_axis_dims,
    wan_rope_cos_sin,
)

__all__ = [
    "Layout",
    "Llama3RopeScaling",
    "apply_rope",
    "apply_rope_",
    "apply_rope_reference",
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
