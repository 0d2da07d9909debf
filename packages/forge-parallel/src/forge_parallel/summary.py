"""What ``parallelize`` did, per module: placement / sharding, recompute, compile, dtypes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard, _StridedShard

__all__ = ["ModuleSummary", "ParallelSummary", "format_placements"]


def _placement_text(p: Placement) -> str:
    if isinstance(p, _StridedShard):
        return f"StridedShard({p.dim},sf={p.split_factor})"
    if isinstance(p, Shard):
        return f"Shard({p.dim})"
    if isinstance(p, Replicate):
        return "Replicate"
    return type(p).__name__


def format_placements(t: torch.Tensor) -> str:
    """``"Shard(0)@dp_shard_cp Shard(0)@tp"`` for a DTensor, ``"local"`` for a plain tensor."""
    if not isinstance(t, DTensor):
        return "local"
    names = t.device_mesh.mesh_dim_names or tuple(str(i) for i in range(t.device_mesh.ndim))
    return " ".join(f"{_placement_text(p)}@{n}" for p, n in zip(t.placements, names, strict=True))


def _dtype_text(dtype: torch.dtype | None) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True, kw_only=True)
class ModuleSummary:
    name: str
    type: str
    tensor_parallel: str = "-"
    data_parallel: str = "-"
    placements: str = "-"
    recompute: str = "-"
    compiled: str = "-"
    param_dtype: str = "-"
    reduce_dtype: str = "-"


_COLUMNS = (
    ("module", "name"),
    ("type", "type"),
    ("tensor parallel", "tensor_parallel"),
    ("data parallel", "data_parallel"),
    ("weight placement", "placements"),
    ("recompute", "recompute"),
    ("compile", "compiled"),
    ("param", "param_dtype"),
    ("reduce", "reduce_dtype"),
)


@dataclass(frozen=True, kw_only=True)
class ParallelSummary:
    """Printable record of a ``parallelize`` call; ``rows`` for programmatic checks."""

    degrees: dict[str, int]
    data_parallel: str | None
    order: tuple[str, ...]
    loss_parallel: bool
    rows: tuple[ModuleSummary, ...] = field(default_factory=tuple)

    def row(self, name: str) -> ModuleSummary:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no summary row for module {name!r}")

    def __str__(self) -> str:
        world = self.degrees.get("world_size", 1)
        degrees = " ".join(
            [f"world_size={world}"]
            + [f"{k}={v}" for k, v in self.degrees.items() if k != "world_size" and v != 1]
        )
        lines = [
            f"parallelize: {degrees}; data_parallel={self.data_parallel}; "
            f"loss_parallel={self.loss_parallel}; applied: {' -> '.join(self.order) or 'nothing'}"
        ]
        table = [[h for h, _ in _COLUMNS]]
        table += [[(getattr(r, a) or "<root>") for _, a in _COLUMNS] for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(_COLUMNS))]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return "\n".join(lines)


def build_rows(
    model: nn.Module,
    *,
    tp: dict[str, str],
    dp: dict[str, str],
    dp_default: str,
    recompute: dict[str, str],
    compiled: dict[str, str],
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype | None,
) -> tuple[ModuleSummary, ...]:
    """One row per module that owns parameters or had something applied to it."""
    rows = []
    inherited_recompute: dict[str, str] = {}
    inherited_compile: dict[str, str] = {}
    unit_of: dict[str, str | None] = {}  # nearest FSDP / DDP unit at or above a module
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        parent = name.rpartition(".")[0] if name else None
        rc = recompute.get(name) or (
            inherited_recompute.get(parent, "-") if parent is not None else "-"
        )
        cc = compiled.get(name) or (
            inherited_compile.get(parent, "-") if parent is not None else "-"
        )
        inherited_recompute[name], inherited_compile[name] = rc, cc
        unit = name if name in dp else (unit_of.get(parent) if parent is not None else None)
        unit_of[name] = unit
        if unit is None:
            dp_text = dp_default if params else "-"
        elif unit == name:
            dp_text = dp[name]
        else:
            dp_text = f"{dp[unit].split()[0]} ({unit or 'root'})"
        touched = name in tp or name in dp or name in recompute or name in compiled
        if not params and not touched:
            continue
        weight = dict(params).get("weight", params[0][1] if params else None)
        own_dtype = weight.dtype if weight is not None else None
        rows.append(
            ModuleSummary(
                name=name,
                type=type(module).__name__.removeprefix("FSDP").removeprefix("Replicate"),
                tensor_parallel=tp.get(name, "-"),
                data_parallel=dp_text,
                placements=format_placements(weight) if weight is not None else "-",
                recompute=rc,
                compiled=cc,
                param_dtype=_dtype_text(param_dtype or own_dtype),
                reduce_dtype=_dtype_text(reduce_dtype or own_dtype) if dp_text != "-" else "-",
            )
        )
    return tuple(rows)
