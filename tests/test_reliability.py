"""Faults injected into real servers: crashing workers, poison inputs, overload,
deadlines, cancellation and streams that stop reading.

The fake backend's vectors are a documented function of the token ids alone
(server/worker/backends.py `fake_vector`), so a vector is right exactly when it equals
that function of the ids the Tokenize RPC reports; real-model checks compare
with sentence-transformers (tests/data/demo_reference.json).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tokenizers import Tokenizer

import embedrpc.server
from embedrpc.client import AsyncEmbedClient, EmbedClient, decode, make_request
from embedrpc.server import EmbedServer
from embedrpc.server.worker.backends import fake_vector
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import DEMO_CASES, assert_close, qwen_tokenizer_file, running_server, wait_until

T = TypeVar("T")
HIDDEN = 64  # the fake model directory's hidden size
# ASCII texts never contain the byte-level tokens of this non-ASCII character.
POISON_TEXT = "☣☣☣ poison"
POISON_ID = Tokenizer.from_file(str(qwen_tokenizer_file())).encode("☣☣☣").ids[0]


def on_loop(server: EmbedServer, make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on the server's own event loop (to inspect loop-side state)."""
    assert server.loop is not None
    return asyncio.run_coroutine_threadsafe(_call(make), server.loop).result(30)


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


SERVER_CODE = str(Path(embedrpc.server.__file__).parent)


def server_tasks(server: EmbedServer) -> list[str]:
    """Our own tasks on the server's loop, besides the batcher (e.g. stream readers)."""
    async def ours() -> list[str]:
        found = []
        for task in asyncio.all_tasks():
            code = getattr(task.get_coro(), "cr_code", None)
            if code and code.co_filename.startswith(SERVER_CODE) and \
                    task.get_name() != "batcher":
                found.append(repr(task))
        return found
    return on_loop(server, ours)



def assert_drained(server: EmbedServer) -> None:
    """Nothing is left behind: no queued text, no token counted, no batch in flight."""
    router = server.router
    assert router is not None
    wait_until(lambda: router.queued_tokens == 0 and router.queued_entries == 0
               and all(w.in_flight == 0 for w in server.workers))


