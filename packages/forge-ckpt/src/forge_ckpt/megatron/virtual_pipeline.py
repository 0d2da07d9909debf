"""Megatron-LM's virtual (interleaved) pipeline stages and custom pipeline layouts.

With the interleaved 1F1B schedule (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters Using Megatron-LM", arXiv:2104.04473, section 2.2) each of the ``pp``
pipeline ranks holds ``vp`` model chunks ("virtual stages"; Megatron-LM's
``--num-layers-per-virtual-pipeline-stage`` / ``--num-virtual-stages-per-pipeline-rank``, stored
as ``virtual_pipeline_model_parallel_size`` in the args). The ``pp * vp`` chunks are laid out in
the order ``v * pp + r`` (chunk ``v`` of rank ``r``): the layers run through chunk 0 of every
rank, then chunk 1 of every rank, and so on. Chunk ``v`` of rank ``r`` holds ``count_r / vp``
consecutive layers, ``count_r`` being the rank's layers as without virtual stages (even, or the
first/last stage's own count, ``--decoder-first/last-pipeline-num-layers``, with the other
stages sharing the rest evenly; every count must divide by ``vp``; with ``pp = 2`` only one of
first/last may be given: Megatron-Core divides by the number of middle stages). The embedding
lives in chunk 0 of rank 0, the final norm, output layer and multi-token prediction layers in
the last chunk of the last rank. Checked against megatron-core 0.16's ``get_num_layers_to_build``
(``transformer_block.py``) and ``get_transformer_layer_offset`` (``transformer_layer.py``):
for rank ``r``, chunk ``v`` the offset is ``v * sum_r(count_r / vp) + sum_{r' < r} count_r' / vp``.

A custom layout (Megatron-Core's ``--pipeline-model-parallel-layout``, its
``PipelineParallelLayerLayout``) lists the chunks in the same ``v * pp + r`` order, separated
by ``|``: ``E`` the embedding, ``t`` a decoder layer, ``m`` a multi-token prediction layer,
``L`` the loss (final norm and output layer), ``x*n`` and ``(...)*n`` repeats, commas ignored;
``"Et*3|(tt|)*2t,L"`` is 4 chunks of 3, 2, 2 and 1 decoder layers. The number of chunks over
``pp`` is the virtual size.

In the legacy format a rank's ``model_optim_rng.pt`` then holds ``model0``, ``model1``, ...
(one state dict per chunk, Megatron-LM's ``generate_state_dict``) instead of ``model``, each
with chunk-local layer numbers. ``torch_dist`` keys are global (Megatron-Core's sharded
state dict uses global layer offsets), so virtual stages change only which rank writes a chunk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from forge_ckpt.megatron.expert_parallel import experts_per_rank
from forge_ckpt.megatron.layout import stage_layers

__all__ = [
    "WriteSplit",
    "chunk_model_key",
    "parse_pipeline_layout",
    "pipeline_chunks",
    "virtual_size_from_args",
    "write_split",
]

_LAYOUT_CHARS = {"E": "embedding", "t": "decoder layer", "m": "MTP layer", "L": "loss"}
_GROUP = re.compile(r"\(([^()]+)\)\*(\d+)")
_REPEAT = re.compile(r"(.)\*(\d+)")
_CHUNK = re.compile(r"^(E?)t*(m*L)?$")


def chunk_model_key(chunk: int, virtual: int) -> str:
    """The state-dict key of model chunk ``chunk`` in a legacy rank file: ``model`` without
    virtual stages, ``model{chunk}`` with."""
    return "model" if virtual == 1 else f"model{chunk}"


def parse_pipeline_layout(layout: str, pipeline_parallel: int) -> list[str]:
    """The chunks (order ``v * pp + r``) of a Megatron-Core pipeline layout string, repeats
    expanded (``"Et*2|tL"`` -> ``["Ett", "tL"]``), validated as far as forge-ckpt's writers need: the embedding is
    the first item of chunk 0 and appears once, the loss is the last item of the last chunk and
    appears once, multi-token prediction layers sit in the last chunk before the loss."""
    if pipeline_parallel < 1:
        raise ValueError(f"pipeline_parallel must be >= 1, got {pipeline_parallel}")
    text = layout.replace(",", "").replace(" ", "")
    previous = None
    while previous != text:  # inner groups first: (a(b)*2)*3
        previous, text = text, _GROUP.sub(lambda m: m.group(1) * int(m.group(2)), text)
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    chunks = text.split("|")
    for chunk in chunks:
        bad = sorted(set(chunk) - set(_LAYOUT_CHARS))
        if bad:
            known = ", ".join(f"{c} ({what})" for c, what in _LAYOUT_CHARS.items())
            raise ValueError(
                f"pipeline layout {layout!r}: unknown item(s) {bad}; the items are {known}, "
                "'|' between chunks, x*n and (...)*n repeats"
            )
    if len(chunks) % pipeline_parallel:
        raise ValueError(
            f"pipeline layout {layout!r} has {len(chunks)} chunks, not a multiple of "
            f"pipeline_parallel={pipeline_parallel}; it needs pipeline_parallel x virtual stages "
            "chunks separated by '|'"
        )
    for i, chunk in enumerate(chunks):
        match = _CHUNK.match(chunk)
        embedding, loss = match.groups() if match else ("", None)
        if match is None or bool(embedding) != (i == 0) or bool(loss) != (i == len(chunks) - 1):
            raise ValueError(
                f"pipeline layout {layout!r}: chunk {i} is {chunk!r}; forge-ckpt reads and "
                "writes layouts whose first chunk starts with the embedding 'E', whose last "
                "chunk ends with the loss 'L' (after any MTP layers 'm'), and whose other items "
                "are decoder layers 't' (a standalone MTP or embedding stage is not supported)"
            )
    return chunks


def pipeline_chunks(
    num_layers: int,
    pipeline_parallel: int,
    *,
    virtual: int = 1,
    first: int | None = None,
    last: int | None = None,
    layout: str | None = None,
) -> list[range]:
    """The global layers of each model chunk, in Megatron's order ``v * pp + r`` (with
    ``virtual=1``: the pipeline stages, :func:`~forge_ckpt.megatron.layout.stage_layers`)."""
    pp, vp = int(pipeline_parallel), int(virtual)
    if vp < 1:
        raise ValueError(f"virtual pipeline stages must be >= 1, got {vp}")
    if layout is not None:
        if first is not None or last is not None:
            raise ValueError(
                "a pipeline layout already places every layer; drop first/last stage layer "
                "counts (Megatron-LM refuses them together as well)"
            )
        counts = [chunk.count("t") for chunk in parse_pipeline_layout(layout, pp)]
        found = len(counts) // pp
        if virtual != 1 and found != vp:
            raise ValueError(
                f"pipeline layout {layout!r} has {found} virtual stage(s) per rank "
                f"({len(counts)} chunks over pipeline_parallel={pp}), not {vp}"
            )
        if sum(counts) != num_layers:
            raise ValueError(
                f"pipeline layout {layout!r} places {sum(counts)} decoder layers ('t'); the "
                f"model has {num_layers}"
            )
    else:
        stages = stage_layers(num_layers, pp, first=first, last=last)
        if vp > 1 and pp == 1:
            raise ValueError(
                f"virtual pipeline stages ({vp}) need pipeline_parallel > 1 (Megatron's "
                "interleaved schedule); use virtual=1 or more pipeline stages"
            )
        if vp > 1 and pp == 2 and first is not None and last is not None:
            raise ValueError(
                "virtual pipeline stages with both the first and the last stage's layer counts "
                "need pipeline_parallel > 2: Megatron-Core 0.16's get_transformer_layer_offset "
                "divides by the 0 middle stages; give only one of them (the other stage takes "
                "the rest)"
            )
        for s, layers in enumerate(stages):
            if len(layers) % vp:
                raise ValueError(
                    f"pipeline stage {s} holds {len(layers)} layers, which do not split into "
                    f"{vp} virtual stages; every stage's layer count (num_layers / "
                    "pipeline_parallel, or the first/last stage counts) must divide by the "
                    "virtual size"
                )
        counts = [len(stages[r]) // vp for _ in range(vp) for r in range(pp)]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [range(a, a + n) for a, n in zip(starts, counts, strict=True)]


def virtual_size_from_args(args: Mapping[str, Any]) -> int | None:
    """The virtual pipeline size Megatron-LM's ``args`` record (``None``: they do not say).

    ``virtual_pipeline_model_parallel_size`` (``None`` there means 1), else
    ``num_virtual_stages_per_pipeline_rank``, else the layout's chunk count over ``pp``, else
    the even split's ``num_layers / pp / num_layers_per_virtual_pipeline_stage``.
    """
    pp = int(args.get("pipeline_model_parallel_size") or 1)
    if "virtual_pipeline_model_parallel_size" in args:
        return int(args["virtual_pipeline_model_parallel_size"] or 1)
    if args.get("num_virtual_stages_per_pipeline_rank") is not None:
        return int(args["num_virtual_stages_per_pipeline_rank"])
    layout = args.get("pipeline_model_parallel_layout")
    if isinstance(layout, str):
        return len(parse_pipeline_layout(layout, pp)) // pp
    per_stage = args.get("num_layers_per_virtual_pipeline_stage")
    if per_stage is not None and args.get("num_layers") is not None:
        return int(args["num_layers"]) // pp // int(per_stage)
    return None


class WriteSplit(NamedTuple):
    """The checked degrees of a checkpoint to write and its model chunks (:func:`write_split`)."""

    tp: int
    pp: int
    ep: int
    experts_per_rank: int
    chunks: list[range]
    vp: int


def write_split(
    root: Path,
    *,
    num_layers: int,
    num_experts: int,
    tensor_parallel: int,
    pipeline_parallel: int,
    expert_parallel: int,
    first_stage_layers: int | None,
    last_stage_layers: int | None,
    virtual_pipeline: int,
    pipeline_layout: str | None,
    overwrite: bool,
) -> WriteSplit:
    """Validate the split of a Megatron checkpoint about to be written into ``root`` (both
    formats): the degrees, the experts per expert rank, the model chunks in Megatron's order
    (:func:`pipeline_chunks`), and that ``root`` is empty unless ``overwrite``."""
    tp, pp, ep = int(tensor_parallel), int(pipeline_parallel), int(expert_parallel)
    if tp < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
    per_rank = experts_per_rank(num_experts, ep)
    chunks = pipeline_chunks(
        num_layers, pp, virtual=virtual_pipeline, first=first_stage_layers,
        last=last_stage_layers, layout=pipeline_layout,
    )  # fmt: skip
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise ValueError(f"{root} is not empty; pass overwrite=True or pick a new folder")
    return WriteSplit(tp, pp, ep, per_rank, chunks, len(chunks) // pp)
