"""Apply rotary position embeddings to q and k with one Triton kernel, in place or out of place.

RoPE (RoFormer, Su et al. 2021, arXiv:2104.09864) rotates each channel pair ``(x1, x2)`` of a
head by the token's angle: ``(x1 cos - x2 sin, x2 cos + x1 sin)``. Which channels pair up is the
*layout*:

- ``"half"`` (GPT-NeoX, Llama, Qwen, transformers' ``rotate_half``): channel ``i`` pairs with
  ``i + rotary_dim // 2``;
- ``"interleaved"`` (GPT-J, Wan, the complex-number form): channel ``2i`` pairs with ``2i + 1``.

Only the first ``rotary_dim = 2 * cos.shape[-1]`` channels of each head rotate (partial rotary:
GPT-NeoX, Phi); the rest pass through. For DeepSeek's MLA, where the rotated part is the *last*
``qk_rope_head_dim`` channels, pass the view ``q[..., qk_nope_head_dim:]`` (in place works on it).

``cos`` and ``sin`` are per token, ``[*token_dims, rotary_dim // 2]`` (built by
:mod:`forge_kernels.rope.frequencies`; a ``[seq, R]`` table broadcasts over the batch), so 1D,
Llama-3-scaled, M-RoPE and factorized 3D RoPE, packed or padded, all go through the same kernel.
q and k are ``[tokens, heads, head_dim]`` (packed/varlen) or ``[batch, seq, heads, head_dim]``,
any strides (a view into a fused qkv buffer is fine), and may have different head counts (GQA,
MLA). The rotation is computed in float32 and stored in the input dtype.

Backward is the inverse rotation (the same kernel with ``-sin``) applied to the gradient; ``cos``
and ``sin`` get no gradient from the kernel (if they require one, the eager reference runs).
"""

import contextlib
import functools
from typing import Literal

import torch

from forge_kernels import registry
from forge_kernels._triton_support import can_use_triton

__all__ = ["Layout", "apply_rope", "apply_rope_", "apply_rope_reference"]

Layout = Literal["half", "interleaved"]
_LAYOUTS = ("half", "interleaved")


# --------------------------------------------------------------------------------------------
# Argument checks shared by every implementation.
# --------------------------------------------------------------------------------------------


def _check_args(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    layout: str,
    inplace: bool,
) -> int:
    """Validate the arguments; returns ``rotary_dim // 2``."""
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    tensors = {"q": q} if k is None else {"q": q, "k": k}
    for name, x in tensors.items():
        if x.dim() not in (3, 4):
            raise ValueError(
                f"{name} must be [tokens, heads, head_dim] or [batch, seq, heads, head_dim], got "
                f"shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if k is not None:
        if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
            raise ValueError(
                "q and k must share token dims and head_dim (heads may differ), got "
                f"q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        if inplace and k is q:
            raise ValueError("in-place RoPE got the same tensor as q and k; pass k=None instead")
    if cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must have the same shape, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if cos.dim() < 1 or not cos.is_floating_point() or not sin.is_floating_point():
        raise ValueError(
            "cos and sin must be floating-point tensors [*token_dims, rotary_dim // 2]"
        )
    half = cos.shape[-1]
    head_dim = q.shape[-1]
    if half < 1 or 2 * half > head_dim:
        raise ValueError(
            f"cos/sin last dim is rotary_dim // 2 = {half}, so rotary_dim = {2 * half} must be in "
            f"[2, head_dim = {head_dim}]. cos/sin here hold one value per channel pair; from a "
            "transformers-style cos of width rotary_dim pass cos[..., : rotary_dim // 2]"
        )
    token_shape = tuple(q.shape[:-2])
    try:
        broadcast = torch.broadcast_shapes(tuple(cos.shape[:-1]), token_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != token_shape:
        raise ValueError(
            f"cos/sin token dims {tuple(cos.shape[:-1])} must broadcast to q's token dims "
            f"{token_shape} (q is {tuple(q.shape)}; cos/sin are [*token_dims, rotary_dim // 2])"
        )
    devices = {t.device for t in (q, k, cos, sin) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"q, k, cos and sin must be on one device, got {sorted(map(str, devices))}"
        )
    if inplace:
        for name, x in tensors.items():
            if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape, strict=True)):
                raise ValueError(
                    f"in-place RoPE cannot write into {name}: it has stride-0 (expanded) dims"
                )
    return half


# --------------------------------------------------------------------------------------------
# Eager reference: defines the numerics.
# --------------------------------------------------------------------------------------------


def _rotate_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str
) -> torch.Tensor:
    """Rotated first ``2 * cos.shape[-1]`` channels of ``x``, in float32 (float64 for float64)."""
    half = cos.shape[-1]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    c = cos.to(compute_dtype).unsqueeze(-2)  # broadcast over heads
    s = sin.to(compute_dtype).unsqueeze(-2)
    rot = x[..., : 2 * half].to(compute_dtype, copy=True)
    if layout == "half":
        x1, x2 = rot[..., :half], rot[..., half:]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    x1, x2 = rot[..., 0::2], rot[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)


