"""Test harness for Forge and for users' own distributed code (see forge-core's README).

:mod:`forge_core.testing.conformance` is the suite every accelerator plugin must pass.
"""

from forge_core.testing import conformance
from forge_core.testing.fake_process_group import fake_process_group
from forge_core.testing.modules import import_path
from forge_core.testing.worker_pool import WorkerError, WorkerPool, preload_in_workers

__all__ = [
    "WorkerError",
    "WorkerPool",
    "conformance",
    "fake_process_group",
    "import_path",
    "preload_in_workers",
]
