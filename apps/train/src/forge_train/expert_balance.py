"""Auxiliary-loss-free MoE load balancing in the loop (DeepSeek-V3, arXiv:2412.19437 section
2.1.2; Wang et al. 2024, arXiv:2408.15664).

For models built with ``moe.expert_bias``, each optimizer step sums the per-expert load
(``model.moe_stats.tokens_per_expert``) over the step's micro-batches, all-reduces it over the
data-parallel ranks (the load of the whole global batch, so every rank applies the same update
to its replicated bias buffers) and calls ``model.update_expert_bias``:
``bias += moe.bias_update_speed * sign(mean_load - load)`` per MoE layer.
"""

from __future__ import annotations

import torch
from torch import nn

from forge_train.distributed import all_reduce

__all__ = ["ExpertBiasBalancer"]


class ExpertBiasBalancer:
    """Accumulates one step's expert load and applies the bias update after the optimizer step."""

    def __init__(self, model: nn.Module, dp_group, token_group=None) -> None:
        self.model = model
        self.dp_group = dp_group
        #: Ranks that split each batch's tokens for the MoE layers (context parallel, or TP
        #: with sequence parallelism): their loads are summed as well.
        self.token_group = token_group
        self._load: torch.Tensor | None = None
        self._layers: tuple[int, ...] | None = None

    @staticmethod
    def wanted(model_config) -> bool:
        """Whether the model keeps an expert-bias buffer to update (``moe.expert_bias``)."""
        moe = getattr(model_config, "moe", None)
        return moe is not None and bool(moe.expert_bias)

    def add_micro_batch(self) -> None:
        """Add the load of the forward that just ran (``model.moe_stats``)."""
        stats = self.model.moe_stats
        if stats is None:
            raise RuntimeError(
                "moe.expert_bias is set but the forward recorded no moe_stats: the model has no "
                "MoE layer that ran (check moe.mlp_only_layers / decoder_sparse_step)"
            )
        if self._layers is None:
            self._layers = stats.layers
        elif stats.layers != self._layers:
            raise RuntimeError(
                f"MoE layers changed between micro-batches ({self._layers} -> {stats.layers})"
            )
        load = stats.tokens_per_expert.to(torch.int64)
        self._load = load.clone() if self._load is None else self._load + load

    def apply(self) -> torch.Tensor | None:
        """All-reduce the step's load over data parallel, update the biases, and start a new
        step; returns the global load ``[layers, experts]`` (``None`` if nothing ran)."""
        load, layers = self._load, self._layers
        self._load, self._layers = None, None
        if load is None:
            return None
        load = all_reduce(all_reduce(load, self.dp_group), self.token_group)
        self.model.update_expert_bias(load, layers=layers)
        return load

    def discard(self) -> None:
        """Forget the step's load (a skipped update)."""
        self._load, self._layers = None, None
