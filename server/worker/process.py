"""The worker process: builds its backend on its device and embeds batches.

Everything here runs inside a process started with the `spawn` context by
WorkerHandle (handle.py). The contract with the main process is small:

    main → worker:  Batch(id, ids, lengths, priority)   or None to stop
                    (run in arrival order, priority batches before the others waiting)
    worker → main:  ("ready", info) | ("error", message)       once, after start-up
                    ("ok", batch_id, vectors[B, H] float32) | ("fail", batch_id, message)
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque
from multiprocessing.connection import Connection

from ..errors import ModelError
from ..logs import configure_logging, worker_text_format
from .backends import make_backend
from .spec import Batch, WorkerSpec

log = logging.getLogger(__name__)


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process."""
    # Ctrl-C in a terminal signals the whole process group: the main process drains and
    # stops its workers itself; a worker that took SIGINT would die mid-batch with a
    # KeyboardInterrupt traceback, and be restarted during the shutdown.
    if threading.current_thread() is threading.main_thread():  # tests run it in a thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.logging.log_level, spec.logging.log_format,
                      text_format=worker_text_format())
    try:
        backend = make_backend(spec)
        backend.warmup()
    except ModelError as exc:  # a clear message already; the main process reports it
        conn.send(("error", str(exc)))
        return
    except Exception as exc:
        log.exception("worker start-up failed")
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", backend.describe()))
    waiting: deque[Batch] = deque()  # received, not yet run
    while True:
        try:
            if not waiting:
                waiting.append(conn.recv())
            while conn.poll(0):  # everything that has arrived, to pick the next one
                waiting.append(conn.recv())
        except (EOFError, OSError):
            return  # the main process is gone
        batch = _next(waiting)
        if batch is None:
            return
        try:
            vectors = backend.embed(batch.ids, batch.lengths)
        except Exception as exc:
            log.exception("batch %d failed", batch.id)
            conn.send(("fail", batch.id, f"{type(exc).__name__}: {exc}"))
            broken = getattr(backend, "broken", None)
            if broken:  # a new process (WorkerHandle restarts it) is the way out
                log.error("worker exits: %s", broken)
                return
            continue
        conn.send(("ok", batch.id, vectors))


def _next(waiting: deque[Batch | None]) -> Batch | None:
    """The batch to run next: the first priority one waiting, else the oldest (None, the
    stop message, is taken in its turn). WorkerHandle keeps the same order."""
    for i, batch in enumerate(waiting):
        if batch is not None and batch.priority:
            del waiting[i]
            return batch
    return waiting.popleft()
