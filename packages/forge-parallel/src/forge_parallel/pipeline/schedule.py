"""``pipeline``: split a decoder into stages, optionally parallelize each, and schedule them.

Built on ``torch.distributed.pipelining`` (``PipelineStage`` and its schedules). The order is
pipeline split first, then :func:`~forge_parallel.parallelize` on each stage module over the
non-pipeline mesh axes (tensor parallel on ``tp``, FSDP on ``dp_shard_cp``), then the schedule,
as in torchtitan.

Gradient accumulation: :meth:`Pipeline.step` splits its batch into ``microbatches`` equal
micro-batches and back-propagates the *mean* of ``loss_fn`` over them, exactly like running
``(loss_fn(model(x_i), y_i) / microbatches).backward()`` for each micro-batch in one process.
Gradients add up into ``.grad`` across ``step`` calls, as ``backward()`` does, so ``k`` calls
before ``optimizer.step()`` accumulate ``k`` mean losses (scale ``loss_fn`` by ``1 / k`` for
their mean). Zero the gradients after each optimizer step. Clip with
:meth:`Pipeline.clip_grad_norm_`: the norm is reduced over the pipeline ranks too.

Limits of this release: stages pass one activation tensor of shape ``(batch, seq, ...)``;
with tensor parallelism on the stages the head must give replicated logits
(``"colwise_output_replicated"``, not ``"loss_parallel"``), and sequence parallelism between
stages is not tested.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from forge_core import ParallelMesh
from forge_parallel.pipeline.config import SCHEDULES, PipelineConfig
from forge_parallel.pipeline.grad_norm import pipeline_clip_grad_norm_
from forge_parallel.pipeline.partition import balanced_partition, stage_ranks
from forge_parallel.pipeline.stage_module import (
    DecoderLayout,
    StageModule,
    decoder_layout,
    layer_costs,
)
from forge_parallel.tensor_parallel import TPPlan, match_modules

__all__ = ["Pipeline", "pipeline", "split_stages", "stage_plan"]


def split_stages(
    model: nn.Module,
    *,
    pp: int,
    pp_rank: int,
    config: PipelineConfig,
    sample_input: torch.Tensor | None = None,
) -> tuple[list[int], list[StageModule], DecoderLayout, list[tuple[int, int]]]:
    """This rank's stage indices and modules (no process group needed).

    Returns ``(stage_indices, modules, layout, bounds)`` where ``bounds[s]`` is the
    ``[start, stop)`` block range of stage ``s``.
    """
    layout = decoder_layout(model, config.blocks)
    n_layers = len(layout.blocks)
    config.validate(pp=pp, num_layers=n_layers)
    num_stages = config.num_stages(pp)
    if isinstance(config.split, tuple):
        bounds, start = [], 0
        for count in config.split:
            bounds.append((start, start + count))
            start += count
    else:
        costs, first, last = layer_costs(model, layout, config.split, sample_input)
        bounds = balanced_partition(costs, num_stages, first=first, last=last)
    owners = stage_ranks(pp, config.virtual_stages, config.placement)
    indices = [s for s, r in enumerate(owners) if r == pp_rank]
    modules = [
        StageModule(
            model,
            layout,
            layout.blocks[bounds[s][0] : bounds[s][1]],
            first=s == 0,
            last=s == num_stages - 1,
        )
        for s in indices
    ]
    return indices, modules, layout, bounds


def stage_plan(plan: TPPlan | Mapping[str, Any], module: nn.Module) -> TPPlan:
    """``plan`` without the patterns that match nothing in ``module`` (a stage lacks the
    embedding or the head of the whole model)."""
    plan = TPPlan.coerce(plan)
    styles = {p: s for p, s in plan.styles.items() if match_modules(module, p)}
    attributes = {p: a for p, a in plan.attributes.items() if match_modules(module, p)}
    return replace(plan, styles=styles, attributes=attributes)


@dataclass
class Pipeline:
    """This rank's part of a pipeline: its stage modules, ``PipelineStage`` s and schedule."""

    modules: list[StageModule]
    stage_indices: list[int]
    stages: list[Any]
    schedule: Any
    group: dist.ProcessGroup
    config: PipelineConfig
    layout: DecoderLayout
    bounds: list[tuple[int, int]]
    parallelized: list[Any] = field(default_factory=list)

    @property
    def pp(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last_stage(self) -> bool:
        return self.num_stages - 1 in self.stage_indices

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under their names in the whole model."""
        seen, out = set(), []
        for module in self.modules:
            for name, p in module.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def step(
        self,
        *inputs: torch.Tensor,
        target: torch.Tensor | None = None,
        losses: list[torch.Tensor] | None = None,
        block_args: Sequence[tuple] | None = None,
    ) -> torch.Tensor | None:
        """Run forward and backward of every micro-batch of ``inputs`` (see the module
        docstring for the gradient semantics).

        Ranks with the first stage pass ``inputs`` (the whole batch); ranks with the last
        stage pass ``target`` and get ``losses`` filled with each micro-batch's ``loss_fn``
        value (unscaled). ``block_args`` (every rank): one tuple per micro-batch of extra
        positional arguments for each block (see :class:`StageModule`), e.g. the attention
        inputs of packed documents. Returns the merged output on the last stage, else ``None``.
        """
        return self._run(inputs, target, losses, block_args, backward=True)

    @torch.no_grad()
    def eval(
        self,
        *inputs: torch.Tensor,
        target: torch.Tensor | None = None,
        losses: list[torch.Tensor] | None = None,
        block_args: Sequence[tuple] | None = None,
    ) -> torch.Tensor | None:
        """Forward only (held-out evaluation): like :meth:`step` without backward, leaving the
        gradients untouched; ``losses`` gets each micro-batch's ``loss_fn`` value."""
        return self._run(inputs, target, losses, block_args, backward=False)

    def _run(
        self,
        inputs: tuple[torch.Tensor, ...],
        target: torch.Tensor | None,
        losses: list[torch.Tensor] | None,
        block_args: Sequence[tuple] | None,
        *,
        backward: bool,
    ) -> torch.Tensor | None:
        m = self.config.microbatches
        if block_args is not None and len(block_args) != m:
            raise ValueError(
                f"block_args has {len(block_args)} entries but the pipeline runs microbatches={m}; "
                "pass one tuple of block arguments per micro-batch"
            )
        for t in (*inputs, target):
            if isinstance(t, torch.Tensor) and t.shape[0] % m != 0:
                raise ValueError(
                    f"batch size {t.shape[0]} is not divisible by microbatches={m}; use a batch "
                    f"that is a multiple of {m}"
                )
        if self.has_first_stage and not inputs:
            raise ValueError("this rank holds the first stage: pass the inputs to step()")
        if self.has_last_stage and target is None:
            raise ValueError("this rank holds the last stage: pass target= to step()")
        args = inputs if self.has_first_stage else ()
        scaled: list[torch.Tensor] = []
        for module in self.modules:
            module.set_block_args(block_args)
        run = self.schedule.step if backward else self.schedule.eval
        try:
            out = run(
                *args,
                target=target if self.has_last_stage else None,
                losses=scaled if self.has_last_stage else None,
            )
        finally:
            for module in self.modules:
                module.set_block_args(None)
        if losses is not None:
            losses.extend(loss.unscaled for loss in scaled)
        return out if self.has_last_stage else None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip by the global norm over all pipeline ranks (a collective on every rank)."""
        return pipeline_clip_grad_norm_(self.parameters(), max_norm, self.group, norm_type)


def _resolve_group(
    mesh_or_group: ParallelMesh | DeviceMesh | dist.ProcessGroup,
) -> tuple[dist.ProcessGroup, ParallelMesh | None]:
    if isinstance(mesh_or_group, ParallelMesh):
        return mesh_or_group.group("pp"), mesh_or_group
    if isinstance(mesh_or_group, DeviceMesh):
        if mesh_or_group.ndim != 1:
            raise ValueError(
                f"pass the 1-D pipeline mesh (mesh['pp']), got a {mesh_or_group.ndim}-D mesh"
            )
        return mesh_or_group.get_group(), None
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group, None
    raise ValueError(
        "mesh_or_group must be a forge_core ParallelMesh, a 1-D DeviceMesh or a ProcessGroup, "
        f"got {type(mesh_or_group).__name__}"
    )


#: Schedules that split the backward into input- and weight-gradient passes.
_SPLIT_BACKWARD = ("zero_bubble", "zbv")


def _check_split_backward(
    config: PipelineConfig, stage_parallel: Mapping[str, Any], mesh: ParallelMesh
) -> None:
    """Zero-bubble schedules compute weight gradients after FSDP's post-backward hooks have
    reduced the input-gradient pass; the gradients come out wrong, so refuse the pair."""
    mode = stage_parallel.get("data_parallel")
    sharded = mode in ("fsdp", "hsdp") or (mode == "auto" and mesh.dims.dp_shard_cp > 1)
    if config.schedule in _SPLIT_BACKWARD and sharded:
        raise ValueError(
            f"schedule {config.schedule!r} with data_parallel={mode!r} gives wrong gradients: "
            "the weight-gradient pass runs after FSDP has reduced the gradients. Use "
            "schedule='1f1b' or 'interleaved_1f1b' with FSDP, or DDP / no data parallelism"
        )


def _stage_class() -> type:
    """``PipelineStage`` telling its :class:`StageModule` which micro-batch each forward runs
    (for per-micro-batch block arguments)."""
    from torch.distributed.pipelining import PipelineStage

    class _MicrobatchAwareStage(PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any):
            self.submod.microbatch = fwd_chunk_id
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    return _MicrobatchAwareStage


def _device(module: nn.Module, mesh: ParallelMesh | None) -> torch.device:
    """Where the stage computes: its parameters' device, or the mesh's while they are still on
    the meta device (materialized after the split)."""
    for p in module.parameters():
        if not p.is_meta:
            return p.device
        break
    if mesh is not None:
        return torch.device(mesh.dense.device_type)
    return torch.device("cpu")


def pipeline(
    model: nn.Module,
    mesh_or_group: ParallelMesh | DeviceMesh | dist.ProcessGroup,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: PipelineConfig | None = None,
    stage_parallel: Mapping[str, Any] | None = None,
    sample_input: torch.Tensor | None = None,
    **config_kwargs: Any,
) -> Pipeline:
    """Split ``model`` into pipeline stages, place this rank's, and build the schedule.

    ``mesh_or_group``: a ``ParallelMesh`` (its ``pp`` axis is the pipeline; the other axes are
    used by ``stage_parallel``), the 1-D pipeline ``DeviceMesh`` or a process group.
    ``loss_fn(output, target)``: the mean loss of one micro-batch. ``config`` or its fields as
    keyword arguments (``schedule="1f1b", microbatches=4, virtual_stages=1, split="layers"``).
    ``stage_parallel``: keyword arguments of :func:`~forge_parallel.parallelize` applied to
    each stage module on the ``ParallelMesh`` (``plan=`` is restricted to each stage's
    modules, ``blocks=`` set to the stage's blocks). ``sample_input``: a batch for
    ``split="flops"``.
    """
    if config is None:
        config = PipelineConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either config= or its fields, not both: {sorted(config_kwargs)}")
    group, mesh = _resolve_group(mesh_or_group)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    indices, modules, layout, bounds = split_stages(
        model, pp=pp, pp_rank=pp_rank, config=config, sample_input=sample_input
    )
    parallelized = []
    if stage_parallel is not None:
        if mesh is None:
            raise ValueError("stage_parallel needs a ParallelMesh as mesh_or_group")
        _check_split_backward(config, stage_parallel, mesh)
        from forge_parallel.parallelize import parallelize

        for module in modules:
            kwargs = dict(stage_parallel)
            if kwargs.get("plan") is not None:
                kwargs["plan"] = stage_plan(kwargs["plan"], module)
            kwargs.setdefault("blocks", layout.blocks_pattern)
            parallelized.append(parallelize(module, mesh, **kwargs))

    from torch.distributed import pipelining

    num_stages = len(bounds)
    stages = [
        _stage_class()(module, s, num_stages, _device(module, mesh), group=group)
        for s, module in zip(indices, modules, strict=True)
    ]
    m = config.microbatches

    def scaled_loss(output: torch.Tensor, target: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        loss = loss_fn(output, target, **kwargs)
        scaled = loss / m
        scaled.unscaled = loss.detach()  # what Pipeline.step reports
        return scaled

    schedule_class = getattr(pipelining, SCHEDULES[config.schedule][0])
    single = issubclass(schedule_class, pipelining.schedules.PipelineScheduleSingle)
    schedule = schedule_class(
        stages[0] if single else stages,
        n_microbatches=m,
        loss_fn=scaled_loss,
        scale_grads=False,  # the loss is divided by m above, so .grad accumulates across steps
    )
    return Pipeline(
        modules=modules,
        stage_indices=indices,
        stages=stages,
        schedule=schedule,
        group=group,
        config=config,
        layout=layout,
        bounds=bounds,
        parallelized=parallelized,
    )
