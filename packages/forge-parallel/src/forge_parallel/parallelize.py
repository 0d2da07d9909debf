"""``parallelize``: apply every parallel dimension to a plain ``nn.Module``, in a fixed order.

The order is torchtitan's (``models/llama3/infra/parallelize.py``), and it is not optional:

1. **tensor / sequence parallel** (:func:`~forge_parallel.apply_tp`) on ``mesh["tp"]``: turns
   weights into DTensors, so everything after sees the tensor-parallel layout; then **expert
   parallel** (:func:`~forge_parallel.expert_parallel.apply_ep`) on ``mesh["ep"]`` (and
   ``mesh["etp"]``): each rank keeps its experts, tokens reach them by all-to-all;
2. **activation recomputation** (:func:`~forge_parallel.apply_recompute`) of each block: the
   checkpointed region contains the TP collectives;
3. **compile** (:func:`~forge_parallel.apply_compile`) of each block: the graph contains
   TP and the checkpoint policy;
4. **data parallel**: FSDP2 on ``mesh["dp_shard_cp"]``, HSDP on the 2-D
   ``(dp_replicate, dp_shard_cp)`` mesh (:func:`~forge_parallel.apply_fsdp`), DDP on
   ``mesh["dp"]`` (:func:`~forge_parallel.apply_ddp`): its hooks wrap the compiled,
   checkpointed blocks. ZeRO-1/2 act in the optimizer (:class:`~forge_parallel.ZeroOptimizer`,
   built by :meth:`ParallelizeResult.build_optimizer`), not on the model.

Everything is validated before anything is changed or any process group is touched, so a
wrong combination raises a ``ValueError`` naming the numbers even without a process group.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor.parallel import ParallelStyle, loss_parallel

from forge_core import ParallelDims, ParallelMesh
from forge_parallel.compile import apply_compile
from forge_parallel.config import (
    DATA_PARALLEL_MODES,
    CompileConfig,
    FSDPConfig,
    OffloadConfig,
    RecomputeConfig,
)
from forge_parallel.context_parallel import ContextParallelHandle, CPConfig, apply_cp
from forge_parallel.data_parallel import apply_ddp, apply_fsdp, no_gradient_sync
from forge_parallel.expert_parallel import EPConfig, apply_ep, expert_modules, validate_ep
from forge_parallel.offload import apply_offload
from forge_parallel.recompute import apply_recompute
from forge_parallel.summary import ParallelSummary, build_rows
from forge_parallel.tensor_parallel import TPPlan, apply_tp, match_modules, validate_tp
from forge_parallel.zero import ZeroOptimizer

__all__ = ["ParallelizeResult", "find_blocks", "parallelize"]

_DP_LABEL = {
    "fsdp": "FSDP (ZeRO-3)",
    "hsdp": "HSDP",
    "ddp": "DDP",
    "zero1": "ZeRO-1",
    "zero2": "ZeRO-2",
}


@dataclass
class ParallelizeResult:
    """The parallelized model, its summary and what training code needs to use it.

    Unpacks as ``model, summary = parallelize(...)``.
    """

    model: nn.Module
    summary: ParallelSummary
    mesh: ParallelMesh | None
    data_parallel: str | None
    loss_parallel: bool
    #: The context-parallel settings when ``cp > 1`` (shard inputs, labels and position ids
    #: over ``mesh["cp"]`` with ``forge_parallel.context_parallel.shard_sequence``).
    context_parallel: CPConfig | None = None
    #: What :func:`~forge_parallel.context_parallel.apply_cp` installed when ``cp > 1``: set
    #: packed document boundaries with its ``packed(cu_seqlens)`` around a forward.
    context_parallel_handle: ContextParallelHandle | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.summary))

    def loss_context(self) -> contextlib.AbstractContextManager:
        """``loss_parallel()`` when the plan shards the logits by vocab, else a no-op.

        Run both the loss computation and ``backward()`` inside it.
        """
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Skip gradient reduction for the micro-batches run inside (gradient accumulation)."""
        return no_gradient_sync(self.model)

    def build_optimizer(
        self,
        optimizer_class: Callable[..., torch.optim.Optimizer],
        params: Any = None,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        """``optimizer_class(params, **kwargs)``, wrapped in :class:`ZeroOptimizer` for
        ``data_parallel="zero1"`` / ``"zero2"`` (sharded over ``mesh["dp"]``)."""
        params = self.model.parameters() if params is None else params
        if self.data_parallel in ("zero1", "zero2"):
            assert self.mesh is not None
            stage = 1 if self.data_parallel == "zero1" else 2
            return ZeroOptimizer(
                params, optimizer_class, group=self.mesh["dp"], stage=stage, **kwargs
            )
        return optimizer_class(params, **kwargs)


def find_blocks(model: nn.Module, pattern: str | None = None) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of ``model``: the modules matching ``pattern`` (e.g. ``"layers.*"``),
    or by default the children of its largest ``nn.ModuleList`` (by parameter count)."""
    if pattern is not None:
        found = match_modules(model, pattern)
        if not found:
            names = [n for n, _ in model.named_modules() if n][:8]
            raise ValueError(
                f"blocks pattern {pattern!r} matches no module; module names look like "
                f"{', '.join(names)}"
            )
        return found
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        return []
    _, name, modules = best
    prefix = f"{name}." if name else ""
    return [(f"{prefix}{i}", m) for i, m in enumerate(modules)]


def _resolve_dims(
    mesh_or_dims: ParallelMesh | ParallelDims | None,
) -> tuple[ParallelDims | None, ParallelMesh | None]:
    if mesh_or_dims is None:
        return None, None
    if isinstance(mesh_or_dims, ParallelMesh):
        return mesh_or_dims.dims, mesh_or_dims
    if isinstance(mesh_or_dims, ParallelDims):
        return mesh_or_dims, None
    raise ValueError(
        "mesh_or_dims must be a forge_core ParallelMesh, ParallelDims or None (single "
        f"process), got {type(mesh_or_dims).__name__}"
    )


def _resolve_mode(data_parallel: str | None, dims: ParallelDims | None) -> str | None:
    if data_parallel == "auto":
        if dims is None:
            return None
        if dims.dp_replicate > 1 and dims.dp_shard_cp > 1:
            return "hsdp"
        if dims.dp_shard_cp > 1:
            return "fsdp"
        if dims.dp_replicate > 1:
            return "ddp"
        return None
    if data_parallel is not None and data_parallel not in DATA_PARALLEL_MODES:
        raise ValueError(
            f"unknown data_parallel={data_parallel!r}; use 'auto', None or one of "
            f"{', '.join(DATA_PARALLEL_MODES)}"
        )
    if data_parallel is not None and dims is None:
        raise ValueError(
            f"data_parallel={data_parallel!r} needs a mesh: pass ParallelDims or a ParallelMesh"
        )
    return data_parallel


def _experts_under_sequence_parallel(
    model: nn.Module, dims: ParallelDims | None, config: EPConfig | None
) -> list[str]:
    """The experts modules that expert tensor parallelism distributes over the tensor-parallel
    ranks while those route different tokens (``EPConfig(sequence_parallel=True)``)."""
    if dims is None or dims.ep == 1 or not isinstance(config, EPConfig):
        return []
    if not config.sequence_parallel:
        return []
    return [name for name, _ in match_modules(model, config.experts)]


def _validate(
    model: nn.Module,
    dims: ParallelDims | None,
    mode: str | None,
    plan: TPPlan | None,
    fsdp: FSDPConfig | None,
    experts_elsewhere: list[str],
) -> None:
    tp = dims.tp if dims is not None else 1
    if tp > 1 and plan is None:
        raise ValueError(
            f"tp={tp} needs a tensor-parallel plan, and forge-parallel makes none on its own for "
            f"a model it does not know ({type(model).__name__}: a transformers model or one "
            "you wrote): pass parallelize(..., plan=TPPlan(styles={'model.layers.*.self_attn."
            "q_proj': 'colwise', ...})); forge-parallel's README, section 'Tensor and sequence "
            "parallelism from a plan', has a whole plan for a transformers model, with and "
            "without sequence parallelism (forge-models' families ship theirs: "
            "forge_models.parallel_plan)"
        )
    if plan is not None:
        validate_tp(model, plan, tp, distributed_elsewhere=experts_elsewhere)
    if dims is not None and dims.cp > 1 and mode not in ("fsdp", "hsdp"):
        raise ValueError(
            f"cp={dims.cp}: the context-parallel ranks hold partial gradients of the same "
            f"sequences, which only FSDP/HSDP (sharding over dp_shard x cp) reduce; "
            f"data_parallel={mode!r} does not reduce over cp. Use data_parallel='auto', 'fsdp' "
            "or 'hsdp'"
        )
    if mode == "fsdp" and dims.dp_replicate > 1:
        raise ValueError(
            f"data_parallel='fsdp' shards over dp_shard x cp = {dims.dp_shard_cp} ranks, but "
            f"dp_replicate={dims.dp_replicate}: use data_parallel='hsdp' (shard within, "
            "replicate across) or 'ddp'"
        )
    if mode == "hsdp" and (dims.dp_replicate == 1 or dims.dp_shard_cp == 1):
        raise ValueError(
            f"data_parallel='hsdp' needs dp_replicate > 1 and dp_shard x cp > 1, got "
            f"dp_replicate={dims.dp_replicate} and dp_shard x cp={dims.dp_shard_cp}; use "
            f"'{'fsdp' if dims.dp_replicate == 1 else 'ddp'}'"
        )
    if mode in ("ddp", "zero1", "zero2") and tp > 1:
        raise ValueError(
            f"data_parallel={mode!r} with tp={tp} is not supported (tensor-parallel weights are "
            "DTensors); use data_parallel='fsdp' or 'hsdp' with tensor parallelism"
        )
    if fsdp is not None and mode not in ("fsdp", "hsdp", "ddp"):
        raise ValueError(
            f"fsdp=FSDPConfig(...) configures data_parallel 'fsdp', 'hsdp' or 'ddp', but "
            f"data_parallel resolved to {mode!r}"
        )


def _experts(mesh: ParallelMesh, model: nn.Module) -> dict[str, Any]:
    """``apply_fsdp`` keywords for the expert-parallel experts (sharded over the edp ranks)."""
    if mesh.expert is None:
        return {}
    hsdp = mesh.dims.dp_replicate > 1
    edp = mesh["dp_replicate", "edp_shard"] if hsdp else mesh["edp"]
    return {"experts": expert_modules(model), "expert_mesh": edp}


def _validate_ep(
    model: nn.Module,
    dims: ParallelDims | None,
    mode: str | None,
    config: EPConfig | None,
    plan: TPPlan | None,
) -> None:
    ep = dims.ep if dims is not None else 1
    if config is not None and not isinstance(config, EPConfig):
        raise ValueError(
            f"expert_parallel must be an EPConfig(experts=..., num_chunks=...), got "
            f"{type(config).__name__}"
        )
    if ep == 1:
        return
    if config is None:
        raise ValueError(
            f"ep={ep} needs expert_parallel=EPConfig(experts='<pattern of the experts modules>', "
            "e.g. 'layers.*.mlp.experts')"
        )
    if dims.etp != dims.tp:
        raise ValueError(
            f"ep={ep} with etp={dims.etp} and tp={dims.tp}: experts borrowing the tensor-parallel "
            f"ranks (etp=1 < tp) is not supported; use etp={dims.tp} (the default)"
        )
    if mode not in ("fsdp", "hsdp"):
        raise ValueError(
            f"ep={ep}: expert gradients are reduced over the expert-data-parallel ranks by "
            f"FSDP/HSDP, but data_parallel={mode!r}; use data_parallel='auto', 'fsdp' or 'hsdp'"
        )
    sequence_parallel = dims.tp > 1 and plan is not None and plan.sequence_parallel
    if dims.etp > 1 and config.sequence_parallel != sequence_parallel:
        raise ValueError(
            f"ep={ep} x etp={dims.etp}: EPConfig(sequence_parallel={config.sequence_parallel}) "
            f"but the tensor-parallel plan has sequence_parallel={sequence_parallel}; the experts "
            "must know whether the tensor-parallel ranks route the same tokens (set both alike)"
        )
    validate_ep(model, config, ep, dims.etp)


def parallelize(
    model: nn.Module,
    mesh_or_dims: ParallelMesh | ParallelDims | None = None,
    *,
    plan: TPPlan | Mapping[str, str | ParallelStyle] | None = None,
    data_parallel: str | None = "auto",
    fsdp: FSDPConfig | None = None,
    recompute: RecomputeConfig | None = None,
    offload: OffloadConfig | None = None,
    compile: bool | CompileConfig = False,
    blocks: str | None = None,
    context_parallel: CPConfig | None = None,
    expert_parallel: EPConfig | None = None,
) -> ParallelizeResult:
    """Apply tensor/sequence parallel, recompute, compile and data parallel to ``model``.

    ``mesh_or_dims``: a ``ParallelMesh`` (``dims.build_mesh()``), ``ParallelDims`` (the mesh is
    built here, a collective) or ``None`` (one process: only recompute / compile apply).
    ``plan``: the tensor-parallel plan (needed when ``tp > 1``; ignored at ``tp == 1``).
    ``data_parallel``: ``"auto"`` picks ``hsdp`` / ``fsdp`` / ``ddp`` / nothing from the
    degrees; or ``"fsdp"``, ``"hsdp"``, ``"ddp"``, ``"zero1"``, ``"zero2"``, ``None``.
    ``fsdp``: mixed precision, resharding and offload for fsdp/hsdp (and mixed precision for
    ddp). ``blocks``: pattern of the repeated blocks (default: the largest ``nn.ModuleList``'s
    children): the FSDP units and the recompute / compile regions. ``context_parallel``: ring
    or Ulysses attention and the sharding layout when ``cp > 1`` (default ``CPConfig()``:
    zigzag ring); the model's ``scaled_dot_product_attention`` calls are routed to it
    (:func:`~forge_parallel.context_parallel.apply_cp`) before data parallelism is applied.

    ``expert_parallel``: which modules are the MoE experts and how to overlap their
    all-to-alls, when ``ep > 1`` (:func:`~forge_parallel.expert_parallel.apply_ep`, applied
    right after tensor parallelism; their parameters are then sharded by FSDP over
    ``mesh["edp"]``, the dense ones over ``mesh["dp_shard_cp"]``).

    ``offload``: move the activations each block saves for backward to host memory
    (:func:`~forge_parallel.offload.apply_offload`; applied around the recompute and compile
    wrappers, so with full recompute it offloads the block inputs the checkpoint keeps).

    The model is modified in place; the result unpacks as ``model, summary``.
    """
    dims, mesh = _resolve_dims(mesh_or_dims)
    mode = _resolve_mode(data_parallel, dims)
    tp_plan = TPPlan.coerce(plan) if plan is not None else None
    compile_config = (
        compile if isinstance(compile, CompileConfig) else (CompileConfig() if compile else None)
    )
    experts_elsewhere = _experts_under_sequence_parallel(model, dims, expert_parallel)
    _validate(model, dims, mode, tp_plan, fsdp, experts_elsewhere)
    _validate_ep(model, dims, mode, expert_parallel, tp_plan)
    cp = dims.cp if dims is not None else 1
    if context_parallel is not None and not isinstance(context_parallel, CPConfig):
        raise ValueError(
            f"context_parallel must be a CPConfig(style=..., load_balance=...), got "
            f"{type(context_parallel).__name__}"
        )
    if context_parallel is not None and cp == 1:
        raise ValueError(
            f"context_parallel={context_parallel} configures cp > 1, but the mesh has cp=1; "
            "build ParallelDims(cp=...) or drop context_parallel"
        )
    if cp > 1 and context_parallel is None:
        context_parallel = CPConfig()
    block_list = find_blocks(model, blocks)
    if recompute is not None and not block_list:
        raise ValueError(
            f"recompute needs the model's blocks, but {type(model).__name__} has no "
            "nn.ModuleList; pass blocks='<pattern>' (e.g. 'layers.*')"
        )
    if offload is not None and not block_list:
        raise ValueError(
            f"offload needs the model's blocks, but {type(model).__name__} has no "
            "nn.ModuleList; pass blocks='<pattern>' (e.g. 'layers.*')"
        )
    if mode in ("fsdp", "hsdp") and fsdp is None:
        fsdp = FSDPConfig()
    if mesh is None and dims is not None:
        mesh = dims.build_mesh()

    order: list[str] = []
    tp_applied: dict[str, str] = {}
    tp = dims.tp if dims is not None else 1
    if tp_plan is not None and tp > 1:
        tp_applied = apply_tp(model, mesh["tp"], tp_plan, distributed_elsewhere=experts_elsewhere)
        order.append("tensor+sequence parallel" if tp_plan.sequence_parallel else "tensor parallel")
    if dims is not None and dims.ep > 1:
        ep_mesh = mesh["ep", "etp"] if dims.etp > 1 else mesh["ep"]
        tp_applied.update(apply_ep(model, ep_mesh, expert_parallel))
        order.append("expert parallel")
    # Modules checkpointed before this call (e.g. a part's blocks that are not the blocks found
    # here) are listed as such in the summary.
    recompute_applied: dict[str, str] = {
        name: module._forge_recompute
        for name, module in model.named_modules()
        if getattr(module, "_forge_recompute", None)
    }
    if recompute is not None:
        recompute_applied.update(apply_recompute(block_list, recompute))
        order.append(f"recompute ({recompute.mode})")
    compiled: dict[str, str] = {}
    if compile_config is not None:
        compiled = apply_compile(block_list or [("", model)], compile_config)
        order.append("compile")
    if offload is not None:
        for name, text in apply_offload(block_list, offload)[1].items():
            rc = recompute_applied.get(name)
            recompute_applied[name] = f"{rc} + {text}" if rc else text
        order.append("activation offload")
    cp_handle = None
    if context_parallel is not None:
        cp_handle = apply_cp(model, mesh["cp"], context_parallel)
        order.append(f"context parallel ({context_parallel.style})")
    dp_applied: dict[str, str] = {}
    if mode == "fsdp":
        dp_applied = apply_fsdp(
            model, mesh["dp_shard_cp"], fsdp, block_list, **_experts(mesh, model)
        )
    elif mode == "hsdp":
        # Shard over dp_shard x cp (CP ranks share parameters), replicate over dp_replicate.
        dp_applied = apply_fsdp(
            model, mesh["dp_replicate", "dp_shard_cp"], fsdp, block_list, **_experts(mesh, model)
        )
    elif mode == "ddp":
        dp_applied = apply_ddp(model, mesh["dp"], fsdp, block_list)
    if mode is not None:
        order.append(_DP_LABEL[mode])

    dp_default = "-"
    if mode in ("zero1", "zero2"):
        dp_default = f"{_DP_LABEL[mode]} (optimizer)"
    uses_fsdp_dtypes = mode in ("fsdp", "hsdp", "ddp") and fsdp is not None
    summary = ParallelSummary(
        degrees={} if dims is None else {k: v for k, v in dims.degrees().items() if k != "etp"},
        data_parallel=mode,
        order=tuple(order),
        loss_parallel=bool(tp_plan and tp > 1 and tp_plan.uses_loss_parallel),
        rows=build_rows(
            model,
            tp=tp_applied,
            dp=dp_applied,
            dp_default=dp_default,
            recompute=recompute_applied,
            compiled=compiled,
            param_dtype=fsdp.param_dtype if uses_fsdp_dtypes else None,
            reduce_dtype=fsdp.reduce_dtype if uses_fsdp_dtypes else None,
        ),
    )
    return ParallelizeResult(
        model=model,
        summary=summary,
        mesh=mesh,
        data_parallel=mode,
        loss_parallel=summary.loss_parallel,
        context_parallel=context_parallel,
        context_parallel_handle=cp_handle,
    )
