"""Mixture-of-experts ops: routing, balancing losses, token permutation and grouped GEMM.

A dropless MoE layer (MegaBlocks, Gale et al. 2022) composes them as::

    routing = moe_topk_routing(hidden @ router_weight.T, top_k=8, norm_topk_prob=True)
    perm = moe_permute(hidden, routing.indices, num_experts=E)
    gate_up = grouped_mm(perm.hidden, gate_up_proj, perm.tokens_per_expert, transpose_weight=True)
    act = swiglu(*gate_up.chunk(2, dim=-1))
    expert_out = grouped_mm(act, down_proj, perm.tokens_per_expert, transpose_weight=True)
    out = moe_unpermute(expert_out, perm.slot_positions, routing_weights=routing.weights)
    aux = load_balancing_loss(routing.scores, routing.tokens_per_expert)

Importing this package registers the ``"moe_topk_routing"``, ``"moe_permute"``,
``"moe_unpermute"`` and ``"grouped_mm"`` ops in :mod:`forge_kernels.registry`. It does not need
Triton: the grouped GEMM's Triton kernels are imported on first use.
"""

from forge_kernels.moe.balancing import (
    load_balancing_loss,
    load_balancing_loss_from_logits,
    router_z_loss,
    sequence_balance_loss,
    sequence_balance_loss_from_sums,
    sequence_balance_sums,
    switch_balance_loss_from_sums,
    switch_balance_sums,
)
from forge_kernels.moe.grouped_gemm import (
    BACKEND_CALLS,
    grouped_mm,
    grouped_mm_backend,
    grouped_mm_reference,
)
from forge_kernels.moe.permute import (
    MoEPermutation,
    moe_permute,
    moe_permute_reference,
    moe_unpermute,
    moe_unpermute_reference,
)
from forge_kernels.moe.routing import (
    MoERouting,
    count_tokens_per_expert,
    moe_topk_routing,
    moe_topk_routing_reference,
    update_expert_bias,
)

__all__ = [
    "BACKEND_CALLS",
    "MoEPermutation",
    "MoERouting",
    "count_tokens_per_expert",
    "grouped_mm",
    "grouped_mm_backend",
    "grouped_mm_reference",
    "load_balancing_loss",
    "load_balancing_loss_from_logits",
    "moe_permute",
    "moe_permute_reference",
    "moe_topk_routing",
    "moe_topk_routing_reference",
    "moe_unpermute",
    "moe_unpermute_reference",
    "router_z_loss",
    "sequence_balance_loss",
    "sequence_balance_loss_from_sums",
    "sequence_balance_sums",
    "switch_balance_loss_from_sums",
    "switch_balance_sums",
    "update_expert_bias",
]
