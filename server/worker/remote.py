"""RemoteWorker: a device worker owned by another process, seen from one front end.

With `serve --frontends N` the supervisor process owns the device workers (WorkerHandle
starts, supervises and restarts them) and each worker listens on a Unix socket of its
own. Every front-end process holds one RemoteWorker per device worker: it connects to
that socket, sends its router's batches over it and reads the answers, all on its event
loop (channel.py), exactly as a WorkerHandle does with its pipe. The in-flight
bookkeeping is WorkerHandle's (this class is one); only the connection differs:

- the worker says ("ready", info) on every new connection; until then the worker is
  not alive for this front end, and `start()`'s future resolves at the first one;
- the socket closing (the worker died, or was killed) fails the batches this front end
  had in flight with WorkerCrashed, as a death does, so the router retries them; the
  front end then connects again, every 0.1 s, until the restarted worker listens;
- the stall watch is here, where the batches are: a worker that answers none of this
  front end's batches for longer than its allowance is killed (SIGKILL to its pid); the
  supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from multiprocessing.connection import Connection
from typing import Any

from ..errors import WorkerFailed
from .channel import Channel
from .handle import WorkerHandle
from .spec import WorkerSpec

log = logging.getLogger(__name__)

RECONNECT_S = 0.1


class RemoteWorker(WorkerHandle):
    """A device worker of the supervisor, reached over its Unix socket at `path`."""

    def __init__(self, spec: WorkerSpec, *, name: str, path: str,
                 on_change: Any = lambda: None) -> None:
        super().__init__(spec, name=name, on_change=on_change)
        self.path = path
        self._pid: int | None = None
        self._hello = False  # the connection is open and its ("ready", info) not read yet
        self._killed = False  # this connection's worker was killed for a stall
        # The worker runs another front end's suspect batch now (worker/process.py's
        # _tell_elsewhere): if it dies, none of this front end's batches was running.
        self._elsewhere = False
        self._running: int | None = None  # named by the worker when not the oldest
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[dict[str, Any]]:
        """Connect (again and again, until stop()); the future resolves at the first
        ("ready", info)."""
        self._loop = loop
        self._ready = loop.create_future()
        self._task = loop.create_task(self._keep_connected(), name=f"{self.name}-connect")
        return self._ready

    async def stop(self, timeout: float = 5.0) -> None:
        """Close the connection (the worker itself is the supervisor's) and fail what this
        front end still had in flight."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._alive = False
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        self._fail_in_flight(f"{self.name} stopped")

    async def _keep_connected(self) -> None:
        while not self._stopping.is_set():
            if self._channel is None:
                self._connect()
            elif self._alive and not self._killed:
                self._watch_stall()
            await asyncio.sleep(RECONNECT_S)

    def _connect(self) -> None:
        assert self._loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)  # at once: refused (or no file) while it restarts
        except OSError:
            sock.close()
            return
        self._hello = True
        self._killed = False
        self._channel = Channel(Connection(sock.detach()), self._loop, self._on_frame,
                                self._on_closed)

    def _on_frame(self, message: Any) -> None:
        if not self._hello:
            if message[0] == "elsewhere":
                self._elsewhere = message[2]
                return
            if message[0] == "running":  # a priority batch ahead of older ones
                self._running = message[1]
                return
            self._on_message(message)
            return
        self._hello = False
        kind, info = message
        if kind != "ready":  # the worker speaks only "ready" first; anything else is a bug
            raise WorkerFailed(f"{self.name}: unexpected first message {kind!r}")
        info = dict(info)
        self._pid = info.pop("pid", None)
        self.info = info
        self._alive = True
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(info)
        else:  # connected before: the worker was restarted
            log.info("%s connected again (pid %s)", self.name, self._pid)
        self._on_change()

    def _on_closed(self) -> None:
        """The socket closed: the worker died (or dropped this front end)."""
        self._channel = None
        self._hello = False
        was_alive, self._alive = self._alive, False
        if self._stopping.is_set():
            return
        assert self._loop is not None
        # What the worker said of its last run, taken now: a reconnection (the task that
        # keeps connecting may run before _lost does) starts afresh.
        self._loop.call_soon(self._lost, was_alive, not self._elsewhere, self._running)
        self._elsewhere, self._running = False, None

    def _lost(self, was_alive: bool, ran_first: bool, running: int | None) -> None:
        lost = self._fail_in_flight(f"{self.name} died", ran_first=ran_first, running=running)
        if was_alive:
            self.restarts += 1
            log.warning("%s: connection lost with %d batches in flight (the worker died?); "
                        "they are retried, reconnecting", self.name, lost)
        self._on_change()

    def _watch_stall(self) -> None:
        stalled = self._stalled_for()
        if stalled is None or self._pid is None:
            return
        log.error("%s made no progress on a batch of %d tokens for %.1f s (allowed %.1f s); "
                  "killing it, the batch is retried", self.name, *stalled)
        self._killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self._pid, signal.SIGKILL)
