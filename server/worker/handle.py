"""WorkerHandle: the one place that knows worker processes and IPC.

Each handle owns one worker process (started with `spawn`) and a supervisor
thread that starts it, waits for its warm-up answer, and restarts it when it
dies. Once a worker is ready, batches and replies travel over its socket on
the event loop itself (channel.py): a batch is written without blocking (what
the socket cannot take yet goes out when it becomes writable) and replies are
read when it becomes readable. No thread sits between the loop and a worker,
so a batch costs the main process no thread wake-ups and no GIL hand-offs.
All bookkeeping of in-flight batches happens on the loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import ModelError, WorkerFailed
from .channel import Channel
from .process import worker_main
from .spec import Batch, WorkerSpec

log = logging.getLogger(__name__)

_CTX = mp.get_context("spawn")
# One batch running and one waiting in the pipe, so the device never waits on Python.
PIPELINE_DEPTH = 2
_MAX_BACKOFF_S = 5.0


class WorkerCrashed(WorkerFailed):
    """The worker process died while it held the batch; the batch may be retried.

    `ran` is true only for the batch the worker was running when it died (the
    oldest unanswered one): batches still waiting in its pipe are not suspects.
    """

    def __init__(self, message: str, *, ran: bool = True) -> None:
        super().__init__(message)
        self.ran = ran


class WorkerHandle:
    """A supervised worker process, seen from the event loop."""

    def __init__(self, spec: WorkerSpec, *, name: str,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.spec = spec
        self.name = name
        self.info: dict[str, Any] = {}
        self.restarts = 0
        self.failed = False  # could not (re)start: it will not serve again
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: dict[int, asyncio.Future[np.ndarray]] = {}
        self._channel: Channel | None = None  # the live worker's socket (loop side)
        self._alive = False  # ready and serving (loop-side view)
        self._stopping = threading.Event()
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._proc: Any = None
        self._thread: threading.Thread | None = None
        self._was_ready = False  # it served once: later load errors are retried too
        # (since, padded tokens) of the oldest batch in flight: the stall watch reads it.
        self._oldest: tuple[float, int] | None = None
        self._tokens: dict[int, int] = {}  # padded tokens of each batch in flight
        self._priority: set[int] = set()  # batches in flight marked priority
        # Seconds per padded token measured on this worker (moving average); until a
        # batch is measured, a CPU's pessimistic figure.
        self._seconds_per_token = 0.01
        # With several front ends (supervisor.py): called with (batches, (rows, seconds))
        # of each device batch the worker ran for them.
        self.on_ran: Callable[[int, Any], None] | None = None

    # -- loop side ---------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def free_slots(self) -> int:
        return PIPELINE_DEPTH - len(self._inflight) if self._alive else 0

    @property
    def in_flight(self) -> int:
        """Batches sent to the worker and not answered yet."""
        return len(self._inflight)

    @property
    def free_priority_slot(self) -> bool:
        """One more batch may go in, if it is a priority batch (the router's light
        clients): the worker runs it before the ones waiting."""
        return (self._alive and len(self._inflight) <= PIPELINE_DEPTH
                and not self._priority)

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[dict[str, Any]]:
        """Spawn the process; the returned future resolves when it answered warm-up."""
        self._loop = loop
        self._ready = loop.create_future()
        self._thread = threading.Thread(target=self._supervise, name=f"{self.name}-supervisor",
                                        daemon=True)
        self._thread.start()
        return self._ready

    def submit(self, batch: Batch) -> asyncio.Future[np.ndarray]:
        assert self._loop is not None and self._alive and self._channel is not None
        future: asyncio.Future[np.ndarray] = self._loop.create_future()
        if batch.priority and len(self._inflight) > 1:
            # The worker runs it before the batches waiting in its pipe (not before the
            # one it runs now): keep _inflight in the worker's order.
            order = list(self._inflight.items())
            at = 1 + sum(1 for i, _ in order[1:] if i in self._priority)
            self._inflight = dict([*order[:at], (batch.id, future), *order[at:]])
        else:
            self._inflight[batch.id] = future
        if batch.priority:
            self._priority.add(batch.id)
        sizes = batch.lengths.tolist()  # a few rows: cheaper than numpy's max
        self._tokens[batch.id] = max(sizes) * len(sizes)
        if self._oldest is None:
            self._oldest = (time.monotonic(), self._tokens[batch.id])
        self._channel.send(batch)  # a dead socket: the supervisor fails the batch
        return future

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to exit, make sure it does, fail what it still held."""
        self._stopping.set()
        if self._channel is not None:
            self._channel.send(None)
        await asyncio.to_thread(self._join, timeout)
        self._alive = False
        self._close_channel()
        self._fail_in_flight(f"{self.name} stopped", ran_first=False)

    def _fail_in_flight(self, why: str, *, ran_first: bool = True,
                        running: int | None = None) -> int:
        """Fail every batch in flight with WorkerCrashed (the router retries them); only
        the one the worker was running with `ran` (if `ran_first`): batch `running` when
        it is in flight, else the first. Returns how many there were."""
        ran = running if running in self._inflight else next(iter(self._inflight), None)
        lost = list(self._inflight.items())  # in the order the worker runs them
        self._inflight.clear()
        self._tokens.clear()
        self._priority.clear()
        self._oldest = None
        for batch_id, future in lost:
            if not future.done():
                future.set_exception(WorkerCrashed(why, ran=ran_first and batch_id == ran))
        return len(lost)

    def _join(self, timeout: float) -> None:
        proc = self._proc
        if proc is not None:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(callback, *args)

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

    def _on_ready(self, info: dict[str, Any], conn: Any, closed: threading.Event) -> None:
        """The worker answered warm-up: from now on the loop owns its socket."""
        assert self._loop is not None
        self._channel = Channel(conn, self._loop, self._on_message, closed.set)
        if self._stopping.is_set():  # stop() ran while it was starting
            self._channel.send(None)
            return
        self.info = info
        self._alive = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(info)  # the first start: the server logs it
        else:
            log.info("%s ready again (pid %s, restart %d)", self.name, self.pid,
                     self.restarts)
        self._on_change()

    def _on_start_crash(self, why: str) -> None:
        """The process died (or could not be made) before it was ready: it is tried again."""
        self.restarts += 1
        log.warning("%s could not start (%s); trying again", self.name, why)
        self._on_change()

    def _on_startup_error(self, message: str) -> None:
        self.failed = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ModelError(f"{self.name}: {message}"))
        else:
            log.error("%s could not restart: %s", self.name, message)
        self._on_change()

    def _on_message(self, message: Any) -> None:
        kind, batch_id, payload = message
        if kind == "ran":
            if self.on_ran is not None:
                self.on_ran(batch_id, payload)
            return
        future = self._inflight.pop(batch_id, None)
        tokens = self._tokens.pop(batch_id, 0)
        self._priority.discard(batch_id)
        if self._oldest is not None and tokens:
            now = time.monotonic()
            measured = (now - self._oldest[0]) / tokens
            self._seconds_per_token += 0.2 * (measured - self._seconds_per_token)
            # The next batch (already in the pipe) starts now.
            running = next(iter(self._inflight), None)
            self._oldest = (now, self._tokens[running]) if running in self._tokens else None
        if future is None or future.done():
            return
        # The router learns of the freed slot from the future (its done callback wakes
        # it); on_change is for liveness, which an answer does not change.
        if kind == "ok":
            future.set_result(payload)
        else:
            future.set_exception(WorkerFailed(f"{self.name}: {payload}"))

    def _on_death(self, exitcode: int | None) -> None:
        if self._channel is not None:
            # Replies the worker sent before it died still count.
            self._channel.read_available()
            self._close_channel()
        was_alive, self._alive = self._alive, False
        lost = self._fail_in_flight(f"{self.name} died (exit code {exitcode})")
        if was_alive and not self._stopping.is_set():
            self.restarts += 1
            if self.on_ran is not None:  # the front ends hold its batches, and retry them
                log.warning("%s died (exit code %s); restarting", self.name, exitcode)
            else:
                log.warning("%s died (exit code %s) with %d batches; restarting",
                            self.name, exitcode, lost)
        self._on_change()

    # -- threads -----------------------------------------------------------

    def _supervise(self) -> None:
        """Start the process, hand its socket to the loop once it is ready, restart it
        when it dies. Nothing ends this loop but stop() or a model that cannot load at
        the first start: a crash (a signal, the OOM killer) and an error of the system
        (no file descriptor for the pipe) are retried with backoff."""
        failures = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                outcome = self._run_process()
            except Exception as exc:  # e.g. OSError EMFILE from Pipe(): try again later
                outcome = "crashed"
                self._post(self._on_start_crash, f"{type(exc).__name__}: {exc}")
            if outcome == "fatal":
                return
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            self._stopping.wait(min(0.05 * 2**failures, _MAX_BACKOFF_S))

    def _run_process(self) -> str:
        """One worker process from start to end: "fatal" (it cannot load the model, at the
        first start), "crashed" (it died before it was ready) or "ended"."""
        proc, parent = spawn(worker_main, (self.spec,), f"embedrpc-{self.name}")
        self._proc = proc
        try:
            first = parent.recv()
        except (EOFError, OSError):
            first = None  # it died before it could say anything
        if first is None or first[0] != "ready":
            parent.close()
            _reap(proc)
            if self._stopping.is_set():
                return "ended"
            if first is not None and not self._was_ready:
                # It said why it cannot load the model: retrying will not change that.
                self._post(self._on_startup_error, first[1])
                return "fatal"
            why = first[1] if first is not None else exit_reason(proc.exitcode)
            self._post(self._on_start_crash, why)
            return "crashed"
        self._was_ready = True
        closed = threading.Event()  # set by the loop when the socket closes
        self._post(self._on_ready, first[1], parent, closed)
        # The loop reads the socket now; wait for the process to end (or for the
        # socket to break while the process hangs on), and kill it if it stalls.
        while proc.is_alive() and not closed.is_set():
            proc.join(0.2)
            stalled = self._stalled_for()
            if stalled is not None:
                log.error("%s made no progress on a batch of %d tokens for %.1f s (allowed "
                          "%.1f s); killing it, the batch is retried", self.name,
                          stalled[0], stalled[1], stalled[2])
                proc.kill()
        _reap(proc)
        self._post(self._on_death, proc.exitcode)
        return "ended"

    def _stalled_for(self) -> tuple[int, float, float] | None:
        """(tokens, seconds waited, seconds allowed) when the oldest batch in flight has
        been waiting longer than its allowance; read from the supervisor thread."""
        oldest = self._oldest  # one read: the loop replaces the tuple as a whole
        if oldest is None:
            return None
        since, tokens = oldest
        waited = time.monotonic() - since
        allowed = self.stall_allowance(tokens)
        return (tokens, waited, allowed) if waited > allowed else None

    def stall_allowance(self, tokens: int) -> float:
        """How long a batch of `tokens` padded tokens may take: --worker-stall-seconds
        plus ten times what this worker has taken per token so far."""
        return self.spec.options.worker_stall_seconds + 10 * self._seconds_per_token * tokens


