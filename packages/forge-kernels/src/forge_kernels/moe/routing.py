"""Top-k gating for mixture-of-experts layers, with group-limited and aux-loss-free routing.

A router maps each token's logits over ``E`` experts to ``k`` chosen experts and their weights:

1. scores: ``softmax`` over the experts (Switch Transformer, Fedus et al. 2021, arXiv:2101.03961;
   GShard, Lepikhin et al. 2020, arXiv:2006.16668; Qwen2-MoE / Qwen3-MoE) or an independent
   ``sigmoid`` per expert (DeepSeek-V3 technical report, DeepSeek-AI 2024, arXiv:2412.19437);
2. selection: the top ``k`` experts by score plus an optional per-expert ``expert_bias``, which
   steers *which* experts are chosen but not their weights (auxiliary-loss-free load balancing,
   Wang et al. 2024, arXiv:2408.15664). With ``n_group``/``topk_group`` the selection is first
   limited to the ``topk_group`` best of ``n_group`` expert groups, a group scored by the sum of
   its two best (biased) scores: DeepSeek-V3's node-limited routing;
3. weights: the *unbiased* scores of the chosen experts, optionally renormalised to sum to one
   (``norm_topk_prob``), then multiplied by ``routed_scaling_factor``.

The numerics are those of transformers: ``Qwen3MoeTopKRouter`` / ``Qwen2MoeTopKRouter`` (softmax in
fp32, sorted top-k, ``norm_topk_prob``, weights cast back to the logits' dtype) and
``DeepseekV3TopkRouter`` (sigmoid, bias for selection only, group-limited top-k, normalisation with
a ``1e-20`` guard, scaling). The guard is applied in softmax mode too, where it cannot change a
result: the sum of the top-k softmax probabilities is at least ``1/E``, far above ``1e-20 / eps``.

The op also returns the per-expert token counts (for load statistics, the aux-loss-free bias update
:func:`update_expert_bias`, and the permutation / expert-parallel split sizes) and the full score
matrix (for the auxiliary losses in :mod:`forge_kernels.moe.balancing`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from forge_kernels import registry

__all__ = [
    "MoERouting",
    "count_tokens_per_expert",
    "moe_topk_routing",
    "moe_topk_routing_reference",
    "update_expert_bias",
]

ScoreFunc = Literal["softmax", "sigmoid"]

#: Added to the sum of the selected weights before normalising (as transformers' DeepSeek-V3).
NORM_EPS = 1e-20


class MoERouting(NamedTuple):
    """What :func:`moe_topk_routing` returns.

    Attributes:
        weights: ``[tokens, top_k]`` routing weights in the dtype of the router logits,
            differentiable w.r.t. them.
        indices: ``[tokens, top_k]`` int64 expert ids, ordered by descending selection score.
        tokens_per_expert: ``[experts]`` int64 number of (token, slot) assignments per expert.
        scores: ``[tokens, experts]`` fp32 scores (softmax probabilities or sigmoid affinities)
            before any bias, differentiable; the input of the auxiliary losses.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    tokens_per_expert: torch.Tensor
    scores: torch.Tensor


