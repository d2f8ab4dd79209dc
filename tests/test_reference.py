"""The demo model served over gRPC agrees with sentence-transformers.

tests/data/demo_reference.json holds sentence-transformers' vectors (and, for
`raw_pooled`, transformers' un-normalised last-token states) for the bundled
demo model, made by scripts/make_demo_model.py with the model's real weights.
Tolerances: cosine >= 0.9999 and max abs diff <= 1e-4 per vector (fp32, CPU);
batch invariance: the same text alone and in a mixed batch agree to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest

from embedrpc.client import EmbedClient

from .helpers import DEMO_CASES, DEMO_REFERENCE, assert_close

BATCH_INVARIANCE = 1e-5


@pytest.fixture(scope="module")
def client(demo_server) -> EmbedClient:
    _, target = demo_server
    with EmbedClient(target, timeout=60) as c:
        yield c


def _request_args(case: dict) -> dict:
    return dict(prompt_name=case["prompt_name"], instruction=case["instruction"],
                dimensions=case["dimensions"], normalize=case["normalize"])


def test_info_matches_the_reference_model(client: EmbedClient) -> None:
    info = client.info()
    assert info.dimensions == DEMO_REFERENCE["dimensions"]
    assert info.max_length == DEMO_REFERENCE["max_length"]
    assert info.pooling == "lasttoken" and "query" in info.prompt_names


@pytest.mark.parametrize("name", sorted(DEMO_CASES))
@pytest.mark.parametrize("encoding", ["float", "float32"])
def test_server_matches_sentence_transformers(client: EmbedClient, name: str,
                                              encoding: str) -> None:
    case = DEMO_CASES[name]
    got = client.embed(case["inputs"], encoding=encoding, **_request_args(case))
    assert_close(got, np.array(case["embeddings"], dtype=np.float32), name)


@pytest.mark.parametrize("name", sorted(DEMO_CASES))
def test_token_ids_match_the_hf_tokenizer(client: EmbedClient, name: str) -> None:
    case = DEMO_CASES[name]
    response = client.tokenize(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"])
    assert [list(i.ids) for i in response.inputs] == case["token_ids"]
    assert [i.truncated for i in response.inputs] == [len(t) == DEMO_REFERENCE["max_length"]
                                                       and name == "long" for t in
                                                       case["token_ids"]]


def test_vectors_do_not_depend_on_batch_mates(client: EmbedClient) -> None:
    # Every reference text (no prompt) alone, then all in one mixed-length request.
    texts = [t for name in ("documents", "multilingual", "long", "edge")
             for t in DEMO_CASES[name]["inputs"]]
    alone = np.concatenate([client.embed([t]) for t in texts])
    together = client.embed(texts)
    shuffled_order = np.random.default_rng(0).permutation(len(texts))
    shuffled = client.embed([texts[i] for i in shuffled_order])
    assert np.isfinite(together).all()
    assert np.abs(alone - together).max() <= BATCH_INVARIANCE
    assert np.abs(together[shuffled_order] - shuffled).max() <= BATCH_INVARIANCE


def test_concurrent_requests_across_workers(demo_server, client: EmbedClient) -> None:
    from concurrent.futures import ThreadPoolExecutor

    case = DEMO_CASES["documents"]
    want = np.array(case["embeddings"], dtype=np.float32)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: client.embed(case["inputs"]), range(32)))
    for got in results:
        assert_close(got, want, "documents (concurrent)")
