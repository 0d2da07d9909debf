"""A run's progress: which rows are done, the time ``--deadline`` leaves, and the partial results
shown after every row, so that a run cut off from outside keeps what it measured.

A GPU call on the lent machine has a time limit, and the ``timeout`` around forge-bench kills it
when it runs long. forge-bench used to print its table and write ``--record`` only at the very
end, so such a kill lost every row, the tokens/s and MFU already measured included. Now:

- every row prints a one-line summary as it finishes, and ``--record``'s section is rewritten
  (atomically, :class:`forge_bench.record.Record`) with the rows done so far and
  ``(incomplete: N rows not run yet)`` until the last one;
- ``--deadline S`` bounds the whole run: a row whose ``--timeout`` no longer fits in what is
  left is not started but reported as ``skipped: deadline (...)``, and a running row gets at
  most what is left;
- SIGTERM (what ``timeout`` sends) stops the running row, then the table and the record are
  written with what is done and forge-bench exits with status 143 (:func:`stop_on_sigterm`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

from forge_bench.table import Row, fill_ratios, format_table

__all__ = ["Progress", "SigtermGuard", "Stopped", "clock", "stop_on_sigterm"]

#: The run's clock (a module attribute so that tests can advance time without sleeping).
clock: Callable[[], float] = time.monotonic


class Stopped(BaseException):
    """Raised in the main thread when SIGTERM arrives. A ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it."""


class SigtermGuard:
    """While :attr:`raising`, the first SIGTERM raises :class:`Stopped` in the main thread (the
    running row is then stopped and the results written); afterwards, and once the results are
    being written, a SIGTERM is only noted in :attr:`received` so that the writing finishes."""

    def __init__(self) -> None:
        self.raising = True
        self.received = False

    def handle(self, signum: int, frame) -> None:
        self.received = True
        if self.raising:
            self.raising = False
            raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[SigtermGuard]:
    """Handle SIGTERM with a :class:`SigtermGuard` inside the block (main thread only: elsewhere
    Python cannot install handlers, and the guard never fires); the old handler comes back after."""
    guard = SigtermGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = signal.signal(signal.SIGTERM, guard.handle)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGTERM, previous)


class Progress:
    """The rows of one run and how far it got.

    ``rows`` is every row of the table, in table order, those already decided (skipped for a
    missing peer) included; ``pending`` the ones still to run. ``header`` heads the printed and
    recorded table; ``record`` (a :class:`forge_bench.record.Record` or ``None``) is rewritten
    by :meth:`save` after each row. ``started`` is the run's start on :data:`clock`, from which
    ``deadline_s`` (or ``None``: no bound) counts.
    """

    def __init__(
        self,
        *,
        rows: list[Row],
        pending: list[Row],
        header: list[str],
        record=None,
        timeout_s: float,
        deadline_s: float | None,
        started: float,
    ) -> None:
        self.rows = rows
        self.pending = {id(r) for r in pending}
        self.header = header
        self.record = record
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.started = started
        self.outputs: list[str] = []  # the kernel scripts' own tables, shown under ours
        self.current: Row | None = None
        self.current_since = 0.0
        self.stopped: str | None = None

    # -- the deadline ---------------------------------------------------------------------------

    def left(self) -> float | None:
        """Seconds the deadline leaves, or ``None`` without ``--deadline``."""
        if self.deadline_s is None:
            return None
        return self.deadline_s - (clock() - self.started)

    def admit(self, row: Row) -> bool:
        """Whether ``row`` may start: with ``--deadline``, only if its ``--timeout`` fits in
        what is left; if not, it is marked ``skipped: deadline (...)`` and done."""
        left = self.left()
        if left is None or left >= self.timeout_s:
            return True
        self.skip(row, left)
        return False

    def allowance(self, row: Row) -> float | None:
        """The seconds ``row`` may run from now: ``--timeout``, or what the deadline leaves if
        that is less; ``None`` (and the row marked skipped) when under a second is left."""
        left = self.left()
        if left is None:
            return self.timeout_s
        if left < 1.0:
            self.skip(row, left)
            return None
        return min(self.timeout_s, left)

    def skip(self, row: Row, left: float) -> None:
        """Mark ``row`` not started for the deadline (``left`` seconds were left) and done."""
        row.status = (
            f"skipped: deadline ({max(left, 0.0):.0f} s left of {self.deadline_s:.0f}, "
            f"a row may take --timeout {self.timeout_s:.0f})"
        )
        self.finish(row, f"{row.workload} {row.case}: {row.impl} {row.status}")

    # -- rows starting and finishing ------------------------------------------------------------

    def start(self, row: Row, line: str) -> None:
        """``row`` starts now (printed as ``line``): the one SIGTERM would stop."""
        print(f"[forge-bench] {line}", flush=True)
        self.current, self.current_since = row, clock()

    def finish(self, row: Row, summary: str, output: str | None = None) -> None:
        """``row`` is done: print ``summary``, keep the script ``output``, rewrite the record."""
        self.pending.discard(id(row))
        if self.current is row:
            self.current = None
        print(f"[forge-bench]   {summary}", flush=True)
        if output is not None:
            self.outputs.append(output)
        self.save()

    def stop(self, reason: str) -> None:
        """The run was cut short by ``reason`` (``"SIGTERM"``): the running row becomes an error
        row, the rest stay not run, and what is done is written."""
        self.stopped = f"stopped by {reason} after {clock() - self.started:.0f} s"
        row = self.current
        if row is not None:
            row.status = f"error: {self.stopped} ({clock() - self.current_since:.0f} s into it)"
            self.finish(row, f"{row.workload} {row.case}: {row.impl} {row.status}")
        else:
            self.save()

    # -- what is shown --------------------------------------------------------------------------

    def done(self) -> list[Row]:
        return [r for r in self.rows if id(r) not in self.pending]

    def note(self) -> str | None:
        """``(incomplete: ...)`` while rows are missing, else ``None``."""
        if not self.pending and self.stopped is None:
            return None
        n = len(self.pending)
        if self.stopped is not None:
            return f"(incomplete: {self.stopped}; {n} rows not run)"
        return f"(incomplete: {n} rows not run yet)"

    def report(self) -> str:
        """The header and the table of the rows done, with :meth:`note` under it."""
        done = self.done()
        fill_ratios(done)
        note = self.note()
        return "\n".join([*self.header, "", format_table(done), *([note] if note else [])])

    def body(self) -> str:
        return "\n\n".join([self.report(), *self.outputs])

    def save(self) -> None:
        """Rewrite the record's section with :meth:`body` (nothing without ``--record``)."""
        if self.record is not None:
            self.record.write(self.body())
