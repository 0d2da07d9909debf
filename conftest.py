"""Workspace-wide pytest set-up.

Triton decides at ``@triton.jit`` time whether kernels run interpreted, so the interpreter must be
switched on before any package imports a kernel module: on a machine without a CUDA device every
Triton kernel in the suite runs under ``TRITON_INTERPRET=1`` (see ../shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import os


def _cuda_present() -> bool:
    # Cheap check that does not import torch (and so does not initialise CUDA) at collection.
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["forge_core.testing.pytest_plugin"]
