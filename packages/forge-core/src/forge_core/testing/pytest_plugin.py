"""Pytest fixtures of the Forge test harness (enabled by ``pytest_plugins`` in the root conftest).

- ``dist_pool``: ``dist_pool(world_size)`` returns a :class:`WorkerPool` of that size, started
  on first use and kept alive for the whole session. Tests using it are marked
  ``multiprocess`` automatically, so ``pytest -m "not multiprocess"`` skips them.
- ``fake_pg``: ``with fake_pg(world_size=..., rank=...):`` simulated process group.
"""

from __future__ import annotations

import pytest

from forge_core.testing.fake_process_group import fake_process_group
from forge_core.testing.worker_pool import WorkerPool


class PoolSet:
    """Worker pools by world size, created lazily and restarted if a job broke one."""

    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def __call__(self, world_size: int) -> WorkerPool:
        pool = self._pools.get(world_size)
        if pool is None or not pool.alive:
            if pool is not None:
                pool.close()  # stop the survivors of a broken pool before replacing it
            pool = WorkerPool(world_size)
            self._pools[world_size] = pool
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


@pytest.fixture(scope="session")
def dist_pool():
    pools = PoolSet()
    yield pools
    pools.close()


@pytest.fixture
def fake_pg():
    return fake_process_group


def pytest_configure(config) -> None:
    """Register the ``multiprocess`` marker this plugin adds, so a project that enables the
    plugin without declaring the marker itself gets no unknown-mark warning, and no
    collection error under ``--strict-markers``."""
    config.addinivalue_line(
        "markers",
        "multiprocess: runs on the persistent gloo worker pool (deselect with -m 'not multiprocess')",
    )


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "dist_pool" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multiprocess)
