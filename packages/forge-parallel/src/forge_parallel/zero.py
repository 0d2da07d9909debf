"""ZeRO stages 1 and 2: an optimizer wrapper that shards flattened parameters over the DP group.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models". Every rank keeps full parameters (as in DDP), but the parameters are flattened into
buckets (the parameters become views of one flat buffer per bucket), each bucket is padded and
split into one contiguous shard per rank, and each rank owns the optimizer state of its shard
only (and an fp32 master copy of it when the parameters are in a lower precision):

- **Stage 1** (optimizer state partitioning, ``P_os``): gradients accumulate locally in
  ``param.grad`` over micro-batches; :meth:`ZeroOptimizer.step` reduce-scatters each bucket's
  gradient to its owner, steps the owned shard and all-gathers the updated parameters.
  ``param.grad`` keeps this rank's local, unreduced gradient until ``zero_grad``.
- **Stage 2** (+ gradient partitioning, ``P_os+g``): as soon as backward has produced a whole
  bucket's gradient it is reduce-scattered and added to the owner's shard gradient, and the
  full gradients are freed (``param.grad`` is ``None`` afterwards), so the full gradient of
  the model never exists at once. Gradient accumulation adds into the shard gradients.

Both move the same bytes per step as DDP's all-reduce (a reduce-scatter plus an all-gather),
and are exact: the shard update is the same elementwise update a single process would make.
Gradient clipping must go through :meth:`ZeroOptimizer.clip_grad_norm_` (the reduced
gradients exist only as shards). ``state_dict()`` is this rank's shard.

**Parameters without a gradient.** Ranks may leave different parameters without a gradient in
a step (a vision tower on a rank whose micro-batches hold no image): a missing gradient counts
as zero in the sum over ranks, as in DDP. Every rank issues the same collectives in the same
order regardless: in stage 2 every backward reduces *every* bucket, in one order all ranks
agree on (the order in which the group's first rank completed them in the first backward,
broadcast then; a bucket is reduced as soon as it and the buckets before it are complete, the
rest at the end of the backward, with zeros for the gradients this rank did not produce). So
every rank's backward must reach at least one parameter of the optimizer (as DDP requires).
A parameter that got no gradient on *any* rank in a step is not updated at all (no momentum,
no weight decay, its optimizer state and step count untouched), as a single process skips a
parameter whose ``grad`` is ``None``: one all-reduce of a flag per parameter per step decides
it, and the owned shard is split at parameter boundaries into one inner optimizer parameter
per parameter slice (views of the shard), so the inner optimizer skips exactly those.

On pipeline stages (``forge_parallel.pipeline``, Megatron-LM's PP x distributed optimizer) each
stage's parameters are sharded over the stage's data-parallel ranks. Stage 1 reduces once per
step, after the schedule; stage 2 reduces each bucket after every micro-batch's backward (the
shard gradients add up: exact, at one reduce-scatter per micro-batch, the price of never
holding a stage's whole gradient). A parameter whose gradient is still changed after the
backward (a tied parameter, whose copies' gradients the pipeline sums after its schedule) is
passed as ``reduce_at_step``: it is bucketed apart and reduced at the step, as in stage 1. The
zero-bubble schedules' weight-gradient pass assigns ``.grad`` instead of accumulating it, so no
hook runs: stage 2 reduces such gradients at the step (exact; the stage's whole gradient then
exists until the step, as in stage 1). The norm covers all stages with
``clip_grad_norm_(also_over=pipeline group, counted=...)``. A stage with nothing to train
(every parameter frozen) gets an empty optimizer: its step does nothing, its clipping still
joins the norm's reductions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from forge_core.collectives import GroupLike, as_process_group

__all__ = ["ZeroOptimizer"]


@dataclass
class _Piece:
    """The part of parameter ``index`` (of its bucket) in this rank's shard: an inner
    optimizer parameter viewing ``shard[start : start + param.numel()]``."""

    index: int
    start: int
    param: nn.Parameter


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    shard_size: int
    padded: int  # shard_size x ranks
    flat: torch.Tensor  # the parameters' storage (they are views of it)
    shard: torch.Tensor  # this rank's slice of the flattened bucket, in the master dtype
    pieces: list[_Piece]  # the shard split at parameter boundaries (views of it)
    grad: torch.Tensor | None = None  # the reduced gradient of the shard (master dtype)
    had_grad: list[bool] = field(default_factory=list)  # per parameter, on this rank
    ready: int = 0
    pending: bool = False  # stage 2: grads produced but not yet reduced
    hooks: list[Any] = field(default_factory=list)


class ZeroOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer_class`` (e.g. ``torch.optim.AdamW``) with ZeRO-1 or ZeRO-2 sharding.

    ``params`` are the model's parameters (or parameter-group dicts, whose options are kept per
    group: ``param_groups`` has one group per group given, whose options, e.g. ``lr`` set by a
    scheduler, apply to that group's shards); ``group`` is the data-parallel process group or
    mesh axis (``mesh["dp"]``). The parameters given (trainable or frozen) are broadcast from
    the group's first rank at construction, so those start equal on every replica; parameters
    not given (e.g. frozen ones left out of the groups) are not: load or seed them alike.
    ``master_dtype`` is the dtype of the owned shards and optimizer state (float32 master
    weights for bf16 parameters). ``bucket_numel`` caps the elements per flattened bucket (one
    reduce-scatter each). ``reduce_at_step``: parameters whose gradients are reduced at the
    step in stage 2 too, each in a bucket of its own (see the module docstring). An empty
    parameter list (a pipeline stage with nothing to train) gives an optimizer with no buckets.
    """

    #: Read by forge-ckpt: this optimizer steps flat slices of the parameters, saved by
    #: parameter name through a collective on every rank, also one that owns no slice (a
    #: frozen pipeline stage, a shard of padding only).
    steps_flat_slices = True

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        *,
        group: GroupLike = None,
        stage: int = 1,
        master_dtype: torch.dtype = torch.float32,
        bucket_numel: int = 2**24,
        reduce_at_step: Iterable[nn.Parameter] = (),
        **defaults: Any,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(
                f"ZeroOptimizer implements ZeRO stages 1 and 2, got stage={stage}; stage 3 "
                "(sharded parameters) is FSDP: parallelize(..., data_parallel='fsdp')"
            )
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be positive, got {bucket_numel}")
        self.stage = stage
        self.process_group = as_process_group(group)
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        self.master_dtype = master_dtype
        groups = _normalize_groups(params)
        late = {id(p) for p in reduce_at_step}
        self._buckets: list[_Bucket] = []
        self._late: set[int] = set()  # ids of the buckets reduced at the step in stage 2
        inner_groups = []
        for options in groups:
            pieces: list[nn.Parameter] = []
            # Each late parameter in a bucket of its own: every pipeline rank holding a copy
            # shards it alike (equal optimizer state, stored once by a checkpoint).
            chunks = [([p for p in options["params"] if id(p) not in late], False)]
            chunks += [([p], True) for p in options["params"] if id(p) in late]
            for chunk, at_step in chunks:
                for bucket in self._make_buckets(chunk, bucket_numel):
                    self._buckets.append(bucket)
                    if at_step:
                        self._late.add(id(bucket))
                    pieces += [piece.param for piece in bucket.pieces]
            inner_groups.append({**options, "params": pieces})
        frozen = [p for g in groups for p in g["params"] if not p.requires_grad]
        self._broadcast_frozen(frozen, bucket_numel)
        self._device = _collective_device(self._buckets, self.process_group)
        self.optimizer = optimizer_class(inner_groups, **defaults)
        super().__init__([{"params": []}], self.optimizer.defaults)
        # Share the inner optimizer's groups and state (learning-rate schedulers edit these):
        # one group per group given, holding the slices of its parameters this rank owns.
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        # Stage 2's reduction rounds (one per backward), see _start_round.
        self._hooked = [b for b in self._buckets if stage == 2 and id(b) not in self._late]
        self._order: list[int] | None = None  # the agreed order of the hooked buckets
        self._first_done: list[int] = []  # completion order on this rank, first backward
        self._cursor = 0
        self._in_round = False
        self._synced = False  # the step's flags were all-reduced (see reduce_gradients)
        for index, bucket in enumerate(self._hooked):
            for p in bucket.params:
                bucket.hooks.append(
                    p.register_post_accumulate_grad_hook(self._grad_ready_hook(index, bucket))
                )

    # -- construction ------------------------------------------------------------------
    def _make_buckets(self, params: list[nn.Parameter], bucket_numel: int) -> list[_Bucket]:
        by_dtype: dict[torch.dtype, list[list[nn.Parameter]]] = {}
        for p in params:
            if isinstance(p, DTensor):
                raise ValueError(
                    "ZeroOptimizer shards plain (data-parallel replicated) parameters; a "
                    "DTensor parameter (tensor parallel / FSDP) cannot be flattened with "
                    "them. Use parallelize(..., data_parallel='fsdp') with tensor parallelism"
                )
            if not p.requires_grad:
                continue
            chunks = by_dtype.setdefault(p.dtype, [[]])
            if chunks[-1] and sum(x.numel() for x in chunks[-1]) + p.numel() > bucket_numel:
                chunks.append([])
            chunks[-1].append(p)
        buckets = []
        for chunk_list in by_dtype.values():
            for chunk in chunk_list:
                if chunk:
                    buckets.append(self._make_bucket(chunk))
        return buckets

    @torch.no_grad()
    def _make_bucket(self, params: list[nn.Parameter]) -> _Bucket:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        shard_size = math.ceil(total / self.world_size)
        dtype, device = params[0].dtype, params[0].device
        flat = torch.zeros(shard_size * self.world_size, dtype=dtype, device=device)
        for p, off in zip(params, offsets, strict=True):
            flat[off : off + p.numel()].copy_(p.reshape(-1))
        # Replicas must start equal: the first rank's values win.
        src = dist.get_global_rank(self.process_group, 0)
        dist.broadcast(flat, src=src, group=self.process_group)
        # The parameters become views of the flat buffer: the all-gather after each step
        # writes them in place.
        for p, off in zip(params, offsets, strict=True):
            p.data = flat[off : off + p.numel()].view_as(p)
        start = self.rank * shard_size
        owned = flat[start : start + shard_size]
        # Same dtype: the owned shard is a view too (no master copy); otherwise a fp32 copy.
        master = owned if self.master_dtype == dtype else owned.to(self.master_dtype).clone()
        # One inner parameter per parameter slice of the shard (views of it): the inner
        # optimizer can then skip a parameter without a gradient as a single process does.
        pieces = []
        for index, (p, off) in enumerate(zip(params, offsets, strict=True)):
            lo, hi = max(start, off), min(start + shard_size, off + p.numel())
            if lo < hi:
                piece = nn.Parameter(master[lo - start : hi - start])
                pieces.append(_Piece(index=index, start=lo - start, param=piece))
        return _Bucket(
            params=params,
            offsets=offsets,
            numel=total,
            shard_size=shard_size,
            padded=shard_size * self.world_size,
            flat=flat,
            shard=master,
            pieces=pieces,
            had_grad=[False] * len(params),
        )

    @torch.no_grad()
    def _broadcast_frozen(self, params: list[nn.Parameter], bucket_numel: int) -> None:
        """Broadcast the frozen parameters given (not sharded) from the first rank, coalesced
        per dtype in chunks of at most ``bucket_numel`` elements."""
        src = dist.get_global_rank(self.process_group, 0)
        by_dtype: dict[tuple[torch.dtype, torch.device], list[list[nn.Parameter]]] = {}
        for p in params:
            chunks = by_dtype.setdefault((p.dtype, p.device), [[]])
            if chunks[-1] and sum(x.numel() for x in chunks[-1]) + p.numel() > bucket_numel:
                chunks.append([])
            chunks[-1].append(p)
        for chunks in by_dtype.values():
            for chunk in chunks:
                flat = torch.cat([p.detach().reshape(-1) for p in chunk])
                dist.broadcast(flat, src=src, group=self.process_group)
                for p, part in zip(chunk, flat.split([p.numel() for p in chunk]), strict=True):
                    p.copy_(part.view_as(p))

    # -- gradient reduction -----------------------------------------------------------
    def _grad_ready_hook(self, index: int, bucket: _Bucket) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            if not self._in_round:
                self._start_round()
            bucket.ready += 1
            bucket.pending = True
            if bucket.ready == len(bucket.params):
                if self._order is None:
                    self._first_done.append(index)
                else:
                    self._reduce_ready()

        return hook

    def _start_round(self) -> None:
        """A backward reached this rank's parameters: every hooked bucket is reduced in this
        backward, the incomplete ones by :meth:`_end_round` at its end."""
        self._in_round = True
        self._cursor = 0
        self._synced = False
        torch.autograd.Variable._execution_engine.queue_callback(self._end_round)

    def _reduce_ready(self) -> None:
        """Reduce the complete buckets at the head of the agreed order."""
        assert self._order is not None
        while self._cursor < len(self._order):
            bucket = self._hooked[self._order[self._cursor]]
            if bucket.ready < len(bucket.params):
                break
            self._reduce_bucket(bucket)
            self._cursor += 1

    def _end_round(self) -> None:
        self._in_round = False
        if self._order is None:
            done = set(self._first_done)
            local = self._first_done + [i for i in range(len(self._hooked)) if i not in done]
            order = torch.tensor(local, dtype=torch.int64, device=self._device)
            src = dist.get_global_rank(self.process_group, 0)
            dist.broadcast(order, src=src, group=self.process_group)
            self._order = order.tolist()
        for position in range(self._cursor, len(self._order)):
            self._reduce_bucket(self._hooked[self._order[position]])
        self._cursor = len(self._order)

    @torch.no_grad()
    def _reduce_bucket(self, bucket: _Bucket) -> None:
        """Reduce-scatter this bucket's local gradients and add them to the owned shard's."""
        p0 = bucket.params[0]
        flat = torch.zeros(bucket.padded, dtype=p0.dtype, device=p0.device)
        for i, (p, off) in enumerate(zip(bucket.params, bucket.offsets, strict=True)):
            if p.grad is not None:
                flat[off : off + p.numel()].copy_(p.grad.reshape(-1))
                bucket.had_grad[i] = True
        shard_grad = torch.empty(bucket.shard_size, dtype=p0.dtype, device=p0.device)
        dist.reduce_scatter_tensor(shard_grad, flat, op=dist.ReduceOp.SUM, group=self.process_group)
        shard_grad = shard_grad.to(self.master_dtype).div_(self.world_size)
        if bucket.grad is None:
            bucket.grad = shard_grad
        else:
            bucket.grad.add_(shard_grad)
        if self.stage == 2 and id(bucket) not in self._late:
            for p in bucket.params:
                p.grad = None
        bucket.ready = 0
        bucket.pending = False

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce every gradient not reduced yet (called by ``step`` and ``clip_grad_norm_``).

        One all-reduce of flags makes the decisions rank-independent: which stage-2 buckets
        hold a gradient no hook saw on some rank, and which parameters got a gradient on some
        rank in this step (the others are not updated)."""
        if self._synced or not self._buckets:
            return
        hooked = {id(b) for b in self._hooked}
        local = [
            float(b.pending or any(p.grad is not None for p in b.params)) for b in self._hooked
        ]
        for bucket in self._buckets:
            local += [
                float(had or p.grad is not None)
                for had, p in zip(bucket.had_grad, bucket.params, strict=True)
            ]
        flags = torch.tensor(local, dtype=torch.float32, device=self._device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.process_group)
        flags = flags.bool().tolist()
        unreduced, had_any = flags[: len(self._hooked)], flags[len(self._hooked) :]
        index = 0
        for bucket in self._buckets:
            if id(bucket) not in hooked:
                if bucket.grad is None:
                    self._reduce_bucket(bucket)
            elif unreduced[index]:
                # a gradient no hook saw (assigned, not accumulated: e.g. torch's split
                # weight-gradient pass of the zero-bubble schedules) is reduced here
                self._reduce_bucket(bucket)
            index += id(bucket) in hooked
        for bucket in self._buckets:
            n = len(bucket.params)
            bucket.had_grad, had_any = had_any[:n], had_any[n:]
            for piece in bucket.pieces:
                # The inner parameters' gradients are views of the reduced shard gradient (a
                # gradient scaler unscales them in place). No gradient on any rank: none, so
                # the inner optimizer skips it as a single process skips grad None.
                piece.param.grad = (
                    bucket.grad[piece.start : piece.start + piece.param.numel()]
                    if bucket.had_grad[piece.index] and bucket.grad is not None
                    else None
                )
        self._synced = True

    # -- optimizer interface ------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        *,
        also_over: dist.ProcessGroup | None = None,
        counted: Iterable[nn.Parameter] | None = None,
    ) -> torch.Tensor:
        """Clip the reduced gradients by their global norm (over all shards); returns it.

        ``also_over``: a group of ranks holding *other* parameters (the pipeline group), over
        which the norm is reduced too. ``counted``: the parameters whose gradients make up the
        norm (default all; leave out the extra copies of a parameter several pipeline ranks
        hold, ``Pipeline.norm_parameters``); every gradient is scaled.
        """
        self.reduce_gradients()
        grads = [b.grad for b in self._buckets if b.grad is not None]
        parts = self._counted_grads(counted)
        norm_type = float(norm_type)
        # every rank joins the reductions, also one whose shards got no gradient
        device = self._device
        if math.isinf(norm_type):
            maxima = [g.abs().max().double() for g in parts if g.numel()]
            local = torch.stack(maxima).max() if maxima else torch.zeros((), dtype=torch.float64)
            local = local.to(device)
            for group in (self.process_group, also_over):
                if group is not None:
                    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
            total = local.float()
        else:
            # float64 accumulation, as forge_parallel.total_grad_norm (float32 norms on the
            # CPU lose about 1e-4 on large gradients).
            local = torch.zeros((), dtype=torch.float64, device=device)
            for g in parts:
                local += g.norm(norm_type, dtype=torch.float64).pow(norm_type)
            for group in (self.process_group, also_over):
                if group is not None:
                    dist.all_reduce(local, op=dist.ReduceOp.SUM, group=group)
            total = local.pow(1.0 / norm_type).float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total

    def _counted_grads(self, counted: Iterable[nn.Parameter] | None) -> list[torch.Tensor]:
        """The parts of this rank's shard gradients that belong to ``counted`` parameters (all
        of them when ``None``): per parameter, its overlap with the owned slice."""
        buckets = [b for b in self._buckets if b.grad is not None]
        if counted is None:
            return [b.grad for b in buckets]
        keep = {id(p) for p in counted}
        parts = []
        for bucket in buckets:
            if all(id(p) in keep for p in bucket.params):
                parts.append(bucket.grad)  # the padding is zero
                continue
            for piece in bucket.pieces:
                if id(bucket.params[piece.index]) in keep:
                    parts.append(bucket.grad[piece.start : piece.start + piece.param.numel()])
        return parts

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.reduce_gradients()
        self.optimizer.step()
        self._gather_params()
        return loss

    @torch.no_grad()
    def _gather_params(self) -> None:
        for bucket in self._buckets:
            # A copy: the input of the all-gather must not alias its output.
            owned = bucket.shard.detach().to(bucket.flat.dtype, copy=True)
            dist.all_gather_into_tensor(bucket.flat, owned, group=self.process_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._synced = False
        for bucket in self._buckets:
            bucket.grad = None
            bucket.had_grad = [False] * len(bucket.params)
            bucket.ready = 0
            bucket.pending = False
            for piece in bucket.pieces:
                piece.param.grad = None
            for p in bucket.params:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard of the optimizer state (load it on the same rank and layout)."""
        return {
            "zero": {"stage": self.stage, "world_size": self.world_size, "rank": self.rank},
            "optimizer": self.optimizer.state_dict(),
            "master": [b.shard.detach().clone() for b in self._buckets],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict["zero"]
        if (meta["world_size"], meta["rank"]) != (self.world_size, self.rank):
            raise ValueError(
                f"this ZeRO state is rank {meta['rank']} of {meta['world_size']}, but the "
                f"optimizer is rank {self.rank} of {self.world_size}; load it on the same layout"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        for bucket, master in zip(self._buckets, state_dict["master"], strict=True):
            bucket.shard.copy_(master)
        self._gather_params()

    def __repr__(self) -> str:
        numel = sum(b.numel for b in self._buckets)
        return (
            f"ZeroOptimizer(stage={self.stage}, ranks={self.world_size}, "
            f"buckets={len(self._buckets)}, params={numel}, shard={sum(b.shard_size for b in self._buckets)}, "
            f"inner={type(self.optimizer).__name__})"
        )


def _normalize_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ValueError(
            "ZeroOptimizer got an empty parameter list; for a model part with nothing to "
            'train (a frozen pipeline stage) pass one empty group: [{"params": []}]'
        )
    if isinstance(items[0], dict):
        return [{**g, "params": list(g["params"])} for g in items]
    return [{"params": items}]


def _collective_device(buckets: list[_Bucket], group: dist.ProcessGroup) -> torch.device:
    """The device of the flags and norms this optimizer reduces: its buckets', or (no buckets)
    the current CUDA device when ``group`` runs on NCCL, else the CPU."""
    if buckets:
        return buckets[0].flat.device
    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
