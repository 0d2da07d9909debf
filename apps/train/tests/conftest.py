"""forge-train's tests run forge-kernels' eager references (see ``tiny_run.reference_kernels``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from forge_core.testing import import_path

tiny = import_path(Path(__file__).with_name("tiny_run.py"), "forge_train_tests_tiny_run")


@pytest.fixture(autouse=True)
def _reference_kernels():
    with tiny.reference_kernels():
        yield
