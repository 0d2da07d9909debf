"""A registry of kernel ops by name, so an accelerator plugin can swap an implementation.

Every public op in forge-kernels (``rms_norm``, ``apply_rope``, ``attention``, ...) is defined
here under a stable name with two implementations: the default (usually a Triton kernel with a
fallback) and an eager PyTorch *reference* that defines the numerics. Public functions call
:func:`get_op` on every call, so an override installed later (for example by the forge-xpu
plugin) takes effect without touching model code::

    from forge_kernels import registry

    registry.override_op("rms_norm", my_vendor_rms_norm, source="acme-npu")
    ...
    registry.implementation_of("rms_norm")   # -> "acme-npu"
    registry.remove_override("rms_norm")

Overrides must keep the op's signature. Registering an op name twice, or overriding an op that
another source already overrides, raises ``ValueError`` instead of silently replacing it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

__all__ = [
    "KernelOp",
    "default_implementations",
    "define_op",
    "get_default",
    "get_op",
    "get_reference",
    "implementation_of",
    "list_ops",
    "overridden",
    "override_op",
    "reference_implementations",
    "remove_override",
]

#: Set ``FORGE_KERNELS_IMPL=reference`` to run every op through its eager PyTorch reference
#: (for debugging numerics); overrides still win over it.
IMPL_ENV_VAR = "FORGE_KERNELS_IMPL"


@dataclass(frozen=True, kw_only=True)
class KernelOp:
    """One named op: its default implementation and the eager reference that defines it."""

    name: str
    default: Callable
    reference: Callable
    doc: str = ""


@dataclass(frozen=True, kw_only=True)
class _Override:
    fn: Callable
    source: str


_OPS: dict[str, KernelOp] = {}
_OVERRIDES: dict[str, _Override] = {}


def define_op(name: str, *, default: Callable, reference: Callable, doc: str = "") -> KernelOp:
    """Register op ``name``. Raises ``ValueError`` if the name is already taken."""
    if name in _OPS:
        raise ValueError(
            f"kernel op {name!r} is already defined (by {_OPS[name].default.__module__}); "
            "op names must be unique: pick another name or override it with override_op()"
        )
    op = KernelOp(name=name, default=default, reference=reference, doc=doc)
    _OPS[name] = op
    return op


def _require(name: str) -> KernelOp:
    try:
        return _OPS[name]
    except KeyError:
        known = ", ".join(sorted(_OPS)) or "(none)"
        raise KeyError(f"unknown kernel op {name!r}; known ops: {known}") from None


def get_op(name: str) -> Callable:
    """The implementation to call for ``name`` now: an override, else the default."""
    op = _require(name)
    if name in _OVERRIDES:
        return _OVERRIDES[name].fn
    if os.environ.get(IMPL_ENV_VAR, "").lower() == "reference":
        return op.reference
    return op.default


def get_default(name: str) -> Callable:
    """The default implementation of ``name``, whatever is overridden or the reference mode: for
    an override that adapts the default (e.g. pins the attention backend) instead of replacing it."""
    return _require(name).default


def get_reference(name: str) -> Callable:
    """The eager PyTorch reference of ``name`` (what tests and plugins compare against)."""
    return _require(name).reference


def implementation_of(name: str) -> str:
    """Which implementation :func:`get_op` returns: the override's source, ``"reference"`` or ``"default"``."""
    _require(name)
    if name in _OVERRIDES:
        return _OVERRIDES[name].source
    if os.environ.get(IMPL_ENV_VAR, "").lower() == "reference":
        return "reference"
    return "default"


def list_ops() -> list[str]:
    """Names of all defined ops, sorted."""
    return sorted(_OPS)


def override_op(name: str, fn: Callable, *, source: str, replace: bool = False) -> None:
    """Use ``fn`` for op ``name`` from now on. ``source`` names who installed it (e.g. a plugin).

    Raises ``KeyError`` for an unknown op and ``ValueError`` if another source already overrides
    it (pass ``replace=True`` to replace deliberately).
    """
    _require(name)
    current = _OVERRIDES.get(name)
    if current is not None and not replace and current.source != source:
        raise ValueError(
            f"kernel op {name!r} is already overridden by {current.source!r}; "
            f"remove_override({name!r}) first or pass replace=True"
        )
    _OVERRIDES[name] = _Override(fn=fn, source=source)


def remove_override(name: str) -> None:
    """Go back to the default implementation of ``name`` (no error if none was installed)."""
    _require(name)
    _OVERRIDES.pop(name, None)


@contextlib.contextmanager
def overridden(name: str, fn: Callable, *, source: str = "context") -> Iterator[None]:
    """Override ``name`` inside a ``with`` block, restoring the previous state afterwards."""
    previous = _OVERRIDES.get(name)
    override_op(name, fn, source=source, replace=True)
    try:
        yield
    finally:
        if previous is None:
            _OVERRIDES.pop(name, None)
        else:
            _OVERRIDES[name] = previous


@contextlib.contextmanager
def reference_implementations() -> Iterator[None]:
    """Run every op through its eager reference inside a ``with`` block (overrides still win).

    Sets ``FORGE_KERNELS_IMPL=reference`` for the block, so it also reaches processes started
    inside it. For debugging numerics, and for tests of code built on the ops (training loops,
    parallel layouts) on a CPU machine, where the Triton kernels would run under the
    interpreter, an order of magnitude slower (the kernels are tested against the references
    in forge-kernels' own suite).
    """
    with _impl_env("reference"):
        yield


@contextlib.contextmanager
def default_implementations() -> Iterator[None]:
    """Each op's default implementation (the Triton kernels) inside a ``with`` block, also
    within a :func:`reference_implementations` block or a process started with
    ``FORGE_KERNELS_IMPL=reference`` (unset for the block, so it reaches processes started
    inside it too)."""
    with _impl_env(None):
        yield


@contextlib.contextmanager
def _impl_env(value: str | None) -> Iterator[None]:
    previous = os.environ.get(IMPL_ENV_VAR)
    if value is None:
        os.environ.pop(IMPL_ENV_VAR, None)
    else:
        os.environ[IMPL_ENV_VAR] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(IMPL_ENV_VAR, None)
        else:
            os.environ[IMPL_ENV_VAR] = previous
