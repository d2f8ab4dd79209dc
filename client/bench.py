"""`embedrpc bench`: a load generator for any embedrpc server, and a no-op server to measure it.

Closed loop: `--concurrency N` clients each send a request, wait for its answer,
send the next. Open loop (`--rate R`): requests leave at Poisson arrival times
whatever the server does, at most `--concurrency` in flight (default 1000), and
latency runs from the *intended* send time, so a stalled server shows up in the
percentiles instead of silently slowing the load (no coordinated omission).

Calls are unary Embed with `--batch K` texts each, or requests over
`--streams` long-lived EmbedStream calls (`--stream`). `--processes P` spreads
the clients (and the rate) over P processes. Requests are serialised before
the run starts, so the harness spends its time on gRPC only.

Timeline: all processes start at one instant t0 (time.monotonic, system-wide);
requests sent (or, open loop, due) during [t0, t0 + warmup) are not measured;
then the run measures for `--duration` seconds, or the first `--requests` sends
(with both, whichever ends first).
Sending always stops by t0 + `--time-limit`; answers are awaited at most
`--timeout` longer, and calls still open then are cancelled (counted as CANCELLED).

Figures count successful requests; failed ones are counted by status code under
`errors` (gRPC codes; BAD_RESPONSE for an answer whose vector count differs from
its input count). Rates divide by the time from the start of measurement to the
last measured answer. Latency percentiles come from a Histogram (histogram.py,
three significant digits).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import multiprocessing
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_connections
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from embedrpc import __version__
from embedrpc.cli.options import parse_bool
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .channel import channel_args
from .client import DEFAULT_OPTIONS, ENCODINGS, make_request
from .corpus import (
    DEFAULT_DOC_LENGTHS,
    DEFAULT_QUERY_LENGTHS,
    LengthSpec,
    TextGenerator,
    load_corpus,
)
from .credentials import auth_metadata, channel_credentials
from .histogram import Histogram

EMBED_METHOD = "/embedrpc.v1.Embedder/Embed"
STREAM_METHOD = "/embedrpc.v1.Embedder/EmbedStream"
OPEN_LOOP_IN_FLIGHT = 1000  # default cap on outstanding open-loop requests
REQUEST_POOL = 1024  # distinct pre-serialised requests per process, sent in turn
CONNECT_TIMEOUT_S = 10.0
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class BenchError(Exception):
    """The run cannot go on (target unreachable, server lacks what the workload needs)."""


# -- configuration ---------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One load test. See `embedrpc bench --help` for each field."""

    target: str = "localhost:50051"
    concurrency: int | None = None  # closed loop: clients (default 8); open: max in flight
    duration: float | None = None  # measured seconds (default 10 unless requests is set)
    requests: int | None = None  # or: measure this many requests
    rate: float | None = None  # open loop: requests/s, Poisson arrivals
    batch: int = 1
    stream: bool = False
    streams: int = 1  # EmbedStream calls per process
    processes: int = 1
    corpus: str | None = None
    lengths: str = DEFAULT_DOC_LENGTHS
    query_lengths: str = DEFAULT_QUERY_LENGTHS
    query_fraction: float = 0.5
    texts: int = 4096
    locales: tuple[str, ...] | None = None
    seed: int = 0
    warmup: float = 1.0
    encoding: str = "float32"
    dimensions: int = 0
    timeout: float = 30.0
    time_limit: float = 600.0
    json_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    # Connection: API key (never written to the report) and TLS, as for EmbedClient.
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return auth_metadata(self.api_key)

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(bool(self.target.strip()), "--target must be HOST:PORT")
        need(self.concurrency is None or self.concurrency >= 1, "--concurrency must be >= 1")
        need(self.duration is None or self.duration > 0, "--duration must be > 0 seconds")
        need(self.requests is None or self.requests >= 1, "--requests must be >= 1")
        need(self.rate is None or (self.rate > 0 and math.isfinite(self.rate)),
             "--rate must be > 0 requests/s")
        need(self.batch >= 1, "--batch must be >= 1 texts per request")
        need(self.streams >= 1, "--streams must be >= 1")
        need(self.processes >= 1, "--processes must be >= 1")
        need(self.processes <= self.in_flight, f"--processes ({self.processes}) must not "
             f"exceed --concurrency ({self.in_flight}): each process needs a client")
        need(self.stream or self.streams == 1, "--streams needs --stream")
        need(0.0 <= self.query_fraction <= 1.0, "--query-fraction must be in 0..1")
        need(self.texts >= 1, "--texts must be >= 1")
        need(self.warmup >= 0, "--warmup must be >= 0 seconds")
        need(self.encoding in ENCODINGS, f"--encoding must be one of {', '.join(ENCODINGS)}")
        need(self.dimensions >= 0, "--dimensions must be >= 0 (0: the model's full size)")
        need(self.timeout > 0, "--timeout must be > 0 seconds")
        need(self.time_limit > 0, "--time-limit must be > 0 seconds")
        need(self.warmup + (self.duration or 0) <= self.time_limit,
             f"--warmup + --duration ({self.warmup + (self.duration or 0):g} s) exceeds "
             f"--time-limit ({self.time_limit:g} s)")
        LengthSpec.parse(self.lengths)
        LengthSpec.parse(self.query_lengths)

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def in_flight(self) -> int:
        """Closed loop: the number of clients; open loop: the cap on outstanding requests."""
        if self.concurrency is not None:
            return self.concurrency
        return OPEN_LOOP_IN_FLIGHT if self.open_loop else 8

    @property
    def measure_seconds(self) -> float | None:
        """The measured window, or None when the run counts requests instead."""
        if self.duration is not None:
            return self.duration
        return None if self.requests is not None else 10.0


