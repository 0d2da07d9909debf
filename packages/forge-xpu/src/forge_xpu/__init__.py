"""Forge accelerator plugin for Kunlunxin XPU (P800), and the template for other vendors.

The ``kunlun`` backend is found through forge-xpu's ``forge.backends`` entry point and imported
only when selected (``FORGE_ACCELERATOR=kunlun`` or ``forge_core.get_backend("kunlun")``).
Importing this package imports no vendor runtime and no forge-kernels.

- :mod:`forge_xpu.plugin`: ``KunlunXpuAccelerator`` (device, BKCL collectives, capabilities,
  environment defaults, kernel overrides).
- :mod:`forge_xpu.overrides`: the vendor-neutral part a new plugin reuses: ``VendorKernel``
  rows, ``build_overrides`` (fallback to the torch-native reference), ``activate`` /
  ``deactivate`` (install overrides into forge-kernels' registry).
- :mod:`forge_xpu.kunlun_kernels`: the Kunlun kernel table and its argument adapters.
- :mod:`forge_xpu.runtime`: the lazy import of XPyTorch and its missing-runtime error.
"""

from forge_xpu.overrides import (
    FALLBACK,
    KernelOverride,
    VendorKernel,
    activate,
    build_overrides,
    deactivate,
)
from forge_xpu.runtime import KunlunRuntimeNotFoundError

__version__ = "0.1.0"

__all__ = [
    "FALLBACK",
    "KernelOverride",
    "KunlunRuntimeNotFoundError",
    "VendorKernel",
    "activate",
    "build_overrides",
    "deactivate",
]
