"""The one GPU peak table (forge_kernels.benchmarking.peak_tflops) on real device names."""

from __future__ import annotations

import pytest

from forge_kernels.benchmarking import peak_tflops


@pytest.mark.parametrize(
    ("device_name", "bf16", "fp8"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0, 1979.0),
        ("NVIDIA H100 PCIe", 756.0, 1513.0),
        ("NVIDIA H100 NVL", 835.0, 1671.0),
        ("NVIDIA H200", 989.0, 1979.0),
        ("NVIDIA H200 NVL", 835.0, 1671.0),
        ("NVIDIA GH200 480GB", 989.0, 1979.0),
        ("NVIDIA H20", 148.0, 296.0),
        ("NVIDIA B200", 2250.0, 4500.0),
        ("NVIDIA L40", 181.0, 362.0),
        ("NVIDIA L40S", 362.0, 733.0),
        ("NVIDIA L4", 121.0, 242.5),
        ("NVIDIA A10G", 70.0, None),
        ("NVIDIA A10", 125.0, None),
        ("NVIDIA A100-SXM4-80GB", 312.0, None),
        ("NVIDIA A100 80GB PCIe", 312.0, None),
    ],
)
def test_real_device_names_get_their_own_row(device_name, bf16, fp8):
    assert peak_tflops(device_name) == bf16
    assert peak_tflops(device_name, dtype="fp8") == fp8


@pytest.mark.parametrize("device_name", ["NVIDIA GeForce RTX 4090", "Tesla T4", "NVIDIA H1000", ""])
def test_unknown_devices_have_no_peak(device_name):
    assert peak_tflops(device_name) is None


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        peak_tflops("NVIDIA H100 80GB HBM3", dtype="fp32")
