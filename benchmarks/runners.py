"""The suite's measured sides, each in its own process, driven over a pipe.

Every side runs in a separate `spawn`ed process so that none of them shares an
interpreter (GIL, thread pools, imported torch) with another:

- `RawOrt`: ONNX Runtime sessions in-process (the ceiling), via the worker's own
  `OrtBackend` (IOBinding, right padding, pooling), tokenization excluded;
- `SentenceTransformers`: `SentenceTransformer(model_dir)` on torch CPU;
- `ServerHost`: a whole `EmbedServer` (what `embedrpc serve` runs) on 127.0.0.1,
  port 0, reporting its CPU use and the router's batch counters;
- `LoadGen`: gRPC load from the load-test harness's engine (embedrpc.client.bench:
  unary batches, EmbedStream, single-text latency), started at a higher niceness so
  that, on a machine with few cores, the load generator yields the CPU to the server
  it measures.

A measurement runs `warmup` seconds, then `seconds` more; only the work inside the
second interval counts. A call or batch that straddles an edge counts in proportion
to its overlap with the interval, so slow models (a few batches per second) do not
quantise the rate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process or by `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # gone (a restarted worker): the suite reports restarts separately
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


# -- measuring -------------------------------------------------------------


@dataclass
class Recorder:
    """Completed units of work: (start, end, embeddings, tokens). list.append is atomic."""

    events: list[tuple[float, float, int, int]] = field(default_factory=list)

    def add(self, start: float, end: float, embeddings: int, tokens: int) -> None:
        self.events.append((start, end, embeddings, tokens))

    def summary(self, t0: float, t1: float, *, latency: bool = False) -> dict[str, Any]:
        span = t1 - t0
        emb = tok = req = 0.0
        lat = []
        for start, end, n, tokens in self.events:
            overlap = min(end, t1) - max(start, t0)
            if overlap <= 0:
                continue
            share = overlap / (end - start) if end > start else 1.0
            emb += n * share
            tok += tokens * share
            req += share
            if t0 <= end <= t1:
                lat.append(end - start)
        out: dict[str, Any] = {"seconds": span, "embeddings_per_s": emb / span,
                               "tokens_per_s": tok / span, "requests_per_s": req / span}
        if latency:
            out["latencies_ms"] = [round(x * 1000, 4) for x in lat]
        return out


def timed_window(warmup: float, seconds: float, stop: threading.Event,
                 on_edge: Callable[[], float]) -> tuple[float, float, float, float]:
    """Sleep through warm-up and the interval; return (t0, t1, value at t0, value at t1)."""
    start = time.perf_counter()
    time.sleep(max(0.0, start + warmup - time.perf_counter()))
    t0, v0 = time.perf_counter(), on_edge()
    time.sleep(max(0.0, t0 + seconds - time.perf_counter()))
    t1, v1 = time.perf_counter(), on_edge()
    stop.set()
    return t0, t1, v0, v1


def run_threads(targets: list[Callable[[], None]], warmup: float, seconds: float,
                stop: threading.Event, recorder: Recorder, *, latency: bool = False,
                join_timeout: float = 600.0) -> dict[str, Any]:
    """Run load threads for warmup + seconds; summarise the interval and this process's CPU."""
    errors: list[str] = []

    def guarded(target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                stop.set()
        return run

    threads = [threading.Thread(target=guarded(t), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    t0, t1, c0, c1 = timed_window(warmup, seconds, stop, process_cpu_s)
    for thread in threads:
        thread.join(join_timeout)
    if errors:
        raise RuntimeError(f"load thread failed: {errors[0]}")
    out = recorder.summary(t0, t1, latency=latency)
    out["cpu_cores"] = (c1 - c0) / (t1 - t0)
    return out


# -- the sides ---------------------------------------------------------------


class RawOrt:
    """ONNX Runtime in-process: `sessions` sessions × `threads` threads, one Python thread
    per session pulling batches from a shared list (tokenization done beforehand)."""

    def __init__(self, model_dir: str, cores: int, batch_sets: dict[str, list[Any]]) -> None:
        """`batch_sets`: name → list of workload.Packed batches; more with `add_batches`."""
        from embedrpc.server.model import load_model_spec
        from embedrpc.server.tokenizer import TextEncoder

        self.spec = load_model_spec(model_dir)
        self.pad_id = TextEncoder(self.spec).pad_id
        self.cores = cores
        self.batch_sets = batch_sets
        self.backends: dict[tuple[int, bool], list[Any]] = {}

    def add_batches(self, *, name: str, batches: list[list[np.ndarray]]) -> int:
        from workload import pack_ids

        self.batch_sets[name] = pack_ids(batches)
        return len(batches)

    def _backends(self, sessions: int, spin: bool) -> list[Any]:
        from embedrpc.server.worker.backends import OrtBackend
        from embedrpc.server.worker.spec import WorkerSpec

        key = (sessions, spin)
        if key not in self.backends:
            spec = WorkerSpec.of(onnx_path=str(self.spec.onnx_path), device="cpu",
                              threads=max(1, self.cores // sessions), spin=spin,
                              pooling=self.spec.pooling, pad_id=self.pad_id,
                              hidden_size=self.spec.hidden_size)
            self.backends[key] = [OrtBackend(spec) for _ in range(sessions)]
            for backend in self.backends[key]:
                backend.warmup()
        return self.backends[key]

    def measure(self, *, sessions: int, batching: str, spin: bool, warmup: float,
                seconds: float) -> dict[str, Any]:
        backends = self._backends(sessions, spin)
        batches = self.batch_sets[batching]
        stop = threading.Event()
        recorder = Recorder()
        lock = threading.Lock()
        counter = iter(range(1 << 62))

        def loop(backend: Any) -> Callable[[], None]:
            def run() -> None:
                while not stop.is_set():
                    with lock:
                        batch = batches[next(counter) % len(batches)]
                    start = time.perf_counter()
                    backend.embed(batch.ids, batch.lengths)
                    recorder.add(start, time.perf_counter(), batch.rows, batch.tokens)
            return run

        out = run_threads([loop(b) for b in backends], warmup, seconds, stop, recorder)
        out["batch_rows"] = float(np.mean([b.rows for b in batches]))
        out["padding"] = sum(b.padded for b in batches) / sum(b.tokens for b in batches) - 1
        return out


class SentenceTransformers:
    """sentence-transformers on torch CPU, all cores, the client batches' shapes."""

    def __init__(self, model_dir: str, cores: int, batches: list[Any]) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(cores)
        with contextlib.suppress(Exception):
            import transformers

            transformers.logging.disable_progress_bar()
        self.model = SentenceTransformer(model_dir, device="cpu")
        self.batches = batches
        self.versions = {"torch": torch.__version__}

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True,
                                 show_progress_bar=False)

    def measure(self, *, warmup: float, seconds: float) -> dict[str, Any]:
        stop = threading.Event()
        recorder = Recorder()

        def run() -> None:
            i = 0
            while not stop.is_set():
                batch = self.batches[i % len(self.batches)]
                start = time.perf_counter()
                self.embed(list(batch.texts))
                recorder.add(start, time.perf_counter(), batch.rows, batch.tokens)
                i += 1

        return run_threads([run], warmup, seconds, stop, recorder)


class ServerHost:
    """A whole EmbedServer on its own event-loop thread (as `embedrpc serve` runs it)."""

    def __init__(self, log_file: str, **config: Any) -> None:
        import asyncio

        from embedrpc.server import EmbedServer, ServeConfig

        logging.basicConfig(filename=log_file, level=logging.INFO,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="server-loop",
                                       daemon=True)
        self.thread.start()
        self.server = EmbedServer(ServeConfig.of(host="127.0.0.1", port=0, **config))
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(600)

    def info(self) -> dict[str, Any]:
        return {"port": self.port, "pid": os.getpid(),
                "worker_pids": [w.pid for w in self.server.workers],
                "threads_per_worker": self.server.workers[0].spec.threads}

    def start_recording(self, *, limit: int = 5000) -> None:
        """Keep the token ids of the batches the router sends from now on (at most `limit`)."""
        router = self.server.router
        assert router is not None
        self.recorded: list[list[np.ndarray]] = []
        send = type(router)._send

        def recording_send(worker: Any, entries: list[Any]) -> None:
            if len(self.recorded) < limit:
                self.recorded.append([e.ids for e in entries])
            send(router, worker, entries)

        router._send = recording_send  # type: ignore[method-assign]

    def stop_recording(self) -> list[list[np.ndarray]]:
        router = self.server.router
        with contextlib.suppress(AttributeError):
            del router._send  # the class's method again
        return self.recorded

    def sample(self) -> dict[str, Any]:
        """Cumulative CPU seconds (main process, workers) and the router's counters."""
        router = self.server.router
        assert router is not None
        return {"main_cpu_s": process_cpu_s(),
                "workers_cpu_s": sum(process_cpu_s(w.pid) for w in self.server.workers),
                "batches": router.batches, "batched_tokens": router.batched_tokens,
                "padded_tokens": router.padded_tokens,
                "restarts": sum(w.restarts for w in self.server.workers),
                "t": time.perf_counter()}

    def close(self) -> None:
        import asyncio

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.server.stop(grace=1.0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class LoadGen:
    """gRPC clients with pre-built requests (float32-bytes responses), driven by the
    harness's load engine."""

    def __init__(self, nice: int = 0) -> None:
        if nice:
            os.nice(nice)
        self.nice = os.nice(0)

    def embed(self, *, target: str, texts: list[str]) -> np.ndarray:
        from embedrpc.client import EmbedClient

        with EmbedClient(target, timeout=120) as client:
            return client.embed(texts)

    def measure(self, *, target: str, mode: str, requests: list[list[str]], concurrency: int,
                warmup: float, seconds: float) -> dict[str, Any]:
        """unary: `concurrency` closed-loop clients, each on a connection of its own (the
        server tells clients apart by connection) sending its share of `requests` in turn;
        stream: one EmbedStream with `concurrency` requests in flight; latency: one client.
        The interval and this process's CPU are summarised as for the other sides
        (Recorder)."""
        import asyncio

        from embedrpc.client.bench import BenchConfig, connect, drive, pool_from_texts

        if mode == "latency":
            concurrency = 1
        elif mode not in ("unary", "stream"):
            raise ValueError(f"unknown mode {mode!r}")
        pool = pool_from_texts(requests, encoding="float32")
        connections = concurrency if mode == "unary" else 1
        pools = [pool[k::connections] or pool for k in range(connections)]
        # Calls in flight when the interval ends are waited for (not cancelled): the share
        # of their work inside the interval counts.
        config = BenchConfig(target=target, concurrency=concurrency // connections,
                             stream=mode == "stream", warmup=warmup, duration=seconds,
                             timeout=120.0, query_fraction=0.0, progress=False)
        recorder = Recorder()

        def on_answer(start: float, done: float, response: Any) -> None:
            recorder.add(start, done, response.count, response.usage.prompt_tokens)

        async def sample_cpu(*instants: float) -> list[tuple[float, float]]:
            samples = []
            for instant in instants:
                await asyncio.sleep(max(0.0, instant - time.monotonic()))
                samples.append((time.monotonic(), process_cpu_s()))
            return samples

        async def measure() -> tuple[list[Any], list[tuple[float, float]]]:
            # Connected before the clock starts.
            channels = [await connect(config) for _ in range(connections)]
            try:
                start = time.monotonic()
                edges = asyncio.create_task(sample_cpu(start + warmup, start + warmup + seconds))
                results = await asyncio.gather(*(
                    drive(channel, config, share, start_at=start, on_answer=on_answer)
                    for channel, share in zip(channels, pools, strict=True)))
                return results, await edges
            finally:
                for channel in channels:
                    await channel.close()

        results, [(t0, c0), (t1, c1)] = asyncio.run(measure())
        failed = [(code, n) for r in results for code, n in r.errors.items()]
        warmup_failed = sum(r.warmup_errors for r in results)
        if failed or warmup_failed:
            raise RuntimeError(f"{mode} load: calls failed: {failed}, and {warmup_failed} in "
                               "the warm-up")
        out = recorder.summary(t0, t1, latency=True)
        out["cpu_cores"] = (c1 - c0) / (t1 - t0)
        out["client_nice"] = self.nice
        return out


SIDES: dict[str, type] = {"raw": RawOrt, "st": SentenceTransformers, "server": ServerHost,
                          "load": LoadGen}


def runner_main(conn: Connection, side: str, kwargs: dict[str, Any]) -> None:
    """Entry point of a side's process: build it, then answer (method, kwargs) calls."""
    logging.getLogger().setLevel(logging.WARNING)
    try:
        obj = SIDES[side](**kwargs)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        method, args = message
        try:
            conn.send(("ok", getattr(obj, method)(**args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
    with contextlib.suppress(Exception):
        close = getattr(obj, "close", None)
        if close is not None:
            close()
