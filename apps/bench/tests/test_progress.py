"""A run cut off from outside keeps what it measured: ``--deadline`` skips the rows that no
longer fit (and reports them), ``--record`` is rewritten after every row without ever losing the
file's earlier sections, SIGTERM writes what is done and exits non-zero, and a job past its
timeout is killed at once. The jobs are faked (no model runs), the clock too where time matters,
so every test here takes seconds."""

from __future__ import annotations

import multiprocessing
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from forge_bench import cli, isolate, progress, worker
from forge_bench.isolate import JobRunner
from forge_bench.peers import find_peers
from forge_bench.plan import Impl, llm_cases, moe_cases
from forge_bench.record import Record
from forge_bench.table import Row
from forge_bench.worker import Job

OLD = "# Benchmarks\n\n## 2020-01-01, some GPU\n\nold row 1\nold row 2\n"
RESULT = {"tokens_per_s": 1234.0, "peak_bytes": None, "loss_first": 2.5, "loss_last": 2.25,
          "notes": ["fake job"]}  # fmt: skip
ARGS = ["--smoke", "--workloads", "llm", "--start-method", "spawn"]


class FakeClock:
    """:data:`forge_bench.progress.clock`, moved on by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_jobs(monkeypatch):
    """No weights are saved and no job process starts: each job "takes" ``job_s`` seconds on a
    fake clock (and ``save_s`` for saving the weights); ``calls`` records each job's name and
    time limit, and ``on_job`` (if set) runs at the start of each."""
    state = {"clock": FakeClock(), "job_s": 0.0, "save_s": 0.0, "calls": [], "on_job": None}
    monkeypatch.setattr(progress, "clock", state["clock"])

    def save(config, dtype, folder):
        state["clock"].now += state["save_s"]
        return "-"

    def run(self, job, *, timeout_s=None):
        if state["on_job"]:
            state["on_job"]()
        state["calls"].append((job.impl.name, timeout_s))
        state["clock"].now += state["job_s"]
        return dict(RESULT)

    monkeypatch.setattr(cli, "_save_weights", save)
    monkeypatch.setattr(JobRunner, "run", run)
    return state


def _lines(out: str, impl: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.startswith("llm ") and f" {impl} " in f"{ln} "]


def test_deadline_skips_the_rows_whose_timeout_no_longer_fits(fake_jobs, capsys):
    fake_jobs["job_s"] = 40.0
    code = cli.main([*ARGS, "--timeout", "30", "--deadline", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    # 100 s left: run (30 s allowed); 60 left: run; 20 left < --timeout 30: the rest skipped.
    assert [t for _, t in fake_jobs["calls"]] == [30.0, 30.0]
    assert _lines(out, "forge")[0].split()[4] == "1,234"
    skipped = [ln for ln in out.splitlines() if "skipped: deadline" in ln and ln.startswith("llm")]
    assert skipped, out
    assert all("deadline (20 s left of 100, a row may take --timeout 30)" in ln for ln in skipped)
    assert any(" forge +recompute " in ln for ln in skipped)  # reported, not dropped
    assert "row(s) not started" in out
    assert "(incomplete" not in out


def test_a_running_row_gets_at_most_what_the_deadline_leaves(fake_jobs, capsys):
    fake_jobs["save_s"], fake_jobs["job_s"] = 75.0, 10.0  # the save eats the budget
    code = cli.main([*ARGS, "--timeout", "30", "--deadline", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert fake_jobs["calls"] == [("forge", 25.0)]  # 100 - 75 left when it started
    assert "deadline (15 s left of 100" in out


def test_a_deadline_that_leaves_time_for_no_row_exits_non_zero(fake_jobs, capsys):
    # The first row is admitted (30 s left, --timeout 30), saving its weights takes all 30 s:
    # it and every row after it are skipped, nothing is measured, and the exit status says so
    # (it was 0, which a CI job or the GPU session script reads as success).
    fake_jobs["save_s"] = 30.0
    code = cli.main([*ARGS, "--timeout", "30", "--deadline", "30"])
    out = capsys.readouterr().out
    assert fake_jobs["calls"] == [], out
    assert "llm llama-tiny 2x64: forge skipped: deadline (0 s left of 30" in out
    assert code == cli.EXIT_NOTHING_MEASURED == 3, out
    assert "no row was measured" in out


@pytest.mark.parametrize(
    ("statuses", "stopped", "received", "expected"),
    [
        (["ok", "skipped: transformers not installed"], None, False, 0),  # a missing peer
        (["ok", "skipped: deadline (20 s left of 100, ...)"], None, False, 0),  # partial
        (["ok", "error: CUDA out of memory"], None, False, 1),
        (["skipped: deadline (0 s left of 30, ...)", "error: timed out"], None, False, 1),
        (["skipped: deadline (0 s left of 30, ...)"] * 3, None, False, 3),
        (["skipped: transformers not installed"], None, False, 3),
        ([], None, False, 3),  # e.g. --workloads kernels without a checkout's scripts
        (["ok"], "stopped by SIGTERM after 5 s", False, 143),
        (["ok"], "stopped by Ctrl-C after 5 s", False, 130),
        ([], "stopped by SIGTERM after 5 s", False, 143),  # stopped before a row finished
        (["ok"], None, True, 143),  # SIGTERM while the results were being written
    ],
)
def test_exit_status(statuses, stopped, received, expected):
    done = [Row(workload="llm", case="c", impl=f"i{n}", status=s) for n, s in enumerate(statuses)]
    assert cli.exit_status(done, stopped=stopped, sigterm_received=received) == expected


def test_list_rows_prints_the_plan_and_runs_nothing(fake_jobs, capsys):
    """``--list-rows`` is the plan a run follows (what tools/device/session.sh counts to size
    its per-row --timeout): one tab-separated line per row, 'run' or the skip reason."""
    code = cli.main([*ARGS, "--workloads", "llm,moe", "--list-rows"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert fake_jobs["calls"] == []  # nothing ran
    peers = find_peers(device_type="cpu")
    cases = llm_cases(sizes=[], seqs=[], peers=peers, smoke=True)
    cases += moe_cases(seqs=[], peers=peers, smoke=True)
    expected = [
        (case.workload, f"{case.label} {case.rows}x{case.seq}", impl.name,
         "run" if impl.skip is None else f"skipped: {impl.skip}")
        for case in cases for impl in case.impls
    ]  # fmt: skip
    assert [tuple(line.split("\t")) for line in out.splitlines()] == expected, out


def test_an_unknown_kernel_script_is_refused(fake_jobs, capsys):
    """A misspelled --kernel-scripts name was skipped silently beside the scripts it did find."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["--smoke", "--workloads", "kernels", "--kernel-scripts",
                  "bench_fused_linear_cross_entropy,bench_rmsnrom", "--list-rows"])  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "names no benchmark script ['bench_rmsnrom']" in err, err
    assert "bench_fused_linear_cross_entropy" in err.split("choose from:")[1]
    assert fake_jobs["calls"] == []


