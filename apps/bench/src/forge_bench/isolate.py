"""Run each implementation in a process of its own, so that its peak memory is its own and a
crash, an out-of-memory error or a hang becomes one row of the table instead of ending the run.

The default start method is ``forkserver``: a server process started once (CUDA never
initialized in it) imports torch, the forge packages and, where installed, transformers; each
job is then a fresh process forked from it, which saves re-importing them per row (seconds each
on a small machine). ``spawn`` starts every job from a new interpreter instead. Either way the
parent sees only the result dictionary, or ``{"error": ...}``.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback
from multiprocessing.connection import Connection

__all__ = ["JobRunner"]

#: Imported once by the fork server (a missing optional one is skipped by multiprocessing):
#: the worker, what the first optimizer step imports (torch._dynamo: seconds), and the peers'
#: model modules.
PRELOAD = [
    "forge_bench.worker",
    "torch._dynamo",
    "transformers",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen3_moe.modeling_qwen3_moe",
]


def _child(conn: Connection, job) -> None:
    from forge_bench.worker import run_job

    try:
        result = run_job(job)
    except BaseException as exc:  # report everything, then exit: the parent must not hang
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}{where}"}
        try:
            import torch

            if torch.cuda.is_initialized():
                result["peak_bytes"] = torch.cuda.max_memory_allocated()
        except Exception:
            pass
    conn.send(result)
    conn.close()


class JobRunner:
    """Runs :class:`forge_bench.worker.Job` objects one at a time, each in a new process."""

    def __init__(self, *, start_method: str = "forkserver", timeout_s: float = 900.0) -> None:
        if start_method not in ("forkserver", "spawn"):
            raise ValueError(f"start method must be 'forkserver' or 'spawn', got {start_method!r}")
        self.timeout_s = timeout_s
        if start_method == "forkserver":
            # Let the server ask NVML, not the CUDA driver, whether there is a GPU: a server
            # that initialized CUDA would hand a broken CUDA state to every forked child.
            os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
            multiprocessing.set_forkserver_preload(PRELOAD)
        self.ctx = multiprocessing.get_context(start_method)

    def start(self) -> None:
        """Start the fork server now (it imports torch while the caller does other work)."""
        if self.ctx.get_start_method() == "forkserver":
            from multiprocessing import forkserver

            forkserver.ensure_running()

    def run(self, job, *, timeout_s: float | None = None) -> dict:
        """Run ``job`` in a new process; ``{"error": ...}`` if it fails, crashes or runs past
        ``timeout_s`` (default: the runner's), in which case it is killed at once. If this
        process is interrupted meanwhile (SIGTERM, Ctrl-C), the job is killed before the
        exception goes on, so that no orphan keeps the GPU."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(writer, job), daemon=True)
        proc.start()
        writer.close()
        result = None
        try:
            if not reader.poll(timeout_s):
                _stop(proc)
                return {"error": f"timed out after {timeout_s:.0f} s"}
            try:
                result = reader.recv()
            except EOFError:  # the child died before sending (killed, segfault)
                result = None
            # It has sent its result (or died): it only has its exit (CUDA teardown) left.
            proc.join(timeout=EXIT_GRACE_S)
        except BaseException:
            _stop(proc)
            raise
        finally:
            reader.close()
        if proc.is_alive():
            _stop(proc)
        if result is None:
            return {"error": f"process exited with code {proc.exitcode} before reporting "
                             "(killed for memory, or a crash in native code)"}  # fmt: skip
        return result


#: How long a job that has reported may take to exit before it is killed.
EXIT_GRACE_S = 30.0
#: How long a job asked to stop (SIGTERM) gets before SIGKILL.
KILL_GRACE_S = 3.0


def _stop(proc) -> None:
    """End a job that missed its time or is no longer wanted: SIGTERM, a short wait, SIGKILL.
    (Waiting for a hung job to exit by itself, as this once did for 30 s, only burned the
    budget of the next rows.)"""
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=KILL_GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
