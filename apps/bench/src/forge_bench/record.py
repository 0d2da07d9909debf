"""``--record PATH``: append this run (date, hardware, versions, command, table) to a Markdown
file such as the repository's ``BENCHMARKS.md``. Earlier sections are left untouched."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

__all__ = ["append_record", "environment"]


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


def append_record(path: str | Path, *, env: dict[str, str], command: str, body: str) -> None:
    """Append a dated section with ``env``, ``command`` and ``body`` (the table) to ``path``."""
    path = Path(path)
    date = datetime.date.today().isoformat()
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k != "device")
    section = (
        f"\n## {date}, {env.get('device', 'unknown device')}\n\n"
        f"{versions}\n\n```\n{command}\n```\n\n```\n{body.rstrip()}\n```\n"
    )
    with path.open("a", encoding="utf-8") as f:
        f.write(section)
