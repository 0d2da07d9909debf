"""Accelerator registry: built-ins, entry-point plugins (found lazily), duplicates, selection."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from forge_core import backends
from forge_core.accelerator import Accelerator, CpuAccelerator

PLUGIN_MODULE = "forge_test_plugin_acme"


def _install_plugin(
    root: Path, *, dist_name: str, backend_name: str, module: str, body: str
) -> None:
    """Lay out an installed distribution (dist-info with entry_points.txt) plus its module,
    exactly as pip would, under ``root`` (which the caller puts on sys.path)."""
    info = root / f"{dist_name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        f"[forge.backends]\n{backend_name} = {module}:make_accelerator\n"
    )
    (root / f"{module}.py").write_text(textwrap.dedent(body))


ACME_BODY = """
    from forge_core.accelerator import Capabilities, CpuAccelerator

    class AcmeAccelerator(CpuAccelerator):
        name = "acme"
        dist_backend = "gloo"
        capabilities = Capabilities(bf16=True, fp16=True, fp8=True)

        def kernel_overrides(self):
            return {"rms_norm": lambda *args, **kwargs: "acme rms_norm"}

        def environment_defaults(self):
            return {"ACME_FAST_MATH": "1"}

    def make_accelerator():
        return AcmeAccelerator()
"""


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A site directory on sys.path for fake installed distributions; cleaned up after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("forge_test_plugin")]:
        del sys.modules[name]
    backends._instances.clear()
    backends.set_accelerator(None)


def test_builtins_are_always_there():
    assert {"cpu", "cuda"} <= set(backends.available_backends())
    cpu = backends.get_backend("cpu")
    assert isinstance(cpu, CpuAccelerator)
    assert backends.get_backend("cpu") is cpu  # cached
    assert cpu.device() == torch.device("cpu")
    assert cpu.dist_backend == "gloo"


def test_plugin_is_discovered_without_import_and_loaded_on_use(plugin_site):
    _install_plugin(
        plugin_site,
        dist_name="forge-acme",
        backend_name="acme",
        module=PLUGIN_MODULE,
        body=ACME_BODY,
    )
    assert "acme" in backends.available_backends()
    assert PLUGIN_MODULE not in sys.modules  # discovery read metadata only
    acme = backends.get_backend("acme")
    assert PLUGIN_MODULE in sys.modules
    assert isinstance(acme, Accelerator)
    assert acme.capabilities.fp8
    assert acme.name == "acme"
    assert acme.kernel_overrides()["rms_norm"]() == "acme rms_norm"
    assert backends.set_accelerator("acme") is acme
    assert backends.current_accelerator() is acme


def test_env_var_selects_a_plugin(plugin_site, monkeypatch):
    _install_plugin(
        plugin_site,
        dist_name="forge-acme",
        backend_name="acme",
        module=PLUGIN_MODULE,
        body=ACME_BODY,
    )
    backends.set_accelerator(None)
    monkeypatch.setenv("FORGE_ACCELERATOR", "acme")
    assert backends.current_accelerator().name == "acme"


def test_plugin_reusing_a_builtin_name_is_rejected(plugin_site):
    _install_plugin(
        plugin_site,
        dist_name="forge-evil",
        backend_name="cuda",
        module=PLUGIN_MODULE,
        body=ACME_BODY,
    )
    with pytest.raises(
        ValueError, match=r"'cuda' is already taken by forge_core \(built-in\).*forge-evil"
    ):
        backends.available_backends()


def test_two_distributions_with_the_same_backend_name_are_rejected(plugin_site):
    _install_plugin(
        plugin_site / "a",
        dist_name="forge-acme",
        backend_name="acme",
        module=PLUGIN_MODULE,
        body=ACME_BODY,
    )
    _install_plugin(
        plugin_site / "b",
        dist_name="forge-acme-fork",
        backend_name="acme",
        module=PLUGIN_MODULE + "_fork",
        body=ACME_BODY,
    )
    sys.path[:0] = [str(plugin_site / "a"), str(plugin_site / "b")]
    try:
        with pytest.raises(
            ValueError, match=r"two installed distributions register the Forge backend 'acme'"
        ):
            backends.get_backend("acme")
    finally:
        sys.path.remove(str(plugin_site / "a"))
        sys.path.remove(str(plugin_site / "b"))


def test_register_backend_rejects_duplicates_and_unregisters():
    class Scratch(CpuAccelerator):
        name = "scratch"

    backends.register_backend("scratch", Scratch)
    try:
        with pytest.raises(ValueError, match="'scratch' is already taken by register_backend"):
            backends.register_backend("scratch", Scratch)
        with pytest.raises(ValueError, match="'cpu' is already taken"):
            backends.register_backend("cpu", Scratch)
        assert backends.get_backend("scratch").name == "scratch"
    finally:
        backends.unregister_backend("scratch")
    assert "scratch" not in backends.available_backends()


def test_broken_plugins_fail_with_the_reason(plugin_site):
    _install_plugin(
        plugin_site,
        dist_name="forge-broken",
        backend_name="broken",
        module=PLUGIN_MODULE,
        body="import acme_vendor_runtime_missing\n",
    )
    with pytest.raises(
        ImportError,
        match=r"could not import the Forge backend 'broken'.*acme_vendor_runtime_missing",
    ):
        backends.get_backend("broken")
    (plugin_site / "forge_test_plugin_wrong.py").write_text(
        "def make_accelerator():\n    return object()\n"
    )
    backends.register_backend(
        "wrong", importlib.import_module("forge_test_plugin_wrong").make_accelerator
    )
    try:
        with pytest.raises(TypeError, match=r"not a forge_core\.Accelerator"):
            backends.get_backend("wrong")
    finally:
        backends.unregister_backend("wrong")


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(KeyError, match="no Forge backend named 'nope'"):
        backends.get_backend("nope")

    class Absent(CpuAccelerator):
        name = "absent"

        def is_available(self):
            return False

    backends.register_backend("absent", Absent)
    try:
        with pytest.raises(RuntimeError, match="'absent' accelerator, but it is not available"):
            backends.set_accelerator("absent")
    finally:
        backends.unregister_backend("absent")


def test_auto_selection_falls_back_to_cpu_without_a_gpu(monkeypatch):
    monkeypatch.delenv("FORGE_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backends.set_accelerator(None)
    try:
        assert backends.current_accelerator().name == "cpu"
    finally:
        backends.set_accelerator(None)


def test_importing_forge_core_imports_no_plugin_or_optional_dependency():
    import subprocess

    code = (
        "import sys, forge_core, forge_core.collectives, forge_core.backends as b; b.available_backends();"
        "bad = [m for m in ('forge_test_plugin_acme', 'triton', 'forge_kernels') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cpu_accelerator_memory_and_rng_round_trip():
    cpu = backends.get_backend("cpu")
    stats = cpu.memory_stats()
    assert stats["allocated"] > 0
    assert stats["peak_allocated"] >= stats["allocated"] // 2
    cpu.manual_seed(3)
    state = cpu.get_rng_state()
    a = torch.rand(3)
    cpu.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))
