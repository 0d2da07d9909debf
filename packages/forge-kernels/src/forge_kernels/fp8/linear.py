"""FP8 linear layers: ``y = x W^T + b`` with all three GEMMs of training in FP8.

Forward ``y = x W^T`` (x and W in E4M3), backward ``dx = dy W`` and ``dW = dy^T x`` (dy in E5M2 for
the hybrid format, E4M3 otherwise), each a scaled GEMM accumulating in fp32 with bf16 (or the
input's dtype) output; the bias and its gradient stay in high precision and the fp32 master
weight is only read (Micikevicius et al., 2022, "FP8 Formats for Deep Learning"). The recipes
(per-tensor current or delayed scaling, DeepSeek-V3 block-wise scaling) are in
:mod:`forge_kernels.fp8.quantize`.

Two GEMM implementations, chosen by ``gemm=``:

- ``"scaled_mm"``: the real FP8 tensor-core GEMM, ``torch._scaled_mm`` (per-tensor fp32 scales;
  CUDA compute capability >= 8.9, i.e. Ada/Hopper/Blackwell, and also a CPU kernel) and, for
  block-wise scaling, ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` /
  ``BlockWise128x128`` scales (cuBLASLt >= 12.9 on sm90 only; other GPUs raise in torch).
  cuBLASLt needs the contraction and output dims to be multiples of 16, so in/out features must
  be (multiples of 128 for block-wise), and token counts are zero-padded for the weight-gradient
  GEMM, which contracts over tokens.
- ``"emulate"``: quantize to the real ``torch.float8_*`` dtypes, dequantize, multiply in fp32.
  Rounding, saturation and scales are exactly FP8's; only the accumulation order differs. This
  is the CPU path, the test oracle and the registry reference of op ``"fp8_linear"``.

``"auto"`` (the default) uses ``scaled_mm`` on a CUDA device that supports the recipe and shape,
and emulation elsewhere (with a one-time warning on CUDA, where emulation is slow).
"""

from __future__ import annotations

import collections
import fnmatch
import math
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from forge_kernels import registry
from forge_kernels.fp8.quantize import (
    DelayedForwardScales,
    DelayedScalingState,
    Fp8AmaxGroups,
    Fp8BlockwiseScaling,
    Fp8DelayedScaling,
    Fp8Recipe,
    Fp8Tensor,
    quantize_blockwise,
    quantize_tensorwise,
    resolve_recipe,
)
from forge_kernels.fp8.token_split import check_token_blocks, token_group_size

if TYPE_CHECKING:
    from forge_kernels.fp8.policy import Fp8Policy
    from forge_kernels.fp8.quantize import AmaxGroup

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "Fp8Linear",
    "convert_to_fp8",
    "fp8_gemm",
    "fp8_ineligible_reason",
    "fp8_linear",
    "fp8_linear_reference",
    "scaled_mm_unsupported_reason",
]

GemmChoice = Literal["auto", "scaled_mm", "emulate"]
_GEMM_CHOICES = ("auto", "scaled_mm", "emulate")

#: Module-name patterns (``fnmatch``) that :func:`convert_to_fp8` leaves in high precision: the
#: output head and MoE routers, as DeepSeek-V3 keeps them (report, section 3.3.1).
DEFAULT_SKIP_PATTERNS = ("lm_head", "*.lm_head", "output", "*.gate", "*.router", "*.router.*")

#: Delayed-scaling rows of an Fp8Linear's state: input, weight, output gradient.
_INPUT, _WEIGHT, _GRAD = 0, 1, 2

#: The buffers of an Fp8Linear's delayed-scaling state, fp32 whatever dtype the model is cast to.
_FP32_BUFFERS = ("fp8_amax_history", "fp8_scale")


# ============================================================================================
# What the device can do
# ============================================================================================


