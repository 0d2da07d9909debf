"""FP8 scaling recipes and quantize / dequantize for per-tensor and block-wise scaling.

FP8 (Micikevicius et al., 2022, "FP8 Formats for Deep Learning", arXiv:2209.05433) has two
encodings: E4M3 (``torch.float8_e4m3fn``: largest finite value 448, 3 mantissa bits) for weights
and activations, and E5M2 (``torch.float8_e5m2``: 57344, 2 mantissa bits, more range) for
gradients. Using E4M3 forward and E5M2 backward is the "hybrid" format. A tensor is stored as FP8
data ``q`` and an fp32 ``scale_inv`` with ``x ≈ q * scale_inv``; quantization is
``q = cast(clamp(x * scale, -fp8_max, fp8_max))`` with ``scale = fp8_max / amax``, rounding to
nearest-even and saturating at ``fp8_max`` (values beyond it clamp, they never become inf/NaN).

Three recipes choose ``amax``:

- :class:`Fp8CurrentScaling`: the amax of the tensor being cast ("current" or dynamic per-tensor
  scaling; Transformer Engine's ``Float8CurrentScaling``).
- :class:`Fp8DelayedScaling`: the amax of the *previous* ``amax_history_len`` casts of the same
  tensor, kept in a :class:`DelayedScalingState` (Transformer Engine's ``DelayedScaling`` recipe,
  see its docs, "Using FP8 with Transformer Engine": the scale used at step t comes from the
  amax history up to step t-1, so a spike at step t saturates once and widens the next scales).
- :class:`Fp8BlockwiseScaling`: one scale per 1x128 tile of activations and gradients (per token,
  per 128 channels) and per 128x128 block of weights, as in the DeepSeek-V3 technical report
  (DeepSeek-AI, 2024, arXiv:2412.19437, section 3.3 "FP8 Training"), which uses E4M3 everywhere.

Block-wise quantization handles shapes that are not multiples of the block: the last blocks are
partial and their amax is taken over the elements that exist. On CUDA (compute capability >= 8.9)
it runs as one Triton kernel (amax, scale, cast and scale store in one pass), and per-tensor
quantization as two (an amax reduction, then one pass that casts and can also write the
transposed copy the backward GEMMs take). The kernels (:mod:`forge_kernels.fp8.quantize_kernels`)
are imported on first use only, so importing this module does not import Triton.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, TypeVar

import torch

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    #: Where a per-tensor amax is all-reduced (max): one process group, several (a tensor split
    #: over their product: reduced over each in turn) or none (a whole tensor).
    AmaxGroup = ProcessGroup | tuple[ProcessGroup, ...] | None

from forge_kernels._triton_support import can_use_triton, triton_interpret_mode

_T = TypeVar("_T")

__all__ = [
    "FP8_E4M3",
    "FP8_E5M2",
    "DelayedForwardScales",
    "DelayedScalingState",
    "Fp8AmaxGroups",
    "Fp8BlockwiseScaling",
    "Fp8CurrentScaling",
    "Fp8DelayedScaling",
    "Fp8Recipe",
    "Fp8Tensor",
    "amax_to_scale",
    "dequantize",
    "fp8_max",
    "quantize_blockwise",
    "quantize_blockwise_reference",
    "quantize_tensorwise",
    "resolve_recipe",
    "tensor_amax",
]

FP8_E4M3 = torch.float8_e4m3fn
FP8_E5M2 = torch.float8_e5m2
_FP8_DTYPES = (FP8_E4M3, FP8_E5M2)

#: (mantissa bits, smallest normal exponent) of each format, for the interpreter's rounding.
_FP8_BITS = {FP8_E4M3: (3, -6), FP8_E5M2: (2, -14)}

#: Triton launches by kernel name, so tests can check the kernel really ran.
KERNEL_LAUNCHES: collections.Counter[str] = collections.Counter()


def fp8_max(dtype: torch.dtype) -> float:
    """Largest finite value of an FP8 dtype: 448 for E4M3, 57344 for E5M2."""
    if dtype not in _FP8_DTYPES:
        raise ValueError(f"expected torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
    return float(torch.finfo(dtype).max)


# ============================================================================================
# Recipes
# ============================================================================================

Fp8Format = Literal["hybrid", "e4m3"]


def _check_format(fp8_format: str) -> None:
    if fp8_format not in ("hybrid", "e4m3"):
        raise ValueError(
            f"fp8_format must be 'hybrid' (E4M3 forward, E5M2 gradients) or 'e4m3' (E4M3 "
            f"everywhere), got {fp8_format!r}"
        )


@dataclass(frozen=True, kw_only=True)
class _RecipeBase:
    fp8_format: Fp8Format = "hybrid"

    def __post_init__(self) -> None:
        _check_format(self.fp8_format)

    @property
    def forward_dtype(self) -> torch.dtype:
        """FP8 dtype of activations and weights: always E4M3."""
        return FP8_E4M3

    @property
    def grad_dtype(self) -> torch.dtype:
        """FP8 dtype of output gradients: E5M2 in the hybrid format, else E4M3."""
        return FP8_E5M2 if self.fp8_format == "hybrid" else FP8_E4M3


@dataclass(frozen=True, kw_only=True)
class Fp8CurrentScaling(_RecipeBase):
    """Per-tensor scaling from the amax of the tensor being cast ("current scaling").

    One amax reduction per cast (no host sync: amax and scale stay on the device).
    """

    name: Literal["current"] = field(default="current", init=False)


@dataclass(frozen=True, kw_only=True)
class Fp8DelayedScaling(_RecipeBase):
    """Per-tensor scaling from an amax history, as Transformer Engine's ``DelayedScaling``.

    Args:
        fp8_format: ``"hybrid"`` (E4M3 forward, E5M2 gradients) or ``"e4m3"``.
        margin: the scale is ``fp8_max / amax / 2**margin`` (headroom for growing values).
        amax_history_len: how many past casts the history window holds.
        amax_compute_algo: ``"max"`` of the window or the ``"most_recent"`` amax.
    """

    name: Literal["delayed"] = field(default="delayed", init=False)
    margin: int = 0
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.amax_compute_algo not in ("max", "most_recent"):
            raise ValueError(
                f"amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}"
            )
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")


@dataclass(frozen=True, kw_only=True)
class Fp8BlockwiseScaling(_RecipeBase):
    """DeepSeek-V3 fine-grained scaling: 1 x block_size tiles for activations and gradients,
    block_size x block_size blocks for weights, fp32 scales (DeepSeek-V3 report, section 3.3).

    The default format is E4M3 for every tensor, as in the report (the fine-grained scales give
    gradients enough range without E5M2). The real GEMM (``torch._scaled_mm`` with
    ``BlockWise1x128`` / ``BlockWise128x128`` scales) needs ``block_size == 128`` and sm90.
    """

    name: Literal["blockwise"] = field(default="blockwise", init=False)
    fp8_format: Fp8Format = "e4m3"
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


Fp8Recipe = Fp8CurrentScaling | Fp8DelayedScaling | Fp8BlockwiseScaling

_RECIPES_BY_NAME = {
    "current": Fp8CurrentScaling,
    "tensorwise": Fp8CurrentScaling,
    "delayed": Fp8DelayedScaling,
    "blockwise": Fp8BlockwiseScaling,
    "deepseek": Fp8BlockwiseScaling,
}


def resolve_recipe(recipe: str | Fp8Recipe) -> Fp8Recipe:
    """A recipe object from itself or a name: current (tensorwise), delayed, blockwise (deepseek)."""
    if isinstance(recipe, Fp8CurrentScaling | Fp8DelayedScaling | Fp8BlockwiseScaling):
        return recipe
    if isinstance(recipe, str) and recipe.lower() in _RECIPES_BY_NAME:
        return _RECIPES_BY_NAME[recipe.lower()]()
    raise ValueError(
        f"unknown FP8 recipe {recipe!r}: pass an Fp8CurrentScaling, Fp8DelayedScaling or "
        f"Fp8BlockwiseScaling, or one of the names {sorted(_RECIPES_BY_NAME)}"
    )


# ============================================================================================
# Quantized tensors
# ============================================================================================


@dataclass(frozen=True)
class Fp8Tensor:
    """A 2-D tensor in FP8: ``data`` (FP8, the source's shape) and fp32 ``scale_inv``.

    ``block`` is ``None`` for one per-tensor scale (``scale_inv`` is 0-d), else the
    ``(rows, cols)`` of a scaling block; ``scale_inv`` then has shape
    ``(ceil(rows_total / rows), ceil(cols_total / cols))`` and ``x ≈ data * scale_inv`` blockwise.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor
    block: tuple[int, int] | None = None
    data_t: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def t(self) -> Fp8Tensor:
        """The transpose: a view of the data, or the row-major ``data_t`` copy when one was
        written with it (the quantizer can emit both layouts in one pass, so the transposed GEMM
        operands of the backward need no extra copy); block scales are transposed along."""
        data = self.data.t() if self.data_t is None else self.data_t
        data_t = None if self.data_t is None else self.data
        if self.block is None:
            return Fp8Tensor(data, self.scale_inv, None, data_t)
        return Fp8Tensor(data, self.scale_inv.t(), (self.block[1], self.block[0]), data_t)

    def expanded_scale_inv(self) -> torch.Tensor:
        """``scale_inv`` broadcast to one value per element (0-d for a per-tensor scale)."""
        if self.block is None:
            return self.scale_inv
        rows, cols = self.data.shape
        s = self.scale_inv.repeat_interleave(self.block[0], dim=0)[:rows]
        return s.repeat_interleave(self.block[1], dim=1)[:, :cols]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale_inv`` in fp32, then cast to ``dtype``."""
        return (self.data.float() * self.expanded_scale_inv()).to(dtype)


def dequantize(t: Fp8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Functional form of :meth:`Fp8Tensor.dequantize`."""
    return t.dequantize(dtype)


def amax_to_scale(
    amax: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    margin: int = 0,
    fallback: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """``fp8_max / amax / 2**margin`` in fp32, or ``fallback`` where amax is 0 or not finite.

    (As Transformer Engine's scale update: an all-zero or inf/NaN tensor keeps the old scale.)
    """
    amax = amax.float()
    ok = (amax > 0) & torch.isfinite(amax)
    safe_amax = torch.where(ok, amax, 1.0)
    # A true division (``float / tensor`` would be a reciprocal and a multiply: two roundings),
    # so the eager path and the Triton kernel (``div_rn``) agree to the bit.
    scale = torch.full_like(safe_amax, fp8_max(fp8_dtype)) / safe_amax
    if margin:
        scale = scale / (2.0**margin)
    scale = torch.where(torch.isfinite(scale), scale, torch.finfo(torch.float32).max)
    if isinstance(fallback, torch.Tensor):
        fallback = fallback.float()
    return torch.where(ok, scale, fallback)


@dataclass(frozen=True, kw_only=True)
class Fp8AmaxGroups:
    """For each operand of an FP8 linear, the process group over which it is sharded, or None.

    A per-tensor scale comes from the amax of the *whole* tensor. Under tensor parallelism a
    rank holds a shard of some operands: a column-parallel layer's weight rows and output
    gradient columns, a row-parallel layer's weight and input columns. Their amax is then
    all-reduced (max) over the group, so every rank casts with the scale one process computes
    (Transformer Engine reduces amaxes over its ``amax_reduction_group``; torchao takes amax
    of DTensors). ``input``: the activation ``x``; ``weight``; ``grad``: the output gradient.

    ``tokens``: the group(s) over which the layer's *tokens* are split (context parallelism's
    sequence shards; a layer run whole on each rank's sequence shard under sequence
    parallelism). The input and the output gradient are then row shards of one process's
    tensors, so their amax is reduced over ``tokens`` as well; the weight is whole.

    Block-wise scaling needs no reduction when every block lies in one shard.
    """

    input: ProcessGroup | None = None
    weight: ProcessGroup | None = None
    grad: ProcessGroup | None = None
    tokens: ProcessGroup | tuple[ProcessGroup, ...] | None = None

    def for_role(self, role: int) -> tuple[ProcessGroup, ...] | None:
        """The groups of operand ``role`` (0: input, 1: weight, 2: output gradient), or None
        when it is whole: its sharding group, then (input and gradient) the token groups."""
        sharded = (self.input, self.weight, self.grad)[role]
        groups = () if sharded is None else (sharded,)
        if role != 1:
            groups += _group_tuple(self.tokens)
        return groups or None


def _group_tuple(group: AmaxGroup) -> tuple[ProcessGroup, ...]:
    if group is None:
        return ()
    return tuple(group) if isinstance(group, tuple | list) else (group,)


def tensor_amax(x: torch.Tensor, *, group: AmaxGroup = None) -> torch.Tensor:
    """``max |x|`` in fp32; with ``group`` (one or several process groups), of the whole
    tensor that ``x`` is this rank's shard of (an all-reduce max over each group; a NaN becomes
    inf first, which ``amax_to_scale`` treats alike, so the result does not depend on how the
    collective orders NaN)."""
    amax = x.detach().abs().amax().float()
    groups = _group_tuple(group)
    if not groups:
        return amax
    import torch.distributed as dist

    amax = torch.nan_to_num(amax, nan=math.inf)
    for one in groups:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=one)
    return amax


def _cast_scaled(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    limit = fp8_max(fp8_dtype)
    # Out of place: under a selective activation-checkpoint policy that saves the product (one
    # that saves every op but a few), a clamp_ would write into the saved copy, which
    # forge-parallel refuses and PyTorch's cache reports as mutated in backward.
    return torch.clamp(x.float() * scale, -limit, limit).to(fp8_dtype)


def quantize_tensorwise(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    *,
    scale: torch.Tensor | None = None,
    transpose: bool = False,
    use_triton: bool | None = None,
    amax_group: AmaxGroup = None,
) -> Fp8Tensor:
    """Quantize with one scale: ``scale`` if given (delayed scaling), else from ``x``'s amax
    (with ``amax_group``: the amax of the whole tensor ``x`` is a shard of, see
    :class:`Fp8AmaxGroups`).

    Values beyond ``fp8_max / scale`` saturate to ``±fp8_max``. ``transpose=True`` (2-D ``x``)
    also writes ``data_t``, the row-major transpose, which the weight- and input-gradient GEMMs
    take as operands.

    ``use_triton=None`` runs two fused Triton kernels (an amax reduction, then one pass that
    scales, casts and writes both layouts) on CUDA devices with FP8 casts (sm89+) and the eager
    ops elsewhere; ``True`` forces the kernels (on CPU that needs ``TRITON_INTERPRET=1``). Both
    give identical bits. The eager path is a dozen launches and several full passes over ``x``.
    """
    if fp8_dtype not in _FP8_DTYPES:
        raise ValueError(f"expected an FP8 dtype, got {fp8_dtype}")
    usable = x.dim() == 2 and _triton_quant_usable(x)
    if use_triton is None:
        use_triton = x.device.type == "cuda" and usable
    elif use_triton and not usable:
        raise ValueError(
            f"the Triton tensor-wise quantizer cannot run here (shape {tuple(x.shape)}, dtype "
            f"{x.dtype}, device {x.device}): it needs a 2-D float input and CUDA with compute "
            "capability >= 8.9 or TRITON_INTERPRET=1 on CPU"
        )
    if scale is None and amax_group is not None:
        scale = amax_to_scale(tensor_amax(x, group=amax_group), fp8_dtype)
    if use_triton and x.numel() > 0:
        return _quantize_tensorwise_triton(x.detach(), fp8_dtype, scale, transpose)
    if scale is None:
        scale = amax_to_scale(x.detach().abs().amax(), fp8_dtype)
    scale = scale.float().reshape(())
    q = _cast_scaled(x, scale, fp8_dtype)
    q_t = q.t().contiguous() if transpose else None
    return Fp8Tensor(q, scale.reciprocal(), None, q_t)


def _check_block(x: torch.Tensor, block: tuple[int, int]) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"block-wise quantization takes a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = (int(b) for b in block)
    if rows < 1 or cols < 1:
        raise ValueError(f"block must be two positive sizes, got {block}")
    return rows, cols


def quantize_blockwise_reference(
    x: torch.Tensor, fp8_dtype: torch.dtype, block: tuple[int, int]
) -> Fp8Tensor:
    """Eager block-wise quantization: one scale per ``block`` (e.g. (1, 128) or (128, 128)).

    Pads to whole blocks with zeros (which do not change any block's amax), quantizes, crops.
    """
    br, bc = _check_block(x, block)
    rows, cols = x.shape
    nbr, nbc = math.ceil(rows / br), math.ceil(cols / bc)
    xp = x.detach().float()
    if nbr * br != rows or nbc * bc != cols:
        xp = torch.nn.functional.pad(xp, (0, nbc * bc - cols, 0, nbr * br - rows))
    blocks = xp.view(nbr, br, nbc, bc)
    scale = amax_to_scale(blocks.abs().amax(dim=(1, 3)), fp8_dtype)  # (nbr, nbc)
    q = _cast_scaled(blocks, scale[:, None, :, None], fp8_dtype)
    q = q.view(nbr * br, nbc * bc)[:rows, :cols].contiguous()
    return Fp8Tensor(q, scale.reciprocal(), (br, bc))


def _triton_quant_usable(x: torch.Tensor) -> bool:
    """The Triton quantizers take float inputs; their FP8 casts need sm89+ on CUDA."""
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not can_use_triton(x):
        return False
    return x.device.type != "cuda" or torch.cuda.get_device_capability(x.device) >= (8, 9)


def _triton_block_quant_usable(x: torch.Tensor, block: tuple[int, int]) -> bool:
    """Triton kernel: power-of-two blocks that are a row tile or square; fp8 casts need sm89+."""
    br, bc = block
    shape_ok = (
        (br == 1 and _is_pow2(bc)) or (bc == 1 and _is_pow2(br)) or (br == bc and _is_pow2(br))
    )
    return shape_ok and _triton_quant_usable(x)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def quantize_blockwise(
    x: torch.Tensor,
    fp8_dtype: torch.dtype,
    block: tuple[int, int] = (1, 128),
    *,
    use_triton: bool | None = None,
) -> Fp8Tensor:
    """Quantize a 2-D tensor with one fp32 scale per ``block`` (DeepSeek-V3 fine-grained scaling).

    ``(1, 128)``: per row (token), per 128 columns (channels) - activations and gradients as the
    left GEMM operand. ``(128, 1)``: the same along columns - the layout the weight-gradient GEMM
    needs (it contracts over tokens). ``(128, 128)``: weights. Partial edge blocks are fine.

    ``use_triton=None`` runs the fused Triton kernel on CUDA devices with FP8 casts (sm89+) and
    the eager :func:`quantize_blockwise_reference` elsewhere; ``True`` forces the kernel (on CPU
    that needs ``TRITON_INTERPRET=1``), ``False`` forces the eager path. Both give identical bits.
    """
    block = _check_block(x, block)
    if fp8_dtype not in _FP8_DTYPES:
        raise ValueError(f"expected an FP8 dtype, got {fp8_dtype}")
    if use_triton is None:
        use_triton = x.device.type == "cuda" and _triton_block_quant_usable(x, block)
    elif use_triton and not _triton_block_quant_usable(x, block):
        raise ValueError(
            f"the Triton block quantizer cannot run here (block {block}, dtype {x.dtype}, device "
            f"{x.device}): it needs power-of-two row, column or square blocks, a float input, and "
            "CUDA with compute capability >= 8.9 or TRITON_INTERPRET=1 on CPU"
        )
    if not use_triton or x.numel() == 0:
        return quantize_blockwise_reference(x, fp8_dtype, block)
    return _quantize_blockwise_triton(x.detach(), fp8_dtype, block)


# ============================================================================================
# Triton kernel (compiled on first use)
# ============================================================================================


def _round_constants(x: torch.Tensor, fp8_dtype: torch.dtype) -> dict:
    """Compile-time arguments every quantize kernel takes."""
    mantissa_bits, min_exp = _FP8_BITS[fp8_dtype]
    return {
        "FP8_MAX": fp8_max(fp8_dtype),
        "ROUND_IN_FP32": triton_interpret_mode() and x.device.type == "cpu",
        "MANTISSA_BITS": mantissa_bits,
        "MIN_EXP": min_exp,
    }


def _quantize_tensorwise_triton(
    x: torch.Tensor, fp8_dtype: torch.dtype, scale: torch.Tensor | None, transpose: bool
) -> Fp8Tensor:
    from forge_kernels.fp8 import quantize_kernels as kernels  # lazy: imports triton

    rows, cols = x.shape
    block_r, block_c = 64, 64
    grid = (math.ceil(rows / block_r), math.ceil(cols / block_c))
    if scale is None:
        scale_src = torch.zeros((), dtype=torch.float32, device=x.device)  # the amax
        kernels.tensor_amax_kernel[grid](
            x, scale_src, rows, cols, x.stride(0), x.stride(1), BLOCK_R=block_r, BLOCK_C=block_c
        )
        KERNEL_LAUNCHES["fp8_tensor_amax"] += 1
    else:
        scale_src = scale.detach().to(device=x.device, dtype=torch.float32).reshape(())
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    q_t = torch.empty((cols, rows), dtype=fp8_dtype, device=x.device) if transpose else q
    scale_inv = torch.empty((), dtype=torch.float32, device=x.device)
    kernels.tensor_cast_kernel[grid](
        x, q, q_t, scale_src, scale_inv, rows, cols, x.stride(0), x.stride(1),
        FROM_AMAX=scale is None, WRITE_T=transpose, BLOCK_R=block_r, BLOCK_C=block_c,
        **_round_constants(x, fp8_dtype),
        num_warps=4,
        enable_fp_fusion=False,  # bit-exact x * scale, as the eager path (and no Triton warning)
    )  # fmt: skip
    KERNEL_LAUNCHES["fp8_tensor_cast"] += 1
    return Fp8Tensor(q, scale_inv, None, q_t if transpose else None)


def _quantize_blockwise_triton(
    x: torch.Tensor, fp8_dtype: torch.dtype, block: tuple[int, int]
) -> Fp8Tensor:
    from forge_kernels.fp8.quantize_kernels import block_quant_kernel as kernel  # lazy

    br, bc = block
    column_blocks = bc == 1 and br > 1
    # (128, 1) blocks are (1, 128) blocks of the transpose: quantize x.t() into a contiguous
    # (cols, rows) buffer, which is also the layout the weight-gradient GEMM wants.
    src = x.t() if column_blocks else x
    if column_blocks:
        br, bc = bc, br
    rows, cols = src.shape
    per_row = br == 1
    n_rb, n_cb = math.ceil(rows / br), math.ceil(cols / bc)
    q = torch.empty((rows, cols), dtype=fp8_dtype, device=x.device)
    s = torch.empty((n_rb, n_cb), dtype=torch.float32, device=x.device)
    constants = _round_constants(x, fp8_dtype)
    tile_rows = (32 if constants["ROUND_IN_FP32"] else 16) if per_row else br
    grid = (math.ceil(rows / tile_rows), n_cb)
    kernel[grid](
        src, q, s, rows, cols,
        src.stride(0), src.stride(1), q.stride(0), s.stride(0), s.stride(1),
        BLOCK_R=tile_rows, BLOCK_C=bc, PER_ROW=per_row, **constants,
        num_warps=4 if per_row else 8,
        enable_fp_fusion=False,  # bit-exact x * scale, as the eager path (and no Triton warning)
    )  # fmt: skip
    KERNEL_LAUNCHES["fp8_block_quant"] += 1
    if column_blocks:
        return Fp8Tensor(q.t(), s.t(), block)
    return Fp8Tensor(q, s, block)


# ============================================================================================
# Delayed scaling state
# ============================================================================================


def _saved_tensors_hooks_active() -> bool:
    """Whether saved-tensor hooks are active, as in the first pass of a non-reentrant activation
    checkpoint (True where this torch has no way to tell: queueing a forward that is never
    recomputed only costs the queue a slot)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _keys_ops_like_selective_checkpoint(mode: object) -> bool:
    """Whether dispatch ``mode`` keys ops by ``(op, n-th call of that op)`` in a checkpointed
    forward: PyTorch's selective-checkpoint cache (its forward's caching mode, its
    recomputation's cached mode), or a mode that says it sees ops as that cache does
    (``sees_ops_like_selective_checkpoint``: forge-parallel's auto-recompute measurement,
    whose per-op keys must match its policy's)."""
    if getattr(mode, "sees_ops_like_selective_checkpoint", False):
        return True
    from torch.utils import checkpoint as torch_checkpoint

    names = ("_CachingTorchDispatchMode", "_CachedTorchDispatchMode")
    kinds = tuple(getattr(torch_checkpoint, n) for n in names if hasattr(torch_checkpoint, n))
    return isinstance(mode, kinds)


def _unseen_by_selective_checkpoint(fn: Callable[..., _T], *args: object) -> _T:
    """``fn(*args)``, run outside the dispatch modes when a selective activation checkpoint's
    is among them: delayed scaling's bookkeeping (the copy of the scales a forward casts
    with; the amax of a cast operand, its reduction over the amax group, the history and
    scale update).

    PyTorch's selective-checkpoint cache keys each op by how many calls of that op came
    before it in the checkpointed forward, and hands the recomputation the output cached
    under the same key. The recomputation of a delayed-scaling forward casts with the scales
    of the forward it replays and does none of this bookkeeping (it would update the state
    a second time), so had the cache seen the bookkeeping ops, every later call of the same
    op (``mul``, ``abs``, ``amax``, ``_to_copy``, ``clone``, an all-reduce) would be looked up
    under a key shifted by them: another op's cached output (``isfinite``'s bool product
    cast as an operand: "result type Float can't be cast to the desired output type bool";
    silently wrong values where the dtypes happen to agree). Unseen, the forward and its
    recomputation issue the same ops. The bookkeeping writes only the state (whose writes a
    checkpoint must not replay anyway) and makes scalars; every dispatch mode active at that
    point is left out of it, not only the checkpoint's (a ``FlopCounterMode`` around a step
    with selective recompute does not count these few scalar ops). Under ``torch.compile``
    (AOTAutograd's functional recomputation applies the update once) and without such a
    mode, ``fn`` runs as it is."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    if torch.compiler.is_compiling() or not any(
        _keys_ops_like_selective_checkpoint(mode) for mode in _get_current_dispatch_mode_stack()
    ):
        return fn(*args)
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        return fn(*args)


@dataclass(eq=False)
class DelayedForwardScales:
    """The scales one forward casts its input and weight with (rows of the state's ``scale``).

    Made by :meth:`DelayedScalingState.begin_forward`. ``replayed``: this forward is an
    activation-checkpointing recomputation, which casts with the scales the original forward
    used (``scale`` is that forward's copy) and leaves the amax history and scales alone.
    ``holds_node``: the forward is queued and records an autograd node (grad mode on and an
    input requires grad), which drops it from the queue (:meth:`DelayedScalingState.release`).
    Compared by identity (the queue removes exactly this forward's entry).
    """

    scale: torch.Tensor
    replayed: bool = False
    holds_node: bool = False


class DelayedScalingState:
    """Amax histories and current scales of ``n_tensors`` tensors under delayed scaling.

    ``amax_history`` is ``(n_tensors, history_len)`` and ``scale`` is ``(n_tensors,)``, both fp32
    on the device; pass buffers of a module to have them checkpointed (``Fp8Linear`` does). The
    update follows Transformer Engine: the cast at step t uses ``scale`` (from steps < t), then
    records its amax in slot 0 of the history, recomputes ``scale = fp8_max / amax / 2**margin``
    from the window (``max`` of it, or slot 0 for ``most_recent``; the old scale is kept when that
    amax is 0 or not finite), and rolls the window so slot 0 is free for the next step.

    Activation checkpointing runs a forward twice: once in the forward pass, once again in the
    backward pass to rebuild what it saved. The recomputation must cast with the scales of the
    first run (so its activations and FP8 operands are bit-identical to the ones it replaces)
    and must not record its amaxes a second time (the history would roll twice per step and the
    next step's scales would differ from a run without recompute). ``pending`` holds, oldest
    first, the scales of forwards that may still be recomputed; :meth:`begin_forward` queues
    them and hands them back to the recomputation (see there how a recomputation is told apart).
    A module that rebuilds this wrapper around its buffers on every call passes the same
    ``pending`` deque each time (``Fp8Linear`` does). Under selective checkpointing (PyTorch's
    per-op cache, which forge-parallel's selective and auto recompute use) the bookkeeping the
    recomputation skips runs unseen by the cache, so the forward and its recomputation issue
    the same ops (:func:`_unseen_by_selective_checkpoint`).
    """

    #: The most forwards whose scales wait for a recomputation: far above the forwards in
    #: flight at once (the micro-batches of a pipeline schedule). A queued forward without an
    #: autograd node that is never replayed (a frozen layer's, under activation offloading's
    #: saved-tensor hooks without a checkpoint) leaves the queue only through this bound.
    MAX_PENDING = 1024

    def __init__(
        self,
        amax_history: torch.Tensor,
        scale: torch.Tensor,
        *,
        pending: collections.deque[DelayedForwardScales] | None = None,
    ) -> None:
        if amax_history.dim() != 2 or scale.shape != amax_history.shape[:1]:
            raise ValueError(
                "amax_history must be (n_tensors, history_len) and scale (n_tensors,), got "
                f"{tuple(amax_history.shape)} and {tuple(scale.shape)}"
            )
        self.amax_history = amax_history
        self.scale = scale
        self.pending = collections.deque(maxlen=self.MAX_PENDING) if pending is None else pending

    @classmethod
    def create(
        cls, n_tensors: int, history_len: int, device: torch.device | str | None = None
    ) -> DelayedScalingState:
        """A fresh state: empty histories, scale 1."""
        return cls(
            torch.zeros(n_tensors, history_len, dtype=torch.float32, device=device),
            torch.ones(n_tensors, dtype=torch.float32, device=device),
        )

    def begin_forward(self, *inputs: torch.Tensor | None) -> DelayedForwardScales:
        """The scales a forward taking ``inputs`` (its tensors: ``x, weight, bias``) casts
        with: the current ones, or, in an activation-checkpointing recomputation, those of the
        oldest forward still pending (its first run). Call it outside the autograd Function,
        where grad mode is still the caller's.

        A recomputation is a forward that runs while the autograd engine executes a backward
        pass (``torch._C._current_graph_task_id() != -1``): both flavours of
        ``torch.utils.checkpoint`` replay the forward from inside the backward, reentrant
        (``CheckpointFunction.backward`` reruns the function, then back-propagates through it)
        and non-reentrant (the unpack hook of the first saved tensor the backward needs reruns
        it; forge-parallel's recompute is this one). Counting forwards alone cannot tell a
        recomputation from the next micro-batch's forward, and a flag set by a checkpoint
        wrapper of ours would miss a plain ``torch.utils.checkpoint``. Inside a backward with
        nothing pending, a forward is an ordinary one.

        The forwards queued for a recomputation are those a checkpoint may replay: under grad
        mode, those run inside a non-reentrant checkpoint (saved-tensor hooks are active: the
        checkpoint's, or an activation-offload's; where torch does not say, every forward under
        grad mode), with or without an autograd node of their own (a frozen layer's forward is
        replayed when later ops of its block need its output); with grad mode off, those run
        inside another autograd Function's forward (grad mode and forward-mode AD both off
        there, and not under inference mode), as a reentrant checkpoint runs its first pass
        inside ``CheckpointFunction.forward``. A forward under plain ``torch.no_grad()`` or
        ``torch.inference_mode()`` (evaluation) or outside any checkpoint is not queued. A
        queued forward with an autograd node leaves the queue when that node has run its
        backward or is freed (:meth:`release`); one without, when it is replayed.

        Recomputations take the queued forwards first in, first out, as Transformer Engine's
        checkpointing does (``copy_forward_fp8_meta_tensors_for_recompute``): right for one
        forward and backward per micro-batch, gradient accumulation and pipeline schedules
        (micro-batches go backward in the order they went forward). Not covered: one layer
        called in two checkpointed blocks of one graph (the backward recomputes the later block
        first), and a reentrant checkpoint run under ``torch.no_grad()`` and never
        back-propagated (its forwards stay queued).
        """
        compiling = torch.compiler.is_compiling()  # compiled: AOTAutograd recomputes, not this
        if not compiling and torch._C._current_graph_task_id() != -1 and self.pending:
            return DelayedForwardScales(self.pending.popleft().scale, replayed=True)
        # Unseen by a selective checkpoint: its recomputation takes the scales from the queue.
        forward = DelayedForwardScales(_unseen_by_selective_checkpoint(self._scale_copy))
        if compiling:
            return forward
        if torch.is_grad_enabled():
            queue = _saved_tensors_hooks_active()
            forward.holds_node = queue and any(t is not None and t.requires_grad for t in inputs)
        else:
            queue = not torch._C._is_fwd_grad_enabled() and not torch.is_inference_mode_enabled()
        if queue:
            self.pending.append(forward)
        return forward

    def _scale_copy(self) -> torch.Tensor:
        return self.scale.detach().clone()

    def _record(self, index, x, fp8_dtype, recipe, amax_group) -> None:
        self.update(index, tensor_amax(x, group=amax_group), fp8_dtype, recipe)

    def release(self, forward: DelayedForwardScales) -> None:
        """Drop ``forward`` from the pending queue (if still there): its autograd node ran its
        backward or was freed, so nothing will recompute it any more."""
        if any(queued is forward for queued in self.pending):
            self.pending.remove(forward)

    @torch.no_grad()
    def quantize(
        self,
        index: int,
        x: torch.Tensor,
        fp8_dtype: torch.dtype,
        recipe: Fp8DelayedScaling,
        *,
        transpose: bool = False,
        amax_group: AmaxGroup = None,
        forward: DelayedForwardScales | None = None,
    ) -> Fp8Tensor:
        """Cast ``x`` with tensor ``index``'s current scale, then update its history and scale.

        ``transpose`` also writes the transposed copy (see :func:`quantize_tensorwise`);
        ``amax_group``: ``x`` is a shard over this group (or these), the history records the
        amax of the whole tensor (every rank keeps the same history, that of one process).
        ``forward`` (from :meth:`begin_forward`): cast with its scale instead; if it is a
        recomputation, leave the history and scales alone (and skip the amax reduction, which
        every rank skips alike)."""
        scale = self.scale[index].clone() if forward is None else forward.scale[index]
        q = quantize_tensorwise(x, fp8_dtype, scale=scale, transpose=transpose)
        if forward is None or not forward.replayed:
            # Unseen by a selective checkpoint, as its recomputation does not do it.
            _unseen_by_selective_checkpoint(self._record, index, x, fp8_dtype, recipe, amax_group)
        return q

    @torch.no_grad()
    def update(
        self, index: int, amax: torch.Tensor, fp8_dtype: torch.dtype, recipe: Fp8DelayedScaling
    ) -> None:
        """Record ``amax`` as the newest entry of tensor ``index`` and recompute its scale."""
        history = self.amax_history[index]
        if history.numel() != recipe.amax_history_len:
            raise ValueError(
                f"this state holds {history.numel()} amax steps but the recipe asks for "
                f"amax_history_len={recipe.amax_history_len}"
            )
        history[0] = amax.float()
        window_amax = history.amax() if recipe.amax_compute_algo == "max" else history[0]
        self.scale[index] = amax_to_scale(
            window_amax, fp8_dtype, margin=recipe.margin, fallback=self.scale[index]
        )
        history.copy_(torch.roll(history, -1))
        history[0] = 0.0
