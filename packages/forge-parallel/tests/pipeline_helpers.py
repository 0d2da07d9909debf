"""Pipeline counterpart of ``tiny_models.run_layouts``: train the single-process reference and
each pipeline layout (same initial weights, same batches, AdamW, gradient accumulation through
micro-batches, gradient clipping that bites) and return the worst relative errors.

Imported by file path from the test modules (and, through them, by the worker pool).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from forge_core.testing import import_path
from forge_parallel.pipeline import pipeline

tm = import_path(Path(__file__).with_name("tiny_models.py"), "forge_parallel_tests_tiny_models")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def train_pipeline(pipe, batches: list[list[torch.Tensor]], *, dp_group=None) -> dict:
    """Train ``pipe`` on ``batches``: one ``step`` per optimizer step, its micro-batches being
    the reference's accumulation micro-batches (each rank's data-parallel rows of them)."""
    dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
    dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
    opt = pipe.build_optimizer(torch.optim.AdamW, lr=tm.LR, weight_decay=0.1)  # ZeRO: sharded
    if pipe.zero:  # the reduced gradients are the optimizer's shards: clipping needs it
        with pytest.raises(
            ValueError, match=r"pass it as clip_grad_norm_\(\.\.\., optimizer=opt\)"
        ):
            pipe.clip_grad_norm_(tm.MAX_NORM)
    losses, norms = [], []
    for micro_batches in batches:
        rows = torch.cat([t.chunk(dp_size)[dp_rank] for t in micro_batches])
        inputs, labels = rows[:, :-1], rows[:, 1:]
        step_losses: list[torch.Tensor] = []
        pipe.step(inputs, target=labels, losses=step_losses)
        norm = pipe.clip_grad_norm_(tm.MAX_NORM, optimizer=opt)
        opt.step()
        opt.zero_grad()
        # Only the last stage has the losses: sum over the pipeline, average over data parallel.
        step_loss = torch.stack(step_losses).mean() if step_losses else torch.zeros(())
        dist.all_reduce(step_loss, group=pipe.group)
        if dp_group is not None:
            dist.all_reduce(step_loss, group=dp_group)
            step_loss /= dp_size
        losses.append(step_loss.item())
        norms.append(norm.item())
    return {"losses": losses, "norms": norms}


def gathered_params(pipe) -> dict[str, torch.Tensor]:
    """The whole model's parameters, from every pipeline rank's stages (a collective)."""
    local = {n: tm._value(p.detach()).clone() for n, p in pipe.named_parameters()}
    parts: list = [None] * pipe.pp
    dist.all_gather_object(parts, local, group=pipe.group)
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        out.update(part)
    return out


_MESHES: dict = {}


def run_pipeline_layouts(build: str, layouts: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Train the reference and every layout on this rank.

    A layout: ``dims`` (``ParallelDims`` keyword arguments, ``pp`` among them), ``pipeline``
    keyword arguments (schedule, virtual_stages, split, ...) and optionally ``stage_parallel``.
    """

    if build in ("moe", "moe4"):  # the tiny MoE decoder, kernels through eager references
        moe = import_path(Path(__file__).with_name("tiny_moe.py"), "forge_parallel_tests_tiny_moe")
        n_layers = 4 if build == "moe4" else 2
        with moe.eager_kernels():
            return _run_pipeline_layouts(lambda: moe.build_tiny_moe(n_layers=n_layers), layouts)
    factory = {
        "tiny": tm.build_tiny,
        "tiny4": lambda: tm.build_tiny(n_layers=4),
        "tiny_tied": lambda: tm.build_tiny(tie=True),
        "tiny4_tied": lambda: tm.build_tiny(n_layers=4, tie=True),
    }.get(build, tm.build_hf_llama)
    return _run_pipeline_layouts(factory, layouts)


def _run_pipeline_layouts(factory, layouts: dict[str, dict]) -> dict[str, dict[str, float]]:
    from forge_core import ParallelDims

    batches = tm.make_batches()
    initial = factory()
    reference, ref_params = tm.rank0_reference(initial, batches)
    out = {}
    for name, layout in layouts.items():
        start = time.perf_counter()
        dims = ParallelDims(world_size=dist.get_world_size(), **layout["dims"])
        if dims not in _MESHES:  # building a mesh creates process groups: seconds at 8 ranks
            _MESHES[dims] = dims.build_mesh()
        mesh = _MESHES[dims]
        model = copy.deepcopy(initial)
        stage_parallel = layout.get("stage_parallel")
        pipe = pipeline(
            model,
            mesh,
            loss_fn=cross_entropy,
            microbatches=tm.ACCUM,
            stage_parallel=stage_parallel,
            **layout["pipeline"],
        )
        del model  # each rank keeps only its stages' layers
        dp_group = mesh.group("dp") if dims.dp > 1 else None
        got = train_pipeline(pipe, batches, dp_group=dp_group)
        out[name] = tm.compare(reference, ref_params, got, gathered_params(pipe))
        out[name]["seconds"] = time.perf_counter() - start
    return out
