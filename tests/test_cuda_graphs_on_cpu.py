"""The bucketed path under --cuda-graphs, checked on CPU (the CPU provider has no
graphs, so capture itself is tested in test_gpu.py).

Batches are padded up to (rows, length) buckets and run on bindings allocated once
per bucket. The independent reference is sentence-transformers' output for the
tiny Qwen3 model (tests/data/tiny_qwen3_reference.json); tolerances as in
test_prepare.py: float32 cosine >= 0.9999 and max abs <= 1e-5. Padding rows and
columns must not change a vector beyond 1e-5 (batch invariance): the CPU provider
runs the same float32 kernels whatever the padding, so this strict bound holds here.
On a GPU it need not (other kernels per shape, fp16): there the bound is a cosine
(graphs.AGREE_COSINE; tests/test_gpu.py).

The capture path's failure handling runs here too: a StaticShapes with `capture` on
over a CPU session (graph ids are run options the CPU provider ignores), with
failures injected where a GPU would raise them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.prepare import PrepareConfig, prepare
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.errors import ModelError
from embedrpc.server.model import DEMO_DIR
from embedrpc.server.worker import cuda_graphs as graphs
from embedrpc.server.worker.backends import OrtBackend
from embedrpc.server.worker.cuda_graphs import LENGTH_BUCKETS, ROW_BUCKETS, WARMUP_ROWS, bucket
from embedrpc.server.worker.spec import WorkerSpec

from .helpers import (
    TINY_CASES,
    TINY_REFERENCE,
    TINY_SOURCE,
    cosines,
    running_server,
    unit_reference,
)

BATCH_INVARIANCE = 1e-5
COSINE, MAX_ABS = 0.9999, 1e-5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("static") / "fp32"
    prepare(PrepareConfig(model=str(TINY_SOURCE), out=out, precision="fp32", device="cpu",
                          reference=False), say=lambda _: None)
    return out


def _backend(directory: Path, **spec: object) -> OrtBackend:
    return OrtBackend(WorkerSpec.of(onnx_path=str(directory / "model.onnx"), static_shapes=True,
                                 max_length=TINY_REFERENCE["max_length"], **spec))  # type: ignore[arg-type]


def _batch(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([np.array(r, np.int32) for r in rows]),
            np.array([len(r) for r in rows], np.int32))


# ------------------------------------------------------------------ buckets


def test_bucket_is_the_smallest_that_holds_the_batch_within_1_5x() -> None:
    for rows in range(1, ROW_BUCKETS[-1] + 1):
        for width in range(1, LENGTH_BUCKETS[-1] + 1, 7):
            shape = bucket(rows, width, max_tokens=1 << 30)
            assert shape is not None
            r, w = shape
            assert r >= rows and w >= width
            # No smaller bucket would do, and padding stays under 1.5x (8 tokens at least).
            assert all(b < rows for b in ROW_BUCKETS if b < r)
            assert all(b < width for b in LENGTH_BUCKETS if b < w)
            assert r <= 1.5 * rows and w <= max(8, 1.5 * width)


def test_bucket_refuses_what_it_must() -> None:
    assert bucket(ROW_BUCKETS[-1] + 1, 8, 1 << 30) is None  # more rows than any bucket
    assert bucket(1, LENGTH_BUCKETS[-1] + 1, 1 << 30) is None  # longer than any bucket
    assert bucket(30, 60, max_tokens=2048) == (32, 64)
    assert bucket(30, 60, max_tokens=2047) is None  # 32 x 64 padded tokens is over
    assert bucket(2, 100, 1 << 30, max_length=100) is None  # bucket 128 > the model's 100
    assert bucket(2, 90, 1 << 30, max_length=128) == (2, 96)


# ------------------------------------------------------------------ the bucketed path


def test_bucketed_batches_equal_exact_shapes(prepared: Path) -> None:
    backend = _backend(prepared)
    rng = np.random.default_rng(7)
    vocab = 1000
    for rows, longest in [(1, 1), (1, 5), (3, 17), (5, 30), (7, 64), (13, 100), (40, 128)]:
        lengths = rng.integers(1, longest + 1, rows).astype(np.int32)
        lengths[rng.integers(rows)] = longest
        ids = rng.integers(1, vocab, int(lengths.sum())).astype(np.int32)
        got = backend.embed(ids, lengths)
        assert got.shape == (rows, TINY_REFERENCE["dimensions"]) and got.dtype == np.float32
        np.testing.assert_allclose(got, backend.embed_exact(ids, lengths), atol=BATCH_INVARIANCE)
        # Each row alone, at its own exact shape: batch-mates and padding change nothing.
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        alone = np.concatenate([backend.embed_exact(ids[offsets[i]:offsets[i + 1]],
                                                    lengths[i:i + 1]) for i in range(rows)])
        np.testing.assert_allclose(got, alone, atol=BATCH_INVARIANCE)
    info = backend.describe()
    assert info["static_shapes"] is True
    assert {(1, 8), (3, 24), (6, 32), (8, 64), (16, 128)} <= set(info["buckets"])


def test_bucketed_path_matches_sentence_transformers(prepared: Path) -> None:
    backend = _backend(prepared)
    for name, case in TINY_CASES.items():
        got = backend.embed(*_batch(case["token_ids"])).astype(np.float64)
        want = unit_reference(case)
        if case["dimensions"]:
            got = got[:, :case["dimensions"]]
            got /= np.linalg.norm(got, axis=1, keepdims=True)
        assert cosines(got, want).min() >= COSINE, name
        assert np.abs(got - want).max() <= MAX_ABS, name
    assert backend.static is not None and backend.static.off is None


def test_oversized_batches_take_the_exact_path(prepared: Path) -> None:
    backend = _backend(prepared, cuda_graph_max_tokens=64)
    ids, lengths = _batch([[5] * 30, [6] * 20, [7] * 3])  # 3 x 32 = 96 padded tokens
    got = backend.embed(ids, lengths)
    np.testing.assert_allclose(got, backend.embed_exact(ids, lengths), atol=BATCH_INVARIANCE)
    assert backend.describe()["buckets"] == []


def test_a_bucket_that_disagrees_is_turned_off(prepared: Path, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    # A replay that reads stale inputs (the classic CUDA-graph bug): the bucket's
    # buffers keep the pad rows it was first run on. The first-use check must catch it.
    backend = _backend(prepared)
    original = graphs._Slot.run
    runs = {"n": 0}

    def stale(self: graphs._Slot, ids: np.ndarray, lengths: np.ndarray, *,
              eager: bool = False) -> np.ndarray:
        runs["n"] += 1
        if runs["n"] == 1:
            return original(self, ids, lengths, eager=eager)
        backend.session.run_with_iobinding(self.binding, self.run_options)  # no update
        return self.binding.copy_outputs_to_cpu()[0][:len(lengths)]

    monkeypatch.setattr(graphs._Slot, "run", stale)
    ids, lengths = _batch(TINY_CASES["documents"]["token_ids"][:3])
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.worker.cuda_graphs"):
        got = backend.embed(ids, lengths)
    np.testing.assert_allclose(got, backend.embed_exact(ids, lengths), atol=BATCH_INVARIANCE)
    assert backend.static is not None and "disagreed" in (backend.static.off or "")
    assert "exact shape from now on" in caplog.text
    assert backend.describe()["static_shapes"] is False
    # From now on every batch takes the exact path (the broken slot is never used).
    np.testing.assert_allclose(backend.embed(ids, lengths), got, atol=BATCH_INVARIANCE)


def test_warmup_makes_the_common_buckets_and_reports_the_time(
        prepared: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    max_tokens, max_length = 1024, TINY_REFERENCE["max_length"]
    backend = _backend(prepared, cuda_graph_max_tokens=max_tokens)
    with caplog.at_level(logging.INFO, logger="embedrpc.server.worker.cuda_graphs"):
        backend.warmup()
    # As documented: WARMUP_ROWS × every length bucket, within both limits.
    want = {(r, w) for r in WARMUP_ROWS for w in LENGTH_BUCKETS
            if r * w <= max_tokens and w <= max_length}
    assert (1, 8) in want and (32, 32) in want and (16, 128) not in want
    info = backend.describe()
    assert set(info["buckets"]) == want and info["warmup_buckets"] == len(want)
    assert info["static_shapes"] is True and "graphs_off" not in info
    assert 0 < info["warmup_s"] < 600
    assert f"{len(want)} buckets made and checked at warm-up in" in caplog.text
    # Every bucket's check ran (the CPU is exact: cosine 1 to rounding).
    assert info["min_agreement"] >= 1 - 1e-6
    # Batches in warm buckets need no first use: they replay at once.
    monkeypatch.setattr(graphs.StaticShapes, "_first_use", None)
    for name in ("documents", "queries"):
        ids, lengths = _batch(TINY_CASES[name]["token_ids"])
        assert bucket(len(lengths), int(lengths.max()), max_tokens, max_length) in want
        got = backend.embed(ids, lengths)
        np.testing.assert_allclose(got, backend.embed_exact(ids, lengths),
                                   atol=BATCH_INVARIANCE)


def _capturing(directory: Path) -> OrtBackend:
    """A backend whose bucketed path is the capture path (as with --cuda-graphs on a
    GPU), over a CPU session."""
    backend = _backend(directory)
    backend.static = graphs.StaticShapes(backend, capture=True, max_tokens=4096)
    backend.cuda_graphs = True
    return backend


def _fail_when(monkeypatch: pytest.MonkeyPatch, failing: Callable[[bool], bool]) -> None:
    original = graphs._Slot.run

    def run(self: graphs._Slot, ids: np.ndarray, lengths: np.ndarray, *,
            eager: bool = False) -> np.ndarray:
        if failing(eager):
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is "
                               "capturing")
        return original(self, ids, lengths, eager=eager)

    monkeypatch.setattr(graphs._Slot, "run", run)


@pytest.mark.parametrize("when", ["capture", "replay"])
def test_a_failed_capture_or_replay_rebuilds_the_session_without_graphs(
        prepared: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        when: str) -> None:
    backend = _capturing(prepared)
    ids, lengths = _batch(TINY_CASES["documents"]["token_ids"][:3])
    if when == "replay":  # the bucket is made and checked first; a later replay fails
        backend.embed(ids, lengths)
        assert backend.static is not None and len(backend.static.slots) == 1
        _fail_when(monkeypatch, lambda eager: True)
    else:  # the first non-eager run of a bucket is its capture
        _fail_when(monkeypatch, lambda eager: not eager)
    loads: list[bool] = []
    real_load = OrtBackend._load

    def load(self: OrtBackend, *, cuda_graphs: bool) -> object:
        loads.append(cuda_graphs)
        return real_load(self, cuda_graphs=cuda_graphs)

    monkeypatch.setattr(OrtBackend, "_load", load)
    old_session = backend.session
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.worker.cuda_graphs"):
        got = backend.embed(ids, lengths)
    # A new session, asked for without CUDA graphs, answered the batch exactly.
    assert loads == [False] and backend.session is not old_session
    assert backend.cuda_graphs is False
    with pytest.raises(Exception, match="gpu_graph_id"):
        backend.run_options.get_run_config_entry("gpu_graph_id")
    want = unit_reference(TINY_CASES["documents"])[:3]
    assert cosines(got.astype(np.float64), want).min() >= COSINE
    assert np.abs(got - want).max() <= MAX_ABS
    assert backend.static is not None and "failed" in (backend.static.off or "")
    assert not backend.static.slots
    info = backend.describe()
    assert info["cuda_graphs"] is False and "RuntimeError" in info["graphs_off"]
    assert "session rebuilt without CUDA graphs" in caplog.text
    # From now on the exact path, on the new session, and no more rebuilds.
    monkeypatch.setattr(graphs._Slot, "run", None)
    np.testing.assert_allclose(backend.embed(ids, lengths), got, atol=BATCH_INVARIANCE)
    assert loads == [False]


def test_a_worker_whose_session_cannot_be_rebuilt_exits(
        prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # When not even a session without graphs can be made, the batch fails and the worker
    # process ends, so that WorkerHandle starts a fresh one.
    import multiprocessing
    import threading

    from embedrpc.server.worker import process as worker_module
    from embedrpc.server.worker.spec import Batch

    backend = _capturing(prepared)
    _fail_when(monkeypatch, lambda eager: not eager)

    def no_session(self: OrtBackend, *, cuda_graphs: bool) -> object:
        raise ModelError("CUDA failure 999: unknown error")

    monkeypatch.setattr(OrtBackend, "_load", no_session)
    monkeypatch.setattr(worker_module, "make_backend", lambda spec: backend)
    monkeypatch.setattr(worker_module, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(OrtBackend, "warmup", lambda self: None)
    parent, child = multiprocessing.Pipe()
    thread = threading.Thread(target=worker_module.worker_main, args=(child, WorkerSpec.of()))
    thread.start()
    try:
        assert parent.recv()[0] == "ready"
        ids, lengths = _batch(TINY_CASES["documents"]["token_ids"][:2])
        parent.send(Batch(7, ids, lengths))
        kind, batch_id, message = parent.recv()
        assert (kind, batch_id) == ("fail", 7) and "CUDA failure 999" in message
        thread.join(10)
        assert not thread.is_alive()  # returned without waiting for another batch
        assert "no session after CUDA graphs were dropped" in (backend.broken or "")
    finally:
        if thread.is_alive():
            parent.send(None)
            thread.join(10)


def test_a_graph_that_does_not_pool_is_refused() -> None:
    # The demo model's graph returns last_hidden_state; the worker pools it.
    with pytest.raises(ModelError, match="embedrpc prepare"):
        OrtBackend(WorkerSpec.of(onnx_path=str(DEMO_DIR / "model.onnx"), static_shapes=True,
                              hidden_size=128))


def test_served_through_the_bucketed_path(prepared: Path) -> None:
    with running_server(model=str(prepared), workers=1, static_shapes=True) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert server.workers[0].info["static_shapes"] is True
        for name, case in TINY_CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"])
            want = unit_reference(case)
            assert cosines(got.astype(np.float64), want).min() >= COSINE, name
            assert np.abs(got - want).max() <= MAX_ABS, name


def test_cuda_graphs_flag_needs_a_gpu(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ModelError, match="--cuda-graphs needs a CUDA device"):
        EmbedServer(ServeConfig.of(model=str(prepared), device="cpu", cuda_graphs=True))
    if graphs_available():
        pytest.skip("a GPU is here: --device auto would use it")
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.app"):
        server = EmbedServer(ServeConfig.of(model=str(prepared), device="auto", cuda_graphs=True))
    assert server.devices == ["cpu"]
    assert "no GPU, so no CUDA graphs" in caplog.text
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig.of(cuda_graph_max_tokens=4)


def graphs_available() -> bool:
    from embedrpc.server.devices import cuda_device_count

    return cuda_device_count() > 0
