"""MoE routing statistics when a batch's tokens are split over ranks for the MoE layers.

Under context parallelism (each rank holds a shard of every sequence) and under tensor
parallelism with sequence parallelism (each rank runs the MoE layers on its sequence shard),
a rank's routers see only its tokens. The statistics the single process computes over the whole
batch are sums, so they are all-reduced over those ranks before use:

- the switch balance loss (Fedus et al. 2021, arXiv:2101.03961; transformers'
  ``load_balancing_loss_func``) from ``forge_kernels.moe.switch_balance_sums`` of every layer,
  summed over the ranks with Megatron's ``g`` (all-reduce forward, identity backward): each
  rank's routers get the gradient of their own tokens' share of the global loss;
- DeepSeek-V3's sequence-wise balance loss (arXiv:2412.19437 eqs. 17-20) from per-document
  sums (``forge_kernels.moe.sequence_balance_sums``: top-k selections, normalised affinities
  and token count of each packed document of the whole row), each local token mapped to its
  document in the whole row, summed over the ranks with ``g`` as Megatron-Core reduces them
  over its tensor x context-parallel group; the loss of the totals is every rank's;
- the expert-bias load (DeepSeek-V3's auxiliary-loss-free balancing), summed over them too
  (:class:`forge_train.expert_balance.ExpertBiasBalancer`).

Under context parallelism with tensor parallelism and sequence parallelism, each rank routes a
tensor-parallel chunk of its context-parallel shard (``1 / (cp x tp)`` of the row): the group
is then the context x tensor-parallel ranks (``mesh["cp", "tp"]`` flattened), as Megatron-Core
reduces its MoE statistics over its tensor x context-parallel group.

Under these layouts the step asks the model for no balance loss of its own
(``output_router_logits=False``: it would see a shard only) and forms it here from
``moe_stats.routers``. One code path for language models and vision-language models, whose
MoE layers are their language model's (``model.config.text.moe``, ``moe_stats`` of
``model.language_model``: :func:`forge_train.vlm_model.language_model_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ShardedRouting", "balance_loss_trained", "sharded_routing"]


def balance_loss_trained(moe) -> bool:
    """Whether a MoE config trains a balance loss (router logits kept, a positive weight)."""
    return bool(moe.output_router_logits) and moe.router_aux_loss_coef > 0


@dataclass(frozen=True)
class ShardedRouting:
    """``group``: the ranks over which each data-parallel batch's tokens are split for the MoE
    layers; ``top_k``: experts per token (``moe.num_experts_per_tok``). ``aux_scale``: what
    data parallelism's gradient average takes from the balance loss on top of the
    data-parallel ranks (the context-parallel size: FSDP averages over ``dp_shard x cp``; 1
    under sequence parallelism, whose replicated router gradients are summed over the
    tensor-parallel ranks). ``aux_loss``: the balance loss trained (``moe.aux_loss``:
    ``"switch"`` or ``"sequence"``), ``None`` without one. ``rank`` / ``size`` /
    ``load_balance``: how a packed row is cut over the group (this rank's index, the group's
    size, zigzag or contiguous, :func:`forge_parallel.context_parallel.shard_sequence`);
    ``sequence_shard`` / ``sequence_shards``: how that cut is then cut again, contiguously, by
    sequence parallelism under context parallelism (this rank's tensor-parallel index and the
    tensor-parallel size; 0 / 1 otherwise)."""

    group: Any
    top_k: int
    aux_scale: float = 1.0
    aux_loss: str | None = None
    rank: int = 0
    size: int = 1
    load_balance: bool = False
    sequence_shard: int = 0
    sequence_shards: int = 1

    def local_documents(self, kwargs: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """``(document index in the whole row of each token this rank routes, number of
        documents of the row)`` from the whole micro-batch's forward kwargs (one packed row,
        ``cu_seqlens``)."""
        from forge_models.causal_lm import token_documents
        from forge_parallel.context_parallel import shard_sequence

        ids = kwargs["input_ids"]
        documents, count = token_documents(
            ids.shape, kwargs.get("attention_mask"), kwargs.get("cu_seqlens"), ids.device
        )
        documents = documents.view(ids.shape)
        if self.load_balance:  # zigzag: chunks rank and 2 x size - 1 - rank
            local = shard_sequence(
                documents, dim=1, cp_size=self.size, cp_rank=self.rank, load_balance=True
            )
        else:  # contiguous, cut as a DTensor Shard(1) is (torch.chunk: the last may be short)
            chunks = documents.chunk(self.size, dim=1)
            local = chunks[self.rank] if self.rank < len(chunks) else documents[:, :0]
        if self.sequence_shards > 1:  # sequence parallelism's chunk of the context shard
            local = local.chunk(self.sequence_shards, dim=1)[self.sequence_shard]
        return local.reshape(-1), count

    def balance_loss(self, stats, documents: tuple[torch.Tensor, int] | None) -> torch.Tensor:
        """The balance loss of the whole batch (``aux_loss``) from this rank's ``moe_stats``;
        ``documents``: :meth:`local_documents` of the micro-batch (the sequence-wise loss)."""
        if self.aux_loss == "switch":
            return self.switch_loss(stats)
        if self.aux_loss == "sequence":
            if documents is None:
                raise RuntimeError(
                    "the sequence-wise balance loss of a split batch needs the local tokens' "
                    "documents (ShardedRouting.local_documents of the micro-batch)"
                )
            return self.sequence_loss(stats.routers, *documents)
        raise RuntimeError(f"no balance loss is trained (aux_loss={self.aux_loss!r})")

    def switch_loss(self, stats) -> torch.Tensor:
        """The switch balance loss of the whole batch from this rank's ``moe_stats``."""
        from forge_kernels.moe import switch_balance_sums

        if not stats.routers:
            raise RuntimeError("the switch balance loss needs the router outputs of the forward")
        return self.switch_loss_of_sums(
            sum(switch_balance_sums(r.logits, top_k=self.top_k) for r in stats.routers)
        )

    def switch_loss_of_sums(self, sums: torch.Tensor) -> torch.Tensor:
        """The switch balance loss of the whole batch from this rank's
        ``forge_kernels.moe.switch_balance_sums`` over all MoE layers (summed over the group)."""
        from forge_core.collectives import reduce_from_group
        from forge_kernels.moe import switch_balance_loss_from_sums

        total = reduce_from_group(sums, group=self.group)
        return switch_balance_loss_from_sums(total) * self.aux_scale

    def sequence_loss(
        self, routers: Sequence[Any], documents: torch.Tensor, num_documents: int
    ) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss of the whole batch, summed over the MoE
        layers of ``routers`` (``RouterOutput``: all of the forward's, or one pipeline stage
        layer's), from this rank's tokens and their ``documents`` in the whole row."""
        from forge_core.collectives import reduce_from_group
        from forge_kernels.moe import sequence_balance_loss_from_sums, sequence_balance_sums

        if not routers:
            raise RuntimeError("the sequence-wise balance loss needs the router outputs")
        tokens = routers[0].scores.shape[0]
        if documents.numel() != tokens:
            raise RuntimeError(
                f"this rank's MoE layers routed {tokens} tokens but its share of the row has "
                f"{documents.numel()}: the sequence is not cut as ShardedRouting assumes "
                f"({self.size} {'zigzag' if self.load_balance else 'contiguous'} shards)"
            )
        sums = torch.stack(
            [
                sequence_balance_sums(r.scores, r.indices, documents, num_documents=num_documents)
                for r in routers
            ]
        )
        total = reduce_from_group(sums, group=self.group)
        return sequence_balance_loss_from_sums(total, top_k=self.top_k) * self.aux_scale


def sharded_routing(cfg, model_config, parallel) -> ShardedRouting | None:
    """The run's :class:`ShardedRouting`, or ``None`` when every rank's MoE layers see their
    data-parallel batch whole. ``model_config``: a ``TransformerConfig``, or a ``VLMConfig``
    whose language model (``text``) holds the MoE layers; ``parallel``: forge_parallel's
    ``ParallelizeResult`` (a vision-language model's heterogeneous result: its
    ``language_model`` part's). A VLM's row is the language model's: the visual features
    replace the embeddings of the placeholder tokens one for one, so the row's documents
    (``cu_seqlens``) and its sequence shards are those of ``input_ids``."""
    from forge_train.vlm_model import language_model_config

    moe = getattr(language_model_config(model_config), "moe", None)
    parallel = getattr(parallel, "parts", {}).get("language_model", parallel)
    mesh = getattr(parallel, "mesh", None)
    if moe is None or mesh is None:
        return None
    common = {
        "top_k": moe.num_experts_per_tok,
        "aux_loss": moe.aux_loss if moe.output_router_logits else None,
    }
    if getattr(parallel, "context_parallel_handle", None) is not None:
        cut = {
            "aux_scale": mesh.size("cp"),
            "rank": mesh.local_rank("cp"),
            "size": mesh.size("cp"),
            "load_balance": parallel.context_parallel.load_balance,
        }
        if mesh.size("tp") > 1 and cfg.parallel.sequence_parallel:
            # each rank routes a contiguous tensor-parallel chunk of its context shard: the
            # statistics are summed over cp x tp (a collective: every rank builds the group)
            group = mesh["cp", "tp"]._flatten("cp_tp").get_group()
            sequence = {"sequence_shard": mesh.local_rank("tp"), "sequence_shards": mesh.size("tp")}
            return ShardedRouting(group=group, **cut, **sequence, **common)
        return ShardedRouting(group=mesh["cp"].get_group(), **cut, **common)
    if mesh.size("tp") > 1 and cfg.parallel.sequence_parallel:
        # each rank runs the MoE layers on its contiguous chunk of the sequence dimension
        # (a VLM's: forge_train.vlm_model.vlm_text_plan's sequence_scatter, a DTensor Shard(1))
        return ShardedRouting(
            group=mesh["tp"].get_group(), rank=mesh.local_rank("tp"), size=mesh.size("tp"),
            **common,
        )  # fmt: skip
    return None
