"""Several front-end processes on one port (`serve --frontends N`, issue 13 items 2, 3, 5).

The device worker's side first (in a thread, as the worker tests run it): it accepts
front ends on its Unix socket and runs batches of several front ends as one when they
fit. Then whole servers in a child process: the demo model against sentence-transformers'
vectors through many connections, the metrics summed over the front ends, a front end
killed under load, a worker killed under load, SIGHUP and SIGTERM, and the bounds of the
option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import embedrpc
from embedrpc.client import EmbedClient
from embedrpc.server.config import ServeConfig
from embedrpc.server.worker import process as worker_module
from embedrpc.server.worker.backends import FakeBackend, fake_vector
from embedrpc.server.worker.spec import Batch, WorkerSpec

from .helpers import (
    DEMO_CASES,
    DEMO_COSINE_MIN,
    DEMO_MAX_ABS,
    ServerProcess,
    cosines,
    free_port,
    serve,
    start_server,
    wait_until,
)

FRONTEND = re.compile(r"(frontend-\d+) serving (?:again )?\(pid (\d+)")
HIDDEN = 64  # helpers.write_model_dir's
# gRPC Python shares one connection among channels to the same target by default; each
# client here needs its own TCP connection for the kernel to spread them over front ends.
OWN = [("grpc.use_local_subchannel_pool", 1)]


# -- the worker: several front ends, merged batches ------------------------------------


class CountingBackend(FakeBackend):
    """The fake backend, recording the row counts of each batch it runs; `gate` holds
    the first run until the test has queued the batches it wants waiting."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.runs: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()  # the first run has begun (and waits at the gate)

    def embed(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        if not self.runs:
            self.entered.set()
            assert self.gate.wait(10)
        self.runs.append(len(lengths))
        return super().embed(ids, lengths)


@contextlib.contextmanager
def listening_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     merge: tuple[int, int, int]) -> Iterator[tuple[CountingBackend, str]]:
    spec = WorkerSpec.of(backend="fake", hidden_size=HIDDEN, listen=str(tmp_path / "w.sock"),
                         merge=merge)
    backend = CountingBackend(spec)
    backend.gate.set()  # the warm-up runs freely
    monkeypatch.setattr(worker_module, "make_backend", lambda spec: backend)
    monkeypatch.setattr(worker_module, "configure_logging", lambda *a, **k: None)
    parent, child = Pipe()
    thread = threading.Thread(target=worker_module.worker_main, args=(child, spec))
    thread.start()
    try:
        assert parent.recv()[0] == "ready"
        backend.runs.clear()
        backend.entered.clear()
        backend.gate.clear()
        yield backend, spec.listen
    finally:
        backend.gate.set()
        parent.send(None)
        thread.join(10)
        assert not thread.is_alive()
    assert not os.path.exists(spec.listen)  # the socket file is removed on the way out


def connect(path: str) -> Connection:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    conn = Connection(sock.detach())
    kind, info = conn.recv()
    assert kind == "ready" and info["pid"] == os.getpid() and info["hidden_size"] == HIDDEN
    return conn


def batch(batch_id: int, rows: list[list[int]]) -> Batch:
    return Batch(batch_id, np.array([t for r in rows for t in r], dtype=np.int32),
                 np.array([len(r) for r in rows], dtype=np.int32))


def alone(rows: list[list[int]]) -> np.ndarray:
    """The fake backend's documented vector of each row (seeded by its ids alone)."""
    return np.stack([fake_vector(np.array(r, dtype=np.int32), HIDDEN) for r in rows])


def test_a_worker_runs_batches_of_several_front_ends_as_one(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """While the worker is busy, front end A queues a second batch and front end B one:
    they run as one batch of 5 rows (within 64 rows, 1000 tokens, and no more padding
    than the 64-token overhead saved), and each front end gets exactly its own rows."""
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 64)) as (backend, path):
        a, b = connect(path), connect(path)
        first = [[1, 2, 3]]
        a_rows = [[4, 5, 6, 7], [8, 9]]
        b_rows = [[10, 11, 12], [13], [14, 15, 16, 17, 18]]
        a.send(batch(1, first))
        assert backend.entered.wait(10)  # the worker runs batch 1, held at the gate
        a.send(batch(2, a_rows))
        b.send(batch(7, b_rows))  # ids are each front end's own: they may repeat
        time.sleep(0.2)  # both have arrived
        backend.gate.set()
        replies_a = [a.recv(), a.recv()]
        reply_b = b.recv()
        assert backend.runs == [1, 5]
        assert [r[:2] for r in replies_a] == [("ok", 1), ("ok", 2)] and reply_b[:2] == ("ok", 7)
        np.testing.assert_array_equal(replies_a[0][2], alone(first))
        np.testing.assert_array_equal(replies_a[1][2], alone(a_rows))
        np.testing.assert_array_equal(reply_b[2], alone(b_rows))
        a.close()
        b.close()


