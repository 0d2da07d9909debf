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

Data parallelism on the stages (``stage_parallel={"data_parallel": ...}``): ``fsdp``, ``hsdp``
and ``ddp`` (FSDP2's ``replicate``) wrap each stage module, and torch's ``PipelineStage``
defers their gradient reduction to after the last micro-batch; ``zero1`` / ``zero2`` act in
the optimizer: build it with :meth:`Pipeline.build_optimizer` (a
:class:`~forge_parallel.ZeroOptimizer` over the stage's data-parallel ranks, Megatron-LM's
PP x distributed-optimizer layout) and pass it to :meth:`Pipeline.clip_grad_norm_`.

With tensor parallelism on the stages the head may give replicated logits
(``"colwise_output_replicated"``) or keep them sharded by vocabulary (``"loss_parallel"``): the
schedule then runs inside ``loss_parallel()`` (:mod:`~forge_parallel.pipeline.loss_parallel`),
``loss_fn`` gets DTensor logits and the merged output of the last stage is a DTensor.

Stages pass one activation tensor of shape ``(batch, seq, ...)``; with sequence parallelism it
is this rank's sequence shard (tested exact with TP2 + SP x PP2 and a vocab-sharded loss). A
``carry`` adds tensors of any shape that travel beside it (:class:`StageCarry`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from forge_core import ParallelMesh
from forge_parallel.grad_norm import align_grads
from forge_parallel.pipeline.config import SCHEDULES, PipelineConfig
from forge_parallel.pipeline.grad_norm import pipeline_clip_grad_norm_
from forge_parallel.pipeline.loss_parallel import in_loss_context, loss_value
from forge_parallel.pipeline.partition import balanced_partition, stage_ranks
from forge_parallel.pipeline.split_backward import split_backward
from forge_parallel.pipeline.stage_module import (
    DecoderLayout,
    StageCarry,
    StageModule,
    decoder_layout,
    layer_costs,
)
from forge_parallel.pipeline.tied import TiedWeight, _local, find_tied_weights, tied_group
from forge_parallel.tensor_parallel import TPPlan, match_modules
from forge_parallel.zero import ZeroOptimizer

__all__ = ["Pipeline", "pipeline", "split_stages", "stage_plan"]


def split_stages(
    model: nn.Module,
    *,
    pp: int,
    pp_rank: int,
    config: PipelineConfig,
    sample_input: torch.Tensor | None = None,
    also_used: Mapping[str, Sequence[int]] | None = None,
    ahead: Sequence[str] = (),
) -> tuple[list[int], list[StageModule], DecoderLayout, list[tuple[int, int]]]:
    """This rank's stage indices and modules (no process group needed; ``ahead``: see
    :func:`pipeline`).

    Returns ``(stage_indices, modules, layout, bounds)`` where ``bounds[s]`` is the
    ``[start, stop)`` block range of stage ``s``. A stage using a parameter of an earlier stage
    (a tied embedding, or a module named in ``also_used``, see
    :func:`~forge_parallel.pipeline.tied.find_tied_weights`) also holds that parameter's module
    (:mod:`forge_parallel.pipeline.tied`).
    """
    return _split(
        model,
        pp=pp,
        pp_rank=pp_rank,
        config=config,
        sample_input=sample_input,
        also_used=also_used,
        ahead=ahead,
    )[:4]


def _split(
    model: nn.Module,
    *,
    pp: int,
    pp_rank: int,
    config: PipelineConfig,
    sample_input: torch.Tensor | None,
    also_used: Mapping[str, Sequence[int]] | None = None,
    ahead: Sequence[str] = (),
) -> tuple[list[int], list[StageModule], DecoderLayout, list[tuple[int, int]], list[TiedWeight]]:
    """:func:`split_stages` and the parameters several stages use; the first stage neither
    holds nor runs the pre-parts in ``ahead`` (see :func:`pipeline`)."""
    layout = decoder_layout(model, config.blocks)
    if unknown := [p for p in ahead if p not in layout.pre]:
        raise ValueError(
            f"ahead={unknown} are not pre-parts of the first stage {list(layout.pre)}; name "
            "modules that run before the blocks (e.g. the input embedding)"
        )
    stage_layout = replace(layout, pre=tuple(p for p in layout.pre if p not in ahead))
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
    tied = find_tied_weights(model, layout, bounds, also_used)
    modules = [
        StageModule(
            model,
            stage_layout,
            layout.blocks[bounds[s][0] : bounds[s][1]],
            first=s == 0,
            last=s == num_stages - 1,
            tied_holders=[t.holder for t in tied if s in t.stages and s != t.first_stage],
        )
        for s in indices
    ]
    return indices, modules, layout, bounds, tied


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
    #: Parameters used by several stages, with the group of the ranks holding them (``None``:
    #: all on this rank) and the pipeline rank of the first user (see ``pipeline.tied``).
    tied: list[tuple[TiedWeight, dist.ProcessGroup | None, int]] = field(default_factory=list)
    #: The first stage's pre-parts its caller runs ahead of the schedule (``pipeline(ahead=)``),
    #: by path in the whole model, on the rank holding the first stage (empty elsewhere).
    ahead: dict[str, nn.Module] = field(default_factory=dict)

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
        """This rank's parameters under their names in the whole model (the ``ahead``
        modules' included)."""
        seen, out = set(), []
        held = [("", m) for m in self.modules] + list(self.ahead.items())
        for prefix, module in held:
            for name, p in module.named_parameters(prefix=prefix):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def _held_tied(self) -> list[tuple[nn.Parameter, TiedWeight, dist.ProcessGroup | None, int]]:
        held = dict(self.named_parameters())
        return [(held[t.name], t, g, first) for t, g, first in self.tied if t.name in held]

    def local_module(self) -> nn.Module:
        """This rank's stages as one module with the whole model's parameter names (for the
        optimizer and checkpoints; see :meth:`StageModule.merged`)."""
        return StageModule.merged(self.modules)

    def norm_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters that count towards the global gradient norm: a parameter
        several pipeline ranks hold (tied) counts on the rank of its first user only."""
        copies = {
            id(p)
            for p, _, group, first in self._held_tied()
            if group is not None and dist.get_rank(self.group) != first
        }
        return [p for p in self.parameters() if id(p) not in copies]

    @torch.no_grad()
    def sync_tied_weights(self) -> None:
        """Copy each tied parameter from the rank of its first user to the other ranks holding
        it (collective over those ranks). :func:`pipeline` calls it; call it again after
        initializing meta-device stages or loading weights into one copy only."""
        for p, _, group, first in self._held_tied():
            if group is not None:
                source = dist.get_global_rank(self.group, first)
                dist.broadcast(_local(p.data), src=source, group=group)

    @torch.no_grad()
    def _sum_tied_grads(self, before: dict[int, torch.Tensor | None]) -> None:
        """Sum over the holding ranks the gradient each copy of a tied parameter gained since
        ``before`` (gradients may already hold earlier steps' sums)."""
        for p, _, group, _ in self._held_tied():
            if group is None:
                continue
            if p.grad is None:  # unused here this step: still joins the sum (no hang)
                p.grad = torch.zeros_like(p)
            align_grads([p])  # e.g. a vocab-parallel embedding's gradient is Replicate
            grad = _local(p.grad)
            earlier = before.get(id(p))
            if earlier is not None:
                grad.sub_(earlier)
            dist.all_reduce(grad, group=group)
            if earlier is not None:
                grad.add_(earlier)

    def _tied_grads_before(self) -> dict[int, torch.Tensor | None]:
        align_grads([p for p, *_ in self._held_tied() if p.grad is not None])
        return {
            id(p): (None if p.grad is None else _local(p.grad).clone())
            for p, _, group, _ in self._held_tied()
            if group is not None
        }

    def step(
        self,
        *inputs: torch.Tensor,
        target: torch.Tensor | None = None,
        losses: list[torch.Tensor] | None = None,
        block_args: Sequence[tuple] | None = None,
        finish: Callable[[], None] | None = None,
    ) -> torch.Tensor | None:
        """Run forward and backward of every micro-batch of ``inputs`` (see the module
        docstring for the gradient semantics). ``finish()``: run after the schedule, before
        the tied parameters' gradients are summed (e.g. the backward of the ``ahead`` modules,
        from the first stage's input gradient).

        Ranks with the first stage pass ``inputs`` (the whole batch); ranks with the last
        stage pass ``target`` and get ``losses`` filled with each micro-batch's ``loss_fn``
        value (unscaled). ``block_args`` (every rank): one tuple per micro-batch of extra
        positional arguments for each block (see :class:`StageModule`), e.g. the attention
        inputs of packed documents. Returns the merged output on the last stage, else ``None``.
        """
        return self._run(inputs, target, losses, block_args, backward=True, finish=finish)

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
        finish: Callable[[], None] | None = None,
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
        run = in_loss_context(
            self.schedule.step if backward else self.schedule.eval, self.parallelized
        )
        before = self._tied_grads_before() if backward else {}
        try:
            out = run(
                *args,
                target=target if self.has_last_stage else None,
                losses=scaled if self.has_last_stage else None,
            )
        finally:
            for module in self.modules:
                module.set_block_args(None)
        if finish is not None:
            finish()
        if backward:
            self._sum_tied_grads(before)
        if losses is not None:
            losses.extend(loss.unscaled for loss in scaled)
        return out if self.has_last_stage else None

    @property
    def zero(self) -> bool:
        """Whether ``stage_parallel`` asked for ZeRO-1/2 (the optimizer shards the stages)."""
        return bool(self.parallelized) and self.parallelized[0].data_parallel in (
            "zero1",
            "zero2",
        )

    def build_optimizer(
        self,
        optimizer_class: Callable[..., torch.optim.Optimizer],
        params: Any = None,
        **kwargs: Any,
    ) -> torch.optim.Optimizer:
        """``optimizer_class(params, **kwargs)`` over this rank's parameters (default: all of
        :meth:`parameters`), wrapped in a :class:`~forge_parallel.ZeroOptimizer` over the
        stage's data-parallel ranks for ``zero1`` / ``zero2``; the tied parameters' gradients,
        summed over the pipeline after the schedule, are reduced at the step."""
        params = self.parameters() if params is None else params
        if not self.zero:
            return optimizer_class(params, **kwargs)
        tied = [p for p, _, group, _ in self._held_tied() if group is not None]
        return self.parallelized[0].build_optimizer(
            optimizer_class, params, reduce_at_step=tied, **kwargs
        )

    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> torch.Tensor:
        """Clip by the global norm over all pipeline ranks (a collective on every rank); a
        tied parameter's gradient counts once. Under ZeRO the reduced gradients are the
        optimizer's shards: pass ``optimizer`` (from :meth:`build_optimizer`)."""
        if isinstance(optimizer, ZeroOptimizer):
            return optimizer.clip_grad_norm_(
                max_norm, norm_type, also_over=self.group, counted=self.norm_parameters()
            )
        if self.zero:
            raise ValueError(
                "the stages use ZeRO (stage_parallel data_parallel zero1/zero2): their reduced "
                "gradients live in the optimizer's shards; build it with "
                "Pipeline.build_optimizer and pass it as clip_grad_norm_(..., optimizer=opt)"
            )
        return pipeline_clip_grad_norm_(
            self.parameters(),
            max_norm,
            self.group,
            norm_type,
            counted=self.norm_parameters(),
        )


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


def _check_split_backward(config: PipelineConfig, stage_parallel: Mapping[str, Any]) -> None:
    """Zero-bubble schedules back-propagate through each block twice (input gradients, then
    weight gradients). A plain checkpoint recomputes its region in each pass (whole blocks,
    ``mode="full"``, or whole submodules, ``mode="selective"`` with ``modules`` and no
    ``ops``); torch's selective activation checkpointing (a per-op policy) allows one backward
    per region ("Trying to backward an extra time"), so refuse per-op policies (and automatic
    recompute, which may pick one)."""
    recompute = stage_parallel.get("recompute")
    mode = getattr(recompute, "mode", None)
    if config.schedule not in ("zero_bubble", "zbv") or mode not in ("selective", "auto"):
        return
    if mode == "auto":
        detail = "mode='auto' may choose a per-op policy"
    elif recompute.ops is not None:
        detail = f"mode='selective' with ops={recompute.ops!r} runs a per-op policy"
    elif not recompute.modules:
        detail = "mode='selective' without modules runs the 'attention' preset, a per-op policy"
    else:
        return  # whole submodules: plain checkpoints
    raise ValueError(
        f"schedule {config.schedule!r} splits the backward into input- and weight-gradient "
        f"passes through each block, but recompute {detail} (torch's selective activation "
        "checkpointing), which allows one backward per region. Checkpoint whole submodules "
        "instead: RecomputeConfig(mode='selective', modules=('attn', 'mlp')) without ops, or "
        "whole blocks: RecomputeConfig(mode='full'); or keep the per-op policy with "
        "schedule='1f1b' / 'interleaved_1f1b'"
    )


def _stage_class() -> type:
    """``PipelineStage`` telling its :class:`StageModule` which micro-batch each forward runs
    (for per-micro-batch block arguments), and splitting the backward of FSDP2 stages right
    (:mod:`forge_parallel.pipeline.split_backward`)."""
    from torch.distributed.pipelining import PipelineStage

    class _MicrobatchAwareStage(PipelineStage):
        def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any):
            self.submod.microbatch = fwd_chunk_id
            self.submod.in_schedule = True  # not the runtime's shape-inference forward
            try:
                return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            finally:
                self.submod.in_schedule = False

        def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, **kwargs: Any):
            # zero-bubble passes on FSDP2 stages: the weights are the unsharded parameters
            result = split_backward(self, backward_type, bwd_kwargs)
            if result is None:
                return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, **kwargs)
            return result

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


