"""The worker process: builds its backend on its device and embeds batches.

Everything here runs inside a process started with the `spawn` context by
WorkerHandle (handle.py). The contract with the main process is small:

    main → worker:  Batch(id, ids, lengths, priority, alone)   or None to stop
                    (run in arrival order, priority batches before the others waiting,
                    but never two in a row ahead of them)
    worker → main:  ("ready", info) | ("error", message)       once, after start-up
                    ("ok", batch_id, vectors[B, H] float32) | ("fail", batch_id, message)
                    ("ran", batches, (rows, seconds)): with front ends (spec.listen), what
                    each device batch held (front ends' batches, rows) and took

With `serve --frontends N` the worker also listens on a Unix socket (spec.listen): each
front end connects, is told ("ready", info with the worker's pid), and sends batches and
gets answers in the same messages. Batches of several front ends waiting together run as
one batch when they fit (spec.merge), so splitting the traffic over front ends does not
shrink the device's batches.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..errors import ModelError
from ..logs import configure_logging, worker_text_format
from .backends import make_backend
from .spec import Batch, Rows, WorkerSpec

log = logging.getLogger(__name__)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal, and a service manager stopping the server (systemd's default
    # KillMode=control-group, `kill -- -PGID`), signal the whole process group: the main
    # process drains and stops its workers itself (a message on their pipe; a worker also
    # ends when that pipe closes). A worker that took SIGINT or SIGTERM would die
    # mid-batch and be restarted during the drain; SIGKILL still ends one at once.
    if threading.current_thread() is threading.main_thread():  # tests run it in a thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # SIGHUP (reload) is the server's: sent to the process group, it must not end
        # a worker (its default action).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    configure_logging(spec.logging.log_level, spec.logging.log_format,
                      text_format=worker_text_format())
    try:
        backend = make_backend(spec)
        backend.warmup()
        listener = _listen(spec.listen) if spec.listen else None  # before "ready": no gap
    except ModelError as exc:  # a clear message already; the main process reports it
        conn.send(("error", str(exc)))
        return
    except Exception as exc:
        log.exception("worker start-up failed")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    info = backend.describe()
    conn.send(("ready", info))
    sources = _Sources(conn, listener)
    waiting: deque[tuple[Connection, Batch | None]] = deque()  # received, not yet run
    told: list[Connection] = []  # front ends told that another's suspect batch runs
    order = [False]  # the last batch taken was a priority one that went ahead of others
    try:
        while True:
            try:
                _receive(sources, waiting, info)
                group = _take(waiting, spec.merge, order)
                if group is None:
                    return
                if listener is not None:
                    told = _tell_elsewhere(group, sources, waiting, told)
                _run(backend, group, sources, waiting, listener is not None)
            except (EOFError, OSError):
                return  # the main process is gone
            broken = getattr(backend, "broken", None)
            if broken:  # a new process (WorkerHandle restarts it) is the way out
                log.error("worker exits: %s", broken)
                return
    finally:
        if listener is not None:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(spec.listen)


def _listen(path: str) -> socket.socket:
    """The Unix socket front ends connect to (a restarted worker takes over the path)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


class _Sources:
    """What the worker reads: the parent's pipe (first), each front end's socket, and the
    listener they connect to, watched by one poll object (multiprocessing's wait() builds
    a selector per call, which cost more than a small batch's run)."""

    def __init__(self, parent: Connection, listener: socket.socket | None) -> None:
        self.conns: list[Connection] = []
        self.listener = listener
        self._poll = select.poll()
        self._by_fd: dict[int, Any] = {}
        self.add(parent)
        if listener is not None:
            self._watch(listener)

    @property
    def parent(self) -> Connection:
        return self.conns[0]

    def _watch(self, source: Any) -> None:
        fd = source.fileno()
        self._by_fd[fd] = source
        self._poll.register(fd, select.POLLIN)

    def add(self, conn: Connection) -> None:
        self.conns.append(conn)
        self._watch(conn)

    def remove(self, conn: Connection) -> None:
        """Stop watching `conn` (before it is closed)."""
        if conn in self.conns:
            self.conns.remove(conn)
            fd = conn.fileno()
            self._poll.unregister(fd)
            del self._by_fd[fd]

    def ready(self, block: bool) -> list[Any]:
        """The sources with something to read (or a hang-up), waiting for one if `block`."""
        return [self._by_fd[fd] for fd, _ in self._poll.poll(None if block else 0)
                if fd in self._by_fd]


