"""The Reranker service end to end: the tiny Qwen3-Reranker with Qwen's real tokenizer
(tests/qwen3_fixtures.write_reranker_checkpoint), given to the server as the checkpoint it
is and served from the checkpoint cache, scores pairs as Qwen3-Reranker's model card does.

Reference: tests/data/qwen3_reranker_reference.json (the card's procedure with
transformers, scripts/make_reranker_fixture.py). Tolerance through the server in fp32:
max |score difference| 1e-4, each query's ranking the reference's (scores closer than
1e-4 are ties), usage the card's token counts and cuts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.server import EmbedServer
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from . import qwen3_fixtures as fx
from .helpers import DATA, running_server
from .rerank_checks import FP32_BOUND, assert_scores_match, by_index, check_ranked, rerank_case

REFERENCE = json.loads((DATA / "qwen3_reranker_reference.json").read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in REFERENCE["cases"]}
# The cases at the card's max_length (8192), which the server serves by default.
AT_CARD_LENGTH = [c for c in REFERENCE["cases"] if c["max_length"] == 8192]
MAX_INPUTS = 1000


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbedServer, str]]:
    """The checkpoint (named like the published one: --task auto finds a reranker),
    prepared into an empty cache by the server's start, two workers."""
    checkpoint = fx.write_reranker_checkpoint(tmp_path_factory.mktemp("ckpt")
                                              / "Qwen3-Reranker-tiny")
    cache = tmp_path_factory.mktemp("cache")
    with running_server(model=str(checkpoint), cache_dir=str(cache), workers=2,
                        max_inputs=MAX_INPUTS) as running:
        server, _ = running
        [model] = server.models
        assert model.task == "rerank" and model.path.parent == cache / "prepared"
        assert "-fp32-rerank-" in model.path.name
        yield running


@pytest.fixture(scope="module")
def stub(served: tuple[EmbedServer, str]) -> Iterator[pb_grpc.RerankerStub]:
    with grpc.insecure_channel(served[1]) as channel:
        yield pb_grpc.RerankerStub(channel)


def test_served_scores_are_the_model_cards(served, stub) -> None:
    got, want, groups = [], [], []
    for case in AT_CARD_LENGTH:  # default and custom instructions, multilingual, empty
        g, w, _ = rerank_case(stub, case)  # documents and queries, special tokens as text
        got.append(g)
        want += list(w)
        groups += case["groups"]
    assert_scores_match(np.concatenate(got), want, groups)
    with grpc.insecure_channel(served[1]) as channel:
        info = pb_grpc.EmbedderStub(channel).Info(pb.InfoRequest(), timeout=10)
    assert (info.task, info.model, info.max_length, info.dimensions) == \
        ("rerank", "Qwen3-Reranker-tiny", 8192, 0)
    assert info.default_instruction == REFERENCE["default_instruction"]
    assert [(m.name, m.task, m.HasField("dimensions")) for m in info.models] == \
        [("Qwen3-Reranker-tiny", "rerank", False)]


def test_long_documents_are_cut_as_the_card_cuts_them(served) -> None:
    # The same prepared directory served with the reference's max_length of 96: long
    # documents lose their tail, and a query that fills the budget pushes its documents
    # out entirely (both score the same), as in the card.
    server, _ = served
    case = CASES["long_documents"]
    with running_server(model=str(server.models[0].path), max_length=case["max_length"],
                        workers=1) as (_, target), grpc.insecure_channel(target) as channel:
        got, want, responses = rerank_case(pb_grpc.RerankerStub(channel), case)
    assert_scores_match(got, want, case["groups"])
    assert [r.usage.truncated_inputs for r in responses] == [3, 2]
    assert got[4] == got[5]


