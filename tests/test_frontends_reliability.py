"""The reliability and security suites' attacks on `serve --frontends 2` (issue 13, item 5).

tests/test_reliability.py and tests/test_security.py run the one-process layout in this
process, where they can look inside (the router's queue, the workers' in-flight
batches). Here the same attacks meet two front-end processes on one port and a
supervisor that owns the workers (tests/helpers.py's running_frontends: the supervisor
in this process, fault injection in its workers). What they looked at inside is read
from outside instead: the supervisor's /metrics, summed over the front ends, must show
no queued text and no call in progress afterwards, and health must say SERVING.

Every client here opens its own TCP connection (OWN), so the kernel spreads them over
both front ends; a test that needs both to have served says so by their request counts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

from embedrpc.client import AsyncEmbedClient, EmbedClient, make_request
from embedrpc.server.worker.backends import fake_vector
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import qwen_tokenizer_file, running_frontends, serve, wait_until

HIDDEN = 64  # helpers.write_model_dir's
OWN = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection of the client's own
POISON_TEXT = "☣☣☣ poison"
POISON_ID = Tokenizer.from_file(str(qwen_tokenizer_file())).encode("☣☣☣").ids[0]


def scrape(port: int) -> dict[str, float]:
    """The supervisor's /metrics: each family's samples summed over their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


def assert_drained(port: int) -> None:
    """Nothing is left behind in any front end: no queued text or token, no call in
    progress (the routers' queues and the interceptors' gauges, summed)."""
    def drained() -> bool:
        m = scrape(port)
        return (m.get("embedrpc_queue_texts") == 0 and m.get("embedrpc_queue_tokens") == 0
                and m.get("embedrpc_requests_in_progress") == 0)
    wait_until(drained, 15)


def health(target: str) -> int:
    with grpc.insecure_channel(target, options=OWN) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10).status


def expected_fake(target: str, texts: list[str]) -> np.ndarray:
    """The fake backend's documented vectors for these texts, L2-normalised."""
    with EmbedClient(target, timeout=30, options=OWN) as client:
        ids = [np.array(t.ids, dtype=np.int32) for t in client.tokenize(texts).inputs]
    vectors = np.stack([fake_vector(i, HIDDEN) for i in ids])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def served_by_both(port: int, before: float = 0.0) -> bool:
    """More than one front end answered Embed calls (their own /metrics are not
    reachable from here; the supervisor's merged_total counts device batches that held
    batches of both, which needs both to have had calls in flight)."""
    return scrape(port).get("embedrpc_device_batches_merged_total", 0.0) > before


# -- supervision: a poison input ---------------------------------------------------------


@pytest.mark.parametrize("mode", ["kill", "exit"])
def test_poison_input_fails_alone_across_front_ends(fake_model_dir: Path, mode: str) -> None:
    """A text that kills every worker it reaches fails with INTERNAL after 3 crashes, while
    the workers merge batches of both front ends: every other request, including those
    in a device batch with it, gets its exact vectors (the fake backend's formula,
    atol 1e-6), the workers come back, and nothing is left queued."""
    texts = [f"innocent text number {i} " + "word " * (i % 7) for i in range(60)]
    with running_frontends(2, model=str(fake_model_dir), backend="fake", workers=2,
                           max_batch_size=8, fake_delay_ms=5, fake_crash_token=POISON_ID,
                           fake_crash_mode=mode) as (target, port):
        assert port is not None
        want = expected_fake(target, texts)

        async def main() -> list[Any]:
            clients = [AsyncEmbedClient(target, timeout=60, options=OWN) for _ in range(6)]
            try:
                calls = [clients[k % 6].embed(texts[i:i + 3])
                         for k, i in enumerate(range(0, 60, 3))]
                calls.insert(7, clients[1].embed(["innocent neighbour", POISON_TEXT]))
                return await asyncio.gather(*calls, return_exceptions=True)
            finally:
                for c in clients:
                    await c.close()

        results = asyncio.run(main())
        poisoned = results.pop(7)
        assert isinstance(poisoned, grpc.aio.AioRpcError), poisoned
        assert poisoned.code() == grpc.StatusCode.INTERNAL
        assert "crashed a worker 3 times" in (poisoned.details() or "")
        for i, got in enumerate(results):
            assert isinstance(got, np.ndarray), got
            np.testing.assert_allclose(got, want[3 * i:3 * i + 3], rtol=0, atol=1e-6)
        # The supervisor counts a restart once it has seen the death (the front ends may
        # have retried on the restarted worker before that).
        wait_until(lambda: scrape(port)["embedrpc_worker_restarts_total"] >= 3, 30)
        wait_until(lambda: scrape(port)["embedrpc_workers_alive"] == 2, 30)
        assert health(target) == health_pb2.HealthCheckResponse.SERVING
        with EmbedClient(target, timeout=30, options=OWN) as client:
            np.testing.assert_allclose(client.embed(texts[:5]), want[:5], rtol=0, atol=1e-6)
        assert_drained(port)


