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
batch, to a `BatchMetrics` that does nothing by default (`Metrics.for_model(name)` gives
each model's router its own).

Several models (--model given more than once): every series about one model carries a
`model` label (calls: the model that served them, "" for calls about none, such as
health checks). With one model the series are as they always were, without it.
"""

from __future__ import annotations

import asyncio
import bisect
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
# Series looked up by Metrics._of and kept (methods × codes × models; beyond this bound,
# which label values never reach, a lookup is simply not kept).
MAX_CACHED_SERIES = 4096


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
        self._bound_list = self._bounds.tolist()
        self._counts = np.zeros(len(buckets) + 1, dtype=np.int64)  # last: above every bound
        self._sum = 0.0
        self._lock = threading.Lock()  # observed on the event loop, read by the scrape thread

    def observe_many(self, values: np.ndarray) -> None:
        n = len(values)
        if not n:
            return
        if n <= 4:  # a few values (single-text calls): numpy's set-up would cost more
            with self._lock:
                for value in values.tolist():
                    self._counts[bisect.bisect_left(self._bound_list, value)] += 1
                    self._sum += value
            return
        index = np.searchsorted(self._bounds, values, side="left")  # value <= bound
        counts = np.bincount(index, minlength=len(self._counts))
        with self._lock:
            self._counts += counts
            self._sum += float(values.sum())

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """(cumulative buckets as (le, count), sum)."""
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        labels = [*(repr(float(b)) for b in self._bounds), "+Inf"]
        return list(zip(labels, cumulative, strict=True)), total

    def collect(self) -> Iterator[Metric]:
        buckets, total = self.snapshot()
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                    sum_value=total)

    describe = collect


class _LabelledBulkHistogram:
    """_BulkHistogram per model (`models`), or one without labels (None)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 models: Sequence[str] | None) -> None:
        self.name = name
        self.documentation = documentation
        self._labelled = models is not None
        self._by_model = {m: _BulkHistogram(name, documentation, buckets)
                          for m in (models if models is not None else [""])}

    def observe_many(self, values: np.ndarray, model: str = "") -> None:
        key = model if self._labelled else ""
        histogram = self._by_model.get(key)
        if histogram is not None:
            histogram.observe_many(values)

    def collect(self) -> Iterator[Metric]:
        if not self._labelled:
            yield from self._by_model[""].collect()
            return
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        for model, histogram in self._by_model.items():
            counts, total = histogram.snapshot()
            family.add_metric([model], buckets=counts, sum_value=total)
        yield family

    describe = collect


def worker_families(labelled: bool,
                    workers: dict[str, Sequence[Any]]) -> tuple[Metric, ...]:
    """Workers alive, configured and restarted, by model (`workers`: model → its
    workers; a `model` label when `labelled`)."""
    m = ["model"] if labelled else []
    alive = GaugeMetricFamily("embedrpc_workers_alive", "Worker processes ready to serve.",
                              labels=m)
    configured = GaugeMetricFamily("embedrpc_workers", "Worker processes configured.",
                                   labels=m)
    restarts = CounterMetricFamily("embedrpc_worker_restarts", "Times a worker process "
                                   "died and was restarted.", labels=["worker", *m])
    for model, its in workers.items():
        label = [model] if labelled else []
        alive.add_metric(label, sum(1 for w in its if w.alive))
        configured.add_metric(label, len(its))
        for w in its:
            restarts.add_metric([w.name, *label], w.restarts)
    return alive, configured, restarts


class _StateCollector:
    """Queue depth, workers alive and worker restarts, read when Prometheus scrapes."""

    def __init__(self, labelled: bool) -> None:
        self.labelled = labelled  # a `model` label on every series
        # model → (router, workers)
        self.watched: dict[str, tuple[Any, Sequence[Any]]] = {}

    def collect(self) -> Iterator[Metric]:
        m = ["model"] if self.labelled else []
        texts = GaugeMetricFamily("embedrpc_queue_texts", "Texts waiting in the queue.",
                                  labels=m)
        tokens = GaugeMetricFamily("embedrpc_queue_tokens", "Tokens of the texts waiting "
                                   "in the queue.", labels=m)
        watched = self.watched or {"": (None, ())}
        for model, (router, _) in watched.items():
            label = [model] if self.labelled else []
            texts.add_metric(label, getattr(router, "queued_entries", 0) if router else 0)
            tokens.add_metric(label, router.queued_tokens if router else 0)
        yield from (texts, tokens)
        yield from worker_families(self.labelled, {model: workers for model, (_, workers)
                                                   in watched.items()})

    describe = collect