def spawn(target: Callable[..., None], args: tuple[Any, ...], name: str) -> tuple[Any, Any]:
    """Start `target(child_end, *args)` in a `spawn` process: (process, parent end of a
    duplex pipe to it). The child end is closed here once the process has it."""
    _resource_tracker()
    parent, child = _CTX.Pipe(duplex=True)
    try:
        proc = _CTX.Process(target=target, args=(child, *args), name=name, daemon=True)
        proc.start()
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


def _resource_tracker() -> None:
    """Start multiprocessing's resource tracker (every spawned process registers with it)
    with SIGHUP blocked, which it keeps: it ignores SIGINT and SIGTERM itself, but a
    SIGHUP to the process group (a reload sent with `kill -HUP -- -PGID`, a terminal
    hanging up) killed it, and it was started again with a warning of leaks."""
    from multiprocessing import resource_tracker

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})  # this thread's
    try:
        resource_tracker.ensure_running()  # thread-safe: it holds a lock of its own
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _reap(proc: Any) -> None:
    proc.join(5.0)
    if proc.is_alive():
        proc.kill()
        proc.join(1.0)


def exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        # SIGKILL: the OOM killer's, or a kill -9 (the supervisor's, for a stuck process).
        return f"killed by {name}" + (" (out of memory, or kill -9)" if name == "SIGKILL"
                                      else "")
    return f"exited with code {exitcode} before it was ready"
