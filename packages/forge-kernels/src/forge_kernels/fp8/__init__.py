"""FP8 training linears: scaling recipes, quantization, FP8 GEMMs, model conversion and a
calibrated policy for when FP8 pays off.

- :mod:`~forge_kernels.fp8.quantize`: E4M3/E5M2 casts with per-tensor current or delayed scaling
  (Transformer Engine's recipes) and DeepSeek-V3 block-wise scaling (1x128 / 128x128).
- :mod:`~forge_kernels.fp8.linear`: :func:`fp8_linear` (registered as op ``"fp8_linear"``),
  :class:`Fp8Linear` and :func:`convert_to_fp8`; real ``torch._scaled_mm`` GEMMs on FP8 GPUs,
  exact FP8 emulation elsewhere.
- :mod:`~forge_kernels.fp8.tensor_parallel`: ``Fp8Linear`` split by tensor-parallel styles
  computes on its shards, per-tensor amaxes all-reduced over the group (:class:`Fp8AmaxGroups`).
- :mod:`~forge_kernels.fp8.token_split`: ``Fp8Linear(token_group=...)`` /
  :func:`set_token_group` for layers whose tokens are split over ranks (context parallelism,
  layers run on sequence shards): input and gradient amaxes all-reduced over that group.
- :mod:`~forge_kernels.fp8.te_backend`: ``Fp8Linear(backend="te")`` on NVIDIA Transformer Engine
  (optional extra, imported only when asked for).
- :mod:`~forge_kernels.fp8.policy`: :class:`Fp8Policy` and :func:`calibrate_fp8_policy`.

References: Micikevicius et al., 2022, "FP8 Formats for Deep Learning" (arXiv:2209.05433);
DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report" (arXiv:2412.19437), section 3.3; the
Transformer Engine documentation, "Using FP8 with Transformer Engine" (delayed scaling).
"""

from forge_kernels.fp8.linear import (
    DEFAULT_SKIP_PATTERNS,
    Fp8Linear,
    convert_to_fp8,
    fp8_gemm,
    fp8_ineligible_reason,
    fp8_linear,
    fp8_linear_reference,
    scaled_mm_unsupported_reason,
)
from forge_kernels.fp8.policy import (
    CalibrationEntry,
    Fp8Policy,
    Fp8PolicyDeviceMismatchError,
    calibrate_fp8_policy,
)
from forge_kernels.fp8.quantize import (
    FP8_E4M3,
    FP8_E5M2,
    DelayedScalingState,
    Fp8AmaxGroups,
    Fp8BlockwiseScaling,
    Fp8CurrentScaling,
    Fp8DelayedScaling,
    Fp8Recipe,
    Fp8Tensor,
    amax_to_scale,
    dequantize,
    fp8_max,
    quantize_blockwise,
    quantize_blockwise_reference,
    quantize_tensorwise,
    resolve_recipe,
    tensor_amax,
)
from forge_kernels.fp8.token_split import check_token_blocks, set_token_group, token_group_size

__all__ = [
    "DEFAULT_SKIP_PATTERNS",
    "FP8_E4M3",
    "FP8_E5M2",
    "CalibrationEntry",
    "DelayedScalingState",
    "Fp8AmaxGroups",
    "Fp8BlockwiseScaling",
    "Fp8CurrentScaling",
    "Fp8DelayedScaling",
    "Fp8Linear",
    "Fp8Policy",
    "Fp8PolicyDeviceMismatchError",
    "Fp8Recipe",
    "Fp8Tensor",
    "amax_to_scale",
    "calibrate_fp8_policy",
    "check_token_blocks",
    "convert_to_fp8",
    "dequantize",
    "fp8_gemm",
    "fp8_ineligible_reason",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_max",
    "quantize_blockwise",
    "quantize_blockwise_reference",
    "quantize_tensorwise",
    "resolve_recipe",
    "scaled_mm_unsupported_reason",
    "set_token_group",
    "tensor_amax",
    "token_group_size",
]
