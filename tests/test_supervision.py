"""Supervision: a worker that crashes, at any moment, is restarted; nothing stops that.

- killed under load: restarted, its batches retried, clients see no error (expected
  vectors are sentence-transformers', tests/data/demo_reference.json, with
  test_reference.py's tolerances);
- killed while it starts (before: marked failed for good, the server UNAVAILABLE):
  started again with backoff; a model that cannot load still fails at once;
- an OSError in the supervisor (before: EMFILE from Pipe() ended the thread, and calls
  hung to their deadline): it tries again until it can;
- a worker that stops answering (a hung kernel): killed after --worker-stall-seconds
  plus its allowance per token, its batch retried; a text that hangs every worker fails
  alone with INTERNAL after three tries (the fake backend's vectors are a documented
  formula, server/worker/backends.py `fake_vector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.config import DebugHooks
from embedrpc.server.errors import ModelError
from embedrpc.server.worker.backends import fake_vector

from .helpers import DEMO_CASES, assert_close, running_server, wait_until, write_model_dir

TEXTS = [(t, v) for name in ("documents", "multilingual", "long", "edge")
         for t, v in zip(DEMO_CASES[name]["inputs"], DEMO_CASES[name]["embeddings"], strict=True)]


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
                    with contextlib.suppress(ProcessLookupError):  # it may just have died
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
        wait_until(lambda: all(w.alive for w in server.workers), 60 - (time.monotonic() - started),
                   lambda: "the restarted workers are not back")
        assert_close(client.embed([TEXTS[0][0]]), np.array([TEXTS[0][1]], dtype=np.float32),
                     "after restart")


def _fake_vectors(ids: list[list[int]]) -> np.ndarray:
    vectors = np.stack([fake_vector(np.array(row, dtype=np.int32), 64) for row in ids])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@contextlib.contextmanager
def starting_server(**options: object):  # type: ignore[no-untyped-def]
    """An EmbedServer whose start() runs in the background: yields (server, future)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    hooks = {k: options.pop(k) for k in list(options) if k in DebugHooks.__dataclass_fields__}
    server = EmbedServer(ServeConfig.of(host="127.0.0.1", port=0, device="cpu", **options),
                         hooks=DebugHooks(**hooks))
    started = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        yield server, started
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_worker_killed_while_it_starts_is_started_again(fake_model_dir: Path) -> None:
    with starting_server(model=str(fake_model_dir), backend="fake", workers=1,
                         fake_warmup_ms=1500) as (server, started):
        worker = server.workers[0]
        wait_until(lambda: worker.pid is not None, why=lambda: "no worker process")
        first_pid = worker.pid
        time.sleep(0.3)  # inside its 1.5 s warm-up
        os.kill(first_pid, signal.SIGKILL)
        port = started.result(60)  # the server still starts (before: UNAVAILABLE for good)
        assert worker.alive and worker.pid != first_pid and worker.restarts == 1
        assert not worker.failed
        with EmbedClient(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.embed(["hello"]).shape == (1, 64)


def test_a_model_that_cannot_load_fails_at_once(tmp_path: Path) -> None:
    broken = write_model_dir(tmp_path / "m")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    started = time.monotonic()
    with pytest.raises(ModelError, match="ONNX Runtime cannot load it"), \
            running_server(model=str(broken), workers=1):
        pass
    assert time.monotonic() - started < 30


def test_the_supervisor_survives_an_oserror(fake_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from embedrpc.server.worker import handle

    real_pipe = handle._CTX.Pipe
    refusals = [OSError(24, "Too many open files")] * 3

    def pipe(*args: object, **kwargs: object) -> object:
        if refusals:
            raise refusals.pop()
        return real_pipe(*args, **kwargs)

    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (server, target), \
            EmbedClient(target, timeout=30) as client:
        worker = server.workers[0]
        monkeypatch.setattr(handle._CTX, "Pipe", pipe)
        os.kill(worker.pid, signal.SIGKILL)
        # The call waits through three refused restarts and is answered once one works.
        got = client.embed(["hello", "world"])
        want = _fake_vectors([list(t.ids) for t in client.tokenize(["hello", "world"]).inputs])
        np.testing.assert_allclose(got, want, atol=1e-6)
        assert not refusals and worker.alive and worker.restarts == 4


def test_a_stuck_worker_is_killed_and_its_batch_retried(fake_model_dir: Path) -> None:
    poison = "stuck here"
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        worker_stall_seconds=0.5, max_batch_size=8) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        hang_id = client.tokenize([poison]).inputs[0].ids[0]
    with running_server(model=str(fake_model_dir), backend="fake", workers=1,
                        worker_stall_seconds=0.5, max_batch_size=8,
                        fake_hang_token=hang_id) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        client.embed(["a first batch, so the worker's time per token is measured"])
        texts = ["fine one", "fine two"]
        started = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            good = pool.submit(client.embed, texts)
            bad = pool.submit(client.embed, [poison])
            with pytest.raises(grpc.RpcError) as failed:
                bad.result()
            got = good.result()
        assert failed.value.code() == grpc.StatusCode.INTERNAL
        assert "crashed a worker 3 times" in failed.value.details()
        want = _fake_vectors([list(t.ids) for t in client.tokenize(texts).inputs])
        np.testing.assert_allclose(got, want, atol=1e-6)
        worker = server.workers[0]
        assert worker.restarts == 3  # killed once per try
        wait_until(lambda: worker.alive)
        assert time.monotonic() - started < 45


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_to_the_process_group_leaves_the_workers_to_the_server(
        fake_model_dir: Path, signum: int) -> None:
    """A service manager stopping the server (systemd's KillMode=control-group), Ctrl-C
    and a SIGHUP reload signal the whole process group: the workers ignore those signals
    (the server drains and stops them itself), so none dies and is restarted mid-drain."""
    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (server, target):
        worker = server.workers[0]
        assert worker.pid is not None
        os.kill(worker.pid, signum)
        time.sleep(1.0)
        assert worker.alive and worker.restarts == 0
        with EmbedClient(target, timeout=10) as client:
            assert client.embed(["after the signal"]).shape == (1, 64)
