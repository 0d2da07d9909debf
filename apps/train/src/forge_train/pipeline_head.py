"""The last pipeline stage of a language model computes its loss inside its own forward.

Without tensor parallelism the stage ends in :class:`CausalLMLossHead` (``forge_parallel``'s
``StageModule.post_forward``) instead of the final norm and the head: it returns the summed
loss of its micro-batch, computed as :class:`forge_models.CausalLM` does with ``labels`` and
``loss_reduction="sum"``:

- the next-token cross-entropy of ``lm_head(norm(h))`` by
  ``forge_kernels.fused_linear_cross_entropy``, chunked over the tokens without ever holding the
  ``[tokens, vocab]`` logits (Liger-Kernel, arXiv:2410.10989; Wijmans et al. 2024,
  arXiv:2411.09009), so a pipeline run saves the memory a single process saves;
- with ``mtp_depth = D > 0``, DeepSeek-V3's multi-token prediction (DeepSeek-AI 2024,
  arXiv:2412.19437 section 2.2): module ``k`` embeds the tokens ``k`` places ahead, runs its
  block on ``h^{k-1}`` and predicts the token ``k + 1`` ahead; the loss adds
  ``mtp_loss_weight / D * sum_k ce_k`` (eq. 25). The modules live on the last stage; the
  token embedding they share with the first stage is held there too and kept equal to the
  first stage's (``forge_parallel`` tied weights, ``also_used={"embed_tokens": (-1,)}``). A MoE
  block of a module goes through :meth:`forge_train.pipeline_moe.PipelineMoE.route` like the
  decoder's MoE blocks.

Where the fused loss cannot serve, the head reads the logits ``lm_head(x)`` and takes their
cross-entropy in fp32, as ``forge_train.step`` does from a tensor-parallel model's logits
(``fused=False``; used only with multi-token prediction, the main loss alone being the
pipeline's ``loss_fn`` there), for the main head and every depth alike (DeepSeek-V3's shared
output head):

- with tensor parallelism the head's logits come as the plan makes them: gathered over the
  vocabulary on every tensor-parallel rank (the families' ``"colwise_output_replicated"``),
  so the cross-entropy is one process's, or kept vocabulary-sharded (a ``"loss_parallel"``
  head) for the vocabulary-parallel cross-entropy (Megatron-LM, Shoeybi et al. 2019,
  arXiv:1909.08053), the schedule then running inside ``loss_parallel()``
  (:mod:`forge_parallel.pipeline.loss_parallel`); the modules get the run's plan like decoder
  layers (with sequence parallelism each rank runs them on its sequence shard,
  ``forge_train.components._mtp_sequence_parallel_styles``; without it unsplit on the whole
  sequence), as one tensor-parallel process runs them;
- under the zero-bubble schedules (Qi et al. 2024, arXiv:2401.10241) the stage's backward is
  split into an input- and a weight-gradient pass through the same graph, and the fused
  loss, whose gradients are computed in its forward and handed out once, refuses the second.

The head's weight is read inside the stage's forward, where FSDP2 has gathered the stage's
root parameters (a closure after the forward would see the resharded weight). The targets,
and the input ids the prediction modules embed, are set per step (:meth:`load`) and taken for
the micro-batch the stage runs (``StageModule.microbatch``); the document boundaries come with
the blocks' arguments. Under context parallelism the targets, and each depth's input ids and
targets (``mtp_inputs``), come moved on the whole row and cut like the stage's shard
(:meth:`forge_train.context_parallel.ContextParallelInputs.shard`).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CausalLMLossHead"]


class CausalLMLossHead:
    """``post_forward`` of a :class:`forge_models.CausalLM`'s last stage: the summed loss
    ``[1]`` (fp32) of the micro-batch (see the module docstring). ``moe``: the run's
    :class:`~forge_train.pipeline_moe.PipelineMoE` when the model has MoE layers; ``fused``:
    the fused linear cross-entropy, else the cross-entropy of the (possibly vocabulary-sharded)
    logits (see the module docstring)."""

    def __init__(self, config, *, moe: Any = None, fused: bool = True) -> None:
        self.fused = fused
        self.vocab_size = config.vocab_size
        self.mtp_depth = config.mtp_depth
        self.mtp_loss_weight = config.mtp_loss_weight
        self.moe = moe
        self._batches: list[dict[str, Any]] | None = None
        #: With multi-token prediction, ``[next-token, depth 1, ..., depth D]`` summed
        #: cross-entropies (detached fp32, ``[1 + D]``) per micro-batch this stage ran in the
        #: schedule since :meth:`load`: the step reports the next-token one as computed here
        #: rather than the schedule's loss less the weighted depths (inexact by rounding),
        #: and the depths apart (:meth:`sums`).
        self._sums: dict[int, torch.Tensor] = {}

    def load(self, batches: list[dict[str, Any]] | None) -> None:
        """Set the model inputs of the coming micro-batches (``None``: forget them)."""
        self._batches = batches
        if batches is not None:
            self._sums = {}

    def sums(self, device: torch.device) -> torch.Tensor:
        """``[1 + D]`` (multi-token prediction only): the next-token and each depth's summed
        cross-entropy over the micro-batches run since :meth:`load` (zeros on a rank whose
        stage does not end the model)."""
        total = torch.zeros(1 + self.mtp_depth, device=device)
        for sums in self._sums.values():
            total += sums.to(device)
        return total

    def __call__(self, stage: torch.nn.Module, h: torch.Tensor, block_args: tuple) -> torch.Tensor:
        if h.is_meta:  # the pipeline runtime's shape inference on the meta device
            return torch.zeros(1, dtype=torch.float32, device="meta")
        # torch >= 2.15 probes the shapes on uninitialized tensors (stage.in_schedule false):
        # the loss is computed as usual but no MoE load is recorded.
        if self._batches is None or not 0 <= stage.microbatch < len(self._batches):
            raise RuntimeError(
                f"the loss head has no targets for micro-batch {stage.microbatch}: call "
                "CausalLMLossHead.load(batches) before running the schedule"
            )
        from forge_models.causal_lm import mtp_depths, shift_labels

        batch = self._batches[stage.microbatch]
        (inputs,) = block_args
        if "targets" in batch:  # already shifted on the whole row (a context-parallel shard)
            targets = batch["targets"]
        else:
            targets = shift_labels(batch["labels"], cu_seqlens=inputs.cu_seqlens)
        loss = self._cross_entropy(stage, stage.norm(h), targets)
        if self.mtp_depth:
            route = None
            if self.moe is not None and stage.in_schedule:  # not the runtime's probe

                def route(module, out):
                    return self.moe.route(module.block.layer_idx, out, inputs)

            depths = mtp_depths(
                stage.mtp, h, batch["input_ids"], stage.embed_tokens, inputs,
                targets=targets, route=route, depth_inputs=batch.get("mtp_inputs"),
            )  # fmt: skip
            mtp_losses = [self._cross_entropy(stage, x, t) for x, t in depths]
            if stage.in_schedule:  # not the runtime's probe
                self._sums[stage.microbatch] = torch.stack([loss, *mtp_losses]).detach().float()
            loss = loss + self.mtp_loss_weight / len(mtp_losses) * sum(mtp_losses)
        return torch.stack((loss,))  # a new tensor, not a view (FSDP2 hooks the output)

    def _cross_entropy(
        self, stage: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Summed cross-entropy of ``lm_head(x)``: fused, without materializing the logits, or
        from the logits (vocabulary-sharded under tensor parallelism)."""
        import forge_kernels
        from forge_models.causal_lm import IGNORE_INDEX

        if not self.fused:
            logits = stage.lm_head(x)
            if logits.shape[-1] != self.vocab_size:  # the padding rows' columns
                logits = logits[..., : self.vocab_size]
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, -2).float(),
                targets.reshape(-1),
                reduction="sum",
                ignore_index=IGNORE_INDEX,
            )
        weight = stage.lm_head.weight
        if weight.shape[0] != self.vocab_size:  # vocabulary padding rows are never predicted
            weight = weight[: self.vocab_size]
        return forge_kernels.fused_linear_cross_entropy(
            x.reshape(-1, x.shape[-1]),
            weight,
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
