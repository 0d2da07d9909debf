"""The experts-module protocol, and the expert-parallel forward that replaces its forward.

A MoE layer gets expert parallelism from forge-parallel when its experts follow
:class:`ExpertsModule` (duck typing; forge-models' ``MoEExperts`` does; transformers' expert
modules such as ``Qwen3MoeExperts`` and ``MixtralExperts`` do not: they route inside
``forward(hidden_states, top_k_index, top_k_weights)`` and hold an ``act_fn`` submodule, and
:func:`~forge_parallel.expert_parallel.apply_ep` refuses them):

- every parameter is stacked along dim 0 over the experts (``[E, ...]``), and
- ``forward(x_sorted, tokens_per_expert)`` takes rows grouped by expert in expert order (the
  output of ``moe_permute``) with ``[E]`` group sizes, returns one output row per input row
  in the same order, and reads the number of experts from its weights (so the same code runs
  ``L`` local experts on ``[L]`` group sizes).

The router, the permutation and the weighted un-permutation stay where they are, on every
rank, untouched. :func:`~forge_parallel.expert_parallel.apply_ep` keeps each rank's ``L``
experts (``DTensor`` parameters, ``Shard(0)`` over ``ep``) and swaps the module's class for
one whose forward is ``combine(experts(dispatch(x)))`` (:mod:`.dispatch`, :mod:`.overlap`).

With expert tensor parallelism (``etp > 1``, Megatron-Core's expert layout) each expert's
weights are also split over ``etp`` ranks that hold the same tokens: the input enters with
Megatron's ``f`` (identity; backward all-reduce) and the partial output of the row-parallel
projection leaves with ``g`` (all-reduce), as in Shoeybi et al. 2019. When the ``etp`` ranks
route different tokens (sequence parallelism, ``EPConfig.sequence_parallel``), each rank's
dispatched rows are first gathered over ``etp`` and regrouped by expert, and the partial
outputs are reduce-scattered back (:func:`gather_over_etp`), as Megatron-Core's all-to-all
dispatcher does with sequence parallelism (Korthikanti et al. 2022, arXiv:2205.05198).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from forge_core.collectives import copy_to_group, reduce_from_group
from forge_parallel.expert_parallel.dispatch import (
    combine,
    dispatch,
    exchange_counts,
    plan_dispatch,
    plan_from_counts,
)
from forge_parallel.expert_parallel.overlap import chunked_expert_forward
from forge_parallel.replay_checkpoint import _is_selective_checkpoint_mode, recomputed_whole

__all__ = ["ExpertParallelExperts", "ExpertsModule", "gather_over_etp"]


@runtime_checkable
class ExpertsModule(Protocol):
    """What expert parallelism needs of a MoE layer's experts module (see the module docs)."""

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor: ...


@contextlib.contextmanager
def _local_parameters(module: nn.Module) -> Iterator[None]:
    """Let the wrapped forward see each DTensor parameter as its local shard (differentiably)."""
    saved = dict(module._parameters)
    try:
        for name, param in saved.items():
            if isinstance(param, DTensor):
                module._parameters[name] = param.to_local()
        yield
    finally:
        module._parameters.update(saved)


class EPState:
    """What the expert-parallel forward of one experts module needs."""

    def __init__(
        self,
        *,
        ep_group: dist.ProcessGroup,
        etp_group: dist.ProcessGroup | None,
        num_experts: int,
        num_chunks: int,
        etp_sequence_parallel: bool = False,
    ) -> None:
        self.ep_group = ep_group
        self.etp_group = etp_group
        self.num_experts = num_experts
        self.num_chunks = num_chunks
        self.etp_sequence_parallel = etp_sequence_parallel

    def __repr__(self) -> str:
        ep = dist.get_world_size(self.ep_group)
        etp = 1 if self.etp_group is None else dist.get_world_size(self.etp_group)
        return (
            f"EPState(ep={ep}, etp={etp}, num_experts={self.num_experts}, "
            f"num_chunks={self.num_chunks}, etp_sequence_parallel={self.etp_sequence_parallel})"
        )


