"""Fair share between clients, end to end: a client that floods the server does not slow
another client's single-text calls by its backlog.

Before (one queue in arrival order): one client's backlog stood in front of everyone
else's texts (another client's single-text call waited 5–13 s behind 50 EmbedStreams).
Now the router takes texts from the clients in turn (tests/test_router.py checks the
order), each client is a connection (or an API key), and a client over its share of the
queue is refused. Bound, as the issue states it: under the flood, the other client's
single-text p99 stays within 3× its unloaded p99 (fake backend, 20 ms per batch).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from embedrpc.client import EmbedClient

from .helpers import running_server, wait_until

BATCH_MS = 20.0
# The flooding client: another process (its load must not take this one's GIL), 16
# threads on one connection, 32-text calls without pause; refusals are counted.
FLOOD = """
import sys, threading, time, grpc
from embedrpc.client import EmbedClient
codes = []
with EmbedClient(sys.argv[1], timeout=60, retries=1) as heavy:
    def flood():
        while time.monotonic() < end:
            try:
                heavy.embed([f"flood text number {i}" for i in range(32)])
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                time.sleep(0.01)
    end = time.monotonic() + float(sys.argv[2])
    threads = [threading.Thread(target=flood) for _ in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
print(" ".join(sorted(set(codes))))
"""


def _p99(client: EmbedClient, n: int = 40) -> float:
    times = []
    for i in range(n):
        started = time.perf_counter()
        client.embed([f"single text {i}"])
        times.append(time.perf_counter() - started)
    return float(np.percentile(times, 99))


def test_a_flooding_client_does_not_slow_another(fake_model_dir: Path) -> None:
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        fake_delay_ms=BATCH_MS, max_batch_size=8,
                        max_queue_tokens=20_000) as (server, target), \
            EmbedClient(target, timeout=60) as light:
        light.embed(["warm up"])
        unloaded = _p99(light)
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, target, "15"],
                                 stdout=subprocess.PIPE, text=True)
        try:
            # The heavy client's backlog: hundreds of texts, many batches of work.
            wait_until(lambda: server.router.queued_entries > 200, timeout=30)
            loaded = _p99(light)
            backlog = server.router.queued_entries
        finally:
            flood.terminate()
            out, _ = flood.communicate(timeout=30)
        assert backlog > 200
        print(f"single-text p99: {unloaded * 1000:.1f} ms alone, {loaded * 1000:.1f} ms beside "
              f"a flood of {backlog} queued texts")
        assert loaded <= 3 * unloaded, (f"p99 {loaded * 1000:.1f} ms under the flood, "
                                        f"{unloaded * 1000:.1f} ms without")
        # The heavy client was held to its share of the queue: refused, not queued forever.
        assert set(out.split()) <= {"RESOURCE_EXHAUSTED"}, out