@pytest.mark.parametrize(("rows_b", "merge", "why"), [
    # 3 rows × 30 = 90 padded tokens; apart: 2 + 30, plus the 10 tokens of a run saved
    ([[1] * 30], (1000, 64, 10), "padding"),
    ([[1, 2]] * 3, (1000, 4, 64), "rows"),  # 5 rows > 4
    ([[1] * 20], (59, 64, 1000), "tokens"),  # 3 × 20 = 60 > 59
])
def test_batches_that_do_not_fit_together_run_apart(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    rows_b: list[list[int]],
                                                    merge: tuple[int, int, int],
                                                    why: str) -> None:
    """Front end A's waiting batch is two rows of 1 token; B's does not fit beside it."""
    rows_a = [[5], [6]]
    with listening_worker(tmp_path, monkeypatch, merge=merge) as (backend, path):
        a, b = connect(path), connect(path)
        a.send(batch(1, [[9, 9]]))
        assert backend.entered.wait(10)
        a.send(batch(2, rows_a))
        b.send(batch(3, rows_b))
        time.sleep(0.2)
        backend.gate.set()
        assert [a.recv()[:2], a.recv()[:2], b.recv()[:2]] == [("ok", 1), ("ok", 2), ("ok", 3)]
        assert backend.runs == [1, 2, len(rows_b)], why


@pytest.mark.parametrize("suspect", ["a", "b"])
def test_a_suspect_text_retried_alone_is_never_merged(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      suspect: str) -> None:
    """A batch marked `alone` (a text retried after a crash) runs by itself, whether it is
    the batch that runs next or another front end's that would fit beside it; without
    the mark these two would run as one (as in the test above)."""
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 64)) as (backend, path):
        a, b = connect(path), connect(path)
        a.send(batch(1, [[1, 2, 3]]))
        assert backend.entered.wait(10)
        a_batch, b_batch = batch(2, [[4, 5, 6]]), batch(3, [[7, 8, 9]])
        if suspect == "a":
            a_batch = dataclasses.replace(a_batch, alone=True)
        else:
            b_batch = dataclasses.replace(b_batch, alone=True)
        a.send(a_batch)
        b.send(b_batch)
        time.sleep(0.2)
        backend.gate.set()
        # B hears ("elsewhere", ...) around A's suspect batch (the next test); then its own.
        b_answers = [m for m in (b.recv(), b.recv(), b.recv()) if m[0] != "elsewhere"] \
            if suspect == "a" else [b.recv()]
        assert [a.recv()[:2], a.recv()[:2], b_answers[0][:2]] == \
            [("ok", 1), ("ok", 2), ("ok", 3)]
        assert backend.runs == [1, 1, 1]
        a.close()
        b.close()


def test_other_front_ends_are_told_while_a_suspect_batch_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While A's suspect batch (`alone`) runs, B is told ("elsewhere", 0, True): if the
    worker dies now, B's batches in flight did not run and are not counted against its
    texts; before B's own batch runs, B is told False again."""
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 64)) as (backend, path):
        a, b = connect(path), connect(path)
        a.send(dataclasses.replace(batch(1, [[1, 2, 3]]), alone=True))
        assert backend.entered.wait(10)
        assert b.poll(5) and b.recv() == ("elsewhere", 0, True)
        assert not a.poll(0.2)  # the front end whose batch runs is told nothing
        b.send(batch(5, [[4, 5]]))
        time.sleep(0.2)
        backend.gate.set()
        assert a.recv()[:2] == ("ok", 1)
        assert b.recv() == ("elsewhere", 0, False)
        assert b.recv()[:2] == ("ok", 5)
        assert backend.runs == [1, 1]
        a.close()
        b.close()


