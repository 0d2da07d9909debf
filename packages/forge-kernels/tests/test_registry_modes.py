"""The registry's implementation modes: the reference / default blocks nest, reach child
processes (through the environment), and restore what was there."""

from __future__ import annotations

import os

import forge_kernels  # noqa: F401  (defines the ops)
from forge_kernels import registry


def test_modes_nest_and_restore(monkeypatch):
    monkeypatch.delenv(registry.IMPL_ENV_VAR, raising=False)
    assert registry.implementation_of("rms_norm") == "default"
    with registry.reference_implementations():
        assert registry.implementation_of("rms_norm") == "reference"
        with registry.default_implementations():
            assert registry.implementation_of("rms_norm") == "default"
            assert registry.IMPL_ENV_VAR not in os.environ
        assert registry.implementation_of("rms_norm") == "reference"
    assert registry.implementation_of("rms_norm") == "default"
    assert registry.IMPL_ENV_VAR not in os.environ


def test_default_block_restores_a_preset_environment(monkeypatch):
    monkeypatch.setenv(registry.IMPL_ENV_VAR, "Reference")
    with registry.default_implementations():
        assert registry.implementation_of("rms_norm") == "default"
        assert registry.IMPL_ENV_VAR not in os.environ  # child processes see it too
    assert os.environ[registry.IMPL_ENV_VAR] == "Reference"
    assert registry.implementation_of("rms_norm") == "reference"


def test_overrides_win_over_both_modes(monkeypatch):
    monkeypatch.delenv(registry.IMPL_ENV_VAR, raising=False)
    with registry.overridden("rms_norm", registry.get_reference("rms_norm"), source="vendor"):
        for mode in (registry.reference_implementations, registry.default_implementations):
            with mode():
                assert registry.implementation_of("rms_norm") == "vendor"
