"""Auxiliary losses that keep a mixture-of-experts router balanced and its logits small.

- :func:`load_balancing_loss` / :func:`load_balancing_loss_from_logits`: the Switch Transformer
  loss (Fedus et al. 2021, arXiv:2101.03961, eqs. 4-6; GShard, Lepikhin et al. 2020,
  arXiv:2006.16668), ``num_experts * sum_i f_i * P_i`` with ``f_i`` the fraction of tokens sent to
  expert ``i`` and ``P_i`` its mean router probability. The ``_from_logits`` form is transformers'
  ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE), cast for cast; as there, with top-k
  routing ``f_i`` counts every (token, slot) assignment, so a perfectly balanced router scores
  ``top_k`` (Megatron-LM divides by ``top_k`` to score 1).
- :func:`sequence_balance_loss`: DeepSeek-V3's complementary sequence-wise balance loss
  (DeepSeek-V3 technical report 2024, arXiv:2412.19437, eqs. 17-20), the same product computed per
  sequence on normalised affinities and scaled so that balance scores 1. Multiply by the small
  ``alpha`` yourself (DeepSeek-V3 uses 1e-4). It is formed from per-document sums
  (:func:`sequence_balance_sums`, :func:`sequence_balance_loss_from_sums`), so the tokens of a
  sequence may be split over ranks and their sums added up first, as Megatron-Core reduces the
  sequence-wise statistics over its tensor x context-parallel group.
- :func:`router_z_loss`: ST-MoE's router z-loss (Zoph et al. 2022, arXiv:2202.08906, eq. 5), the
  mean squared log-sum-exp of the router logits, which keeps them small for numerical stability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "load_balancing_loss",
    "load_balancing_loss_from_logits",
    "router_z_loss",
    "sequence_balance_loss",
    "sequence_balance_loss_from_sums",
    "sequence_balance_sums",
    "switch_balance_loss_from_sums",
    "switch_balance_sums",
]


def load_balancing_loss(
    router_probs: torch.Tensor, tokens_per_expert: torch.Tensor
) -> torch.Tensor:
    """Switch Transformer balance loss from a routing decision: ``E * sum_i (c_i / T) * P_i``.

    Args:
        router_probs: ``[tokens, experts]`` router probabilities (``MoERouting.scores``),
            the differentiable part.
        tokens_per_expert: ``[experts]`` (token, slot) assignment counts ``c_i``
            (``MoERouting.tokens_per_expert``); treated as constants.

    Returns:
        A scalar fp32 tensor; ``top_k`` when the counts and probabilities are uniform.
    """
    if router_probs.dim() != 2 or tokens_per_expert.shape != router_probs.shape[1:]:
        raise ValueError(
            "load_balancing_loss needs router_probs [tokens, experts] and tokens_per_expert "
            f"[experts], got {tuple(router_probs.shape)} and {tuple(tokens_per_expert.shape)}"
        )
    num_tokens, num_experts = router_probs.shape
    fraction = tokens_per_expert.detach().to(torch.float32) / num_tokens
    mean_prob = router_probs.float().sum(dim=0) / num_tokens
    return torch.sum(fraction * mean_prob) * num_experts


def switch_balance_sums(
    logits: torch.Tensor, *, top_k: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """One layer's share of :func:`load_balancing_loss_from_logits`: ``[2, experts + 1]`` fp32,
    row 0 the (token, slot) counts per expert (no gradient) then the routed tokens, row 1 the
    summed router probabilities per expert (differentiable) then 0.

    Sums of several layers (or of the shards of one batch on several ranks) add up; the loss
    is :func:`switch_balance_loss_from_sums` of the total. ``logits``: ``[tokens, experts]``,
    softmaxed in their own dtype as transformers does; ``mask``: ``[tokens]`` 1 for real
    tokens (padding left out).
    """
    num_experts = logits.shape[-1]
    if logits.dim() != 2:
        raise ValueError(f"gate logits must be [tokens, experts], got {tuple(logits.shape)}")
    probs = torch.softmax(logits, dim=-1)
    selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
    weights = torch.ones_like(selected, dtype=torch.float32)
    probs = probs.float()
    if mask is not None:
        mask = mask.reshape(-1).to(device=logits.device, dtype=torch.float32)
        if mask.numel() != logits.shape[0]:
            raise ValueError(
                f"attention_mask has {mask.numel()} tokens but the gate logits have "
                f"{logits.shape[0]} rows; pass the [batch, seq] mask of these logits"
            )
        weights = mask.repeat_interleave(top_k)
        probs = probs * mask.unsqueeze(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    counts = counts.scatter_add_(0, selected, weights)
    rows = weights.sum() / top_k
    zero = torch.zeros(1, dtype=torch.float32, device=logits.device)
    return torch.stack(
        (torch.cat((counts, rows.reshape(1))).detach(), torch.cat((probs.sum(dim=0), zero)))
    )


def switch_balance_loss_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """``E * sum_i (c_i / T) * (p_i / T)`` from :func:`switch_balance_sums` (summed over layers
    and, for a batch split over ranks, over the ranks), ``T`` the routed tokens."""
    counts, rows = sums[0, :-1], sums[0, -1]
    return torch.sum((counts / rows) * (sums[1, :-1] / rows)) * counts.shape[0]


def load_balancing_loss_from_logits(
    gate_logits: torch.Tensor | Sequence[torch.Tensor],
    *,
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' ``load_balancing_loss_func``: the Switch loss from raw router logits.

    Each layer's logits are softmaxed (in their own dtype, as transformers does), the top ``top_k``
    experts counted, and counts and probabilities summed over all layers before the product, so a
    tuple of layers gives one loss over their concatenation (:func:`switch_balance_sums`,
    :func:`switch_balance_loss_from_sums`).

    Args:
        gate_logits: ``[batch * seq, experts]`` logits, or a sequence of them (one per layer).
        num_experts: number of experts ``E``.
        top_k: experts per token.
        attention_mask: optional ``[batch, seq]`` mask (1 for real tokens); padding tokens are
            left out of counts, probabilities and the token total.

    Returns:
        A scalar fp32 tensor.
    """
    layers = (gate_logits,) if isinstance(gate_logits, torch.Tensor) else tuple(gate_logits)
    if not layers:
        raise ValueError("load_balancing_loss_from_logits needs at least one layer's logits")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), got {top_k}")
    device = layers[0].device
    for logits in layers:
        if logits.dim() != 2 or logits.shape[1] != num_experts:
            raise ValueError(
                f"each layer's gate logits must be [tokens, {num_experts}], got {tuple(logits.shape)}"
            )
    sums = sum(
        switch_balance_sums(logits.to(device), top_k=top_k, mask=attention_mask)
        for logits in layers
    )
    return switch_balance_loss_from_sums(sums)


