"""Split backward (zero-bubble schedules) on stages whose parameters FSDP2 shards.

Zero-bubble schedules (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", arXiv:2401.10241)
split each micro-batch's backward into an input-gradient pass ``B`` (sent to the previous stage
at once) and a weight-gradient pass ``W`` run later to fill the bubble. ``torch.distributed.
pipelining`` does the split on the autograd graph (``stage_backward_input`` /
``stage_backward_weight``): ``B`` records, for the stage's weights, the graph nodes where their
gradients branch off the input-gradient path, and ``W`` resumes from there.

It finds the weights' nodes from ``stage.submod.parameters()``. Under FSDP2 those are the
*sharded* parameters, while the forward graph used the *unsharded* ones FSDP all-gathered
(``fully_shard`` swaps them in for the forward and keeps one unsharded ``nn.Parameter`` per
sharded one). No sharded parameter is in the graph, so ``B`` found no weights and ``W`` computed
nothing: every stage but the first (whose ``W`` is a full backward) lost its weight gradients,
and the reduce-scatter at the end of the step reduced nothing for them.

The fix here takes the weights from the graph itself: the leaves that require a gradient and
are reachable from the stage outputs, other than the stage inputs. Those are the tensors the
forward really used, with or without FSDP (a plain stage gets its own parameters back). ``W``
then accumulates into the unsharded parameters' ``.grad``; torch's stage already keeps FSDP from
reducing before the last micro-batch (``set_requires_gradient_sync(False)``, manual backward
finalization), and its final reduce-scatter reads exactly those gradients.

``W`` also keeps the graph (``retain_graph=True``) on every stage: torch runs it per group of
weights, each from the input-gradient nodes where the group's weights branch off, and frees
what it ran through. A weight used both early and late in a stage (a tied embedding and head
on the last stage, whose multi-token prediction module embeds tokens with it, DeepSeek-V3
arXiv:2412.19437 section 2.2) has branch points along one chain: its group's pass runs from
the head back through the module's block (the branch points' gradients are replaced by the
recorded ones, so nothing is counted twice) and freed that block's nodes before or after the
block's own weights' group needed them ("Trying to backward through the graph a second
time"). The graph is still released with the pass's last reference to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, Node
from torch.distributed.fsdp import FSDPModule

__all__ = ["graph_weights", "split_backward"]


def _node(t: torch.Tensor | GradientEdge) -> Node | None:
    if isinstance(t, GradientEdge):
        return t.node
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:  # a leaf: its AccumulateGrad node, created through a view
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


def graph_weights(
    outputs: Sequence[torch.Tensor | GradientEdge | None], inputs: Sequence[Any]
) -> list[torch.Tensor]:
    """The leaf tensors requiring a gradient that ``outputs`` were computed from, except
    ``inputs``: the weights the forward actually used (FSDP's unsharded parameters)."""
    input_nodes = {
        node
        for x in inputs
        if isinstance(x, torch.Tensor) and x.requires_grad and (node := _node(x)) is not None
    }
    roots = [_node(t) for t in outputs if isinstance(t, (torch.Tensor, GradientEdge))]
    seen: set[Node] = set()
    stack = [n for n in roots if n is not None]
    weights: list[torch.Tensor] = []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in input_nodes:
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            weights.append(variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return weights


def split_backward(
    stage: Any, backward_type: str, bwd_kwargs: dict
) -> tuple[tuple[torch.Tensor | None, ...], list[dict[str, Any]] | None] | None:
    """The ``"input"`` / ``"weight"`` pass of ``stage`` (a ``PipelineStage``): on an FSDP2
    stage module with the weights taken from the graph, and every ``"weight"`` pass keeping
    the graph (see the module docstring); ``None`` where torch's own pass is right (a full
    backward, the input pass without FSDP, a ``DistributedDataParallel`` stage)."""
    fsdp = isinstance(stage.submod, FSDPModule)
    if backward_type == "full" or (backward_type == "input" and not fsdp):
        return None
    if isinstance(stage.submod, torch.nn.parallel.DistributedDataParallel):
        return None
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    if fsdp:  # as torch's stage does for FSDP: accumulate unsharded gradients, reduce at the end
        stage.submod.set_reshard_after_backward(False)
        stage.submod.set_requires_gradient_sync(False)
    if backward_type == "input":
        outputs = bwd_kwargs["stage_output"]
        inputs = bwd_kwargs["input_values"]
        weights = graph_weights(outputs, inputs)
        return stage_backward_input(outputs, bwd_kwargs["output_grads"], inputs, iter(weights))
    if backward_type == "weight":
        groups = bwd_kwargs["param_groups"]
        weights = [node.variable for group in groups for node in group["params"]]
        return stage_backward_weight(iter(weights), groups, retain_graph=True), None
    raise RuntimeError(f"unknown backward type {backward_type!r}")
