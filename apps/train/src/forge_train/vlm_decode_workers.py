"""Decoding a data-parallel rank's VLM samples in worker processes (``data.decode_workers``).

:mod:`forge_train.vlm_stream` decodes a rank's samples (PIL decoding, the family's processor:
resizing, patching, tokenizing) in the training process, in the step or in one prefetch thread.
Much of that work holds the GIL, so one thread gains little beside a Python-heavy step, and a
rank that needs tens of images a step can be held up by it. With ``data.decode_workers=N`` a
:class:`DecodePool` of ``N`` processes decodes them, as the DataLoader workers of LLaVA /
Qwen-VL trainers do, while everything that decides the batches stays in the training process:
reading the tar stream, packing, the loader state and the bad-data accounting.

* What a worker does: :meth:`forge_data.multimodal.MultimodalDataset.decode` of one raw sample
  (its files' bytes and key), with its own copy of the split's decoder, unpickled once when the
  worker starts (the tokenizer and processor are not sent again per sample). What it sends
  back (:class:`Decoded`): the decoded sample or ``None``, the bad data the decoder met on it
  (reason, location, detail, in order) and the error it raised, if any. The training process
  replays them into its own ``BadDataReport`` (:meth:`Decoded.replay`) where it would have
  decoded the sample, so the counts, the records, the log lines and the point where
  ``data.on_bad_data=raise`` raises are those of decoding in process.
* Order: a task goes to the worker with the fewest tasks outstanding, each worker answers its
  own tasks in order on its own pipe, and the reader asks for the results in the order it
  submitted them (:meth:`DecodePool.result` of the oldest ticket): an ordered map with a
  window of :attr:`DecodePool.window` samples in flight, no reordering buffer.
* Start method: ``forkserver`` (``spawn`` where there is none), never ``fork``: the training
  process may hold CUDA, which a forked child cannot use. The fork server is started once per
  process with torch and forge-data imported, so a later pool (each loader, each resume)
  costs a fork and an unpickle per worker, not an interpreter start.
* The main script: as with PyTorch's DataLoader workers under ``spawn`` / ``forkserver``,
  each worker imports the training script as ``__mp_main__`` (multiprocessing's own
  behaviour), so a script that embeds the trainer keeps its top-level work under
  ``if __name__ == "__main__":``. forge-train's own entry points do.
* Results come back pickled through each worker's pipe (``transport="pickle"``), a tensor as
  its bytes (:class:`_TensorPickler`). Shared memory (``"shared_memory"``: torch's
  reductions, a file descriptor per tensor passed over a socket) is kept for the measurement
  only (``apps/train/benchmarks/bench_vlm_prefetch.py --decode-workers``, figures in
  ``apps/train/BENCHMARKS.md``): it keeps a file descriptor open per tensor of every sample
  held, and a packing buffer of 128 samples of about 8 tensors each is past the usual limit
  of 1024 open files (PyTorch's DataLoader has the same trap).
* Reuse across readers: loaders that take turns on one split (each held-out evaluation's,
  every ``train.eval_every`` steps) borrow a pool from one :class:`DecodePools` kept for the
  run and give it back when they stop, instead of starting and stopping ``N`` processes each
  time. A pool given back may still hold the answers of samples its last reader sent ahead
  and never took; the next borrower drops them first (:meth:`DecodePool.drain`), so it starts
  from a clean ordered map (the same batches, bad data and state as a fresh pool), and a pool
  that lost a worker meanwhile is replaced.
* Lifecycle: :meth:`DecodePool.close` terminates the workers and waits for them; so does
  garbage collection of the pool and the interpreter's exit (``multiprocessing.util.Finalize``).
  :meth:`DecodePools.close` (the end of a run) closes the pools it keeps, and a pool given
  back after it is closed. A worker exits by itself when the training process is gone (it
  polls its parent's pid), so a killed rank leaves no orphan; it ignores ``SIGINT`` (Ctrl-C
  reaches the whole process group: the training process handles it and closes the pool). A
  worker that dies (killed, out of memory, a crash in an image library) makes
  :meth:`DecodePool.result` raise :class:`DecodeWorkerError` naming the sample it held, at
  once, not a hang.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import multiprocessing.util
import os
import pickle
import queue
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DecodePool", "DecodePools", "DecodeStoppedError", "DecodeWorkerError", "Decoded"]

#: Samples in flight per worker (sent and not yet taken): one being decoded and one queued,
#: so a worker never waits for the reader to send its next sample. Memory: this many raw and
#: decoded samples per worker beside the packing buffers.
TASKS_PER_WORKER = 2

#: How often a worker looks for its parent (seconds).
_WATCH_SECONDS = 1.0

#: Modules the fork server imports once, so that each worker it forks has them.
_PRELOAD = ["__main__", "torch", "PIL.Image", "forge_data.vision", __name__]

#: How long :meth:`DecodePool.drain` waits for the answers a pool's last reader left behind
#: (a worker decodes at most :data:`TASKS_PER_WORKER` of them; slower: taken as hung).
_DRAIN_SECONDS = 60.0

_STARTUP = -1  # the sequence number of a worker's startup failure


class DecodeWorkerError(RuntimeError):
    """A decode worker died or could not start; names the sample it held."""


class DecodeStoppedError(Exception):
    """:meth:`DecodePool.result` was stopped (its ``stop`` event set) while it waited."""


@dataclass
class Decoded:
    """A worker's answer for one raw sample: the ``sample`` (``None``: bad, skipped), the
    ``bad`` data the decoder met on it as ``(reason, location, detail)`` in order, and the
    ``error`` its decoding raised (``data.on_bad_data=raise``'s ``BadSampleError``, or a bug)."""

    sample: dict[str, Any] | None
    bad: list[tuple[str, str, str]] = field(default_factory=list)
    error: BaseException | None = None

    def replay(self, report) -> dict[str, Any] | None:
        """What decoding in this process would have done: add the bad data to ``report`` (a
        ``BadDataReport``: counted, recorded, logged as it logs), then raise the error or
        return the sample."""
        for reason, location, detail in self.bad:
            report.add(reason, location, detail)
        if self.error is not None:
            raise self.error
        return self.sample


@dataclass(frozen=True)
class _Ticket:
    """A submitted sample: its place in the submission order, its worker and where it is
    from (``url:key``, for error messages)."""

    seq: int
    worker: int
    where: str


def _where(raw: dict[str, Any]) -> str:
    """``url:key`` of a raw sample, for messages (:meth:`DecodePool._died` splits it at the
    last colon)."""
    return f"{raw.get('__url__', '?')}:{raw.get('__key__', '?')}"


def _context():
    """The multiprocessing context of the workers: a fork server with this module's imports
    preloaded, or spawn where there is no fork server (never fork, see the module doc)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Only read when the fork server starts (once per process); adds to, never drops,
        # what another user of the fork server preloads.
        ctx.set_forkserver_preload(list(dict.fromkeys([*_preloaded(), *_PRELOAD])))
        return ctx
    return multiprocessing.get_context("spawn")


def _preloaded() -> list[str]:
    forkserver = getattr(multiprocessing, "forkserver", None)
    server = getattr(forkserver, "_forkserver", None)
    return list(getattr(server, "_preload_modules", None) or [])


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running but not answering"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class _Worker:
    """The training process's side of one worker: the process, the training process's ends
    of its task and result sockets (Unix stream socket pairs: a message is received in one
    call, :func:`_read_message`) and its tickets not yet answered."""

    def __init__(self, ctx, index: int, decoder_blob: bytes, transport: str) -> None:
        self.tasks, tasks_end = socket.socketpair()
        self.results, results_end = socket.socketpair()
        for sock in (self.tasks, tasks_end, self.results, results_end):
            _grow_buffers(sock)
        self.process = ctx.Process(
            target=_serve,
            args=(tasks_end, results_end, decoder_blob, os.getpid(), transport),
            name=f"forge-vlm-decode-{index}",
            daemon=True,
        )
        self.process.start()
        # The worker holds the other ends now; without the training process's copies, a dead
        # worker's result socket reads as closed (EOFError) instead of waiting forever.
        tasks_end.close()
        results_end.close()
        self.index = index
        self.pending: deque[_Ticket] = deque()


def _quiet(sock: socket.socket) -> bool:
    """Whether a worker's result socket is open with nothing to read: not closed by the
    worker's death (seen as soon as it is dead, where ``is_alive`` waits for the fork server
    to reap it) and holding no answer nobody asked for."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False  # the end of the stream (b""), or bytes nobody asked for


