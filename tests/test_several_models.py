"""Several models in one server: the bundled demo embedding model and demo reranker
(`--model demo --model demo-reranker`), each answering its own requests, over gRPC and
plain HTTP, through the client library, the command line and the load tester; Info,
/v1/models and the metrics name both; bad input gets INVALID_ARGUMENT saying what is
allowed; the --model list option and its bounds.

References: tests/data/demo_reference.json (sentence-transformers, for the embedding
model: cosine >= 0.9999, max abs 1e-4) and tests/data/demo_reranker_reference.json (the
model card's procedure with transformers, for the reranker: max |score difference|
1e-4, each query's ranking kept).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from embedrpc.cli import main as cli
from embedrpc.cli import parse_args
from embedrpc.cli.options import config_from_namespace
from embedrpc.client import AsyncEmbedClient, EmbedClient
from embedrpc.client.bench import BenchConfig
from embedrpc.client.bench import run as run_bench
from embedrpc.server import EmbedServer, ServeConfig
from embedrpc.server.config import MAX_MODELS
from embedrpc.server.errors import ModelError
from embedrpc.server.model import DEMO_RERANKER_DIR
from embedrpc.server.rerank import DEFAULT_INSTRUCTION
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import DATA, running_server, wait_until
from .rerank_checks import assert_scores_match, by_index, rerank_case

EMBED_REF = json.loads((DATA / "demo_reference.json").read_text(encoding="utf-8"))
RERANK_REF = json.loads((DATA / "demo_reranker_reference.json").read_text(encoding="utf-8"))
RERANK_CASES = {c["name"]: c for c in RERANK_REF["cases"]}
MAX_INPUTS = 64
MAX_BYTES = 1 << 20  # --max-message-bytes: also the bound on a rerank request's pair text
QUERY = "What is the capital of China?"
DOCUMENTS = ["The capital of China is Beijing.", "Gravity pulls things down.", ""]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[EmbedServer, str]]:
    with running_server(model=("demo", "demo-reranker"), workers=1, metrics_port=0,
                        http_port=0, max_inputs=MAX_INPUTS,
                        max_message_bytes=MAX_BYTES) as running:
        yield running


@pytest.fixture(scope="module")
def channel(served: tuple[EmbedServer, str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served[1]) as channel:
        yield channel


def invalid(call: Any, request: Any) -> str:
    """The details of the INVALID_ARGUMENT `call(request)` must give."""
    with pytest.raises(grpc.RpcError) as error:
        call(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return error.value.details()


def test_each_request_is_answered_by_its_model(channel) -> None:
    embedder, reranker = pb_grpc.EmbedderStub(channel), pb_grpc.RerankerStub(channel)
    case = next(c for c in EMBED_REF["cases"] if c["name"] == "documents")
    for model in ("", "demo"):  # the only embedding model, or named
        reply = embedder.Embed(pb.EmbedRequest(inputs=case["inputs"], model=model,
                                               encoding=pb.ENCODING_FLOAT32_BYTES),
                               timeout=30)
        assert reply.model == "demo"
        got = np.frombuffer(reply.data, "<f4").reshape(len(case["inputs"]), -1)
        want = np.array(case["embeddings"], dtype=np.float32)
        cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want,
                                                                                    axis=1)
        assert cosine.min() >= 0.9999 and np.abs(got - want).max() <= 1e-4
    got, want, groups = [], [], []
    for case in RERANK_REF["cases"]:
        if case["max_length"] != 8192:  # served at the card's length
            continue
        for model in ("", "demo-reranker"):
            g, w, responses = rerank_case(reranker, case, model=model)
            assert {r.model for r in responses} == {"demo-reranker"}
        got.append(g)
        want += list(w)
        groups += case["groups"]
    assert_scores_match(np.concatenate(got), want, groups)


def test_info_lists_every_model(channel) -> None:
    stub = pb_grpc.EmbedderStub(channel)
    first = stub.Info(pb.InfoRequest(), timeout=10)  # the first --model
    assert (first.model, first.task, first.dimensions) == ("demo", "embed", 128)
    listed = [(m.name, m.task, m.dimensions if m.HasField("dimensions") else None,
               m.max_length) for m in first.models]
    assert listed == [("demo", "embed", 128, 128), ("demo-reranker", "rerank", None, 8192)]
    reranker = stub.Info(pb.InfoRequest(model="demo-reranker"), timeout=10)
    assert (reranker.task, reranker.dimensions, reranker.max_length) == ("rerank", 0, 8192)
    assert reranker.default_instruction == RERANK_REF["default_instruction"]
    assert list(reranker.models) == list(first.models)
    # One spelling, the proto's: the demo embedder is a plain float32 export, the demo
    # reranker a graph `embedrpc prepare --precision fp32` made (it records "fp32").
    assert first.precision == reranker.precision == "float32"
    assert [m.precision for m in first.models] == ["float32", "float32"]
    assert "this server serves demo (embed), demo-reranker (rerank)" in \
        invalid(stub.Info, pb.InfoRequest(model="nope"))


def test_a_model_of_the_wrong_kind_or_unknown(channel) -> None:
    embedder, reranker = pb_grpc.EmbedderStub(channel), pb_grpc.RerankerStub(channel)
    assert "model 'demo-reranker' is a reranker, not an embedding model; embedding models " \
        "served here: demo" in invalid(embedder.Embed, pb.EmbedRequest(
            inputs=["x"], model="demo-reranker"))
    assert "is a reranker" in invalid(embedder.Tokenize, pb.TokenizeRequest(
        inputs=["x"], model="demo-reranker"))
    assert "model 'demo' is an embedding model, not a reranker; rerankers served here: " \
        "demo-reranker" in invalid(reranker.Rerank, pb.RerankRequest(
            query="q", documents=["d"], model="demo"))
    assert "model 'nope' is not served here; this server serves demo (embed), " \
        "demo-reranker (rerank)" in invalid(reranker.Rerank, pb.RerankRequest(
            query="q", documents=["d"], model="nope"))


def _batch(*requests: pb.RerankRequest) -> pb.RerankBatchRequest:
    return pb.RerankBatchRequest(requests=list(requests))


def _query(chars: int) -> str:
    return ("word " * (chars // 5 + 1))[:chars]


BAD = [
    ("no documents", pb.RerankRequest(query="q"), "documents is empty; send 1 to 64 documents"),
    ("too many documents", pb.RerankRequest(query="q", documents=["d"] * 65),
     "65 documents in one request; at most 64 are allowed (--max-inputs)"),
    ("negative top_n", pb.RerankRequest(query="q", documents=["d"], top_n=-1),
     "top_n=-1 is negative; use 0 for every document, or 1..1 for the best ones"),
    ("TRUNCATE_START", pb.RerankRequest(query="q", documents=["d"],
                                        truncate=pb.TRUNCATE_START),
     "truncate=TRUNCATE_START does not apply to reranking: the model card cuts a pair's "
     "text at its end (the document), keeping the instruction and query; use TRUNCATE_END "
     "or TRUNCATE_NONE"),
    ("unknown truncate", pb.RerankRequest(query="q", documents=["d"], truncate=7),
     "truncate=7 is unknown; use 0 (TRUNCATE_END) or 2 (TRUNCATE_NONE)"),
    # 16 documents with a query of 65,536 characters: 16 × 65,536 is the limit exactly,
    # and the instruction left empty means the card's (74 characters), which counts too.
    ("pairs over the size bound",
     pb.RerankRequest(query=_query(65536), documents=[""] * 16),
     f"the pairs to score hold {16 * (65536 + len(DEFAULT_INSTRUCTION)):,} characters (the "
     "query and instruction repeat with every document), over the server's limit of "
     "1,048,576 (--max-message-bytes)"),
    ("empty batch", _batch(), "requests is empty; send 1 to 64 requests"),
    ("a batch's bad request", _batch(pb.RerankRequest(query="q", documents=["d"]),
                                     pb.RerankRequest(query="q", top_n=-2)),
     "requests[1]: documents is empty"),
    ("a batch's TRUNCATE_START", _batch(pb.RerankRequest(query="q", documents=["d"],
                                                         truncate=pb.TRUNCATE_START)),
     "requests[0]: truncate=TRUNCATE_START does not apply to reranking"),
    ("too many documents in a batch", _batch(*[pb.RerankRequest(query="q", documents=["d"] * 33)
                                               for _ in range(2)]),
     "66 documents in all 2 requests; at most 64 are allowed in one call (--max-inputs)"),
    ("a batch of two models", _batch(pb.RerankRequest(query="q", documents=["d"]),
                                     pb.RerankRequest(query="q", documents=["d"],
                                                      model="demo-reranker")),
     "the requests of one RerankBatch name different models ('', 'demo-reranker')"),
]


@pytest.mark.parametrize(("case", "request_", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_rerank_requests_say_what_is_allowed(channel, case: str, request_: Any,
                                                 message: str) -> None:
    stub = pb_grpc.RerankerStub(channel)
    call = stub.RerankBatch if isinstance(request_, pb.RerankBatchRequest) else stub.Rerank
    assert message in invalid(call, request_), case


def test_limits_at_their_bounds_are_accepted(channel) -> None:
    stub = pb_grpc.RerankerStub(channel)
    assert len(stub.Rerank(pb.RerankRequest(query="q", documents=["d"] * MAX_INPUTS),
                           timeout=60).results) == MAX_INPUTS
    # Exactly --max-message-bytes characters of pairs: a query and the card's instruction
    # of half a MiB together, twice, and the documents (each pair cut to max_length).
    query = _query(MAX_BYTES // 2 - 1 - len(DEFAULT_INSTRUCTION))
    reply = stub.Rerank(pb.RerankRequest(query=query,
                                         documents=["d", "d"]), timeout=60)
    assert len(reply.results) == 2 and reply.usage.truncated_inputs == 2
    assert reply.usage.prompt_tokens == 2 * 8192
    reply = stub.RerankBatch(_batch(*[pb.RerankRequest(query="q", documents=["d"] * 32)
                                      for _ in range(2)]), timeout=60)
    assert [len(r.results) for r in reply.responses] == [32, 32]


# -- HTTP -------------------------------------------------------------------------------


def http_call(srv: EmbedServer, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                       **(headers or {})})
        reply = conn.getresponse()
        raw = reply.read()
        return reply.status, dict(reply.getheaders()), json.loads(raw) if raw else None
    finally:
        conn.close()


def test_http_rerank_in_the_shape_rag_frameworks_speak(served, channel) -> None:
    srv, _ = served
    case = RERANK_CASES["default_instruction"]
    got, want = [], []
    for group in case["groups"]:
        status, headers, out = http_call(srv, "POST", "/v1/rerank", {
            "model": "rerank-english-v3.0",  # a name it does not serve: its one reranker
            "query": group["query"], "documents": group["documents"]},
            headers={"x-request-id": "rr-1"})
        assert status == 200, out
        assert headers["x-request-id"] == "rr-1"
        assert set(out) == {"model", "results", "usage"} and out["model"] == "demo-reranker"
        assert out["usage"] == {"total_tokens": sum(map(len, group["token_ids"]))}
        assert all(set(r) == {"index", "relevance_score"} for r in out["results"])
        keys = [(-r["relevance_score"], r["index"]) for r in out["results"]]
        assert keys == sorted(keys)
        scores = np.full(len(group["documents"]), np.nan)
        for r in out["results"]:
            scores[r["index"]] = r["relevance_score"]
        got.append(scores)
        want += group["scores"]
    assert_scores_match(np.concatenate(got), want, case["groups"])
    # The same pairs over gRPC: the same scores.
    group = case["groups"][0]
    reply = pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(
        query=group["query"], documents=group["documents"]), timeout=30)
    np.testing.assert_allclose(got[0], by_index(reply, len(group["documents"])), atol=1e-6)
    # top_n, return_documents, documents as {"text": ...}, an instruction of its own.
    status, _, out = http_call(srv, "POST", "/v1/rerank", {
        "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS], "top_n": 2,
        "return_documents": True, "instruction": "Judge relevance"})
    assert status == 200, out
    assert len(out["results"]) == 2
    assert [r["document"] for r in out["results"]] == \
        [{"text": DOCUMENTS[r["index"]]} for r in out["results"]]
    status, _, plain = http_call(srv, "POST", "/v1/rerank", {
        "query": QUERY, "documents": DOCUMENTS, "instruction": "Judge relevance"})
    assert [r["index"] for r in plain["results"]][:2] == [r["index"] for r in out["results"]]


HTTP_BAD = [
    ({"documents": ["d"]}, 400, "'query' is required: a string", "query"),
    ({"query": "q", "documents": "d"}, 400, "'documents' is required: a list of strings",
     "documents"),
    ({"query": "q", "documents": ["d", 3]}, 400, "'documents[1]' must be a string",
     "documents"),
    ({"query": "q", "documents": []}, 400, "documents is empty; send 1 to 64 documents",
     "documents"),
    ({"query": "q", "documents": ["d"] * 65}, 400, "at most 64 are allowed", "documents"),
    ({"query": "q", "documents": ["d"], "top_n": -1}, 400, "top_n=-1 is negative", "top_n"),
    ({"query": "q", "documents": ["d"], "top_n": "2"}, 400, "'top_n' must be an integer",
     "top_n"),
    ({"query": "q", "documents": ["d"], "return_documents": "yes"}, 400,
     "'return_documents' must be true or false", "return_documents"),
    ({"query": "q", "documents": ["d"], "model": "demo"}, 400,
     "model 'demo' is an embedding model, not a reranker", "model"),
    ({"query": "\ud800", "documents": ["d"]}, 400, "query holds a lone surrogate", "query"),
]


@pytest.mark.parametrize(("body", "status", "words", "param"), HTTP_BAD)
def test_http_rerank_refuses_bad_bodies_with_our_message(served, body: Any, status: int,
                                                         words: str, param: str) -> None:
    got, _, out = http_call(served[0], "POST", "/v1/rerank", body)
    assert got == status, out
    assert words in out["error"]["message"] and out["error"]["param"] == param


def test_http_rerank_checks_as_embeddings_do(served) -> None:
    srv, _ = served
    status, _, out = http_call(srv, "POST", "/v1/rerank", {"query": "q", "documents": ["d"]},
                               headers={"Content-Type": "text/plain"})
    assert status == 415 and "Content-Type must be application/json" in \
        out["error"]["message"]
    status, _, out = http_call(srv, "POST", "/v1/rerank", b'{"query": "q", "documents": [')
    assert status == 400 and out["error"]["message"].startswith("the body is not valid JSON")
    status, _, out = http_call(srv, "POST", "/v1/rerank", b" " * (MAX_BYTES + 1))
    assert status == 413
    status, headers, _ = http_call(srv, "GET", "/v1/rerank")
    assert status == 405 and headers["Allow"] == "POST"
    status, _, models = http_call(srv, "GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["task"], m.get("dimensions"), m["max_length"]) for m in
            models["data"]] == [("demo", "embed", 128, 128),
                                ("demo-reranker", "rerank", None, 8192)]
    # An embeddings request still goes to the embedding model, whatever model it names.
    status, _, out = http_call(srv, "POST", "/v1/embeddings", {"input": "hi",
                                                               "model": "text-embedding-3"})
    assert status == 200 and out["model"] == "demo" and len(out["data"][0]["embedding"]) == 128


def test_http_rerank_wants_the_api_key() -> None:
    key = "rerank-key-" + "k" * 16
    with running_server(model=("demo", "demo-reranker"), backend="fake", workers=1,
                        http_port=0, api_keys=(key,)) as (srv, _):
        body = {"query": "q", "documents": ["a", "b"]}
        status, headers, out = http_call(srv, "POST", "/v1/rerank", body)
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer", out
        status, _, out = http_call(srv, "POST", "/v1/rerank", body,
                                   headers={"Authorization": f"Bearer {key}"})
        assert status == 200 and len(out["results"]) == 2


# -- metrics and health ---------------------------------------------------------------


def scrape(srv: EmbedServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics",
                                timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_carry_the_model(served, channel) -> None:
    srv, _ = served

    def value(samples: dict, name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    before = scrape(srv)
    pb_grpc.EmbedderStub(channel).Embed(pb.EmbedRequest(inputs=["a", "b"]), timeout=30)
    reply = pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(query=QUERY,
                                                                  documents=DOCUMENTS),
                                                 timeout=30)
    status, _, _ = http_call(srv, "POST", "/v1/rerank", {"query": QUERY, "documents": ["x"]})
    assert status == 200
    rerank = "/embedrpc.v1.Reranker/Rerank"

    def moved() -> bool:
        now = scrape(srv)
        return value(now, "embedrpc_requests_total", method=rerank, code="OK",
                     model="demo-reranker") > value(before, "embedrpc_requests_total",
                                                    method=rerank, code="OK",
                                                    model="demo-reranker")

    wait_until(moved, 10, lambda: "the Rerank call was not counted")
    after = scrape(srv)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("embedrpc_requests_total", method="/embedrpc.v1.Embedder/Embed", code="OK",
                 model="demo") == 1
    assert delta("embedrpc_requests_total", method="POST /v1/rerank", code="OK",
                 model="demo-reranker") == 1
    assert delta("embedrpc_embeddings_total", model="demo") == 2
    assert delta("embedrpc_rerank_pairs_total", model="demo-reranker") == len(DOCUMENTS) + 1
    assert delta("embedrpc_batch_texts_sum", model="demo") == 2
    assert delta("embedrpc_batch_texts_sum", model="demo-reranker") == len(DOCUMENTS) + 1
    assert delta("embedrpc_tokens_total", model="demo-reranker") >= reply.usage.prompt_tokens
    for model in ("demo", "demo-reranker"):
        assert value(after, "embedrpc_workers_alive", model=model) == 1
        assert value(after, "embedrpc_build_info", model=model, version="0.1.0") == 1
    assert {w.name for w in srv.workers} == {"demo:worker-cpu-0",
                                             "demo-reranker:worker-cpu-0"}


def test_health_of_each_service_follows_its_own_models() -> None:
    # Both demos on the fake backend, one worker each. While the reranker's worker is
    # dead, the Reranker service and the server as a whole ("") are NOT_SERVING; the
    # Embedder service stays SERVING (its model can answer): a crashing reranker does not
    # take the replica out of embedding rotation.
    with running_server(model=("demo", "demo-reranker"), backend="fake",
                        workers=1) as (srv, target), grpc.insecure_channel(target) as channel:
        assert [m.task for m in srv.models] == ["embed", "rerank"]
        health = health_pb2_grpc.HealthStub(channel)
        services = ("", "embedrpc.v1.Embedder", "embedrpc.v1.Reranker")
        serving = health_pb2.HealthCheckResponse.SERVING

        def status(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=5).status

        assert [status(s) for s in services] == [serving] * 3
        seen: dict[str, set[int]] = {s: set() for s in services}

        def down_and_back() -> bool:
            for service in services:
                seen[service].add(status(service))
            return (len(seen["embedrpc.v1.Reranker"]) == 2
                    and status("embedrpc.v1.Reranker") == serving)

        victim = srv.models[1].workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        wait_until(down_and_back, 60, lambda: f"health seen: {seen}")
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert seen["embedrpc.v1.Reranker"] == {serving, not_serving}
        assert not_serving in seen[""]
        assert seen["embedrpc.v1.Embedder"] == {serving}
        assert victim.restarts == 1
        wait_until(lambda: status("") == serving, 20)


# -- client, command line, load tester ------------------------------------------------


def test_client_rerank_sync_async_and_batch(served, channel) -> None:
    _, target = served
    want = pb_grpc.RerankerStub(channel).Rerank(pb.RerankRequest(
        query=QUERY, documents=DOCUMENTS, return_documents=True), timeout=30)
    with EmbedClient(target, timeout=30) as client:
        results = client.rerank(QUERY, DOCUMENTS, return_documents=True)
        batch = client.rerank_batch([(QUERY, DOCUMENTS), ("Explain gravity", DOCUMENTS[:2])],
                                    model="demo-reranker")
        with pytest.raises(ValueError, match="unknown truncate 'start' for reranking"):
            client.rerank(QUERY, DOCUMENTS, truncate="start")
        with pytest.raises(ValueError, match="a list of strings, not one string"):
            client.rerank(QUERY, "one string")
        assert client.info("demo-reranker").task == "rerank"
    assert [(r.index, r.document) for r in results] == \
        [(r.index, r.document) for r in want.results]
    np.testing.assert_allclose([r.score for r in results], [r.score for r in want.results],
                               atol=1e-6)
    assert [r.index for r in batch[0]] == [r.index for r in want.results]
    assert len(batch) == 2 and len(batch[1]) == 2 and batch[0][0].document is None

    async def both() -> tuple[Any, Any]:
        async with AsyncEmbedClient(target, timeout=30) as c:
            return await asyncio.gather(c.rerank(QUERY, DOCUMENTS, top_n=1),
                                        c.rerank_batch([(QUERY, DOCUMENTS)]))

    one, many = asyncio.run(both())
    assert [r.index for r in one] == [want.results[0].index]
    assert [r.index for r in many[0]] == [r.index for r in want.results]


def test_cli_rerank_prints_json(served, capsys: pytest.CaptureFixture[str]) -> None:
    _, target = served
    assert cli(["rerank", "--target", target, "--query", QUERY, "--top-n", "2",
                "--return-documents", "true", *DOCUMENTS[:2]]) == 0
    out = json.loads(capsys.readouterr().out)
    with EmbedClient(target, timeout=30) as client:
        want = client.rerank(QUERY, DOCUMENTS[:2], top_n=2, return_documents=True)
    assert out["model"] == "demo-reranker"
    assert [(r["index"], r["document"]) for r in out["results"]] == \
        [(r.index, r.document) for r in want]
    np.testing.assert_allclose([r["score"] for r in out["results"]],
                               [r.score for r in want], atol=1e-6)
    assert out["usage"]["prompt_tokens"] > 0
    assert cli(["rerank", "--target", target, "--query", QUERY, "--model", "demo", "x"]) == 1
    assert "INVALID_ARGUMENT: model 'demo' is an embedding model" in capsys.readouterr().err
    assert cli(["rerank", "--target", target, "x"]) == 2
    assert "--query is required" in capsys.readouterr().err
    assert cli(["info", "--target", target, "--model", "demo-reranker"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task"] == "rerank" and [m["name"] for m in info["models"]] == \
        ["demo", "demo-reranker"]
    # A reranker has no vectors: null, at the top as in its models[] entry.
    assert info["dimensions"] is info["min_dimensions"] is info["models"][1]["dimensions"] \
        is None


def test_bench_rerank_reports_pairs(served) -> None:
    _, target = served
    # No warm-up: a first call slower than warm-up and window (CI) would leave none measured
    result = run_bench(BenchConfig(target=target, rerank=True, documents=4, concurrency=2,
                                   duration=1.0, warmup=0.0, texts=32, progress=False,
                                   lengths="fixed:8", query_lengths="fixed:4"))
    report = result.report
    assert report["errors"] == {} and report["requests"] > 0
    assert report["pairs"] == 4 * report["requests"]
    assert report["pairs_per_s"] > 0 and report["tokens_per_s"] > 0
    assert report["config"]["call"] == "Rerank" and report["server"]["model"] == "demo-reranker"
    assert report["latency_ms"]["p50"] is not None
    with pytest.raises(ValueError, match="--stream is for EmbedStream"):
        BenchConfig(target=target, rerank=True, stream=True)


# -- the --model list option ----------------------------------------------------------


def test_model_is_a_list_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def models(argv: list[str]) -> tuple[str, ...]:
        return config_from_namespace(ServeConfig, parse_args(argv)).model.model

    assert models(["serve"]) == ("demo",)
    assert models(["serve", "--model", "demo"]) == ("demo",)
    assert models(["serve", "--model", "demo", "--model", "a,b"]) == ("demo", "a", "b")
    monkeypatch.setenv("EMBEDRPC_MODEL", "demo,demo-reranker")
    assert models(["serve"]) == ("demo", "demo-reranker")
    assert models(["serve", "--model", "x"]) == ("x",)  # the command line replaces it
    monkeypatch.delenv("EMBEDRPC_MODEL")
    config = tmp_path / "serve.toml"
    config.write_text('model = ["demo", "demo-reranker"]\n')
    assert models(["serve", "--config", str(config)]) == ("demo", "demo-reranker")
    config.write_text('model = "demo,demo-reranker"\n')
    assert models(["serve", "--config", str(config)]) == ("demo", "demo-reranker")
    # Bounded, and each model once.
    names = tuple(f"m{i}" for i in range(MAX_MODELS))
    assert ServeConfig.of(model=names).model.model == names
    with pytest.raises(ValueError, match=f"--model given {MAX_MODELS + 1} times; one "
                                         f"server serves at most {MAX_MODELS} models"):
        ServeConfig.of(model=(*names, "one-more"))
    with pytest.raises(ValueError, match="--model demo given more than once"):
        ServeConfig.of(model=("demo", "demo-reranker", "demo"))
    with pytest.raises(ValueError, match="an empty name is not one"):
        ServeConfig.of(model="demo,")


def test_models_the_server_cannot_tell_apart_or_serve_as_told(tmp_path: Path) -> None:
    for parent in ("a", "b"):
        (tmp_path / parent).mkdir()
        (tmp_path / parent / "same").symlink_to(DEMO_RERANKER_DIR, target_is_directory=True)
    with pytest.raises(ModelError, match="two --model are named 'same'"):
        EmbedServer(ServeConfig.of(model=(str(tmp_path / "a" / "same"),
                                          str(tmp_path / "b" / "same")), device="cpu"))
    with pytest.raises(ModelError, match=r"was prepared as a reranker model .* prepare the "
                                         r"checkpoint again with --task embed"):
        EmbedServer(ServeConfig.of(model="demo-reranker", task="embed", device="cpu"))
