"""FSDP/ZeRO, tensor + sequence parallelism and activation recomputation for any PyTorch model.

``parallelize(model, dims_or_mesh, plan=..., data_parallel=..., fsdp=..., recompute=...,
compile=...)`` applies the dimensions in a fixed order (tensor/sequence parallel, recompute,
compile, data parallel) from outside the model, so it works on Forge's models, on a model you
wrote and on one from ``transformers``. Built on DeviceMesh, DTensor,
``torch.distributed.tensor.parallel`` and FSDP2.
"""

from forge_parallel.compile import apply_compile
from forge_parallel.config import CompileConfig, FSDPConfig, RecomputeConfig
from forge_parallel.data_parallel import apply_ddp, apply_fsdp, no_gradient_sync
from forge_parallel.grad_norm import align_grads, clip_grad_norm_, total_grad_norm
from forge_parallel.parallelize import ParallelizeResult, find_blocks, parallelize
from forge_parallel.recompute import apply_recompute, selective_policy
from forge_parallel.summary import ModuleSummary, ParallelSummary
from forge_parallel.tensor_parallel import (
    TP_STYLES,
    TPPlan,
    apply_tp,
    valid_tp_degrees,
    validate_tp,
)
from forge_parallel.zero import ZeroOptimizer

__version__ = "0.1.0"

__all__ = [
    "TP_STYLES",
    "CompileConfig",
    "FSDPConfig",
    "ModuleSummary",
    "ParallelSummary",
    "ParallelizeResult",
    "RecomputeConfig",
    "TPPlan",
    "ZeroOptimizer",
    "align_grads",
    "apply_compile",
    "apply_ddp",
    "apply_fsdp",
    "apply_recompute",
    "apply_tp",
    "clip_grad_norm_",
    "find_blocks",
    "no_gradient_sync",
    "parallelize",
    "selective_policy",
    "total_grad_norm",
    "valid_tp_degrees",
    "validate_tp",
]
