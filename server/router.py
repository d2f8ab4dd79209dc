"""The router: one queue, token-budget batches, sharded across workers.

Handlers call `Router.embed(ids, client=...)`; it appends one entry per text to
that client's queue, each pointing at the request's job, and awaits the job. A
single batcher (a loop callback, once per wake-up) owns the queues: whenever a
worker has a free slot it cuts a batch (length-sorted, at most `max_batch_tokens` padded tokens and
`max_batch_size` rows) and hands it over. Entries whose job is already done
(cancelled, deadline passed, failed) are dropped before they reach a worker.
A large request is spread over many batches and so over all workers; its
vectors are written back by index, so order is kept.

Fair share: texts are taken from the clients' queues in turn (one text each, round
robin), so a client flooding the server delays another's single text by about one
batch, not by its whole backlog. Each client may have at most
`max_client_queue_tokens` queued; the whole queue at most `max_queue_tokens`, except
that a client with nothing queued gets one request in while the queue holds less than
twice that (so the queue never holds more than 3 × max_queue_tokens). Beyond:
RESOURCE_EXHAUSTED. A request of more tokens than max_queue_tokens is never admissible:
INVALID_ARGUMENT, send it as smaller requests.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

from .config import BatchConfig
from .errors import (
    DeadlineExceeded,
    EmbedError,
    InvalidInput,
    Overloaded,
    Unavailable,
    WorkerFailed,
)
from .metrics import BatchMetrics
from .worker.handle import WorkerCrashed, WorkerHandle
from .worker.spec import Batch

log = logging.getLogger(__name__)

# A client with nothing queued gets one request in while the queue holds less than this
# many times max_queue_tokens.
QUEUE_CEILING = 2
# A text whose batch crashed a worker is retried alone; this many crashes fail it.
MAX_ATTEMPTS = 3
# How far into the queue the batcher looks for texts of similar length.
WINDOW_BATCHES = 4


class _Job:
    """One request: its texts' vectors are filled in as batches come back."""

    __slots__ = ("client", "deadline", "ended", "future", "queued_entries", "queued_tokens",
                 "remaining", "vectors")

    def __init__(self, n: int, hidden: int, deadline: float | None,
                 future: asyncio.Future[np.ndarray], client: str) -> None:
        self.client = client
        self.vectors = np.empty((n, hidden), dtype=np.float32)
        self.remaining = n
        self.deadline = deadline
        self.future = future
        # Its entries now in the router's queue; they stop counting when the job ends.
        self.queued_entries = 0
        self.queued_tokens = 0
        self.ended = False  # the router has moved its queued entries to the dead count

    def fail(self, exc: EmbedError) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class _Entry:
    __slots__ = ("attempts", "enqueued", "ids", "index", "job")

    def __init__(self, job: _Job, index: int, ids: np.ndarray, now: float) -> None:
        self.job = job
        self.index = index
        self.ids = ids
        self.enqueued = now
        self.attempts = 0


