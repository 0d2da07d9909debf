"""Publishing a finished checkpoint folder in one rename.

Every writer in forge-ckpt (HF folders, Megatron legacy and ``torch_dist``) builds its output in
a temporary sibling folder and only then makes it visible: :func:`publish_folder` moves an
existing non-empty destination aside, renames the temporary folder into place and then deletes
the old one, so a reader sees either the old checkpoint or the complete new one, never a mix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["publish_folder"]


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final``, replacing what was there."""
    backup = None
    if final.exists():
        if any(final.iterdir()):
            backup = final.with_name(f".{final.name}.old-{os.getpid()}-{id(tmp)}")
            final.rename(backup)
        else:
            final.rmdir()
    tmp.rename(final)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
