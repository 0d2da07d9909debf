"""Pipeline parallelism for plain decoders, on ``torch.distributed.pipelining``.

``pipeline(model, mesh_or_group, loss_fn=..., schedule="1f1b", microbatches=4,
virtual_stages=1, split="layers", stage_parallel={...})`` splits a decoder (embedding ->
blocks -> norm -> head) into stages, applies :func:`~forge_parallel.parallelize` to each
stage module on the non-pipeline axes, and returns a :class:`Pipeline` whose ``step`` runs the
schedule (GPipe, 1F1B, interleaved 1F1B, ZB-H1 / interleaved zero bubble, ZB-V).
:func:`bubble_fraction` gives a schedule's idle fraction analytically and
:func:`measure_bubble` from a real run.
"""

from forge_parallel.pipeline.bubble import BubbleReport, bubble_fraction, measure_bubble
from forge_parallel.pipeline.config import SCHEDULES, SPLIT_MODES, PipelineConfig
from forge_parallel.pipeline.grad_norm import pipeline_clip_grad_norm_, pipeline_grad_norm
from forge_parallel.pipeline.partition import balanced_partition, stage_ranks, stages_of_rank
from forge_parallel.pipeline.schedule import Pipeline, pipeline, split_stages, stage_plan
from forge_parallel.pipeline.stage_module import (
    DecoderLayout,
    StageCarry,
    StageModule,
    decoder_layout,
    layer_costs,
)

__all__ = [
    "SCHEDULES",
    "SPLIT_MODES",
    "BubbleReport",
    "DecoderLayout",
    "Pipeline",
    "PipelineConfig",
    "StageCarry",
    "StageModule",
    "balanced_partition",
    "bubble_fraction",
    "decoder_layout",
    "layer_costs",
    "measure_bubble",
    "pipeline",
    "pipeline_clip_grad_norm_",
    "pipeline_grad_norm",
    "split_stages",
    "stage_plan",
    "stage_ranks",
    "stages_of_rank",
]