def expected_fake(client: EmbedClient, texts: list[str]) -> np.ndarray:
    """The fake backend's documented vectors for these texts, L2-normalised."""
    ids = [np.array(t.ids, dtype=np.int32) for t in client.tokenize(texts).inputs]
    vectors = np.stack([fake_vector(i, HIDDEN) for i in ids])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def health_status(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status


# -- 1. supervision ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kill", "segv", "exit"])
def test_poison_input_fails_alone_and_the_server_stays_up(fake_model_dir: Path,
                                                          mode: str) -> None:
    """A text that kills every worker it reaches fails with INTERNAL after 3 crashes;
    every other request, including those batched or pipelined with it, succeeds."""
    texts = [f"innocent text number {i} " + "word " * (i % 7) for i in range(60)]
    with running_server(model=str(fake_model_dir), backend="fake", workers=2,
                        max_batch_size=8, fake_crash_token=POISON_ID,
                        fake_crash_mode=mode) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        want = expected_fake(client, texts)

        async def main() -> list[Any]:
            async with AsyncEmbedClient(target, timeout=60) as aclient:
                calls = [aclient.embed(texts[i:i + 3]) for i in range(0, 60, 3)]
                calls.insert(7, aclient.embed(["innocent neighbour", POISON_TEXT]))
                return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        poisoned = results.pop(7)
        assert isinstance(poisoned, grpc.aio.AioRpcError)
        assert poisoned.code() == grpc.StatusCode.INTERNAL
        assert "crashed a worker 3 times" in (poisoned.details() or "")
        for i, got in enumerate(results):
            assert isinstance(got, np.ndarray), got
            np.testing.assert_allclose(got, want[3 * i:3 * i + 3], rtol=0, atol=1e-6)
        assert sum(w.restarts for w in server.workers) >= 3
        wait_until(lambda: all(w.alive for w in server.workers))
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        np.testing.assert_allclose(client.embed(texts[:5]), want[:5], rtol=0, atol=1e-6)
        assert_drained(server)


def test_workers_killed_with_hundreds_of_requests_in_flight() -> None:
    """SIGKILL workers at random moments while 300 requests are in flight at once:
    every request answers with sentence-transformers' vectors (cos >= 0.9999)."""
    pool = [(t, v) for name in ("documents", "multilingual", "long", "edge")
            for t, v in zip(DEMO_CASES[name]["inputs"], DEMO_CASES[name]["embeddings"],
                            strict=True)]
    rng = np.random.default_rng(7)
    requests = [rng.choice(len(pool), size=int(rng.integers(1, 6))) for _ in range(300)]
    with running_server(model="demo", workers=2, max_batch_size=4) as (server, target):

        async def main() -> tuple[list[Any], list[float]]:
            recoveries: list[float] = []

            async def killer() -> None:
                for _ in range(3):
                    await asyncio.sleep(float(rng.uniform(0.05, 0.3)))
                    alive = [w for w in server.workers if w.alive and w.pid]
                    if not alive:
                        continue
                    victim = alive[int(rng.integers(len(alive)))]
                    killed = time.monotonic()
                    os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
                    while not (victim.alive and victim.restarts):
                        await asyncio.sleep(0.01)
                    recoveries.append(time.monotonic() - killed)

            async with AsyncEmbedClient(target, timeout=120) as client:
                calls = [client.embed([pool[i][0] for i in idx]) for idx in requests]
                results, _ = await asyncio.gather(
                    asyncio.gather(*calls, return_exceptions=True), killer())
            return results, recoveries

        results, recoveries = asyncio.run(main())
        lost = [r for r in results if not isinstance(r, np.ndarray)]
        print(f"\n300 requests, {len(lost)} lost; {len(recoveries)} kills, recovery "
              f"{', '.join(f'{r:.2f}s' for r in recoveries)}")
        assert lost == []
        assert sum(w.restarts for w in server.workers) >= 1
        for idx, got in zip(requests, results, strict=True):
            assert_close(got, np.array([pool[i][1] for i in idx], dtype=np.float32),
                         "after worker kills")
        assert_drained(server)


# -- 2. overload ------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_three_times_capacity_is_refused_fast_and_leaves_nothing_behind(
        fake_model_dir: Path) -> None:
    """Capacity: 2 workers x 8 texts per 20 ms batch = 800 texts/s. Offered: 2400 texts/s
    (300 requests/s of 8 texts, Poisson-free fixed schedule) for 1.5 s. The queue holds
    about 4 batches, so an accepted request waits at most ~8 batch times; without a bound
    the backlog would reach ~2400 texts (3 s). Accepted p99 must stay under 1 s;
    refusals must come back RESOURCE_EXHAUSTED within 500 ms (p99; typically a few ms,
    the bound leaves room for a loaded machine) and faster than accepted calls (p50).
    Afterwards the queue is empty, the server healthy and memory back near its
    baseline (+32 MB)."""
    text = "overload " * 10  # 11 tokens with EOS
    with running_server(model=str(fake_model_dir), backend="fake", workers=2,
                        max_batch_size=8, max_batch_tokens=8 * 16, fake_delay_ms=20,
                        max_queue_tokens=4 * 8 * 11) as (server, target):

        async def burst(rate: float, seconds: float) -> list[tuple[str, float]]:
            async with AsyncEmbedClient(target, timeout=30) as client:
                async def one() -> tuple[str, float]:
                    started = time.monotonic()
                    try:
                        await client.embed([text] * 8)
                        outcome = "OK"
                    except grpc.aio.AioRpcError as exc:
                        outcome = exc.code().name
                    return outcome, time.monotonic() - started

                # Connection set-up is not overload: connect and make one call first.
                await client.channel.channel_ready()
                await client.embed([text])
                tasks = []
                start = time.monotonic()
                for i in range(int(rate * seconds)):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one()))
                return await asyncio.gather(*tasks)

        asyncio.run(burst(100, 0.5))  # warm-up: allocator and channel state
        baseline = _rss_mb()
        # The server shares this process with the whole test session: move what the
        # session allocated out of the garbage collector's way, so a full collection
        # of it does not pause the measured burst.
        gc.collect()
        gc.freeze()
        try:
            results = asyncio.run(burst(300, 1.5))
        finally:
            gc.unfreeze()
        ok = np.array([t for o, t in results if o == "OK"])
        refused = np.array([t for o, t in results if o == "RESOURCE_EXHAUSTED"])
        others = {o for o, _ in results} - {"OK", "RESOURCE_EXHAUSTED"}
        print(f"\noverload: {len(ok)} accepted (p50 {np.percentile(ok, 50) * 1e3:.0f} ms, "
              f"p99 {np.percentile(ok, 99) * 1e3:.0f} ms), {len(refused)} refused "
              f"(p99 {np.percentile(refused, 99) * 1e3:.1f} ms)")
        assert not others, others
        assert len(refused) > len(results) // 3, "3x capacity should be mostly refused"
        assert len(ok) > 0
        assert np.percentile(ok, 99) < 1.0
        assert np.percentile(refused, 99) < 0.5
        assert np.percentile(refused, 50) < np.percentile(ok, 50)
        assert_drained(server)
        assert health_status(target) == health_pb2.HealthCheckResponse.SERVING
        asyncio.run(burst(300, 1.5))  # a second burst must not grow memory either
        assert _rss_mb() - baseline < 32