def scaled_mm_unsupported_reason(
    recipe: str | Fp8Recipe, device: torch.device | str, *, in_features: int, out_features: int
) -> str | None:
    """Why the real FP8 GEMM cannot run this recipe and shape on ``device`` (``None``: it can).

    Per-tensor scaling needs ``torch._scaled_mm``: CUDA compute capability >= 8.9 (or the CPU
    kernel) and features that are multiples of 16. Block-wise scaling needs
    ``torch.nn.functional.scaled_mm`` with 1x128 / 128x128 scales: sm90 (Hopper) with cuBLASLt
    >= 12.9, 128-wide blocks and features that are multiples of 128.
    """
    recipe = resolve_recipe(recipe)
    device = torch.device(device)
    blockwise = isinstance(recipe, Fp8BlockwiseScaling)
    if device.type not in ("cuda", "cpu"):
        return f"torch._scaled_mm is not available on {device.type}"
    if blockwise:
        if device.type != "cuda":
            return "torch._scaled_mm has no block-wise (1x128, 128x128) scaling on CPU"
        if torch.cuda.get_device_capability(device)[0] != 9:
            cap = torch.cuda.get_device_capability(device)
            return (
                f"block-wise FP8 GEMMs in torch need sm90 (Hopper); this GPU is sm{cap[0]}{cap[1]}"
            )
        if not hasattr(F, "scaled_mm"):
            return "this torch has no torch.nn.functional.scaled_mm (block-wise scaling)"
        if recipe.block_size != 128:
            return f"the block-wise GEMM takes 128-wide blocks, the recipe has {recipe.block_size}"
    elif device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        cap = torch.cuda.get_device_capability(device)
        return f"FP8 tensor cores need compute capability >= 8.9; this GPU is sm{cap[0]}{cap[1]}"
    multiple = 128 if blockwise else 16
    if in_features % multiple or out_features % multiple:
        return (
            f"in_features ({in_features}) and out_features ({out_features}) must be multiples "
            f"of {multiple} for the {'block-wise' if blockwise else 'per-tensor'} FP8 GEMM"
        )
    return None


_WARNED: set[str] = set()


def _resolve_gemm(gemm: str, recipe: Fp8Recipe, device: torch.device, n: int, k: int) -> str:
    if gemm not in _GEMM_CHOICES:
        raise ValueError(f"gemm must be one of {_GEMM_CHOICES}, got {gemm!r}")
    if gemm == "emulate":
        return "emulate"
    reason = scaled_mm_unsupported_reason(recipe, device, in_features=k, out_features=n)
    if gemm == "scaled_mm":
        if reason is not None:
            raise ValueError(f"gemm='scaled_mm' cannot run here: {reason}; use gemm='emulate'")
        return "scaled_mm"
    if device.type != "cuda":
        return "emulate"  # CPU: emulation is the intended path (tests, debugging)
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(
                f"FP8 linear falls back to emulation (dequantize + fp32 GEMM, slow): {reason}",
                RuntimeWarning,
                stacklevel=4,
            )
        return "emulate"
    return "scaled_mm"


# ============================================================================================
# The GEMM
# ============================================================================================


