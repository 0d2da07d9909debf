"""How Megatron-Core splits each ``GPTModel`` tensor across tensor-parallel ranks, as data.

Megatron-LM (Shoeybi et al. 2019, arXiv:1909.08053) shards a column-parallel linear along its
output rows (dim 0: ``linear_qkv``, ``linear_q_up_proj``, the vocabulary-parallel embedding and
``output_layer``) and a row-parallel linear along its input columns (dim 1: ``linear_proj``,
``linear_fc2``). A SwiGLU ``linear_fc1`` holds ``[gate; up]`` and each rank keeps its slice of
*both* halves, ``[gate_r; up_r]``. Norms, routers and biases of row-parallel layers are
replicated. MLA down projections are column-parallel in the local layer spec and replicated
(``parallel_mode="duplicated"``) in the Transformer Engine spec. A ``LLaVAModel``'s vision
encoder splits its layers the same way except ``linear_fc1`` (a GELU MLP: plain column-parallel);
its patch and position embeddings, class token, ``ln_post`` and layer scales are replicated.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from forge_ckpt.bits import identical

__all__ = ["COLUMN", "REPLICATED", "ROW", "SWIGLU", "merge_tp", "split_tp", "tp_kind"]

COLUMN, ROW, SWIGLU, REPLICATED = "column", "row", "swiglu", "replicated"

#: (regular expression on the full name, kind); the first match wins.
TP_RULES: tuple[tuple[str, str], ...] = (
    # A LLaVAModel's vision encoder and projector (Megatron-Core CLIPViTModel, MultimodalProjector:
    # plain GELU MLPs, so linear_fc1 is column-parallel, not SwiGLU); its language model is a
    # GPTModel under ``language_model.``, split as below.
    (r"^vision_model\.(conv1|position_embeddings|class_token|ln_pre|ln_post)(\.|$)", REPLICATED),
    (r"^vision_model\.decoder\.layers\.\d+\.ls[12]$", REPLICATED),
    (r"^vision_model\..*\.(q|k)_layernorm\.weight$", COLUMN),  # InternViT-6B: per-head norms
    (r"^vision_projection\.image_newline$", REPLICATED),
    (r"^vision_(model|projection)\..*\.linear_fc1\.(weight|bias)$", COLUMN),
    (r"(^|\.)embedding\.word_embeddings\.weight$", COLUMN),
    (r"^(language_model\.)?output_layer\.weight$", COLUMN),
    (r"\.layer_norm_(weight|bias)$", REPLICATED),
    (r"(layernorm|_norm)\.(weight|bias)$", REPLICATED),
    (r"\.linear_qkv\.(weight|bias)$", COLUMN),
    (r"\.linear_q_proj\.weight$", COLUMN),
    (r"\.linear_(q|kv)_up_proj\.weight$", COLUMN),
    (r"\.linear_(q|kv)_down_proj\.weight$", "down_proj"),
    (r"\.linear_proj\.weight$", ROW),
    (r"\.linear_proj\.bias$", REPLICATED),
    (r"\.linear_fc1\.(weight|bias)\d*$", SWIGLU),
    (r"\.linear_fc2\.weight\d*$", ROW),
    (r"\.linear_fc2\.bias\d*$", REPLICATED),
    (r"\.router\.(weight|expert_bias)$", REPLICATED),
    (r"\.shared_experts\.gate_weight$", REPLICATED),
    (r"^mtp\.layers\.\d+\.eh_proj\.weight$", COLUMN),
    (r"^mtp\.layers\.\d+\.[eh]norm\.weight$", REPLICATED),
)
_COMPILED = tuple((re.compile(p), k) for p, k in TP_RULES)


def tp_kind(name: str, *, te_spec: bool = True) -> str:
    """How tensor ``name`` is split (``column``/``row``/``swiglu``/``replicated``)."""
    for pattern, kind in _COMPILED:
        if pattern.search(name):
            if kind == "down_proj":
                return REPLICATED if te_spec else COLUMN
            return kind
    raise ValueError(
        f"no tensor-parallel rule for Megatron tensor {name!r}; add one to "
        "forge_ckpt.megatron.tensor_parallel.TP_RULES"
    )


def _check(name: str, extent: int, parts: int, what: str) -> None:
    if extent % parts:
        raise ValueError(
            f"{name}: extent {extent} along {what} does not split into {parts} equal "
            f"tensor-parallel shards; pick a tensor_parallel that divides it"
        )


def split_tp(name: str, t: torch.Tensor, tp: int, *, te_spec: bool = True) -> list[torch.Tensor]:
    """The ``tp`` shards of the full tensor ``t`` (replicated tensors: ``tp`` views of it)."""
    kind = tp_kind(name, te_spec=te_spec)
    if tp == 1 or kind == REPLICATED:
        return [t] * tp
    if kind == SWIGLU:
        _check(name, t.shape[0], 2 * tp, "dim 0 (gate and up halves)")
        gate, up = t.chunk(2, dim=0)
        return [
            torch.cat([g, u], dim=0)
            for g, u in zip(gate.chunk(tp, 0), up.chunk(tp, 0), strict=True)
        ]
    dim = 0 if kind == COLUMN else 1
    _check(name, t.shape[dim], tp, f"dim {dim}")
    return [s.contiguous() for s in t.chunk(tp, dim=dim)]


def merge_tp(name: str, shards: Sequence[torch.Tensor], *, te_spec: bool = True) -> torch.Tensor:
    """The full tensor from its ``tp`` shards (the inverse of :func:`split_tp`)."""
    kind = tp_kind(name, te_spec=te_spec)
    if len(shards) == 1:
        return shards[0]
    if kind == REPLICATED:
        first = shards[0]
        for k, s in enumerate(shards[1:], start=1):
            if not identical(s, first):
                raise ValueError(
                    f"{name} should be replicated across tensor-parallel ranks but rank {k} "
                    "holds different values"
                )
        return first
    if kind == SWIGLU:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=0 if kind == COLUMN else 1)


def tp_chunks(name: str, shape: Sequence[int], tp: int, *, te_spec: bool = True):
    """``(offsets, sizes)`` of the regions each rank's shard covers in the full tensor, as the
    distributed checkpoint stores them (a SwiGLU shard is two regions: gate and up)."""
    kind = tp_kind(name, te_spec=te_spec)
    shape = tuple(shape)
    zero = (0,) * len(shape)
    if tp == 1 or kind == REPLICATED:
        return [(zero, shape)]
    pieces, dim = (2 * tp, 0) if kind == SWIGLU else (tp, 0 if kind == COLUMN else 1)
    _check(name, shape[dim], pieces, f"dim {dim}")
    step = shape[dim] // pieces
    out = []
    for k in range(pieces):
        off, size = list(zero), list(shape)
        off[dim], size[dim] = k * step, step
        out.append((tuple(off), tuple(size)))
    return out
