"""forge-bench's MFU denominator comes from forge-kernels' one peak table, matched by name token."""

from __future__ import annotations

from forge_bench.table import peak_tflops_for


def test_similar_device_names_are_not_confused():
    assert peak_tflops_for("NVIDIA L40") == 181.0  # not the L4's 121
    assert peak_tflops_for("NVIDIA L4") == 121.0
    assert peak_tflops_for("NVIDIA A10G") == 70.0  # not the A10's 125
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", dtype="fp8") == 1979.0
    assert peak_tflops_for("NVIDIA GeForce RTX 4090") is None
