"""Training state <-> the flat tensor dict that ``torch.distributed.checkpoint`` writes.

Model and optimizer state come from ``torch.distributed.checkpoint.state_dict.get_state_dict``
(optimizer state flattened by parameter name), so FSDP2 / DTensor / tensor-parallel shards are
saved with their global shapes and offsets and DCP reshards them on load into whatever layout
the loading job uses (or into one process without a process group). Everything else is any
object with ``state_dict()`` / ``load_state_dict()``:

- *global* objects (LR scheduler, data loader, user extras) are the same on every rank: their
  tensors are stored once (DCP deduplicates replicated tensors) under ``<name>/...``;
- *per-rank* objects (RNG) are stored under ``rank_XXXXX/<name>/...`` and restored by rank
  index: at another world size, ranks beyond the saved ones keep their own state (the load
  result says which state was restored).

Checkpoints of earlier forge-ckpt 0.1.0 builds stored the data loader per rank, so a rank the saving
job did not have restarted its loader at step 0. Such a global object (``TrainingState.
formerly_per_rank``) is read from rank 0's stored state on every rank when the checkpoint holds
no global entry for it (forge's loaders' states are the same on every rank).

Non-tensor values go to JSON documents stored as ``uint8`` tensors (:mod:`.state_codec`):
``json/global/<hash>`` (identical on all ranks, so stored once; pipeline stages may differ) and
``json/rank_XXXXX``. No value is ever pickled.

DCP describes each rank's part of a DTensor as one contiguous box. A ``_StridedShard``
placement (forge-parallel's packed column-parallel weights such as a fused gate/up projection:
each rank holds a slice of every packed part) is not one box, so such tensors are saved as
full (replicated, written once) tensors and re-sharded into the target's placements on load.
The memory cost is one full copy of each such tensor per rank while saving (and one at a time
while loading).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from forge_ckpt.errors import CheckpointMismatchError
from forge_ckpt.training.flat_optim import (
    apply_param_groups,
    flat_segments,
    flat_state_dict,
    init_flat_state,
)
from forge_ckpt.training.state_codec import (
    decode_json_tensor,
    encode_json_tensor,
    join_state,
    split_state,
)

__all__ = ["Stateful", "TrainingState", "build_save_state", "load_training_state"]

_log = logging.getLogger(__name__)
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_TENSOR_COMPONENTS = ("model", "optim")


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """What one rank saves or loads: the model, its optimizers and other stateful objects."""

    model: nn.Module | None = None
    optimizers: tuple[torch.optim.Optimizer, ...] = ()
    global_objects: Mapping[str, Stateful] = None  # type: ignore[assignment]
    rank_objects: Mapping[str, Stateful] = None  # type: ignore[assignment]
    #: Global objects a checkpoint may lack (loaded where present, else left as they are).
    optional: frozenset[str] = frozenset()
    #: Global objects that older checkpoints stored per rank: read from rank 0's state there.
    formerly_per_rank: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_objects", dict(self.global_objects or {}))
        object.__setattr__(self, "rank_objects", dict(self.rank_objects or {}))
        object.__setattr__(self, "optional", frozenset(self.optional))
        object.__setattr__(self, "formerly_per_rank", frozenset(self.formerly_per_rank))
        if not (self.optional | self.formerly_per_rank) <= set(self.global_objects):
            raise ValueError(
                f"optional names {sorted(self.optional - set(self.global_objects))} or formerly "
                f"per-rank names {sorted(self.formerly_per_rank - set(self.global_objects))} "
                "are not among the global objects"
            )
        if self.optimizers and self.model is None:
            raise ValueError("optimizer state is saved by parameter name: pass the model too")
        names = [*self.global_objects, *self.rank_objects]
        for name in names:
            if (
                not name
                or "/" in name
                or name in (*_TENSOR_COMPONENTS, "json")
                or (name.startswith("rank_"))
            ):
                raise ValueError(
                    f"invalid state name {name!r}: use a non-empty name without '/' other than "
                    "'model', 'optim', 'json' or 'rank_*'"
                )
            obj = (self.global_objects | self.rank_objects)[name]
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ValueError(
                    f"{name!r} is a {type(obj).__name__}, which has no state_dict() / "
                    "load_state_dict(); pass an object that has both"
                )
        if len(set(names)) != len(names):
            raise ValueError(f"state names must be unique, got {names}")

    def flat_segments(self) -> list | None:
        """How a flat (ZeRO-1/2) optimizer covers the model (:mod:`.flat_optim`); ``None``
        for optimizers of the model's own parameters."""
        if self.model is None:
            return None
        flat = [flat_segments(self.model, opt) for opt in self.optimizers]
        if all(segments is None for segments in flat):
            return None
        if len(flat) > 1:
            raise ValueError(
                "a flat (ZeRO-1/2) optimizer is saved by parameter name on its own; pass one "
                "optimizer (one ZeroOptimizer may hold several parameter groups)"
            )
        return flat[0]

    def model_and_optim(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.model is None:
            return {}, {}
        if not self.optimizers:
            return get_model_state_dict(self.model, options=_OPTIONS), {}
        segments = self.flat_segments()
        if segments is not None:
            model_sd = get_model_state_dict(self.model, options=_OPTIONS)
            return model_sd, flat_state_dict(self.model, self.optimizers[0], segments)
        optimizers = self.optimizers[0] if len(self.optimizers) == 1 else list(self.optimizers)
        return get_state_dict(self.model, optimizers, options=_OPTIONS)


def _is_strided(value: Any) -> bool:
    """A DTensor whose local part DCP cannot describe as one box (see the module docstring)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import _StridedShard

    return isinstance(value, DTensor) and any(
        isinstance(p, _StridedShard) for p in value.placements
    )


def _unstride(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.full_tensor() if _is_strided(v) else v for k, v in state.items()}


def _restride(full: torch.Tensor, like: Any) -> Any:
    """``full`` sharded like the DTensor ``like`` (a local split: no communication)."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = like.device_mesh
    replicated = DTensor.from_local(
        full.to(like.device), mesh, [Replicate()] * mesh.ndim, run_check=False
    )
    return replicated.redistribute(mesh, like.placements)


def _rank_prefix(rank: int) -> str:
    return f"rank_{rank:05d}"


def build_save_state(state: TrainingState, rank: int) -> dict[str, torch.Tensor]:
    """The flat ``{key: tensor}`` dict that rank ``rank`` hands to ``dcp.save``."""
    model_sd, optim_sd = (_unstride(sd) for sd in state.model_and_optim())
    flat: dict[str, torch.Tensor] = {}
    global_doc: dict[str, Any] = {}
    parts = [("model", model_sd), ("optim", optim_sd)] if state.model is not None else []
    parts += [(name, obj.state_dict()) for name, obj in state.global_objects.items()]
    for name, value in parts:
        tensors, global_doc[name] = split_state(value, name)
        flat.update(tensors)
    encoded = encode_json_tensor(global_doc)
    global_key = "json/global/" + hashlib.sha256(encoded.numpy().tobytes()).hexdigest()[:20]
    flat[global_key] = encoded
    rank_doc: dict[str, Any] = {"global": global_key, "components": {}}
    prefix = _rank_prefix(rank)
    for name, obj in state.rank_objects.items():
        tensors, rank_doc["components"][name] = split_state(obj.state_dict(), f"{prefix}/{name}")
        flat.update(tensors)
    flat[f"json/{prefix}"] = encode_json_tensor(rank_doc)
    return flat


@dataclass(frozen=True)
class LoadPlan:
    """Tensors to read (``targets``) and how to put the state back together afterwards."""

    targets: dict[str, torch.Tensor]
    model_sd: dict[str, Any]
    optim_sd: dict[str, Any]
    global_doc_keys: list[str]
    rank_doc_key: str | None
    strided: dict[str, Any]  # key -> the DTensor a full tensor read for it is sharded like
    #: Second names of tied parameters not stored under them -> the stored first name.
    aliases: dict[str, str] = field(default_factory=dict)
    #: Rank 0's per-rank document, read for ``TrainingState.formerly_per_rank`` objects.
    rank_zero_doc_key: str | None = None
    #: Second names of tied parameters stored under both names -> the first name: read into
    #: a buffer of its own and compared with the first (``load_training_state``).
    tied_pairs: dict[str, str] = field(default_factory=dict)


def _across_ranks(
    expected: set[str], missing: list[str], mismatched: list[tuple], group
) -> tuple[set[str], list[str], list[tuple]]:
    """The union over the ranks of ``group`` (a process group; ``None``: this rank alone) of
    the keys they load, their missing and mis-shaped keys."""
    import torch.distributed as dist

    if group is None or dist.get_world_size(group) == 1:
        return expected, missing, mismatched
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (sorted(expected), missing, mismatched), group=group)
    keys = {k for rank_keys, _, _ in gathered for k in rank_keys}
    all_missing = sorted({k for _, rank_missing, _ in gathered for k in rank_missing})
    all_mismatched = sorted({tuple(m) for _, _, rank_mm in gathered for m in rank_mm})
    return keys, all_missing, all_mismatched