def _receive(sources: _Sources, waiting: deque[tuple[Connection, Batch | None]],
             info: dict[str, Any]) -> None:
    """Everything that has arrived, from every source (waiting for something when nothing
    waits yet); new front ends are accepted and told the worker's info. EOFError: the
    parent's pipe closed. A front end that closed its socket is dropped, and its batches
    with it (nobody is left to answer)."""
    while ready := sources.ready(block=not waiting):
        for source in ready:
            if source is sources.listener:
                _accept(source, sources, info)
                continue
            if source not in sources.conns:  # dropped by an earlier one of this round
                continue
            try:
                waiting.append((source, source.recv()))
            except (EOFError, OSError):
                if source is sources.parent:
                    raise
                _drop(source, sources, waiting)


def _accept(listener: socket.socket, sources: _Sources, info: dict[str, Any]) -> None:
    try:
        sock, _ = listener.accept()
    except OSError:  # out of descriptors, or the peer gave up: it connects again
        return
    frontend = Connection(sock.detach())
    try:
        _send(frontend, ("ready", {**info, "pid": os.getpid()}))
    except OSError:
        frontend.close()
        return
    sources.add(frontend)


def _send(conn: Connection, message: Any) -> None:
    """conn.send without ForkingPickler (whose set-up cost more than pickling a reply);
    the other end reads it as conn.recv or Channel does."""
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def _drop(source: Connection, sources: _Sources,
          waiting: deque[tuple[Connection, Batch | None]]) -> None:
    sources.remove(source)
    kept = [item for item in waiting if item[0] is not source]
    waiting.clear()
    waiting.extend(kept)
    source.close()


def _take(waiting: deque[tuple[Connection, Batch | None]], merge: tuple[int, int, int],
          order: list[bool]) -> list[tuple[Connection, Batch]] | None:
    """The batch to run next (_next: the first priority one waiting, but never twice in
    a row ahead of older ones, else the oldest; None, the stop message, is taken in its
    turn; `order` holds _next's `overtaken` from one call to the next), and with `merge`,
    the oldest batch of each other front end that fits beside it: rows and padded
    tokens within the router's limits, and no more padding than the fixed cost of the
    batch run saved. A batch marked `alone` (a suspect text, retried after a crash) runs
    by itself."""
    source, batch, order[0] = _next(waiting, order[0])
    if batch is None:
        return None
    group = [(source, batch)]
    max_tokens, max_rows, overhead = merge
    if not max_tokens or not waiting or batch.alone:
        return group
    rows, width = len(batch.lengths), int(batch.lengths.max())
    padded = rows * width
    seen = {id(source)}
    candidates = []  # the oldest batch of each other front end: its order is kept
    for item in waiting:
        if item[1] is not None and id(item[0]) not in seen:
            seen.add(id(item[0]))
            if not item[1].alone:  # its front end's batches run in their order
                candidates.append(item)
    # The closest in length first: they add the least padding, so more of them fit.
    candidates.sort(key=lambda item: abs(int(item[1].lengths.max()) - width))  # type: ignore[union-attr]
    for item in candidates:
        other_source, other = item
        assert other is not None
        n, w = len(other.lengths), int(other.lengths.max())
        merged = (rows + n) * max(width, w)
        if rows + n <= max_rows and merged <= max_tokens and merged <= padded + n * w + overhead:
            group.append((other_source, other))
            waiting.remove(item)
            rows, width, padded = rows + n, max(width, w), merged
    return group


