"""The on-disk layout of training checkpoints and its atomic completion protocol.

::

    <directory>/
      step_00000100/                 complete: holds forge_checkpoint.json (the marker)
        .metadata  __0_0.distcp  __1_0.distcp ...
        forge_checkpoint.json
      step_00000200.tmp-<id>/        being written, or left by a crash: never loaded
      step_00000050.deleting-<id>/   being deleted by retention: never loaded
      abandoned/step_00000300/       a step after a newer save of an earlier step (the run went
                                     back to an older checkpoint): kept, never loaded by step

A checkpoint is written into ``step_XXXXXXXX.tmp-<id>``; once every rank has written and
fsynced its files, rank 0 fsyncs them all, writes the marker (a JSON manifest: step, world
size, every file with its size, versions, time) with fsync, renames the folder to
``step_XXXXXXXX`` and fsyncs the parent. A folder counts only if its name parses, its marker
parses, names the same step and every listed file exists with the listed size; anything else
is ignored, and ``*.tmp-*`` / ``*.deleting-*`` leftovers are removed by the next save.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MARKER",
    "CheckpointInfo",
    "list_checkpoints",
    "read_manifest",
    "step_dir_name",
    "write_manifest",
]

MARKER = "forge_checkpoint.json"
FORMAT = "forge-training-checkpoint"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_LEFTOVER_RE = re.compile(r"^step_\d{8,}\.(tmp|deleting)-[0-9A-Za-z_-]+$")
_VERSIONED = ("forge-ckpt", "forge-ml-core", "forge-parallel", "forge-models", "forge-data")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint: its step, folder and manifest."""

    step: int
    path: Path
    manifest: dict[str, Any]


def step_dir_name(step: int) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return f"step_{step:08d}"


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: best effort where the OS refuses)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        with contextlib.suppress(OSError) if path.is_dir() else contextlib.nullcontext():
            os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict[str, str]:
    found = {}
    for name in (*_VERSIONED, "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def write_manifest(
    folder: Path, *, step: int, world_size: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """fsync every file of ``folder``, then write and fsync the completion marker (last)."""
    files = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        fsync_path(file)
        files.append({"name": file.relative_to(folder).as_posix(), "size": file.stat().st_size})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "world_size": world_size,
        "files": files,
        "versions": _versions(),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **(extra or {}),
    }
    partial = folder / (MARKER + ".partial")
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, folder / MARKER)
    fsync_path(folder)
    return manifest


def read_manifest(folder: Path, *, named: bool = True) -> dict[str, Any] | None:
    """The manifest of a complete checkpoint folder, or ``None`` if it is not complete.

    ``named``: the folder must be named ``step_XXXXXXXX`` after the manifest's step (as in a
    checkpoint directory); ``False`` for a folder given by path (a copy named ``best``)."""
    match = _STEP_RE.match(folder.name)
    if named and match is None:
        return None
    try:
        manifest = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("step"), int)
        or (named and manifest["step"] != int(match.group(1)))
        or not isinstance(manifest.get("files"), list)
    ):
        return None
    for entry in manifest["files"]:
        try:
            if (folder / entry["name"]).stat().st_size != entry["size"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return manifest


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in ``directory``, oldest step first."""
    if not directory.is_dir():
        return []
    found = []
    for folder in directory.iterdir():
        if folder.is_dir() and _STEP_RE.match(folder.name):
            manifest = read_manifest(folder)
            if manifest is not None:
                found.append(CheckpointInfo(manifest["step"], folder, manifest))
    return sorted(found, key=lambda info: info.step)


def remove_leftovers(directory: Path, *, keep: Path | None = None) -> list[str]:
    """Delete ``*.tmp-*`` / ``*.deleting-*`` folders (crashed saves, interrupted deletes)."""
    removed = []
    if not directory.is_dir():
        return removed
    for folder in directory.iterdir():
        if folder != keep and folder.is_dir() and _LEFTOVER_RE.match(folder.name):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def publish(tmp: Path, final: Path, tag: str) -> None:
    """Rename the finished ``tmp`` folder to ``final`` (replacing an older copy of the step)."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.deleting-{tag}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


#: Where checkpoints of an abandoned branch go (steps beyond a newer save of an earlier step).
ABANDONED = "abandoned"


def set_aside(info: CheckpointInfo, tag: str) -> Path:
    """Move a complete checkpoint into ``<directory>/abandoned/`` (kept, never loaded by
    step: ``load`` can still be given its folder); returns its new folder."""
    aside = info.path.parent / ABANDONED
    aside.mkdir(exist_ok=True)
    target = aside / info.path.name
    if target.exists():
        target = aside / f"{info.path.name}-{tag}"
    os.rename(info.path, target)
    fsync_path(info.path.parent)
    return target


def delete_checkpoint(info: CheckpointInfo, tag: str) -> None:
    """Delete a complete checkpoint: rename it out of sight first, so a crash midway never
    leaves a half-deleted folder that looks complete."""
    doomed = info.path.with_name(f"{info.path.name}.deleting-{tag}")
    os.rename(info.path, doomed)
    fsync_path(info.path.parent)
    shutil.rmtree(doomed, ignore_errors=True)