def test_rerank_batch_scores_every_query_in_one_call(stub) -> None:
    groups = [g for name in ("default_instruction", "multilingual", "empty_documents")
              for g in CASES[name]["groups"]]
    reply = stub.RerankBatch(pb.RerankBatchRequest(request_id="batch-1", requests=[
        pb.RerankRequest(query=g["query"], documents=g["documents"], request_id=f"q{i}",
                         return_documents=i == 0)
        for i, g in enumerate(groups)]), timeout=60)
    assert reply.request_id == "batch-1" and reply.model == "Qwen3-Reranker-tiny"
    assert [r.request_id for r in reply.responses] == [f"q{i}" for i in range(len(groups))]
    got = np.concatenate([by_index(r, len(g["documents"]))
                          for r, g in zip(reply.responses, groups, strict=True)])
    assert_scores_match(got, [s for g in groups for s in g["scores"]], groups)
    for response in reply.responses:
        check_ranked(response)
    assert reply.usage.prompt_tokens == sum(len(t) for g in groups for t in g["token_ids"])
    assert [r.document for r in reply.responses[0].results] == \
        [groups[0]["documents"][r.index] for r in reply.responses[0].results]
    assert not reply.responses[1].results[0].HasField("document")


def test_a_thousand_documents_spread_over_every_worker(served, stub) -> None:
    # 1,000 documents (the --max-inputs of this server): 200 copies of each of a query's
    # 5 reference documents. Every score is the card's; the copies of the best document
    # come first, and so on (the reference's scores are 0.004 or more apart).
    server, _ = served
    group = CASES["default_instruction"]["groups"][0]
    documents = group["documents"] * (MAX_INPUTS // len(group["documents"]))

    def busy() -> list[float]:
        return [server.metrics.registry.get_sample_value(
            "embedrpc_worker_busy_seconds_total", {"worker": w.name}) or 0.0
            for w in server.workers]

    before = busy()
    reply = stub.Rerank(pb.RerankRequest(query=group["query"], documents=documents),
                        timeout=120)
    after = busy()
    got = by_index(reply, len(documents))
    want = np.tile(group["scores"], MAX_INPUTS // len(group["documents"]))
    assert np.abs(got - want).max() <= FP32_BOUND
    check_ranked(reply)
    rank = list(np.argsort(-np.asarray(group["scores"])))
    assert [r.index % 5 for r in reply.results] == [i for i in rank for _ in range(200)]
    assert reply.usage.prompt_tokens == 200 * sum(map(len, group["token_ids"]))
    assert len(server.workers) == 2
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    # One more document is over the bound.
    with pytest.raises(grpc.RpcError) as error:
        stub.Rerank(pb.RerankRequest(query="q", documents=["d"] * (MAX_INPUTS + 1)),
                    timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "1001 documents in one request; at most 1000 are allowed (--max-inputs)" in \
        error.value.details()


def test_top_n_and_return_documents(served) -> None:
    group = CASES["default_instruction"]["groups"][1]
    documents = group["documents"]
    best_first = list(np.argsort(-np.asarray(group["scores"]), kind="stable"))
    with EmbedClient(served[1], timeout=30) as client:
        top = client.rerank(group["query"], documents, top_n=2, return_documents=True)
        assert [r.index for r in top] == best_first[:2]
        assert [r.document for r in top] == [documents[i] for i in best_first[:2]]
        np.testing.assert_allclose([r.score for r in top],
                                   [group["scores"][i] for i in best_first[:2]],
                                   atol=FP32_BOUND, rtol=0)
        for top_n in (0, len(documents), len(documents) + 1):  # all of them
            every = client.rerank(group["query"], documents, top_n=top_n)
            assert [r.index for r in every] == best_first
            assert all(r.document is None for r in every)


def test_a_pair_too_long_for_truncate_none(stub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Rerank(pb.RerankRequest(query="q", documents=["short", "word " * 9000],
                                     truncate=pb.TRUNCATE_NONE), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[1] is longer than max_length 8192 tokens: it has 9" in \
        error.value.details()
    # The same pair with the card's truncation is scored.
    reply = stub.Rerank(pb.RerankRequest(query="q", documents=["short", "word " * 9000]),
                        timeout=30)
    assert reply.usage.truncated_inputs == 1 and len(reply.results) == 2
