"""``testdev``: a CPU-backed Forge accelerator plugin used by Forge's own tests.

It is the smallest complete plugin: an :class:`~forge_core.Accelerator` subclass announced
through the ``forge.backends`` entry point (see this distribution's ``pyproject.toml``), a
communication backend (gloo), capability flags, and one kernel override (``rms_norm``) that it
installs into forge-kernels' registry when activated. The override is its own eager
implementation, numerically the forge-kernels reference, and it counts its calls so a test can
prove that model code really went through it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch

from forge_core.accelerator import Capabilities, CpuAccelerator

__all__ = ["TestDeviceAccelerator"]

__version__ = "0.1.0"


class TestDeviceAccelerator(CpuAccelerator):
    """The host CPU presented as a plugin device named ``testdev`` (gloo for communication)."""

    __test__ = False  # a plugin, not a pytest test class

    name = "testdev"
    device_type = "cpu"
    dist_backend = "gloo"
    capabilities = Capabilities(bf16=True, fp16=True, fp8=False, triton=False, p2p=True)

    def __init__(self) -> None:
        #: Calls per overridden op since construction (or :meth:`reset_counts`).
        self.calls: Counter[str] = Counter()

    # -- kernel overrides --------------------------------------------------------------
    def kernel_overrides(self) -> Mapping[str, Callable[..., Any]]:
        return {"rms_norm": self.rms_norm}

    def rms_norm(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None = None,
        *,
        eps: float = 1e-6,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm with forge-kernels' signature and the numerics of its reference."""
        self.calls["rms_norm"] += 1
        h = x if residual is None else x + residual
        h32 = h.to(torch.promote_types(h.dtype, torch.float32))
        inv_rms = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
        y = (h32 * inv_rms).to(h.dtype)
        if weight is not None:
            y = weight * y
        return y if residual is None else (y, h)

    def reset_counts(self) -> None:
        self.calls.clear()

    # -- activation: install / remove the overrides in forge-kernels' registry ----------
    def activate(self) -> list[str]:
        """Install :meth:`kernel_overrides` into forge-kernels' registry; returns the op names."""
        from forge_kernels import registry

        for op, fn in self.kernel_overrides().items():
            registry.override_op(op, fn, source=self.name)
        return sorted(self.kernel_overrides())

    def deactivate(self) -> None:
        """Remove this plugin's overrides (leaves overrides installed by anyone else)."""
        from forge_kernels import registry

        for op in self.kernel_overrides():
            if registry.implementation_of(op) == self.name:
                registry.remove_override(op)
