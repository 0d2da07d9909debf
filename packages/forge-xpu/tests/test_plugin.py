"""The ``kunlun`` backend: discovery, the missing-runtime error, capability flags, environment
defaults and activation into forge-kernels' registry (XPyTorch faked; no hardware here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from forge_core import backends, init_distributed, shutdown_distributed
from forge_kernels import registry
from forge_xpu import KunlunRuntimeNotFoundError
from forge_xpu.plugin import (
    KUNLUN_COLLECTIVE_SETTINGS,
    KUNLUN_ENV_DEFAULTS,
    KunlunCapabilities,
    KunlunXpuAccelerator,
)


def test_discovered_through_its_entry_point_and_imported_only_when_selected():
    code = (
        "import sys, forge_xpu, forge_core.backends as b\n"
        "assert 'kunlun' in b.available_backends()\n"
        "loaded = [m for m in ('forge_xpu.plugin', 'torch_xmlir', 'forge_kernels') "
        "if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_selecting_it_without_xpytorch_fails_fast_saying_what_to_install(no_xpytorch, monkeypatch):
    with pytest.raises(KunlunRuntimeNotFoundError) as info:
        backends.get_backend("kunlun")
    message = str(info.value)
    for expected in ("XPyTorch", "'torch_xmlir'", "not on PyPI", "forge-xpu's README"):
        assert expected in message
    assert isinstance(info.value, ImportError)
    monkeypatch.setenv("FORGE_ACCELERATOR", "kunlun")
    backends.set_accelerator(None)
    with pytest.raises(KunlunRuntimeNotFoundError, match="XPyTorch"):
        backends.current_accelerator()
    assert "kunlun" not in backends._instances  # nothing half-built is cached


def test_device_backend_and_capability_flags(fake_xpytorch, monkeypatch):
    acc = backends.get_backend("kunlun")
    assert isinstance(acc, KunlunXpuAccelerator)
    assert acc.runtime is sys.modules["torch_xmlir"]
    assert (acc.name, acc.device_type) == ("kunlun", "cuda")
    assert acc.dist_backend == "cpu:gloo,cuda:nccl"
    caps = acc.capabilities
    assert isinstance(caps, KunlunCapabilities)
    assert (caps.bf16, caps.fp16, caps.fp8, caps.triton, caps.p2p) == (
        True,
        True,
        False,
        False,
        True,
    )
    assert torch.bfloat16 in caps.compute_dtypes
    assert caps.vendor_kernels == {"rms_norm", "swiglu", "apply_rope"}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert not acc.is_available()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert acc.is_available()


def test_capabilities_list_only_the_vendor_kernels_present(fake_xpytorch):
    fake_xpytorch.remove("torch_xmlir.nn.rope")
    assert KunlunXpuAccelerator().capabilities.vendor_kernels == {"rms_norm", "swiglu"}


def test_environment_defaults_are_cited_and_applied_only_where_unset(fake_xpytorch, monkeypatch):
    assert all(s.source and not s.verified_on_hardware for s in KUNLUN_ENV_DEFAULTS)
    assert all(s.source for s in KUNLUN_COLLECTIVE_SETTINGS)
    acc = KunlunXpuAccelerator()
    defaults = acc.environment_defaults()
    assert defaults == {"BKCL_TREE_THRESHOLD": "0", "XMLIR_CUDNN_ENABLED": "1"}
    monkeypatch.setenv("BKCL_TREE_THRESHOLD", "7")  # the user's choice wins
    monkeypatch.setenv("XMLIR_CUDNN_ENABLED", "placeholder")  # (so monkeypatch restores it)
    monkeypatch.delenv("XMLIR_CUDNN_ENABLED")
    monkeypatch.setattr(acc, "set_device", lambda local_rank: None)  # no XPU here
    shutdown_distributed()
    init_distributed(accelerator=acc, backend="gloo", environ={})
    try:
        assert os.environ["BKCL_TREE_THRESHOLD"] == "7"
        assert os.environ["XMLIR_CUDNN_ENABLED"] == "1"
    finally:
        shutdown_distributed()


def test_activation_installs_the_overrides_and_deactivation_removes_them(fake_xpytorch):
    acc = KunlunXpuAccelerator()
    try:
        assert acc.activate() == ["apply_rope", "rms_norm", "swiglu"]
        assert acc.activate() == ["apply_rope", "rms_norm", "swiglu"]  # idempotent
        assert {registry.implementation_of(op) for op in acc.kernel_overrides()} == {"kunlun"}
        assert registry.get_op("swiglu") is acc.kernel_overrides()["swiglu"]
        # CPU tensors are not on the Kunlun device: the override runs the reference.
        import forge_kernels

        x, w = torch.randn(2, 8), torch.randn(8)
        torch.testing.assert_close(
            forge_kernels.rms_norm(x, w), registry.get_reference("rms_norm")(x, w)
        )
        assert acc.kernel_overrides()["rms_norm"].fallback_calls == 1
    finally:
        acc.deactivate()
    assert {registry.implementation_of(op) for op in acc.kernel_overrides()} <= {
        "default",
        "reference",
    }


def test_deactivation_restores_the_override_that_replace_true_replaced(fake_xpytorch):
    acc = KunlunXpuAccelerator()
    theirs = registry.get_reference("swiglu")
    registry.override_op("swiglu", theirs, source="someone-else")
    try:
        acc.activate(replace=True)
        assert registry.implementation_of("swiglu") == "kunlun"
        acc.deactivate()
        assert registry.implementation_of("swiglu") == "someone-else"
        assert registry.get_op("swiglu") is theirs
        assert registry.implementation_of("rms_norm") in ("default", "reference")
    finally:
        acc.deactivate()
        registry.remove_override("swiglu")


def test_activation_refuses_to_replace_another_sources_override(fake_xpytorch):
    acc = KunlunXpuAccelerator()
    registry.override_op("swiglu", registry.get_reference("swiglu"), source="someone-else")
    try:
        with pytest.raises(ValueError, match="already overridden by 'someone-else'"):
            acc.activate()
        acc.deactivate()  # leaves the other source's override alone
        assert registry.implementation_of("swiglu") == "someone-else"
    finally:
        registry.remove_override("swiglu")
        acc.deactivate()
