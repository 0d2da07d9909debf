"""Load Megatron-LM ``.pt`` files without running code from the pickle.

Megatron-LM saves ``args`` (an ``argparse.Namespace``) next to the weights. ``torch.load(...,
weights_only=True)`` refuses every class that is not on its allowlist; this module allows
``argparse.Namespace`` (a plain attribute bag) and nothing else by default. By default a file
holding other objects (an enum of megatron.core, a ``pathlib.Path``) fails with an error that
names the class; pass it in ``trusted_globals`` only if the checkpoint comes from a trusted
source, since an allowlisted class is constructed from the file's data.

Checkpoints that Megatron-LM writes always hold such objects outside the weights: ``args`` keeps
``attention_backend`` as an enum of megatron.core (``AttnBackend``), and the legacy files'
``rng_state`` keeps NumPy's generator state (an ``ndarray``). Forge's readers only take tensors
and plain ``args`` values, so they load with ``inert_untrusted=True``: each class the file names
that is neither allowed nor trusted becomes an :class:`Inert` stand-in that keeps the
arguments and state the file gives it as data. No code of that class (or of any other named in
the file) runs, and nothing needs megatron-core or NumPy to be importable. Modules torch's
``weights_only`` loader blocks outright (``os``, ``sys``, ``subprocess``, ...) stay refused.
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

__all__ = ["Inert", "load_pt"]

_MAX_STAND_INS = 64  # distinct untrusted classes one file may name


class Inert:
    """An object of a class the file names but the reader does not trust: the construction
    arguments (``args``, ``kwargs``) and ``state`` the file gives it, kept as data."""

    qualified_name = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        self = super().__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<untrusted {self.qualified_name}{self.args!r}>"


def _stand_in(path: str) -> tuple[type, str]:
    """An :class:`Inert` subclass registered under the dotted name ``path``."""
    return type(path.rpartition(".")[2] or path, (Inert,), {"qualified_name": path}), path


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"trusted global {path!r} cannot be imported") from None


def load_pt(
    file: str | os.PathLike,
    *,
    trusted_globals: Sequence[str] = (),
    mmap: bool = True,
    inert_untrusted: bool = False,
) -> Any:
    """``torch.load(file, weights_only=True)`` with ``argparse.Namespace`` (and
    ``trusted_globals``, dotted names) allowed. A refused class gives a ``ValueError`` that
    says which and how to proceed or, with ``inert_untrusted``, becomes an :class:`Inert`
    stand-in (see the module doc)."""
    allowed: list[Any] = [argparse.Namespace, *(_resolve(g) for g in trusted_globals)]
    stand_ins: list[tuple[type, str]] = []
    while True:
        try:
            with torch.serialization.safe_globals([*allowed, *stand_ins]):
                return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = found.group(1) if found else None
            if (
                not inert_untrusted
                or what is None
                or what in {name for _, name in stand_ins}
                or len(stand_ins) >= _MAX_STAND_INS
            ):
                what = what or "an object that is not allowed"
                raise ValueError(
                    f"{file} holds {what}, which weights_only loading refuses (no code from a "
                    "checkpoint runs here). If you trust this checkpoint, pass "
                    f"trusted_globals=[{what!r}] (forge-convert: --trust-global {what})"
                ) from None
            stand_ins.append(_stand_in(what))