def fp8_gemm(
    a: Fp8Tensor,
    b: Fp8Tensor,
    *,
    out_dtype: torch.dtype,
    impl: Literal["scaled_mm", "emulate"] = "emulate",
    bias: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for FP8 ``a`` (M, K) and ``b`` (N, K), both quantized along K.

    ``impl="emulate"`` dequantizes and multiplies in fp32; ``"scaled_mm"`` calls torch's FP8
    GEMM (``a`` per-tensor or 1x128 blocks; ``b`` per-tensor, 1x128 or 128x128 blocks).
    ``fast_accum`` lets Hopper accumulate in its faster, less precise FP8 mode (Transformer
    Engine uses it for the forward GEMM only; DeepSeek-V3 section 3.3.2 explains the cost).
    """
    with torch.autocast(a.data.device.type, enabled=False):
        if impl == "emulate":
            y = a.dequantize() @ b.dequantize().t()
            return (y if bias is None else y + bias.float()).to(out_dtype)
        fuse_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
        bias_arg = bias.to(out_dtype) if fuse_bias else None
        a_data = a.data.contiguous()  # row-major (M, K)
        b_data = b.data.contiguous().t()  # column-major (K, N), as cuBLASLt wants
        if a.block is None and b.block is None:
            y = torch._scaled_mm(
                a_data,
                b_data,
                scale_a=a.scale_inv,
                scale_b=b.scale_inv,
                bias=bias_arg,
                out_dtype=out_dtype,
                use_fast_accum=fast_accum,
            )
        else:
            y = _blockwise_scaled_mm(a, b, a_data, b_data, out_dtype, bias_arg, fast_accum)
        if bias is not None and not fuse_bias:
            y = y + bias.to(out_dtype)
        return y


def _blockwise_scaled_mm(a, b, a_data, b_data, out_dtype, bias, fast_accum) -> torch.Tensor:
    """``F.scaled_mm`` with DeepSeek-style scales, in the layouts torch's cuBLASLt path checks.

    1x128 scales of an operand with R rows: shape (R, K/128), "outer-dim-major" (stride (1, R)).
    128x128 scales of ``b`` (N, K): shape (L4, N/128) with stride (1, L4), where L4 is K/128
    rounded up to a multiple of 4 (zero padded), per the cuBLAS block-scaling docs.
    """
    scaling = F.ScalingType
    if a.block != (1, 128) or b.block not in ((1, 128), (128, 128)):
        raise ValueError(
            f"block-wise scaled_mm takes a 1x128 left operand and a 1x128 or 128x128 right one, "
            f"got {a.block} and {b.block}"
        )
    scale_a = a.scale_inv.t().contiguous().t()
    if b.block == (1, 128):
        scale_b, recipe_b = b.scale_inv.t().contiguous().t(), scaling.BlockWise1x128
    else:
        k_blocks = b.scale_inv.shape[1]
        padded = F.pad(b.scale_inv, (0, -k_blocks % 4)).contiguous()  # (N/128, L4)
        scale_b, recipe_b = padded.t(), scaling.BlockWise128x128
    return F.scaled_mm(
        a_data,
        b_data,
        scale_a,
        scaling.BlockWise1x128,
        scale_b,
        recipe_b,
        bias=bias,
        output_dtype=out_dtype,
        use_fast_accum=fast_accum,
    )


# ============================================================================================
# Autograd
# ============================================================================================


def _quantize_operand(
    x: torch.Tensor,
    role: int,
    recipe: Fp8Recipe,
    state: DelayedScalingState | None,
    fp8_dtype: torch.dtype,
    block: tuple[int, int],
    groups: Fp8AmaxGroups | None,
    forward: DelayedForwardScales | None = None,
    *,
    transpose: bool = False,
) -> Fp8Tensor:
    """``x`` in FP8 under ``recipe``; per-tensor recipes also write the transposed copy when
    ``transpose`` (a backward GEMM takes it as an operand; block-wise quantizes that layout with
    its own scales instead). Per-tensor amaxes are reduced over ``groups.for_role(role)``.
    Delayed scaling casts the forward's operands with the scales of ``forward`` (see
    :meth:`DelayedScalingState.begin_forward`)."""
    if isinstance(recipe, Fp8BlockwiseScaling):
        return quantize_blockwise(x, fp8_dtype, block)
    group = None if groups is None else groups.for_role(role)
    if isinstance(recipe, Fp8DelayedScaling):
        return state.quantize(
            role, x, fp8_dtype, recipe, transpose=transpose, amax_group=group, forward=forward
        )
    return quantize_tensorwise(x, fp8_dtype, transpose=transpose, amax_group=group)


def _token_padding(m: int, recipe: Fp8Recipe, impl: str) -> int:
    """Zero rows to add so the weight-gradient GEMM's contraction (tokens) suits cuBLASLt."""
    if impl != "scaled_mm":
        return 0
    multiple = 128 if isinstance(recipe, Fp8BlockwiseScaling) else 16
    return -m % multiple


def _save_fp8(ctx, wq: Fp8Tensor | None, xq_t: Fp8Tensor | None) -> None:
    """Keep the backward's FP8 operands: through ``ctx.save_for_backward`` (their data, data_t
    and scale_inv tensors; the block layout on ``ctx``), so non-reentrant activation
    checkpointing (``torch.utils.checkpoint``, forge-parallel's recompute) drops them after the
    forward and recomputes them in the backward. Every recipe, delayed scaling included: its
    recomputation casts with the scales of the original forward and leaves the state alone
    (:meth:`DelayedScalingState.begin_forward`), so the recomputed operands are the forward's,
    bit for bit."""
    ctx.fp8_layout = [None if q is None else (q.block, q.data_t is not None) for q in (wq, xq_t)]
    tensors = []
    for q in (wq, xq_t):
        if q is not None:
            tensors += [q.data, q.scale_inv] + ([q.data_t] if q.data_t is not None else [])
    ctx.save_for_backward(*tensors)


def _saved_fp8(ctx) -> tuple[Fp8Tensor | None, Fp8Tensor | None]:
    """The operands :func:`_save_fp8` kept, rebuilt as Fp8Tensor objects."""
    tensors = iter(ctx.saved_tensors)
    rebuilt = []
    for layout in ctx.fp8_layout:
        if layout is None:
            rebuilt.append(None)
            continue
        block, has_t = layout
        data, scale_inv = next(tensors), next(tensors)
        rebuilt.append(Fp8Tensor(data, scale_inv, block, next(tensors) if has_t else None))
    return rebuilt[0], rebuilt[1]


