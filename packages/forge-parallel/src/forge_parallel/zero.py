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
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    numel: int
    shard_size: int
    padded: int  # shard_size x ranks
    flat: torch.Tensor  # the parameters' storage (they are views of it)
    shard: nn.Parameter  # this rank's slice of the flattened bucket, in the master dtype
    ready: int = 0
    pending: bool = False  # stage 2: grads produced but not yet reduced
    hooks: list[Any] = field(default_factory=list)


class ZeroOptimizer(torch.optim.Optimizer):
    """Wrap ``optimizer_class`` (e.g. ``torch.optim.AdamW``) with ZeRO-1 or ZeRO-2 sharding.

    ``params`` are the model's parameters (or parameter-group dicts, whose options are kept per
    group); ``group`` is the data-parallel process group or mesh axis (``mesh["dp"]``).
    Parameters are broadcast from the group's first rank at construction, so every replica
    starts equal. ``master_dtype`` is the dtype of the owned shards and optimizer state
    (float32 master weights for bf16 parameters). ``bucket_numel`` caps the elements per
    flattened bucket (one reduce-scatter each).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        optimizer_class: Callable[..., torch.optim.Optimizer],
        *,
        group: GroupLike = None,
        stage: int = 1,
        master_dtype: torch.dtype = torch.float32,
        bucket_numel: int = 2**24,
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
        self._buckets: list[_Bucket] = []
        inner_groups = []
        for options in groups:
            for bucket in self._make_buckets(options["params"], bucket_numel):
                self._buckets.append(bucket)
                inner_groups.append({**options, "params": [bucket.shard]})
        self.optimizer = optimizer_class(inner_groups, **defaults)
        super().__init__([b.shard for b in self._buckets], self.optimizer.defaults)
        # Share the inner optimizer's groups and state (learning-rate schedulers edit these).
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        if stage == 2:
            for bucket in self._buckets:
                for p in bucket.params:
                    bucket.hooks.append(
                        p.register_post_accumulate_grad_hook(self._grad_ready_hook(bucket))
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
        return _Bucket(
            params=params,
            offsets=offsets,
            numel=total,
            shard_size=shard_size,
            padded=shard_size * self.world_size,
            flat=flat,
            shard=nn.Parameter(master),
        )

    # -- gradient reduction -----------------------------------------------------------
    def _grad_ready_hook(self, bucket: _Bucket) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            bucket.ready += 1
            bucket.pending = True
            if bucket.ready == len(bucket.params):
                self._reduce_bucket(bucket)

        return hook

    @torch.no_grad()
    def _reduce_bucket(self, bucket: _Bucket) -> None:
        """Reduce-scatter this bucket's local gradients and add them to the owned shard's."""
        p0 = bucket.params[0]
        flat = torch.zeros(bucket.padded, dtype=p0.dtype, device=p0.device)
        for p, off in zip(bucket.params, bucket.offsets, strict=True):
            if p.grad is not None:
                flat[off : off + p.numel()].copy_(p.grad.reshape(-1))
        shard_grad = torch.empty(bucket.shard_size, dtype=p0.dtype, device=p0.device)
        dist.reduce_scatter_tensor(shard_grad, flat, op=dist.ReduceOp.SUM, group=self.process_group)
        shard_grad = shard_grad.to(self.master_dtype).div_(self.world_size)
        if bucket.shard.grad is None:
            bucket.shard.grad = shard_grad
        else:
            bucket.shard.grad.add_(shard_grad)
        if self.stage == 2:
            for p in bucket.params:
                p.grad = None
        bucket.ready = 0
        bucket.pending = False

    def reduce_gradients(self) -> None:
        """Reduce every gradient not reduced yet (called by ``step`` and ``clip_grad_norm_``)."""
        for bucket in self._buckets:
            if self.stage == 1:
                if bucket.shard.grad is None:
                    self._reduce_bucket(bucket)
            elif bucket.pending:
                self._reduce_bucket(bucket)

    # -- optimizer interface ------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the reduced gradients by their global norm (over all shards); returns it."""
        self.reduce_gradients()
        grads = [b.shard.grad for b in self._buckets if b.shard.grad is not None]
        if not grads:
            return torch.tensor(0.0)
        norm_type = float(norm_type)
        if math.isinf(norm_type):
            local = torch.stack([g.abs().max() for g in grads]).max()
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=self.process_group)
            total = local
        else:
            # float64 accumulation, as forge_parallel.total_grad_norm (float32 norms on the
            # CPU lose about 1e-4 on large gradients).
            norms = [g.norm(norm_type, dtype=torch.float64) for g in grads]
            local = torch.stack(norms).pow(norm_type).sum()
            dist.all_reduce(local, op=dist.ReduceOp.SUM, group=self.process_group)
            total = local.pow(1.0 / norm_type).float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef)
        return total

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
        for bucket in self._buckets:
            bucket.shard.grad = None
            bucket.ready = 0
            bucket.pending = False
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
        raise ValueError("ZeroOptimizer got an empty parameter list")
    if isinstance(items[0], dict):
        return [{**g, "params": list(g["params"])} for g in items]
    return [{"params": items}]