def test_a_deadline_below_the_timeout_is_refused(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--timeout", "200", "--deadline", "150"])
    assert "--deadline 150 is less than --timeout 200" in capsys.readouterr().err


def test_the_record_is_rewritten_after_every_row_and_keeps_the_old_sections(
    fake_jobs, tmp_path, capsys
):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text(OLD)
    seen = []
    fake_jobs["on_job"] = lambda: seen.append(record.read_text())
    code = cli.main([*ARGS, "--record", str(record)])
    out = capsys.readouterr().out
    assert code == 0, out
    ran = len(fake_jobs["calls"])
    assert ran >= 3, out
    for n, text in enumerate(seen):  # as each job starts: n rows done, the rest to come
        assert text.startswith(OLD)
        assert text.count("\n## ") == 2  # the old section and this run's, rewritten in place
        assert f"(incomplete: {ran - n} rows not run yet)" in text, text
        assert text.count("1,234") == n
    final = record.read_text()
    assert final.startswith(OLD)
    assert final.count("\n## ") == 2
    assert "incomplete" not in final
    assert final.count("1,234") == ran
    assert "forge-bench --smoke --workloads llm" in final
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]  # no temporary left


def test_an_interrupted_record_write_leaves_the_old_file(tmp_path, monkeypatch):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text(OLD)
    real_open = pathlib.Path.open

    class DiskFull:
        """Writes half of what it is given, then fails (a full disk, a kill mid-write)."""

        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def faulty_open(self, mode="r", *args, **kwargs):
        f = real_open(self, mode, *args, **kwargs)
        return DiskFull(f) if set(mode) & set("wax") else f

    monkeypatch.setattr(pathlib.Path, "open", faulty_open)
    section = Record(record, env={"device": "GPU", "torch": "2"}, command="forge-bench")
    with pytest.raises(OSError, match="No space left"):
        section.write("a new table\n" * 100)
    monkeypatch.undo()
    assert record.read_text() == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]