def _tied_weights(
    tied: list[TiedWeight],
    group: dist.ProcessGroup,
    config: PipelineConfig,
    indices: list[int],
    stage_parallel: Mapping[str, Any] | None,
) -> list[tuple[TiedWeight, dist.ProcessGroup | None, int]]:
    """The tied parameters of the split (``tied``), each with the group of the pipeline ranks
    holding it and the pipeline rank of its first user (a collective when a new group is
    needed)."""
    owners = stage_ranks(dist.get_world_size(group), config.virtual_stages, config.placement)
    out = []
    for weight in tied:
        users = [owners[s] for s in weight.stages]
        here = [s for s in weight.stages if s in indices]
        if stage_parallel is not None and len(here) > 1:
            raise ValueError(
                f"stages {here} on one rank share parameter {weight.name!r} (placement "
                f"{config.placement!r}); stage_parallel wraps each stage on its own and cannot "
                "share a parameter between them. Use placement='loop' (schedule 1f1b or "
                "interleaved_1f1b), untie the parameter, or drop stage_parallel"
            )
        out.append((weight, tied_group(group, users), owners[weight.first_stage]))
    return out


def pipeline(
    model: nn.Module,
    mesh_or_group: ParallelMesh | DeviceMesh | dist.ProcessGroup,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: PipelineConfig | None = None,
    stage_parallel: Mapping[str, Any] | None = None,
    sample_input: torch.Tensor | None = None,
    block_output: Callable[[str, Any, tuple], torch.Tensor] | None = None,
    post_forward: Callable[[StageModule, torch.Tensor, tuple], torch.Tensor] | None = None,
    also_used: Mapping[str, Sequence[int]] | None = None,
    ahead: Sequence[str] = (),
    carry: StageCarry | None = None,
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
    ``split="flops"``. ``block_output``: see :attr:`StageModule.block_output` (e.g. collect a
    MoE block's router output and return its hidden states). ``post_forward``: see
    :attr:`StageModule.post_forward` (e.g. compute the loss inside the last stage's forward).
    ``carry``: tensors passed from stage to stage beside the hidden states, their gradients
    sent back (see :class:`~forge_parallel.pipeline.stage_module.StageCarry`; e.g. running
    sums over the layers of all stages for a loss term the last stage computes).
    ``also_used``: modules that later stages use without a second name for their parameters
    (see :func:`~forge_parallel.pipeline.tied.find_tied_weights`), held and kept in sync there
    as tied parameters.
    ``ahead``: paths of pre-parts (e.g. the input embedding) the caller runs ahead of the
    schedule on the first stage's rank, passing their output (e.g. a vision-language model's
    text and visual embeddings) as the first stage's input. The first stage neither holds nor
    runs them and ``stage_parallel`` leaves them alone; :attr:`Pipeline.ahead` keeps them and
    counts their parameters as the rank's. A parameter they share with a later stage (a tied
    head) is kept in sync and summed as a tied one: parallelize them, then call
    :meth:`Pipeline.sync_tied_weights` (not called here), and run their backward in
    ``step(finish=...)``.
    """
    if config is None:
        config = PipelineConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError(f"pass either config= or its fields, not both: {sorted(config_kwargs)}")
    group, mesh = _resolve_group(mesh_or_group)
    pp, pp_rank = dist.get_world_size(group), dist.get_rank(group)
    indices, modules, layout, bounds, tied_weights = _split(
        model,
        pp=pp,
        pp_rank=pp_rank,
        config=config,
        sample_input=sample_input,
        also_used=also_used,
        ahead=ahead,
    )
    tied = _tied_weights(tied_weights, group, config, indices, stage_parallel)
    for module in modules:
        module.block_output = block_output
        module.post_forward = post_forward
        module.carry = carry
    parallelized = []
    if stage_parallel is not None:
        if mesh is None:
            raise ValueError("stage_parallel needs a ParallelMesh as mesh_or_group")
        _check_split_backward(config, stage_parallel)
        from forge_parallel.parallelize import find_blocks, parallelize
        from forge_parallel.recompute import stage_recompute

        recompute = stage_parallel.get("recompute")
        model_blocks = find_blocks(model, stage_parallel.get("blocks", layout.blocks_pattern))
        for module in modules:
            kwargs = dict(stage_parallel)
            if recompute is not None:  # a stage gets the modules patterns its blocks have
                stage_blocks = find_blocks(module, kwargs.get("blocks", layout.blocks_pattern))
                kwargs["recompute"] = stage_recompute(recompute, stage_blocks, model_blocks)
            if kwargs.get("plan") is not None:
                kwargs["plan"] = stage_plan(kwargs["plan"], module)
            if kwargs.get("expert_parallel") is not None:  # a stage may hold no MoE layer
                kwargs["expert_parallel"] = dataclasses.replace(
                    kwargs["expert_parallel"], missing_ok=True
                )
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
        scaled.unscaled = loss_value(loss)  # what Pipeline.step reports
        return scaled

    schedule_class = getattr(pipelining, SCHEDULES[config.schedule][0])
    single = issubclass(schedule_class, pipelining.schedules.PipelineScheduleSingle)
    schedule = schedule_class(
        stages[0] if single else stages,
        n_microbatches=m,
        loss_fn=scaled_loss,
        scale_grads=False,  # the loss is divided by m above, so .grad accumulates across steps
    )
    pipe = Pipeline(
        modules=modules,
        stage_indices=indices,
        stages=stages,
        schedule=schedule,
        group=group,
        config=config,
        layout=layout,
        bounds=bounds,
        parallelized=parallelized,
        tied=tied,
        ahead={path: model.get_submodule(path) for path in ahead} if 0 in indices else {},
    )
    if not ahead and not any(p.is_meta for p in pipe.parameters()):
        pipe.sync_tied_weights()
    return pipe
