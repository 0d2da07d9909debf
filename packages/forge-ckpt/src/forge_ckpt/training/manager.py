"""``CheckpointManager``: atomic, optionally asynchronous, resharding training checkpoints.

::

    manager = CheckpointManager(CheckpointConfig(directory="ckpt", interval=500, keep_last_n=3,
                                                 async_save=True))
    result = manager.load_latest(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    start = result.step + 1 if result else 0
    for step in range(start, steps):
        ...
        if manager.should_save(step):
            manager.save(step, model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    manager.close()  # waits for the last asynchronous save

Every rank calls every method (they are collective when a process group is initialized).

**Asynchronous save** (``async_save=True``): ``save`` copies this rank's state to CPU memory
(DCP's ``DefaultStager``), hands the copy to one background thread and returns; the thread
writes it with ``dcp.save`` over a dedicated gloo process group (created by the manager, so its
collectives never interleave with training's), then finalizes (marker, rename, retention).
Memory bound: one staged copy, the size of this rank's local model + optimizer shards (plus
the small replicated and per-rank state), because a new ``save`` (or ``load``, ``wait``,
``close``) first waits for the previous one to finish. DCP's own ``async_save`` (checked on
torch 2.15, gloo on CPU) does the same staging and threading but offers no hook to finalize in
the background, and its warnings cannot be scoped; hence this thread around ``dcp.save``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from forge_ckpt.training.config import CheckpointConfig
from forge_ckpt.training.dcp_state import (
    Stateful,
    TrainingState,
    build_save_state,
    load_training_state,
    plan_load,
)
from forge_ckpt.training.flat_optim import stage
from forge_ckpt.training.layout import (
    CheckpointInfo,
    check_folder,
    delete_checkpoint,
    list_checkpoints,
    publish,
    remove_leftovers,
    scan_checkpoints,
    set_aside,
    step_dir_name,
    write_manifest,
)
from forge_ckpt.training.rng import RNGState
from forge_ckpt.training.safe_reader import SafeFileSystemReader, TensorOnlyLoadPlanner
from forge_ckpt.training.state_codec import split_state

__all__ = ["CheckpointManager", "LoadResult"]

_log = logging.getLogger(__name__)

_NO_DIST_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
# ZeRO optimizer state is saved as ShardedTensors (see flat_optim: DTensor cannot describe it).
_SHARDED_TENSOR_WARNING = "Please use DTensor instead and we are deprecating ShardedTensor"


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """Silence the two warnings DCP gives for how forge-ckpt uses it (see above)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_WARNING)
        warnings.filterwarnings("ignore", message=_SHARDED_TENSOR_WARNING)
        yield


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`CheckpointManager.load` restored.

    ``restored``: names of the stateful objects restored besides model and optimizer (the
    per-rank ``"rng"`` only where the checkpoint holds this rank's state);
    ``not_in_checkpoint``: objects left as they were (per-rank ones whose rank index was not
    in the saving job, and ``optional_extra`` ones the checkpoint lacks); ``unread``: global
    objects the checkpoint holds that this load did not ask for.
    """

    step: int
    path: Path
    world_size: int
    restored: tuple[str, ...]
    not_in_checkpoint: tuple[str, ...]
    unread: tuple[str, ...] = ()


class CheckpointManager:
    """Saves and loads training checkpoints in ``config.directory``.

    Args:
        config: the :class:`CheckpointConfig`.
        process_group: the ranks that save together (default: the default process group when
            one is initialized, else this process alone); only its ranks construct the
            manager and call its methods. A flat (ZeRO-1/2) optimizer needs every rank.
    """

    def __init__(
        self, config: CheckpointConfig, *, process_group: dist.ProcessGroup | None = None
    ) -> None:
        if not isinstance(config, CheckpointConfig):
            raise ValueError(f"config must be a CheckpointConfig, got {type(config).__name__}")
        self.config = config
        self.directory = Path(config.directory)
        self._distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self._distributed:
            raise ValueError("process_group given but torch.distributed is not initialized")
        self._group = None
        self._owned_group = None
        self.rank, self.world_size = 0, 1
        if self._distributed:
            group = process_group or dist.group.WORLD
            self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
            self._group = group
            if config.async_save:
                # Only the group's ranks construct the manager: a group of some ranks is
                # created among them alone (the whole world's is collective over all ranks).
                self._owned_group = dist.new_group(
                    ranks=dist.get_process_group_ranks(group),
                    backend="gloo",
                    use_local_synchronization=not self._spans_world(),
                )
                self._group = self._owned_group
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="forge-ckpt")
            if config.async_save
            else None
        )
        self._pending: Future | None = None
        self._stager = None

    def _spans_world(self) -> bool:
        return self._group is None or self.world_size == dist.get_world_size()

    def _refuse_flat_optimizer_in_a_subgroup(self, state: TrainingState) -> None:
        if not self._spans_world() and state.flat_segments() is not None:
            raise ValueError(
                "a flat (ZeRO-1/2) optimizer's state is checkpointed over the default process "
                f"group, but this CheckpointManager saves with a group of {self.world_size} of "
                f"the {dist.get_world_size()} ranks: construct it without process_group (every "
                "rank saves), or checkpoint the model with an optimizer of its own parameters"
            )

    # -- queries --------------------------------------------------------------------------
    def should_save(self, step: int) -> bool:
        """Whether ``step`` is a multiple of ``config.interval`` (never when it is 0)."""
        return self.config.interval > 0 and step % self.config.interval == 0

    def checkpoints(self) -> list[CheckpointInfo]:
        """Complete checkpoints, oldest first (incomplete and temporary folders are skipped)."""
        return list_checkpoints(self.directory)

    def latest(self) -> CheckpointInfo | None:
        found = self.checkpoints()
        return found[-1] if found else None

    # -- save -----------------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        scheduler: Stateful | None = None,
        dataloader: Stateful | None = None,
        extra: Mapping[str, Stateful] | None = None,
    ) -> Path:
        """Save the checkpoint of ``step``; returns the folder it is (or will be) in.

        ``model`` and ``optimizer`` are saved through DCP's ``get_state_dict`` (resharded on
        load); ``scheduler``, ``dataloader`` and ``extra`` objects are the same on every rank
        and stored once (a ``dataloader`` whose state differs between ranks is refused: its
        state could not resume at another world size); the RNG states are stored per rank.
        With ``async_save`` the call returns once the state is copied to CPU; :meth:`wait`
        blocks until the checkpoint is complete.
        """
        final = self.directory / step_dir_name(step)
        self.wait()
        state = self._state(model, optimizer, scheduler, dataloader, extra)
        self._refuse_flat_optimizer_in_a_subgroup(state)
        if dataloader is not None:
            self._check_same_on_every_rank("dataloader", dataloader)
        tag = self._agree_on_tag()
        tmp = self.directory / f"{final.name}.tmp-{tag}"
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.directory, keep=tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        with _quiet_dcp():
            flat = build_save_state(state, self.rank)
        if self._executor is None:
            self._write(flat, tmp, final, step, tag)
            return final
        if self._stager is None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=torch.cuda.is_available(),
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
        with _quiet_dcp():  # a CPU copy: training may now change the originals
            staged = stage(self._stager, flat)
        del flat
        self._pending = self._executor.submit(self._write, staged, tmp, final, step, tag)
        return final

    def wait(self) -> None:
        """Block until a pending asynchronous save is complete; re-raises its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _state(
        self, model, optimizer, scheduler, dataloader, extra, optional_extra=None
    ) -> TrainingState:
        if optimizer is None:
            optimizers: tuple = ()
        elif isinstance(optimizer, torch.optim.Optimizer):
            optimizers = (optimizer,)
        else:
            optimizers = tuple(optimizer)
        overlap = set(extra or {}) & set(optional_extra or {})
        if overlap:
            raise ValueError(f"{sorted(overlap)} given both as extra and as optional_extra")
        global_objects = {**(extra or {}), **(optional_extra or {})}
        for name, given in (("scheduler", scheduler), ("dataloader", dataloader)):
            if given is not None and name in global_objects:
                raise ValueError(f"{name!r} given both as a keyword and as an extra")
        if dataloader is not None:
            global_objects = {"dataloader": dataloader, **global_objects}
        if scheduler is not None:
            global_objects = {"scheduler": scheduler, **global_objects}
        rank_objects: dict[str, Any] = {}
        if self.config.save_rng:
            rank_objects["rng"] = RNGState()
        return TrainingState(
            model=model,
            optimizers=optimizers,
            global_objects=global_objects,
            rank_objects=rank_objects,
            optional=frozenset(optional_extra or {}),
            formerly_per_rank=frozenset({"dataloader"} if dataloader is not None else ()),
        )

    def _check_same_on_every_rank(self, name: str, obj: Stateful) -> None:
        """Raise on every rank when ``obj``'s state differs between ranks (it is stored once)."""
        if self._group is None:
            return
        tensors, skeleton = split_state(obj.state_dict(), name)
        digest = hashlib.sha256(json.dumps(skeleton, sort_keys=True, default=repr).encode())
        for key in sorted(tensors):
            raw = tensors[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, digest.hexdigest(), group=self._group)
        differ = [r for r, d in enumerate(gathered) if d != gathered[0]]
        if differ:
            raise ValueError(
                f"the {name}'s state differs between ranks (ranks {differ} differ from rank 0); "
                f"a checkpoint stores the {name} once, so that it resumes at any world size: "
                "make its state_dict() the same on every rank (a step / position counter, "
                "not this rank's share of the data)"
            )

    def _agree_on_tag(self) -> str:
        tag = [uuid.uuid4().hex[:12]]
        if self._group is not None:
            dist.broadcast_object_list(tag, group_src=0, group=self._group)
        return tag[0]

    def _write(self, flat: dict[str, torch.Tensor], tmp: Path, final: Path, step, tag) -> None:
        with _quiet_dcp():
            dcp.save(
                flat,
                storage_writer=dcp.FileSystemWriter(tmp, sync_files=True, thread_count=1),
                process_group=self._group,
                no_dist=self._group is None,
            )
        # dcp.save ends with a collective that returns only once every rank has written and
        # fsynced its files: rank 0 can now complete the checkpoint.
        error = [None]
        if self.rank == 0:
            try:
                write_manifest(tmp, step=step, world_size=self.world_size)
                publish(tmp, final, tag)
                self._apply_retention(final, step, tag)
            except Exception as exc:  # reported to every rank below
                error[0] = f"{type(exc).__name__}: {exc}"
        if self._group is not None:
            dist.broadcast_object_list(error, group_src=0, group=self._group)
        if error[0] is not None:
            raise RuntimeError(f"saving checkpoint {final} failed on rank 0: {error[0]}")

    def _apply_retention(self, newest: Path, step: int, tag: str) -> None:
        """Set aside checkpoints of steps after ``step`` (a run that saves an earlier step went
        back, e.g. ``load(4)`` after a loss spike at 6: the later ones are of the abandoned
        branch, and ``load_latest`` must not resume them), then delete the oldest beyond
        ``keep_last_n``."""
        for info in self.checkpoints():
            if info.step > step:
                moved = set_aside(info, tag)
                _log.warning(
                    "checkpoint %s is of a step after the newly saved %d (the run went back "
                    "to an earlier checkpoint): moved to %s",
                    info.path,
                    step,
                    moved,
                )
        keep = self.config.keep_last_n
        if keep is None:
            return
        complete = [info for info in self.checkpoints() if info.path != newest]
        for info in complete[: max(0, len(complete) - (keep - 1))]:
            delete_checkpoint(info, tag)

    # -- load -----------------------------------------------------------------------------
    def load_latest(self, **objects: Any) -> LoadResult | None:
        """Load the newest complete checkpoint into the given objects (keywords as in
        :meth:`load`); ``None`` (nothing changed) when there is none."""
        self.wait()
        info = self.latest()
        if self.rank == 0:
            self._warn_skipped(info)
        step = [info.step if info is not None else None]
        if self._group is not None:  # every rank loads the step rank 0 found
            dist.broadcast_object_list(step, group_src=0, group=self._group)
        if step[0] is None:
            return None
        return self.load(step[0], **objects)

    def _warn_skipped(self, resumed: CheckpointInfo | None) -> None:
        """Log each damaged step folder newer than the checkpoint resumed (rank 0 only): it is
        passed over, so the run repeats its steps, and a user who finds the run resumed from
        an older step than the newest folder deserves to know which file is at fault. The
        folder is left where it is."""
        newest = -1 if resumed is None else resumed.step
        for step, folder, reason in scan_checkpoints(self.directory)[1]:
            if step <= newest:
                continue
            instead = (
                f"resuming from {resumed.path} (step {resumed.step}) instead"
                if resumed is not None
                else f"no complete checkpoint in {self.directory}: starting from scratch"
            )
            _log.warning(
                "checkpoint %s is damaged and skipped: %s; %s. The folder is left as it is "
                "(delete it, or restore the file from a copy, to silence this warning)",
                folder,
                reason,
                instead,
            )

    def load(
        self,
        step_or_path: int | str | os.PathLike,
        *,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
        scheduler: Stateful | None = None,
        dataloader: Stateful | None = None,
        extra: Mapping[str, Stateful] | None = None,
        optional_extra: Mapping[str, Stateful] | None = None,
    ) -> LoadResult:
        """Load a complete checkpoint (by step in ``config.directory``, or a folder) in place.

        ``extra`` objects must be in the checkpoint; ``optional_extra`` ones are loaded where
        it holds them and listed in ``LoadResult.not_in_checkpoint`` where it does not (state
        that only some runs save, e.g. an fp16 loss scale resumed by a bf16 run's checkpoint).

        The model and optimizer may be laid out differently than when saved (another mix of
        FSDP / TP / DP, another world size, or one process): DCP reads the slices each rank
        owns. Raises :class:`forge_ckpt.CheckpointMismatchError` listing missing, unexpected
        and mis-shaped tensors when the checkpoint belongs to another model.
        """
        self.wait()
        path = (
            self.directory / step_dir_name(step_or_path)
            if isinstance(step_or_path, int)
            else Path(step_or_path)
        )
        manifest, reason = (
            check_folder(path, named=isinstance(step_or_path, int))
            if path.is_dir()
            else (None, "no such folder")
        )
        if manifest is None:
            complete = [info.step for info in self.checkpoints()]
            raise FileNotFoundError(
                f"{path} is not a complete forge training checkpoint ({reason}); complete "
                f"checkpoints in {self.directory}: {complete}"
            )
        state = self._state(model, optimizer, scheduler, dataloader, extra, optional_extra)
        self._refuse_flat_optimizer_in_a_subgroup(state)
        from forge_ckpt.training.safe_reader import read_metadata

        with _quiet_dcp():
            plan = plan_load(state, read_metadata(path), self.rank, str(path), self._group)
            dcp.load(
                plan.targets,
                storage_reader=SafeFileSystemReader(path),
                planner=TensorOnlyLoadPlanner(),
                process_group=self._group,
                no_dist=self._group is None,
            )
            report = load_training_state(state, plan, str(path), self._group)
        return LoadResult(
            step=manifest["step"],
            path=path,
            world_size=manifest["world_size"],
            restored=tuple(report["restored"]),
            not_in_checkpoint=tuple(report["not_in_checkpoint"]),
            unread=tuple(report["unread"]),
        )

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for a pending save and release the background thread and process group."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if self._owned_group is not None:
                dist.destroy_process_group(self._owned_group)
                self._owned_group = self._group = None

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