def add_bench_arguments(p: Any) -> None:
    """The `embedrpc bench` flags, on cli.py's parser (each also reads EMBEDRPC_<FLAG>)."""
    opt = p.add_option
    opt("--target", default="localhost:50051",
        help="server address HOST:PORT; several replicas as HOST:PORT,HOST:PORT or "
             "dns:///NAME:PORT (round_robin across them)")
    opt("--concurrency", type=int, help="closed loop: concurrent clients (default 8); "
        f"open loop: most requests in flight (default {OPEN_LOOP_IN_FLIGHT})")
    opt("--duration", type=float, help="measured seconds, after the warm-up (default 10 "
        "unless --requests is given)")
    opt("--requests", type=int, help="measure this many requests instead of a duration")
    opt("--rate", type=float, help="open loop: send this many requests/s (Poisson arrivals); "
        "latency counts from each request's intended send time")
    opt("--batch", type=int, default=1, help="texts per request")
    opt("--stream", type=parse_bool, default=False, nargs="?", const=True, metavar="BOOL",
        help="send requests over EmbedStream instead of unary Embed")
    opt("--streams", type=int, default=1, help="with --stream: EmbedStream calls per process")
    opt("--processes", type=int, default=1, help="load-generating processes (clients and rate "
        "are split between them)")
    opt("--corpus", help="texts: a file with one per line, or JSON Lines with a \"text\" "
        "field (default: generated multilingual text)")
    opt("--lengths", default=DEFAULT_DOC_LENGTHS, help="generated documents' length in words: "
        "fixed:N, uniform:MIN:MAX or lognormal:MEDIAN:SIGMA[:MIN:MAX]")
    opt("--query-lengths", default=DEFAULT_QUERY_LENGTHS,
        help="generated queries' length in words (same forms as --lengths)")
    opt("--query-fraction", type=float, default=0.5,
        help="share of requests sent as queries (prompt_name \"query\"); the rest are documents")
    opt("--texts", type=int, default=4096, help="how many texts to generate")
    opt("--locales", help="comma-separated Faker locales for generated text "
        "(default: 12 languages with Faker, 8 built-in without)")
    opt("--seed", type=int, default=0, help="seed of the generated workload and arrivals")
    opt("--warmup", type=float, default=1.0, help="seconds of load before measuring")
    opt("--encoding", default="float32", choices=tuple(ENCODINGS), help="response encoding")
    opt("--dimensions", type=int, default=0, help="Matryoshka size requested (0: full)")
    opt("--timeout", type=float, default=30.0, help="deadline of each request, seconds")
    opt("--time-limit", type=float, default=600.0,
        help="stop sending after this many seconds whatever else is set")
    opt("--json", help="write the report as JSON to this file")
    opt("--plot", help="write a PNG of latency over time and its distribution "
        "(needs matplotlib: pip install 'embedrpc[bench]')")
    opt("--progress", type=parse_bool, default=True, metavar="BOOL",
        help="print a progress line each second on stderr")
    opt("--api-key", secret=True, help="API key, sent as 'authorization: Bearer KEY'")
    opt("--tls", type=parse_bool, default=False, metavar="BOOL",
        help="true: connect with TLS, trusting the system's root certificates")
    opt("--tls-ca", help="PEM CA certificate(s) to trust (implies --tls)")
    opt("--tls-cert", dest="client_tls_cert",
        help="PEM client certificate, for mutual TLS (with --tls-key; implies --tls)")
    opt("--tls-key", dest="client_tls_key", help="PEM private key of --tls-cert")
    opt("--noop-server", type=int, metavar="PORT", help="instead of a load test: serve a "
        "no-op Embedder on 127.0.0.1:PORT (answers at once with zero vectors) to measure "
        "the harness's own ceiling")
    opt("--noop-dimensions", type=int, default=1024, help="vector size of the no-op server")


def config_from_namespace(ns: argparse.Namespace) -> BenchConfig:
    locales = tuple(x.strip() for x in ns.locales.split(",") if x.strip()) if ns.locales \
        else None
    return BenchConfig(
        target=ns.target, concurrency=ns.concurrency, duration=ns.duration,
        requests=ns.requests, rate=ns.rate, batch=ns.batch, stream=ns.stream,
        streams=ns.streams, processes=ns.processes, corpus=ns.corpus, lengths=ns.lengths,
        query_lengths=ns.query_lengths, query_fraction=ns.query_fraction, texts=ns.texts,
        locales=locales, seed=ns.seed, warmup=ns.warmup, encoding=ns.encoding,
        dimensions=ns.dimensions, timeout=ns.timeout, time_limit=ns.time_limit,
        json_path=ns.json, plot_path=ns.plot, progress=ns.progress, api_key=ns.api_key,
        tls=ns.tls, tls_ca=ns.tls_ca, tls_cert=ns.client_tls_cert, tls_key=ns.client_tls_key)


def run_bench(ns: argparse.Namespace) -> int:
    """`embedrpc bench`: 0 when some request succeeded, 1 when none did or the run
    failed, 2 for invalid options."""
    if ns.noop_server is not None:
        return serve_noop(ns.noop_server, dimensions=ns.noop_dimensions)
    try:
        config = config_from_namespace(ns)
    except ValueError as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(config)
    except (BenchError, ValueError) as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nembedrpc bench: interrupted", file=sys.stderr)
        return 130
    print(format_report(result.report))
    return 0 if result.report["requests"] > 0 else 1


