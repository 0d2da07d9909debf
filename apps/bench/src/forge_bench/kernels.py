"""The kernels workload: forge-kernels' own benchmark scripts, run as subprocesses.

The scripts (``packages/forge-kernels/benchmarks/bench_*.py``) live in the repository, not in
the installed package: they are found next to ``forge_kernels``'s source folder in a checkout.
Each runs with its defaults on CUDA, or with ``--device cpu --smoke`` elsewhere (Triton
interpreted: the figures only show that the script works). On ``cuda:N`` a script is given that
one GPU through ``CUDA_VISIBLE_DEVICES`` (see :func:`cuda_visible_devices`): the scripts take the
default ``cuda`` device, and Triton launches on the *current* device whatever the tensors' index,
so an index passed to ``--device`` alone would not be enough. Their printed tables are kept as
they are and shown under the main table. On a GPU they run one after another once the model
workloads are done (so nothing else competes for the device); on CPU, where their figures say
nothing about speed, they run beside the model workloads to keep ``--smoke`` short.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KernelResult",
    "RunningScript",
    "cuda_visible_devices",
    "find_scripts",
    "finish_script",
    "start_script",
    "stop_script",
]

#: Scripts that --smoke runs by default: the quickest one checks the plumbing in seconds.
SMOKE_SCRIPTS = ("bench_fused_linear_cross_entropy",)


@dataclass(frozen=True, kw_only=True)
class KernelResult:
    script: str
    seconds: float
    error: str | None
    output: str


def scripts_dir() -> Path | None:
    """``packages/forge-kernels/benchmarks`` of the checkout forge_kernels is imported from."""
    import forge_kernels

    # .../packages/forge-kernels/src/forge_kernels/__init__.py -> .../packages/forge-kernels
    folder = Path(forge_kernels.__file__).resolve().parents[2] / "benchmarks"
    return folder if folder.is_dir() else None


def find_scripts() -> tuple[list[Path], str | None]:
    """The benchmark scripts, or ``([], reason)`` when there is no repository checkout."""
    folder = scripts_dir()
    if folder is None:
        return [], (
            "forge-kernels' benchmarks/ folder is not next to the imported forge_kernels "
            "(installed from a wheel?): run forge-bench from a repository checkout"
        )
    scripts = sorted(folder.glob("bench_*.py"))
    if not scripts:
        return [], f"no bench_*.py scripts in {folder}"
    return scripts, None


def script_args(script: Path, *, device_type: str) -> list[str]:
    """Command-line options for ``script``: defaults on CUDA; tiny CPU sizes otherwise."""
    if device_type == "cuda":
        return []
    args = ["--device", "cpu", "--smoke"]
    if "--no-compile" in script.read_text():  # torch.compile on CPU takes longer than the run
        args.append("--no-compile")
    return args


def cuda_visible_devices(index: int, inherited: str | None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` that shows a subprocess only ``cuda:index`` of this process.

    ``index`` counts within what this process sees, so with an inherited
    ``CUDA_VISIBLE_DEVICES="4,6"`` ``cuda:1`` is entry ``"6"`` (a GPU number or UUID, passed on
    as written); without one it is GPU ``index`` itself.
    """
    if index < 0:
        raise ValueError(f"a CUDA device index is >= 0, got cuda:{index}")
    if inherited is None:
        return str(index)
    entries = [e.strip() for e in inherited.split(",") if e.strip()]
    if index >= len(entries):
        raise ValueError(
            f"--device cuda:{index}, but CUDA_VISIBLE_DEVICES={inherited!r} makes "
            f"{len(entries)} GPU(s) visible (cuda:0 to cuda:{len(entries) - 1}): pick one of "
            "those or widen CUDA_VISIBLE_DEVICES"
        )
    return entries[index]


@dataclass(kw_only=True)
class RunningScript:
    """A started script: :func:`start_script`'s handle for :func:`finish_script`."""

    script: Path
    proc: subprocess.Popen
    started: float


def start_script(script: Path, *, device: str) -> RunningScript:
    """Start one script in a subprocess, capturing its output.

    ``device`` is forge-bench's ``--device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``): on CPU the
    script runs at smoke size with Triton interpreted; on ``cuda:N`` it sees that GPU only
    (as its ``cuda:0``), so its kernels, timings, memory figures and peak lookup are that GPU's.
    """
    device_type, _, index = device.partition(":")
    env = dict(os.environ)
    if device_type != "cuda":
        env["TRITON_INTERPRET"] = "1"
    elif index:
        env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices(
            int(index), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
    env["PYTHONPATH"] = os.pathsep.join([*sys.path[1:], env.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    cmd = [sys.executable, str(script), *script_args(script, device_type=device_type)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return RunningScript(script=script, proc=proc, started=time.perf_counter())


def finish_script(
    running: RunningScript, *, timeout_s: float, budget_s: float | None = None
) -> KernelResult:
    """Wait for a started script: killed after ``timeout_s`` from its start, or earlier when
    the run's ``--deadline`` leaves only ``budget_s`` seconds from now. Killed as well if this
    process is interrupted while waiting (SIGTERM, Ctrl-C), before the exception goes on."""
    elapsed = time.perf_counter() - running.started
    wait = max(1.0, timeout_s - elapsed)
    by_deadline = budget_s is not None and budget_s < wait
    if by_deadline:
        wait = max(0.0, budget_s)
    try:
        stdout, stderr = running.proc.communicate(timeout=wait)
    except subprocess.TimeoutExpired:
        running.proc.kill()
        stdout, _ = running.proc.communicate()
        seconds = time.perf_counter() - running.started
        error = (
            f"stopped at the run's --deadline after {seconds:.0f} s"
            if by_deadline
            else f"timed out after {timeout_s:.0f} s"
        )
        return KernelResult(script=running.script.name, seconds=seconds, output=stdout,
                            error=error)  # fmt: skip
    except BaseException:
        stop_script(running)
        raise
    seconds = time.perf_counter() - running.started
    code = running.proc.returncode
    error = None
    if code:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        error = f"exit code {code}: {last[:200]}"
    output = stdout + (stderr if code else "")
    return KernelResult(script=running.script.name, seconds=seconds, error=error, output=output)


def stop_script(running: RunningScript) -> None:
    """Kill a started script that is still running (the run is being cut short)."""
    if running.proc.poll() is None:
        running.proc.kill()
        running.proc.wait()
