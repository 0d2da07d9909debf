"""Accelerator plugins: the conformance suite on ``cpu`` and the in-repo ``testdev`` plugin
(a separate distribution, tests/plugins/forge-test-accelerator), and a tiny model trained
through a plugin's kernel override.

On hardware, check any installed plugin the same way (2 ranks by default)::

    FORGE_CONFORMANCE_BACKEND=kunlun uv run pytest tests/test_accelerator_conformance.py
    FORGE_CONFORMANCE_BACKEND=kunlun FORGE_CONFORMANCE_WORLD_SIZE=8 uv run pytest ...
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import forge_kernels
from forge_core import backends
from forge_core.accelerator import CpuAccelerator
from forge_core.testing import WorkerPool, conformance
from forge_kernels import registry
from forge_xpu.conformance import KERNEL_CASES, reference_for

EXTRA = os.environ.get(conformance.ENV_VAR)
BACKENDS = ["cpu", "testdev", *([EXTRA] if EXTRA and EXTRA not in ("cpu", "testdev") else [])]
WORLD_SIZE = int(os.environ.get("FORGE_CONFORMANCE_WORLD_SIZE", "2"))


@pytest.fixture(scope="module")
def own_pools():
    """Worker pools on a plugin's own backend (for backends other than gloo), by name."""
    pools: dict[str, WorkerPool] = {}
    yield pools
    for pool in pools.values():
        pool.close()


@pytest.fixture
def pool_for(dist_pool, own_pools):
    def get(backend_name: str):
        acc = backends.get_backend(backend_name)
        if acc.dist_backend == "gloo":
            return dist_pool(WORLD_SIZE)  # the session's shared gloo pool
        pool = own_pools.get(backend_name)
        if pool is None or not pool.alive:
            pool = own_pools[backend_name] = WorkerPool(WORLD_SIZE, backend=acc.dist_backend)
        return pool

    return get


# -- the conformance suite ---------------------------------------------------------------------


@pytest.mark.parametrize("check", list(conformance.CHECKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_device_conformance(backend, check):
    conformance.CHECKS[check](backends.get_backend(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_collectives_on_the_plugins_backend(backend, pool_for):
    pool = pool_for(backend)
    detail = conformance.check_collectives(pool, backend)
    assert "send/recv" in detail
    assert "all_to_all (uneven splits)" in detail


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_overrides_match_forge_kernels_references(backend):
    acc = backends.get_backend(backend)
    detail = conformance.check_kernel_overrides(
        acc, reference_for=reference_for, kernel_cases=KERNEL_CASES
    )
    if backend == "testdev":
        assert "rms_norm[float32]" in detail


def test_a_failing_plugin_fails_the_suite():
    class Broken(CpuAccelerator):
        name = "broken"

        def kernel_overrides(self):
            return {"swiglu": lambda gate, up: gate * up}  # forgot the silu

        def get_rng_state(self):
            return {"cpu": torch.get_rng_state()[:-1]}

    report = conformance.run_conformance(
        Broken(), reference_for=reference_for, kernel_cases=KERNEL_CASES
    )
    failed = {r.name for r in report.results if not r.passed}
    assert failed == {"rng_round_trip", "kernel_overrides"}, str(report)
    with pytest.raises(AssertionError, match=r"\[FAIL\] kernel_overrides"):
        report.raise_if_failed()


# -- the in-repo plugin, as its own distribution -----------------------------------------------


def test_testdev_is_found_through_its_entry_point_and_imported_only_on_use():
    code = (
        "import sys, forge_core.backends as b\n"
        "assert 'testdev' in b.available_backends()\n"
        "assert 'forge_test_accelerator' not in sys.modules\n"
        "acc = b.current_accelerator()\n"  # FORGE_ACCELERATOR=testdev
        "assert 'forge_test_accelerator' in sys.modules\n"
        "from importlib.metadata import distribution\n"
        "eps = distribution('forge-test-accelerator').entry_points\n"
        "print(acc.name, [(e.group, e.name, e.value) for e in eps])\n"
    )
    env = {**os.environ, "FORGE_ACCELERATOR": "testdev"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("testdev ")
    assert "('forge.backends', 'testdev', 'forge_test_accelerator:TestDeviceAccelerator')" in (
        result.stdout
    )


class TinyModel(nn.Module):
    """Linear -> RMSNorm blocks with residuals, a final norm and a linear head."""

    def __init__(self, dim: int = 16, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norms = nn.ParameterList(nn.Parameter(torch.ones(dim)) for _ in range(depth + 1))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, weight in zip(self.blocks, self.norms, strict=False):
            x = x + torch.tanh(block(forge_kernels.rms_norm(x, weight)))
        return self.head(forge_kernels.rms_norm(x, self.norms[-1]))


RMS_NORMS_PER_STEP = 4  # depth 3 + the final norm


def _train(steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = TinyModel()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_a_tiny_model_trains_through_the_plugins_override_with_the_same_losses():
    acc = backends.get_backend("testdev")
    assert registry.implementation_of("rms_norm") in ("default", "reference")
    baseline = _train()
    acc.reset_counts()
    assert acc.activate() == ["rms_norm"]
    try:
        assert registry.implementation_of("rms_norm") == "testdev"
        through_plugin = _train()
    finally:
        acc.deactivate()
    assert registry.implementation_of("rms_norm") in ("default", "reference")
    assert acc.calls["rms_norm"] == 5 * RMS_NORMS_PER_STEP
    torch.testing.assert_close(through_plugin, baseline, rtol=1e-6, atol=1e-6)
    assert baseline[-1] < baseline[0]  # it did train