class _ModelBatches(BatchMetrics):
    """One model's router reports here (Metrics.for_model)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics = metrics
        self.model = model

    def batch_sent(self, worker: Any, lengths: np.ndarray, enqueued: Sequence[float],
                   future: asyncio.Future[Any]) -> None:
        self.metrics.record_batch(self.model, worker, lengths, enqueued, future)


class Metrics(BatchMetrics):
    """All metrics of one server, in `self.registry`. `models`: the names of the models
    served (several: series about one model get a `model` label); `model`: the one model
    (the same as models=[model])."""

    def __init__(self, *, model: str = "", models: Sequence[str] = ()) -> None:
        self.models = list(models) or [model]
        self.labelled = len(self.models) > 1
        m = ["model"] if self.labelled else []
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("embedrpc_requests", "Calls finished, by method and gRPC "
                                "status code.", ["method", "code", *m], registry=r)
        self.in_progress = Gauge("embedrpc_requests_in_progress", "Calls being served now, "
                                 "by method.", ["method"], registry=r)
        self.request_seconds = Histogram("embedrpc_request_duration_seconds", "Time from a "
                                         "call's arrival to its end.", ["method", *m],
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.embeddings = Counter("embedrpc_embeddings", "Embeddings returned.", m,
                                  registry=r)
        self.tokens = Counter("embedrpc_tokens", "Tokens embedded or scored (prompt tokens "
                              "of the returned embeddings, after prompts and truncation; of "
                              "the scored pairs).", m, registry=r)
        self.pairs = Counter("embedrpc_rerank_pairs", "Query-document pairs scored.", m,
                             registry=r)
        self.batch_texts = Histogram("embedrpc_batch_texts", "Texts per batch sent to a "
                                     "worker.", m, buckets=BATCH_TEXT_BUCKETS, registry=r)
        self.batch_padded_tokens = Histogram("embedrpc_batch_padded_tokens", "Padded tokens "
                                             "per batch (texts × longest text).", m,
                                             buckets=BATCH_TOKEN_BUCKETS, registry=r)
        self.batch_tokens = Counter("embedrpc_batch_tokens", "Real tokens sent to workers.",
                                    m, registry=r)
        self.batch_padding = Counter("embedrpc_batch_padding_tokens", "Padding tokens sent to "
                                     "workers (padded minus real: the waste).", m, registry=r)
        self.inference_seconds = Histogram("embedrpc_inference_duration_seconds", "Time a "
                                           "worker spent on one batch.", m,
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.busy_seconds = Counter("embedrpc_worker_busy_seconds", "Time each worker spent "
                                    "running batches.", ["worker", *m], registry=r)
        self.queue_seconds = _LabelledBulkHistogram(
            "embedrpc_queue_wait_seconds", "Time each text waited in the queue before its "
            "batch was sent.", LATENCY_BUCKETS, self.models if self.labelled else None)
        r.register(self.queue_seconds)
        self._state = _StateCollector(self.labelled)
        r.register(self._state)
        ProcessCollector(registry=r)
        build = Info("embedrpc_build", "Version and model served.",
                     ["model"] if self.labelled else [], registry=r)
        for name in self.models:
            (build.labels(name) if self.labelled else build).info(
                {"version": __version__} | ({} if self.labelled else {"model": name}))
        self._last_done: dict[str, float] = {}  # per worker: when its last batch ended
        self._series: dict[tuple[int, tuple[str, ...], str], Any] = {}  # see _of
        self._unmodelled = (self.in_progress,)  # series without a model label
        self._http: Any = None
        self._http_thread: threading.Thread | None = None

    def _of(self, metric: Any, *labels: str, model: str = "") -> Any:
        """`metric`'s series for `labels` (and the model, when series carry one), looked
        up once: prometheus_client's labels() takes a lock and checks every value, a few
        µs each time, and a single-text call reads about ten series."""
        key = (id(metric), labels, model)
        series = self._series.get(key)
        if series is None:
            values = [*labels, model] if self.labelled and metric not in self._unmodelled \
                else list(labels)
            series = metric.labels(*values) if values else metric
            if len(self._series) < MAX_CACHED_SERIES:  # label values come from a few sets
                self._series[key] = series
        return series

    # -- wiring --------------------------------------------------------------

    def watch(self, router: Any, workers: Sequence[Any], model: str = "") -> None:
        """Read queue depth from `router` and liveness and restarts from `workers` (the
        workers of `model`, one of `models`; the first by default)."""
        model = model or self.models[0]
        self._state.watched[model] = (router, list(workers))
        for w in workers:  # every worker's series exists from the start, at 0
            self._of(self.busy_seconds, w.name, model=model)

    def for_model(self, model: str) -> BatchMetrics:
        """What `model`'s router reports its batches to."""
        return _ModelBatches(self, model)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a thread; return the port (port 0: any free one)."""
        self._http, self._http_thread = start_http_server(port, host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop serving /metrics; safe to call again, from another thread too."""
        server, self._http = self._http, None
        thread, self._http_thread = self._http_thread, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(5.0)

    # -- recording -----------------------------------------------------------

    def call_started(self, method: str) -> None:
        self._of(self.in_progress, method).inc()

    def call_done(self, method: str, code: str, seconds: float, *, embeddings: int = 0,
                  tokens: int = 0, pairs: int = 0, model: str = "") -> None:
        """A call that `call_started` announced has ended with `code`; `model`: the model
        that served it ("" for none; only series with a model label show it)."""
        self._of(self.in_progress, method).dec()
        self._of(self.requests, method, code, model=model).inc()
        self._of(self.request_seconds, method, model=model).observe(seconds)
        if embeddings:
            self._of(self.embeddings, model=model).inc(embeddings)
        if pairs:
            self._of(self.pairs, model=model).inc(pairs)
        if embeddings or pairs:
            self._of(self.tokens, model=model).inc(tokens)

    def batch_sent(self, worker: Any, lengths: np.ndarray, enqueued: Sequence[float],
                   future: asyncio.Future[Any]) -> None:
        """A batch of the first model (for_model gives the others theirs)."""
        self.record_batch(self.models[0], worker, lengths, enqueued, future)

    def record_batch(self, model: str, worker: Any, lengths: np.ndarray,
                     enqueued: Sequence[float], future: asyncio.Future[Any]) -> None:
        sent = time.monotonic()
        name = worker.name
        sizes = lengths.tolist()  # a few texts: Python's sum and max cost less than numpy's
        n = len(sizes)
        real = sum(sizes)
        padded = max(sizes) * n if n else 0
        self._of(self.batch_texts, model=model).observe(n)
        self._of(self.batch_padded_tokens, model=model).observe(padded)
        self._of(self.batch_tokens, model=model).inc(real)
        self._of(self.batch_padding, model=model).inc(padded - real)
        self.queue_seconds.observe_many(sent - np.fromiter(enqueued, np.float64, count=n),
                                        model)
        future.add_done_callback(lambda f: self._batch_done(model, name, sent, f))

    def _batch_done(self, model: str, worker: str, sent: float,
                    future: asyncio.Future[Any]) -> None:
        # A worker runs its batches in the order sent: a batch starts when it was
        # sent or when the one before it ended, whichever is later.
        done = time.monotonic()
        started = max(sent, self._last_done.get(worker, 0.0))
        self._last_done[worker] = done
        self._of(self.busy_seconds, worker, model=model).inc(done - started)
        if not future.cancelled() and future.exception() is None:
            self._of(self.inference_seconds, model=model).observe(done - started)