#: forge-bench's main with fake jobs: the first row finishes at once, the second hangs. The
#: worker module (forge_parallel pulls in torch._dynamo: seconds) and the version lookup
#: (imports transformers) are stood in for, to keep the subprocess's start short.
DRIVER = textwrap.dedent(
    """
    import sys, time, types

    worker = types.ModuleType("forge_bench.worker")
    worker.DTYPES = {"float32": None, "bfloat16": None}
    worker.Job = lambda **fields: types.SimpleNamespace(**fields)
    sys.modules["forge_bench.worker"] = worker

    from forge_bench import cli, isolate, record

    calls = []

    def run(self, job, *, timeout_s=None):
        calls.append(job.impl.name)
        if len(calls) == 2:
            print("SECOND ROW RUNNING", flush=True)
            time.sleep(120)
        return {"tokens_per_s": 1234.0, "peak_bytes": None, "loss_first": 2.5,
                "loss_last": 2.25, "notes": ["fake job"]}

    isolate.JobRunner.run = run
    cli._save_weights = lambda config, dtype, folder: "-"
    record.environment = lambda device: {"device": "CPU (fake)", "torch": "x"}
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.multiprocess
def test_sigterm_writes_the_finished_rows_and_exits_non_zero(tmp_path):
    record = tmp_path / "BENCHMARKS.md"
    record.write_text(OLD)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *ARGS, "--record", str(record)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # the first row is done and recorded once the second starts
            lines.append(line)
            if "SECOND ROW RUNNING" in line:
                break
        assert "SECOND ROW RUNNING" in (lines or [""])[-1], "".join(lines)
        proc.send_signal(signal.SIGTERM)
        out = "".join(lines) + proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, out
    text = record.read_text()
    assert text.startswith(OLD)
    assert text.count("1,234") == 1, text  # the first row's figures
    assert "error: stopped by SIGTERM after" in text
    assert "(incomplete: stopped by SIGTERM after" in text
    assert "rows not run)" in text
    assert "error: stopped by SIGTERM after" in out  # the printed table too
    assert "1,234" in out


def _hang_ignoring_sigterm(job):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)


@pytest.mark.multiprocess
def test_a_job_past_its_timeout_is_killed_at_once(monkeypatch):
    monkeypatch.setattr(worker, "run_job", _hang_ignoring_sigterm)
    runner = JobRunner(start_method="spawn", timeout_s=1.0)
    runner.ctx = multiprocessing.get_context("fork")  # the child sees the patched run_job
    job = Job(impl=Impl(name="forge", runner="forge"), hf_dir="-", moe=False, rows=1, seq=1,
              vocab_size=1, device="cpu", dtype="float32", warmup=0, steps=1)  # fmt: skip
    before = {p.pid for p in multiprocessing.active_children()}  # e.g. a worker pool's
    started = time.monotonic()
    assert runner.run(job) == {"error": "timed out after 1 s"}
    # SIGTERM, KILL_GRACE_S (3 s), SIGKILL: not another 30 s of waiting for it to exit.
    assert time.monotonic() - started < 1.0 + isolate.KILL_GRACE_S + 3.0
    left = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
    assert left == [], f"the timed-out job's process is still alive: {left}"
