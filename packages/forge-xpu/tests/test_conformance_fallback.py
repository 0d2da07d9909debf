"""forge-core's kernel-override conformance check reads the Kunlun overrides' fallback counts:
a plugin whose vendor kernels are absent (every call runs the reference) does not pass it."""

from __future__ import annotations

import pytest

from forge_core.accelerator import CpuAccelerator
from forge_core.testing.conformance import check_kernel_overrides
from forge_kernels import registry
from forge_xpu.conformance import KERNEL_CASES, reference_for
from forge_xpu.kunlun_kernels import KUNLUN_KERNELS
from forge_xpu.overrides import build_overrides


class HostKunlun(CpuAccelerator):
    """The Kunlun kernel table on host tensors (``device_type="cpu"`` lets the adapters serve
    them), resolved against whatever ``torch_xmlir`` is importable when it is built."""

    name = "kunlun-on-host"

    def __init__(self) -> None:
        self._overrides = build_overrides(
            KUNLUN_KERNELS, device_type="cpu", reference_for=registry.get_reference
        )

    def kernel_overrides(self):
        return self._overrides


def _check(**kwargs) -> str:
    return check_kernel_overrides(
        HostKunlun(), reference_for=reference_for, kernel_cases=KERNEL_CASES, **kwargs
    )


def test_without_the_vendor_runtime_the_overrides_do_not_conform(no_xpytorch):
    with pytest.raises(AssertionError, match=r"override of apply_rope, rms_norm, swiglu fell "
                       r"back to the reference on every call"):  # fmt: skip
        _check()


def test_the_ops_that_fell_back_are_named(fake_xpytorch):
    assert "fell back" not in _check()  # every vendor kernel present: each one ran
    fake_xpytorch.remove("torch_xmlir.nn.swiglu")
    with pytest.raises(AssertionError, match=r"override of swiglu fell back .* \(swiglu: "):
        _check()
    detail = _check(allow_fallback=True)
    assert "swiglu[float32] (fell back)" in detail
    assert "rms_norm[float32]," in detail  # its vendor kernel ran
    assert detail.endswith("; fell back to the reference on every call: swiglu")
