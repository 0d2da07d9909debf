"""Test harness for Forge and for users' own distributed code (see forge-core's README)."""

from forge_core.testing.fake_process_group import fake_process_group
from forge_core.testing.worker_pool import WorkerError, WorkerPool

__all__ = ["WorkerError", "WorkerPool", "fake_process_group"]