# -- overload ------------------------------------------------------------------------------


def test_three_times_capacity_is_refused_fast_by_every_front_end(fake_model_dir: Path) -> None:
    """Capacity: 2 workers x 8 texts per 20 ms batch = 800 texts/s. Offered: 2400 texts/s
    (300 requests/s of 8 texts) for 1.5 s over 8 connections. Each front end's queue
    holds about 4 batches (--max-queue-tokens is per front end), so an accepted request
    waits at most ~16 batch times: accepted p99 must stay under 1.5 s; refusals come
    back RESOURCE_EXHAUSTED within 500 ms (p99) and faster than accepted calls (p50).
    Afterwards no front end holds a queued text or a call, and health says SERVING."""
    text = "overload " * 10  # 11 tokens with EOS
    with running_frontends(2, model=str(fake_model_dir), backend="fake", workers=2,
                           max_batch_size=8, max_batch_tokens=8 * 16, fake_delay_ms=20,
                           max_queue_tokens=4 * 8 * 11) as (target, port):

        async def burst(rate: float, seconds: float) -> list[tuple[str, float]]:
            clients = [AsyncEmbedClient(target, timeout=30, options=OWN) for _ in range(8)]
            try:
                async def one(client: AsyncEmbedClient) -> tuple[str, float]:
                    started = time.monotonic()
                    try:
                        await client.embed([text] * 8)
                        outcome = "OK"
                    except grpc.aio.AioRpcError as exc:
                        outcome = exc.code().name
                    return outcome, time.monotonic() - started

                for client in clients:  # connection set-up is not overload
                    await client.channel.channel_ready()
                    await client.embed([text])
                tasks = []
                start = time.monotonic()
                for i in range(int(rate * seconds)):
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(clients[i % len(clients)])))
                return await asyncio.gather(*tasks)
            finally:
                for client in clients:
                    await client.close()

        asyncio.run(burst(100, 0.5))  # warm-up
        results = asyncio.run(burst(300, 1.5))
        ok = np.array([t for o, t in results if o == "OK"])
        refused = np.array([t for o, t in results if o == "RESOURCE_EXHAUSTED"])
        others = {o for o, _ in results} - {"OK", "RESOURCE_EXHAUSTED"}
        print(f"\noverload, 2 front ends: {len(ok)} accepted (p50 "
              f"{np.percentile(ok, 50) * 1e3:.0f} ms, p99 {np.percentile(ok, 99) * 1e3:.0f} "
              f"ms), {len(refused)} refused (p99 {np.percentile(refused, 99) * 1e3:.1f} ms)")
        assert not others, others
        assert len(refused) > len(results) // 4, "3x capacity should be largely refused"
        assert len(ok) > 0
        assert np.percentile(ok, 99) < 1.5
        assert np.percentile(refused, 99) < 0.5
        assert np.percentile(refused, 50) < np.percentile(ok, 50)
        assert_drained(port)
        assert health(target) == health_pb2.HealthCheckResponse.SERVING


