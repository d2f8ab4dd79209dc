"""The load engine: one process's share of the load, driven on its own event loop.

Closed loop: each client sends a request, waits for its answer, sends the next.
Open loop: requests leave at Poisson arrival times, at most `in_flight` outstanding,
and latency counts from the intended send time. Requests are unary Embed calls, or go
over long-lived EmbedStream calls (stream.py). What a process measured comes back as a
`WorkerResult`; the parent merges them (processes.py) and reports (report.py).

Besides `embedrpc bench`, the benchmarks drive their load through here: `connect` once,
then `drive` a pool of requests (workload.py) on that channel, with `on_answer` to see
every answer as it arrives (their own accounting, a check of the vectors).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from ..channel import channel_args
from ..client import DEFAULT_OPTIONS
from ..credentials import channel_credentials
from .histogram import Histogram
from .options import BenchConfig, BenchError
from .stream import CallFailed, StreamCaller
from .workload import Pool, Workload, request_pool

EMBED_METHOD = "/embedrpc.v1.Embedder/Embed"
RERANK_METHOD = "/embedrpc.v1.Reranker/Rerank"
CONNECT_TIMEOUT_S = 10.0
STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def poisson_gaps(rate: float, rng: np.random.Generator, chunk: int = 4096) -> Iterator[float]:
    """Endless exponential inter-arrival times (seconds) of a Poisson process at `rate`/s."""
    while True:
        yield from rng.exponential(1.0 / rate, size=chunk).tolist()


@dataclass
class WorkerResult:
    """What one load-generating process measured (merged across processes by the parent)."""

    latency: Histogram = field(default_factory=Histogram)  # measured successes
    send_lag: Histogram = field(default_factory=Histogram)  # open loop: sent - intended
    timeline: dict[int, Histogram] = field(default_factory=dict)  # by second of completion
    timeline_errors: dict[int, int] = field(default_factory=dict)
    ok: int = 0
    embeddings: int = 0  # or, with --rerank, pairs scored
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


ProgressFn = Callable[[dict[str, Any]], None]
# Called with (sent or due, answered, response) for every good answer, warm-up included.
AnswerFn = Callable[[float, float, pb.EmbedResponse], None]


class _Load:
    """Drives one process's share of the load on its own event loop."""

    def __init__(self, config: BenchConfig, share: Share, pool: Pool,
                 channel: grpc.aio.Channel, start_at: float,
                 on_answer: AnswerFn | None = None) -> None:
        self.config, self.share, self.pool = config, share, pool
        self.on_answer = on_answer
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
                StreamCaller(channel, config.timeout, config.metadata)
                for _ in range(config.streams)]
        elif config.rerank:
            unary = channel.unary_unary(RERANK_METHOD, request_serializer=None,
                                        response_deserializer=pb.RerankResponse.FromString)
            self.callers = [functools.partial(unary, timeout=config.timeout,
                                              metadata=config.metadata)]
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
            if isinstance(response, pb.RerankResponse):
                if len(response.results) != count:  # top_n is 0: every document
                    code = "BAD_RESPONSE"
            elif response.HasField("error"):
                code = STATUS_NAMES.get(response.error.code, str(response.error.code))
            elif response.count != count:
                code = "BAD_RESPONSE"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        except CallFailed as exc:
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
        if self.on_answer is not None:
            self.on_answer(start, done, response)
        latency = done - start
        self.done_ok += 1
        self.interval.record(latency)
        if not measured:
            self.result.warmup_ok += 1
            return
        r = self.result
        r.ok += 1
        r.embeddings += count
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
            tasks = [asyncio.create_task(self._open_loop())]
        else:
            tasks = [asyncio.create_task(self._closed_client(self.callers[i % len(self.callers)]))
                     for i in range(self.share.clients)]
        main = asyncio.gather(*tasks)
        # Every call has a deadline; this bounds the run even if one is not honoured.
        hard_stop = self.send_stop + self.config.timeout + 1.0
        try:
            await asyncio.wait_for(main, max(0.0, hard_stop - time.monotonic()))
        except TimeoutError:
            self.result.stopped_at_limit = True
        finally:
            # When one client failed (an on_answer that raised), the others stop too.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            for caller in self.callers:
                if isinstance(caller, StreamCaller):
                    await caller.close()
        if self.budget is not None and self.budget > 0:
            self.result.stopped_at_limit = True  # the time limit came before the count
        return self.result


