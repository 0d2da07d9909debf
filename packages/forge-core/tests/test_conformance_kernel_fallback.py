"""The kernel-override conformance check sees an override that hands its calls to the
reference: one that always does fails (only the reference was checked), one that sometimes does
is reported per case, one that keeps no count is named as unobservable."""

from __future__ import annotations

import pytest
import torch

from forge_core.accelerator import CpuAccelerator
from forge_core.testing import conformance
from forge_core.testing.conformance import KernelCase


def reference_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def own_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The "vendor kernel": the same numbers, computed another way."""
    return gate * torch.sigmoid(gate) * up


class CountingOverride:
    """Runs ``own_swiglu`` for the dtypes it serves, else the reference, counting both (the
    convention forge-xpu's ``KernelOverride`` follows)."""

    def __init__(self, serves: tuple[torch.dtype, ...]) -> None:
        self.serves = serves
        self.vendor_calls = 0
        self.fallback_calls = 0

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if gate.dtype in self.serves:
            self.vendor_calls += 1
            return own_swiglu(gate, up)
        self.fallback_calls += 1
        return reference_swiglu(gate, up)


class FakeAccelerator(CpuAccelerator):
    name = "fake"

    def __init__(self, override) -> None:
        self.override = override

    def kernel_overrides(self):
        return {"swiglu": self.override}


def _inputs(device: torch.device, dtype: torch.dtype):
    gate, up = (torch.randn(4, 8).to(device=device, dtype=dtype).requires_grad_() for _ in "gu")
    return (gate, up), {}


CASES = {
    "swiglu": [
        KernelCase(make_inputs=_inputs),
        KernelCase(make_inputs=_inputs, dtypes=(torch.bfloat16,), atol=2e-2, rtol=2e-2),
    ]
}


def _check(override, **kwargs) -> str:
    return conformance.check_kernel_overrides(
        FakeAccelerator(override),
        reference_for=lambda op: reference_swiglu,
        kernel_cases=CASES,
        **kwargs,
    )


def test_an_override_that_always_falls_back_fails():
    with pytest.raises(AssertionError, match=r"override of swiglu fell back to the reference on "
                       r"every call \(swiglu: 2 case\(s\)\)"):  # fmt: skip
        _check(CountingOverride(serves=()))


def test_allow_fallback_reports_the_ops_that_fell_back():
    detail = _check(CountingOverride(serves=()), allow_fallback=True)
    assert detail == (
        "swiglu[float32] (fell back), swiglu[bfloat16] (fell back); "
        "fell back to the reference on every call: swiglu"
    )


def test_some_cases_falling_back_are_reported_per_case():
    override = CountingOverride(serves=(torch.float32,))
    assert _check(override) == "swiglu[float32], swiglu[bfloat16] (fell back)"
    assert (override.vendor_calls, override.fallback_calls) == (1, 1)
    assert _check(CountingOverride(serves=(torch.float32, torch.bfloat16))) == (
        "swiglu[float32], swiglu[bfloat16]"
    )


def test_an_override_without_a_count_is_named_as_unobservable():
    assert _check(own_swiglu) == (
        "swiglu[float32], swiglu[bfloat16]; no fallback_calls count, fallback not observable: "
        "swiglu"
    )
