"""A run's model split into pipeline stages (``parallel.pp > 1``), one stage per pipeline rank.

Built on :func:`forge_parallel.pipeline.pipeline`: the decoder is cut into ``pp`` stages
(embedding with the first, final norm and head with the last), each rank keeps its stage and
applies the other axes to it (FSDP, HSDP or DDP over the data ranks, or ZeRO-1/2 in the
optimizer ``Pipeline.build_optimizer`` builds; tensor parallel over ``tp``, recompute,
compile), and a ``torch.distributed.pipelining`` schedule runs a step's micro-batches.

A rank's data-parallel micro-batches are the pipeline's micro-batches: each is one packed row
(``[1, rows x seq_len]`` tokens), the schedule splits their stack along dim 0. The blocks of
every stage get the micro-batch's attention inputs (RoPE tables and document boundaries,
:meth:`forge_models.CausalLM.attention_inputs`) as block arguments, computed on every pipeline
rank from its own copy of the batch by a meta-device copy of the model (config and rotary
tables only, no weights).

A tied embedding and head (``tie_word_embeddings``) are one matrix held by the first and the
last stage, their gradients summed over the two (:mod:`forge_parallel.pipeline.tied`); the
checkpoint names it ``embed_tokens.weight`` as a single process does.

Without tensor parallelism the last stage computes the summed loss inside its forward with the
fused linear cross-entropy, as one process does, never holding the logits; multi-token
prediction modules run there too (:mod:`forge_train.pipeline_head`). (Not under the
zero-bubble schedules: their split backward runs the loss's backward twice, which the fused
loss does not allow; the last stage outputs the logits there.) With tensor parallelism it
outputs the logits sharded by vocabulary and the loss is the vocabulary-parallel cross-entropy
(``"loss_parallel"`` head, :mod:`forge_parallel.pipeline.loss_parallel`), as the single-process
tensor-parallel step computes it. With multi-token prediction under tensor parallelism or a
zero-bubble schedule the last stage still computes the loss itself, from the main head's and
each depth's logits. :class:`PipelineLoss` scales either by ``dp_size / global
tokens`` (the same objective as the single-process step, see :mod:`forge_train.step`),
undoing the schedule's ``1 / microbatches``. A MoE model's balance losses and expert load are
handled per stage, the switch loss's per-expert sums carried from stage to stage with the
hidden states (:mod:`forge_train.pipeline_moe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forge_train.config import ConfigError

__all__ = ["PipelineLoss", "PipelineParts", "build_pipeline"]

IGNORE_INDEX = -100
#: Schedules that split each backward into an input- and a weight-gradient pass.
_SPLIT_BACKWARD = ("zero_bubble", "zbv")


@dataclass
class PipelineLoss:
    """``loss_fn`` of the schedule: the summed cross-entropy of one micro-batch times
    ``scale`` (set per step). :meth:`cross_entropy` recovers the sum from the values the
    schedule reports (``Pipeline.step(losses=...)``). ``in_stage``: the last stage outputs the
    summed loss itself (:class:`~forge_train.pipeline_head.CausalLMLossHead`), not logits."""

    microbatches: int
    scale: float = 1.0
    in_stage: bool = False
    #: The model's vocabulary: logits columns past it (``vocab_pad_multiple`` padding rows of
    #: the output layer, which the last stage's ``lm_head`` outputs) are dropped, as
    #: ``CausalLM.forward`` drops them.
    vocab_size: int | None = None

    @property
    def factor(self) -> float:
        # The schedule back-propagates loss / microbatches; multiply it back.
        return self.scale * self.microbatches

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.in_stage:  # the stage's [1] summed loss
            return logits.sum() * self.factor
        if self.vocab_size is not None and logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            reduction="sum",
            ignore_index=IGNORE_INDEX,
        )
        return ce * self.factor

    def cross_entropy(self, reported: list[torch.Tensor]) -> torch.Tensor:
        """The summed cross-entropy of the micro-batches whose loss values are ``reported``."""
        return torch.stack(reported).float().sum() / self.factor


@dataclass
class PipelineParts:
    """This rank's pipeline: ``pipe`` (forge_parallel ``Pipeline``), its ``stage`` module (what
    the checkpoint and the optimizer see), the ``loss``, and ``inputs_model`` (meta-device
    model computing each micro-batch's attention inputs)."""

    pipe: Any
    stage: torch.nn.Module
    loss: PipelineLoss
    inputs_model: torch.nn.Module
    stage_parallel: Any  # the stage's forge_parallel ParallelizeResult
    #: A MoE model's router handling on the stages (forge_train.pipeline_moe.PipelineMoE).
    moe: Any = None
    #: The unsplit model, kept only while a meta-device stage awaits initialization.
    whole_model: torch.nn.Module | None = None
    #: The last stage's loss head (forge_train.pipeline_head.CausalLMLossHead), or ``None``
    #: when the last stage outputs logits; the step loads each micro-batch's targets into it.
    head: Any = None

    def materialize(self, device: torch.device, *, init: bool = True) -> None:
        """Allocate a meta-device stage on ``device`` and, with ``init``, initialize it with the
        whole model's ``init_weights`` (the other stages' parameters stay on the meta device)."""
        import forge_models

        # forge_models.materialize allocates FSDP / TP DTensors as their local shards.
        forge_models.materialize(self.stage, device, init=False)
        if init:
            self.whole_model.init_weights()
        self.whole_model = None
        self.pipe.sync_tied_weights()  # the first stage's draw, on every stage using it

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's unsharded state dict on the CPU on global rank 0 (``None``
        elsewhere), gathered one tensor at a time: FSDP / TP shards within the owning stage,
        then sent from it to rank 0 (:func:`forge_ckpt.hf.full_tensors.iter_full_tensors`; no
        other rank holds more than one tensor). Collective: every rank calls it. The Hugging
        Face export streams the same tensors straight into the files
        (:func:`forge_train.modeling.export_tensors`)."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        from forge_ckpt.hf.full_tensors import iter_full_tensors

        state = get_model_state_dict(self.stage)  # this rank's shards, whole-model names
        full = dict(iter_full_tensors(state, pipeline_group=self.group, dst=0))
        return full if dist.get_rank() == 0 else None

    def norm_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's parameters that count towards the global gradient norm (a parameter
        several pipeline ranks hold counts once, see ``Pipeline.norm_parameters``)."""
        return self.pipe.norm_parameters()

    def first_stage_inputs(self, ids: torch.Tensor, batches: list[dict], *, backward: bool):
        """``(inputs of the first stage on this rank, finish)``: the token ids ``[m, T]`` on
        the ranks holding it; ``finish()`` runs after the schedule (nothing here; a
        vision-language model's encoder runs ahead of the schedule, see
        :mod:`forge_train.vlm_pipeline`). ``batches``: each micro-batch's model inputs."""
        return ((ids,) if self.is_first else ()), lambda: None

    @property
    def group(self):
        return self.pipe.group

    @property
    def is_last(self) -> bool:
        return self.pipe.has_last_stage

    @property
    def is_first(self) -> bool:
        return self.pipe.has_first_stage


