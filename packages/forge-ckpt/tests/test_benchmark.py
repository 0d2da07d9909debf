"""``benchmarks/bench_checkpoint.py --smoke`` runs every part and prints its table.

The benchmark runs in this process (its imports are paid once per test session). Its HF part
loads each checkpoint in a fresh process (``--load-once``); here ``subprocess.run`` runs that
same command line through the script's own ``main`` in this process instead, so the test
checks the command line, the loaders and the parsing of their results without the seconds of
imports each fresh process costs.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_checkpoint.py"


@pytest.fixture(scope="module")
def bench():
    for module in ("forge_core", "forge_models", "forge_parallel", "transformers"):
        pytest.importorskip(module)  # the HF and sharded-load parts use them
    from forge_core.testing import import_path

    return import_path(BENCH, "forge_ckpt_bench_checkpoint")


def _rows(out: str) -> dict[str, list[float]]:
    """The table's rows: case (without the model size, "(3M)") -> [GB, seconds, GB/s, x
    baseline]."""
    rows = {}
    for line in out.splitlines():
        found = re.match(r"(\S.*?)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
        if found and found.group(2) != "GB":
            try:
                case = re.sub(r" \(\d+M\)", "", found.group(1))
                rows[case] = [float(x) for x in found.groups()[1:]]
            except ValueError:
                continue
    return rows


def _in_process(bench, launched: list[list[str]]):
    """A ``subprocess.run`` that runs ``[python, bench_checkpoint.py, *args]`` in-process."""

    def run(cmd, **kwargs):
        assert cmd[:2] == [sys.executable, bench.__file__], cmd
        launched.append(cmd[2:])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            bench.main(cmd[2:])
        return subprocess.CompletedProcess(cmd, 0, stdout=out.getvalue(), stderr="")

    return run


def test_smoke_run_prints_every_part(bench, monkeypatch, capsys, tmp_path):
    launched: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", _in_process(bench, launched))
    bench.main(["--smoke", "--dir", str(tmp_path)])
    rows = _rows(capsys.readouterr().out)
    for case in (
        "raw file write + fsync",
        "ckpt save (sync), first save",
        "ckpt async, later saves: until complete",
        "raw file read (cold)",
        "ckpt load (cold)",
        "forge_models.from_pretrained",
        "forge_models.from_pretrained(mmap=False) + read every weight",
        "transformers",
        "sharded load tp2xfsdp2 rank 1, warm, direct (preadv)",
    ):
        assert case in rows, case
    assert rows["raw file write + fsync"][3] == 1.0  # the baselines
    assert rows["transformers"][3] == 1.0
    # Every timed row has a positive time; byte counts are those of the files.
    assert all(r[1] > 0 for r in rows.values())
    assert rows["ckpt save (sync), first save"][0] == rows["raw file write + fsync"][0] > 0
    assert all(math.isnan(r[2]) for c, r in rows.items() if "training blocked" in c)
    # One fresh-process load per loader (repeats=1 in smoke mode), through --load-once.
    assert sorted(c[1] for c in launched) == ["forge", "forge-copy", "transformers"]
    assert all(c[0] == "--load-once" for c in launched)
    assert list(tmp_path.iterdir()) == []  # the scratch folder is removed