# -- 3. deadlines, cancellation, streams -------------------------------------------


def test_expired_and_cancelled_requests_leave_nothing_behind(fake_model_dir: Path) -> None:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        max_batch_size=4, fake_delay_ms=50) as (server, target):
        texts = [[f"deadline {i}"] * 4 for i in range(120)]
        with EmbedClient(target) as client:
            sent = sum(len(t.ids) for batch in texts for t in client.tokenize(batch).inputs)
        batched_before = server.router.batched_tokens  # type: ignore[union-attr]

        async def main() -> list[str]:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.EmbedderStub(channel)
                calls = []
                for batch in texts:
                    calls.append(stub.Embed(make_request(batch), timeout=0.15))
                await asyncio.sleep(0.05)
                for call in calls[60:]:  # half cancelled by the client
                    call.cancel()
                codes = []
                for call in calls:
                    try:
                        await call
                        codes.append("OK")
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code().name)
                    except asyncio.CancelledError:
                        codes.append("CANCELLED")
                return codes

        codes = asyncio.run(main())
        # 50 ms per batch of 4 texts: in 150 ms only a few requests can finish.
        assert codes.count("OK") <= 12, codes
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}
        assert_drained(server)
        dispatched = server.router.batched_tokens - batched_before  # type: ignore[union-attr]
        assert dispatched < sent / 4, "expired work kept reaching the worker"
        wait_until(lambda: not server_tasks(server))


def test_a_stream_that_stops_reading_is_throttled_then_cleaned_up(
        fake_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A client that writes requests but never reads responses: the server stops
    reading the stream once its window (64 requests) and the transport's buffers are
    full, so the work it takes on stays bounded; cancelling the stream frees it all,
    quietly (a response the cancel cut off is no server error: nothing is logged at
    ERROR, as gRPC did for a write it made itself)."""
    caplog.set_level(logging.WARNING)
    big = ["flow control " * 20] * 32  # 32 texts/request; float responses ~ 9 kB each
    with running_server(model=str(fake_model_dir), backend="fake", workers=2,
                        max_inputs=100) as (server, target):
        router = server.router
        assert router is not None
        sent = 0

        async def main() -> None:
            nonlocal sent
            async with grpc.aio.insecure_channel(target) as channel:
                call = pb_grpc.EmbedderStub(channel).EmbedStream(timeout=60)
                for i in range(3000):
                    request = make_request(big, encoding="float")
                    request.request_id = str(i)
                    try:
                        await asyncio.wait_for(call.write(request), 0.5)
                    except TimeoutError:
                        break  # the server stopped reading: back-pressure reached us
                    sent += 1
                await asyncio.sleep(0.5)
                processed = router.batched_tokens
                await asyncio.sleep(0.5)
                assert router.batched_tokens == processed, "server kept working unread"
                call.cancel()

        asyncio.run(main())
        processed_requests = router.batched_tokens / (len(big) * 41)
        print(f"\nstream flow control: client wrote {sent} requests before blocking; "
              f"server processed ~{processed_requests:.0f}")
        assert sent < 3000, "3000 unread requests were all accepted: no back-pressure"
        assert processed_requests < 1500
        assert_drained(server)
        wait_until(lambda: not server_tasks(server))
        with EmbedClient(target, timeout=10) as client:
            assert client.embed(["still fine"]).shape == (1, HIDDEN)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_stream_closed_midway_by_the_client(fake_model_dir: Path) -> None:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        fake_delay_ms=30) as (server, target):

        async def main() -> int:
            async with grpc.aio.insecure_channel(target) as channel:
                call = pb_grpc.EmbedderStub(channel).EmbedStream(timeout=30)
                for i in range(40):
                    await call.write(make_request([f"text {i}"] * 4))
                got = 0
                for _ in range(2):
                    response = await call.read()
                    got += len(decode(response))
                call.cancel()
                return got

        assert asyncio.run(main()) == 8
        assert_drained(server)
        wait_until(lambda: not server_tasks(server))
