"""Mixture-of-experts models under pipeline parallelism: auxiliary losses and expert load.

In one process :class:`forge_models.CausalLM` collects every MoE layer's router output and adds
the balance loss at the head. On a pipeline stage the layers' routers are on different ranks,
so each stage handles its own (``forge_parallel`` ``pipeline(..., block_output=...)``):

- DeepSeek-V3's sequence-wise balance loss (``moe.aux_loss: sequence``) is a sum over layers.
  Each MoE block adds its term's gradient in backward without changing the forward values, as
  Megatron-Core's ``MoEAuxLossAutoScaler`` does: the hidden states pass through unchanged and
  the layer's loss gets the gradient ``router_aux_loss_coef / micro-batches``, the weight the
  single-process step gives it (:mod:`forge_train.step`).
- transformers' switch loss (``aux_loss: switch``, ``load_balancing_loss_func``; Fedus et al.
  2021, arXiv:2101.03961 eq. 4) is ``E * sum_e F_e * P_e`` with ``F_e`` and ``P_e`` the fraction
  of top-k slots given to expert ``e`` and its mean router probability, both over the tokens of
  *all* MoE layers together, which live on different stages. The per-expert sums travel along
  the pipeline with the hidden states (``forge_parallel`` ``pipeline(..., carry=...)``): the
  first stage starts them at zero, each MoE block adds its top-k slot counts (no
  gradient) and its summed router probabilities (fp32, differentiable), in layer order as one
  process does, and the last stage, after its blocks and multi-token prediction modules, forms
  the loss from the totals and attaches its gradient ``router_aux_loss_coef / micro-batches``
  to the stage's output. The gradient of the probability sums goes back through the
  pipeline's gradient sends to every stage's routers; ``F`` times that gradient is exactly
  the single-process one.
- Aux-loss-free balancing (``moe.expert_bias``): each stage sums its layers' load over the
  step and updates their biases from the data-parallel total (:class:`PipelineExpertBalancer`).

When a batch's tokens are split over ranks for the MoE layers (context parallelism, or tensor
parallelism with sequence parallelism) each pipeline rank carries the sums of its token shard:
the last stage sums them over those ranks before forming the switch loss, each MoE block sums
its sequence-wise loss's per-document sums over them (its tokens mapped to their documents of
the whole row), and the expert load is summed over them too (:mod:`forge_train.sharded_routing`,
as without pipeline stages).
"""

from __future__ import annotations

from typing import Any

import torch

from forge_train.distributed import all_reduce
from forge_train.sharded_routing import balance_loss_trained

__all__ = ["PipelineExpertBalancer", "PipelineMoE"]


def _switch_enabled(moe) -> bool:
    return balance_loss_trained(moe) and moe.aux_loss == "switch"


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
    expert load over the training micro-batches; with the switch loss also the stages'
    ``carry`` (``forge_parallel.pipeline.StageCarry``) of its per-expert sums (see the module
    docstring)."""

    def __init__(self, config, *, microbatches: int) -> None:
        self.moe = config.moe
        self.aux_weight = (
            self.moe.router_aux_loss_coef / microbatches if balance_loss_trained(self.moe) else 0.0
        )
        #: Whether the stages carry the switch loss's sums (pass ``carry=self`` then).
        self.switch = _switch_enabled(self.moe)
        self._load: dict[int, torch.Tensor] = {}
        #: ``forge_kernels.moe.switch_balance_sums`` of the layers so far (this stage forward).
        self._sums: torch.Tensor | None = None
        #: :class:`~forge_train.sharded_routing.ShardedRouting` when the ranks of a group split
        #: each batch's tokens for the MoE layers (set by ``forge_train.loop``), else ``None``.
        self.routing = None
        #: With ``routing`` and the sequence-wise loss: each micro-batch's attention inputs ->
        #: ``ShardedRouting.local_documents`` of its whole row (set per step by
        #: :meth:`set_documents`).
        self._documents: dict[Any, tuple[torch.Tensor, int]] = {}

    @property
    def sequence_loss_sharded(self) -> bool:
        """Whether the stages' sequence-wise loss needs each micro-batch's token documents."""
        return self.routing is not None and bool(self.aux_weight) and not self.switch

    def set_documents(self, documents: dict[Any, tuple[torch.Tensor, int]]) -> None:
        """This step's micro-batches: attention inputs (the blocks' argument) -> this rank's
        tokens' documents in the whole row and the row's document count."""
        self._documents = dict(documents)

    # -- forge_parallel StageCarry: the switch loss's sums ---------------------------------------
    def start(self, stage, carried: tuple[torch.Tensor, ...], x: torch.Tensor) -> None:
        if carried:
            (self._sums,) = carried
            return
        # The first stage starts from zero. It requires a gradient from the start, as at run
        # time after a MoE block (also on a stage without any, and in the runtime's metadata
        # inference, which sees no router).
        shape = (2, self.moe.num_experts + 1)
        self._sums = torch.zeros(shape, device=x.device, requires_grad=torch.is_grad_enabled())

    def send(self, stage) -> tuple[torch.Tensor, ...]:
        sums, self._sums = self._sums, None
        return (sums,)

    def finish(self, stage, output: torch.Tensor) -> torch.Tensor:
        from forge_kernels.moe import switch_balance_loss_from_sums

        sums, self._sums = self._sums, None
        if not torch.is_grad_enabled():  # evaluation reports the cross-entropy only
            return output
        if self.routing is None:
            aux = switch_balance_loss_from_sums(sums)
        else:  # this rank's token shard: the batch's sums over the group
            aux = self.routing.switch_loss_of_sums(sums)
        return _AddAuxGradient.apply(output, aux, self.aux_weight)

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
        if self.switch:
            if self._sums is None:
                raise RuntimeError(
                    "the switch balance loss's sums travel with the hidden states: build the "
                    "pipeline with carry= this PipelineMoE (forge_train.pipeline_model does)"
                )
            from forge_kernels.moe import switch_balance_sums

            top_k = self.moe.num_experts_per_tok
            self._sums = self._sums + switch_balance_sums(router.logits, top_k=top_k)
        elif self.aux_weight and self.routing is not None:  # this rank's token shard
            documents = self._documents.get(inputs)
            if documents is None:
                raise RuntimeError(
                    "the sequence-wise balance loss of a split batch needs the micro-batch's "
                    "token documents: call PipelineMoE.set_documents before the schedule "
                    "(forge_train.pipeline_step does)"
                )
            aux = self.routing.sequence_loss([router], *documents)
            hidden = _AddAuxGradient.apply(hidden, aux, self.aux_weight)
        elif self.aux_weight:
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

    def __init__(
        self, moe: PipelineMoE, stage: torch.nn.Module, dp_group, token_group=None
    ) -> None:
        self.moe = moe
        self.dp_group = dp_group
        #: Ranks that split each batch's tokens for the MoE layers: their loads are summed too.
        self.token_group = token_group
        self.blocks = {m.layer_idx: m.mlp for m in stage.modules() if getattr(m, "is_moe", False)}

    def add_micro_batch(self) -> None:
        """Nothing to do: the stage's ``block_output`` records the load."""

    def apply(self) -> torch.Tensor | None:
        taken = self.moe.take_load()
        if taken is None:  # no MoE layer on this stage
            return None
        layers, load = taken
        load = all_reduce(all_reduce(load, self.dp_group), self.token_group)
        for row, idx in zip(load, layers, strict=True):
            self.blocks[idx].update_expert_bias(row, self.moe.moe.bias_update_speed)
        return load

    def discard(self) -> None:
        self.moe.take_load()
