"""``--record PATH``: append this run (date, hardware, versions, command, table) to a Markdown
file such as the repository's ``BENCHMARKS.md``. Earlier sections are left untouched.

The run's section is written when the run starts and rewritten after every row (see
:class:`Record`), so that a run cut off from outside (a GPU call's time limit) still leaves the
rows it finished. Each rewrite replaces the file in one step (:func:`atomic_write`): a write
that is itself interrupted leaves the previous version, never a truncated file."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

__all__ = ["Record", "atomic_write", "environment"]


def _driver_version() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({type(exc).__name__})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def environment(device: torch.device) -> dict[str, str]:
    """Hardware and software versions of this run, for the record and the printed header."""
    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = "not installed"
    env = {"torch": torch.__version__, "transformers": hf, "python": platform.python_version()}
    if device.type == "cuda":
        env = {
            "device": torch.cuda.get_device_name(device),
            "driver": _driver_version(),
            "CUDA": str(torch.version.cuda),
            **env,
        }
    else:
        cores = len(os.sched_getaffinity(0))
        env = {"device": f"CPU ({platform.processor() or platform.machine()}, {cores} cores)",
               **env}  # fmt: skip
    return env


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` in one step: written in full to a temporary file
    beside it (same file system), flushed to disk, then renamed over it (``os.replace``). An
    interrupted or failed write (a kill, a full disk) leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:  # created with the umask's mode, like path
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Record:
    """This run's section of a Markdown record: the text the file held when the run started,
    then one dated section (device, versions, command, ``body``), rewritten whole by
    :meth:`write` as the body grows. A symbolic link is followed (its target is rewritten)."""

    def __init__(self, path: str | Path, *, env: dict[str, str], command: str) -> None:
        self.path = Path(path).resolve()
        self.before = self.path.read_text(encoding="utf-8") if self.path.exists() else ""
        date = datetime.date.today().isoformat()
        versions = ", ".join(f"{k} {v}" for k, v in env.items() if k != "device")
        self.heading = (
            f"\n## {date}, {env.get('device', 'unknown device')}\n\n"
            f"{versions}\n\n```\n{command}\n```\n\n"
        )

    def write(self, body: str) -> None:
        """The file becomes what it held before this run plus this run's section with ``body``."""
        atomic_write(self.path, f"{self.before}{self.heading}```\n{body.rstrip()}\n```\n")
