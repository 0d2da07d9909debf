"""Which device this process computes on, behind one small interface.

Model, parallel and training code never branch on ``device.type``: they ask the current
:class:`Accelerator` for the device, the communication backend, memory figures, RNG state and
capability flags. Forge ships two built-ins (``cuda`` and ``cpu``); other vendors plug in through
the ``forge.backends`` entry-point group (see :mod:`forge_core.backends`).

A plugin usually subclasses :class:`Accelerator` and sets the class attributes; the defaults
forward to ``torch.get_device_module(device_type)`` (``torch.cuda``, ``torch.xpu``, ...), which
covers any device that registers a PyTorch device module.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["Accelerator", "Capabilities", "CpuAccelerator", "CudaAccelerator"]


@dataclass(frozen=True, kw_only=True)
class Capabilities:
    """What the device can do. Code asks these flags instead of checking device names."""

    bf16: bool = False
    fp16: bool = False
    fp8: bool = False
    #: Triton kernels can run natively (not only through the CPU interpreter).
    triton: bool = False
    #: Peer-to-peer send/recv between ranks is supported by the communication backend.
    p2p: bool = True


class Accelerator:
    """One kind of compute device and how Forge talks to it.

    Subclasses set :attr:`name`, :attr:`device_type`, :attr:`dist_backend` and
    :attr:`capabilities`, and may override any method. ``kernel_overrides`` returns
    ``{op name: callable}`` for forge-kernels' registry (empty by default).
    """

    name: ClassVar[str]
    device_type: ClassVar[str]
    dist_backend: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    # -- availability and placement ------------------------------------------------------
    def is_available(self) -> bool:
        """True if this process can use the device (runtime installed, a device visible)."""
        return self.device_count() > 0

    def device_count(self) -> int:
        return self._module().device_count()

    def device(self, index: int | None = None) -> torch.device:
        """The ``torch.device`` to put tensors on (``index=None``: the current one)."""
        if index is None:
            index = self._module().current_device()
        return torch.device(self.device_type, index)

    def set_device(self, local_rank: int) -> None:
        """Bind this process to device ``local_rank`` (called once by ``init_distributed``)."""
        count = self.device_count()
        if not 0 <= local_rank < count:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but only {count} {self.name} device(s) are visible; "
                f"launch at most {count} processes per node (torchrun --nproc-per-node {count}) "
                "or fix CUDA_VISIBLE_DEVICES / the vendor's equivalent"
            )
        self._module().set_device(local_rank)

    def synchronize(self) -> None:
        """Wait for all queued work on the current device."""
        self._module().synchronize()

    # -- memory ------------------------------------------------------------------------
    def memory_stats(self) -> dict[str, int]:
        """Bytes: ``allocated``, ``reserved``, ``peak_allocated`` (current device)."""
        module = self._module()
        return {
            "allocated": int(module.memory_allocated()),
            "reserved": int(module.memory_reserved()),
            "peak_allocated": int(module.max_memory_allocated()),
        }

    def reset_peak_memory_stats(self) -> None:
        self._module().reset_peak_memory_stats()

    # -- random number generation ------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        """Seed the host RNG and this device's RNG."""
        torch.manual_seed(seed)
        self._module().manual_seed(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        """Host and device RNG state, for checkpoints (restore with :meth:`set_rng_state`)."""
        return {"cpu": torch.get_rng_state(), self.device_type: self._module().get_rng_state()}

    def set_rng_state(self, state: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device_type in state:
            self._module().set_rng_state(state[self.device_type])

    # -- plugin hooks ------------------------------------------------------------------
    def kernel_overrides(self) -> Mapping[str, Callable[..., Any]]:
        """``{forge-kernels op name: implementation}`` this device brings (none by default)."""
        return {}

    def environment_defaults(self) -> Mapping[str, str]:
        """Environment variables the vendor documents for training (set only if unset)."""
        return {}

    def _module(self) -> Any:
        return torch.get_device_module(self.device_type)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device_type={self.device_type!r}, dist_backend={self.dist_backend!r})"


class CudaAccelerator(Accelerator):
    """NVIDIA GPUs (and ROCm builds of PyTorch, which present themselves as ``cuda``)."""

    name = "cuda"
    device_type = "cuda"
    # Gloo beside NCCL so CPU tensors (data-loader state, small metadata) can be reduced too.
    dist_backend = "cpu:gloo,cuda:nccl"

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        if not torch.cuda.is_available():
            return Capabilities()
        major, minor = torch.cuda.get_device_capability()
        return Capabilities(
            bf16=torch.cuda.is_bf16_supported(),
            fp16=True,
            fp8=(major, minor) >= (8, 9),
            triton=True,
        )

    def is_available(self) -> bool:
        return torch.cuda.is_available()


class CpuAccelerator(Accelerator):
    """The host CPU: development, tests and CI (gloo for communication)."""

    name = "cpu"
    device_type = "cpu"
    dist_backend = "gloo"
    capabilities = Capabilities(bf16=True, fp16=True, fp8=False, triton=False)

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def set_device(self, local_rank: int) -> None:
        """Every local rank shares the host; nothing to bind."""

    def synchronize(self) -> None:
        """CPU ops run eagerly; nothing to wait for."""

    def memory_stats(self) -> dict[str, int]:
        """Resident memory of this process (``peak_allocated`` is the peak RSS since start)."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_bytes = peak if sys.platform == "darwin" else peak * 1024
        return {"allocated": _current_rss_bytes(), "reserved": 0, "peak_allocated": peak_bytes}

    def reset_peak_memory_stats(self) -> None:
        """The OS keeps the peak RSS; it cannot be reset."""

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: Mapping[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])


def _current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * resource.getpagesize()