async def connect(config: BenchConfig) -> grpc.aio.Channel:
    """A channel to config.target, ready (or BenchError within CONNECT_TIMEOUT_S)."""
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


async def server_info(channel: grpc.aio.Channel, config: BenchConfig) -> dict[str, Any] | None:
    """The server's Info (of the model the run loads), and a check that it accepts what
    the workload sends."""
    stub = pb_grpc.EmbedderStub(channel)
    try:
        info = await stub.Info(pb.InfoRequest(model=config.model), timeout=CONNECT_TIMEOUT_S,
                               metadata=config.metadata)
        task = "rerank" if config.rerank else "embed"
        if info.task and info.task != task:  # another model of the server, if it has one
            kind = [m.name for m in info.models if m.task == task]
            what = "reranker" if config.rerank else "embedding model"
            if config.model or len(kind) != 1:
                served = ", ".join(f"{m.name} ({m.task})" for m in info.models)
                fix = (f"--model {config.model} is not a {what}" if config.model
                       else f"no {what}" if not kind else f"name its {what} with --model")
                raise BenchError(f"{config.target} serves {served}; {fix}")
            info = await stub.Info(pb.InfoRequest(model=kind[0]), timeout=CONNECT_TIMEOUT_S,
                                   metadata=config.metadata)
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            return None
        raise BenchError(f"Info on {config.target} failed: {exc.code().name}: "
                         f"{exc.details()}") from None
    if config.rerank:
        return {"model": info.model, "task": "rerank", "version": info.version,
                "devices": list(info.devices), "workers": info.workers,
                "max_length": info.max_length, "precision": info.precision}
    if config.query_fraction > 0 and "query" not in info.prompt_names:
        raise BenchError(f"the server's model has no \"query\" prompt (it has: "
                         f"{', '.join(info.prompt_names) or 'none'}); use --query-fraction 0")
    return {"model": info.model, "dimensions": info.dimensions, "version": info.version,
            "devices": list(info.devices), "workers": info.workers,
            "max_length": info.max_length, "precision": info.precision}


async def drive(channel: grpc.aio.Channel, config: BenchConfig, pool: Pool, *,
                share: Share | None = None, start_at: float | None = None,
                on_answer: AnswerFn | None = None,
                on_progress: ProgressFn | None = None) -> WorkerResult:
    """Send `pool`'s requests in turn over `channel` as `config` says (clients or rate,
    unary or stream, warm-up, duration or request count, timeouts) from `start_at`
    (time.monotonic(); default now); return what was measured. `share`: this process's
    part of a run over several processes (default: all of it, config.processes == 1)."""
    if share is None:
        if config.processes != 1:
            raise ValueError("drive() without a share runs one process's load: "
                             f"processes must be 1, not {config.processes}")
        share = shares(config)[0]
    load = _Load(config, share, pool, channel,
                 time.monotonic() if start_at is None else start_at, on_answer)
    return await load.run(on_progress)


async def run_share(config: BenchConfig, share: Share, workload: Workload,
                    start: Callable[[], Any], on_progress: ProgressFn | None) -> WorkerResult:
    """Connect, then run one share from the instant `start()` returns (or resolves to)."""
    pool = request_pool(config, workload, seed=[config.seed, share.index, 0])
    channel = await connect(config)
    try:
        start_at = start()
        if asyncio.iscoroutine(start_at):
            start_at = await start_at
        return await drive(channel, config, pool, share=share, start_at=start_at,
                           on_progress=on_progress)
    finally:
        await channel.close()