def check_pipeline_model(
    model: torch.nn.Module,
    config,
    *,
    pp: int,
    virtual_stages: int = 1,
    schedule: str = "1f1b",
    tp: int = 1,
) -> None:
    """Fail before any compute for models the pipeline cannot carry yet."""
    num_layers = getattr(config, "num_layers", None)
    if num_layers is None or not hasattr(model, "attention_inputs"):
        raise ConfigError(
            "parallel.pp: pipeline parallelism needs a forge_models CausalLM (model.kind=llm)"
        )
    stages = pp * virtual_stages
    if num_layers < stages:
        raise ConfigError(
            f"parallel.pp: {stages} pipeline stages (pp {pp} x pp_virtual_stages "
            f"{virtual_stages}) need at least {stages} layers, the model has {num_layers}; "
            "lower parallel.pp or parallel.pp_virtual_stages"
        )
    if schedule == "zbv" and getattr(config, "tie_word_embeddings", False):
        raise ConfigError(
            "parallel.pp_schedule: zbv places the first and the last stage on one rank, where "
            "the tied embedding and head would be one parameter of two separately wrapped "
            "stages; use interleaved_1f1b, or model.config.tie_word_embeddings=false"
        )
    if schedule == "zbv" and getattr(config, "mtp_depth", 0):
        raise ConfigError(
            "parallel.pp_schedule: zbv places the first and the last stage on one rank, where "
            "the embedding the multi-token prediction modules share with the first stage "
            "would be one parameter of two separately wrapped stages; use zero_bubble or "
            "interleaved_1f1b, or model.config.mtp_depth=0"
        )


def build_pipeline(
    model: torch.nn.Module,
    config,
    mesh,
    *,
    microbatches: int,
    schedule: str,
    split: str,
    stage_parallel: dict[str, Any],
    virtual_stages: int = 1,
) -> PipelineParts:
    """Split ``model`` over ``mesh["pp"]`` and keep this rank's stage (see the module
    docstring); ``stage_parallel``: :func:`forge_parallel.parallelize` arguments per stage."""
    import forge_models
    from forge_parallel.pipeline import pipeline

    moe = None
    if getattr(config, "moe", None) is not None:
        from forge_train.pipeline_moe import PipelineMoE

        moe = PipelineMoE(config, microbatches=microbatches)
    plan = stage_parallel.get("plan")
    head = None
    # With tensor parallelism the head keeps the logits vocab-sharded for loss_parallel; the
    # zero-bubble schedules back-propagate the loss twice (input, then weight gradients),
    # which the fused loss (its gradients computed in its forward) does not allow. There the
    # last stage outputs the logits, or with multi-token prediction computes its loss from
    # them (forge_train.pipeline_head, fused=False).
    fused = plan is None and schedule not in _SPLIT_BACKWARD
    if fused or getattr(config, "mtp_depth", 0):
        from forge_train.pipeline_head import CausalLMLossHead

        head = CausalLMLossHead(config, moe=moe, fused=fused)
    loss = PipelineLoss(
        microbatches=microbatches, in_stage=head is not None, vocab_size=config.vocab_size
    )
    pipe = pipeline(
        model,
        mesh,
        loss_fn=loss,
        schedule=schedule,
        microbatches=microbatches,
        virtual_stages=virtual_stages,
        split=split,
        stage_parallel=stage_parallel,
        block_output=moe,
        post_forward=head,
        carry=moe if moe is not None and moe.switch else None,  # the switch loss's sums
        also_used={"embed_tokens": (-1,)} if getattr(config, "mtp_depth", 0) else None,
    )
    stage = pipe.local_module()  # this rank's (virtual) stages under the whole model's names
    if hasattr(model, "hf_config"):  # the source config.json, written back by the export
        stage.hf_config = model.hf_config
        stage.hf_generation_config = getattr(model, "hf_generation_config", None)
    return PipelineParts(
        pipe=pipe,
        stage=stage,
        loss=loss,
        inputs_model=forge_models.build_model(config, device="meta"),
        stage_parallel=pipe.parallelized[0],
        moe=moe,
        whole_model=model if any(p.is_meta for p in model.parameters()) else None,
        head=head,
    )
