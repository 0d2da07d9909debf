"""One optimizer step of a pipeline-parallel run (``parallel.pp > 1``).

The same step as :class:`forge_train.step.StepRunner` (loss normalized by the global batch's
predicted tokens, clipping, guarded update), with the forward and backward of all of this
rank's micro-batches run by the pipeline schedule in one call. Gradients are synchronized by
the schedule (FSDP, HSDP and DDP reduce after the last micro-batch) or by the optimizer (ZeRO-1
at the step, ZeRO-2 per micro-batch); the gradient norm is reduced over the pipeline ranks too;
the loss lives on the last stage and is summed over the pipeline group.

fp16 (Micikevicius et al. 2018, arXiv:1710.03740) as Megatron-LM runs it under pipeline
parallelism: the last stage's loss is multiplied by the scaler's scale (``PipelineLoss.scale``;
the MoE balance losses' gradient weight alike), the gradients every stage receives are
therefore scaled, and the found-inf flags are summed over all ranks
(:func:`forge_train.step.loss_scaler`), so every stage skips an overflowing step and moves the
scale alike.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from forge_train.data import model_inputs
from forge_train.distributed import all_reduce
from forge_train.step import StepRunner

__all__ = ["PipelineStepRunner"]


class PipelineStepRunner(StepRunner):
    """:class:`StepRunner` over ``pipeline`` (:class:`forge_train.pipeline_model.PipelineParts`)."""

    def __init__(self, *, pipeline, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pipeline = pipeline
        #: The MoE balance losses' gradient weight at loss scale 1 (fp16 multiplies it).
        self._aux_weight = pipeline.moe.aux_weight if pipeline.moe is not None else 0.0
        if self.context is not None:
            self.context.bind_pipeline(pipeline.pipe.parallelized)

    def _pipeline_inputs(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple], torch.Tensor, list[dict]]:
        """``(input ids [m, T], targets [m, T], block args per micro-batch, predicted tokens,
        model inputs per micro-batch)`` of this rank's micro-batches (every pipeline rank
        computes them from its own copy)."""
        preparer = self.pipeline.inputs_model
        ids, targets, block_args, tokens, batches = [], [], [], [], []
        self._rows = []
        moe = self.pipeline.moe
        token_documents = {}  # a split batch's sequence-wise loss: each block's inputs' rows
        for mb in micro_batches:
            kwargs, n = model_inputs(mb, self.device)
            whole = kwargs
            if self.context is not None:  # this rank's shard of the row (targets shifted whole)
                kwargs, n, row = self.context.shard(kwargs, mtp_depth=self.mtp_depth)
                self._rows.append(row)  # the whole row's documents (and image blocks)
                targets.append(kwargs["targets"])
                local_ids, positions = kwargs["input_ids"], kwargs["position_ids"]
                index = kwargs.get("sequence_index")
                if index is not None:  # a VLM keeps the whole row (its features go in there)
                    local_ids, positions = (
                        t.index_select(-1, index) for t in (local_ids, positions)
                    )
                inputs = preparer.attention_inputs(local_ids, position_ids=positions)
            else:
                targets.append(mb["labels"].reshape(1, -1).to(self.device, non_blocking=True))
                inputs = preparer.attention_inputs(
                    kwargs["input_ids"],
                    position_ids=kwargs["position_ids"],
                    cu_seqlens=kwargs["cu_seqlens"],
                    max_seqlen=kwargs["max_seqlen"],
                    block_ids=kwargs.get("block_ids"),  # a VLM's bidirectional image blocks
                )
            if moe is not None and moe.sequence_loss_sharded:
                token_documents[inputs] = moe.routing.local_documents(whole)
            batches.append(kwargs)
            ids.append(kwargs["input_ids"])
            block_args.append((inputs,))
            tokens.append(n)
        if moe is not None:
            moe.set_documents(token_documents)
        lengths = {t.shape[-1] for t in ids}
        if len(lengths) != 1:
            raise ValueError(
                f"pipeline micro-batches must have one length, got {sorted(lengths)} tokens; "
                "pad every micro-batch to micro_batch_rows x seq_len"
            )
        count = torch.stack(tokens).sum().to(self.device, torch.float32)
        return torch.cat(ids), torch.cat(targets), block_args, count, batches

    def _run_pipeline(
        self, inputs, *, backward: bool, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the schedule on ``_pipeline_inputs``; returns the summed next-token
        cross-entropy of this rank's micro-batches and each multi-token prediction depth's
        (``[D]``), from the last stage, summed over the pipeline group; the schedule's loss
        (the gradient's) is their weighted sum, as :class:`StepRunner`'s. With multi-token
        prediction both come as the loss head computed them (``CausalLMLossHead.sums``), not
        recovered from the schedule's weighted sum."""
        p = self.pipeline
        ids, targets, block_args, _, batches = inputs
        depth = p.head.mtp_depth if p.head is not None else 0  # the same on every stage
        p.loss.scale = scale
        reported: list[torch.Tensor] = []
        run = p.pipe.step if backward else p.pipe.eval
        if p.head is not None:  # the last stage computes the loss of each micro-batch itself
            p.head.load(batches if p.is_last else None)
        documents = (
            self.context.pipeline_forward(self._rows)
            if self.context is not None
            else contextlib.nullcontext()
        )
        try:
            with self.autocast(), documents:
                first, finish = p.first_stage_inputs(ids, batches, backward=backward)
                run(
                    *first,
                    target=targets if p.is_last else None,
                    losses=reported,
                    block_args=block_args,
                    # before the tied gradients are summed: the backward of what ran ahead
                    # of the first stage (a VLM's encoder and token embedding)
                    **({"finish": finish} if backward else {}),
                )
            if depth:  # [next-token, depth 1, ..., depth D] as the last stage's head took them
                sums = p.head.sums(self.device)
        finally:
            if p.head is not None:
                p.head.load(None)
        if not backward:
            finish()
        if not depth:  # the schedule's loss is the next-token cross-entropy alone
            ce = p.loss.cross_entropy(reported) if reported else torch.zeros((), device=self.device)
            sums = ce.float().reshape(1)
        sums = all_reduce(sums, p.group)
        return sums[0], sums[1:]

    def accumulate(
        self, micro_batches: list[dict[str, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        inputs = self._pipeline_inputs(micro_batches)
        global_tokens = self._batch_sum(inputs[3].clone())
        loss_scale = self._loss_scale()
        scale = float(self.grad_ranks / global_tokens.clamp(min=1)) * loss_scale
        if self.pipeline.moe is not None:  # the balance losses' gradients scaled alike
            self.pipeline.moe.aux_weight = self._aux_weight * loss_scale
        ce, depth_sums = self._run_pipeline(inputs, backward=True, scale=scale)
        sums = self._batch_sum(torch.cat([ce.reshape(1), depth_sums]))
        means = sums / global_tokens.clamp(min=1)
        loss = means[0]
        self.last_mtp_losses = {
            f"mtp_{k}_loss": v for k, v in enumerate(means[1:].tolist(), start=1)
        }
        self.unscale()  # fp16: found-inf summed over every rank (forge_train.step.loss_scaler)
        return loss, self.clip(), int(global_tokens.item())

    def _loss_scale(self) -> float:
        """fp16: the scaler's current scale, by which the last stage's loss is multiplied (what
        ``GradScaler.scale`` does to a single process's loss; a power of two, so exactly);
        else 1. The reported cross-entropy divides it out again (``PipelineLoss.factor``)."""
        if self.scaler is None:
            return 1.0
        return float(self.scaler.scale(torch.ones((), device=self.device)))

    def clip(self) -> torch.Tensor:
        from forge_parallel.pipeline import pipeline_clip_grad_norm_, pipeline_grad_norm

        counted = self.pipeline.norm_parameters()  # a tied embedding's copy: once
        if hasattr(self.optimizer, "clip_grad_norm_"):  # ZeRO: the optimizer owns the shards
            clip = self.grad_clip if self.grad_clip > 0 else float("inf")
            return self.optimizer.clip_grad_norm_(
                clip, also_over=self.pipeline.group, counted=counted
            )
        params = [p for p in self.pipeline.stage.parameters() if p.grad is not None]
        if self.grad_clip > 0:
            return pipeline_clip_grad_norm_(
                params, self.grad_clip, self.pipeline.group, counted=counted
            )
        return pipeline_grad_norm(counted, self.pipeline.group)

    @torch.no_grad()
    def eval_sums(self, micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        inputs = self._pipeline_inputs(micro_batches)
        ce, _ = self._run_pipeline(inputs, backward=False, scale=1.0)
        return all_reduce(torch.stack([ce, inputs[3]]), self.cp_group)
