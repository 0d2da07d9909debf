"""The worker pool's fork server has forge-train's stack imported (conftest's
``preload_in_workers``): a freshly started worker, like one restarted after many meshes, has it
loaded before its first job instead of importing it then (seconds per rank)."""

from __future__ import annotations

import sys

from forge_core.testing import WorkerPool

_STACK = ("hydra", "forge_models", "forge_parallel", "forge_train.trainer", "torch._dynamo")


def _loaded(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a worker holds before importing anything for this job."""
    return [name for name in names if name in sys.modules]


def test_a_fresh_worker_starts_with_the_training_stack_imported():
    with WorkerPool(1) as pool:  # not the shared pool: its workers have run jobs already
        assert pool.run(_loaded, _STACK) == [list(_STACK)]
