"""Every parallel dimension, applied from outside to any PyTorch model.

``parallelize(model, dims_or_mesh, plan=..., data_parallel=..., fsdp=..., recompute=...,
offload=..., context_parallel=..., expert_parallel=..., compile=...)`` applies the dimensions in
a fixed order (tensor/sequence parallel, expert parallel, recompute, offload, compile, data
parallel) from outside the model, so it works on Forge's models, on a model you wrote and on one
from ``transformers``. :func:`forge_parallel.pipeline.pipeline` splits a decoder into pipeline
stages and parallelizes each; :func:`parallelize_submodules` gives sub-modules their own
layouts. Built on DeviceMesh, DTensor, ``torch.distributed.tensor.parallel``, FSDP2 and
``torch.distributed.pipelining``.
"""

from forge_parallel.auto_recompute import (
    BlockMeasurement,
    RecomputeChoice,
    measure_block,
    plan_recompute,
)
from forge_parallel.compile import apply_compile
from forge_parallel.config import CompileConfig, FSDPConfig, OffloadConfig, RecomputeConfig
from forge_parallel.context_parallel import (
    ContextParallelHandle,
    CPConfig,
    apply_cp,
    context_parallel,
    context_parallel_attention,
    context_parallel_cross_entropy,
    shard_sequence,
    unshard_sequence,
)
from forge_parallel.data_parallel import apply_ddp, apply_fsdp, no_gradient_sync
from forge_parallel.expert_parallel import EPConfig, apply_ep, valid_ep_degrees, validate_ep
from forge_parallel.grad_norm import align_grads, clip_grad_norm_, total_grad_norm
from forge_parallel.heterogeneous import (
    HeterogeneousResult,
    SubmoduleParallel,
    parallelize_submodules,
)
from forge_parallel.memory_probe import kept_for_backward
from forge_parallel.offload import ActivationOffload, OffloadStats, apply_offload
from forge_parallel.parallelize import ParallelizeResult, find_blocks, parallelize
from forge_parallel.pipeline import Pipeline, PipelineConfig, bubble_fraction, measure_bubble
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
    "ActivationOffload",
    "BlockMeasurement",
    "CPConfig",
    "CompileConfig",
    "ContextParallelHandle",
    "EPConfig",
    "FSDPConfig",
    "HeterogeneousResult",
    "ModuleSummary",
    "OffloadConfig",
    "OffloadStats",
    "ParallelSummary",
    "ParallelizeResult",
    "Pipeline",
    "PipelineConfig",
    "RecomputeChoice",
    "RecomputeConfig",
    "SubmoduleParallel",
    "TPPlan",
    "ZeroOptimizer",
    "align_grads",
    "apply_compile",
    "apply_cp",
    "apply_ddp",
    "apply_ep",
    "apply_fsdp",
    "apply_offload",
    "apply_recompute",
    "apply_tp",
    "bubble_fraction",
    "clip_grad_norm_",
    "context_parallel",
    "context_parallel_attention",
    "context_parallel_cross_entropy",
    "find_blocks",
    "kept_for_backward",
    "measure_block",
    "measure_bubble",
    "no_gradient_sync",
    "parallelize",
    "parallelize_submodules",
    "plan_recompute",
    "selective_policy",
    "shard_sequence",
    "total_grad_norm",
    "unshard_sequence",
    "valid_ep_degrees",
    "valid_tp_degrees",
    "validate_ep",
    "validate_tp",
]
