"""The usage example in every package README really runs (in a fresh interpreter)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = sorted(ROOT.glob("packages/*/README.md"))


def _usage_example(readme: Path) -> str:
    text = readme.read_text()
    match = re.search(r"^## Usage\s*\n+```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, f"{readme.relative_to(ROOT)} has no python block right under '## Usage'"
    return match.group(1)


@pytest.mark.parametrize("readme", READMES, ids=lambda p: p.parent.name)
def test_usage_example_runs(readme, tmp_path):
    code = _usage_example(readme)
    assert len(code.strip().splitlines()) <= 16, "keep the README example short"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), "the example should print what it computed"
