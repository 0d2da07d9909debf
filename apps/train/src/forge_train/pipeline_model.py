"""A run's model split into pipeline stages (``parallel.pp > 1``), one stage per pipeline rank.

Built on :func:`forge_parallel.pipeline.pipeline`: the decoder is cut into ``pp`` stages
(embedding with the first, final norm and head with the last), each rank keeps its stage and
applies the other axes to it (FSDP over ``dp_shard``, tensor parallel over ``tp``, recompute,
compile), and a ``torch.distributed.pipelining`` schedule runs a step's micro-batches.

A rank's data-parallel micro-batches are the pipeline's micro-batches: each is one packed row
(``[1, rows x seq_len]`` tokens), the schedule splits their stack along dim 0. The blocks of
every stage get the micro-batch's attention inputs (RoPE tables and document boundaries,
:meth:`forge_models.CausalLM.attention_inputs`) as block arguments, computed on every pipeline
rank from its own copy of the batch by a meta-device copy of the model (config and rotary
tables only, no weights).

The last stage outputs the logits; :class:`PipelineLoss` turns them into the summed
cross-entropy scaled by ``dp_size / global tokens`` (the same objective as the single-process
step, see :mod:`forge_train.step`), undoing the schedule's ``1 / microbatches``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from forge_train.config import ConfigError

__all__ = ["PipelineLoss", "PipelineParts", "build_pipeline"]

IGNORE_INDEX = -100


@dataclass
class PipelineLoss:
    """``loss_fn`` of the schedule: the summed cross-entropy of one micro-batch times
    ``scale`` (set per step). :meth:`cross_entropy` recovers the sum from the values the
    schedule reports (``Pipeline.step(losses=...)``)."""

    microbatches: int
    scale: float = 1.0

    @property
    def factor(self) -> float:
        # The schedule back-propagates loss / microbatches; multiply it back.
        return self.scale * self.microbatches

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
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
    #: The unsplit model, kept only while a meta-device stage awaits initialization.
    whole_model: torch.nn.Module | None = None

    def materialize(self, device: torch.device) -> None:
        """Allocate a meta-device stage on ``device`` and initialize it with the whole model's
        ``init_weights`` (the other stages' parameters stay on the meta device)."""
        import forge_models

        # forge_models.materialize allocates FSDP / TP DTensors as their local shards.
        forge_models.materialize(self.stage, device, init=False)
        self.whole_model.init_weights()
        self.whole_model = None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's unsharded state dict on the CPU, on the ranks of the pipeline
        group holding global rank 0 (``None`` elsewhere). Collective: every rank calls it."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        # Gathers FSDP / TP shards within the stage, on every rank (with cpu_offload only
        # global rank 0 would get them, not the other stages' ranks).
        full = get_model_state_dict(self.stage, options=StateDictOptions(full_state_dict=True))
        local = {name: value.detach().cpu() for name, value in full.items()}
        del full
        ranks = dist.get_process_group_ranks(self.group)
        if 0 not in ranks:
            return None
        parts: list = [None] * len(ranks)
        dist.all_gather_object(parts, local, group=self.group)
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return merged

    @property
    def group(self):
        return self.pipe.group

    @property
    def is_last(self) -> bool:
        return self.pipe.has_last_stage

    @property
    def is_first(self) -> bool:
        return self.pipe.has_first_stage


def check_pipeline_model(model: torch.nn.Module, config, *, pp: int) -> None:
    """Fail before any compute for models the pipeline cannot carry yet."""
    num_layers = getattr(config, "num_layers", None)
    if num_layers is None or not hasattr(model, "attention_inputs"):
        raise ConfigError(
            "parallel.pp: pipeline parallelism needs a forge_models CausalLM (model.kind=llm)"
        )
    if num_layers < pp:
        raise ConfigError(
            f"parallel.pp: {pp} pipeline stages need at least {pp} layers, the model has "
            f"{num_layers}; lower parallel.pp"
        )
    if getattr(config, "moe", None) is not None:
        raise ConfigError(
            "parallel.pp: mixture-of-experts models are not pipelined yet (the router's "
            "auxiliary loss is computed from every layer at the head); use parallel.pp=1"
        )
    if getattr(config, "tie_word_embeddings", False):
        raise ConfigError(
            "parallel.pp: tied input and output embeddings live on the first and the last "
            "stage; keeping them tied across stages is not supported yet. Set "
            "model.config.tie_word_embeddings=false (a new model) or parallel.pp=1"
        )
    if getattr(config, "mtp_depth", 0):
        raise ConfigError(
            "parallel.pp: multi-token prediction modules are not pipelined yet; set "
            "model.config.mtp_depth=0 or parallel.pp=1"
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
) -> PipelineParts:
    """Split ``model`` over ``mesh["pp"]`` and keep this rank's stage (see the module
    docstring); ``stage_parallel``: :func:`forge_parallel.parallelize` arguments per stage."""
    import forge_models
    from forge_parallel.pipeline import pipeline

    loss = PipelineLoss(microbatches=microbatches)
    pipe = pipeline(
        model,
        mesh,
        loss_fn=loss,
        schedule=schedule,
        microbatches=microbatches,
        split=split,
        stage_parallel=stage_parallel,
    )
    (stage,) = pipe.modules
    if hasattr(model, "hf_config"):  # the source config.json, written back by the export
        stage.hf_config = model.hf_config
    return PipelineParts(
        pipe=pipe,
        stage=stage,
        loss=loss,
        inputs_model=forge_models.build_model(config, device="meta"),
        stage_parallel=pipe.parallelized[0],
        whole_model=model if any(p.is_meta for p in model.parameters()) else None,
    )
