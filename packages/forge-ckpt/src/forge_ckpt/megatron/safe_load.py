"""Load Megatron-LM ``.pt`` files without running code from the pickle.

Megatron-LM saves ``args`` (an ``argparse.Namespace``) next to the weights. ``torch.load(...,
weights_only=True)`` refuses every class that is not on its allowlist; this module allows
``argparse.Namespace`` (a plain attribute bag) and nothing else by default. Checkpoints whose
``args`` hold other objects (an enum of megatron.core, a ``pathlib.Path``) fail with an error that
names the class; pass it in ``trusted_globals`` only if the checkpoint comes from a trusted
source, since an allowlisted class is constructed from the file's data.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import re
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["load_pt"]


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"trusted global {path!r} cannot be imported") from None


def load_pt(
    file: str | os.PathLike, *, trusted_globals: Sequence[str] = (), mmap: bool = True
) -> Any:
    """``torch.load(file, weights_only=True)`` with ``argparse.Namespace`` (and
    ``trusted_globals``, dotted names) allowed; a refused class gives a ``ValueError`` that
    says which and how to proceed."""
    allowed = [argparse.Namespace, *(_resolve(g) for g in trusted_globals)]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = found.group(1) if found else "an object that is not allowed"
        raise ValueError(
            f"{file} holds {what}, which weights_only loading refuses (no code from a "
            "checkpoint runs here). If you trust this checkpoint, pass "
            f"trusted_globals=[{what!r}] (forge-convert: --trust-global {what})"
        ) from None
