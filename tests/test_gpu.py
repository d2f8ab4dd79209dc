"""CUDA workers give the same vectors as sentence-transformers (skipped without a GPU).

Same tolerances as test_reference.py: the demo graph is fp32, so the CUDA
provider must agree to cosine >= 0.9999 and max abs diff <= 1e-4. CUDA graph
replays must equal the exact-shape path to 1e-5 (the same fp32 kernels on the
same data, padded to a bucket).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient

from .conftest import running_server
from .test_reference import CASES, assert_close

pytestmark = pytest.mark.gpu


def test_cuda_worker_matches_the_reference() -> None:
    with running_server(model="demo", device="cuda:0") as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert client.info().devices == ["cuda:0"]
        assert server.workers[0].info["providers"][0] == "CUDAExecutionProvider"
        for name, case in CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"],
                               normalize=case["normalize"])
            assert_close(got, np.array(case["embeddings"], dtype=np.float32), name)


def test_cuda_graphs_agree_with_the_ordinary_path(tmp_path: Path) -> None:
    """Capture and replay on a real GPU: every bucket's replay, on batches it was not
    captured with, equals the exact-shape path (fp32 prepared graph: 1e-5), interleaved
    with batches too big for a graph, and the served vectors match sentence-transformers."""
    from embedrpc.prepare import PrepareConfig, prepare
    from embedrpc.server.worker import OrtBackend, WorkerSpec

    from .test_prepare import CASES as TINY_CASES
    from .test_prepare import REFERENCE, SOURCE, _cosines, _expected

    out = tmp_path / "fp32"
    prepare(PrepareConfig(model=str(SOURCE), out=out, precision="fp32", device="cuda:0",
                          reference=False), say=lambda _: None)
    backend = OrtBackend(WorkerSpec(onnx_path=str(out / "model.onnx"), device="cuda:0",
                                    cuda_graphs=True, graph_max_tokens=1024,
                                    max_length=REFERENCE["max_length"]))
    backend.warmup()
    rng = np.random.default_rng(3)
    shapes = [(1, 5), (3, 17), (40, 100), (1, 7), (3, 20), (5, 30), (2, 128), (1, 3)] * 2
    for rows, longest in shapes:
        lengths = rng.integers(1, longest + 1, rows).astype(np.int32)
        lengths[0] = longest
        ids = rng.integers(1, 1000, int(lengths.sum())).astype(np.int32)
        got = backend.embed(ids, lengths)
        np.testing.assert_allclose(got, backend.embed_exact(ids, lengths), atol=1e-5)
    assert backend.static is not None and backend.static.off is None, backend.static.off
    assert len(backend.static.slots) >= 5
    with running_server(model=str(out), device="cuda:0", cuda_graphs=True) as (server, target), \
            EmbedClient(target, timeout=60) as client:
        assert server.workers[0].info["cuda_graphs"] is True
        for name, case in TINY_CASES.items():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"])
            assert _cosines(got.astype(np.float64), _expected(case)).min() >= 0.9999, name