def gather_over_etp(
    x_local: torch.Tensor,
    local_counts: torch.Tensor,
    experts_forward,
    *,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """``experts_forward`` on the rows of every rank of the expert-tensor-parallel ``group``,
    returning this rank's rows' whole outputs (differentiable).

    ``x_local``: this rank's rows grouped by local expert, ``local_counts`` ``[L]`` their group
    sizes; the ranks' rows differ (each routed its own sequence shard). Every rank sends its
    rows to every rank (an all-gather written as the dispatch's exchange, which regroups the
    received rows by expert: :func:`~.dispatch.plan_from_counts`), ``experts_forward`` computes
    this rank's share of each expert on all of them (a partial sum: the row-parallel
    projection), and the combine sends each rank the partial outputs of its rows, summed here:
    a reduce-scatter. The adjoint of sending ``etp`` copies is the sum of their gradients, so
    the input gradient is whole.
    """
    etp = dist.get_world_size(group)
    send = local_counts.to("cpu", torch.int64).view(1, -1).expand(etp, -1).contiguous()
    recv = exchange_counts(send, group).cpu()
    plan = plan_from_counts(send, recv, group, device=x_local.device)
    gathered = dispatch(x_local.repeat(etp, 1), plan)
    partial = experts_forward(gathered, plan.local_tokens_per_expert)
    return combine(partial, plan).view(etp, x_local.shape[0], *partial.shape[1:]).sum(dim=0)


def _policy_modes() -> tuple[Any, ...]:
    """The selective checkpoint dispatch modes (a per-op policy's caching or cached mode, auto
    recompute's measurement) on top of the dispatch mode stack, outermost first: what
    :func:`~forge_parallel.replay_checkpoint.recomputed_whole` takes off."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    stack = _get_current_dispatch_mode_stack()
    top = len(stack)
    while top and _is_selective_checkpoint_mode(stack[top - 1]):
        top -= 1
    return tuple(stack[top:])


@contextlib.contextmanager
def _pushed(modes: tuple[Any, ...]) -> Iterator[None]:
    """Put ``modes`` (outermost first) back on the dispatch mode stack while inside."""
    from torch.utils._python_dispatch import _pop_mode, _push_mode

    for mode in modes:
        _push_mode(mode)
    try:
        yield
    finally:
        for _ in modes:
            _pop_mode()


class ExpertParallelExperts:
    """Mixed into an experts module's class by ``apply_ep``: expert-parallel forward.

    Reads ``self._forge_ep`` (the :class:`EPState` set by ``apply_ep``). Under
    ``torch.compile`` the forward runs eagerly, outside the graph (one graph break per MoE
    layer): its all-to-alls have data-dependent split sizes (``.tolist()`` of the exchanged
    counts) and the local experts data-dependent group sizes, so tracing them would break
    the graph at every one and recompile on new counts. The router, the permutation and
    the rest of the block stay compiled (torchtitan keeps its MoE token dispatch out of
    the graph the same way).

    Under a per-op recompute policy (``RecomputeConfig(ops=...)``, ``mode="auto"``) the
    module's hooks run outside the policy and its forward inside it. The hooks are FSDP's
    when the experts are sharded over ``edp`` (``apply_fsdp(..., experts=...)``, a unit nested
    in the checkpointed block). What they do depends on FSDP's state, which differs between
    the forward and the recomputation inside backward (unshard or not, reshard or not), and
    so does the number of ops they issue (profiler ranges, all-gather copies): a policy keyed
    by each op's call count (PyTorch's cache, auto's plan) then looks up the wrong call or
    none ("profiler._record_function_enter_new.default invocation index 2 encountered during
    backward but not found in storage"). Outside the policy they run as under a full
    checkpoint. The forward (count exchange, dispatch, experts, combine) issues the same ops
    in both passes, so the policy decides on those; its in-place all-to-alls follow their
    receive buffers (recomputed with them, the exchanges run again in backward, in the same
    order on every rank, as under full recompute).
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        modes = _policy_modes()
        if not modes:
            return super().__call__(*args, **kwargs)
        self._forge_ep_policy_modes = modes
        try:
            with recomputed_whole():
                return super().__call__(*args, **kwargs)
        finally:
            del self._forge_ep_policy_modes

    @torch.compiler.disable
    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        modes = self.__dict__.get("_forge_ep_policy_modes", ())
        with _pushed(modes):
            return self._expert_parallel_forward(x_sorted, tokens_per_expert)

    def _expert_parallel_forward(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor
    ) -> torch.Tensor:
        state = self._forge_ep
        if tokens_per_expert.numel() != state.num_experts:
            raise ValueError(
                f"expert-parallel experts expect tokens_per_expert for all {state.num_experts} "
                f"experts, got {tokens_per_expert.numel()}"
            )
        base_forward = super().forward

        def compute(x_local: torch.Tensor, local_counts: torch.Tensor) -> torch.Tensor:
            if state.etp_group is None:
                return base_forward(x_local, local_counts)
            if state.etp_sequence_parallel:
                return gather_over_etp(x_local, local_counts, base_forward, group=state.etp_group)
            x_local = copy_to_group(x_local, group=state.etp_group)
            return reduce_from_group(base_forward(x_local, local_counts), group=state.etp_group)

        with _local_parameters(self):
            if state.num_chunks == 1:
                plan = plan_dispatch(
                    tokens_per_expert, x_sorted.shape[0], state.ep_group, device=x_sorted.device
                )
                y_local = compute(dispatch(x_sorted, plan), plan.local_tokens_per_expert)
                return combine(y_local, plan)
            return chunked_expert_forward(
                x_sorted,
                tokens_per_expert,
                compute,
                group=state.ep_group,
                num_chunks=state.num_chunks,
            )
