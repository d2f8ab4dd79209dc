"""Several replicas behind one Python client: round_robin spreads the load, and a replica
that stops mid-run (drained, cut off, or SIGKILLed) loses no request, because the client
retries UNAVAILABLE (and CANCELLED) with gRPC's retry policy on another replica.

Which replica answered is read from each server's router (`Router.batched_tokens`: the
tokens it sent to its workers). Every vector is checked against the fake backend's
documented formula (server/worker/backends.py `fake_vector` of the token ids, L2-normalised).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.client.channel import channel_args, resolve_target, service_config
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.worker.backends import fake_vector

from .helpers import wait_until

HIDDEN = 64  # helpers.write_model_dir's hidden size


# -- targets and service config (no server) ------------------------------------------


def test_several_targets_become_one_static_target() -> None:
    expect = ("ipv4:127.0.0.1:5001,127.0.0.2:5002", True)
    assert resolve_target(["127.0.0.1:5001", "127.0.0.2:5002"]) == expect
    assert resolve_target(" 127.0.0.1:5001, 127.0.0.2:5002 ") == expect
    assert resolve_target("localhost:5001,localhost:5002") == \
        ("ipv4:127.0.0.1:5001,127.0.0.1:5002", True)
    assert resolve_target(["[::1]:5001", "[::1]:5002"]) == ("ipv6:[::1]:5001,[::1]:5002", True)
    # One address or any gRPC URI passes through; dns: names a set of replicas.
    assert resolve_target("localhost:50051") == ("localhost:50051", False)
    assert resolve_target(["10.1.2.3:50051"]) == ("10.1.2.3:50051", False)
    assert resolve_target("unix:/run/embedrpc.sock") == ("unix:/run/embedrpc.sock", False)
    assert resolve_target("dns:///embedrpc.default.svc:50051") == \
        ("dns:///embedrpc.default.svc:50051", True)


@pytest.mark.parametrize(("target", "message"), [
    ("", "no target given"),
    ("127.0.0.1:5001,127.0.0.1", "must be HOST:PORT"),
    ("127.0.0.1:5001,dns:///x:5", "must be HOST:PORT"),
    ("127.0.0.1:5001,127.0.0.1:99999", "must be HOST:PORT"),
    ("127.0.0.1:5001,[::1]:5002", "cannot be mixed"),
    ("127.0.0.1:5001,no-such-host.invalid:5002", "cannot resolve"),
])
def test_bad_targets_say_what_is_allowed(target: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_target(target)


def test_service_config_balances_and_retries_unavailable() -> None:
    target, options = channel_args(["127.0.0.1:1", "127.0.0.1:2"])
    assert target == "ipv4:127.0.0.1:1,127.0.0.1:2"
    config = json.loads(dict(options)["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "embedrpc.v1.Embedder"}
    (method,) = config["methodConfig"]
    assert {(n["service"], n["method"]) for n in method["name"]} == {
        ("embedrpc.v1.Embedder", "Embed"), ("embedrpc.v1.Embedder", "Tokenize"),
        ("embedrpc.v1.Embedder", "Info"), ("embedrpc.v1.Reranker", "Rerank"),
        ("embedrpc.v1.Reranker", "RerankBatch")}
    assert method["retryPolicy"] == {"maxAttempts": 5, "initialBackoff": "0.1s",
                                     "maxBackoff": "2.0s", "backoffMultiplier": 2,
                                     "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}
    assert dict(options)["grpc.per_rpc_retry_buffer_size"] >= 64 << 20
    # One address: gRPC's default pick_first, still retried; no retries: no config at all.
    _, options = channel_args("localhost:50051")
    assert set(json.loads(dict(options)["grpc.service_config"])) == {"methodConfig"}
    assert service_config(balance=False, retries=1) == {}
    _, options = channel_args("localhost:50051", retries=1)
    assert "grpc.service_config" not in dict(options)
    # The caller's own service config wins.
    _, options = channel_args("a:1,a:2".replace("a", "127.0.0.1"),
                              [("grpc.service_config", "{}")])
    assert [v for k, v in options if k == "grpc.service_config"] == ["{}"]
    with pytest.raises(ValueError, match=r"1 \(no retries\) to 5 attempts"):
        channel_args("localhost:1", retries=6)


# -- real replicas --------------------------------------------------------------------


@dataclass
class Replica:
    server: EmbedServer
    target: str
    loop: asyncio.AbstractEventLoop

    def stop(self, grace: float) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace=grace), self.loop).result(60)

    @property
    def served_tokens(self) -> int:
        assert self.server.router is not None
        return self.server.router.batched_tokens


@contextmanager
def replicas(n: int, model_dir: Path, **config: object) -> Iterator[list[Replica]]:
    """n fake-backend servers on 127.0.0.1, each on its own event loop thread."""
    started: list[tuple[Replica, threading.Thread]] = []
    try:
        starting = []
        for _ in range(n):
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, daemon=True)
            thread.start()
            server = EmbedServer(ServeConfig.of(
                model=str(model_dir), backend="fake", device="cpu", workers=1,
                host="127.0.0.1", port=0, **config))  # type: ignore[arg-type]
            started.append((Replica(server, "", loop), thread))
            starting.append(asyncio.run_coroutine_threadsafe(server.start(), loop))
        for (replica, _), future in zip(started, starting, strict=True):
            replica.target = f"127.0.0.1:{future.result(120)}"
        yield [r for r, _ in started]
    finally:
        for replica, thread in started:
            replica.stop(grace=1.0)  # a second stop is harmless
            replica.loop.call_soon_threadsafe(replica.loop.stop)
            thread.join(10)
            replica.loop.close()


def expected_vectors(client: EmbedClient, texts: list[str]) -> np.ndarray:
    ids = [np.array(t.ids, dtype=np.int32) for t in client.tokenize(texts).inputs]
    rows = np.stack([fake_vector(i, HIDDEN) for i in ids])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def three(fake_model_dir: Path) -> Iterator[list[Replica]]:
    with replicas(3, fake_model_dir) as servers:
        yield servers


def test_round_robin_spreads_requests_evenly(three: list[Replica]) -> None:
    servers = three
    with EmbedClient([r.target for r in servers], timeout=30) as client:
        text = "which replica answers?"
        per_text = client.tokenize([text]).usage.prompt_tokens
        expected = expected_vectors(client, [text])
        for _ in range(15):  # until every replica's connection is up
            client.embed([text])
        before = [r.served_tokens for r in servers]
        for _ in range(90):
            np.testing.assert_allclose(client.embed([text]), expected, atol=1e-6)
        counts = [(r.served_tokens - b) // per_text for r, b in zip(servers, before,
                                                                      strict=True)]
    assert sum(counts) == 90
    # round_robin takes the ready replicas in turn: 30 each (±1 for a reconnect).
    assert max(counts) - min(counts) <= 2, counts


def test_dns_target_reaches_a_replica(three: list[Replica]) -> None:
    # dns:///localhost gives 127.0.0.1 (listening) and possibly ::1 (not): round_robin
    # uses the address that answers.
    port = three[0].target.rsplit(":", 1)[1]
    before = three[0].served_tokens
    with EmbedClient(f"dns:///localhost:{port}", timeout=30) as client:
        texts = ["dns target"]
        np.testing.assert_allclose(client.embed(texts), expected_vectors(client, texts),
                                   atol=1e-6)
    assert three[0].served_tokens > before


def run_load(client: EmbedClient, texts: list[str],
             stop_one: Callable[[dict[int, np.ndarray]], object],
             ) -> tuple[dict[int, np.ndarray], list[grpc.RpcError]]:
    """Embed each text in its own call, 8 at a time; call stop_one(results so far) mid-run."""
    results: dict[int, np.ndarray] = {}
    errors: list[grpc.RpcError] = []

    def one(i: int) -> None:
        try:
            results[i] = client.embed([texts[i]])[0]
        except grpc.RpcError as exc:
            errors.append(exc)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(len(texts))]
        stop_one(results)
        for f in futures:
            f.result()
    return results, errors


@pytest.mark.parametrize("grace", [5.0, 0.0], ids=["drained", "cut-off"])
def test_stopping_a_replica_mid_run_loses_no_request(fake_model_dir: Path,
                                                     grace: float) -> None:
    """drained: SIGTERM's path (NOT_SERVING, in-flight calls finish). cut-off: calls in
    flight on the stopped replica are cancelled (UNAVAILABLE) and retried elsewhere."""
    texts = [f"request number {i}" for i in range(120)]
    with replicas(3, fake_model_dir, fake_delay_ms=20) as servers:
        victim = servers[1]
        assert victim.server.service is not None

        def stop_one(_: object) -> None:
            wait_until(lambda: victim.server.service.active >= 2)  # calls in flight there
            victim.stop(grace)

        with EmbedClient([r.target for r in servers], timeout=30) as client:
            expected = expected_vectors(client, texts)
            results, errors = run_load(client, texts, stop_one)
            assert not errors, [e.code() for e in errors]
            assert sorted(results) == list(range(len(texts)))
            np.testing.assert_allclose(np.stack([results[i] for i in range(len(texts))]),
                                       expected, atol=1e-6)
            # Every replica took part; the survivors took the rest after the stop.
            assert all(r.served_tokens > 0 for r in servers)
            served = sum(r.served_tokens for r in servers)
            assert served >= sum(len(t.ids) for t in client.tokenize(texts).inputs)


def test_without_retries_a_cut_off_replica_fails_calls(fake_model_dir: Path) -> None:
    """The control for the test above: with retries=1 the same cut-off loses the calls
    that were in flight there."""
    texts = [f"request number {i}" for i in range(60)]
    with replicas(2, fake_model_dir, fake_delay_ms=20) as servers:
        victim = servers[1]
        assert victim.server.service is not None

        def stop_one(_: object) -> None:
            wait_until(lambda: victim.server.service.active >= 2)
            victim.stop(0.0)

        with EmbedClient([r.target for r in servers], timeout=30, retries=1) as client:
            results, errors = run_load(client, texts, stop_one)
    assert errors, "expected the calls in flight on the stopped replica to fail"
    # Cancelled by the stopping server: UNAVAILABLE, or CANCELLED when gRPC resets the
    # stream (both retried by the default policy).
    assert {e.code() for e in errors} <= {grpc.StatusCode.UNAVAILABLE,
                                          grpc.StatusCode.CANCELLED}
    assert len(results) + len(errors) == len(texts)


SERVING_LINE = re.compile(r"serving \S+ on \S+:(\d+)")
WORKER_PID = re.compile(r"ready \(pid (\d+)")


def test_a_killed_replica_loses_no_request(fake_model_dir: Path) -> None:
    """SIGKILL: no goodbye at all, connections reset mid-call; still nothing is lost."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
         "--backend", "fake", "--fake-delay-ms", "20", "--device", "cpu", "--workers", "1",
         "--host", "127.0.0.1", "--port", "0", "--log-level", "INFO"],
        stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    lines, worker_pids, port = [], [], 0
    try:
        deadline = time.monotonic() + 90
        while not port and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if m := WORKER_PID.search(line):
                worker_pids.append(int(m.group(1)))
            if m := SERVING_LINE.search(line):
                port = int(m.group(1))
        assert port, "".join(lines)
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep it drained
        texts = [f"request number {i}" for i in range(120)]
        with replicas(2, fake_model_dir, fake_delay_ms=20) as servers, \
                EmbedClient([servers[0].target, f"127.0.0.1:{port}", servers[1].target],
                            timeout=30) as client:
            expected = expected_vectors(client, texts)
            for _ in range(6):
                client.embed(["warm up"])
            def kill(results: dict[int, np.ndarray]) -> None:
                wait_until(lambda: len(results) >= 30)  # mid-run, calls in flight everywhere
                proc.send_signal(signal.SIGKILL)

            results, errors = run_load(client, texts, kill)
            assert len(results) == len(texts)
            assert not errors, [e.code() for e in errors]
            np.testing.assert_allclose(np.stack([results[i] for i in range(len(texts))]),
                                       expected, atol=1e-6)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        # Its workers see their pipe close and exit on their own.
        end = time.monotonic() + 15
        while time.monotonic() < end and any(_alive(pid) for pid in worker_pids):
            time.sleep(0.05)
        left = [pid for pid in worker_pids if _alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"workers {left} outlived their killed server"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return False