class _Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias, recipe, state, impl, out_dtype, groups, delayed):
        m = x2d.shape[0]
        pad = _token_padding(m, recipe, impl)
        if pad:
            x2d = F.pad(x2d, (0, 0, 0, pad))
        blockwise = isinstance(recipe, Fp8BlockwiseScaling)
        bs = recipe.block_size if blockwise else 0
        fwd = recipe.forward_dtype
        need_dgrad, need_wgrad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        xq = _quantize_operand(
            x2d, _INPUT, recipe, state, fwd, (1, bs), groups, delayed, transpose=need_wgrad
        )
        wq = _quantize_operand(
            weight, _WEIGHT, recipe, state, fwd, (bs, bs), groups, delayed, transpose=need_dgrad
        )
        # Fast (Hopper FP8) accumulation forward only, as Transformer Engine; the block-wise
        # recipe keeps full-precision accumulation, as DeepSeek-V3 (section 3.3.2) asks.
        fast = not blockwise
        y = fp8_gemm(xq, wq, out_dtype=out_dtype, impl=impl, bias=bias, fast_accum=fast)

        # Saved in FP8: the weight for dgrad; for wgrad the input, quantized along tokens
        # (its contraction dim there): the same per-tensor cast, or 128x1 blocks (DeepSeek-V3).
        wq = wq if need_dgrad else None
        xq_t = None
        if need_wgrad:
            xq_t = (quantize_blockwise(x2d, fwd, (bs, 1)) if blockwise else xq).t()
        _save_fp8(ctx, wq, xq_t)
        ctx.delayed = delayed if delayed is not None and delayed.holds_node else None
        if ctx.delayed is not None:  # queued until this node runs its backward or is freed
            weakref.finalize(ctx, state.release, delayed)
        ctx.recipe, ctx.state, ctx.impl, ctx.m, ctx.pad = recipe, state, impl, m, pad
        ctx.groups = groups
        ctx.x_dtype, ctx.w_dtype = x2d.dtype, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y[:m] if pad else y

    @staticmethod
    def backward(ctx, dy):
        recipe, impl = ctx.recipe, ctx.impl
        wq, xq_t = _saved_fp8(ctx)  # first: may recompute this forward (non-reentrant)
        if ctx.delayed is not None:  # no recomputation of this forward can follow any more
            ctx.state.release(ctx.delayed)
        need_dgrad, need_wgrad, need_bgrad = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_bgrad:
            db = dy.float().sum(0).to(ctx.bias_dtype)
        dy2d = F.pad(dy, (0, 0, 0, ctx.pad)) if ctx.pad else dy
        gdt = recipe.grad_dtype
        dyq = dyq_t = None
        if isinstance(recipe, Fp8BlockwiseScaling):
            bs = recipe.block_size
            dyq = quantize_blockwise(dy2d, gdt, (1, bs)) if need_dgrad else None
            dyq_t = quantize_blockwise(dy2d, gdt, (bs, 1)).t() if need_wgrad else None
        elif need_dgrad or need_wgrad:
            dyq = _quantize_operand(
                dy2d, _GRAD, recipe, ctx.state, gdt, (0, 0), ctx.groups, transpose=need_wgrad
            )
            dyq_t = dyq.t()
        if need_dgrad:  # dx = dy @ W: contraction over out_features
            dx = fp8_gemm(dyq, wq.t(), out_dtype=ctx.x_dtype, impl=impl)
            dx = dx[: ctx.m] if ctx.pad else dx
        if need_wgrad:  # dW = dy^T @ x: contraction over tokens
            dw = fp8_gemm(dyq_t, xq_t, out_dtype=ctx.w_dtype, impl=impl)
        return dx, dw, db, None, None, None, None, None, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The output dtype: autocast's if it is on for ``x``'s device, else ``x``'s."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_linear_args(x, weight, bias) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out_features, in_features), got {tuple(weight.shape)}")
    n, k = weight.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must have in_features={k} as its last dim, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    return n, k