# -- deadlines, cancellation, streams ------------------------------------------------------


def test_expired_and_cancelled_requests_leave_nothing_behind(fake_model_dir: Path) -> None:
    """120 requests of 4 texts with a 150 ms deadline over 4 connections, half of them
    cancelled by the client after 50 ms, against 50 ms per batch of 4: only a few can
    finish; the rest end DEADLINE_EXCEEDED or CANCELLED, their texts leave the queues
    (the device gets less than a quarter of what was sent) and nothing stays behind."""
    with running_frontends(2, model=str(fake_model_dir), backend="fake", workers=1,
                           max_batch_size=4, fake_delay_ms=50) as (target, port):
        texts = [[f"deadline {i}"] * 4 for i in range(120)]
        with EmbedClient(target, options=OWN) as client:
            sent = sum(len(t.ids) for batch in texts for t in client.tokenize(batch).inputs)
        batched_before = scrape(port)["embedrpc_batch_tokens_total"]

        async def main() -> list[str]:
            channels = [grpc.aio.insecure_channel(target, options=OWN) for _ in range(4)]
            try:
                stubs = [pb_grpc.EmbedderStub(c) for c in channels]
                calls = [stubs[i % 4].Embed(make_request(batch), timeout=0.15)
                         for i, batch in enumerate(texts)]
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
            finally:
                for c in channels:
                    await c.close()

        codes = asyncio.run(main())
        # 50 ms per batch of 4 texts on one worker: in 150 ms only a few requests finish.
        assert codes.count("OK") <= 12, codes
        assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}
        assert_drained(port)
        dispatched = scrape(port)["embedrpc_batch_tokens_total"] - batched_before
        assert dispatched < sent / 4, "expired work kept reaching the worker"


def test_a_stream_that_stops_reading_is_throttled_then_freed(fake_model_dir: Path) -> None:
    """A client that writes EmbedStream requests and never reads: its front end stops
    reading once the stream's window (64 requests) and the transport's buffers are full,
    so the work taken on stays bounded; cancelling the stream frees it all, and the
    server answers as before."""
    big = ["flow control " * 20] * 32
    with running_frontends(2, model=str(fake_model_dir), backend="fake", workers=2,
                           max_inputs=100) as (target, port):
        sent = 0

        async def main() -> None:
            nonlocal sent
            async with grpc.aio.insecure_channel(target, options=OWN) as channel:
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
                processed = scrape(port)["embedrpc_batch_tokens_total"]
                await asyncio.sleep(0.5)
                assert scrape(port)["embedrpc_batch_tokens_total"] == processed, \
                    "the server kept working for a client that does not read"
                call.cancel()

        asyncio.run(main())
        print(f"\nstream flow control, 2 front ends: the client wrote {sent} requests "
              "before blocking")
        assert sent < 3000, "3000 unread requests were all accepted: no back-pressure"
        assert_drained(port)
        with EmbedClient(target, timeout=10, options=OWN) as client:
            assert client.embed(["still fine"]).shape == (1, HIDDEN)


def test_stream_closed_midway_by_the_client(fake_model_dir: Path) -> None:
    with running_frontends(2, model=str(fake_model_dir), backend="fake", workers=1,
                           fake_delay_ms=30) as (target, port):

        async def main() -> int:
            async with grpc.aio.insecure_channel(target, options=OWN) as channel:
                call = pb_grpc.EmbedderStub(channel).EmbedStream(timeout=30)
                for i in range(40):
                    await call.write(make_request([f"text {i}"] * 4))
                got = 0
                for _ in range(2):
                    response = await call.read()
                    got += response.count
                call.cancel()
                return got

        assert asyncio.run(main()) == 8
        assert_drained(port)
        assert health(target) == health_pb2.HealthCheckResponse.SERVING


