"""Regional ``torch.compile``: each block is compiled on its own (one graph, reused)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from forge_parallel.config import CompileConfig

__all__ = ["apply_compile"]


def apply_compile(blocks: Sequence[tuple[str, nn.Module]], config: CompileConfig) -> dict[str, str]:
    """``module.compile(...)`` each of ``blocks`` in place; returns name -> backend.

    Applied after tensor parallelism and recompute (so the compiled graph contains the
    DTensor collectives and the checkpoint policy) and before FSDP (whose hooks stay outside
    the graph), the order torchtitan uses.

    What cannot be one static graph runs eagerly between a block's graphs
    (``torch.compiler.disable``, one graph break each), as in torchtitan: the context-parallel
    attention (ring P2P / Ulysses all-to-all exchanges, the batch's document boundaries;
    :mod:`forge_parallel.context_parallel.apply`) and the expert-parallel experts (all-to-alls
    with data-dependent split sizes; :mod:`forge_parallel.expert_parallel.experts`). Their
    graphs are reused by every layer and batch (no guard on run-time state such as the
    routed-call count).
    """
    applied: dict[str, str] = {}
    for name, block in blocks:
        block.compile(backend=config.backend, fullgraph=config.fullgraph, dynamic=config.dynamic)
        applied[name] = config.backend
    return applied