def sequence_balance_loss(scores: torch.Tensor, topk_indices: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss ``sum_i f_i * P_i``, averaged over sequences.

    Per sequence of length ``S`` with ``E`` experts and ``K`` chosen per token (eqs. 17-20):
    ``f_i = E / (K * S) * #{t : i in topk(t)}`` and ``P_i = mean_t s'_{i,t}``, where
    ``s'_{., t} = s_{., t} / sum_j s_{j, t}`` are the token's affinities normalised to sum to one.
    Each row is one sequence (:func:`sequence_balance_sums` for packed documents or tokens
    split over ranks).

    Args:
        scores: ``[batch, seq, experts]`` unbiased affinities (``MoERouting.scores``, sigmoid or
            softmax), the differentiable part.
        topk_indices: ``[batch, seq, top_k]`` chosen experts (``MoERouting.indices``).

    Returns:
        A scalar fp32 tensor, 1 for a perfectly balanced sequence; multiply by ``alpha``.
    """
    if scores.dim() != 3 or topk_indices.dim() != 3 or scores.shape[:2] != topk_indices.shape[:2]:
        raise ValueError(
            "sequence_balance_loss needs scores [batch, seq, experts] and topk_indices "
            f"[batch, seq, top_k], got {tuple(scores.shape)} and {tuple(topk_indices.shape)}; "
            "reshape the flat routing outputs with .view(batch, seq, -1)"
        )
    batch, seq, _ = scores.shape
    rows = torch.arange(batch, device=scores.device).repeat_interleave(seq)
    sums = sequence_balance_sums(
        scores.flatten(0, 1), topk_indices.flatten(0, 1), rows, num_documents=batch
    )
    return sequence_balance_loss_from_sums(sums, top_k=topk_indices.shape[-1])


def sequence_balance_sums(
    scores: torch.Tensor,
    topk_indices: torch.Tensor,
    documents: torch.Tensor,
    *,
    num_documents: int,
) -> torch.Tensor:
    """Per-document statistics of :func:`sequence_balance_loss` for one layer: ``[documents, 2,
    experts + 1]`` fp32, for document ``d`` row 0 the top-k selections per expert (no gradient)
    then its token count, row 1 the summed normalised affinities per expert (differentiable)
    then 0.

    Sums of the parts of a batch (its tokens split over ranks: context or sequence
    parallelism) add up to the sums of the whole; the loss is
    :func:`sequence_balance_loss_from_sums` of the total.

    Args:
        scores: ``[tokens, experts]`` unbiased affinities.
        topk_indices: ``[tokens, top_k]`` chosen experts.
        documents: ``[tokens]`` int document (sequence) index of each token in
            ``[0, num_documents)``, ``-1`` for a token left out (padding).
        num_documents: number of documents of the whole batch.
    """
    if (
        scores.dim() != 2
        or topk_indices.dim() != 2
        or documents.shape != scores.shape[:1]
        or topk_indices.shape[0] != scores.shape[0]
    ):
        raise ValueError(
            "sequence_balance_sums needs scores [tokens, experts], topk_indices [tokens, top_k] "
            f"and documents [tokens], got {tuple(scores.shape)}, {tuple(topk_indices.shape)} and "
            f"{tuple(documents.shape)}; pass the document index of each routed token"
        )
    num_experts = scores.shape[1]
    top_k = topk_indices.shape[1]
    device = scores.device
    documents = documents.to(device=device, dtype=torch.int64)
    kept = documents >= 0
    doc = documents.clamp_min(0)
    weight = kept.to(torch.float32)
    s = scores.float()
    normalised = torch.where(kept[:, None], s / s.sum(dim=-1, keepdim=True), 0.0)
    probs = torch.zeros(num_documents, num_experts, dtype=torch.float32, device=device)
    probs = probs.index_add(0, doc, normalised)
    slots = (doc[:, None] * num_experts + topk_indices.to(device, torch.int64)).reshape(-1)
    counts = torch.zeros(num_documents * num_experts, dtype=torch.float32, device=device)
    counts = counts.index_add_(0, slots, weight.repeat_interleave(top_k))
    lengths = torch.zeros(num_documents, 1, dtype=torch.float32, device=device)
    lengths = lengths.index_add_(0, doc, weight[:, None])
    zero = torch.zeros(num_documents, 1, dtype=torch.float32, device=device)
    stats = torch.cat((counts.view(num_documents, num_experts), lengths), dim=1).detach()
    return torch.stack((stats, torch.cat((probs, zero), dim=1)), dim=1)


def sequence_balance_loss_from_sums(sums: torch.Tensor, *, top_k: int) -> torch.Tensor:
    """:func:`sequence_balance_loss` from :func:`sequence_balance_sums`: ``[..., documents, 2,
    experts + 1]``, each leading index (a layer) giving its mean over the documents that have
    tokens, summed over the leading dims. ``top_k``: experts chosen per token."""
    if sums.dim() < 3 or sums.shape[-2] != 2:
        raise ValueError(
            "sequence_balance_loss_from_sums needs sums [..., documents, 2, experts + 1] from "
            f"sequence_balance_sums, got {tuple(sums.shape)}"
        )
    counts, lengths = sums[..., 0, :-1], sums[..., 0, -1]
    num_experts = counts.shape[-1]
    present = lengths > 0
    length = lengths.clamp_min(1)[..., None]
    fraction = counts * (num_experts / top_k) / length
    per_document = (fraction * (sums[..., 1, :-1] / length)).sum(dim=-1)
    per_document = torch.where(present, per_document, 0.0)
    mean = per_document.sum(dim=-1) / present.sum(dim=-1).clamp_min(1)
    return mean.sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: ``mean over tokens of logsumexp(logits)**2`` (in fp32).

    ``router_logits`` is ``[..., experts]``; the mean runs over all leading dims. ST-MoE weights it
    by ``1e-3``.
    """
    if router_logits.dim() < 1 or router_logits.shape[-1] == 0:
        raise ValueError("router_z_loss needs logits of shape [..., experts] with experts > 0")
    compute_dtype = torch.promote_types(router_logits.dtype, torch.float32)
    return torch.logsumexp(router_logits.to(compute_dtype), dim=-1).square().mean()