def _run(backend: Any, group: list[tuple[Connection, Batch]], sources: _Sources,
         waiting: deque[tuple[Connection, Batch | None]], report: bool) -> None:
    """Run the group as one batch; each of its batches is answered to its own sender.
    `report`: tell the parent (with several front ends, the supervisor) what it ran."""
    batches = [batch for _, batch in group]
    began = time.perf_counter()
    try:
        if len(batches) == 1:
            vectors = backend.embed(batches[0].ids, batches[0].lengths)
        else:
            vectors = backend.embed(np.concatenate([b.ids for b in batches]),
                                    np.concatenate([b.lengths for b in batches]))
        replies = []
        start = 0
        for batch in batches:
            end = start + len(batch.lengths)
            replies.append(("ok", batch.id, Rows(vectors[start:end])))
            start = end
    except Exception as exc:
        log.exception("batch %s failed", ",".join(str(b.id) for b in batches))
        replies = [("fail", b.id, f"{type(exc).__name__}: {exc}") for b in batches]
    else:
        if report:  # the device's own figures: batches merged, rows, seconds
            _send(sources.parent, ("ran", len(batches), (start, time.perf_counter() - began)))
    for (source, _), reply in zip(group, replies, strict=True):
        try:
            _send(source, reply)
        except OSError:
            if source is sources.parent:
                raise EOFError from None  # the parent is gone
            _drop(source, sources, waiting)


def _tell_elsewhere(group: list[tuple[Connection, Batch]], sources: _Sources,
                    waiting: deque[tuple[Connection, Batch | None]],
                    told: list[Connection]) -> list[Connection]:
    """Before a run, with several front ends. A front end that loses the worker counts
    its oldest batch in flight as the one that was running (its texts are suspect, and
    retried alone), which need not be so when the worker ran another front end's batch,
    or a priority batch of its own ahead of older ones. That matters when the worker keeps
    dying on one text, so, cheaply (no message for an ordinary run): while a suspect batch
    runs (one text retried alone after a crash), every other front end is told
    ("elsewhere", 0, True), and False again before the next run that is not one; and a
    batch that runs out of its front end's order (a priority batch ahead of older ones,
    or an older one while its priority batch waits) is named to it ("running", id,
    None). A poison input's crashes then count against itself only. Returns the front
    ends told True."""
    suspect = len(group) == 1 and group[0][1].alone
    others = [c for c in sources.conns[1:] if c is not group[0][0]] if suspect else []
    notices = [*((c, ("elsewhere", 0, False)) for c in told if c not in others),
               *((c, ("elsewhere", 0, True)) for c in others if c not in told)]
    # A priority batch runs before its front end's older batches waiting here, or one of
    # those runs while its priority batch waits (_next's turn for the older ones), which
    # that front end cannot tell from the order it sent them in: name it ("running", id).
    notices += [(source, ("running", batch.id, None)) for source, batch in group
                if any(s is source and (batch.priority or (b is not None and b.priority))
                       for s, b in waiting)]
    for conn, notice in notices:
        if conn not in sources.conns:
            continue  # dropped meanwhile
        try:
            _send(conn, notice)
        except OSError:
            _drop(conn, sources, waiting)
    return [c for c in others if c in sources.conns]


def _next(waiting: deque[tuple[Connection, Batch | None]],
          overtaken: bool) -> tuple[Connection, Batch | None, bool]:
    """The batch to run next: the first priority one waiting, else the oldest (None, the
    stop message, is taken in its turn); and whether it went ahead of older ones. Not
    twice in a row: after a priority batch that went ahead (`overtaken`), the oldest
    runs, whatever it is. Each front end has at most one priority batch at a worker,
    but with several front ends one of them may always have one waiting: the batches
    behind would never run. WorkerHandle keeps the same order."""
    if not overtaken:
        for i, (source, batch) in enumerate(waiting):
            if batch is not None and batch.priority:
                del waiting[i]
                return source, batch, i > 0
    source, batch = waiting.popleft()
    return source, batch, False
