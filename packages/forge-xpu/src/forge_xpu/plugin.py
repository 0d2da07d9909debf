"""``KunlunXpuAccelerator``: Kunlunxin XPU (P800) as a Forge accelerator.

Registered as the ``kunlun`` backend through forge-xpu's ``forge.backends`` entry point, so
``FORGE_ACCELERATOR=kunlun`` or ``forge_core.get_backend("kunlun")`` selects it; this module
is imported only then. Constructing the accelerator imports XPyTorch (``torch_xmlir``) and
fails at once with :class:`~forge_xpu.runtime.KunlunRuntimeNotFoundError`, naming what to install,
when it is absent.

How XPyTorch presents the device (public sources, not checked on hardware by Forge's authors;
see forge-xpu's README):

- it registers no new PyTorch device type: the XPU appears as ``cuda`` (``torch.cuda.*`` and
  ``.to("cuda")`` reach the Kunlun card), which is also what Kunlunxin's own vLLM plugin
  declares (``device_type = "cuda"`` in baidu/vLLM-Kunlun ``vllm_kunlun/platforms/kunlun.py``);
- collectives use Kunlun's BKCL library behind ``torch.distributed``'s ``"nccl"`` name:
  vLLM-Kunlun declares ``dist_backend = "nccl"``, and XPyTorch rewrites ``"nccl"`` to its own
  process-group backend (``kccl``, or the older ``bccl`` with ``XMLIR_ENABLE_NEW_PG=0``).
  There is no backend registered under the name ``"bkcl"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from forge_core.accelerator import Accelerator, Capabilities
from forge_xpu.kunlun_kernels import KUNLUN_KERNELS
from forge_xpu.overrides import KernelOverride, activate, build_overrides, deactivate
from forge_xpu.runtime import load_runtime

__all__ = [
    "KUNLUN_COLLECTIVE_SETTINGS",
    "KUNLUN_ENV_DEFAULTS",
    "EnvSetting",
    "KunlunCapabilities",
    "KunlunXpuAccelerator",
]


@dataclass(frozen=True, kw_only=True)
class KunlunCapabilities(Capabilities):
    """forge-core's flags plus what the Kunlun plugin adds."""

    #: Dtypes the platform computes in (vLLM-Kunlun: fp32, fp16, bf16, int8).
    compute_dtypes: tuple[torch.dtype, ...] = ()
    #: forge-kernels ops served by a vendor kernel in this process (its symbol resolved).
    vendor_kernels: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class EnvSetting:
    """An environment variable of the Kunlun stack, with where it is documented."""

    name: str
    value: str
    meaning: str
    source: str
    #: Whether someone ran Forge on Kunlun hardware with it. None is, so far.
    verified_on_hardware: bool = False


_VLLM_KUNLUN_ENV_DOC = "baidu/vLLM-Kunlun docs/source/user_guide/configuration/env_vars.md"
_KUNLUNXIN_PI0_TUTORIAL = "KunlunxinAD/xav-models-tutorials tutorials/Pi_0_trainval.md"

#: Applied by ``init_distributed`` where unset (``Accelerator.environment_defaults``). Only
#: variables a Kunlunxin/Baidu document recommends; none was tried by Forge's authors on a
#: Kunlun device.
KUNLUN_ENV_DEFAULTS: tuple[EnvSetting, ...] = (
    EnvSetting(
        name="BKCL_TREE_THRESHOLD",
        value="0",
        meaning="BKCL's tree-algorithm threshold; Kunlunxin's single-node multi-card training "
        "tutorial sets 0 before launching",
        source=_KUNLUNXIN_PI0_TUTORIAL,
    ),
    EnvSetting(
        name="XMLIR_CUDNN_ENABLED",
        value="1",
        meaning="XPyTorch's cuDNN-compatible optimized path (ops such as conv3d)",
        source=_VLLM_KUNLUN_ENV_DOC + " (an inference guide)",
    ),
)