def test_a_priority_batch_run_ahead_of_older_ones_is_named(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A front end's priority batch runs before its older batch waiting at the worker;
    the front end, which counts its oldest batch in flight as the one running, is told
    ("running", id) first, so a crash now would be counted against the right texts."""
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 64)) as (backend, path):
        a = connect(path)
        a.send(batch(1, [[1, 2, 3]]))
        assert backend.entered.wait(10)
        a.send(batch(2, [[4, 5]]))
        a.send(dataclasses.replace(batch(3, [[6]]), priority=True))
        time.sleep(0.2)
        backend.gate.set()
        assert [a.recv()[:2] for _ in range(4)] == [("ok", 1), ("running", 3), ("ok", 3),
                                                   ("ok", 2)]
        a.close()


def test_priority_batches_never_go_ahead_twice_in_a_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each front end has at most one priority batch at a worker, but with several front
    ends one may always be waiting: were each run ahead of the others, A's batch would
    wait as long as that lasts (calls accepted under overload waited seconds, until the
    load stopped). After a priority batch that went ahead, the oldest runs: A's batch 2
    runs after one priority batch, before the others (and A, which counts a priority
    batch as running ahead of its older ones, is told ("running", 2))."""
    with listening_worker(tmp_path, monkeypatch, merge=(0, 0, 0)) as (backend, path):
        a, b, c = connect(path), connect(path), connect(path)
        a.send(batch(1, [[1]]))  # runs, held at the gate
        assert backend.entered.wait(10)
        a.send(batch(2, [[2]] * 2))
        b.send(dataclasses.replace(batch(5, [[5]] * 5), priority=True))
        c.send(dataclasses.replace(batch(6, [[6]] * 6), priority=True))
        a.send(dataclasses.replace(batch(3, [[3]] * 3), priority=True))
        time.sleep(0.2)
        backend.gate.set()
        assert [a.recv()[:2] for _ in range(4)] == [("ok", 1), ("running", 2), ("ok", 2),
                                                   ("ok", 3)]
        assert b.recv()[:2] == ("ok", 5)
        assert c.recv()[:2] == ("ok", 6)
        # The worker reads one message per front end and round, in the order they
        # connected: 2, 5, 6 wait, then 3. By rows: B's 5 goes ahead of A's 2, then 2
        # (the oldest), then the priority batches in their order (before: 1, 5, 6, 3, 2).
        assert backend.runs == [1, 5, 2, 6, 3]
        a.close()
        b.close()
        c.close()


def test_the_batches_closest_in_length_are_merged_first(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A's batch is 1 row of 10 tokens; B's 1 row of 14, C's 3 rows of 10 (overhead 10).
    Taken in arrival order B would fit (28 ≤ 10 + 14 + 10) and then keep C out (70 > 68);
    the closest in length first, C fits (40 ≤ 50) and B does not (70 > 64): 4 rows run."""
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 10)) as (backend, path):
        a, b, c = connect(path), connect(path), connect(path)
        a.send(batch(1, [[1]]))
        assert backend.entered.wait(10)
        a_rows, b_rows, c_rows = [[2] * 10], [[3] * 14], [[4] * 10, [5] * 7, [6] * 10]
        a.send(batch(2, a_rows))
        b.send(batch(3, b_rows))
        c.send(batch(4, c_rows))
        time.sleep(0.2)
        backend.gate.set()
        assert [a.recv()[:2], a.recv()[:2]] == [("ok", 1), ("ok", 2)]
        reply_b, reply_c = b.recv(), c.recv()
        assert backend.runs == [1, 4, 1]
        np.testing.assert_array_equal(reply_b[2], alone(b_rows))
        np.testing.assert_array_equal(reply_c[2], alone(c_rows))
        for conn in (a, b, c):
            conn.close()


def test_a_front_end_that_goes_away_loses_only_its_own_batches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with listening_worker(tmp_path, monkeypatch, merge=(1000, 64, 64)) as (backend, path):
        a, b = connect(path), connect(path)
        a.send(batch(1, [[1, 2]]))
        assert backend.entered.wait(10)
        a.send(batch(2, [[3, 4]]))
        b.send(batch(3, [[5, 6]]))
        time.sleep(0.2)
        a.close()  # A dies with batch 2 waiting: B's batch still runs, alone
        time.sleep(0.2)
        backend.gate.set()
        reply = b.recv()
        assert reply[:2] == ("ok", 3)
        np.testing.assert_array_equal(reply[2], alone([[5, 6]]))
        assert backend.runs == [1, 1]
        c = connect(path)  # and a new front end is served
        c.send(batch(1, [[7]]))
        assert c.recv()[:2] == ("ok", 1)
        b.close()
        c.close()


# -- whole servers -------------------------------------------------------------------------


def frontend_pids(server: ServerProcess) -> dict[str, int]:
    pids: dict[str, int] = {}
    for line in server.lines:
        if m := FRONTEND.search(line):
            pids[m.group(1)] = int(m.group(2))
    return pids


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_demo_model_is_exact_through_every_front_end() -> None:
    """Two front ends on one port: 12 connections (the kernel spreads them over both)
    get sentence-transformers' vectors (cosine ≥ 0.9999, max abs ≤ 1e-4 per vector)."""
    proc, target = start_server("--model", "demo", "--frontends", "2")
    try:
        names = ["documents", "queries", "instruction", "multilingual"]
        for i in range(12):
            case = DEMO_CASES[names[i % len(names)]]
            with EmbedClient(target, options=OWN) as client:
                got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                                   instruction=case["instruction"],
                                   dimensions=case["dimensions"])
            want = np.array(case["embeddings"], dtype=np.float32)
            assert cosines(got, want).min() >= DEMO_COSINE_MIN
            assert np.abs(got - want).max() <= DEMO_MAX_ABS
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_metrics_are_the_sum_over_front_ends(fake_model_dir: Path) -> None:
    """15 calls of 2 texts on 15 connections: counted once each, whichever front end
    served them; the device batches hold the 30 texts. Then 24 concurrent calls with
    50 ms batches: the workers merge batches of several front ends."""
    with serve(fake_model_dir, "--frontends", "3", "--fake-delay-ms", "50",
               "--max-batch-size", "64", metrics=True) as server:
        wait_until(lambda: len(frontend_pids(server)) == 3, 20)
        for i in range(15):
            with EmbedClient(server.target, options=OWN) as client:
                client.embed([f"text {i}", "another"])
        wait_until(lambda: metrics(server.metrics_port).get(
            ("embedrpc_device_batch_texts_sum", ())) == 30, 10)
        m = metrics(server.metrics_port)
        ok = m[("embedrpc_requests_total", (("code", "OK"),
                                            ("method", "/embedrpc.v1.Embedder/Embed")))]
        assert ok == 15  # every call once, whichever front end served it
        assert m[("embedrpc_embeddings_total", ())] == 30
        assert m[("embedrpc_frontends_alive", ())] == 3
        assert m[("embedrpc_frontends", ())] == 3
        # Series about the shared workers are not multiplied by the front ends.
        assert m[("embedrpc_workers", ())] == 2
        assert m[("embedrpc_workers_alive", ())] == 2
        assert m[("embedrpc_device_batches_merged_total", ())] == 0  # one call at a time
        # Every series once (the workers' are the supervisor's, _created samples too).
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics",
                                    timeout=10) as reply:
            lines = reply.read().decode().splitlines()
        samples = [line.rsplit(" ", 1)[0] for line in lines if not line.startswith("#")]
        assert len(samples) == len(set(samples)), [s for s in samples if samples.count(s) > 1]
        helps = [line for line in lines if line.startswith("# HELP ")]
        assert len(helps) == len(set(helps))

        def call(i: int) -> None:
            with EmbedClient(server.target, options=OWN) as client:
                client.embed([f"burst {i}"])

        threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        wait_until(lambda: metrics(server.metrics_port).get(
            ("embedrpc_device_batch_texts_sum", ())) == 54, 10)
        m = metrics(server.metrics_port)
        assert m[("embedrpc_device_batches_merged_total", ())] > 0
        # Fewer device batches than the front ends' routers sent.
        device_batches = m[("embedrpc_device_batch_texts_count", ())]
        assert device_batches < m[("embedrpc_batch_texts_count", ())]
        # The workers' own figures, once per device batch (not once per front end in a
        # merged one): each batch takes the fake backend's 50 ms.
        assert m[("embedrpc_inference_duration_seconds_count", ())] == device_batches
        busy = sum(v for (name, _), v in m.items()
                   if name == "embedrpc_worker_busy_seconds_total")
        assert 0.05 * device_batches <= busy <= 2 * 0.05 * device_batches
        assert m[("embedrpc_build_info", (("model", fake_model_dir.name),
                                          ("version", embedrpc.__version__)))] == 1