# -- workload --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Texts to send; `queries` go with prompt_name "query"."""

    documents: list[str]
    queries: list[str]
    source: str


def make_workload(config: BenchConfig) -> Workload:
    if config.corpus is not None:
        texts = load_corpus(config.corpus)
        return Workload(texts, texts, f"corpus {config.corpus} ({len(texts)} texts)")
    generator = TextGenerator(locales=config.locales, seed=config.seed)
    n_queries = round(config.texts * config.query_fraction)
    if config.query_fraction > 0:
        n_queries = max(1, n_queries)
    n_docs = config.texts - n_queries if config.query_fraction < 1 else 0
    if config.query_fraction < 1:
        n_docs = max(1, n_docs)
    docs = generator.texts(n_docs, LengthSpec.parse(config.lengths))
    queries = generator.texts(n_queries, LengthSpec.parse(config.query_lengths), query=True)
    words = "Faker" if generator.faker else "built-in word lists"
    return Workload(docs, queries, f"generated: {n_docs} documents ({config.lengths} words), "
                    f"{n_queries} queries ({config.query_lengths}), {len(generator.locales)} "
                    f"locales, {words}")


def request_pool(config: BenchConfig, workload: Workload, seed: int | Sequence[int],
                 size: int = REQUEST_POOL) -> list[tuple[bytes, int]]:
    """Serialised EmbedRequests and their input counts; queries with the given share."""
    rng = np.random.default_rng(seed)
    pool = []
    for _ in range(size):
        query = bool(workload.queries) and (not workload.documents
                                            or rng.random() < config.query_fraction)
        texts = workload.queries if query else workload.documents
        picks = rng.integers(0, len(texts), size=config.batch)
        request = make_request([texts[i] for i in picks.tolist()],
                               prompt_name="query" if query else "",
                               dimensions=config.dimensions, encoding=config.encoding)
        pool.append((request.SerializeToString(), config.batch))
    return pool


def poisson_gaps(rate: float, rng: np.random.Generator, chunk: int = 4096) -> Iterator[float]:
    """Endless exponential inter-arrival times (seconds) of a Poisson process at `rate`/s."""
    while True:
        yield from rng.exponential(1.0 / rate, size=chunk).tolist()


# -- one process's load ------------------------------------------------------------------


@dataclass
class WorkerResult:
    """What one load-generating process measured (merged across processes by the parent)."""

    latency: Histogram = field(default_factory=Histogram)  # measured successes
    send_lag: Histogram = field(default_factory=Histogram)  # open loop: sent - intended
    timeline: dict[int, Histogram] = field(default_factory=dict)  # by second of completion
    timeline_errors: dict[int, int] = field(default_factory=dict)
    ok: int = 0
    embeddings: int = 0
    tokens: int = 0
    sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    warmup_ok: int = 0
    warmup_errors: int = 0
    measure_start: float | None = None  # time.monotonic() when measurement began
    last_done: float | None = None  # time.monotonic() of the last measured answer or error
    stopped_at_limit: bool = False

    def merge(self, other: WorkerResult) -> None:
        self.latency.merge(other.latency)
        self.send_lag.merge(other.send_lag)
        for second, hist in other.timeline.items():
            self.timeline.setdefault(second, Histogram()).merge(hist)
        for second, n in other.timeline_errors.items():
            self.timeline_errors[second] = self.timeline_errors.get(second, 0) + n
        for code, n in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + n
        self.ok += other.ok
        self.embeddings += other.embeddings
        self.tokens += other.tokens
        self.sent += other.sent
        self.warmup_ok += other.warmup_ok
        self.warmup_errors += other.warmup_errors
        if other.last_done is not None:
            self.last_done = max(self.last_done or other.last_done, other.last_done)
        if self.measure_start is None:
            self.measure_start = other.measure_start  # one instant for every process
        self.stopped_at_limit |= other.stopped_at_limit


@dataclass(frozen=True)
class Share:
    """One process's part of the load."""

    index: int
    clients: int  # closed loop: clients; open loop: cap on requests in flight
    rate: float | None
    requests: int | None


def shares(config: BenchConfig) -> list[Share]:
    def split(total: int, i: int) -> int:
        return total // config.processes + (i < total % config.processes)

    return [Share(index=i, clients=split(config.in_flight, i),
                  rate=None if config.rate is None else config.rate / config.processes,
                  requests=None if config.requests is None else split(config.requests, i))
            for i in range(config.processes)]


