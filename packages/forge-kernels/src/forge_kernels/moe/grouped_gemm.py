"""Grouped GEMM over experts: one matmul per expert on that expert's contiguous rows.

``grouped_mm(x, weight, tokens_per_expert)`` computes ``y[rows of e] = x[rows of e] @ weight[e]``
for rows sorted by expert (the output of :func:`forge_kernels.moe.moe_permute`), in one call for all
experts and without padding: the dropless block-sparse formulation of MegaBlocks (Gale et al. 2022,
"MegaBlocks: Efficient Sparse Training with Mixture-of-Experts", arXiv:2211.15841). It is
differentiable w.r.t. ``x`` and ``weight``; experts with no tokens get a zero weight gradient.

Three backends, chosen per call (``backend="auto"``) in this order:

``"torch"``
    ``torch._grouped_mm``, where its CUTLASS kernel runs: CUDA compute capability 9.x or 10.x (its
    fast path; elsewhere it falls back to a loop with a host sync), bf16 ``x`` and ``weight``,
    ``K`` and ``N`` multiples of 8 (16-byte aligned rows). The backward forms the products
    torch's own autograd forms for it, and zeroes the gradient of experts without tokens
    (pytorch/pytorch#172439: non-zero there on sm100).
``"triton"``
    A Triton grouped GEMM (:mod:`forge_kernels.moe.grouped_gemm_triton`, imported on first use)
    where :func:`forge_kernels._triton_support.can_use_triton` allows: CUDA, or CPU under
    ``TRITON_INTERPRET=1``; fp32, fp16 or bf16.
``"loop"``
    A Python loop of ``torch.matmul`` over experts (how transformers' MoE blocks run), with one
    host sync to read the counts. Works on every device and dtype.

:func:`grouped_mm_backend` says which backend ``"auto"`` picks for given inputs, and
:data:`BACKEND_CALLS` counts the backends that ran.
"""

from __future__ import annotations

import collections
from typing import Literal

import torch

from forge_kernels import registry
from forge_kernels._autocast import autocast_inputs
from forge_kernels._triton_support import can_use_triton

__all__ = [
    "BACKEND_CALLS",
    "grouped_mm",
    "grouped_mm_backend",
    "grouped_mm_reference",
]

Backend = Literal["auto", "torch", "triton", "loop"]
_BACKENDS = ("auto", "torch", "triton", "loop")

#: Calls per backend that ran ("torch", "triton", "loop"), so callers and tests can observe it.
BACKEND_CALLS: collections.Counter[str] = collections.Counter()

#: Dtypes the Triton kernels take.
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_args(
    x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor, transpose_weight: bool
) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"grouped_mm needs x of shape [tokens, K] sorted by expert, got {tuple(x.shape)}"
        )
    layout = "[E, N, K]" if transpose_weight else "[E, K, N]"
    if weight.dim() != 3:
        raise ValueError(f"grouped_mm needs weight of shape {layout}, got {tuple(weight.shape)}")
    k_dim = weight.shape[2] if transpose_weight else weight.shape[1]
    if k_dim != x.shape[1]:
        hint = (
            "pass transpose_weight=False for a [E, K, N] weight"
            if transpose_weight
            else "pass transpose_weight=True for an nn.Linear-style [E, N, K] weight"
        )
        raise ValueError(
            f"grouped_mm: x has K={x.shape[1]} but weight {tuple(weight.shape)} read as {layout} "
            f"has K={k_dim}; {hint}"
        )
    if tokens_per_expert.shape != (weight.shape[0],):
        raise ValueError(
            f"tokens_per_expert must have shape ({weight.shape[0]},) (one count per expert), "
            f"got {tuple(tokens_per_expert.shape)}"
        )
    if tokens_per_expert.is_floating_point() or tokens_per_expert.dtype == torch.bool:
        raise ValueError(
            f"tokens_per_expert must be an integer tensor, got {tokens_per_expert.dtype}"
        )
    if x.dtype != weight.dtype:
        raise ValueError(
            f"grouped_mm needs x and weight of one dtype, got {x.dtype} and {weight.dtype}; "
            "cast the weight (weight.to(x.dtype)) or use autocast"
        )
    if x.device != weight.device or x.device != tokens_per_expert.device:
        raise ValueError(
            f"grouped_mm needs x, weight and tokens_per_expert on one device, got {x.device}, "
            f"{weight.device} and {tokens_per_expert.device}"
        )