def load(target: str, stop: threading.Event, results: list[tuple[float, str]],
         texts: list[str]) -> None:
    """One connection, calls back to back until `stop`: (when it ended, its code). No
    retries: a call that fails is seen failing."""
    with EmbedClient(target, timeout=20, retries=1, options=OWN) as client:
        while not stop.is_set():
            try:
                client.embed(texts)
                results.append((time.monotonic(), "OK"))
            except grpc.RpcError as exc:
                results.append((time.monotonic(), exc.code().name))
                time.sleep(0.05)


def test_a_front_end_killed_under_load(fake_model_dir: Path) -> None:
    """SIGKILL one of 2 front ends while 12 connections send calls: connections on the
    other never see an error and keep being served; those on the dead one fail only with
    UNAVAILABLE, and reconnect to the survivor; the dead one is restarted and serves new
    connections."""
    with serve(fake_model_dir, "--frontends", "2", "--fake-delay-ms", "5") as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        victim = frontend_pids(server)["frontend-1"]
        stop = threading.Event()
        results: list[list[tuple[float, str]]] = [[] for _ in range(12)]
        threads = [threading.Thread(target=load, args=(server.target, stop, r,
                                                       [f"load {i}", "two"]))
                   for i, r in enumerate(results)]
        for t in threads:
            t.start()
        wait_until(lambda: all(len(r) >= 3 for r in results), 30)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(30)
        codes = {code for r in results for _, code in r}
        assert codes <= {"OK", "UNAVAILABLE"}, codes
        untouched = [r for r in results if all(code == "OK" for _, code in r)]
        assert untouched, "no connection was on the surviving front end"
        assert len(untouched) < len(results), "no connection was on the killed front end"
        for r in untouched:  # served before and after the kill, without a break
            assert any(t > killed + 0.5 for t, _ in r)
        wait_until(lambda: any("frontend-1 serving again" in line for line in server.lines),
                   30, lambda: "".join(server.lines[-20:]))
        assert frontend_pids(server)["frontend-1"] != victim
        for i in range(8):  # new connections, to either front end
            with EmbedClient(server.target, options=OWN) as client:
                assert client.embed([f"after {i}"]).shape == (1, HIDDEN)