def apply_rope_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager PyTorch RoPE, the numerics every implementation of ``apply_rope`` must match.

    Same arguments as :func:`apply_rope`. Differentiable in q, k, cos and sin.
    """
    half = _check_args(q, k, cos, sin, layout, inplace)
    outs: list[torch.Tensor | None] = []
    for x in (q, k):
        if x is None:
            outs.append(None)
            continue
        rot = _rotate_reference(x, cos, sin, layout).to(x.dtype)
        if inplace:
            x[..., : 2 * half].copy_(rot)
            outs.append(x)
        else:
            outs.append(torch.cat((rot, x[..., 2 * half :]), dim=-1))
    return outs[0], outs[1]


# --------------------------------------------------------------------------------------------
# Triton kernel, built on first use so that importing this module needs no Triton.
# --------------------------------------------------------------------------------------------

#: Elements (tokens x heads x channel pairs) one program rotates; sized so a program's tiles stay
#: in registers on a GPU while small shapes still get few, wide programs.
_ELEMS_PER_PROGRAM = 2048


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _rope_kernel():
    import triton
    import triton.language as tl

    # The helper is bound at module level: Triton resolves the functions a kernel calls through
    # the kernel's globals (the interpreter re-executes the kernel source without its closure).
    global _rotate_heads

    @triton.jit
    def _rotate_heads(
        x_ptr,
        y_ptr,
        b,
        s,
        mask_t,
        cos,
        sin,
        head_block,
        n_heads,
        rotary_half,
        head_dim,
        sx_b,
        sx_s,
        sx_h,
        sx_d,
        sy_b,
        sy_s,
        sy_h,
        sy_d,
        BLOCK_T: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        COPY_PASS: tl.constexpr,
    ):
        # Tiles are [BLOCK_T tokens, BLOCK_H heads, BLOCK_R channel pairs].
        offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        offs_r = tl.arange(0, BLOCK_R)
        mask_th = mask_t[:, None, None] & (offs_h < n_heads)[None, :, None]
        mask = mask_th & (offs_r < rotary_half)[None, None, :]
        row_x = (b * sx_b + s * sx_s)[:, None, None] + offs_h[None, :, None] * sx_h
        row_y = (b * sy_b + s * sy_s)[:, None, None] + offs_h[None, :, None] * sy_h
        c = cos[:, None, :]
        sn = sin[:, None, :]
        out_ty = y_ptr.dtype.element_ty
        # Convert right after loading: compute in float32 (and the interpreter gets bf16 wrong).
        if INTERLEAVED:
            # Load the 2R channels contiguously (vectorized) and split them into even/odd pairs.
            offs_2r = tl.arange(0, 2 * BLOCK_R)
            mask2 = mask_th & (offs_2r < 2 * rotary_half)[None, None, :]
            x = tl.load(x_ptr + row_x + offs_2r[None, None, :] * sx_d, mask=mask2, other=0.0)
            x1, x2 = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_T, BLOCK_H, BLOCK_R, 2)))
            y = tl.join(x1 * c - x2 * sn, x2 * c + x1 * sn)
            y = tl.reshape(y, (BLOCK_T, BLOCK_H, 2 * BLOCK_R))
            tl.store(y_ptr + row_y + offs_2r[None, None, :] * sy_d, y.to(out_ty), mask=mask2)
        else:
            d2 = offs_r + rotary_half
            x1 = tl.load(x_ptr + row_x + offs_r[None, None, :] * sx_d, mask=mask, other=0.0)
            x2 = tl.load(x_ptr + row_x + d2[None, None, :] * sx_d, mask=mask, other=0.0)
            x1 = x1.to(tl.float32)
            x2 = x2.to(tl.float32)
            y1 = x1 * c - x2 * sn
            y2 = x2 * c + x1 * sn
            tl.store(y_ptr + row_y + offs_r[None, None, :] * sy_d, y1.to(out_ty), mask=mask)
            tl.store(y_ptr + row_y + d2[None, None, :] * sy_d, y2.to(out_ty), mask=mask)
        if COPY_PASS:
            # Out of place: the channels after the rotary part are copied unchanged.
            offs_p = 2 * rotary_half + tl.arange(0, BLOCK_P)
            mask_p = mask_th & (offs_p < head_dim)[None, None, :]
            v = tl.load(x_ptr + row_x + offs_p[None, None, :] * sx_d, mask=mask_p, other=0.0)
            tl.store(y_ptr + row_y + offs_p[None, None, :] * sy_d, v.to(out_ty), mask=mask_p)

    @triton.jit
    def rope_kernel(
        q_ptr,
        qo_ptr,
        k_ptr,
        ko_ptr,
        cos_ptr,
        sin_ptr,
        n_tokens,
        seq_len,
        n_q_heads,
        n_k_heads,
        n_q_blocks,
        rotary_half,
        head_dim,
        sq_b,
        sq_s,
        sq_h,
        sq_d,
        sqo_b,
        sqo_s,
        sqo_h,
        sqo_d,
        sk_b,
        sk_s,
        sk_h,
        sk_d,
        sko_b,
        sko_s,
        sko_h,
        sko_d,
        sc_b,
        sc_s,
        sc_r,
        ss_b,
        ss_s,
        ss_r,
        BLOCK_T: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_P: tl.constexpr,
        INTERLEAVED: tl.constexpr,
        BACKWARD: tl.constexpr,
        COPY_PASS: tl.constexpr,
    ):
        """Grid: (token blocks, q head blocks + k head blocks). Tokens are (batch, seq) flattened."""
        pid_t = tl.program_id(0).to(tl.int64)
        pid_h = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        mask_t = offs_t < n_tokens
        b = offs_t // seq_len
        s = offs_t % seq_len
        offs_r = tl.arange(0, BLOCK_R)
        mask_cs = mask_t[:, None] & (offs_r < rotary_half)[None, :]
        cos = tl.load(
            cos_ptr + (b * sc_b + s * sc_s)[:, None] + offs_r[None, :] * sc_r,
            mask=mask_cs,
            other=0.0,
        ).to(tl.float32)
        sin = tl.load(
            sin_ptr + (b * ss_b + s * ss_s)[:, None] + offs_r[None, :] * ss_r,
            mask=mask_cs,
            other=0.0,
        ).to(tl.float32)
        if BACKWARD:
            sin = -sin  # the inverse rotation: rotate by -angle
        if pid_h < n_q_blocks:
            _rotate_heads(
                q_ptr, qo_ptr, b, s, mask_t, cos, sin, pid_h, n_q_heads, rotary_half, head_dim,
                sq_b, sq_s, sq_h, sq_d, sqo_b, sqo_s, sqo_h, sqo_d,
                BLOCK_T, BLOCK_HQ, BLOCK_R, BLOCK_P, INTERLEAVED, COPY_PASS,
            )  # fmt: skip
        else:
            _rotate_heads(
                k_ptr, ko_ptr, b, s, mask_t, cos, sin, pid_h - n_q_blocks, n_k_heads, rotary_half,
                head_dim, sk_b, sk_s, sk_h, sk_d, sko_b, sko_s, sko_h, sko_d,
                BLOCK_T, BLOCK_HK, BLOCK_R, BLOCK_P, INTERLEAVED, COPY_PASS,
            )  # fmt: skip

    return rope_kernel


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x


def _launch_rope_kernel(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor | None,
    *,
    interleaved: bool,
    backward: bool,
) -> None:
    """Rotate ``q`` (and ``k``) into ``q_out`` (and ``k_out``); outputs may alias inputs (in place)."""
    q4, qo4 = _as_4d(q), _as_4d(q_out)
    batch, seq, n_q_heads, head_dim = q4.shape
    n_tokens = batch * seq
    if n_tokens == 0 or q.numel() == 0:
        return
    half = cos.shape[-1]
    cos3 = cos.broadcast_to((batch, seq, half))
    sin3 = sin.broadcast_to((batch, seq, half))
    if k is None:
        k4, ko4, n_k_heads = q4, qo4, 0
    else:
        k4, ko4 = _as_4d(k), _as_4d(k_out)
        n_k_heads = k4.shape[2]

    block_r = _next_pow2(half)
    block_p = _next_pow2(head_dim - 2 * half) if head_dim > 2 * half else 1
    copy_pass = head_dim > 2 * half and q_out is not q  # in place, pass-through stays put
    max_heads_per_block = max(1, _ELEMS_PER_PROGRAM // block_r)
    block_hq = min(_next_pow2(n_q_heads), max_heads_per_block)
    block_hk = min(_next_pow2(max(n_k_heads, 1)), max_heads_per_block)
    block_t = max(1, _ELEMS_PER_PROGRAM // (max(block_hq, block_hk) * block_r))
    block_t = min(block_t, _next_pow2(n_tokens))
    n_q_blocks = _cdiv(n_q_heads, block_hq)
    n_k_blocks = _cdiv(n_k_heads, block_hk)
    grid = (_cdiv(n_tokens, block_t), n_q_blocks + n_k_blocks)

    guard = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with guard:
        _rope_kernel()[grid](
            q4, qo4, k4, ko4, cos3, sin3,
            n_tokens, seq, n_q_heads, n_k_heads, n_q_blocks, half, head_dim,
            *q4.stride(), *qo4.stride(), *k4.stride(), *ko4.stride(),
            *cos3.stride(), *sin3.stride(),
            BLOCK_T=block_t, BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_R=block_r,
            BLOCK_P=block_p, INTERLEAVED=interleaved, BACKWARD=backward, COPY_PASS=copy_pass,
            num_warps=4,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Autograd.
# --------------------------------------------------------------------------------------------


def _rotate_out_of_place(q, k, cos, sin, *, interleaved: bool, backward: bool):
    q_out = torch.empty_like(q)
    k_out = None if k is None else torch.empty_like(k)
    _launch_rope_kernel(q, k, cos, sin, q_out, k_out, interleaved=interleaved, backward=backward)
    return q_out, k_out


class _RopeFunction(torch.autograd.Function):
    """Out-of-place RoPE of q and k through the Triton kernel (one launch forward, one backward)."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, interleaved: bool):
        q_out, k_out = _rotate_out_of_place(q, k, cos, sin, interleaved=interleaved, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        ctx.has_k = k is not None
        return q_out, k_out

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        # The rotation is orthogonal: its vector-Jacobian product is the rotation by -angle.
        # Written out of place: the incoming gradient buffers may be shared with other branches.
        dq, dk = _rotate_out_of_place(
            grad_q,
            grad_k if ctx.has_k else None,
            cos,
            sin,
            interleaved=ctx.interleaved,
            backward=True,
        )
        return dq, dk, None, None, None


class _RotatedInPlace(torch.autograd.Function):
    """Autograd record of a rotation the kernel has already written into ``x``.

    ``mark_dirty`` bumps x's version counter and rebases its history (also when x is a view of a
    fused qkv buffer), so autograd rejects the write if x is a leaf that requires grad or was
    saved for backward by another op, as for any in-place op. One Function per tensor: autograd
    does not allow a Function that modifies a view in place to return more than one tensor.
    """

    @staticmethod
    def forward(ctx, x, cos, sin, interleaved: bool):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        dx, _ = _rotate_out_of_place(
            grad, None, cos, sin, interleaved=ctx.interleaved, backward=True
        )
        return dx, None, None, None


def _rope_inplace(q, k, cos, sin, interleaved: bool):
    tensors = [x for x in (q, k) if x is not None]
    if torch.is_grad_enabled():
        for x in tensors:
            if x.requires_grad and x.is_leaf:
                # What autograd would raise; checked before the kernel writes anything.
                raise RuntimeError(
                    "a leaf Variable that requires grad is being used in an in-place operation."
                )
    # One launch rotates q and k; the Functions below only record it for autograd.
    _launch_rope_kernel(q, k, cos, sin, q, k, interleaved=interleaved, backward=False)
    outs = [_RotatedInPlace.apply(x, cos, sin, interleaved) for x in tensors]
    return outs[0], (outs[1] if k is not None else None)


def _apply_rope_default(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The Triton kernel where it can run, else the eager reference."""
    _check_args(q, k, cos, sin, layout, inplace)
    cos_sin_need_grad = torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad)
    tensors = [t for t in (q, k, cos, sin) if t is not None]
    float64 = torch.float64 in (q.dtype, q.dtype if k is None else k.dtype)
    if cos_sin_need_grad or float64 or not can_use_triton(*tensors):
        return apply_rope_reference(q, k, cos, sin, layout=layout, inplace=inplace)
    interleaved = layout == "interleaved"
    if inplace:
        return _rope_inplace(q, k, cos, sin, interleaved)
    return _RopeFunction.apply(q, k, cos, sin, interleaved)


registry.define_op(
    "apply_rope",
    default=_apply_rope_default,
    reference=apply_rope_reference,
    doc="Rotary position embedding of q and k from per-token cos/sin [*tokens, rotary_dim // 2].",
)


# --------------------------------------------------------------------------------------------
# Public functions.
# --------------------------------------------------------------------------------------------


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate q and k by per-token RoPE angles; returns ``(q_rotated, k_rotated)``.

    Args:
        q: ``[tokens, heads, head_dim]`` (packed/varlen) or ``[batch, seq, heads, head_dim]``.
        k: same token dims and head_dim as ``q``, any number of heads; or ``None`` to rotate q only.
        cos, sin: ``[*token_dims, rotary_dim // 2]`` broadcastable to q's token dims (e.g.
            ``[seq, R]`` for a batch sharing positions, ``[tokens, R]`` for a packed batch with
            per-document positions), from :mod:`forge_kernels.rope.frequencies`. Any float dtype;
            float32 keeps the angles exact.
        layout: ``"half"`` (NeoX/Llama ``rotate_half``) or ``"interleaved"`` (GPT-J, Wan).
        inplace: write the result into q and k (and return them). Autograd-safe: q and k are
            marked dirty, so rotating a leaf that requires grad, or a tensor another op saved for
            backward, raises as any in-place op does. Out of place, new tensors are returned.

    Runs the registered ``apply_rope`` op: the Triton kernel on CUDA (or on CPU under
    ``TRITON_INTERPRET=1``), the eager reference elsewhere, or a plugin's override.
    """
    return registry.get_op("apply_rope")(q, k, cos, sin, layout=layout, inplace=inplace)


def apply_rope_(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    layout: Layout = "half",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """In-place :func:`apply_rope`: rotates q and k in their own memory and returns them."""
    return apply_rope(q, k, cos, sin, layout=layout, inplace=True)
