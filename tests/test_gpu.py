"""CUDA workers give the same vectors as sentence-transformers (skipped without a GPU).

Tolerances, and why a GPU can meet them:

- the demo graph is a float32 plain export: on the CUDA provider, with TF32 off (the
  worker's provider options), it must agree as on the CPU, cosine >= 0.9999 and max
  abs <= 1e-4 (test_reference.py's bounds);
- the prepared graphs run on a GPU in fp16 (or bf16): vectors within cosine 0.999 of
  the float32 reference, the bound `embedrpc prepare` validates them with;
- a CUDA-graph replay and the exact-shape path on the same batch differ only in
  padding, hence kernels and summation order: per row cosine >= graphs.AGREE_COSINE
  (0.9995), the bound the worker itself checks each bucket with. Equality to 1e-5
  is not something fp16 on different kernels can promise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.server.worker.cuda_graphs import AGREE_COSINE, warmup_shapes

from .helpers import (
    DEMO_CASES,
    TINY_CASES,
    TINY_REFERENCE,
    TINY_SOURCE,
    assert_close,
    cosines,
    running_server,
    unit_reference,
)

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Qwen3 checkpoint prepared on the GPU, fp16 and fp32 (once: time there
    is short)."""
    from embedrpc.prepare import PrepareConfig, prepare


    tmp = tmp_path_factory.mktemp("gpu")
    out = {}
    for precision in ("fp16", "fp32"):
        out[precision] = tmp / precision
        prepare(PrepareConfig(model=str(TINY_SOURCE), out=out[precision], precision=precision,
                              device="cuda:0", reference=False), say=lambda _: None)
    return out


def test_cuda_worker_matches_the_reference() -> None:
    with running_server(model="demo", device="cuda:0") as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert client.info().devices == ["cuda:0"]
        assert server.workers[0].info["providers"][0] == "CUDAExecutionProvider"
        for name, case in DEMO_CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"],
                               normalize=case["normalize"])
            assert_close(got, np.array(case["embeddings"], dtype=np.float32), name)


def test_cuda_graphs_agree_with_the_ordinary_path(prepared: dict[str, Path]) -> None:
    """Capture and replay on a real GPU, fp16 prepared graph: the common buckets are
    captured at warm-up; every replay, on batches it was not captured with, agrees with
    the exact-shape path (cosine >= AGREE_COSINE), interleaved with batches too big for
    a graph; the served vectors match sentence-transformers (fp16: cosine >= 0.999)."""
    from embedrpc.server.worker.backends import OrtBackend
    from embedrpc.server.worker.spec import WorkerSpec


    out = prepared["fp16"]
    max_tokens, max_length = 1024, TINY_REFERENCE["max_length"]
    backend = OrtBackend(WorkerSpec.of(onnx_path=str(out / "model.onnx"), device="cuda:0",
                                    cuda_graphs=True, cuda_graph_max_tokens=max_tokens,
                                    max_length=max_length))
    backend.warmup()
    info = backend.describe()
    assert info["cuda_graphs"] is True, info.get("graphs_off")
    assert info["warmup_buckets"] == len(warmup_shapes(max_tokens, max_length))
    assert info["warmup_s"] > 0
    rng = np.random.default_rng(3)
    shapes = [(1, 5), (3, 17), (40, 100), (1, 7), (3, 20), (5, 30), (2, 128), (1, 3)] * 2
    for rows, longest in shapes:
        lengths = rng.integers(1, longest + 1, rows).astype(np.int32)
        lengths[0] = longest
        ids = rng.integers(1, 1000, int(lengths.sum())).astype(np.int32)
        got = backend.embed(ids, lengths)
        want = backend.embed_exact(ids, lengths)
        assert np.isfinite(got).all()
        assert cosines(got, want).min() >= AGREE_COSINE, (rows, longest)
    assert backend.static is not None and backend.static.off is None, backend.static.off
    assert backend.describe()["min_agreement"] >= AGREE_COSINE
    with running_server(model=str(out), device="cuda:0", cuda_graphs=True) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert server.workers[0].info["cuda_graphs"] is True
        for name, case in TINY_CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"])
            assert cosines(got.astype(np.float64), unit_reference(case)).min() >= 0.999, name


def test_float32_prepared_graph_on_cuda_warns_and_stays_exact(
        prepared: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """fp32 prepared graph on CUDA: its attention falls back to the CPU (a warning), the
    result is still float32 (TF32 off): cosine >= 0.9999 and max abs <= 1e-4 to the
    sentence-transformers reference. With CUDA graphs it is refused before loading."""
    from embedrpc.server.errors import ModelError
    from embedrpc.server.worker.backends import OrtBackend
    from embedrpc.server.worker.spec import WorkerSpec


    out = prepared["fp32"]
    with caplog.at_level(logging.WARNING, logger="embedrpc.server.worker.backends"):
        backend = OrtBackend(WorkerSpec.of(onnx_path=str(out / "model.onnx"), device="cuda:0",
                                        max_length=TINY_REFERENCE["max_length"]))
    assert "GroupQueryAttention runs on CUDA in fp16 and bf16 only" in caplog.text
    assert backend.describe()["warnings"]
    for name, case in TINY_CASES.items():
        rows = case["token_ids"]
        ids = np.concatenate([np.array(r, np.int32) for r in rows])
        got = backend.embed(ids, np.array([len(r) for r in rows], np.int32)).astype(np.float64)
        want = unit_reference(case)
        if case["dimensions"]:
            got = got[:, :case["dimensions"]]
            got /= np.linalg.norm(got, axis=1, keepdims=True)
        assert cosines(got, want).min() >= 0.9999, name
        assert np.abs(got - want).max() <= 1e-4, name
    with pytest.raises(ModelError, match="--cuda-graphs: a fp32 prepared graph"):
        OrtBackend(WorkerSpec.of(onnx_path=str(out / "model.onnx"), device="cuda:0",
                              cuda_graphs=True))


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_attention_kernel_switch(prepared: dict[str, Path], kernel: str) -> None:
    """The `sdpa_kernel` provider option reaches ONNX Runtime: the session loads with
    it and its vectors agree with ORT's own choice on the same batch (fp16, both within
    rounding: cosine >= AGREE_COSINE)."""
    from embedrpc.server.worker.backends import OrtBackend
    from embedrpc.server.worker.spec import WorkerSpec


    out = prepared["fp16"]
    spec = {"onnx_path": str(out / "model.onnx"), "device": "cuda:0"}
    chosen = OrtBackend(WorkerSpec.of(attention_kernel=kernel, **spec))  # type: ignore[arg-type]
    default = OrtBackend(WorkerSpec.of(**spec))  # type: ignore[arg-type]
    rows = [r for case in TINY_CASES.values() for r in case["token_ids"]]
    ids = np.concatenate([np.array(r, np.int32) for r in rows])
    lengths = np.array([len(r) for r in rows], np.int32)
    got, want = chosen.embed(ids, lengths), default.embed(ids, lengths)
    assert np.isfinite(got).all()
    assert cosines(got, want).min() >= AGREE_COSINE
    assert chosen.describe()["attention_kernel"] == kernel