def _tied_aliases(model: nn.Module | None) -> dict[str, str]:
    """``{"model/<second name>": "model/<first name>"}`` of parameters known by two names
    (a tied embedding and head). ``get_model_state_dict`` holds both names (a plain module,
    FSDP2 modules, a pipeline stage holding the tied matrix: checked on torch 2.15), but
    ``nn.Module.state_dict``-style writers may store only one, so a checkpoint is matched to a
    model up to these aliases. Where both names are stored, they must hold equal tensors (a
    checkpoint of an untied model does not load into a tied one: see ``plan_load``)."""
    if model is None:
        return {}
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[f"model/{name}"] = f"model/{first[id(p)]}"
        else:
            first[id(p)] = name
    return aliases


def _report_casts(stored: dict, expected: dict[str, Any], rank: int, where: str) -> None:
    """Log (rank 0, one line) the tensors stored in another dtype than the model's: DCP casts
    them on load (an fp32 checkpoint into a bf16 model rounds its weights)."""
    casts = [
        f"{k} ({str(stored[k].properties.dtype).removeprefix('torch.')} -> "
        f"{str(t.dtype).removeprefix('torch.')})"
        for k, t in sorted(expected.items())
        if k in stored and stored[k].properties.dtype != t.dtype
    ]
    if casts and rank == 0:
        shown = ", ".join(casts[:3]) + (
            f", ... and {len(casts) - 3} more" if len(casts) > 3 else ""
        )
        _log.warning(
            "checkpoint %s: %d tensors are cast to the dtype of the model/optimizer being "
            "loaded: %s",
            where,
            len(casts),
            shown,
        )