def _fp8_linear(
    x, weight, bias, recipe, state, gemm, amax_groups, *, emulate_only: bool
) -> torch.Tensor:
    recipe = resolve_recipe(recipe)
    n, k = _check_linear_args(x, weight, bias)
    if isinstance(recipe, Fp8DelayedScaling):
        if state is None:
            raise ValueError(
                "delayed scaling needs its amax history: pass state=DelayedScalingState.create("
                "3, recipe.amax_history_len, device) (rows: input, weight, grad) or use Fp8Linear"
            )
        if state.amax_history.shape[0] < 3:
            raise ValueError("the delayed-scaling state needs 3 rows: input, weight, gradient")
    out_dtype = _compute_dtype(x)
    if x.numel() == 0 and amax_groups is not None and amax_groups.tokens is not None:
        raise ValueError(
            "an FP8 linear whose tokens are split over a group got no tokens on this rank: the "
            "other ranks would wait for its amax in the all-reduce; give every rank of the "
            "token group tokens (equal sequence shards), or clear the layer's token_group"
        )
    if x.numel() == 0:
        b = None if bias is None else bias.to(out_dtype)
        return F.linear(x.to(out_dtype), weight.to(out_dtype), b)
    impl = "emulate" if emulate_only else _resolve_gemm(gemm, recipe, x.device, n, k)
    x2d = x.reshape(-1, k)
    # Decided here, outside the autograd Function, where grad mode is still the caller's.
    delayed = (
        state.begin_forward(x, weight, bias) if isinstance(recipe, Fp8DelayedScaling) else None
    )
    y = _Fp8LinearFunction.apply(
        x2d, weight, bias, recipe, state, impl, out_dtype, amax_groups, delayed
    )
    return y.reshape(*x.shape[:-1], n)


def fp8_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str | Fp8Recipe = "current",
    state: DelayedScalingState | None = None,
    gemm: GemmChoice = "auto",
    amax_groups: Fp8AmaxGroups | None = None,
) -> torch.Tensor:
    """The emulated FP8 linear (real FP8 casts, fp32 GEMMs) that defines the op's numerics.

    Same signature as :func:`fp8_linear`; ``gemm`` is accepted and ignored.
    """
    return _fp8_linear(x, weight, bias, recipe, state, gemm, amax_groups, emulate_only=True)


def _fp8_linear_default(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str | Fp8Recipe = "current",
    state: DelayedScalingState | None = None,
    gemm: GemmChoice = "auto",
    amax_groups: Fp8AmaxGroups | None = None,
) -> torch.Tensor:
    return _fp8_linear(x, weight, bias, recipe, state, gemm, amax_groups, emulate_only=False)


registry.define_op(
    "fp8_linear",
    default=_fp8_linear_default,
    reference=fp8_linear_reference,
    doc="y = x W^T + b with FP8 forward and backward GEMMs (Micikevicius et al., 2022).",
)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    recipe: str | Fp8Recipe = "current",
    state: DelayedScalingState | None = None,
    gemm: GemmChoice = "auto",
    amax_groups: Fp8AmaxGroups | None = None,
) -> torch.Tensor:
    """``F.linear`` with its forward and both backward GEMMs in FP8.

    Args:
        x: ``(..., in_features)``, usually bf16; the output has ``x``'s dtype (or autocast's).
        weight: ``(out_features, in_features)`` master weight (fp32 or bf16), only read.
        bias: optional ``(out_features,)``, added in high precision.
        recipe: an ``Fp8*Scaling`` recipe or its name (``"current"``, ``"delayed"``,
            ``"blockwise"``).
        state: the :class:`DelayedScalingState` (3 rows: input, weight, output gradient) that
            delayed scaling reads and updates; unused otherwise.
        gemm: ``"auto"``, ``"scaled_mm"`` (the real FP8 GEMM, raising where it cannot run) or
            ``"emulate"`` (see the module docstring).
        amax_groups: for operands that are shards of a tensor-parallel tensor, or whose tokens
            are split over ranks, the groups over which their per-tensor amax is all-reduced
            (:class:`Fp8AmaxGroups`); ``None``: every operand is whole. :class:`Fp8Linear` sets
            it from its DTensor placements and its ``token_group``.

    Dispatches through ``registry.get_op("fp8_linear")``, so a plugin override takes effect here
    (``amax_groups`` is passed to it only when set).
    """
    op = registry.get_op("fp8_linear")
    extra = {} if amax_groups is None else {"amax_groups": amax_groups}
    return op(x, weight, bias, recipe=recipe, state=state, gemm=gemm, **extra)


# ============================================================================================
# Module
# ============================================================================================