def test_a_worker_killed_under_load_loses_no_call(fake_model_dir: Path) -> None:
    """Both front ends have batches in flight on the workers when one is killed: the
    batches are retried, every call succeeds with the fake backend's vectors."""
    with serve(fake_model_dir, "--frontends", "2", "--fake-delay-ms", "150") as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        texts = [f"call {i}" for i in range(24)]
        outcomes: list[Any] = [None] * len(texts)

        def call(i: int) -> None:
            with EmbedClient(server.target, timeout=30, retries=1, options=OWN) as client:
                try:
                    outcomes[i] = client.embed([texts[i]])[0]
                except grpc.RpcError as exc:
                    outcomes[i] = exc.code().name

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(texts))]
        for t in threads:
            t.start()
        time.sleep(0.4)
        os.kill(server.worker_pids[0], signal.SIGKILL)
        for t in threads:
            t.join(60)
        with EmbedClient(server.target, options=OWN) as client:
            ids = [np.array(t.ids, dtype=np.int32) for t in client.tokenize(texts).inputs]
        for i, got in enumerate(outcomes):
            assert isinstance(got, np.ndarray), f"call {i}: {got}"
            want = fake_vector(ids[i], HIDDEN)
            np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=1e-6)


def test_sighup_reloads_keys_in_every_front_end(fake_model_dir: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("old-key-123456789\n")
    with serve(fake_model_dir, "--frontends", "2", "--api-keys-file", str(keys)) as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        keys.write_text("new-key-987654321\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: sum("SIGHUP: reloaded" in line for line in server.lines) == 2, 20,
                   lambda: "".join(server.lines[-10:]))
        for _ in range(10):  # connections land on both front ends
            with EmbedClient(server.target, options=OWN, api_key="new-key-987654321") as client:
                assert client.embed(["x"]).shape == (1, HIDDEN)
            with EmbedClient(server.target, options=OWN, api_key="old-key-123456789") as client, \
                    pytest.raises(grpc.RpcError) as err:
                client.embed(["x"])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_sigterm_drains_every_front_end_and_exits_zero(fake_model_dir: Path) -> None:
    """Calls in flight on both front ends finish; then the server exits 0, its front
    ends and workers with it."""
    with serve(fake_model_dir, "--frontends", "2", "--fake-delay-ms", "400") as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        children = [*frontend_pids(server).values(), *server.worker_pids]
        outcomes: list[str] = []

        def call(i: int) -> None:
            with EmbedClient(server.target, timeout=30, retries=1, options=OWN) as client:
                try:
                    client.embed([f"drain {i}"])
                    outcomes.append("OK")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code().name)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert outcomes == ["OK"] * 8
        assert server.proc.wait(30) == 0
        assert any("stopped" in line for line in server.lines)
        for child in children:
            wait_until(lambda c=child: not _running(c), 10)