def plan_load(
    state: TrainingState, metadata: Metadata, rank: int, where: str, group=None
) -> LoadPlan:
    """Check the checkpoint against the state to load and allocate the tensors to read;
    collective over ``group`` (the ranks loading together; ``None``: this process alone)."""
    stored = {
        key: md
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    segments = state.flat_segments()
    if segments is not None:  # a fresh ZeRO optimizer has no state to read into yet
        init_flat_state(
            state.optimizers[0],
            segments,
            {
                key.removeprefix("optim/"): (tuple(md.size), md.properties.dtype)
                for key, md in stored.items()
                if key.startswith("optim/state.")
            },
        )
    model_sd, optim_sd = state.model_and_optim()
    model_t, _ = split_state(model_sd, "model")
    optim_t, _ = split_state(optim_sd, "optim")
    expected = {**model_t, **optim_t}
    aliases = tied = _tied_aliases(state.model)
    checked = ("model/", "optim/") if state.optimizers else ("model/",)
    if state.model is not None:
        ckpt_keys = {k for k in stored if k.startswith(checked)}
        missing = sorted(k for k in set(expected) - ckpt_keys if aliases.get(k) not in ckpt_keys)
        mismatched = [
            (k, tuple(stored[k].size), tuple(t.shape))
            for k, t in sorted(expected.items())
            if k in stored and tuple(stored[k].size) != tuple(t.shape)
        ]
        # Every rank decides alike (a rank that raised alone would leave the others waiting in
        # the collective load), and a key is unexpected only if no rank loads it: a pipeline
        # stage holds only its own layers.
        loaded, missing, mismatched = _across_ranks(
            set(expected) | set(aliases), missing, mismatched, group
        )
        unexpected = sorted(ckpt_keys - loaded)
        if missing or unexpected or mismatched:
            if any(k.startswith("optim/") for k in missing) and not any(
                k.startswith("optim/") for k in stored
            ):
                where += " (it holds no optimizer state: load without the optimizer)"
            raise CheckpointMismatchError(
                missing=missing,
                unexpected=unexpected,
                mismatched=mismatched,
                context=f"checkpoint {where} does not match the model/optimizer being loaded",
            )
    _report_casts(stored, expected, rank, where)
    # A tied parameter's second name not in the checkpoint is read under its first name.
    aliases = {k: v for k, v in aliases.items() if k in expected and k not in stored}
    targets = {k: v for k, v in expected.items() if k not in aliases}
    strided = {k: v for k, v in targets.items() if _is_strided(v)}
    for key, like in strided.items():
        targets[key] = torch.empty(tuple(like.shape), dtype=like.dtype)
    # Both names of a tied parameter stored: DCP would read both into the one tensor (the last
    # wins); the second is read into a buffer of its own and must equal the first.
    tied_pairs = {
        second: first
        for second, first in tied.items()
        if second in targets and first in targets and second not in strided
    }
    for second in tied_pairs:
        targets[second] = torch.empty_like(targets[second])
    rank_doc_key = f"json/{_rank_prefix(rank)}"
    if rank_doc_key not in stored:
        rank_doc_key = None
    global_doc_keys = sorted(k for k in stored if k.startswith("json/global/"))
    if not global_doc_keys:
        raise ValueError(f"{where} is not a forge training checkpoint (no json/global entry)")
    wanted_prefixes = [f"{name}/" for name in state.global_objects]
    if rank_doc_key is not None:
        wanted_prefixes += [f"{_rank_prefix(rank)}/{name}/" for name in state.rank_objects]
    rank_zero_doc_key = f"json/{_rank_prefix(0)}"
    if state.formerly_per_rank and rank_zero_doc_key in stored:
        wanted_prefixes += [f"{_rank_prefix(0)}/{name}/" for name in state.formerly_per_rank]
    else:
        rank_zero_doc_key = None
    for key, md in stored.items():
        if (
            key in global_doc_keys
            or key in (rank_doc_key, rank_zero_doc_key)
            or key.startswith(tuple(wanted_prefixes))
        ):
            targets[key] = torch.empty(tuple(md.size), dtype=md.properties.dtype)
    return LoadPlan(
        targets,
        model_sd,
        optim_sd,
        global_doc_keys,
        rank_doc_key,
        strided,
        aliases,
        rank_zero_doc_key,
        tied_pairs,
    )


def _restore_flat(current: dict[str, Any], saved: Mapping[str, Any], targets, where, what):
    """A flat state dict shaped like ``current`` with tensors read into place and the saved
    non-tensor values."""
    restored = {}
    for key, value in current.items():
        if isinstance(value, torch.Tensor):
            restored[key] = targets[f"{what}/{key}"]
        elif key in saved:
            restored[key] = join_state(saved[key], targets)
        else:
            raise CheckpointMismatchError(
                missing=[f"{what}/{key}"],
                context=f"checkpoint {where} lacks a value the {what} state needs",
            )
    return restored


def _check_tied_pairs(plan: LoadPlan, targets: dict[str, Any], where: str, group) -> None:
    """Raise on every rank of ``group`` when the two stored names of a tied parameter hold
    different tensors (a checkpoint of an untied model loaded into a tied one)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    def local(t: Any) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    differ = [
        (second, first)
        for second, first in sorted(plan.tied_pairs.items())
        if not torch.equal(local(targets[second]), local(targets[first]))
    ]
    if group is not None and dist.get_world_size(group) > 1:
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, differ, group=group)
        differ = sorted({tuple(pair) for rank_differ in gathered for pair in rank_differ})
    if differ:
        pairs = "; ".join(f"{second!r} and {first!r}" for second, first in differ)
        raise CheckpointMismatchError(
            context=f"checkpoint {where} stores different tensors under the two names of a "
            f"parameter the model ties ({pairs}): it is a checkpoint of a model without this "
            "tie; load it into a model with untied weights (e.g. tie_word_embeddings=false)"
        )


def load_training_state(
    state: TrainingState, plan: LoadPlan, where: str, group=None
) -> dict[str, list[str]]:
    """After ``dcp.load`` filled ``plan.targets``: put every object's state back (collective
    over ``group``, the ranks loading together, to check tied parameters alike).

    Returns ``{"restored": [...], "not_in_checkpoint": [...], "unread": [...]}`` naming the
    per-rank and global objects restored or absent from the checkpoint (only optional global
    ones may be absent), and the global objects the checkpoint holds that were not asked for."""
    targets = dict(plan.targets)
    for key, like in plan.strided.items():
        targets[key] = _restride(targets[key], like)
    for alias, first in plan.aliases.items():
        targets[alias] = targets[first]
    _check_tied_pairs(plan, targets, where, group)
    global_docs = [decode_json_tensor(targets[k]) for k in plan.global_doc_keys]
    saved: dict[str, Any] = {}
    for doc in global_docs:  # pipeline stages may hold different parts
        for name, skeleton in doc.items():
            if isinstance(skeleton, dict) and isinstance(saved.get(name), dict):
                saved[name] = {**saved[name], **skeleton}
            else:
                saved.setdefault(name, skeleton)
    if state.model is not None:
        model_sd = _restore_flat(plan.model_sd, saved.get("model", {}), targets, where, "model")
        if state.optimizers:
            optim_sd = _restore_flat(plan.optim_sd, saved.get("optim", {}), targets, where, "optim")
            segments = state.flat_segments()
            if segments is not None:  # its state was read in place (ShardedTensor views)
                set_model_state_dict(state.model, model_sd, options=_OPTIONS)
                apply_param_groups(state.optimizers[0], segments, optim_sd)
            else:
                optimizers = (
                    state.optimizers[0] if len(state.optimizers) == 1 else list(state.optimizers)
                )
                set_state_dict(
                    state.model,
                    optimizers,
                    model_state_dict=model_sd,
                    optim_state_dict=optim_sd,
                    options=_OPTIONS,
                )
        else:
            set_model_state_dict(state.model, model_sd, options=_OPTIONS)
    report: dict[str, list[str]] = {
        "restored": [],
        "not_in_checkpoint": [],
        "unread": sorted(
            k for k in saved if k not in _TENSOR_COMPONENTS and k not in state.global_objects
        ),
    }
    rank_zero = (
        decode_json_tensor(targets[plan.rank_zero_doc_key])["components"]
        if plan.rank_zero_doc_key is not None
        else {}
    )
    for name, obj in state.global_objects.items():
        if name not in saved and name in state.formerly_per_rank and name in rank_zero:
            # an older checkpoint's per-rank state: rank 0's is every rank's (module docstring)
            obj.load_state_dict(join_state(rank_zero[name], targets))
            report["restored"].append(name)
            continue
        if name not in saved and name in state.optional:
            report["not_in_checkpoint"].append(name)
            continue
        if name not in saved:
            raise ValueError(
                f"checkpoint {where} holds no state for {name!r} (it has "
                f"{sorted(k for k in saved if k not in _TENSOR_COMPONENTS)}); load without it"
            )
        obj.load_state_dict(join_state(saved[name], targets))
        report["restored"].append(name)
    components = (
        decode_json_tensor(targets[plan.rank_doc_key])["components"]
        if plan.rank_doc_key is not None
        else {}
    )
    for name, obj in state.rank_objects.items():
        if name in components:
            obj.load_state_dict(join_state(components[name], targets))
            report["restored"].append(name)
        else:
            report["not_in_checkpoint"].append(name)
    return report
