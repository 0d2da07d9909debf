"""One optimizer step: gradient accumulation over this rank's micro-batches, then the update.

The loss of a step is normalized by the number of predicted tokens of the whole global batch
(all micro-batches of all data-parallel ranks), so any data-parallel size and micro-batching
gives the single-process gradient; gradients are synchronized on the last micro-batch only.
Under context parallelism each rank runs its shard of every sequence
(:class:`forge_train.context_parallel.ContextParallelInputs`) and token counts and loss sums
are reduced over the context-parallel ranks too.
MoE auxiliary losses are weighted per micro-batch; bf16/fp16 run under autocast (fp16 with
loss scaling). With multi-token prediction the gradient is that of ``ce + mtp_loss_weight / D *
sum_k ce_k`` (DeepSeek-V3, arXiv:2412.19437, section 2.2), but the reported loss is the main
next-token cross-entropy ``ce`` only, each depth's ``ce_k`` reported apart (as Megatron-LM logs
"lm loss" and "mtp_1 loss"), so runs with and without MTP compare. After clipping, the non-finite guard decides whether the optimizer steps; the
expert-bias balancer (models with ``moe.expert_bias``) updates after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import torch

from forge_train.context_parallel import ContextParallelInputs
from forge_train.data import IGNORE_INDEX, model_inputs
from forge_train.distributed import all_reduce, local_value
from forge_train.expert_balance import ExpertBiasBalancer
from forge_train.guards import NonFiniteGuard
from forge_train.sharded_routing import ShardedRouting
from forge_train.vlm_model import language_model_of

__all__ = ["StepRunner", "loss_scaler"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def loss_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16's dynamic loss scaler (Micikevicius et al. 2018, "Mixed Precision Training",
    arXiv:1710.03740), ``None`` in other precisions. In a run of several processes each rank
    holds other gradients (shards, stages): the found-inf flags are summed over all ranks
    (``ShardedGradScaler`` over the world) so every rank skips the same overflowing step and
    moves the scale alike, as Megatron-LM all-reduces them over its model-parallel group."""
    if precision != "fp16":
        return None
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, process_group=dist.group.WORLD)
    return torch.amp.GradScaler(device.type)