def _torch_grouped_mm_ok(x: torch.Tensor, weight: torch.Tensor, transpose_weight: bool) -> bool:
    """Whether ``torch._grouped_mm``'s CUTLASS fast path takes these operands."""
    if not hasattr(torch, "_grouped_mm") or x.device.type != "cuda":
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device)[0] not in (9, 10):
        return False
    n_dim = weight.shape[1] if transpose_weight else weight.shape[2]
    return x.shape[1] % 8 == 0 and n_dim % 8 == 0 and x.shape[0] > 0


def grouped_mm_backend(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor | None = None,
    *,
    transpose_weight: bool = False,
) -> str:
    """The backend ``grouped_mm(..., backend="auto")`` runs for these inputs.

    ``"torch"`` (``torch._grouped_mm``), ``"triton"`` or ``"loop"``; see the module docstring.
    ``tokens_per_expert`` only has to be on the device the call will use.
    """
    if _torch_grouped_mm_ok(x, weight, transpose_weight):
        return "torch"
    tensors = [t for t in (x, weight, tokens_per_expert) if t is not None]
    if x.dtype in _TRITON_DTYPES and weight.dtype in _TRITON_DTYPES and can_use_triton(*tensors):
        return "triton"
    return "loop"


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _loop_grouped_mm(x, weight, tokens_per_expert, transpose_weight):
    counts = tokens_per_expert.tolist()  # one host sync
    if sum(counts) != x.shape[0]:
        raise ValueError(
            f"tokens_per_expert sums to {sum(counts)} but x has {x.shape[0]} rows; "
            "pass the counts of moe_permute's output"
        )
    outs = []
    for e, x_e in enumerate(torch.split(x, counts)):
        w_e = weight[e].transpose(0, 1) if transpose_weight else weight[e]
        outs.append(x_e @ w_e)
    if not outs:
        n_dim = weight.shape[1] if transpose_weight else weight.shape[2]
        return x.new_empty((0, n_dim))
    return torch.cat(outs)


class _TorchGroupedMM(torch.autograd.Function):
    """``torch._grouped_mm`` with the backward torch's autograd forms, plus zero-group guards."""

    @staticmethod
    def forward(ctx, x, weight, tokens_per_expert, transpose_weight):
        offs = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)
        x = x.contiguous()
        mat_b = weight.transpose(-2, -1) if transpose_weight else weight
        ctx.save_for_backward(x, weight, offs, tokens_per_expert)
        ctx.transpose_weight = transpose_weight
        return torch._grouped_mm(x, mat_b, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, weight, offs, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        mat_b = weight.transpose(-2, -1) if ctx.transpose_weight else weight
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, mat_b.transpose(-2, -1), offs=offs)
        if ctx.needs_input_grad[1]:
            if ctx.transpose_weight:  # weight [E, N, K]: dw[e] = dy_e^T @ x_e
                dw = torch._grouped_mm(dy.t(), x, offs=offs)
            else:  # weight [E, K, N]: dw[e] = x_e^T @ dy_e
                dw = torch._grouped_mm(x.t(), dy, offs=offs)
            dw = dw.masked_fill((counts == 0).view(-1, 1, 1), 0)
        return dx, dw, None, None