def _grow_buffers(sock: socket.socket) -> None:
    """Ask for 4 MiB socket buffers (the kernel caps them, e.g. ``net.core.wmem_max``), so
    that a raw sample is sent without waiting for the worker and a decoded one crosses in few
    rounds; the defaults work too, more slowly."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, 1 << 22)


def _stop_workers(workers: list[_Worker]) -> None:
    """Wake a reader waiting on a worker, terminate the workers and wait for them (a worker
    holds nothing worth finishing: its samples are dropped with the pool)."""
    for worker in workers:
        with contextlib.suppress(OSError):
            worker.results.shutdown(socket.SHUT_RDWR)
        if worker.process.is_alive():
            worker.process.terminate()
    for worker in workers:
        worker.process.join(5.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5.0)
        worker.tasks.close()
        worker.results.close()


class DecodePool:
    """``workers`` processes decoding raw samples with copies of ``decoder`` (a
    ``MultimodalDataset``; pickled once here, unpickled once per worker). :meth:`submit` a
    raw sample, then take its :meth:`result` in submission order (see the module doc); at most
    :attr:`window` samples should be in flight. One thread uses a pool at a time, except
    :meth:`close`, which any thread may call."""

    def __init__(self, decoder, workers: int, *, transport: str = "pickle") -> None:
        from forge_train.config import ConfigError

        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if transport not in ("pickle", "shared_memory"):
            raise ValueError(f"transport={transport!r}: 'pickle' or 'shared_memory'")
        try:
            blob = pickle.dumps(decoder, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise ConfigError(
                f"data.decode_workers={workers} sends the sample decoder "
                f"({type(decoder).__name__}: its tokenizer and processor) to worker processes, "
                f"but it cannot be pickled: {type(err).__name__}: {err}; make it picklable or "
                "set data.decode_workers=0 to decode in the training process"
            ) from err
        self.workers = workers
        self.window = TASKS_PER_WORKER * workers
        self._seq = 0
        self._broken: DecodeWorkerError | None = None
        self._lock = threading.Lock()
        self._closed = False
        ctx = _context()
        self._workers: list[_Worker] = []
        try:
            for index in range(workers):
                self._workers.append(_Worker(ctx, index, blob, transport))
        except BaseException:
            _stop_workers(self._workers)
            raise
        # Terminates the workers when the pool is collected, and at the interpreter's exit
        # before multiprocessing joins its children (exitpriority >= 0 runs first).
        self._finalizer = multiprocessing.util.Finalize(
            self, _stop_workers, args=(self._workers,), exitpriority=10
        )

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

    def submit(self, raw: dict[str, Any]) -> _Ticket:
        """Send ``raw`` (a sample of ``forge_data.tar_shards.tar_samples``) to the worker with
        the fewest samples in flight; its ticket for :meth:`result`."""
        if self._closed:
            raise DecodeStoppedError
        worker = min(self._workers, key=lambda w: len(w.pending))
        where = _where(raw)
        ticket = _Ticket(self._seq, worker.index, where)
        self._seq += 1
        worker.pending.append(ticket)
        # Never waits long: the worker reads its next task after each sample it decodes (it
        # never waits to send one back), and its socket holds the window's raw samples. A
        # worker that is gone fails here (OSError): result() names the sample it held.
        with contextlib.suppress(OSError):
            _write_message(worker.tasks, [pickle.dumps((ticket.seq, raw), protocol=5)])
        return ticket

    def result(self, ticket: _Ticket, *, stop: threading.Event | None = None) -> Decoded:
        """The :class:`Decoded` answer for ``ticket``, the oldest ticket of its worker not yet
        taken (tickets are taken in submission order), waiting for it; ``DecodeStoppedError`` when
        ``stop`` is set (or the pool closed) meanwhile; :class:`DecodeWorkerError` when the
        worker died (then on every later call too)."""
        if self._broken is not None:
            raise self._broken
        worker = self._workers[ticket.worker]
        assert worker.pending, ticket
        assert worker.pending[0] == ticket, (ticket, list(worker.pending))
        if self._closed or (stop is not None and stop.is_set()):
            raise DecodeStoppedError
        # One blocking receive, not a poll loop: each call that lets go of the GIL costs a
        # background reader up to a switch interval (5 ms) beside a Python-heavy step. A
        # worker's death closes its socket (EOF); close() shuts it down, which wakes this.
        try:
            answer = _read_message(worker.results)
        except (EOFError, OSError):
            if self._closed or (stop is not None and stop.is_set()):
                raise DecodeStoppedError from None
            raise self._died(worker, ticket) from None
        worker.pending.popleft()
        seq, *answer = answer
        if seq == _STARTUP:
            self._broken = DecodeWorkerError(
                f"forge_train.vlm_decode_workers: decode worker {worker.index} of "
                f"{self.workers} (data.decode_workers) could not start: {answer[0]}"
                "; set data.decode_workers=0 to decode in the training process"
            )
            raise self._broken
        assert seq == ticket.seq, (seq, ticket)
        sample, bad, error = answer
        return Decoded(sample, bad, error)

    def _died(self, worker: _Worker, ticket: _Ticket) -> DecodeWorkerError:
        worker.process.join(1.0)
        url, _, key = ticket.where.rpartition(":")
        self._broken = DecodeWorkerError(
            f"forge_train.vlm_decode_workers: decode worker {worker.index} of {self.workers} "
            f"(pid {worker.process.pid}, data.decode_workers) died "
            f"({_signal_name(worker.process.exitcode)}) while decoding sample {key!r} of "
            f"shard {url} (or before reaching it); the stream cannot go on without it. Look "
            "for the cause (an out-of-memory kill in the kernel log, a crash of an image "
            "library on that sample's files), or set data.decode_workers=0 to decode in the "
            "training process, where a bad file is counted and skipped"
        )
        return self._broken

    def drain(self, *, timeout: float = _DRAIN_SECONDS) -> bool:
        """Take and drop the answers of the samples still in flight (sent by a reader that
        stopped before taking them), so that another reader starts on an empty ordered map;
        whether the pool can serve it: ``False`` when it is closed or broken, a worker is gone,
        or a worker does not answer within ``timeout`` seconds (hung; the pool is left in an
        unknown state). A ``False`` pool is to be closed."""
        if self._closed or self._broken is not None:
            return False
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            try:
                while worker.pending:
                    worker.results.settimeout(max(deadline - time.monotonic(), 0.001))
                    seq = _read_message(worker.results)[0]
                    if seq != worker.pending.popleft().seq:  # a startup failure
                        return False
            except Exception:  # gone (EOFError), timed out (TimeoutError), a garbled answer
                return False
            finally:
                with contextlib.suppress(OSError):
                    worker.results.settimeout(None)
        return all(_quiet(w.results) and w.process.is_alive() for w in self._workers)

    def close(self) -> None:
        """Terminate the workers and wait for them; later calls do nothing. A reader waiting
        in :meth:`result` gets ``DecodeStoppedError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()