def test_a_second_signal_stops_at_once_and_leaves_nothing_behind(
        fake_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C twice (or SIGTERM twice) during a drain: the server exits at once with code
    1, its front ends and workers with it, and its private sockets' directory is removed
    (it was left in TMPDIR)."""
    tmp = tempfile.mkdtemp(prefix="t", dir="/tmp")  # short: socket paths have a limit
    monkeypatch.setenv("TMPDIR", tmp)
    try:
        with serve(fake_model_dir, "--frontends", "2", "--fake-delay-ms", "3000") as server:
            wait_until(lambda: len(frontend_pids(server)) == 2, 20)
            children = [*frontend_pids(server).values(), *server.worker_pids]
            assert len(os.listdir(tmp)) == 1  # the server's private directory

            def call() -> None:
                with EmbedClient(server.target, options=OWN, retries=1,
                                 timeout=30) as client, contextlib.suppress(grpc.RpcError):
                    client.embed(["held"])

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(0.5)  # the call is in flight: the first signal drains
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(10) == 1
            caller.join(30)
            assert any("second signal: stopping now" in line for line in server.lines)
            for child in children:
                wait_until(lambda c=child: not _running(c), 10)
            assert os.listdir(tmp) == []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_sighup_to_the_process_group_spares_the_resource_tracker(
        fake_model_dir: Path) -> None:
    """multiprocessing's resource tracker (a child of the server, in its process group)
    survives a SIGHUP, as `kill -HUP -- -PGID` sends it to every process of the group
    (it died of it, and was started again with a warning of leaks)."""
    with serve(fake_model_dir, "--frontends", "2") as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        # -ww: whole command lines (without it ps cuts them at 80 columns off a terminal,
        # before "resource_tracker" when the venv's path is long)
        out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(server.proc.pid)],
                             capture_output=True, text=True, check=True).stdout
        trackers = [int(line.split()[0]) for line in out.splitlines()
                    if "resource_tracker" in line]
        assert len(trackers) == 1, out
        os.kill(trackers[0], signal.SIGHUP)
        time.sleep(1.0)
        assert _running(trackers[0])


def test_a_killed_supervisor_leaves_nothing_behind(fake_model_dir: Path) -> None:
    """SIGKILL to the supervisor: its front ends and workers exit by themselves (their
    pipes to it close), the calls they held fail at once (UNAVAILABLE, not after the
    10 s grace: no worker is left to answer them), and the port is free again."""
    with serve(fake_model_dir, "--frontends", "2", "--fake-delay-ms", "3000") as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        children = [*frontend_pids(server).values(), *server.worker_pids]
        ended: list[tuple[float, str]] = []

        def call(i: int) -> None:
            with EmbedClient(server.target, options=OWN, retries=1, timeout=30) as client:
                try:
                    client.embed([f"held {i}"])
                    ended.append((time.monotonic(), "OK"))
                except grpc.RpcError as exc:
                    ended.append((time.monotonic(), exc.code().name))

        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        killed = time.monotonic()
        server.proc.kill()
        server.proc.wait(10)
        for t in threads:
            t.join(30)
        assert {code for _, code in ended} == {"UNAVAILABLE"}
        assert max(t for t, _ in ended) - killed < 5.0
        for child in children:
            wait_until(lambda c=child: not _running(c), 30)
        with socket.socket() as s:  # as a server binds it (connections left in TIME_WAIT)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", server.port))
            s.listen()


def test_sighup_while_front_ends_start_kills_nothing(fake_model_dir: Path) -> None:
    """SIGHUP every 50 ms from the launch on: every front end and worker comes up and
    serves (a front end used to die of a SIGHUP passed on before its handler was set)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
         "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
         "--frontends", "3"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    server = ServerProcess(proc)
    try:
        # From its first line on it has taken SIGHUP over (before: Python's start-up).
        wait_until(lambda: bool(server.lines), 30)
        while not server._ready.is_set():
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        server.wait_ready()
        for _ in range(10):
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        with EmbedClient(server.target, options=OWN) as client:
            assert client.embed(["after the SIGHUPs"]).shape == (1, HIDDEN)
        time.sleep(0.5)
        log = "".join(server.lines)
        assert "died" not in log and "restarting" not in log and "Traceback" not in log, log
    finally:
        proc.kill()
        proc.wait(10)


def _supervise_beside(config: ServeConfig, beside: Callable[[], None],
                      hooks: Any) -> None:
    """Run the supervisor in this (the main) thread, as `serve` does (its signal handlers
    need it), with `beside` in a thread meanwhile; then SIGTERM, which the supervisor's
    handler takes (drain, return). What `beside` raised is raised here."""
    import asyncio

    from embedrpc.server.supervisor import supervise

    before_term = signal.getsignal(signal.SIGTERM)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            wait_until(lambda: signal.getsignal(signal.SIGTERM) is not before_term, 60)
            beside()
        except BaseException as exc:  # reported by the test's own thread
            failed.append(exc)
        finally:
            if signal.getsignal(signal.SIGTERM) is not before_term:
                os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=run)
    thread.start()
    asyncio.run(supervise(config, 1, hooks=hooks))
    thread.join(30)
    if failed:
        raise failed[0]


def test_a_sighup_after_a_starting_front_end_read_its_keys_is_not_lost(
        fake_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A front end that had read the API keys, but not yet set its reload handler, when
    the supervisor passed a SIGHUP on kept the old key until it was restarted (an
    outside review: 2 of 30 starts, a window of tens of ms). Here a front end pauses
    10 s after reading them (a test hook) and the key is rotated 6 s after the
    supervisor took over the signals: it reloads once it can, so the new key works and
    the old one is refused. The supervisor runs in this process's main thread (its
    signal handlers need it); the checks run beside it."""
    from embedrpc.server.config import DebugHooks

    keys = tmp_path / "keys"
    keys.write_text("old-key-123456789\n")
    port = free_port()
    config = ServeConfig.of(model=str(fake_model_dir), backend="fake", device="cpu",
                            host="127.0.0.1", port=port, api_keys_file=str(keys))
    caplog.set_level("INFO", logger="embedrpc.server.supervisor")

    def logged(text: str) -> bool:
        return any(text in r.getMessage() for r in caplog.records)

    def rotate_and_check() -> None:
        time.sleep(6)  # frontend-0 has read the keys, and pauses (10 s)
        assert not logged("frontend-0 serving")
        keys.write_text("new-key-987654321\n")
        os.kill(os.getpid(), signal.SIGHUP)  # to the supervisor: it passes it on
        wait_until(lambda: logged("frontend-0 serving"), 60)
        # It was passed on while frontend-0 started (after its "hello": once it reads
        # the keys after that, a SIGHUP must reach it).
        assert logged("SIGHUP: passed on to 1 front ends")
        for _ in range(3):
            with EmbedClient(f"127.0.0.1:{port}", options=OWN,
                             api_key="new-key-987654321") as client:
                assert client.embed(["x"]).shape == (1, HIDDEN)
            with EmbedClient(f"127.0.0.1:{port}", options=OWN, retries=1,
                             api_key="old-key-123456789") as client, \
                    pytest.raises(grpc.RpcError) as err:
                client.embed(["x"])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    _supervise_beside(config, rotate_and_check, DebugHooks(frontend_start_pause_s=10.0))


def _children() -> list[int]:
    """This process's child processes (their /proc stat's parent pid)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    found.append(int(entry))
    return found


