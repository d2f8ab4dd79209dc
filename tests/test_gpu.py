"""CUDA workers give the same vectors as sentence-transformers (skipped without a GPU).

Same tolerances as test_reference.py: the demo graph is fp32, so the CUDA
provider must agree to cosine >= 0.9999 and max abs diff <= 1e-4.
"""

from __future__ import annotations

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