class _CallFailed(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _StreamSession:
    """One EmbedStream call: requests written under a lock, answers matched by request_id."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.pending: dict[str, asyncio.Future[pb.EmbedResponse]] = {}
        self.lock = asyncio.Lock()
        self.broken: str | None = None
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        code = "UNKNOWN"  # the stream ended with requests unanswered
        try:
            while (response := await self.call.read()) is not grpc.aio.EOF:
                future = self.pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        finally:
            self.broken = code
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(_CallFailed(code))
            self.pending.clear()


class _StreamCaller:
    """Sends requests over one long-lived EmbedStream, reopening it if it breaks."""

    def __init__(self, channel: grpc.aio.Channel, timeout: float,
                 metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.method = functools.partial(
            channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                  response_deserializer=pb.EmbedResponse.FromString),
            metadata=metadata)
        self.timeout = timeout
        self.session: _StreamSession | None = None
        self.sessions: list[_StreamSession] = []
        self.next_id = 0

    async def __call__(self, body: bytes) -> pb.EmbedResponse:
        session = self.session
        if session is None or session.broken is not None:
            session = self.session = _StreamSession(self.method())
            self.sessions.append(session)
        self.next_id += 1
        request_id = format(self.next_id, "x")
        future: asyncio.Future[pb.EmbedResponse] = asyncio.get_running_loop().create_future()
        session.pending[request_id] = future
        try:
            async with session.lock:
                # Serialised messages concatenate field-wise (protobuf's merge rule),
                # so appending the request_id field sets it without re-encoding.
                await session.call.write(
                    body + pb.EmbedRequest(request_id=request_id).SerializeToString())
            return await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            raise _CallFailed("DEADLINE_EXCEEDED") from None
        except grpc.aio.AioRpcError as exc:
            raise _CallFailed(exc.code().name) from None
        except asyncio.InvalidStateError:  # written after the stream ended
            raise _CallFailed(session.broken or "UNKNOWN") from None
        finally:
            session.pending.pop(request_id, None)

    async def close(self) -> None:
        for session in self.sessions:
            if session.broken is None:
                with contextlib.suppress(Exception):
                    await session.call.done_writing()
            session.call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session.reader


ProgressFn = Callable[[dict[str, Any]], None]


class _Load:
    """Drives one process's share of the load on its own event loop."""

    def __init__(self, config: BenchConfig, share: Share, pool: list[tuple[bytes, int]],
                 channel: grpc.aio.Channel, start_at: float) -> None:
        self.config, self.share, self.pool = config, share, pool
        self.t0 = start_at
        self.m0 = start_at + config.warmup  # measurement starts
        window = config.measure_seconds
        limit = start_at + config.time_limit
        self.send_stop = min(limit, self.m0 + window) if window is not None else limit
        self.budget = share.requests  # measured sends left (None: by time)
        self.result = WorkerResult(measure_start=self.m0)
        self.interval = Histogram()  # latencies since the last progress report
        self.done_ok = self.done_errors = 0  # all phases, for progress
        self.in_flight = 0
        self.next_request = share.index * 7919 % len(pool)  # processes start apart
        self.rng = np.random.default_rng([config.seed, share.index, 1])
        if config.stream:
            self.callers: list[Callable[[bytes], Any]] = [
                _StreamCaller(channel, config.timeout, config.metadata)
                for _ in range(config.streams)]
        else:
            unary = channel.unary_unary(EMBED_METHOD, request_serializer=None,
                                        response_deserializer=pb.EmbedResponse.FromString)
            # The call object is awaitable itself; no wrapper coroutine per request.
            self.callers = [functools.partial(unary, timeout=config.timeout,
                                              metadata=config.metadata)]

    def _take(self, when: float) -> tuple[bytes, int, bool] | None:
        """The next request if one may be sent (or is due) at `when`, and if it is measured."""
        if when >= self.send_stop:
            return None
        measured = when >= self.m0
        if measured and self.budget is not None:
            if self.budget <= 0:
                return None
            self.budget -= 1
        body, count = self.pool[self.next_request]
        self.next_request = (self.next_request + 1) % len(self.pool)
        if measured:
            self.result.sent += 1
        return body, count, measured

    async def _one(self, caller: Callable[[bytes], Any], body: bytes, count: int,
                   start: float, measured: bool) -> None:
        code: str | None = None
        response: pb.EmbedResponse | None = None
        self.in_flight += 1
        try:
            response = await caller(body)
            if response.HasField("error"):
                code = STATUS_NAMES.get(response.error.code, str(response.error.code))
            elif response.count != count:
                code = "BAD_RESPONSE"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except _CallFailed as exc:
            code = exc.code
        except asyncio.CancelledError:
            if measured:  # still unanswered when the run had to end
                self._error("CANCELLED", time.monotonic())
            raise
        finally:
            self.in_flight -= 1
        done = time.monotonic()
        if code is not None:
            self.done_errors += 1
            if measured:
                self._error(code, done)
            else:
                self.result.warmup_errors += 1
            return
        assert response is not None
        latency = done - start
        self.done_ok += 1
        self.interval.record(latency)
        if not measured:
            self.result.warmup_ok += 1
            return
        r = self.result
        r.ok += 1
        r.embeddings += response.count
        r.tokens += response.usage.prompt_tokens
        r.latency.record(latency)
        second = int(done - self.m0)
        hist = r.timeline.get(second)
        if hist is None:
            hist = r.timeline[second] = Histogram()
        hist.record(latency)
        r.last_done = done

    def _error(self, code: str, when: float) -> None:
        r = self.result
        r.errors[code] = r.errors.get(code, 0) + 1
        second = int(when - self.m0)
        r.timeline_errors[second] = r.timeline_errors.get(second, 0) + 1
        r.last_done = max(r.last_done or when, when)

    async def _closed_client(self, caller: Callable[[bytes], Any]) -> None:
        while (now := time.monotonic()) < self.send_stop:
            taken = self._take(now)
            if taken is None:
                return
            await self._one(caller, *taken[:2], now, taken[2])

    async def _open_loop(self) -> None:
        assert self.share.rate is not None
        gaps = poisson_gaps(self.share.rate, self.rng)
        slots = asyncio.Semaphore(self.share.clients)
        tasks: set[asyncio.Task[None]] = set()
        intended = self.t0 + next(gaps)
        n = 0

        async def send(caller: Callable[[bytes], Any], body: bytes, count: int, due: float,
                       measured: bool) -> None:
            try:
                await self._one(caller, body, count, due, measured)
            finally:
                slots.release()

        try:
            while True:
                now = time.monotonic()
                if intended > now:
                    if intended >= self.send_stop:
                        break
                    await asyncio.sleep(intended - now)
                    continue
                taken = self._take(intended)
                if taken is None:
                    break
                await slots.acquire()  # if all slots are busy, the wait counts as latency
                if taken[2]:
                    self.result.send_lag.record(time.monotonic() - intended)
                caller = self.callers[n % len(self.callers)]
                n += 1
                task = asyncio.create_task(send(caller, *taken[:2], intended, taken[2]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                intended += next(gaps)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _report_progress(self, on_progress: ProgressFn) -> None:
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, self.t0 + tick - time.monotonic()))
            now = time.monotonic()
            on_progress({"tick": tick, "t": now - self.t0,  # phase of the second just ended
                         "phase": "warm-up" if tick - 1 < self.config.warmup else "measuring",
                         "ok": self.done_ok, "errors": self.done_errors,
                         "in_flight": self.in_flight, "interval": self.interval.to_dict()})
            self.interval = Histogram()

    async def run(self, on_progress: ProgressFn | None) -> WorkerResult:
        await asyncio.sleep(max(0.0, self.t0 - time.monotonic()))
        reporter = (asyncio.create_task(self._report_progress(on_progress))
                    if on_progress is not None else None)
        if self.config.open_loop:
            main = asyncio.ensure_future(self._open_loop())
        else:
            main = asyncio.ensure_future(asyncio.gather(*(
                self._closed_client(self.callers[i % len(self.callers)])
                for i in range(self.share.clients))))
        # Every call has a deadline; this bounds the run even if one is not honoured.
        hard_stop = self.send_stop + self.config.timeout + 1.0
        try:
            await asyncio.wait_for(main, max(0.0, hard_stop - time.monotonic()))
        except TimeoutError:
            self.result.stopped_at_limit = True
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            for caller in self.callers:
                if isinstance(caller, _StreamCaller):
                    await caller.close()
        if self.budget is not None and self.budget > 0:
            self.result.stopped_at_limit = True  # the time limit came before the count
        return self.result


async def _connect(config: BenchConfig) -> grpc.aio.Channel:
    # Several replicas (HOST:PORT,HOST:PORT or dns:///NAME:PORT) get round_robin, as the
    # client library does; no retries, so every failure shows in the error counts.
    try:
        target, options = channel_args(config.target, DEFAULT_OPTIONS, retries=1)
    except ValueError as exc:
        raise BenchError(f"--target {config.target}: {exc}") from None
    credentials = channel_credentials(tls=config.tls, root_certificates=config.tls_ca,
                                      client_cert=config.tls_cert, client_key=config.tls_key)
    channel = (grpc.aio.secure_channel(target, credentials, options=options)
               if credentials else grpc.aio.insecure_channel(target, options=options))
    try:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
    except TimeoutError:
        await channel.close()
        raise BenchError(f"cannot connect to {config.target} within {CONNECT_TIMEOUT_S:g} s"
                         ) from None
    return channel


async def _server_info(channel: grpc.aio.Channel, config: BenchConfig) -> dict[str, Any] | None:
    """The server's Info, and a check that it accepts what the workload sends."""
    stub = pb_grpc.EmbedderStub(channel)
    try:
        info = await stub.Info(pb.InfoRequest(), timeout=CONNECT_TIMEOUT_S,
                               metadata=config.metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise BenchError(f"Info on {config.target} failed: {exc.code().name}: "
                         f"{exc.details()}") from None
    if config.query_fraction > 0 and "query" not in info.prompt_names:
        raise BenchError(f"the server's model has no \"query\" prompt (it has: "
                         f"{', '.join(info.prompt_names) or 'none'}); use --query-fraction 0")
    return {"model": info.model, "dimensions": info.dimensions, "version": info.version,
            "devices": list(info.devices), "workers": info.workers,
            "max_length": info.max_length, "precision": info.precision}


async def _run_share(config: BenchConfig, share: Share, workload: Workload,
                     start: Callable[[], Any], on_progress: ProgressFn | None) -> WorkerResult:
    """Connect, then run one share from the instant `start()` returns (or resolves to)."""
    pool = request_pool(config, workload, seed=[config.seed, share.index, 0])
    channel = await _connect(config)
    try:
        start_at = start()
        if asyncio.iscoroutine(start_at):
            start_at = await start_at
        load = _Load(config, share, pool, channel, start_at)
        return await load.run(on_progress)
    finally:
        await channel.close()


# -- processes -------------------------------------------------------------------------


def _child_main(conn: Connection, config: BenchConfig, share: Share) -> None:
    """A load-generating process: workload in → ready → start instant in → progress → result.

    The workload comes over the pipe rather than as a Process argument: a child that
    dies while starting then gives the parent an EOF, not a write blocked forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    workload: Workload = conn.recv()

    def start() -> float:
        conn.send(("ready", None))
        return float(conn.recv())

    try:
        result = asyncio.run(_run_share(config, share, workload, start,
                                        lambda snapshot: conn.send(("progress", snapshot))))
        conn.send(("result", result))
    except BenchError as exc:
        conn.send(("error", str(exc)))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def _run_processes(config: BenchConfig, workload: Workload,
                   progress: _Progress | None) -> WorkerResult:
    ctx = multiprocessing.get_context("spawn")
    conns: list[Connection] = []
    procs = []
    try:
        for share in shares(config):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(child, config, share),
                               name=f"embedrpc-bench-{share.index}", daemon=True)
            proc.start()
            child.close()
            conns.append(parent)
            procs.append(proc)
        for i, conn in enumerate(conns):
            try:
                conn.send(workload)
            except (BrokenPipeError, ConnectionResetError):
                raise BenchError(f"load process {i} exited while starting (a script that "
                                 "runs several processes needs an `if __name__ == '__main__':` "
                                 "guard)") from None
        owner = {conn: i for i, conn in enumerate(conns)}
        ready: set[Connection] = set()
        results: dict[int, WorkerResult] = {}
        deadline = time.monotonic() + 120.0  # start-up: imports, connect, serialise
        started = False
        while len(results) < len(conns):
            waiting = [c for c in conns if owner[c] not in results]
            readable = wait_connections(waiting, timeout=max(0.0, deadline - time.monotonic()))
            if not readable:
                raise BenchError("load processes did not answer in time")
            for conn in readable:
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    raise BenchError(f"load process {owner[conn]} exited unexpectedly") \
                        from None
                if kind == "error":
                    raise BenchError(payload)
                if kind == "ready":
                    ready.add(conn)
                elif kind == "progress" and progress is not None:
                    progress.add(owner[conn], payload)
                elif kind == "result":
                    results[owner[conn]] = payload
            if not started and len(ready) == len(conns):
                start_at = time.monotonic() + 0.2
                for conn in conns:
                    conn.send(start_at)
                started = True
                deadline = start_at + config.time_limit + config.timeout + 30.0
        merged = WorkerResult()
        for i in sorted(results):
            merged.merge(results[i])
        return merged
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)


# -- progress and the run ------------------------------------------------------------------


class _Progress:
    """Prints one line per second on stderr once every process reported that second."""

    def __init__(self, config: BenchConfig, processes: int, stream: TextIO) -> None:
        self.config, self.processes, self.stream = config, processes, stream
        self.ticks: dict[int, list[dict[str, Any]]] = {}
        self.tty = stream.isatty()
        self.last_ok = 0

    def add(self, process: int, snapshot: dict[str, Any]) -> None:
        got = self.ticks.setdefault(snapshot["tick"], [])
        got.append(snapshot)
        if len(got) == self.processes:
            del self.ticks[snapshot["tick"]]
            self._print(got)

    def _print(self, snapshots: list[dict[str, Any]]) -> None:
        interval = Histogram()
        for s in snapshots:
            interval.merge(Histogram.from_dict(s["interval"]))
        ok = sum(s["ok"] for s in snapshots)
        total = self.config.warmup + (self.config.measure_seconds or 0)
        of = f"/{total:.0f}s" if self.config.measure_seconds is not None else "s"
        line = (f"{snapshots[0]['t']:5.1f}{of} {snapshots[0]['phase']:9} "
                f"{ok - self.last_ok:7,d} req/s  "
                f"p50 {_ms(interval.percentile(50))} ms  p99 {_ms(interval.percentile(99))} ms"
                f"  in flight {sum(s['in_flight'] for s in snapshots):4d}  "
                f"errors {sum(s['errors'] for s in snapshots):,d}")
        self.last_ok = ok
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class BenchResult:
    report: dict[str, Any]
    latency: Histogram  # measured successes, seconds


def run(config: BenchConfig, *, progress_stream: TextIO | None = None) -> BenchResult:
    """Run one load test; writes --json and --plot files when configured."""
    if config.plot_path is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'embedrpc[bench]'") from None
    workload = make_workload(config)
    server = asyncio.run(_probe(config))
    progress = (_Progress(config, config.processes, progress_stream or sys.stderr)
                if config.progress else None)
    try:
        if config.processes == 1:
            merged = asyncio.run(_run_share(
                config, shares(config)[0], workload, lambda: time.monotonic() + 0.05,
                None if progress is None else (lambda s: progress.add(0, s))))
        else:
            merged = _run_processes(config, workload, progress)
    finally:
        if progress is not None:
            progress.finish()
    report = build_report(config, merged, server=server, workload=workload.source)
    result = BenchResult(report, merged.latency)
    if config.json_path:
        Path(config.json_path).write_text(json.dumps(report, indent=2) + "\n")
    if config.plot_path:
        write_plot(config.plot_path, report, merged.latency)
    return result


async def _probe(config: BenchConfig) -> dict[str, Any] | None:
    channel = await _connect(config)
    try:
        return await _server_info(channel, config)
    finally:
        await channel.close()


# -- report ------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "n/a"
    return f"{seconds * 1000:.2f}"


def _latency_ms(hist: Histogram) -> dict[str, float | None]:
    if not hist.count:
        return {**dict.fromkeys(PERCENTILES), "max": None, "mean": None, "min": None}
    out: dict[str, float | None] = {name: round(hist.percentile(p) * 1000, 4)
                                    for name, p in PERCENTILES.items()}
    out["max"] = round(hist.max * 1000, 4)
    out["mean"] = round(hist.mean * 1000, 4)
    out["min"] = round(hist.min * 1000, 4)
    return out


def build_report(config: BenchConfig, result: WorkerResult, *, elapsed: float | None = None,
                 server: dict[str, Any] | None = None, workload: str = "") -> dict[str, Any]:
    """The report as a JSON-ready dict. `elapsed` (seconds) defaults to the time from the
    start of measurement to the last measured answer."""
    if elapsed is None:
        if result.last_done is not None and result.measure_start is not None:
            elapsed = result.last_done - result.measure_start
        else:
            elapsed = config.measure_seconds or 0.0
    elapsed = max(elapsed, 1e-9)
    report: dict[str, Any] = {
        "requests_per_s": round(result.ok / elapsed, 3),
        "embeddings_per_s": round(result.embeddings / elapsed, 3),
        "tokens_per_s": round(result.tokens / elapsed, 3),
        "latency_ms": _latency_ms(result.latency),
        "errors": dict(sorted(result.errors.items())),
        "requests": result.ok,
        "failed": sum(result.errors.values()),
        "embeddings": result.embeddings,
        "tokens": result.tokens,
        "sent": result.sent,
        "elapsed_s": round(elapsed, 4),
        "warmup": {"requests": result.warmup_ok, "failed": result.warmup_errors},
        "stopped_at_time_limit": result.stopped_at_limit,
    }
    if config.open_loop:
        report["send_lag_ms"] = _latency_ms(result.send_lag)
    report["timeline"] = [
        {"second": s, "requests": result.timeline[s].count if s in result.timeline else 0,
         "errors": result.timeline_errors.get(s, 0),
         **{f"{k}_ms": v for k, v in _latency_ms(result.timeline.get(s, Histogram())).items()
            if k in ("p50", "p99", "max")}}
        for s in sorted(set(result.timeline) | set(result.timeline_errors))]
    report["config"] = {
        "target": config.target, "mode": "open" if config.open_loop else "closed",
        "call": "EmbedStream" if config.stream else "Embed",
        "concurrency": config.in_flight, "rate": config.rate, "batch": config.batch,
        "streams": config.streams if config.stream else None,
        "processes": config.processes, "duration_s": config.measure_seconds,
        "requests": config.requests, "warmup_s": config.warmup,
        "time_limit_s": config.time_limit, "timeout_s": config.timeout,
        "encoding": config.encoding, "dimensions": config.dimensions,
        "query_fraction": config.query_fraction, "workload": workload, "seed": config.seed,
    }
    report["server"] = server
    report["harness"] = {"embedrpc": __version__, "grpcio": grpc.__version__,
                         "python": platform.python_version(), "cpu_count": os.cpu_count(),
                         "platform": platform.platform(),
                         "histogram_relative_precision": result.latency.relative_precision}
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    c = report["config"]
    s = report.get("server") or {}
    model = f" · model {s['model']} ({s['dimensions']} dims)" if s else ""
    if c["mode"] == "open":
        load = f"open loop {c['rate']:,.0f} req/s (Poisson), ≤{c['concurrency']} in flight"
    else:
        load = f"closed loop, {_n(c['concurrency'], 'client')}"
    call = (f"EmbedStream ({_n(c['streams'], 'stream')} per process)"
            if c["call"] == "EmbedStream" else "unary Embed")
    measured = (f"{report['elapsed_s']:.2f} s" if c["requests"] is None
                else f"{c['requests']:,d} requests in {report['elapsed_s']:.2f} s")
    lat = report["latency_ms"]
    lines = [
        f"target {c['target']}{model}",
        f"{load}, {_n(c['processes'], 'process', 'es')} · {call}, "
        f"{_n(c['batch'], 'text')} per request · {c['encoding']}",
        f"measured {measured} after {c['warmup_s']:g} s warm-up",
        f"  requests    {report['requests']:>12,d}   {report['requests_per_s']:>12,.1f} /s",
        f"  embeddings  {report['embeddings']:>12,d}   {report['embeddings_per_s']:>12,.1f} /s",
        f"  tokens      {report['tokens']:>12,d}   {report['tokens_per_s']:>12,.1f} /s",
        "  latency ms  " + "  ".join(
            f"{name} {_fmt_ms(lat[key])}" for name, key in
            (("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p99.9", "p999"),
             ("max", "max"), ("mean", "mean"))),
    ]
    if "send_lag_ms" in report:
        lag = report["send_lag_ms"]
        lines.append(f"  send lag ms p99 {_fmt_ms(lag['p99'])}  max {_fmt_ms(lag['max'])}"
                     f"  (sent {report['sent']:,d})")
    errors = report["errors"]
    lines.append("  errors      " + (", ".join(f"{code} {n:,d}" for code, n in errors.items())
                                     if errors else "none"))
    if report["stopped_at_time_limit"]:
        lines.append("  stopped at the time limit before the run was complete")
    return "\n".join(lines)


def _n(count: int, noun: str, plural: str = "s") -> str:
    return f"{count:,d} {noun}{'' if count == 1 else plural}"


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_plot(path: str | Path, report: dict[str, Any], latency: Histogram) -> None:
    """PNG: per-second p50/p99/max latency and throughput; the percentile distribution."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    over_time, spectrum = fig.subplots(1, 2)
    timeline = report["timeline"]
    seconds = [row["second"] + 1 for row in timeline]
    for key, style in (("p50_ms", "-"), ("p99_ms", "--"), ("max_ms", ":")):
        values = [np.nan if row[key] is None else row[key] for row in timeline]
        over_time.plot(seconds, values, style, marker=".", label=key[:-3])
    over_time.set_ylim(bottom=0)
    over_time.set_xlabel("second of measurement")
    over_time.set_ylabel("latency, ms")
    over_time.set_title("Latency over time (per second)")
    rate_axis = over_time.twinx()
    rate_axis.bar(seconds, [row["requests"] for row in timeline], color="0.85", zorder=0,
                  label="requests/s")
    rate_axis.set_ylabel("requests completed per second")
    over_time.set_zorder(rate_axis.get_zorder() + 1)
    over_time.patch.set_visible(False)
    over_time.legend(loc="lower center", ncols=3, framealpha=0.9)

    # HdrHistogram-style percentile spectrum: x = 1 / (1 - quantile), log scale.
    if latency.count:
        xs, ys, seen = [1.0], [latency.min * 1000], 0
        for value, n in latency.buckets():
            seen += n
            q = min(seen / latency.count, 1 - 1 / (10 * latency.count))
            xs.append(1 / (1 - q))
            ys.append(value * 1000)
        spectrum.step(xs, ys, where="pre")
        spectrum.set_xscale("log")
        ticks = [t for t in (2, 10, 100, 1000, 10000, 100000) if t <= xs[-1] * 1.01]
        spectrum.set_xticks(ticks, [f"{100 * (1 - 1 / t):g}%" for t in ticks])
    spectrum.set_xlabel("percentile")
    spectrum.set_ylabel("latency, ms")
    lat = report["latency_ms"]
    spectrum.set_title(f"Latency distribution (p50 {_fmt_ms(lat['p50'])} ms, "
                       f"p99 {_fmt_ms(lat['p99'])} ms, n={report['requests']:,d})")
    spectrum.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100)


# -- a no-op server, to measure the harness --------------------------------------------------


class NoopEmbedder:
    """Answers Embed and EmbedStream at once with zero vectors, tokenizing nothing.

    usage.prompt_tokens is an estimate (UTF-8 characters / 4 + 1 per input), so
    tokens/s figures against it are indicative only.
    """

    def __init__(self, dimensions: int = 1024, *, delay: float = 0.0) -> None:
        self.dimensions = dimensions
        self.delay = delay  # seconds before each answer (tests of the harness's timing)
        self._bodies: dict[tuple[int, int, int], bytes] = {}

    def answer(self, request: pb.EmbedRequest) -> bytes:
        n = len(request.inputs)
        d = request.dimensions or self.dimensions
        key = (n, d, request.encoding)
        body = self._bodies.get(key)
        if body is None:
            response = pb.EmbedResponse(dimensions=d, encoding=request.encoding, count=n)
            if request.encoding == pb.ENCODING_FLOAT:
                for _ in range(n):
                    response.embeddings.add().values.extend([0.0] * d)
            else:
                row = {pb.ENCODING_FLOAT16_BYTES: 2 * d,
                       pb.ENCODING_UBINARY: (d + 7) // 8}.get(request.encoding, 4 * d)
                response.data = bytes(row * n)
            body = response.SerializeToString()
            if len(self._bodies) < 4096:
                self._bodies[key] = body
        tokens = sum(len(text) for text in request.inputs) // 4 + n
        # Concatenated messages merge: the cached vectors plus this request's fields.
        return body + pb.EmbedResponse(request_id=request.request_id,
                                       usage=pb.Usage(prompt_tokens=tokens)).SerializeToString()

    async def embed(self, request: pb.EmbedRequest, context: Any) -> bytes:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answer(request)

    async def embed_stream(self, requests: Any, context: Any) -> Any:
        async for request in requests:
            if self.delay:
                await asyncio.sleep(self.delay)
            yield self.answer(request)

    async def info(self, request: pb.InfoRequest, context: Any) -> pb.InfoResponse:
        return pb.InfoResponse(model="noop", dimensions=self.dimensions, min_dimensions=1,
                               max_length=8192, prompt_names=["query"], pooling="none",
                               precision="float32", devices=["none"], version=__version__,
                               max_inputs=1 << 20, workers=0)

    def handler(self) -> grpc.GenericRpcHandler:
        request = pb.EmbedRequest.FromString
        return grpc.method_handlers_generic_handler("embedrpc.v1.Embedder", {
            "Embed": grpc.unary_unary_rpc_method_handler(
                self.embed, request_deserializer=request, response_serializer=None),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(
                self.embed_stream, request_deserializer=request, response_serializer=None),
            "Info": grpc.unary_unary_rpc_method_handler(
                self.info, request_deserializer=pb.InfoRequest.FromString,
                response_serializer=pb.InfoResponse.SerializeToString),
        })


async def start_noop_server(port: int = 0, *, host: str = "127.0.0.1", dimensions: int = 1024,
                            delay: float = 0.0) -> tuple[grpc.aio.Server, int]:
    """Start a NoopEmbedder server; returns (server, bound port)."""
    # No SO_REUSEPORT: a second server on a busy port must fail, not share the load.
    server = grpc.aio.server(options=(*DEFAULT_OPTIONS, ("grpc.so_reuseport", 0)))
    server.add_generic_rpc_handlers((NoopEmbedder(dimensions, delay=delay).handler(),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpc raises this when the address cannot be bound
        bound = 0
    if bound == 0:
        raise BenchError(f"cannot listen on {host}:{port} (port in use?)")
    await server.start()
    return server, bound


def serve_noop(port: int, *, dimensions: int = 1024) -> int:
    """`embedrpc bench --noop-server PORT`: serve until SIGINT or SIGTERM."""
    if not 0 <= port <= 65535 or dimensions < 1:
        print("embedrpc bench: --noop-server takes a port 0..65535 (0: any free port) and "
              "--noop-dimensions >= 1", file=sys.stderr)
        return 2

    async def main() -> None:
        server, bound = await start_noop_server(port, dimensions=dimensions)
        print(f"no-op Embedder listening on 127.0.0.1:{bound} ({dimensions} dims); "
              "Ctrl-C stops it", file=sys.stderr, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(None)

    try:
        asyncio.run(main())
    except BenchError as exc:
        print(f"embedrpc bench: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "Histogram",
    "NoopEmbedder",
    "Workload",
    "add_bench_arguments",
    "build_report",
    "format_report",
    "make_workload",
    "poisson_gaps",
    "request_pool",
    "run",
    "run_bench",
    "serve_noop",
    "start_noop_server",
    "write_plot",
]