class Router:
    def __init__(self, workers: Sequence[WorkerHandle], config: BatchConfig,
                 hidden_size: int, *, metrics: BatchMetrics | None = None) -> None:
        # --busy-wait-ms: when a request last came while others were under way: within
        # the wait of another client's, or while its own client's earlier ones were
        # still queued or in flight. A lone client, one request at a time, never sets it.
        self._last_client: str | None = None
        self._last_arrival = self._busy_at = -1e9
        self.workers = list(workers)
        # Options left to the device (None) get the CPU's defaults here; the server
        # passes them resolved for its devices.
        self.config = config.for_device("cpu", 0)
        self.hidden_size = hidden_size
        self.metrics = metrics or BatchMetrics()
        self._queues: dict[str, deque[_Entry]] = {}  # by client
        self._turn: deque[str] = deque()  # clients with queued entries, next one first
        self._entries = 0  # entries in the queues, live or dead
        self._queued_tokens = 0  # tokens of queued entries whose job still wants them
        self._client_tokens: dict[str, int] = {}  # the same, by client
        self._dead_entries = 0  # queued entries whose job has ended (dropped when popped)
        self._client_batches: dict[str, int] = {}  # batches in flight holding a client's texts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._context: contextvars.Context | None = None  # the batcher's own
        self._scheduled = False  # a dispatch is due on the loop
        self._batch_ids = itertools.count(1)
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        # Running totals, read by tests and benchmarks (and metrics, later).
        self.batches = 0
        self.batched_tokens = 0
        self.padded_tokens = 0

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def queued_entries(self) -> int:
        """Texts waiting in the queue for a live request."""
        return self._entries - self._dead_entries

    @property
    def held_entries(self) -> int:
        """Texts held in memory by the queue, including those of ended requests not yet
        dropped."""
        return self._entries

    def client_tokens(self, client: str) -> int:
        """Tokens `client` has waiting in the queue."""
        return self._client_tokens.get(client, 0)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._context = contextvars.Context()  # not that of the call that wakes it
        self.wake()

    def wake(self) -> None:
        """Something changed (texts queued, a worker freed a slot or (re)started): cut
        and send batches once the loop has run what is ready now. One callback however
        many wake-ups come first, so texts that arrive together go out together."""
        if self._scheduled or self._loop is None or self._closed:
            return
        self._scheduled = True
        self._loop.call_soon(self._batcher, context=self._context)

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._fail_queue(Unavailable("the server is shutting down"))

    def _fail_queue(self, error: EmbedError) -> None:
        for queue in self._queues.values():
            for entry in queue:
                entry.job.ended = True
                entry.job.fail(error)
        self._queues.clear()
        self._turn.clear()
        self._entries = self._queued_tokens = self._dead_entries = 0
        self._client_tokens.clear()

    def _count(self, client: str, tokens: int) -> None:
        """`tokens` more (or fewer) queued for `client`."""
        self._queued_tokens += tokens
        left = self._client_tokens.get(client, 0) + tokens
        if left:
            self._client_tokens[client] = left
        else:
            self._client_tokens.pop(client, None)

    async def embed(self, ids: Sequence[np.ndarray], *, deadline: float | None = None,
                    client: str = "") -> np.ndarray:
        """Vectors [len(ids), hidden] for the tokenized texts, in order. `client`: who
        asks (an API key's digest, or the peer's address), for fair share."""
        if self._closed:
            raise Unavailable("the server is shutting down")
        if all(w.failed for w in self.workers):
            raise Unavailable("no worker can run the model (see the server log)")
        tokens = sum(len(a) for a in ids)
        cfg = self.config
        mine = self._client_tokens.get(client, 0)
        # A client with nothing queued gets one request in while the queue holds less
        # than twice the limit, so one large request is never refused forever and no
        # client is shut out by another's backlog; the ceiling keeps many clients (one
        # per connection) from growing the queue without bound.
        limit: int = cfg.max_queue_tokens  # type: ignore[assignment]
        if tokens > limit:
            # Never admissible: one request may not take more than the whole queue (a
            # RerankBatch repeats its queries per document: 140 kB can be 16M tokens).
            raise InvalidInput(
                f"this request is {tokens} tokens, more than the whole queue may hold "
                f"(--max-queue-tokens {limit}); send it as smaller requests")
        if (self._queued_tokens + tokens > limit
                and (mine or self._queued_tokens >= QUEUE_CEILING * limit)):
            raise Overloaded(
                f"the queue is full ({self._queued_tokens} tokens waiting, limit {limit}; "
                f"a client with nothing queued gets in below {QUEUE_CEILING * limit}); "
                "retry later or send fewer texts"
            )
        if mine and mine + tokens > cfg.max_client_queue_tokens:  # type: ignore[operator]
            raise Overloaded(
                f"this client already has {mine} tokens queued (limit per client "
                f"{cfg.max_client_queue_tokens}); wait for its answers, then send more")
        loop = asyncio.get_running_loop()
        job = _Job(len(ids), self.hidden_size, deadline, loop.create_future(), client)
        now = time.monotonic()
        other_client = client != self._last_client \
            and now - self._last_arrival < cfg.busy_wait_ms / 1000
        if other_client or mine or client in self._client_batches:
            self._busy_at = now  # requests overlap: a thin batch may find company
        self._last_client, self._last_arrival = client, now
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
            self._turn.append(client)
        queue.extend(_Entry(job, i, a, now) for i, a in enumerate(ids))
        self._entries += len(ids)
        job.queued_entries, job.queued_tokens = len(ids), tokens
        self._count(client, tokens)
        job.future.add_done_callback(lambda _: self._job_ended(job))
        self.wake()
        try:
            return await job.future
        finally:
            # Cancelled by the client: mark the job done so the batcher drops its entries.
            if not job.future.done():
                job.future.cancel()

    def _job_ended(self, job: _Job) -> None:
        """A job finished, failed or was cancelled: its queued texts stop counting at once."""
        if job.ended:
            return
        job.ended = True
        self._count(job.client, -job.queued_tokens)
        self._dead_entries += job.queued_entries
        if self._dead_entries > 1024 and self._dead_entries * 2 > self._entries:
            # Mostly cancelled work waiting behind busy workers: free it now.
            for client, queue in list(self._queues.items()):
                live: deque[_Entry] = deque()
                for entry in queue:
                    if not entry.job.future.done():
                        live.append(entry)
                    elif not entry.job.ended:  # its own callback has not run yet
                        entry.job.ended = True
                        self._count(entry.job.client, -entry.job.queued_tokens)
                if live:
                    self._queues[client] = live
                else:
                    self._drop_client(client)
            self._entries = sum(map(len, self._queues.values()))
            self._dead_entries = 0

    # -- the batcher: sole owner of the queue ------------------------------

    def _batcher(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        try:
            self._dispatch()
        except Exception:  # a bug here must not stop the server
            log.exception("batcher failed; continuing")

    def _drop_client(self, client: str) -> None:
        del self._queues[client]
        self._turn.remove(client)

    def _dispatch(self) -> None:
        if self._entries and all(w.failed for w in self.workers):
            # A failed worker never serves again: fail what waits instead of hanging.
            self._fail_queue(Unavailable("no worker can run the model (see the server log)"))
            return
        while self._entries:
            worker = max(self.workers, key=lambda w: w.free_slots)
            if worker.free_slots <= 0:
                break
            entries = self._cut()
            if not entries:
                return
            self._send(worker, entries)
        if self._entries:
            self._dispatch_light()

    def _dispatch_light(self) -> None:
        """Every worker is busy: texts of light clients (no batch in flight, at most a
        batch's worth queued) go in one priority batch to a worker's extra slot, which it
        runs before the batches waiting in its pipe. So a client that floods the server
        holds another's text back by at most the batch running now."""
        cfg = self.config
        light = [c for c in self._turn if c not in self._client_batches
                 and self._client_tokens.get(c, 0) <= cfg.max_batch_tokens]  # type: ignore[operator]
        workers = [w for w in self.workers if getattr(w, "free_priority_slot", False)]
        if not light or not workers:
            return
        now = time.monotonic()
        taken: list[_Entry] = []
        longest = 0
        for client in light:
            queue = self._queues[client]
            while queue and len(taken) < cfg.max_batch_size:
                entry = queue[0]
                width = max(longest, len(entry.ids))
                if taken and ((len(taken) + 1) * width > cfg.max_batch_tokens  # type: ignore[operator]
                              or entry.attempts or taken[0].attempts):
                    break  # a suspect text (its batch crashed a worker) goes alone
                queue.popleft()
                self._entries -= 1
                if entry.job.ended:
                    self._dead_entries -= 1
                    continue
                entry.job.queued_entries -= 1
                entry.job.queued_tokens -= len(entry.ids)
                self._count(client, -len(entry.ids))
                if entry.job.future.done():
                    continue
                if entry.job.deadline is not None and now > entry.job.deadline:
                    entry.job.fail(DeadlineExceeded("the deadline passed while the request "
                                                    "was queued"))
                    continue
                taken.append(entry)
                longest = width
            if not queue:
                self._drop_client(client)
        if taken:
            self._send(workers[0], taken, priority=True)

    def _take_live(self, now: float) -> _Entry | None:
        """Pop the next client's oldest entry whose job still wants it; that client's turn
        then goes to the back."""
        while self._turn:
            client = self._turn[0]
            queue = self._queues[client]
            entry = queue.popleft()
            self._entries -= 1
            if queue:
                self._turn.rotate(-1)
            else:
                self._drop_client(client)
            job = entry.job
            if job.ended:
                self._dead_entries -= 1
                continue
            job.queued_entries -= 1
            job.queued_tokens -= len(entry.ids)
            self._count(client, -len(entry.ids))
            if job.future.done():  # ended; its callback has not run yet
                continue
            if job.deadline is not None and now > job.deadline:
                job.fail(DeadlineExceeded("the deadline passed while the request was queued"))
                continue
            return entry
        return None

    def _cut(self) -> list[_Entry] | None:
        """The next batch: a window of texts taken from the clients in turn, cut
        length-sorted; the batch holding the first text goes. The client that led this
        batch leads the next one only after every other waiting client has."""
        lead = self._turn[0] if self._turn else None
        batch = self._cut_window()
        if batch and lead in self._turn and self._turn[-1] != lead:
            self._turn.remove(lead)
            self._turn.append(lead)
        return batch

    def _cut_window(self) -> list[_Entry] | None:
        cfg = self.config
        now = time.monotonic()
        first = self._take_live(now)
        if first is None:
            return None
        if first.attempts:  # it was in a batch that crashed a worker: isolate it
            return [first]
        window = [first]
        tokens = len(first.ids)
        while (self._entries and tokens < WINDOW_BATCHES * cfg.max_batch_tokens
               and len(window) < WINDOW_BATCHES * cfg.max_batch_size):
            entry = self._take_live(now)
            if entry is None:
                break
            if entry.attempts:
                self._requeue_front([entry])
                break
            window.append(entry)
            tokens += len(entry.ids)
        if tokens < cfg.max_batch_tokens and len(window) < cfg.max_batch_size:
            # Idle workers and a thin batch: wait a little for company; with
            # --busy-wait-ms only while other calls are under way (a lone call never
            # waits), when company is likely: under load, one-text batches each cost a
            # round trip to the worker (docs/performance.md).
            wait = cfg.max_wait_ms / 1000
            busy = cfg.busy_wait_ms / 1000
            if busy > wait and now - self._busy_at < busy:
                wait = busy
            if now - first.enqueued < wait:
                self._requeue_front(window)
                self._arm_timer(first.enqueued + wait - now)
                return None
        if len(window) == 1:  # nothing else waits (a single text under light load)
            return window
        batch = self._pick(window)
        taken = set(map(id, batch))
        self._requeue_front([e for e in window if id(e) not in taken])
        return batch

    def _pick(self, window: list[_Entry]) -> list[_Entry]:
        """Cut the length-sorted window into batches; return the one with the oldest entry.

        A batch ends at the token budget, at the row limit, or where the newcomer
        (the longest so far) would pad the rows already in the batch by more than
        a batch's fixed cost: n * (new_width - width) > batch_overhead_tokens.
        """
        cfg = self.config
        order = sorted(window, key=lambda e: len(e.ids))
        batches: list[list[_Entry]] = [[]]
        width = 0
        for entry in order:
            current = batches[-1]
            new_width = len(entry.ids)
            n = len(current)
            if n and (n >= cfg.max_batch_size or (n + 1) * new_width > cfg.max_batch_tokens
                      or n * (new_width - width) > cfg.batch_overhead_tokens):
                current = []
                batches.append(current)
            current.append(entry)
            width = new_width
        oldest = window[0]
        return next(b for b in batches if any(e is oldest for e in b))

    def _requeue_front(self, entries: list[_Entry]) -> None:
        if self._closed:  # nothing will read the queue again
            for entry in entries:
                entry.job.fail(Unavailable("the server is shutting down"))
            return
        entries = [e for e in entries if not e.job.future.done()]  # never re-add dead ones
        for entry in reversed(entries):  # each back at the front of its client's queue
            client = entry.job.client
            queue = self._queues.get(client)
            if queue is None:  # its turn comes after the clients waiting now
                queue = self._queues[client] = deque()
                self._turn.append(client)
            queue.appendleft(entry)
            entry.job.queued_entries += 1
            entry.job.queued_tokens += len(entry.ids)
            self._count(client, len(entry.ids))
        self._entries += len(entries)

    def _arm_timer(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self.wake)

    def _send(self, worker: WorkerHandle, entries: list[_Entry], *,
              priority: bool = False) -> None:
        sizes = [len(e.ids) for e in entries]
        lengths = np.array(sizes, dtype=np.int32)
        ids = entries[0].ids if len(entries) == 1 else np.concatenate([e.ids for e in entries])
        batch = Batch(id=next(self._batch_ids), ids=ids, lengths=lengths, priority=priority,
                      alone=len(entries) == 1 and entries[0].attempts > 0)
        clients = {e.job.client for e in entries}
        for client in clients:
            self._client_batches[client] = self._client_batches.get(client, 0) + 1
        self.batches += 1
        self.batched_tokens += sum(sizes)
        self.padded_tokens += max(sizes) * len(sizes)
        future = worker.submit(batch)
        self.metrics.batch_sent(worker, lengths, [e.enqueued for e in entries], future)
        future.add_done_callback(lambda f: self._on_done(entries, f, clients))

    def _on_done(self, entries: list[_Entry], future: asyncio.Future[np.ndarray],
                 clients: set[str]) -> None:
        self.wake()
        for client in clients:
            left = self._client_batches[client] - 1
            if left:
                self._client_batches[client] = left
            else:
                del self._client_batches[client]
        exc = WorkerCrashed("the batch was cancelled", ran=False) if future.cancelled() else \
            future.exception()
        if isinstance(exc, WorkerCrashed):
            # The batch the worker was running is suspect: its texts are retried alone,
            # and a text that crashes a worker MAX_ATTEMPTS times fails. Batches that
            # only waited behind it go back to the queue unchanged.
            retry = []
            for entry in entries:
                entry.attempts += exc.ran
                if entry.attempts >= MAX_ATTEMPTS:
                    entry.job.fail(WorkerFailed(
                        f"this input crashed a worker {entry.attempts} times; it was not embedded"))
                elif not entry.job.future.done():
                    retry.append(entry)
            self._requeue_front(retry)
            return
        if exc is not None:
            error = exc if isinstance(exc, EmbedError) else WorkerFailed(str(exc))
            for entry in entries:
                entry.job.fail(error)
            return
        vectors = future.result()
        if vectors.shape != (len(entries), self.hidden_size):
            error = WorkerFailed(f"a worker returned {vectors.shape} for {len(entries)} texts")
            for entry in entries:
                entry.job.fail(error)
            return
        for row, entry in zip(vectors, entries, strict=True):
            job = entry.job
            if job.future.done():
                continue
            job.vectors[entry.index] = row
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.vectors)