def count_tokens_per_expert(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[num_experts]`` counts of the expert ids in ``indices`` (any shape).

    Uses an integer ``scatter_add`` (exact and deterministic, no host sync, unlike
    ``torch.bincount`` on CUDA). Ids outside ``[0, num_experts)`` are an error of the caller.
    """
    counts = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
    flat = indices.reshape(-1).to(torch.int64)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


def _check_routing_args(
    router_logits: torch.Tensor,
    top_k: int,
    score_func: str,
    n_group: int | None,
    topk_group: int | None,
    expert_bias: torch.Tensor | None,
) -> None:
    if router_logits.dim() != 2:
        raise ValueError(
            "moe_topk_routing needs router logits of shape [tokens, experts], got "
            f"{tuple(router_logits.shape)}; flatten the batch with logits.reshape(-1, num_experts)"
        )
    if not router_logits.is_floating_point():
        raise ValueError(f"router logits must be floating point, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"top_k must be between 1 and the number of experts ({num_experts}), got {top_k}; "
            "lower top_k (num_experts_per_tok) or add experts"
        )
    if score_func not in ("softmax", "sigmoid"):
        raise ValueError(f"score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
    if (n_group is None) != (topk_group is None):
        raise ValueError(
            "group-limited routing needs both n_group and topk_group (or neither), got "
            f"n_group={n_group}, topk_group={topk_group}"
        )
    if n_group is not None:
        if n_group < 1 or num_experts % n_group:
            raise ValueError(
                f"n_group={n_group} must be a positive divisor of the number of experts "
                f"({num_experts}); pick n_group from "
                f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
            )
        if not 1 <= topk_group <= n_group:
            raise ValueError(
                f"topk_group must be between 1 and n_group ({n_group}), got {topk_group}; "
                "topk_group is how many of the n_group expert groups each token may use"
            )
        reachable = topk_group * (num_experts // n_group)
        if top_k > reachable:
            raise ValueError(
                f"top_k={top_k} exceeds the {reachable} experts in the topk_group={topk_group} "
                f"best groups of size {num_experts // n_group}; raise topk_group or lower top_k"
            )
    if expert_bias is not None and tuple(expert_bias.shape) != (num_experts,):
        raise ValueError(
            f"expert_bias must have shape ({num_experts},) (one entry per expert), "
            f"got {tuple(expert_bias.shape)}"
        )


def _select_experts(
    scores: torch.Tensor,
    top_k: int,
    n_group: int | None,
    topk_group: int | None,
    expert_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Expert ids ``[tokens, top_k]`` chosen by the (biased, group-limited) scores."""
    choice = scores if expert_bias is None else scores + expert_bias
    num_tokens, num_experts = choice.shape
    if n_group is not None and n_group > 1:
        group_size = num_experts // n_group
        grouped = choice.view(num_tokens, n_group, group_size)
        # A group's score: the sum of its two best experts (its only expert if it has one).
        group_scores = grouped.topk(min(2, group_size), dim=-1).values.sum(dim=-1)
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
        group_mask.scatter_(1, group_idx, True)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf"))
        choice = choice.view(num_tokens, num_experts)
    return choice.topk(top_k, dim=-1).indices


def moe_topk_routing_reference(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    score_func: ScoreFunc = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    n_group: int | None = None,
    topk_group: int | None = None,
    expert_bias: torch.Tensor | None = None,
) -> MoERouting:
    """Eager PyTorch top-k routing; the numerics of :func:`moe_topk_routing` (see there)."""
    _check_routing_args(router_logits, top_k, score_func, n_group, topk_group, expert_bias)
    compute_dtype = torch.promote_types(router_logits.dtype, torch.float32)
    logits = router_logits.to(compute_dtype)
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    with torch.no_grad():  # the choice is discrete: no gradient flows through the bias or top-k
        indices = _select_experts(scores.detach(), top_k, n_group, topk_group, expert_bias)
    weights = scores.gather(1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + NORM_EPS)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return MoERouting(
        weights=weights.to(router_logits.dtype),
        indices=indices,
        tokens_per_expert=count_tokens_per_expert(indices, router_logits.shape[1]),
        scores=scores,
    )


registry.define_op(
    "moe_topk_routing",
    # A handful of small [tokens, experts] torch ops (topk included): the eager code is the default.
    default=moe_topk_routing_reference,
    reference=moe_topk_routing_reference,
    doc="MoE top-k gating: softmax/sigmoid scores, group-limited top-k, aux-loss-free bias.",
)


def moe_topk_routing(
    router_logits: torch.Tensor,
    *,
    top_k: int,
    score_func: ScoreFunc = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    n_group: int | None = None,
    topk_group: int | None = None,
    expert_bias: torch.Tensor | None = None,
) -> MoERouting:
    """Choose ``top_k`` experts per token and their weights from router logits.

    Args:
        router_logits: ``[tokens, experts]`` logits of the router (``hidden @ router_weight.T``);
            scores are computed in fp32 (fp64 for fp64 input).
        top_k: experts per token (``num_experts_per_tok``).
        score_func: ``"softmax"`` (Switch / Qwen-MoE / Mixtral) or ``"sigmoid"`` (DeepSeek-V3).
        norm_topk_prob: renormalise the chosen weights to sum to one per token.
        routed_scaling_factor: multiplies the weights (DeepSeek-V3's ``routed_scaling_factor``),
            after the normalisation.
        n_group, topk_group: group-limited routing (DeepSeek-V3): split the experts into
            ``n_group`` equal groups, keep the ``topk_group`` groups with the largest sum of their
            two best biased scores, and choose the ``top_k`` experts within those.
        expert_bias: ``[experts]`` bias added to the scores for the *selection only*
            (aux-loss-free balancing, Wang et al. 2024; transformers'
            ``e_score_correction_bias``). Update it with :func:`update_expert_bias`.

    Returns:
        :class:`MoERouting` ``(weights, indices, tokens_per_expert, scores)``. ``weights`` have the
        logits' dtype (transformers casts Qwen-MoE's weights back to it; DeepSeek-V3's logits are
        fp32) and are differentiable; ``indices`` are sorted by descending selection score.

    Raises:
        ValueError: ``top_k`` larger than the experts (or than those in ``topk_group`` groups),
            ``n_group`` not dividing the experts, ``topk_group`` outside ``[1, n_group]``.

    Dispatches through ``registry.get_op("moe_topk_routing")``.
    """
    return registry.get_op("moe_topk_routing")(
        router_logits,
        top_k=top_k,
        score_func=score_func,
        norm_topk_prob=norm_topk_prob,
        routed_scaling_factor=routed_scaling_factor,
        n_group=n_group,
        topk_group=topk_group,
        expert_bias=expert_bias,
    )


@torch.no_grad()
def update_expert_bias(
    expert_bias: torch.Tensor, tokens_per_expert: torch.Tensor, *, update_rate: float = 1e-3
) -> torch.Tensor:
    """Aux-loss-free balancing step (Wang et al. 2024): ``bias += rate * sign(mean_load - load)``.

    Overloaded experts (above the mean load) get a lower selection bias, underloaded ones a higher.
    Call it once per optimizer step with the counts of the whole global batch (sum
    ``tokens_per_expert`` over micro-batches, and all-reduce it over data-parallel ranks first, so
    every rank applies the same update). DeepSeek-V3 uses ``update_rate=1e-3`` for most of training.

    Updates ``expert_bias`` in place and returns it.
    """
    if tokens_per_expert.shape != expert_bias.shape or expert_bias.dim() != 1:
        raise ValueError(
            "update_expert_bias needs expert_bias and tokens_per_expert of the same shape "
            f"[experts], got {tuple(expert_bias.shape)} and {tuple(tokens_per_expert.shape)}"
        )
    load = tokens_per_expert.to(torch.float32)
    step = torch.sign(load.mean() - load) * update_rate
    return expert_bias.add_(step.to(expert_bias.dtype))
