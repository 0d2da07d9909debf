"""The run folder: ``train.output_dir``, else a new ``runs/<date>-<time>`` (one name for all
ranks), and the rule that a run never overwrites or mixes with another run's files unasked.

A run either *resumes* (``checkpoint.resume`` and a complete checkpoint in
``<folder>/checkpoints``: it is the same run going on, so its rows append to ``metrics.jsonl``
and its saves and export replace the older ones) or *starts fresh*. A fresh start in a folder
that already holds a previous run's checkpoints, Hugging Face export or metrics rows would
overwrite that run's step folders and ``hf/`` and append its rows after the old ones (the
CheckpointManager even sets the old run's later steps aside as an abandoned branch), so it is
refused with a :class:`~forge_train.config.ConfigError`, unless ``train.overwrite_output_dir``
asks to delete those outputs first. A checkpoint that does not fit the run (another model or
data set-up: :func:`resume_mismatch`) is refused the same way, naming what differs.

The default folder is created by rank 0 with an exclusive ``mkdir`` (``-2``, ``-3``, ... on a
name already taken, e.g. two jobs started in the same second) and its name broadcast, so every
rank of a job writes into the one folder and no two jobs share one.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

import torch.distributed as dist

from forge_train.config import ConfigError, RunConfig

__all__ = ["RUN_OUTPUTS", "prepare_run_dir", "previous_outputs", "resume_mismatch"]

#: What a run writes into its folder (the trackers' own folders aside): what
#: ``train.overwrite_output_dir`` deletes before a fresh start.
RUN_OUTPUTS = ("checkpoints", "hf", "metrics.jsonl", "tensorboard", "profile", "report")

_FIX = "pick a new train.output_dir for this run (or leave it unset: a new runs/<date>-<time>)"
_START_OVER = (
    "checkpoint.resume=false train.overwrite_output_dir=true starts over in that folder, "
    "deleting the previous run's checkpoints, export and metrics"
)


def prepare_run_dir(cfg: RunConfig) -> tuple[Path, str | None]:
    """The run folder of ``cfg`` and a line for the run log (``None``: nothing to say).

    Rank 0 decides (names or creates the folder, checks it, deletes a previous run's outputs
    when ``train.overwrite_output_dir`` asks) and broadcasts the outcome, so every rank gets the
    same folder or raises the same error (collective when there are ranks). A benchmark run
    writes no checkpoints, export or metrics: it is not checked, and its default folder is
    named but not created.
    """
    many = dist.is_initialized() and dist.get_world_size() > 1
    answer: list = [None, None, None]  # folder, log line, error message
    if not many or dist.get_rank() == 0:
        try:
            if cfg.train.output_dir is not None:
                folder = Path(cfg.train.output_dir)
            else:
                folder = _new_default_folder(Path("runs"), create=not cfg.train.benchmark)
            note = None if cfg.train.benchmark else _claim(folder, cfg)
            answer = [str(folder), note, None]
        except Exception as exc:
            if not many:
                raise
            answer = [None, None, (isinstance(exc, ConfigError), str(exc))]
            dist.broadcast_object_list(answer, src=0)
            raise
    if many:
        dist.broadcast_object_list(answer, src=0)
    if answer[2] is not None:  # rank 0 failed (and raised itself): the same failure here
        is_config, message = answer[2]
        if is_config:
            raise ConfigError(message)
        raise RuntimeError(f"rank 0 could not prepare the run folder: {message}")
    return Path(answer[0]), answer[1]


def _new_default_folder(parent: Path, *, create: bool) -> Path:
    """``parent/<date>-<time>``, or ``-2``, ``-3``, ... when that name is taken. ``create``:
    made with an exclusive ``mkdir``, so a job that names the same second's folder first owns
    it and the other takes the next suffix (two jobs never share a folder)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    if create:
        parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        folder = parent / (stamp if n == 1 else f"{stamp}-{n}")
        if not create:
            if not folder.exists():
                return folder
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RuntimeError(f"{parent}: 9999 run folders named {stamp}-* exist already")


def _claim(folder: Path, cfg: RunConfig) -> str | None:
    """Check that the run may write into ``folder``: it resumes there, or it starts fresh and
    the folder holds no previous run's outputs (deleted first with
    ``train.overwrite_output_dir``, which returns the log line saying so)."""
    from forge_ckpt.training import list_checkpoints

    complete = list_checkpoints(folder / "checkpoints")
    if cfg.checkpoint.resume and complete:
        return None  # the same run going on; a checkpoint that does not fit: resume_mismatch
    found = previous_outputs(folder)
    if not found:
        return None
    listing = "; ".join(found)
    if cfg.train.overwrite_output_dir:
        for name in RUN_OUTPUTS:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        return (
            f"train.overwrite_output_dir=true: deleted the previous run's outputs in {folder} "
            f"({listing}); this run starts fresh there"
        )
    if complete:
        why = (
            "and this run starts fresh there (checkpoint.resume=false): it would overwrite "
            "those checkpoints (the old run's later steps set aside as abandoned) and its "
            "export, and append its metrics rows after the old run's"
        )
        how = (
            f"{_FIX}; or checkpoint.resume=true to continue that run; or "
            "train.overwrite_output_dir=true to delete those outputs and start over there"
        )
    else:
        why = (
            "and no complete checkpoint to resume, so this run would start fresh there, "
            "overwriting its export and appending its metrics rows after the old run's"
        )
        how = f"{_FIX}; or train.overwrite_output_dir=true to delete those outputs and start over"
    raise ConfigError(
        f"train.output_dir: {folder} holds a previous run's outputs ({listing}) {why}. To "
        f"keep them, {how}."
    )