def test_a_front_end_a_group_signal_kills_while_it_starts_is_no_start_up_failure(
        fake_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A signal to the whole process group (systemd's stop, Ctrl-C, `timeout`) kills a
    front end that has not set its handlers yet; the supervisor took that for a front
    end that cannot start, and the server exited 2 ("frontend-26: killed by SIGTERM",
    an outside review, 64 front ends). Here the front end pauses 10 s after building
    its server (a test hook), is sent SIGTERM, and the supervisor 1.5 s later: the front
    end is started again, and the supervisor then drains and returns, no error."""
    from embedrpc.server.config import DebugHooks

    config = ServeConfig.of(model=str(fake_model_dir), backend="fake", device="cpu",
                            host="127.0.0.1", port=free_port())
    caplog.set_level("INFO", logger="embedrpc.server.supervisor")

    def signal_all() -> None:
        time.sleep(6)  # the workers serve; frontend-0 pauses
        # The workers and multiprocessing's resource tracker ignore SIGTERM.
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        wait_until(lambda: any("frontend-0 died: killed by SIGTERM; restarting"
                               in r.getMessage() for r in caplog.records), 20)
        time.sleep(1.5)

    _supervise_beside(config, signal_all, DebugHooks(frontend_start_pause_s=10.0))
    assert any(r.getMessage() == "stopped" for r in caplog.records)


def test_a_stuck_front_end_holds_no_scrape_up(fake_model_dir: Path) -> None:
    """A front end stopped (SIGSTOP) does not answer the supervisor's reads for the
    seconds before it is found stuck and killed (20 s here): meanwhile /metrics keeps
    answering at once with its last counts. The supervisor reads the front ends side by
    side and leaves out one whose last read failed, and overlapping scrapes do not queue
    behind each other (they took 2, 4, 6, 8 s each; Prometheus's default timeout is
    10 s). Bound: each scrape under 1.5 s, after the supervisor's first failed read."""
    with serve(fake_model_dir, "--frontends", "2", metrics=True) as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        for i in range(6):
            with EmbedClient(server.target, options=OWN) as client:
                client.embed([f"text {i}"])
        key = ("embedrpc_requests_total", (("code", "OK"),
                                           ("method", "/embedrpc.v1.Embedder/Embed")))
        wait_until(lambda: metrics(server.metrics_port).get(key) == 6, 10)
        victim = frontend_pids(server)["frontend-1"]
        os.kill(victim, signal.SIGSTOP)
        try:
            time.sleep(3.5)  # its background read (every second, 2 s timeout) has failed
            took: list[float] = []
            counts: list[float] = []

            def scrape() -> None:
                began = time.monotonic()
                counts.append(metrics(server.metrics_port)[key])
                took.append(time.monotonic() - began)

            threads = [threading.Thread(target=scrape) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            scrape()
            assert counts == [6.0] * 5  # the stopped front end's counts are kept
            assert max(took) < 1.5, took
            assert frontend_pids(server)["frontend-1"] == victim  # not restarted yet
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGCONT)


def test_a_stuck_front_end_is_killed_and_restarted(fake_model_dir: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A front end that stops answering (SIGSTOP: as an event loop stuck in a call) is
    found by the supervisor's pings, killed and restarted; the summed counters do not go
    back meanwhile. The supervisor runs in this process (for a 2 s stall allowance)."""
    import asyncio

    from embedrpc.server.config import DebugHooks
    from embedrpc.server.supervisor import supervise

    port = free_port()
    metrics_port = free_port()
    config = ServeConfig.of(model=str(fake_model_dir), backend="fake", device="cpu",
                            host="127.0.0.1", port=port, metrics_port=metrics_port)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    caplog.set_level("INFO", logger="embedrpc.server.supervisor")
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(
        supervise(config, 2, hooks=DebugHooks(frontend_stall_s=2.0), stop=stop), loop)
    target = f"127.0.0.1:{port}"

    def pids() -> dict[str, int]:
        found: dict[str, int] = {}
        for record in caplog.records:
            if m := FRONTEND.search(record.getMessage()):
                found[m.group(1)] = int(m.group(2))
        return found

    def ok_total() -> float:
        return metrics(metrics_port).get(
            ("embedrpc_requests_total", (("code", "OK"),
                                         ("method", "/embedrpc.v1.Embedder/Embed"))), 0.0)

    try:
        wait_until(lambda: len(pids()) == 2 and any(
            "serving" in r.getMessage() and "front ends" in r.getMessage()
            for r in caplog.records), 60)
        for i in range(12):
            with EmbedClient(target, options=OWN) as client:
                client.embed([f"before {i}"])
        before = ok_total()
        assert before == 12
        victim = pids()["frontend-1"]
        os.kill(victim, signal.SIGSTOP)
        assert ok_total() >= before  # a front end that does not answer keeps its counts
        wait_until(lambda: any("frontend-1 answered nothing" in r.getMessage()
                               for r in caplog.records), 20)
        wait_until(lambda: pids().get("frontend-1") not in (None, victim), 30)
        # Its death is told as the supervisor's doing, not "out of memory, or kill -9".
        assert any("frontend-1 died: killed by the supervisor: it answered nothing; "
                   "restarting" in r.getMessage() for r in caplog.records)
        assert ok_total() >= before  # nor does a restarted one's predecessor lose them
        for i in range(8):
            with EmbedClient(target, options=OWN) as client:
                assert client.embed([f"after {i}"]).shape == (1, HIDDEN)
        wait_until(lambda: ok_total() == before + 8, 10)
    finally:
        loop.call_soon_threadsafe(stop.set)
        running.result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_port_taken_by_another_program_is_a_clear_error(fake_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
             "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port",
             str(port), "--frontends", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


@pytest.mark.parametrize(("host", "which"), [("127.0.0.1", "grpc"), ("0.0.0.0", "grpc"),
                                            ("127.0.0.1", "http")])
def test_a_port_another_program_shares_is_refused(fake_model_dir: Path, host: str,
                                                  which: str) -> None:
    """A listener that set SO_REUSEPORT (every grpcio server does by default) would let
    the front ends in beside it, and take a share of their connections (outside review:
    4 calls in 20 went to it, and all IPv4 ones beside a 0.0.0.0 listener): refused, as
    one front end is, before any process starts (no spawn's traceback)."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((host, 0))
        other.listen()
        port = other.getsockname()[1]
        ports = ["--port", str(port)] if which == "grpc" else \
            ["--port", "0", "--http-port", str(port)]
        proc = subprocess.run(
            [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
             "--backend", "fake", "--device", "cpu", "--host", host, *ports,
             "--frontends", "2"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    what = "" if which == "grpc" else " for HTTP"
    assert f"cannot listen{what} on {host}:{port}: another program listens on that port" \
        in proc.stderr
    assert "Traceback" not in proc.stderr


def test_startup_warnings_are_given_once(fake_model_dir: Path) -> None:
    """The supervisor warns about keys sent in clear text; its front ends do not repeat
    it (it was printed once per process)."""
    with serve(fake_model_dir, "--frontends", "2", "--host", "0.0.0.0",
               "--api-key", "k" * 40) as server:
        wait_until(lambda: len(frontend_pids(server)) == 2, 20)
        warnings = [line for line in server.lines if "API keys without TLS" in line]
        assert len(warnings) == 1, warnings


@pytest.mark.parametrize("second", [["--frontends", "2"], ["--frontends", "1"]])
def test_a_second_server_on_the_same_port_fails_loudly(fake_model_dir: Path,
                                                      second: list[str]) -> None:
    """Front ends share their port with SO_REUSEPORT, but not with another server: a
    second one (several front ends or one) on the same port exits 2 and says why."""
    with serve(fake_model_dir, "--frontends", "2") as first:
        proc = subprocess.run(
            [sys.executable, "-m", "embedrpc", "serve", "--model", str(fake_model_dir),
             "--backend", "fake", "--device", "cpu", "--host", "127.0.0.1", "--port",
             str(first.port), *second], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"cannot listen on 127.0.0.1:{first.port}" in proc.stderr
        assert "Traceback" not in proc.stderr  # refused before a worker was spawned
        with EmbedClient(first.target) as client:  # the first one serves on, alone
            assert client.embed(["still here"]).shape == (1, HIDDEN)


@pytest.mark.parametrize(("value", "ok"), [(1, True), (64, True), (0, False), (65, False)])
def test_frontends_bounds(value: int, ok: bool) -> None:
    if ok:
        assert ServeConfig.of(frontends=value).network.frontends == value
    else:
        with pytest.raises(ValueError, match=r"--frontends must be at (least 1|most 64)"):
            ServeConfig.of(frontends=value)


@pytest.mark.parametrize(("cores", "want"), [(2, 1), (16, 4), (32, 8), (128, 8)])
def test_default_front_ends(monkeypatch: pytest.MonkeyPatch, cores: int, want: int) -> None:
    """As documented: 1 on the CPU (and the fake backend), min(8, cores / 4) with GPUs."""
    from embedrpc.server import supervisor

    monkeypatch.setattr(supervisor, "available_cores", lambda: cores)
    assert supervisor.frontends_for(ServeConfig.of(), ["cpu"]) == 1
    assert supervisor.frontends_for(ServeConfig.of(backend="fake"), ["cuda:0"]) == 1
    assert supervisor.frontends_for(ServeConfig.of(), ["cuda:0"]) == want
    assert supervisor.frontends_for(ServeConfig.of(frontends=3), ["cuda:0"]) == 3


def test_socket_paths_too_long_for_unix_sockets_are_a_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio
    import tempfile

    from embedrpc.server.errors import ModelError
    from embedrpc.server.supervisor import supervise

    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    config = ServeConfig.of(model="demo", backend="fake", device="cpu", port=0)
    with pytest.raises(ModelError, match=r"longer than a Unix socket allows .*set TMPDIR"):
        asyncio.run(supervise(config, 2))
    assert list(deep.iterdir()) == []  # its directory was removed