class Fp8Linear(nn.Linear):
    """Drop-in ``nn.Linear`` whose GEMMs run in FP8 (same ``weight``/``bias`` parameters).

    A subclass of ``nn.Linear`` (as torchao's ``Float8Linear``), so tensor-parallel styles that
    split linears (torch's ``ColwiseParallel`` / ``RowwiseParallel``, forge-parallel's packed
    column style) accept it. With a DTensor weight it computes on the local shards, reducing
    per-tensor amaxes over the tensor-parallel group so the scales are one process's
    (:mod:`forge_kernels.fp8.tensor_parallel`). With a ``token_group`` its input holds this
    rank's share of the tokens, and the amaxes of the input and output gradient are reduced
    over that group too (:mod:`forge_kernels.fp8.token_split`).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        recipe: scaling recipe or its name; delayed scaling keeps its amax histories and scales
            in the buffers ``fp8_amax_history`` (3, amax_history_len) and ``fp8_scale`` (3,)
            (rows: input, weight, output gradient), so they are checkpointed with the model;
            they stay fp32 when the model is cast (``.to(torch.bfloat16)``), and an activation
            checkpoint's recomputation casts with the scales of the forward it replays,
            leaving them alone (:meth:`DelayedScalingState.begin_forward`).
        backend: ``"torch"`` (this package's kernels) or ``"te"`` (NVIDIA Transformer Engine's
            ``te.Linear`` under its FP8 autocast with the matching recipe; CUDA only; needs
            ``pip install "forge-kernels[transformer-engine]"``; the parameters then live in the
            child ``te_linear``, and ``weight`` / ``bias`` read through to it).
        gemm: ``"auto"``, ``"scaled_mm"`` or ``"emulate"`` (torch backend; see :func:`fp8_linear`).
        policy: an :class:`~forge_kernels.fp8.policy.Fp8Policy`; each call then runs in FP8 only
            if the policy says FP8 pays off for its (tokens, out_features, in_features) GEMM,
            else in high precision (``F.linear`` in the compute dtype).
        token_group: the process group (or a tuple of groups) over which the layer's tokens are
            split, each rank calling it on its shard of the rows (context parallelism's sequence
            shards; a layer run whole on a sequence shard under sequence parallelism); ``None``:
            every call sees all the tokens. Also an attribute, which
            :func:`~forge_kernels.fp8.token_split.set_token_group` sets after parallelization.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        recipe: str | Fp8Recipe = "current",
        backend: Literal["torch", "te"] = "torch",
        gemm: GemmChoice = "auto",
        policy: Fp8Policy | None = None,
        token_group: AmaxGroup = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: the parameters are made below (or by TE)
        if backend not in ("torch", "te"):
            raise ValueError(f"backend must be 'torch' or 'te', got {backend!r}")
        if gemm not in _GEMM_CHOICES:
            raise ValueError(f"gemm must be one of {_GEMM_CHOICES}, got {gemm!r}")
        self.in_features, self.out_features = in_features, out_features
        self.recipe = resolve_recipe(recipe)
        self.backend, self.gemm, self.policy = backend, gemm, policy
        self.token_group = token_group
        if backend == "te":
            from forge_kernels.fp8 import te_backend

            self.te_linear = te_backend.make_te_linear(
                in_features, out_features, bias=bias, device=device, dtype=dtype
            )
            self._te_recipe = te_backend.to_te_recipe(self.recipe)
            return
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()
        self._init_fp8_state(device)

    def __getattr__(self, name: str):
        if name in ("weight", "bias"):  # the TE backend keeps its parameters in te_linear
            te_linear = self.__dict__.get("_modules", {}).get("te_linear")
            if te_linear is not None:
                return getattr(te_linear, name)
        return super().__getattr__(name)

    def _init_fp8_state(self, device) -> None:
        if isinstance(self.recipe, Fp8DelayedScaling):
            history = self.recipe.amax_history_len
            fp32 = {"device": device, "dtype": torch.float32}
            self.register_buffer("fp8_amax_history", torch.zeros(3, history, **fp32))
            self.register_buffer("fp8_scale", torch.ones(3, **fp32))

    def _apply(self, fn, recurse: bool = True):
        """``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.half()``, ``.bfloat16()``, ...), but
        the delayed-scaling buffers stay fp32, as the state's contract says: ``.to(bfloat16)``
        of the model would otherwise round the scales and amaxes to 8 significant bits, so
        every cast would use a scale up to 0.4% off and the history would compare rounded
        amaxes. ``fn`` is applied to each of them as to any buffer (so a device move, a meta or
        ``to_empty`` conversion is done as ``fn`` says), and if it changed the dtype, the fp32
        original is moved to the device of ``fn``'s result instead.

        Buffers leaving the meta device (``to_empty``, ``forge_models.materialize``, a model
        built under ``torch.device("meta")`` for FSDP2) start as the fresh state
        (:meth:`reset_fp8_state`): they had no values to keep, ``to_empty`` leaves arbitrary
        memory (NaN scales poison every cast), and a model's ``init_weights`` that initializes
        parameters by name, or a checkpoint without these buffers (a Hugging Face one), would
        never write them. Unlike random weights, the fresh state is a constant and draws no
        random numbers, so filling it here changes no initialization stream."""
        kept = {name: self._buffers.get(name) for name in _FP32_BUFFERS}
        super()._apply(fn, recurse)
        materialized = False
        for name, before in kept.items():
            after = self._buffers.get(name)
            if before is None or after is None:
                continue
            if before.is_meta and not after.is_meta:  # nothing to keep: reset below
                if after.dtype != torch.float32:
                    self._buffers[name] = torch.empty_like(after, dtype=torch.float32)
                materialized = True
            elif after.dtype != torch.float32:
                self._buffers[name] = before.to(device=after.device, dtype=torch.float32)
        if materialized:
            self.reset_fp8_state()
        return self

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation (Kaiming-uniform weight, uniform bias) and, under
        delayed scaling, the fresh scaling state (:meth:`reset_fp8_state`), as
        ``nn.BatchNorm``'s resets its running statistics: a module built on the meta device
        and materialized with ``to_empty(device=...)`` then ``reset_parameters()`` is the
        module built on the device. (The TE backend keeps its scaling state inside
        ``te.Linear``, created at its first FP8 forward, so there is none to reset here.)"""
        if self.backend == "te":
            self.te_linear.reset_parameters()
            return
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_fp8_state()

    @torch.no_grad()
    def reset_fp8_state(self) -> None:
        """Delayed scaling's state as ``__init__`` makes it: empty amax histories (0), scales 1,
        no forward waiting for a recomputation. In place (a tensor-parallel replicated
        ``DTensor`` buffer stays one); a no-op for the other recipes, which keep no state."""
        if "fp8_scale" not in self._buffers:  # not delayed, or called from __init__ before it
            return
        self.fp8_amax_history.zero_()
        self.fp8_scale.fill_(1.0)
        pending = self.__dict__.get("_fp8_pending")
        if pending is not None:
            pending.clear()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        recipe: str | Fp8Recipe = "current",
        backend: Literal["torch", "te"] = "torch",
        gemm: GemmChoice = "auto",
        policy: Fp8Policy | None = None,
        token_group: AmaxGroup = None,
    ) -> Fp8Linear:
        """An Fp8Linear computing ``linear``. The torch backend shares ``linear``'s parameters
        (same objects: an optimizer built on the original keeps working); TE copies them."""
        weight = linear.weight
        kwargs = {
            "recipe": recipe,
            "backend": backend,
            "gemm": gemm,
            "policy": policy,
            "token_group": token_group,
        }
        has_bias = linear.bias is not None
        if backend == "te":
            new = cls(
                linear.in_features,
                linear.out_features,
                has_bias,
                device=weight.device,
                dtype=weight.dtype,
                **kwargs,
            )
            with torch.no_grad():
                new.te_linear.weight.copy_(weight)
                if has_bias:
                    new.te_linear.bias.copy_(linear.bias)
            return new
        new = cls(linear.in_features, linear.out_features, has_bias, device="meta", **kwargs)
        new.weight = weight
        new.bias = linear.bias
        new._init_fp8_state(weight.device)
        return new

    def _delayed_state(self) -> DelayedScalingState | None:
        if not isinstance(self.recipe, Fp8DelayedScaling):
            return None
        # Tensor-parallel styles make buffers replicated DTensors: update their local tensors
        # (views of the same storage; the amax reduction keeps them equal on every rank).
        history, scale = self.fp8_amax_history, self.fp8_scale
        if _is_dtensor(history):
            history, scale = history.to_local(), scale.to_local()
        # The scales of forwards an activation checkpoint may still recompute: kept on the
        # module, since the state wrapper is rebuilt per call (not in the state_dict: a model
        # is saved between steps, when nothing is pending).
        pending = self.__dict__.get("_fp8_pending")
        if pending is None:
            pending = self._fp8_pending = collections.deque(maxlen=DelayedScalingState.MAX_PENDING)
        return DelayedScalingState(history, scale, pending=pending)

    def uses_fp8(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` runs in FP8 (always, unless the policy says it does not pay).
        The policy is asked about the whole GEMM: with a ``token_group``, the tokens of all its
        ranks (equal shards), so every rank, and one process, decide alike."""
        if self.policy is None:
            return True
        tokens = x.numel() // max(self.in_features, 1) * token_group_size(self.token_group)
        return self.policy.use_fp8(tokens, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend == "te":
            if _is_dtensor(x) or self.token_group is not None:
                raise ValueError(
                    "Fp8Linear(backend='te') got a DTensor input or a token_group: tensor, "
                    "context and sequence parallelism are not supported with the Transformer "
                    "Engine backend; use backend='torch'"
                )
            from forge_kernels.fp8 import te_backend

            with te_backend.te_autocast(self._te_recipe, enabled=self.uses_fp8(x)):
                return self.te_linear(x)
        linear = self._local_linear(x)  # decided on the whole x: every rank decides alike
        blockwise = isinstance(self.recipe, Fp8BlockwiseScaling) and self.uses_fp8(x)
        block = self.recipe.block_size if blockwise else None
        if block is not None and self.token_group is not None:
            check_token_blocks(x, block)
        if _is_dtensor(self.weight):
            from forge_kernels.fp8.tensor_parallel import linear_on_shards

            return linear_on_shards(
                x,
                self.weight,
                self.bias,
                linear=linear,
                block_size=block,
                token_group=self.token_group,
            )
        if _is_dtensor(x):
            raise ValueError(
                "Fp8Linear got a DTensor input but holds a plain weight: split the layer with "
                "a tensor-parallel style (colwise / rowwise), or give it a local tensor"
            )
        groups = None if self.token_group is None else Fp8AmaxGroups(tokens=self.token_group)
        return linear(x, self.weight, self.bias, groups)

    def _local_linear(self, x: torch.Tensor) -> Callable[..., torch.Tensor]:
        """``(x, weight, bias, amax_groups) -> y`` on plain tensors: the FP8 linear, or
        ``F.linear`` in the compute dtype where the policy keeps the call in high precision."""
        if not self.uses_fp8(x):
            dtype = _compute_dtype(x)

            def high_precision(x, weight, bias, _amax_groups):
                bias = None if bias is None else bias.to(dtype)
                return F.linear(x.to(dtype), weight.to(dtype), bias)

            return high_precision
        recipe, state, gemm = self.recipe, self._delayed_state(), self.gemm

        def fp8(x, weight, bias, amax_groups):
            return fp8_linear(
                x, weight, bias, recipe=recipe, state=state, gemm=gemm, amax_groups=amax_groups
            )

        return fp8

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, recipe={self.recipe.name}, backend={self.backend}, "
            f"gemm={self.gemm}, policy={'yes' if self.policy is not None else 'no'}"
            + (", token_group=yes" if self.token_group is not None else "")
        )


def _is_dtensor(t: object) -> bool:
    """Whether ``t`` is a DTensor, without importing ``torch.distributed.tensor`` (seconds: it
    imports sympy) in a process that never made one."""
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(t, dtensor_module.DTensor)


# ============================================================================================
# Model conversion
# ============================================================================================


def fp8_ineligible_reason(linear: nn.Linear, recipe: str | Fp8Recipe) -> str | None:
    """Why ``linear`` is not converted (``None``: it is): features must be multiples of 16
    (of the block size for block-wise scaling), as the real FP8 GEMM needs on any device."""
    recipe = resolve_recipe(recipe)
    multiple = recipe.block_size if isinstance(recipe, Fp8BlockwiseScaling) else 16
    if linear.in_features % multiple or linear.out_features % multiple:
        return f"in/out features ({linear.in_features}, {linear.out_features}) not multiples of {multiple}"
    return None


def convert_to_fp8(
    model: nn.Module,
    *,
    recipe: str | Fp8Recipe = "current",
    policy: Fp8Policy | None = None,
    skip: Sequence[str] = DEFAULT_SKIP_PATTERNS,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    backend: Literal["torch", "te"] = "torch",
    gemm: GemmChoice = "auto",
) -> nn.Module:
    """Swap the eligible ``nn.Linear`` modules of ``model`` for :class:`Fp8Linear`, in place.

    A module is swapped if its type is exactly ``nn.Linear`` (subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj`` are read by their parents directly), its qualified
    name matches none of the ``fnmatch`` patterns in ``skip`` (default: the output head and MoE
    routers), its features suit FP8 GEMMs (:func:`fp8_ineligible_reason`) and ``filter_fn(name,
    module)``, if given, returns True. ``policy`` is handed to every new module (per-call
    decisions by GEMM shape). Returns ``model`` (or the new module if ``model`` is a Linear).
    """
    recipe = resolve_recipe(recipe)

    def eligible(name: str, module: nn.Module) -> bool:
        return (
            type(module) is nn.Linear
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
            and fp8_ineligible_reason(module, recipe) is None
            and (filter_fn is None or filter_fn(name, module))
        )

    def convert(module: nn.Linear) -> Fp8Linear:
        return Fp8Linear.from_linear(
            module, recipe=recipe, backend=backend, gemm=gemm, policy=policy
        )

    if eligible("", model):
        return convert(model)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if eligible(name, child):
                setattr(parent, child_name, convert(child))
    return model