def previous_outputs(folder: Path) -> list[str]:
    """What a previous run left in ``folder`` that a fresh start would overwrite or mix with,
    one phrase each (empty: nothing). Crash leftovers of a save (``*.tmp-*``, ``*.deleting-*``)
    and an empty ``metrics.jsonl`` (a run that failed before its first row) do not count."""
    from forge_ckpt.training import list_checkpoints

    found = []
    checkpoints = folder / "checkpoints"
    complete = list_checkpoints(checkpoints)
    if complete:
        steps = ", ".join(str(info.step) for info in complete)
        found.append(f"checkpoints/ with step(s) {steps}")
    aside = checkpoints / "abandoned"
    if aside.is_dir() and any(aside.iterdir()):
        found.append(f"{sum(1 for _ in aside.iterdir())} abandoned checkpoint(s)")
    if checkpoints.is_dir() and not complete:
        others = [
            p.name
            for p in checkpoints.iterdir()
            if p.name != "abandoned" and ".tmp-" not in p.name and ".deleting-" not in p.name
        ]
        if others:  # damaged or incomplete step folders (never loaded, but a save replaces them)
            shown = ", ".join(sorted(others)[:3]) + (", ..." if len(others) > 3 else "")
            found.append(f"checkpoints/ with {shown} (none a complete checkpoint)")
    hf = folder / "hf"
    if hf.is_dir() and any(hf.iterdir()):
        found.append("a Hugging Face export in hf/")
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        last = _last_step(metrics)
        found.append(
            "metrics.jsonl" + (f" with rows up to step {last}" if last is not None else "")
        )
    return found


def _last_step(metrics: Path) -> int | None:
    """The step of the last row of ``metrics.jsonl`` (read from its end), if it parses."""
    import json

    with open(metrics, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(max(0, size - 65536))
        lines = f.read().decode("utf-8", errors="replace").strip().splitlines()
    try:
        return int(json.loads(lines[-1])["step"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def resume_mismatch(folder: Path, step: int | None, checkpoint: Path | None, exc: Exception):
    """The :class:`ConfigError` for a newest checkpoint of ``folder`` that this run cannot
    resume (``exc``: forge-ckpt's ``CheckpointMismatchError`` for another model or optimizer,
    a loader's ``cannot resume: ...`` for another data set-up), in one paragraph."""
    from forge_ckpt import CheckpointMismatchError

    if isinstance(exc, CheckpointMismatchError):
        what = "the model or optimizer differs: " + _tensor_differences(exc)
    else:
        what = str(exc).strip().removeprefix("cannot resume: ")
        what = " ".join(what.split())  # one paragraph
    where = f"its newest checkpoint (step {step}, {checkpoint})" if step is not None else "it"
    return ConfigError(
        f"train.output_dir: cannot resume the run in {folder}: {where} was written by a run "
        f"with another set-up ({what}). To keep that run, {_FIX}, or set the setting back to "
        f"resume it; {_START_OVER}."
    )


def _tensor_differences(exc) -> str:
    """A one-line summary of a ``CheckpointMismatchError``: counts and a few examples."""
    parts = []
    if exc.mismatched:
        examples = "; ".join(
            f"{name}: checkpoint {list(got)}, this run {list(want)}"
            for name, got, want in exc.mismatched[:2]
        )
        parts.append(f"{len(exc.mismatched)} tensor(s) of another shape, e.g. {examples}")
    if exc.missing:
        parts.append(
            f"{len(exc.missing)} tensor(s) not in the checkpoint, e.g. {', '.join(exc.missing[:2])}"
        )
    if exc.unexpected:
        parts.append(
            f"{len(exc.unexpected)} tensor(s) this run has no place for, e.g. "
            f"{', '.join(exc.unexpected[:2])}"
        )
    if exc.wrong_dtype:
        name, dtype = exc.wrong_dtype[0]
        parts.append(f"{len(exc.wrong_dtype)} tensor(s) not floating-point, e.g. {name}: {dtype}")
    return "; ".join(parts) or str(exc).splitlines()[0]
