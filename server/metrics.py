"""Prometheus metrics: the registry, and what the router, workers and front ends report.

Each EmbedServer owns one `Metrics` with its own CollectorRegistry, so several
servers in one process never share or clash. What is measured where:

- per call (frontends/grpc_observing.py for gRPC, frontends/http.py for HTTP): requests by
  method and status code, total latency, embeddings and tokens returned; the
  interceptor also gives each call its request id (for logs) and a tracing span;
- per batch (the router calls `batch_sent`): texts and padded tokens per batch,
  padding waste, each text's wait in the queue, inference time, worker busy time;
- at scrape time (read from the router and the worker handles): queue depth,
  workers alive, worker restarts.

The router and worker code hold no metric logic: the router makes one call per
batch, to a `BatchMetrics` that does nothing by default.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from embedrpc import __version__

log = logging.getLogger(__name__)

# Seconds: from half a millisecond (a single short text on a GPU) to a minute.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_TEXT_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
BATCH_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 19))  # 16 .. 262144


class BatchMetrics:
    """What the router reports per batch. This base class records nothing."""

    def batch_sent(self, worker: Any, lengths: np.ndarray, enqueued: Sequence[float],
                   future: asyncio.Future[Any]) -> None:
        """A batch of texts (token `lengths`, queued at monotonic times `enqueued`) went to
        `worker` (a WorkerHandle); `future` resolves when the worker answers or the batch
        is lost."""


class _BulkHistogram:
    """A histogram that takes many observations in one numpy call (per-text queue waits
    arrive a batch at a time; prometheus_client's Histogram observes one value per call)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self._bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()  # observed on the event loop, read by the scrape thread

    def observe_many(self, values: np.ndarray) -> None:
        if not len(values):
            return
        index = np.searchsorted(self._bounds, values, side="left")  # value <= bound
        counts = np.bincount(index, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        labels = [*(repr(float(b)) for b in self._bounds), "+Inf"]
        yield HistogramMetricFamily(self.name, self.documentation,
                                    buckets=list(zip(labels, cumulative, strict=True)),
                                    sum_value=total)

    describe = collect


class _StateCollector:
    """Queue depth, workers alive and worker restarts, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.router: Any = None
        self.workers: Sequence[Any] = ()

    def collect(self) -> Iterator[Metric]:
        router, workers = self.router, list(self.workers)
        texts = GaugeMetricFamily("embedrpc_queue_texts", "Texts waiting in the queue.")
        tokens = GaugeMetricFamily("embedrpc_queue_tokens", "Tokens of the texts waiting "
                                   "in the queue.")
        texts.add_metric([], getattr(router, "queued_entries", 0) if router else 0)
        tokens.add_metric([], router.queued_tokens if router else 0)
        yield texts
        yield tokens
        alive = GaugeMetricFamily("embedrpc_workers_alive", "Worker processes ready to serve.")
        alive.add_metric([], sum(1 for w in workers if w.alive))
        yield alive
        configured = GaugeMetricFamily("embedrpc_workers", "Worker processes configured.")
        configured.add_metric([], len(workers))
        yield configured
        restarts = CounterMetricFamily("embedrpc_worker_restarts", "Times a worker process "
                                       "died and was restarted.", labels=["worker"])
        for w in workers:
            restarts.add_metric([w.name], w.restarts)
        yield restarts

    describe = collect


class Metrics(BatchMetrics):
    """All metrics of one server, in `self.registry`."""

    def __init__(self, *, model: str = "") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedrpc_requests", "Calls finished, by method and gRPC "
                                "status code.", ["method", "code"], registry=r)
        self.in_progress = Gauge("embedrpc_requests_in_progress", "Calls being served now, "
                                 "by method.", ["method"], registry=r)
        self.request_seconds = Histogram("embedrpc_request_duration_seconds", "Time from a "
                                         "call's arrival to its end.", ["method"],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.embeddings = Counter("embedrpc_embeddings", "Embeddings returned.", registry=r)
        self.tokens = Counter("embedrpc_tokens", "Tokens embedded (prompt tokens of the "
                              "returned embeddings, after prompts and truncation).", registry=r)
        self.batch_texts = Histogram("embedrpc_batch_texts", "Texts per batch sent to a "
                                     "worker.", buckets=BATCH_TEXT_BUCKETS, registry=r)
        self.batch_padded_tokens = Histogram("embedrpc_batch_padded_tokens", "Padded tokens "
                                             "per batch (texts × longest text).",
                                             buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_tokens = Counter("embedrpc_batch_tokens", "Real tokens sent to workers.",
                                    registry=r)
        self.batch_padding = Counter("embedrpc_batch_padding_tokens", "Padding tokens sent to "
                                     "workers (padded minus real: the waste).", registry=r)
        self.inference_seconds = Histogram("embedrpc_inference_duration_seconds", "Time a "
                                           "worker spent on one batch.",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.busy_seconds = Counter("embedrpc_worker_busy_seconds", "Time each worker spent "
                                    "running batches.", ["worker"], registry=r)
        self.queue_seconds = _BulkHistogram("embedrpc_queue_wait_seconds", "Time each text "
                                            "waited in the queue before its batch was sent.",
                                            LATENCY_BUCKETS)
        r.register(self.queue_seconds)
        self._state = _StateCollector()
        r.register(self._state)
        ProcessCollector(registry=r)
        Info("embedrpc_build", "Version and model served.", registry=r).info(
            {"version": __version__, "model": model})
        self._last_done: dict[str, float] = {}  # per worker: when its last batch ended
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    # -- wiring --------------------------------------------------------------

    def watch(self, router: Any, workers: Sequence[Any]) -> None:
        """Read queue depth from `router` and liveness and restarts from `workers`."""
        self._state.router, self._state.workers = router, list(workers)
        for w in workers:  # every worker's series exists from the start, at 0
            self.busy_seconds.labels(w.name)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a thread; return the port (port 0: any free one)."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(5.0)
            self._http_thread = None

    # -- recording -----------------------------------------------------------

    def call_started(self, method: str) -> None:
        self.in_progress.labels(method).inc()

    def call_done(self, method: str, code: str, seconds: float, *, embeddings: int = 0,
                  tokens: int = 0) -> None:
        """A call that `call_started` announced has ended with `code`."""
        self.in_progress.labels(method).dec()
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)
        if embeddings:
            self.embeddings.inc(embeddings)
            self.tokens.inc(tokens)

    def batch_sent(self, worker: Any, lengths: np.ndarray, enqueued: Sequence[float],
                   future: asyncio.Future[Any]) -> None:
        sent = time.monotonic()
        name = worker.name
        n = len(lengths)
        real = int(lengths.sum())
        padded = int(lengths.max()) * n if n else 0
        self.batch_texts.observe(n)
        self.batch_padded_tokens.observe(padded)
        self.batch_tokens.inc(real)
        self.batch_padding.inc(padded - real)
        self.queue_seconds.observe_many(sent - np.fromiter(enqueued, np.float64, count=n))
        future.add_done_callback(lambda f: self._batch_done(name, sent, f))

    def _batch_done(self, worker: str, sent: float, future: asyncio.Future[Any]) -> None:
        # A worker runs its batches in the order sent: a batch starts when it was
        # sent or when the one before it ended, whichever is later.
        done = time.monotonic()
        started = max(sent, self._last_done.get(worker, 0.0))
        self._last_done[worker] = done
        self.busy_seconds.labels(worker).inc(done - started)
        if not future.cancelled() and future.exception() is None:
            self.inference_seconds.observe(done - started)
