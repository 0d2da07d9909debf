"""The package imports on its own and reports the version its pyproject.toml declares."""

from __future__ import annotations

import tomllib
from pathlib import Path

import forge_models


def test_version_matches_pyproject():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert forge_models.__version__ == pyproject["project"]["version"]
