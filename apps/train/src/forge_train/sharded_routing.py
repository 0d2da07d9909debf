"""MoE routing statistics when a batch's tokens are split over ranks for the MoE layers.

Under context parallelism (each rank holds a shard of every sequence) and under tensor
parallelism with sequence parallelism (each rank runs the MoE layers on its sequence shard),
a rank's routers see only its tokens. The statistics the single process computes over the whole
batch are sums, so they are all-reduced over those ranks before use:

- the switch balance loss (Fedus et al. 2021, arXiv:2101.03961; transformers'
  ``load_balancing_loss_func``) from ``forge_kernels.moe.switch_balance_sums`` of every layer,
  summed over the ranks with Megatron's ``g`` (all-reduce forward, identity backward): each
  rank's routers get the gradient of their own tokens' share of the global loss;
- the expert-bias load (DeepSeek-V3's auxiliary-loss-free balancing), summed over them too
  (:class:`forge_train.expert_balance.ExpertBiasBalancer`).

DeepSeek-V3's sequence-wise balance loss needs per-sequence statistics of sequences cut over
the ranks and is refused there (``parallel.cp`` / ``parallel.sequence_parallel`` checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardedRouting", "sharded_routing"]


@dataclass(frozen=True)
class ShardedRouting:
    """``group``: the ranks over which each data-parallel batch's tokens are split for the MoE
    layers; ``top_k``: experts per token (``moe.num_experts_per_tok``). ``aux_scale``: what data parallelism's gradient average takes from the balance
    loss on top of the data-parallel ranks (the context-parallel size: FSDP averages over
    ``dp_shard x cp``; 1 under sequence parallelism, whose replicated router gradients are
    summed over the tensor-parallel ranks)."""

    group: Any
    top_k: int
    aux_scale: float = 1.0

    def switch_loss(self, stats) -> torch.Tensor:
        """The switch balance loss of the whole batch from this rank's ``moe_stats``."""
        from forge_core.collectives import reduce_from_group
        from forge_kernels.moe import switch_balance_loss_from_sums, switch_balance_sums

        if stats.router_logits is None:
            raise RuntimeError("the switch balance loss needs the router logits of the forward")
        sums = sum(switch_balance_sums(logits, top_k=self.top_k) for logits in stats.router_logits)
        total = reduce_from_group(sums, group=self.group)
        return switch_balance_loss_from_sums(total) * self.aux_scale


def sharded_routing(cfg, model_config, parallel) -> ShardedRouting | None:
    """The run's :class:`ShardedRouting`, or ``None`` when every rank's MoE layers see their
    data-parallel batch whole. ``parallel``: forge_parallel's ``ParallelizeResult``."""
    moe = getattr(model_config, "moe", None)
    mesh = getattr(parallel, "mesh", None)
    if moe is None or mesh is None or cfg.model.kind != "llm":
        return None
    if getattr(parallel, "context_parallel_handle", None) is not None:
        return ShardedRouting(
            group=mesh["cp"].get_group(), top_k=moe.num_experts_per_tok, aux_scale=mesh.size("cp")
        )
    if mesh.size("tp") > 1 and cfg.parallel.sequence_parallel:
        return ShardedRouting(group=mesh["tp"].get_group(), top_k=moe.num_experts_per_tok)
    return None
