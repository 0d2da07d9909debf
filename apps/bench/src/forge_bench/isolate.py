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

    def run(self, job) -> dict:
        reader, writer = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_child, args=(writer, job), daemon=True)
        proc.start()
        writer.close()
        result = None
        if reader.poll(self.timeout_s):
            try:
                result = reader.recv()
            except EOFError:  # the child died before sending (killed, segfault)
                result = None
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
            if result is None:
                return {"error": f"timed out after {self.timeout_s:.0f} s"}
        if result is None:
            return {"error": f"process exited with code {proc.exitcode} before reporting "
                             "(killed for memory, or a crash in native code)"}  # fmt: skip
        return result
