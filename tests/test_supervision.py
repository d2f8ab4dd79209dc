"""A worker killed under load is restarted; its batches are retried; clients see no error.

Expected vectors are sentence-transformers' (tests/data/demo_reference.json), with the
same tolerances as test_reference.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from embedrpc.client import EmbedClient

from .conftest import running_server
from .test_reference import CASES, assert_close

TEXTS = [(t, v) for name in ("documents", "multilingual", "long", "edge")
         for t, v in zip(CASES[name]["inputs"], CASES[name]["embeddings"], strict=True)]


def test_killed_workers_lose_no_request() -> None:
    rng = np.random.default_rng(1)
    requests = [rng.choice(len(TEXTS), size=int(rng.integers(1, 12))) for _ in range(400)]
    with running_server(model="demo", workers=2, max_batch_size=4) as (server, target), \
            EmbedClient(target, timeout=120) as client:
        stop = threading.Event()

        def killer() -> None:
            # Kill a random live worker three times, at random moments, mid-load.
            for _ in range(3):
                if stop.wait(float(rng.uniform(0.02, 0.15))):
                    return
                alive = [w for w in server.workers if w.alive and w.pid]
                if alive:
                    os.kill(alive[int(rng.integers(len(alive)))].pid, signal.SIGKILL)

        def call(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return idx, client.embed([TEXTS[i][0] for i in idx])

        thread = threading.Thread(target=killer)
        started = time.monotonic()
        thread.start()
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, requests))
        stop.set()
        thread.join()
        assert sum(w.restarts for w in server.workers) >= 1, "no worker was killed mid-load"
        for idx, got in results:
            want = np.array([TEXTS[i][1] for i in idx], dtype=np.float32)
            assert_close(got, want, "after worker kills")
        # The restarted workers serve again.
        deadline = started + 60
        while not all(w.alive for w in server.workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(w.alive for w in server.workers)
        assert_close(client.embed([TEXTS[0][0]]), np.array([TEXTS[0][1]], dtype=np.float32),
                     "after restart")
