"""The accelerator registry: built-ins plus plugins found through entry points.

A vendor package announces its accelerator in its ``pyproject.toml``::

    [project.entry-points."forge.backends"]
    acme = "forge_acme.plugin:AcmeAccelerator"

The object named there is a zero-argument factory (usually the :class:`Accelerator` subclass
itself). Discovery only reads installed distributions' metadata; the plugin module is imported
the first time someone asks for that name (:func:`get_backend`), never when Forge is imported.

The accelerator a process uses is picked once, from ``FORGE_ACCELERATOR`` if set, else CUDA when
available, else CPU; :func:`set_accelerator` overrides the choice.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from forge_core.accelerator import Accelerator, CpuAccelerator, CudaAccelerator

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_VAR",
    "available_backends",
    "current_accelerator",
    "get_backend",
    "register_backend",
    "set_accelerator",
    "unregister_backend",
]

ENTRY_POINT_GROUP = "forge.backends"
ENV_VAR = "FORGE_ACCELERATOR"

AcceleratorFactory = Callable[[], Accelerator]


@dataclass(frozen=True, kw_only=True)
class _Registration:
    name: str
    origin: str  # where it came from, for error messages
    factory: AcceleratorFactory | None = None  # explicit registrations
    entry_point: metadata.EntryPoint | None = None  # plugins, loaded on first use


_lock = threading.RLock()
_registered: dict[str, _Registration] = {}
_instances: dict[str, Accelerator] = {}
_current: Accelerator | None = None


def _builtin_registrations() -> dict[str, _Registration]:
    return {
        "cpu": _Registration(name="cpu", origin="forge_core (built-in)", factory=CpuAccelerator),
        "cuda": _Registration(name="cuda", origin="forge_core (built-in)", factory=CudaAccelerator),
    }


def _entry_point_registrations() -> dict[str, _Registration]:
    """Plugins declared by installed distributions. Reads metadata only; imports nothing."""
    found: dict[str, _Registration] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"entry point {ep.value!r} of distribution {dist.name if dist else '?'}"
        if ep.name in found and found[ep.name].entry_point.value != ep.value:
            raise ValueError(
                f"two installed distributions register the Forge backend {ep.name!r}: "
                f"{found[ep.name].origin} and {origin}. Uninstall one of them."
            )
        found[ep.name] = _Registration(name=ep.name, origin=origin, entry_point=ep)
    return found


def _all_registrations() -> dict[str, _Registration]:
    with _lock:
        merged = _builtin_registrations()
        for name, reg in _entry_point_registrations().items():
            if name in merged:
                raise ValueError(
                    f"the Forge backend name {name!r} is already taken by {merged[name].origin}; "
                    f"{reg.origin} must register under another name"
                )
            merged[name] = reg
        for name, reg in _registered.items():
            if name in merged:  # pragma: no cover - register_backend checks this first
                raise ValueError(
                    f"backend {name!r} registered twice: {merged[name].origin} and {reg.origin}"
                )
            merged[name] = reg
        return merged


def available_backends() -> list[str]:
    """Names of every known backend (built-in, plugin, or registered), without importing plugins."""
    return sorted(_all_registrations())


def register_backend(
    name: str, factory: AcceleratorFactory, *, origin: str = "register_backend()"
) -> None:
    """Register an accelerator by name in this process (entry points are the usual route).

    Raises ``ValueError`` if ``name`` is taken by a built-in, an installed plugin or an earlier
    registration.
    """
    with _lock:
        existing = _all_registrations().get(name)
        if existing is not None:
            raise ValueError(
                f"the Forge backend name {name!r} is already taken by {existing.origin}; "
                "choose another name (or unregister_backend() the earlier one first)"
            )
        _registered[name] = _Registration(name=name, origin=origin, factory=factory)


def unregister_backend(name: str) -> None:
    """Forget a backend registered with :func:`register_backend` (built-ins and plugins stay)."""
    global _current
    with _lock:
        _registered.pop(name, None)
        instance = _instances.pop(name, None)
        if instance is not None and instance is _current:
            _current = None


def get_backend(name: str) -> Accelerator:
    """The accelerator registered as ``name``, importing its plugin now if needed (cached)."""
    with _lock:
        if name in _instances:
            return _instances[name]
        registrations = _all_registrations()
        if name not in registrations:
            raise KeyError(
                f"no Forge backend named {name!r}; known: {', '.join(sorted(registrations))}. "
                f"A plugin is found through the {ENTRY_POINT_GROUP!r} entry-point group of an "
                "installed distribution: is the plugin package installed in this environment?"
            )
        reg = registrations[name]
        factory = reg.factory
        if factory is None:
            try:
                factory = reg.entry_point.load()
            except ImportError as exc:
                raise ImportError(
                    f"could not import the Forge backend {name!r} ({reg.origin}): {exc}"
                ) from exc
        accelerator = factory()
        if not isinstance(accelerator, Accelerator):
            raise TypeError(
                f"the Forge backend {name!r} ({reg.origin}) produced {type(accelerator).__name__}, "
                "not a forge_core.Accelerator; the entry point must name an Accelerator subclass "
                "or a zero-argument function returning one"
            )
        _instances[name] = accelerator
        return accelerator


def current_accelerator() -> Accelerator:
    """The accelerator of this process, picked on first call and then fixed.

    ``FORGE_ACCELERATOR=<name>`` selects one explicitly (an error if it is unavailable); otherwise
    CUDA if a GPU is visible, else the CPU.
    """
    global _current
    with _lock:
        if _current is None:
            requested = os.environ.get(ENV_VAR)
            if requested:
                _current = _checked_available(get_backend(requested), via=f"{ENV_VAR}={requested}")
            else:
                cuda = get_backend("cuda")
                _current = cuda if cuda.is_available() else get_backend("cpu")
        return _current


def set_accelerator(accelerator: str | Accelerator | None) -> Accelerator | None:
    """Choose this process's accelerator by name or instance (``None``: pick again on next use)."""
    global _current
    with _lock:
        if accelerator is None:
            _current = None
            return None
        if isinstance(accelerator, str):
            accelerator = _checked_available(
                get_backend(accelerator), via=f"set_accelerator({accelerator!r})"
            )
        _current = accelerator
        return accelerator


def _checked_available(accelerator: Accelerator, *, via: str) -> Accelerator:
    if not accelerator.is_available():
        raise RuntimeError(
            f"{via} asks for the {accelerator.name!r} accelerator, but it is not available in this "
            "process (no device visible or its runtime is not installed); unset it to fall back "
            "to CUDA/CPU automatically"
        )
    return accelerator
