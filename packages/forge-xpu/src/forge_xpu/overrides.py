"""Vendor kernels as forge-kernels ops: the mapping is data, the argument adaptation is small.

A vendor plugin describes each kernel it brings with a :class:`VendorKernel`: which
forge-kernels op it implements (by registry name), where the vendor callable lives (an import
path, resolved lazily, so nothing vendor-specific is imported before the plugin is selected),
and an *adapter* that turns the op's arguments into the vendor's call. :func:`build_overrides`
resolves a table of them into :class:`KernelOverride` callables with the op's own signature:

- the vendor callable cannot be imported (package or symbol absent): the override runs the
  op's torch-native reference for every call;
- the adapter declines a call (returns :data:`FALLBACK`: unsupported dtype, device, layout,
  a tensor subclass such as DTensor): that call runs the reference.

:func:`activate` installs an accelerator's ``kernel_overrides()`` into forge-kernels' registry
(by op name, ``source=accelerator.name``) and :func:`deactivate` removes them, restoring any
override that ``activate(replace=True)`` replaced (as ``registry.overridden`` does). forge-core cannot
do this itself (it must not import forge-kernels); a plugin, which depends on both, can.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FALLBACK",
    "KernelOverride",
    "VendorKernel",
    "activate",
    "build_overrides",
    "deactivate",
    "resolve_vendor",
]


class _Fallback:
    """Type of :data:`FALLBACK`."""

    def __repr__(self) -> str:
        return "FALLBACK"


#: Returned by an adapter that cannot serve a call; the reference runs instead.
FALLBACK: Any = _Fallback()

#: ``adapter(vendor_fn, device_type, *op_args, **op_kwargs) -> result | FALLBACK``
Adapter = Callable[..., Any]


@dataclass(frozen=True, kw_only=True)
class VendorKernel:
    """One row of a plugin's kernel table: forge op <- vendor callable, via an adapter."""

    #: forge-kernels registry name (``"rms_norm"``, ``"swiglu"``, ...).
    op: str
    #: ``"package.module:attr.path"`` of the vendor callable, imported on first use.
    vendor: str
    #: Maps the op's arguments to the vendor call, or returns :data:`FALLBACK`.
    adapter: Adapter
    #: Where the vendor symbol and its calling convention are documented (for maintainers).
    source: str = ""

    def __post_init__(self) -> None:
        module, sep, attr = self.vendor.partition(":")
        if not sep or not module or not attr:
            raise ValueError(
                f"VendorKernel {self.op!r}: vendor must look like 'package.module:attr', "
                f"got {self.vendor!r}"
            )


def resolve_vendor(path: str) -> Callable[..., Any] | None:
    """Import ``"module:attr.path"`` and return the callable, or ``None`` if any part is absent."""
    module_name, _, attr_path = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError:
        return None
    for part in attr_path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target if callable(target) else None


class KernelOverride:
    """A forge-kernels op served by a vendor kernel where it can be, else by the reference.

    Counts how each call went (``vendor_calls``, ``fallback_calls``), which is how one checks
    on hardware that the fused path is really taken.
    """

    def __init__(
        self,
        *,
        op: str,
        reference: Callable[..., Any],
        device_type: str,
        vendor_fn: Callable[..., Any] | None = None,
        vendor_path: str | None = None,
        adapter: Adapter | None = None,
    ) -> None:
        if (vendor_fn is None) != (adapter is None):
            raise ValueError("vendor_fn and adapter are given together or not at all")
        self.op = op
        self.reference = reference
        self.device_type = device_type
        self.vendor_fn = vendor_fn
        self.vendor_path = vendor_path if vendor_fn is not None else None
        self.adapter = adapter
        self.vendor_calls = 0
        self.fallback_calls = 0

    @property
    def has_vendor_kernel(self) -> bool:
        return self.vendor_fn is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.vendor_fn is not None:
            out = self.adapter(self.vendor_fn, self.device_type, *args, **kwargs)
            if out is not FALLBACK:
                self.vendor_calls += 1
                return out
        self.fallback_calls += 1
        return self.reference(*args, **kwargs)

    def __repr__(self) -> str:
        impl = self.vendor_path or "torch-native reference (vendor kernel absent)"
        return f"KernelOverride({self.op!r} -> {impl})"


def build_overrides(
    table: Iterable[VendorKernel],
    *,
    device_type: str,
    reference_for: Callable[[str], Callable[..., Any]],
) -> dict[str, KernelOverride]:
    """``{op: KernelOverride}`` for every row of ``table``, resolving vendor symbols now.

    ``reference_for(op)`` gives the torch-native implementation used when the vendor callable
    is absent or declines a call (``forge_kernels.registry.get_reference``).
    """
    overrides: dict[str, KernelOverride] = {}
    for row in table:
        if row.op in overrides:
            raise ValueError(f"the kernel table maps op {row.op!r} twice")
        vendor_fn = resolve_vendor(row.vendor)
        overrides[row.op] = KernelOverride(
            op=row.op,
            reference=reference_for(row.op),
            device_type=device_type,
            vendor_fn=vendor_fn,
            vendor_path=row.vendor,
            adapter=row.adapter if vendor_fn is not None else None,
        )
    return overrides


#: ``{(accelerator name, op): (fn, source)}``: what ``activate(replace=True)`` replaced, put
#: back by :func:`deactivate`.
_REPLACED: dict[tuple[str, str], tuple[Callable[..., Any], str]] = {}


def activate(accelerator: Any, *, replace: bool = False) -> list[str]:
    """Install ``accelerator.kernel_overrides()`` into forge-kernels' registry; returns op names.

    Each op is registered with ``source=accelerator.name`` (so
    ``registry.implementation_of(op)`` names the accelerator). Idempotent; raises
    ``ValueError`` if another source already overrides one of the ops (``replace=True`` to
    replace it deliberately) and ``KeyError`` for an op this forge-kernels does not define.
    """
    from forge_kernels import registry

    overrides: Mapping[str, Callable[..., Any]] = accelerator.kernel_overrides()
    # Check every op before installing any, so a refusal leaves the registry untouched.
    current = {op: registry.implementation_of(op) for op in overrides}  # KeyError if unknown
    taken = {
        op: source
        for op, source in current.items()
        if source not in ("default", "reference", accelerator.name)
    }
    if taken and not replace:
        details = ", ".join(
            f"kernel op {op!r} is already overridden by {s!r}" for op, s in taken.items()
        )
        raise ValueError(
            f"cannot activate {accelerator.name!r}: {details}; deactivate that source first or "
            "pass replace=True"
        )
    for op, source in taken.items():
        _REPLACED[(accelerator.name, op)] = (registry.get_op(op), source)
    for op, fn in overrides.items():
        registry.override_op(op, fn, source=accelerator.name, replace=replace)
    return sorted(overrides)


def deactivate(accelerator: Any) -> None:
    """Remove the overrides :func:`activate` installed for ``accelerator`` (others stay), and
    put back the overrides of other sources that ``activate(replace=True)`` replaced."""
    from forge_kernels import registry

    for op in accelerator.kernel_overrides():
        replaced = _REPLACED.pop((accelerator.name, op), None)
        if op in registry.list_ops() and registry.implementation_of(op) == accelerator.name:
            registry.remove_override(op)
            if replaced is not None:
                fn, source = replaced
                registry.override_op(op, fn, source=source)