class StepRunner:
    """Forward/backward with accumulation, clipping and the guarded update of one model.

    ``parallel`` is forge_parallel's ``ParallelizeResult`` (``no_sync``, ``loss_context``);
    ``tensor_parallel`` computes the loss from the logits (the fused loss needs the whole
    output matrix); ``balancer`` is set for models with ``moe.expert_bias``; ``context`` for
    ``parallel.cp > 1``; ``routing`` when a batch's tokens are split over ranks for the MoE
    layers (context parallel, or TP with sequence parallelism): the balance loss of the whole
    batch (:class:`forge_train.sharded_routing.ShardedRouting`).
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        parallel,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        precision: str,
        grad_clip: float,
        aux_coef: float,
        dp_group,
        dp_size: int,
        tensor_parallel: bool,
        guard: NonFiniteGuard,
        balancer: ExpertBiasBalancer | None = None,
        context: ContextParallelInputs | None = None,
        routing: ShardedRouting | None = None,
    ) -> None:
        self.model = model
        self.parallel = parallel
        self.optimizer = optimizer
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.aux_coef = aux_coef
        self.dp_group = dp_group
        self.dp_size = dp_size
        self.tensor_parallel = tensor_parallel
        self.guard = guard
        self.balancer = balancer
        self.context = context
        self.routing = routing
        self.cp_group = context.group if context is not None else None
        #: The module whose MoE layers record ``moe_stats`` and that holds the multi-token
        #: prediction modules: a vision-language model's language model, else the model.
        self.language_model = language_model_of(model)
        #: Multi-token prediction modules of the model (their inputs are cut per shard too).
        self.mtp_depth = len(getattr(self.language_model, "mtp", None) or ())
        #: Ranks whose gradients data parallelism averages (dp x cp).
        self.grad_ranks = dp_size * (context.size if context is not None else 1)
        self.scaler = loss_scaler(device, precision)
        #: The last step's multi-token prediction losses, ``{"mtp_1_loss": ...}``: depth k's
        #: summed cross-entropy over the predicted tokens of the main loss (the normalizer of
        #: the gradient), so ``loss + mtp_loss_weight / D * sum(values)`` is the objective.
        self.last_mtp_losses: dict[str, float] = {}

    # -- forward ----------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def prepare(
        self, micro_batch: dict[str, torch.Tensor]
    ) -> tuple[
        dict[str, Any],
        torch.Tensor,
        Callable[[], contextlib.AbstractContextManager],
        tuple[torch.Tensor, int] | None,
    ]:
        """``(forward kwargs, predicted tokens, context to run the forward in, documents)`` of
        this rank's part of a collated micro-batch (its context-parallel shard under
        ``parallel.cp > 1``); ``documents``: for the sequence-wise balance loss of a batch split
        over ranks, :meth:`ShardedRouting.local_documents`, else ``None``."""
        kwargs, n = model_inputs(micro_batch, self.device)
        documents = None
        if self.routing is not None and self.routing.aux_loss == "sequence":
            documents = self.routing.local_documents(kwargs)
        if self.context is None:
            return kwargs, n, contextlib.nullcontext, documents
        local, n, row = self.context.shard(kwargs, mtp_depth=self.mtp_depth)
        return local, n, functools.partial(self.context.forward, row), documents

    def forward_sum(
        self,
        kwargs: dict[str, Any],
        around: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        documents: tuple[torch.Tensor, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[torch.Tensor]]:
        """``(summed objective cross-entropy, weighted auxiliary loss or None, summed next-token
        cross-entropy, depth sums)`` of one micro-batch (``around``, ``documents``: from
        :meth:`prepare`). The objective (what back-propagates) is the next-token
        cross-entropy plus, with multi-token prediction, ``mtp_loss_weight / D`` times the
        depths' summed cross-entropies, which ``depth sums`` holds (empty without MTP). The
        next-token cross-entropy, for the reported loss, is the one the model computed
        (``CausalLM.main_loss``; under tensor parallelism the one taken from the logits here),
        not the objective less the other terms, which rounding would leave inexact. It and the
        depth sums are detached fp32 local tensors."""
        split = self.routing is not None and self.routing.aux_loss is not None
        if split:  # the model sees a shard: the balance loss of the whole batch is formed here
            kwargs = {**kwargs, "output_router_logits": False}
        if self.tensor_parallel:
            with around():  # from the logits: no auxiliary loss added
                loss, ce, depth_sums = self._loss_parallel_sum(kwargs)
        else:
            with self.autocast(), around():
                loss = self.model(**kwargs, loss_reduction="sum")
            depth_sums = list(getattr(self.language_model, "mtp_losses", None) or ())
            ce = getattr(self.language_model, "main_loss", None)
        stats = getattr(self.language_model, "moe_stats", None)
        aux = None
        if split and stats is not None:
            aux = self.aux_coef * self.routing.balance_loss(stats, documents)
        elif stats is not None and stats.aux_loss is not None:
            aux = self.aux_coef * stats.aux_loss
            if not self.tensor_parallel:
                loss = loss - aux  # the model adds it unscaled; it is weighted per micro-batch
        if ce is None:  # a model that does not record it: its loss is the cross-entropy alone
            if depth_sums:
                raise ValueError(
                    f"the model reports {len(depth_sums)} multi-token prediction depth losses "
                    "(mtp_losses) but not its next-token cross-entropy (main_loss): set "
                    "main_loss beside mtp_losses in its forward"
                )
            ce = loss
        return (
            loss,
            aux,
            local_value(ce.detach()).float(),
            [local_value(x.detach()).float() for x in depth_sums],
        )

    def _loss_parallel_sum(
        self, kwargs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Tensor parallel: ``(objective, next-token cross-entropy, depths' cross-entropies)``,
        all summed. The cross-entropies are taken from the logits (under ``loss_parallel`` when
        the plan shards them by vocabulary); the objective adds the multi-token prediction
        depths' to the next-token one, weighted as ``CausalLM`` weighs them
        (``mtp_loss_weight / D``)."""
        import torch.nn.functional as F

        from forge_models.causal_lm import shift_labels

        kwargs = dict(kwargs)
        cu_seqlens = kwargs.get("cu_seqlens")
        # A context-parallel shard's targets (and each depth's, ``mtp_inputs``) were moved on
        # the whole row; the model gets the depths' input ids only.
        depth_targets = None
        if "targets" in kwargs:
            targets = kwargs.pop("targets")
        else:
            targets = shift_labels(kwargs.pop("labels"), cu_seqlens=cu_seqlens)
        if "mtp_inputs" in kwargs:
            depth_targets = [t for _, t in kwargs["mtp_inputs"]]
            kwargs["mtp_inputs"] = [(ids, None) for ids, _ in kwargs["mtp_inputs"]]
        depth = self.mtp_depth
        with self.autocast():
            if depth:
                logits, mtp_logits = self.model(**kwargs, output_mtp_logits=True)
            else:
                logits, mtp_logits = self.model(**kwargs), []

        def summed_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(
                logits.flatten(0, 1).float(),
                targets.reshape(-1),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )

        with self.parallel.loss_context():
            ce = summed_ce(logits, targets)
            depth_losses = []
            for k, depth_logits in enumerate(mtp_logits):  # depth k + 1 predicts k + 2 ahead
                if depth_targets is None:
                    targets = shift_labels(targets, cu_seqlens=cu_seqlens)
                else:
                    targets = depth_targets[k]
                depth_losses.append(summed_ce(depth_logits, targets))
        loss = ce
        if depth_losses:
            weight = self.language_model.config.mtp_loss_weight
            loss = ce + weight / depth * sum(depth_losses)
        return loss, ce, depth_losses

    @torch.no_grad()
    def eval_sums(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """``[summed next-token cross-entropy, predicted tokens]`` of this rank's micro-batches,
        forward only (held-out evaluation; multi-token prediction depths left out)."""
        total = torch.zeros(2, device=self.device)
        for mb in micro_batches:
            kwargs, n, around, documents = self.prepare(mb)
            _, _, ce, _ = self.forward_sum(kwargs, around, documents)
            total += torch.stack([ce, n.to(self.device, torch.float32)])
        return all_reduce(total, self.cp_group)

    def _batch_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks that split the global batch (data x context)."""
        return all_reduce(all_reduce(value, self.dp_group), self.cp_group)

    # -- backward ---------------------------------------------------------------------------
    def accumulate(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forward and backward of every micro-batch: ``(mean next-token cross-entropy per
        predicted token of the global batch, gradient norm after unscaling, predicted tokens of
        the global batch)``; the multi-token prediction depths' in :attr:`last_mtp_losses`."""
        inputs = [self.prepare(mb) for mb in micro_batches]
        local = torch.stack([n for _, n, _, _ in inputs]).sum().to(self.device, torch.float32)
        global_tokens = self._batch_sum(local.clone())
        scale = self.grad_ranks / global_tokens.clamp(min=1)
        ce_total = torch.zeros((), device=self.device)
        depth_totals = torch.zeros(self.mtp_depth, device=self.device)
        last = len(inputs) - 1
        for i, (kwargs, _, around, documents) in enumerate(inputs):
            sync = contextlib.nullcontext() if i == last else self.parallel.no_sync()
            with sync:
                objective, aux, ce, depth_sums = self.forward_sum(kwargs, around, documents)
                if self.balancer is not None:
                    self.balancer.add_micro_batch()
                objective = objective * scale
                if aux is not None:
                    objective = objective + aux / len(inputs)
                # Under context parallelism recomputed blocks replay their forward in backward
                # (forge_parallel re-enters the router), with the same attention backend.
                backward = contextlib.nullcontext if self.context is None else self.context.backward
                with self.parallel.loss_context(), backward():
                    if self.scaler is not None:
                        self.scaler.scale(objective).backward()
                    else:
                        objective.backward()
            ce_total += ce
            if depth_sums:
                depth_totals += torch.stack(depth_sums)
        sums = self._batch_sum(torch.cat([ce_total.reshape(1), depth_totals]))
        means = (sums / global_tokens.clamp(min=1)).tolist() if self.mtp_depth else None
        loss = sums[0] / global_tokens.clamp(min=1)
        self.last_mtp_losses = (
            {f"mtp_{k}_loss": v for k, v in enumerate(means[1:], start=1)} if means else {}
        )
        self.unscale()
        return loss, self.clip(), int(global_tokens.item())

    def unscale(self) -> None:
        """fp16: divide the gradients by the loss scale and record whether any rank's overflowed
        (:func:`loss_scaler`). Under ZeRO the optimizer's parameters are its shards, whose
        gradients exist once reduced: reduce first."""
        if self.scaler is None:
            return
        if hasattr(self.optimizer, "reduce_gradients"):
            self.optimizer.reduce_gradients()
        self.scaler.unscale_(self.optimizer)

    def clip(self) -> torch.Tensor:
        """Clip to ``optim.grad_clip`` (0: off); returns the total norm before clipping."""
        from forge_parallel import clip_grad_norm_, total_grad_norm

        clip = self.grad_clip
        if hasattr(self.optimizer, "clip_grad_norm_"):  # ZeRO: the optimizer owns the shards
            return self.optimizer.clip_grad_norm_(clip if clip > 0 else float("inf"))
        params = [p for p in self.model.parameters() if p.grad is not None]
        if clip > 0:
            return clip_grad_norm_(params, clip)
        return total_grad_norm(params)

    # -- update -----------------------------------------------------------------------------
    def update(self, step: int, loss: float, grad_norm: float) -> bool:
        """The optimizer step unless the guard refuses it (then gradients are dropped);
        returns whether it stepped. The expert biases follow an applied update."""
        if not self.guard.allows(step, loss, grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            if self.balancer is not None:
                self.balancer.discard()
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step itself on an fp16 overflow
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer is not None:
            self.balancer.apply()
        return True

    def run(
        self, step: int, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[float, float, int]:
        """One whole step (``step``: its 0-based index): ``(loss, grad norm, global tokens)``."""
        loss_t, norm_t, tokens = self.accumulate(micro_batches)
        loss, grad_norm = float(loss_t), float(norm_t)
        self.update(step, loss, grad_norm)
        return loss, grad_norm, tokens
