"""WorkerHandle: the one place that knows worker processes and IPC.

Each handle owns one worker process (started with `spawn`), a supervisor
thread that reads its replies and restarts it when it dies, and a sender
thread so that writing a large batch never blocks the event loop. Results
are handed to the event loop with `call_soon_threadsafe`; all bookkeeping of
in-flight batches happens on the loop, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ModelError, WorkerFailed
from .worker import Batch, WorkerSpec, worker_main

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
        self._outbox: queue.SimpleQueue[tuple[int, Batch | None]] = queue.SimpleQueue()
        self._alive = False  # ready and serving (loop-side view)
        self._generation = 0  # bumped on every (re)start, so stale sends are dropped
        self._stopping = threading.Event()
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._proc: Any = None
        self._conn: Any = None
        self._threads: list[threading.Thread] = []

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

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[dict[str, Any]]:
        """Spawn the process; the returned future resolves when it answered warm-up."""
        self._loop = loop
        self._ready = loop.create_future()
        for target, name in ((self._supervise, "supervisor"), (self._send_loop, "sender")):
            thread = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self._ready

    def submit(self, batch: Batch) -> asyncio.Future[np.ndarray]:
        assert self._loop is not None and self._alive
        future: asyncio.Future[np.ndarray] = self._loop.create_future()
        self._inflight[batch.id] = future
        self._outbox.put((self._generation, batch))
        return future

    async def stop(self, timeout: float = 5.0) -> None:
        """Ask the process to exit, make sure it does, fail what it still held."""
        self._stopping.set()
        self._outbox.put((-1, None))
        await asyncio.to_thread(self._join, timeout)
        self._alive = False
        lost = list(self._inflight.values())
        self._inflight.clear()
        for future in lost:
            if not future.done():
                future.set_exception(WorkerCrashed(f"{self.name} stopped", ran=False))

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

    def _on_ready(self, generation: int, info: dict[str, Any]) -> None:
        self._generation = generation
        self.info = info
        self._alive = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(info)
        self._on_change()

    def _on_startup_error(self, message: str) -> None:
        self.failed = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ModelError(f"{self.name}: {message}"))
        else:
            log.error("%s could not restart: %s", self.name, message)
        self._on_change()

    def _on_reply(self, kind: str, batch_id: int, payload: Any) -> None:
        future = self._inflight.pop(batch_id, None)
        if future is None or future.done():
            return
        if kind == "ok":
            future.set_result(payload)
        else:
            future.set_exception(WorkerFailed(f"{self.name}: {payload}"))
        self._on_change()

    def _on_death(self, exitcode: int | None) -> None:
        was_alive, self._alive = self._alive, False
        lost = list(self._inflight.values())  # in the order the worker runs them
        self._inflight.clear()
        for i, future in enumerate(lost):
            if not future.done():
                future.set_exception(WorkerCrashed(
                    f"{self.name} died (exit code {exitcode})", ran=i == 0))
        if was_alive and not self._stopping.is_set():
            self.restarts += 1
            log.warning("%s died (exit code %s) with %d batches; restarting",
                        self.name, exitcode, len(lost))
        self._on_change()

    # -- threads -----------------------------------------------------------

    def _supervise(self) -> None:
        """Start the process, relay its replies, restart it when it dies."""
        failures = 0
        generation = 0
        while not self._stopping.is_set():
            generation += 1
            parent, child = _CTX.Pipe(duplex=True)
            proc = _CTX.Process(target=worker_main, args=(child, self.spec),
                                name=f"embedrpc-{self.name}", daemon=True)
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
            started = time.monotonic()
            served = self._relay(parent, generation)
            proc.join(5.0)
            if proc.is_alive():  # the pipe broke but the process hangs on
                proc.kill()
                proc.join(1.0)
            parent.close()
            if served is None:  # start-up failed: a broken model will not heal by retrying
                return
            self._post(self._on_death, proc.exitcode)
            failures = 0 if time.monotonic() - started > 30 else failures + 1
            self._stopping.wait(min(0.05 * 2**failures, _MAX_BACKOFF_S))

    def _relay(self, conn: Any, generation: int) -> bool | None:
        """Read replies until the pipe closes. None: the worker never became ready."""
        try:
            first = conn.recv()
        except (EOFError, OSError):
            first = ("error", "the worker process exited during start-up")
        if first[0] != "ready":
            if not self._stopping.is_set():
                self._post(self._on_startup_error, first[1])
            return None
        self._post(self._on_ready, generation, first[1])
        while True:
            try:
                kind, batch_id, payload = conn.recv()
            except (EOFError, OSError):
                return True
            self._post(self._on_reply, kind, batch_id, payload)

    def _send_loop(self) -> None:
        while True:
            generation, batch = self._outbox.get()
            if batch is None:
                conn = self._conn
                if conn is not None:
                    with contextlib.suppress(OSError):
                        conn.send(None)
                return
            if generation != self._generation or self._conn is None:
                continue  # sent to a process that has died since; the router retries it
            # On OSError the supervisor sees the death and fails the batch.
            with contextlib.suppress(OSError):
                self._conn.send(batch)