class DecodePools:
    """Decode pools of one ``decoder`` (``workers`` processes each) kept for a run and lent to
    readers that take turns, e.g. each held-out evaluation's loader
    (:meth:`forge_train.vlm_stream.VLMShardData.sharing_decode_workers`): :meth:`borrow` gives
    a pool kept from an earlier reader, its leftovers dropped (:meth:`DecodePool.drain`), or
    starts one; :meth:`give_back` keeps it for the next. As many pools are kept as readers
    held one at once (one, for evaluations). :meth:`close` at the end of the run stops them;
    garbage collection and the interpreter's exit do too (each pool's finalizer)."""

    def __init__(self, decoder, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        self.decoder = decoder
        self.workers = workers
        self._idle: list[DecodePool] = []
        self._lock = threading.Lock()
        self._closed = False

    def borrow(self) -> DecodePool:
        """A pool for one reader (the calling thread; to :meth:`give_back` when it stops): a
        kept one, drained, or a new one (a kept one that lost or hung a worker is closed)."""
        while True:
            with self._lock:
                pool = self._idle.pop() if self._idle else None
            if pool is None:
                return DecodePool(self.decoder, self.workers)
            if pool.drain():
                return pool
            pool.close()

    def give_back(self, pool: DecodePool) -> None:
        """Keep ``pool`` for the next :meth:`borrow` (its reader stopped using it: no thread
        waits on it); close it instead when it is broken or these pools are closed."""
        with self._lock:
            if not self._closed and not pool._closed and pool._broken is None:
                self._idle.append(pool)
                return
        pool.close()

    def close(self) -> None:
        """Stop the pools kept (a pool borrowed now is stopped when given back); a later
        :meth:`borrow` starts a pool that is stopped when given back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for pool in idle:
            pool.close()


# -- the worker's side -----------------------------------------------------------------------
class _TensorPickler(pickle.Pickler):
    """Pickles a dense CPU tensor as an out-of-band buffer of its bytes (the view's own
    elements only, not its whole storage; written to the pipe from the tensor's memory, read
    by the training process into the ``bytearray`` the tensor is rebuilt over by
    :func:`_tensor_from`: one copy each way, where torch's own reduction, ``torch.save`` of the
    storage, and ``Connection.recv_bytes`` copy it several times). Anything else, and tensors
    that are not plain contiguous CPU tensors, as pickle does."""

    def reducer_override(self, obj):
        import torch

        if (
            type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and not obj.requires_grad
            and obj.is_contiguous()
            and obj.numel() > 0
        ):
            data = obj.reshape(-1).view(torch.uint8).numpy()
            return _tensor_from, (pickle.PickleBuffer(data), obj.dtype, tuple(obj.shape))
        return NotImplemented


def _tensor_from(data: bytearray, dtype, shape: tuple[int, ...]):
    """A tensor of ``dtype`` and ``shape`` over ``data`` (a writable ``bytearray``), no copy."""
    import torch

    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def _tensors_by_value(obj) -> list:
    """``obj`` as a message for :func:`_write_message`: its pickle, then its tensors' bytes
    (in the pickle if there are more than a message has room for)."""
    out, buffers = io.BytesIO(), []
    _TensorPickler(out, protocol=5, buffer_callback=buffers.append).dump(obj)
    if len(buffers) >= _MAX_PARTS:
        out = io.BytesIO()
        _TensorPickler(out, protocol=5).dump(obj)
        return [out.getbuffer()]
    return [out.getbuffer(), *(b.raw() for b in buffers)]


def _tensors_through_shared_memory(obj) -> list:
    from multiprocessing.reduction import ForkingPickler

    return [ForkingPickler.dumps(obj)]  # torch's reductions: a file descriptor per tensor


#: A message's head: how many parts (a pickle, then its out-of-band buffers), then their sizes
#: (room for 31: a decoded sample has about 8 tensors; more go in-band, :func:`_tensors_by_value`).
_MAX_PARTS = 31
_HEAD = struct.Struct(f"<I{_MAX_PARTS}Q")


def _views(buffers) -> list[memoryview]:
    return [v for v in (memoryview(b).cast("B") for b in buffers) if v.nbytes]


def _advance(views: list[memoryview], n: int) -> None:
    """Drop the first ``n`` bytes of ``views`` (in place)."""
    while n:
        if n >= views[0].nbytes:
            n -= views.pop(0).nbytes
        else:
            views[0], n = views[0][n:], 0


def _write_message(sock: socket.socket, parts: list) -> None:
    """Send ``parts`` (buffers) as one message: the head (their count and sizes), then their
    bytes, gathered straight from their memory."""
    sizes = [memoryview(p).nbytes for p in parts]
    views = _views([_HEAD.pack(len(parts), *sizes, *[0] * (_MAX_PARTS - len(parts))), *parts])
    while views:
        _advance(views, sock.sendmsg(views))


def _read_all(sock: socket.socket, buffers: list) -> None:
    """Fill ``buffers`` from ``sock`` in order: one blocking call (``MSG_WAITALL``) unless a
    signal cuts it short; ``EOFError`` when the other end closes first."""
    views = _views(buffers)
    while views:
        n = sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
        if n == 0:
            raise EOFError("the decode worker's socket closed")
        _advance(views, n)


def _read_message(sock: socket.socket):
    """The object of a :func:`_write_message` message: each part received into its own
    ``bytearray`` (a tensor's memory, see :func:`_tensor_from`), then unpickled."""
    head = bytearray(_HEAD.size)
    _read_all(sock, [head])
    count, *sizes = _HEAD.unpack(head)
    parts = [bytearray(size) for size in sizes[:count]]
    _read_all(sock, parts)
    return pickle.loads(parts[0], buffers=parts[1:])


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker when the training process ``parent_pid`` is gone: its parent changes
    (reparented: under a fork server the server exits with the training process) or the pid
    no longer exists. A daemon thread, so it needs nothing from the decoding loop."""
    first_parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(_WATCH_SECONDS)
            gone = os.getppid() != first_parent
            try:
                os.kill(parent_pid, 0)
            except ProcessLookupError:
                gone = True
            except PermissionError:
                pass
            if gone:
                os._exit(0)

    threading.Thread(target=watch, name="forge-vlm-decode-watch", daemon=True).start()


def _portable(error: BaseException, where: str) -> BaseException:
    """``error`` as the training process can unpickle it; a bug's error (not a bad sample's
    ``BadSampleError``) gets a note with the worker's traceback."""
    from forge_data.multimodal import BadSampleError

    if not isinstance(error, BadSampleError):
        text = "".join(traceback.format_exception(error)).rstrip()
        error.add_note(f"(raised in a decode worker, pid {os.getpid()}, decoding {where}:\n{text})")
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        worker_error = DecodeWorkerError(f"{type(error).__name__}: {error}")
        for note in getattr(error, "__notes__", []):
            worker_error.add_note(note)
        return worker_error


def _serve(
    tasks: socket.socket,
    results: socket.socket,
    decoder_blob: bytes,
    parent_pid: int,
    transport: str,
) -> None:
    """A worker's loop: unpickle the decoder once, then decode each ``(seq, raw)`` message of
    ``tasks`` and send ``(seq, sample, bad, error)`` on ``results``, in order, until the task
    socket closes. A sender thread writes the answers, so the worker decodes its next sample
    while the training process reads the last one, and never waits to read its next task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid)
    dumps = _tensors_through_shared_memory if transport == "shared_memory" else _tensors_by_value
    outbox: queue.SimpleQueue = queue.SimpleQueue()

    def send_all() -> None:
        while True:
            parts = outbox.get()
            if parts is None:
                return
            try:
                _write_message(results, parts)
            except OSError:  # the training process closed the pool or is gone
                os._exit(0)

    sender = threading.Thread(target=send_all, name="forge-vlm-decode-send", daemon=True)
    sender.start()
    try:
        import torch

        from forge_data.multimodal import BadDataReport

        torch.set_num_threads(1)  # N workers on the node's cores, as DataLoader workers do
        decoder = pickle.loads(decoder_blob)
    except BaseException as err:
        outbox.put(dumps((_STARTUP, f"{type(err).__name__}: {err}")))
        outbox.put(None)
        sender.join()
        return
    while True:
        try:
            seq, raw = _read_message(tasks)
        except (EOFError, OSError):
            break
        where = _where(raw)
        decoder.report = report = BadDataReport(log=False, max_records=sys.maxsize)
        sample, error = None, None
        try:
            sample = decoder.decode(raw)
        except Exception as err:  # replayed where the training process would have met it
            error = _portable(err, where)
        bad = [(r["reason"], r["location"], r["detail"]) for r in report.records]
        try:
            parts = dumps((seq, sample, bad, error))
        except Exception as err:
            failure = DecodeWorkerError(f"could not send {where}'s decoded sample back: {err}")
            parts = dumps((seq, None, bad, failure))
        outbox.put(parts)
    outbox.put(None)
    sender.join()
