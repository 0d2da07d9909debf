"""Parameters shared by pipeline stages on different ranks (tied input/output embeddings).

A decoder with ``tie_word_embeddings`` uses one matrix as the input embedding (first stage)
and as the output head (last stage). As in Megatron-LM (Shoeybi et al., 2019; Narayanan et al.,
"Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", 2021,
the *embedding group*), each stage that uses the matrix keeps a copy; the copies start equal
(broadcast from the first user) and stay equal because their gradients are summed over the
ranks holding them before every optimizer step, which is exactly the gradient of the shared
matrix in one process.

The copy on a later stage is reachable under the parameter's first name in the whole model
(for an embedding tied to the head, the last stage also holds the ``embed_tokens`` module,
never run), so state dicts and checkpoints name it as a single process does and a checkpoint
moves freely between pipeline layouts. The gradient norm counts each tied matrix once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from forge_parallel.pipeline.stage_module import DecoderLayout

__all__ = ["TiedWeight", "find_tied_weights", "tied_group"]


@dataclass(frozen=True)
class TiedWeight:
    """One parameter used by several stages: its ``name`` (the first name in the whole model,
    the one checkpoints use), the module holding it under that name (``holder``, attached
    unrun to the later stages) and the ``stages`` using it, in order."""

    name: str
    holder: str
    stages: tuple[int, ...]

    @property
    def first_stage(self) -> int:
        return self.stages[0]


def _stage_of(name: str, layout: DecoderLayout, bounds: Sequence[tuple[int, int]]) -> int | None:
    def inside(path: str) -> bool:
        return name == path or name.startswith(path + ".")

    if any(inside(p) for p in layout.pre):
        return 0
    if any(inside(p) for p in layout.post):
        return len(bounds) - 1
    for index, block in enumerate(layout.blocks):
        if inside(block):
            return next(s for s, (lo, hi) in enumerate(bounds) if lo <= index < hi)
    return None  # not run by any stage (e.g. modules outside the decoder's parts)


def find_tied_weights(
    model: nn.Module,
    layout: DecoderLayout,
    bounds: Sequence[tuple[int, int]],
    also_used: Mapping[str, Sequence[int]] | None = None,
) -> list[TiedWeight]:
    """The parameters of ``model`` used by more than one stage of the split ``bounds``.

    ``also_used``: module path -> the stages (negative: counted from the end) that use the
    module's parameters besides the stage holding it, where no second name says so (e.g.
    ``{"embed_tokens": (-1,)}``: multi-token prediction on the last stage embeds tokens)."""
    names: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    extra: dict[int, set[int]] = {}
    for path, users in (also_used or {}).items():
        for p in model.get_submodule(path).parameters():
            extra.setdefault(id(p), set()).update(s % len(bounds) for s in users)
    tied = []
    for key, shared in names.items():
        if len(shared) < 2 and key not in extra:
            continue
        stages = {s for n in shared if (s := _stage_of(n, layout, bounds)) is not None}
        stages = sorted(stages | extra.get(key, set()))
        if len(stages) < 2:
            continue
        name = shared[0]
        holder = name.rpartition(".")[0]
        owned = list(model.get_submodule(holder).parameters()) if holder else []
        if not holder or any(p is not params[key] for p in owned):
            raise ValueError(
                f"parameter {name!r} is shared by pipeline stages {stages} (also named "
                f"{shared[1:]}), but its module {holder!r} holds other parameters too; only a "
                "module whose parameters are all tied (such as a tied embedding) can be shared "
                "across stages. Untie the parameter or keep its users in one stage (split=(...))"
            )
        tied.append(TiedWeight(name=name, holder=holder, stages=tuple(stages)))
    return tied


def tied_group(pp_group: dist.ProcessGroup, pp_ranks: Sequence[int]) -> dist.ProcessGroup | None:
    """A process group of the pipeline ranks ``pp_ranks`` (group ranks in ``pp_group``), or
    ``None`` when they are one rank.

    Always a new group (one per pipeline group of the world; every rank of the default group
    must call this together, as for ``dist.new_group``), never ``pp_group`` itself: the
    schedule's point-to-point sends may still be in flight on ``pp_group`` when the tied
    gradients are summed, and gloo mixes up the messages of two operations on one group.
    """
    members = sorted(set(pp_ranks))
    if len(members) == 1:
        return None
    mine = tuple(dist.get_process_group_ranks(pp_group))
    groups: list = [None] * dist.get_world_size()
    dist.all_gather_object(groups, mine)
    found = None
    for ranks in sorted(set(groups)):
        group = dist.new_group([ranks[r] for r in members])
        if ranks == mine:
            found = group
    return found


def _local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (a DTensor's local shard)."""
    return t.to_local() if isinstance(t, DTensor) else t