# -- what a front end that dies leaves behind -----------------------------------------------


FRONTEND = re.compile(r"(frontend-\d+) serving (?:again )?\(pid (\d+)")


def frontend_pids(caplog: pytest.LogCaptureFixture) -> dict[str, int]:
    """The front ends' pids, as the supervisor (in this process) logged them, latest last."""
    found: dict[str, int] = {}
    for record in caplog.records:
        if m := FRONTEND.search(record.getMessage()):
            found[m.group(1)] = int(m.group(2))
    return found


def test_a_killed_front_end_keeps_its_counts(fake_model_dir: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """The supervisor reads the front ends' counts every second, not only when scraped:
    calls answered more than a second before a front end is SIGKILLed stay in the
    server's totals (before, all it had counted since the last scrape was lost)."""
    caplog.set_level(logging.INFO, logger="embedrpc.server.supervisor")
    with running_frontends(2, model=str(fake_model_dir), backend="fake") as (target, port):
        wait_until(lambda: len(frontend_pids(caplog)) == 2, 30)
        calls = 40
        for i in range(calls):
            with EmbedClient(target, timeout=10, options=OWN) as client:
                client.embed([f"counted {i}"])
        time.sleep(2.5)  # at least one read of every front end, no scrape
        victim = frontend_pids(caplog)["frontend-0"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: frontend_pids(caplog).get("frontend-0") not in (None, victim), 30)
        ok = metric_value(port, "embedrpc_requests_total",
                          code="OK", method="/embedrpc.v1.Embedder/Embed")
        assert ok == calls


def metric_value(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_front_end_restarted_while_the_keys_file_is_broken_keeps_the_keys(
        fake_model_dir: Path, tmp_path: Path) -> None:
    """--api-keys-file emptied (a deploy half done), then a front end dies: it restarts
    with the keys the server had (the supervisor's last good copy) instead of failing
    over and over, so both front ends serve, each refusing a call without a key and
    taking the key; a SIGHUP with the file still empty reloads nothing anywhere, and one
    with a new file reaches every front end."""
    keys = tmp_path / "keys"
    old_key, new_key = "k-old-0123456789abcdef0123456789", "k-new-0123456789abcdef0123456789"
    keys.write_text(old_key + "\n")
    keys.chmod(0o600)
    with serve(fake_model_dir, "--frontends", "2", "--api-keys-file", str(keys)) as server:
        def pids() -> dict[str, int]:
            found: dict[str, int] = {}
            for line in server.lines:
                if m := FRONTEND.search(line):
                    found[m.group(1)] = int(m.group(2))
            return found

        def answers(key: str | None) -> set[str]:
            codes = set()
            for _ in range(8):  # connections of their own: both front ends are reached
                with EmbedClient(server.target, timeout=10, options=OWN, api_key=key,
                                 retries=1) as client:
                    try:
                        client.embed(["keyed"])
                        codes.add("OK")
                    except grpc.RpcError as exc:
                        codes.add(exc.code().name)  # type: ignore[attr-defined]
            return codes

        wait_until(lambda: len(pids()) == 2, 30)
        keys.write_text("")
        victim = pids()["frontend-1"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: pids().get("frontend-1") not in (None, victim), 30,
                   lambda: "".join(server.lines[-10:]))
        assert not any("restart 2" in line for line in server.lines), "".join(server.lines)
        assert answers(old_key) == {"OK"}
        assert answers(None) == {"UNAUTHENTICATED"}
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: any("SIGHUP: nothing reloaded" in line for line in server.lines), 10)
        assert answers(old_key) == {"OK"}
        keys.write_text(new_key + "\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: sum("SIGHUP: reloaded" in line for line in server.lines) == 2, 20,
                   lambda: "".join(server.lines[-10:]))
        assert answers(new_key) == {"OK"}
        assert answers(old_key) == {"UNAUTHENTICATED"}
