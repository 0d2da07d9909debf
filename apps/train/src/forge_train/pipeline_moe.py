"""Mixture-of-experts models under pipeline parallelism: auxiliary losses and expert load.

In one process :class:`forge_models.CausalLM` collects every MoE layer's router output and adds
the balance loss at the head. On a pipeline stage the layers' routers are on different ranks,
so each stage handles its own (``forge_parallel`` ``pipeline(..., block_output=...)``):

- DeepSeek-V3's sequence-wise balance loss (``moe.aux_loss: sequence``) is a sum over layers.
  Each MoE block adds its term's gradient in backward without changing the forward values, as
  Megatron-Core's ``MoEAuxLossAutoScaler`` does: the hidden states pass through unchanged and
  the layer's loss gets the gradient ``router_aux_loss_coef / micro-batches``, the weight the
  single-process step gives it (:mod:`forge_train.step`).
- transformers' switch loss (``aux_loss: switch``) multiplies means over all layers together,
  so no stage can compute its share alone: it is refused (:func:`check_moe_pipeline`).
- Aux-loss-free balancing (``moe.expert_bias``): each stage sums its layers' load over the
  step and updates their biases from the data-parallel total (:class:`PipelineExpertBalancer`).
"""

from __future__ import annotations

from typing import Any

import torch

from forge_train.config import ConfigError
from forge_train.distributed import all_reduce

__all__ = ["PipelineExpertBalancer", "PipelineMoE", "check_moe_pipeline"]


def _aux_enabled(moe) -> bool:
    return bool(moe.output_router_logits) and moe.router_aux_loss_coef > 0


def check_moe_pipeline(config) -> None:
    """Refuse MoE settings whose loss a pipeline stage cannot compute on its own."""
    moe = config.moe
    if _aux_enabled(moe) and moe.aux_loss != "sequence":
        raise ConfigError(
            "parallel.pp: the switch load-balancing loss (moe.aux_loss=switch, as transformers) "
            "multiplies averages over all layers, which live on different pipeline stages; use "
            "model.config.moe.aux_loss=sequence (DeepSeek-V3's per-layer loss), "
            "model.config.moe.output_router_logits=false, or parallel.pp=1"
        )


class _AddAuxGradient(torch.autograd.Function):
    """Identity on ``hidden``; in backward ``aux`` gets the gradient ``weight``."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.save_for_backward(aux)
        ctx.weight = weight
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad, torch.full_like(aux, ctx.weight), None


class PipelineMoE:
    """``block_output`` of the stages of a MoE :class:`~forge_models.CausalLM`: passes the
    hidden states on, adds the sequence-wise balance loss's gradient and sums each layer's
    expert load over the training micro-batches (see the module docstring)."""

    def __init__(self, config, *, microbatches: int) -> None:
        self.moe = config.moe
        self.aux_weight = (
            self.moe.router_aux_loss_coef / microbatches if _aux_enabled(self.moe) else 0.0
        )
        self._load: dict[int, torch.Tensor] = {}

    def __call__(self, path: str, output: Any, block_args: tuple) -> torch.Tensor:
        if not isinstance(output, tuple):
            return output
        (inputs,) = block_args
        return self.route(int(path.rpartition(".")[2]), output, inputs)

    def route(self, layer: int, output: tuple, inputs) -> torch.Tensor:
        """The hidden states of block ``layer``'s ``(hidden, router output or None)``, its
        load recorded and its balance-loss gradient attached (training forwards only);
        ``inputs``: the micro-batch's attention inputs. The multi-token prediction blocks on
        the last stage (:mod:`forge_train.pipeline_head`) come here too."""
        hidden, router = output
        if hidden.is_meta or router is None or not torch.is_grad_enabled():
            return hidden  # shape inference, a dense layer, or evaluation
        load = router.tokens_per_expert.detach().to(torch.int64)
        self._load[layer] = load + self._load[layer] if layer in self._load else load
        if self.aux_weight:
            from forge_models.causal_lm import router_sequence_balance

            aux = router_sequence_balance(router, hidden.shape[:2], None, inputs.cu_seqlens)
            hidden = _AddAuxGradient.apply(hidden, aux, self.aux_weight)
        return hidden

    def take_load(self) -> tuple[tuple[int, ...], torch.Tensor] | None:
        """``(layers, [layers, experts] load)`` since the last call, and start anew."""
        load, self._load = self._load, {}
        if not load:
            return None
        layers = tuple(sorted(load))
        return layers, torch.stack([load[i] for i in layers])


class PipelineExpertBalancer:
    """:class:`~forge_train.expert_balance.ExpertBiasBalancer` for a pipeline stage: the load
    comes from :class:`PipelineMoE`, the update goes to this stage's MoE layers."""

    def __init__(self, moe: PipelineMoE, stage: torch.nn.Module, dp_group) -> None:
        self.moe = moe
        self.dp_group = dp_group
        self.blocks = {m.layer_idx: m.mlp for m in stage.modules() if getattr(m, "is_moe", False)}

    def add_micro_batch(self) -> None:
        """Nothing to do: the stage's ``block_output`` records the load."""

    def apply(self) -> torch.Tensor | None:
        taken = self.moe.take_load()
        if taken is None:  # no MoE layer on this stage
            return None
        layers, load = taken
        load = all_reduce(load, self.dp_group)
        for row, idx in zip(load, layers, strict=True):
            self.blocks[idx].update_expert_bias(row, self.moe.moe.bias_update_speed)
        return load

    def discard(self) -> None:
        self.moe.take_load()
