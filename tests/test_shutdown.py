"""Graceful shutdown of the real `embedrpc serve` process.

SIGTERM or SIGINT: health goes NOT_SERVING, new calls are refused, calls in
flight finish (within --grace-seconds), the workers exit, and the process exits
with code 0. A second signal stops it at once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from embedrpc.client import EmbedClient

from .conftest import wait_until

SERVING = re.compile(r"serving .* on .*:(\d+)")
WORKER_PID = re.compile(r"ready \(pid (\d+)")
METRICS = re.compile(r"metrics on http://.*:(\d+)/metrics")
EMBED = "/embedrpc.v1.Embedder/Embed"


class ServerProcess:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.metrics_port = 0
        self.worker_pids: list[int] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if m := WORKER_PID.search(line):
                self.worker_pids.append(int(m.group(1)))
            if m := METRICS.search(line):
                self.metrics_port = int(m.group(1))
            if m := SERVING.search(line):
                self.port = int(m.group(1))
                self._ready.set()
        self._ready.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout) and self.port, "".join(self.lines)

    def wait_in_progress(self, calls: int, timeout: float = 20) -> None:
        """Wait until the server reports `calls` Embed calls in progress (needs --metrics-port)."""
        assert self.metrics_port, "start the server with serve(..., metrics=True)"
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"

        def now() -> float:
            with urllib.request.urlopen(url, timeout=5) as reply:
                text = reply.read().decode()
            return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                       if s.name == "embedrpc_requests_in_progress"
                       and s.labels.get("method") == EMBED)

        wait_until(lambda: now() >= calls, timeout,
                   lambda: f"{now()} calls in progress, not {calls}")


@contextmanager
def serve(model_dir: Path, *args: str, metrics: bool = False) -> Iterator[ServerProcess]:
    """`embedrpc serve` on the fake backend; `metrics`: also on a free --metrics-port."""
    for attempt in range(3):
        extra = ["--metrics-port", free_port()] if metrics else []
        command = [sys.executable, "-m", "embedrpc", "serve", "--model", str(model_dir),
                   "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port",
                   "0", "--workers", "2", "--max-batch-size", "4", *extra, *args]
        proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                text=True)
        server = ServerProcess(proc)
        server._ready.wait(60)
        # A port free when picked can be taken before the server binds it (an outgoing
        # connection of this test session gets it): pick another.
        if (metrics and attempt < 2 and not server.port and server._ready.is_set()
                and any("cannot listen for metrics" in line for line in server.lines)):
            proc.wait(10)  # it exited: its output ended
            continue
        break
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def free_port() -> str:
    """A loopback port free now (the CLI's --metrics-port 0 means off, not any port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


def watch_health(target: str, seen: list[int], stop: threading.Event) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for response in stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30):
                seen.append(response.status)
                if stop.is_set():
                    return
        except grpc.RpcError:
            return  # the server closed the stream as it stopped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_calls_and_exits_zero(fake_model_dir: Path,
                                                      signum: int) -> None:
    with serve(fake_model_dir, "--fake-delay-ms", "150", "--grace-seconds", "20",
               metrics=True) as server:
        assert len(server.worker_pids) == 2
        statuses: list[int] = []
        stop = threading.Event()
        watcher = threading.Thread(target=watch_health, args=(server.target, statuses, stop))
        watcher.start()
        with EmbedClient(server.target, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            client.wait_ready()
            # 8 calls of 8 texts: 16 batches of 4 on 2 workers at 150 ms each ≈ 1.2 s.
            calls = [pool.submit(client.embed, [f"in flight {i} {j}" for j in range(8)])
                     for i in range(8)]
            server.wait_in_progress(8)  # all eight have arrived
            signalled = time.monotonic()
            server.proc.send_signal(signum)
            wait_until(lambda: health_pb2.HealthCheckResponse.NOT_SERVING in statuses, 10,
                       lambda: f"health never NOT_SERVING: {statuses}")
            with pytest.raises(grpc.RpcError) as refused:
                client.embed(["too late"])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            results = [c.result(30) for c in calls]
        assert all(r.shape == (8, 64) and np.isfinite(r).all() for r in results)
        code = server.proc.wait(30)
        elapsed = time.monotonic() - signalled
        stop.set()
        watcher.join(10)
        assert code == 0, "".join(server.lines)
        assert elapsed < 20
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses, statuses
        assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
        for pid in server.worker_pids:
            assert process_gone(pid), f"worker {pid} outlived the server"
        assert any("shutting down" in line for line in server.lines)


def test_second_signal_stops_at_once(fake_model_dir: Path) -> None:
    with serve(fake_model_dir, "--fake-delay-ms", "3000", "--grace-seconds", "60",
               metrics=True) as server, \
            EmbedClient(server.target, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        client.wait_ready()
        call = pool.submit(client.embed, ["slow"] * 8)  # ~6 s of fake work
        server.wait_in_progress(1)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert server.proc.poll() is None, "the first signal must wait for the call"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code = server.proc.wait(10)
        assert time.monotonic() - started < 3
        assert code != 0
        with pytest.raises(grpc.RpcError):
            call.result(30)
        time.sleep(0.5)  # the orphaned workers see their pipe close and exit
        deadline = time.monotonic() + 10
        while not all(process_gone(p) for p in server.worker_pids):
            assert time.monotonic() < deadline, "workers outlived a hard stop"
            time.sleep(0.1)


def test_refuses_to_start_on_a_port_in_use(fake_model_dir: Path) -> None:
    with serve(fake_model_dir) as first:
        proc = subprocess.run(
            [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
             "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1",
             "--port", str(first.port)], capture_output=True, text=True, timeout=60,
            env={**os.environ, "EMBEDRPC_LOG_LEVEL": "WARNING"})
        assert proc.returncode == 2
        assert "cannot listen on" in proc.stderr