#: BKCL / process-group settings that depend on the cluster, so they are documented, never
#: defaulted. Values are the examples public scripts use.
KUNLUN_COLLECTIVE_SETTINGS: tuple[EnvSetting, ...] = (
    EnvSetting(
        name="BKCL_SOCKET_IFNAME",
        value="eth0",
        meaning="network interface BKCL bootstraps over (like NCCL_SOCKET_IFNAME)",
        source="KunlunxinAD/xav-models-tutorials tutorials/panoocc_trainval.md (multi-node)",
    ),
    EnvSetting(
        name="BKCL_RDMA_NICS",
        value="eth1,eth1,eth2,eth2,eth3,eth3,eth4,eth4",
        meaning="RDMA NIC per local device, in device order (multi-node); see `xpu-smi topo -m`",
        source="KunlunxinAD/xav-models-tutorials panoocc_trainval.md; PaddlePaddle FastDeploy "
        "Kunlunxin XPU deployment guide",
    ),
    EnvSetting(
        name="BKCL_TIMEOUT",
        value="1800",
        meaning="collective timeout (seconds in the scripts that set it; unit not documented)",
        source="public Kunlun training scripts; not in Kunlunxin's docs",
    ),
    EnvSetting(
        name="XMLIR_ENABLE_NEW_PG",
        value="1",
        meaning="'nccl' maps to XPyTorch's new 'kccl' process group (0: the older 'bccl')",
        source="third-party analysis of an XPyTorch build; not in Kunlunxin's public docs",
    ),
)


class KunlunXpuAccelerator(Accelerator):
    """Kunlunxin XPU through XPyTorch: ``torch.cuda`` device API, BKCL collectives, fused kernels."""

    name = "kunlun"
    #: XPyTorch presents the XPU as a CUDA device (see the module docstring).
    device_type = "cuda"
    #: gloo for CPU tensors beside the device backend, as forge-core's CUDA accelerator does
    #: (forge's collectives exchange small CPU tensors, e.g. all-to-all split sizes); XPyTorch
    #: rewrites "nccl" to its BKCL process group. Unverified on hardware: if the mixed form is
    #: refused, pass ``init_distributed(backend="nccl")``.
    dist_backend = "cpu:gloo,cuda:nccl"

    def __init__(self) -> None:
        self._runtime = load_runtime()  # fails fast, naming what to install
        self._overrides: dict[str, KernelOverride] | None = None

    # -- capabilities ------------------------------------------------------------------
    @property
    def capabilities(self) -> KunlunCapabilities:  # type: ignore[override]
        return KunlunCapabilities(
            bf16=True,
            fp16=True,
            # No public statement of FP8 training support on P800; vLLM-Kunlun's dtype list
            # has no float8 type.
            fp8=False,
            # Forge's Triton kernels are not validated on Kunlun's own Triton build.
            triton=False,
            p2p=True,
            compute_dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.int8),
            vendor_kernels=frozenset(
                op for op, fn in self.kernel_overrides().items() if fn.has_vendor_kernel
            ),
        )

    def is_available(self) -> bool:
        return self.device_count() > 0

    def device_count(self) -> int:
        return int(torch.cuda.device_count())

    # -- plugin hooks ------------------------------------------------------------------
    def kernel_overrides(self) -> Mapping[str, KernelOverride]:
        """``{op: KernelOverride}`` for :data:`~forge_xpu.kunlun_kernels.KUNLUN_KERNELS`.

        Built once per accelerator; an op whose vendor kernel is absent maps to forge-kernels'
        torch-native reference.
        """
        if self._overrides is None:
            from forge_kernels import registry

            self._overrides = build_overrides(
                KUNLUN_KERNELS, device_type=self.device_type, reference_for=registry.get_reference
            )
        return self._overrides

    def environment_defaults(self) -> Mapping[str, str]:
        return {setting.name: setting.value for setting in KUNLUN_ENV_DEFAULTS}

    def activate(self, *, replace: bool = False) -> list[str]:
        """Install this accelerator's kernel overrides into forge-kernels' registry."""
        return activate(self, replace=replace)

    def deactivate(self) -> None:
        deactivate(self)

    @property
    def runtime(self) -> Any:
        """The imported ``torch_xmlir`` module."""
        return self._runtime
