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
is ignored, and ``*.tmp-*`` / ``*.deleting-*`` leftovers are removed by the next save. A
``step_XXXXXXXX`` folder that fails these checks is damaged (a truncated or deleted file, a
lost marker): it is never loaded, and left where it is for inspection (only a new save of the
same step replaces it); ``CheckpointManager.load_latest`` warns about each one newer than the
checkpoint it resumes, with the reason.
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
    "check_folder",
    "list_checkpoints",
    "read_manifest",
    "scan_checkpoints",
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
    return check_folder(folder, named=named)[0]


def check_folder(folder: Path, *, named: bool = True) -> tuple[dict[str, Any] | None, str]:
    """``(manifest, "")`` for a complete checkpoint folder, else ``(None, why not)``.

    The reason names what is wrong (the marker missing or unreadable, a listed file missing,
    or its size against the manifest's), so that a damaged checkpoint skipped on resume can be
    reported instead of passed over in silence."""
    match = _STEP_RE.match(folder.name)
    if named and match is None:
        return None, f"the folder name is not step_XXXXXXXX (8 or more digits): {folder.name!r}"
    marker = folder / MARKER
    try:
        manifest = json.loads(marker.read_text())
    except FileNotFoundError:
        return None, (
            f"it has no {MARKER} (the completion marker, written last: the save did not finish, "
            "or the file was removed)"
        )
    except (OSError, ValueError) as err:
        return None, f"its {MARKER} cannot be read as JSON ({type(err).__name__}: {err})"
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("step"), int)
        or not isinstance(manifest.get("files"), list)
    ):
        return None, f"its {MARKER} is not a forge training checkpoint manifest"
    if named and manifest["step"] != int(match.group(1)):
        return None, f"its {MARKER} is of step {manifest['step']}, not of this folder's"
    for entry in manifest["files"]:
        try:
            name, size = entry["name"], entry["size"]
            found = (folder / name).stat().st_size
        except (KeyError, TypeError):
            return None, f"its {MARKER} lists a file without name and size: {entry!r}"
        except FileNotFoundError:
            return None, f"{name} is missing (the manifest lists it with {size} bytes)"
        except OSError as err:
            return None, f"{name} cannot be read ({type(err).__name__}: {err})"
        if found != size:
            return None, f"{name} is {found} bytes, the manifest says {size}"
    return manifest, ""


def list_checkpoints(directory: Path) -> list[CheckpointInfo]:
    """Complete checkpoints in ``directory``, oldest step first."""
    return scan_checkpoints(directory)[0]


def scan_checkpoints(directory: Path) -> tuple[list[CheckpointInfo], list[tuple[int, Path, str]]]:
    """``(complete, damaged)`` step folders of ``directory``, each oldest step first.

    ``damaged``: ``(step, folder, reason)`` of every ``step_XXXXXXXX`` folder that is not a
    complete checkpoint (see :func:`check_folder`); retention never deletes or moves them."""
    if not directory.is_dir():
        return [], []
    found, damaged = [], []
    for folder in directory.iterdir():
        match = _STEP_RE.match(folder.name)
        if folder.is_dir() and match:
            manifest, reason = check_folder(folder)
            if manifest is not None:
                found.append(CheckpointInfo(manifest["step"], folder, manifest))
            else:
                damaged.append((int(match.group(1)), folder, reason))
    return sorted(found, key=lambda info: info.step), sorted(damaged)


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
