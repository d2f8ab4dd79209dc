"""The bucketed path under --cuda-graphs, checked on CPU (the CPU provider has no
graphs, so capture itself is tested in test_gpu.py).

Batches are padded up to (rows, length) buckets and run on bindings allocated once
per bucket. The independent reference is sentence-transformers' output for the
tiny Qwen3 model (tests/data/tiny_qwen3_reference.json); tolerances as in
test_prepare.py: float32 cosine >= 0.9999 and max abs <= 1e-5. Padding rows and
columns must not change a vector beyond 1e-5 (batch invariance).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.prepare import PrepareConfig, prepare
from embedrpc.server import EmbedServer, ServeConfig, graphs
from embedrpc.server.errors import ModelError
from embedrpc.server.graphs import LENGTH_BUCKETS, ROW_BUCKETS, bucket
from embedrpc.server.model import DEMO_DIR
from embedrpc.server.worker import OrtBackend, WorkerSpec

from .conftest import running_server
from .test_prepare import CASES, REFERENCE, SOURCE, _cosines, _expected

BATCH_INVARIANCE = 1e-5
COSINE, MAX_ABS = 0.9999, 1e-5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("static") / "fp32"
    prepare(PrepareConfig(model=str(SOURCE), out=out, precision="fp32", device="cpu",
                          reference=False), say=lambda _: None)
    return out


def _backend(directory: Path, **spec: object) -> OrtBackend:
    return OrtBackend(WorkerSpec(onnx_path=str(directory / "model.onnx"), static_shapes=True,
                                 max_length=REFERENCE["max_length"], **spec))  # type: ignore[arg-type]


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
        assert got.shape == (rows, REFERENCE["dimensions"]) and got.dtype == np.float32
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
    for name, case in CASES.items():
        got = backend.embed(*_batch(case["token_ids"])).astype(np.float64)
        want = _expected(case)
        if case["dimensions"]:
            got = got[:, :case["dimensions"]]
            got /= np.linalg.norm(got, axis=1, keepdims=True)
        assert _cosines(got, want).min() >= COSINE, name
        assert np.abs(got - want).max() <= MAX_ABS, name
    assert backend.static is not None and backend.static.off is None


def test_oversized_batches_take_the_exact_path(prepared: Path) -> None:
    backend = _backend(prepared, graph_max_tokens=64)
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
    ids, lengths = _batch(CASES["documents"]["token_ids"][:3])
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.graphs"):
        got = backend.embed(ids, lengths)
    np.testing.assert_allclose(got, backend.embed_exact(ids, lengths), atol=BATCH_INVARIANCE)
    assert backend.static is not None and "disagreed" in (backend.static.off or "")
    assert "exact shape from now on" in caplog.text
    assert backend.describe()["static_shapes"] is False
    # From now on every batch takes the exact path (the broken slot is never used).
    np.testing.assert_allclose(backend.embed(ids, lengths), got, atol=BATCH_INVARIANCE)


def test_a_graph_that_does_not_pool_is_refused() -> None:
    # The demo model's graph returns last_hidden_state; the worker pools it.
    with pytest.raises(ModelError, match="embedrpc prepare"):
        OrtBackend(WorkerSpec(onnx_path=str(DEMO_DIR / "model.onnx"), static_shapes=True,
                              hidden_size=128))


def test_served_through_the_bucketed_path(prepared: Path) -> None:
    with running_server(model=str(prepared), workers=1, static_shapes=True) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert server.workers[0].info["static_shapes"] is True
        for name, case in CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"])
            want = _expected(case)
            assert _cosines(got.astype(np.float64), want).min() >= COSINE, name
            assert np.abs(got - want).max() <= MAX_ABS, name


def test_cuda_graphs_flag_needs_a_gpu(prepared: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ModelError, match="--cuda-graphs needs a CUDA device"):
        EmbedServer(ServeConfig(model=str(prepared), device="cpu", cuda_graphs=True))
    if graphs_available():
        pytest.skip("a GPU is here: --device auto would use it")
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.app"):
        server = EmbedServer(ServeConfig(model=str(prepared), device="auto", cuda_graphs=True))
    assert server.devices == ["cpu"]
    assert "no GPU, so no CUDA graphs" in caplog.text
    with pytest.raises(ValueError, match="at least 8"):
        ServeConfig(cuda_graph_max_tokens=4)


def graphs_available() -> bool:
    from embedrpc.server.app import cuda_device_count

    return cuda_device_count() > 0