class _TritonGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, tokens_per_expert, transpose_weight):
        from forge_kernels.moe import grouped_gemm_triton as kernels

        counts = tokens_per_expert.to(torch.int64).contiguous()
        mat_b = weight.transpose(-2, -1) if transpose_weight else weight  # logical [E, K, N]
        y = kernels.grouped_mm_fwd(x, mat_b, counts, out_dtype=x.dtype)
        kernels.KERNEL_LAUNCHES["grouped_mm_fwd"] += 1
        ctx.save_for_backward(x, weight, counts)
        ctx.transpose_weight = transpose_weight
        return y

    @staticmethod
    def backward(ctx, dy):
        from forge_kernels.moe import grouped_gemm_triton as kernels

        x, weight, counts = ctx.saved_tensors
        mat_b = weight.transpose(-2, -1) if ctx.transpose_weight else weight
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = kernels.grouped_mm_fwd(dy, mat_b.transpose(-2, -1), counts, out_dtype=x.dtype)
            kernels.KERNEL_LAUNCHES["grouped_mm_dx"] += 1
        if ctx.needs_input_grad[1]:
            offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
            torch.cumsum(counts, dim=0, out=offsets[1:])
            dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
            dw_view = dw.transpose(-2, -1) if ctx.transpose_weight else dw  # logical [E, K, N]
            kernels.grouped_mm_dw(x, dy, offsets, dw_view)
            kernels.KERNEL_LAUNCHES["grouped_mm_dw"] += 1
        return dx, dw, None, None


def grouped_mm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    transpose_weight: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Eager loop over experts (``backend`` is ignored); the numerics of :func:`grouped_mm`."""
    _check_args(x, weight, tokens_per_expert, transpose_weight)
    return _loop_grouped_mm(x, weight, tokens_per_expert, transpose_weight)


def _grouped_mm_default(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    transpose_weight: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    _check_args(x, weight, tokens_per_expert, transpose_weight)
    if backend not in _BACKENDS:
        raise ValueError(f"grouped_mm backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = grouped_mm_backend(
            x, weight, tokens_per_expert, transpose_weight=transpose_weight
        )
    elif backend == "torch" and not hasattr(torch, "_grouped_mm"):
        raise ValueError("backend='torch' needs torch._grouped_mm (torch >= 2.8); use 'auto'")
    elif backend == "triton" and not can_use_triton(x, weight, tokens_per_expert):
        raise ValueError(
            "backend='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
            "use backend='auto' to fall back"
        )
    BACKEND_CALLS[backend] += 1
    if backend == "torch":
        if x.shape[0] == 0:  # _grouped_mm rejects a zero-length contraction in the backward
            return _loop_grouped_mm(x, weight, tokens_per_expert, transpose_weight)
        return _TorchGroupedMM.apply(x, weight, tokens_per_expert, transpose_weight)
    if backend == "triton":
        return _TritonGroupedMM.apply(x, weight, tokens_per_expert, transpose_weight)
    return _loop_grouped_mm(x, weight, tokens_per_expert, transpose_weight)


registry.define_op(
    "grouped_mm",
    default=_grouped_mm_default,
    reference=grouped_mm_reference,
    doc="Grouped GEMM over experts on rows sorted by expert (MegaBlocks-style, dropless).",
)


def grouped_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    *,
    transpose_weight: bool = False,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ weight[e]`` for rows sorted by expert.

    Args:
        x: ``[T, K]`` rows sorted by expert (``MoEPermutation.hidden``).
        weight: ``[E, K, N]``, or ``[E, N, K]`` (``nn.Linear`` layout, as transformers'
            ``gate_up_proj`` / ``down_proj``) with ``transpose_weight=True``; ``x``'s dtype.
        tokens_per_expert: ``[E]`` integer row counts (``MoEPermutation.tokens_per_expert``),
            summing to ``T`` (checked only by the loop backend: the others would need a host
            sync); zeros are fine.
        transpose_weight: read ``weight`` as ``[E, N, K]``.
        backend: ``"auto"`` (see :func:`grouped_mm_backend`), or force ``"torch"``, ``"triton"``
            or ``"loop"``.

    Returns:
        ``[T, N]`` in ``x``'s dtype, differentiable w.r.t. ``x`` and ``weight``.

    Under ``torch.autocast``, ``x`` and ``weight`` are cast to the autocast dtype first, as
    torch casts a matmul's inputs (an fp32 expert weight with bf16 tokens).

    Dispatches through ``registry.get_op("grouped_mm")``.
    """
    x, weight = autocast_inputs(x, weight)
    return registry.get_op("grouped_mm")(
        x, weight, tokens_per_expert, transpose_weight=transpose_weight, backend=backend
    )
