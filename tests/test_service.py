"""The gRPC service end to end (real server, real worker processes, fake backend).

The fake backend's vector for a text is `fake_vector(token ids)`, so expected
vectors are computed here from the raw Qwen3 tokenizer plus the EOS id the
server must append, and numpy's definitions of truncation, L2 norm, float16
and bit packing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tokenizers import Tokenizer

from embedrpc.client import AsyncEmbedClient, EmbedClient, make_request
from embedrpc.server.worker.backends import fake_vector
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import (
    QUERY_PROMPT,
    QWEN_EOS_ID,
    qwen_tokenizer_file,
    running_server,
    wait_until,
)

HIDDEN, MAX_LENGTH = 64, 64
TEXTS = ["What is the capital of China?", "", "   ", "Gravity pulls masses together.",
         "北京是中国的首都。", "Привет, мир!", "emoji 🚀🔥 and tabs\tnew\nlines"]


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    return Tokenizer.from_file(str(qwen_tokenizer_file()))


def expected_ids(raw: Tokenizer, text: str, side: str = "end") -> list[int]:
    body = raw.encode(text).ids
    keep = MAX_LENGTH - 1  # room for the EOS the server appends
    body = body[:keep] if side == "end" else body[-keep:] if len(body) > keep else body
    return [*body, QWEN_EOS_ID]


def expected(raw: Tokenizer, texts: list[str], *, prompt: str = "", dims: int = HIDDEN,
             normalize: bool = True) -> np.ndarray:
    rows = np.stack([fake_vector(np.array(expected_ids(raw, prompt + t)), HIDDEN)
                     for t in texts])[:, :dims]
    if normalize:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


@pytest.fixture(scope="module")
def client(fake_server) -> EmbedClient:
    _, target = fake_server
    with EmbedClient(target, timeout=30) as c:
        yield c


def test_embed_matches_reference_in_input_order(client: EmbedClient, raw: Tokenizer) -> None:
    got = client.embed(TEXTS)
    assert got.shape == (len(TEXTS), HIDDEN) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected(raw, TEXTS), rtol=0, atol=1e-6)


def test_large_request_spans_batches_and_workers(fake_server, client, raw) -> None:
    server, _ = fake_server
    texts = [f"document number {i} " + "word " * (i % 23) for i in range(100)]
    before = server.router.batches
    got = client.embed(texts)
    assert server.router.batches - before >= 100 // 8  # max_batch_size 8
    np.testing.assert_allclose(got, expected(raw, texts), rtol=0, atol=1e-6)


def test_prompts_instruction_dimensions_normalize(client, raw) -> None:
    q = ["What is the capital of China?", "Explain gravity"]
    np.testing.assert_allclose(client.embed(q, prompt_name="query"),
                               expected(raw, q, prompt=QUERY_PROMPT), atol=1e-6)
    task = "Given a question, retrieve passages"
    np.testing.assert_allclose(client.embed(q, instruction=task),
                               expected(raw, q, prompt=f"Instruct: {task}\nQuery:"), atol=1e-6)
    np.testing.assert_allclose(client.embed(q, dimensions=32),
                               expected(raw, q, dims=32), atol=1e-6)
    np.testing.assert_allclose(client.embed(q, dimensions=40, normalize=False),
                               expected(raw, q, dims=40, normalize=False), atol=1e-5)


def test_encodings(client, raw) -> None:
    ref = expected(raw, TEXTS, dims=36)
    floats = client.embed(TEXTS, dimensions=36, encoding="float")
    np.testing.assert_allclose(floats, ref, atol=1e-6)
    f16 = client.embed(TEXTS, dimensions=36, encoding="float16")
    assert f16.dtype == np.float16
    np.testing.assert_array_equal(f16, ref.astype(np.float16))
    bits = client.embed(TEXTS, dimensions=36, encoding="ubinary")
    assert bits.shape == (len(TEXTS), 5)  # ceil(36 / 8) bytes per row
    np.testing.assert_array_equal(np.unpackbits(bits, axis=1)[:, :36], (ref > 0).astype(np.uint8))
    response = client.embed_response(TEXTS, encoding="float32")
    assert len(response.data) == len(TEXTS) * HIDDEN * 4 and response.count == len(TEXTS)


def test_usage_counts_tokens_and_truncation(client, raw) -> None:
    long_text = "many words " * 200
    response = client.embed_response(["short", long_text])
    assert response.usage.prompt_tokens == len(expected_ids(raw, "short")) + MAX_LENGTH
    assert response.usage.truncated_inputs == 1


def test_truncate_start_keeps_the_end(client, raw) -> None:
    text = " ".join(f"w{i}" for i in range(300))
    got = client.tokenize([text], truncate="start").inputs[0]
    assert list(got.ids) == expected_ids(raw, text, side="start") and got.truncated
    np.testing.assert_allclose(
        client.embed([text], truncate="start"),
        np.stack([fake_vector(np.array(expected_ids(raw, text, "start")), HIDDEN)])
        / np.linalg.norm(fake_vector(np.array(expected_ids(raw, text, "start")), HIDDEN)),
        atol=1e-6)


def test_tokenize(client, raw) -> None:
    response = client.tokenize(TEXTS, prompt_name="query", return_tokens=True)
    for text, item in zip(TEXTS, response.inputs, strict=True):
        assert list(item.ids) == expected_ids(raw, QUERY_PROMPT + text)
        assert item.tokens[-1] == "<|endoftext|>" and not item.truncated
    assert response.usage.prompt_tokens == sum(len(i.ids) for i in response.inputs)


def test_info(client) -> None:
    info = client.info()
    assert (info.dimensions, info.min_dimensions, info.max_length) == (HIDDEN, 32, MAX_LENGTH)
    assert list(info.prompt_names) == ["document", "query"] and info.pooling == "lasttoken"
    assert list(info.devices) == ["cpu"] and info.workers == 2 and info.max_inputs == 100
    assert info.max_batch_tokens == 256 and info.version


INVALID = [
    ("empty inputs", dict(inputs=[]), "inputs is empty"),
    ("too many inputs", dict(inputs=["x"] * 101), "at most 100"),
    ("dimensions 1", dict(inputs=["x"], dimensions=1), "32..64"),
    ("dimensions 31", dict(inputs=["x"], dimensions=31), "32..64"),
    ("dimensions full+1", dict(inputs=["x"], dimensions=65), "32..64"),
    ("dimensions huge", dict(inputs=["x"], dimensions=2**32 - 1), "32..64"),
    ("unknown prompt", dict(inputs=["x"], prompt_name="passage"), "'document', 'query'"),
    ("prompt and instruction", dict(inputs=["x"], prompt_name="query", instruction="t"),
     "not both"),
    ("unknown encoding", dict(inputs=["x"], encoding=9), "ENCODING_FLOAT"),
    ("unknown truncate", dict(inputs=["x"], truncate=7), "TRUNCATE_END"),
    ("too long with TRUNCATE_NONE", dict(inputs=["ok", "word " * 100], truncate=2),
     "inputs[1] is longer than max_length 64"),
]


@pytest.mark.parametrize(("case", "fields", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_requests(fake_server, case, fields, message) -> None:
    _, target = fake_server
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(**fields), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert message in info.value.details(), info.value.details()
        # The server stays healthy.
        assert len(stub.Embed(pb.EmbedRequest(inputs=["still fine"]), timeout=10)
                   .embeddings) == 1


def test_stream_answers_in_order_and_survives_a_bad_request(client, raw) -> None:
    batches = [[f"stream text {i}", f"another {i} " * (i % 5)] for i in range(30)]
    requests = [pb.EmbedRequest(inputs=b, request_id=f"r{i}",
                                encoding=pb.ENCODING_FLOAT32_BYTES) for i, b in enumerate(batches)]
    requests[7] = pb.EmbedRequest(inputs=["x"], dimensions=3, request_id="bad")
    results = list(client.stream(requests))
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    bad = results[7]
    assert bad.embeddings is None
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "dimensions=3" in bad.error.message
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        bad.unwrap()
    for i, result in enumerate(results):
        if i != 7:
            np.testing.assert_allclose(result.unwrap(), expected(raw, batches[i]), atol=1e-6)


def test_stream_takes_texts_lists_or_requests_and_refuses_a_dict(client, raw) -> None:
    results = list(client.stream(["one text", ["two", "texts"],
                                  make_request(["three"], request_id="mine")]))
    assert [r.request_id for r in results] == ["0", "1", "mine"]
    assert [r.unwrap().shape[0] for r in results] == [1, 2, 1]
    # A dict would iterate as its keys (embedding "inputs" and "request_id"): refused.
    with pytest.raises(TypeError, match="inputs must be a text or a list of texts, not a "
                                        "dict"):
        list(client.stream([{"inputs": ["a"], "request_id": "r1"}]))
    with pytest.raises(TypeError, match="not a set"):
        client.embed({"a", "b"})


def test_async_stream_refuses_a_dict_with_the_reason(fake_server) -> None:
    _, target = fake_server

    async def main() -> None:
        async with AsyncEmbedClient(target, timeout=30) as c:
            got = [r async for r in c.stream([["a"], "b"])]
            assert [r.request_id for r in got] == ["0", "1"]
            with pytest.raises(TypeError, match="not a dict"):
                _ = [r async for r in c.stream([["a"], {"inputs": ["a"]}])]

    asyncio.run(main())


def test_async_client(fake_server, raw) -> None:
    _, target = fake_server

    async def main() -> tuple[np.ndarray, list[np.ndarray], pb.InfoResponse]:
        async with AsyncEmbedClient(target, timeout=30) as c:
            many = await asyncio.gather(*(c.embed([t]) for t in TEXTS))
            streamed = [r.unwrap() async for r in c.stream([[t] for t in TEXTS])]
            return np.concatenate(many), streamed, await c.info()

    many, streamed, info = asyncio.run(main())
    np.testing.assert_allclose(many, expected(raw, TEXTS), atol=1e-6)
    np.testing.assert_allclose(np.concatenate(streamed), expected(raw, TEXTS), atol=1e-6)
    assert info.dimensions == HIDDEN


def test_health_and_reflection(fake_server) -> None:
    _, target = fake_server
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "embedrpc.v1.Embedder"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in reply.list_services_response.service}
        assert {"embedrpc.v1.Embedder", "grpc.health.v1.Health"} <= names


def test_deadline_exceeded_and_server_recovers(fake_model_dir) -> None:
    with (running_server(model=str(fake_model_dir), backend="fake", fake_delay_ms=300) as (_, t),
          EmbedClient(t) as c, EmbedClient(t, timeout=0.1) as slow):
        with pytest.raises(grpc.RpcError) as info:
            slow.embed(["a"] * 3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert c.embed(["after the deadline"]).shape == (1, HIDDEN)


def test_queue_full_is_resource_exhausted_at_once(fake_model_dir) -> None:
    # One worker busy 600 ms per batch with a queue of at most 12 tokens (one client, so
    # its cap is the whole queue: the queue's own limit is what refuses).
    with running_server(model=str(fake_model_dir), backend="fake", fake_delay_ms=600,
                        max_queue_tokens=12, max_client_queue_tokens=12,
                        max_batch_size=1) as (server, target), \
            EmbedClient(target, timeout=30) as c:
        # Four texts of 3 tokens, one per batch: two go to the worker's slots, two (6
        # tokens) wait in the queue.
        busy = [c.stub.Embed.future(make_request(["busy text"] * 4))]
        wait_until(lambda: server.router.batches == 2 and server.router.queued_entries == 2,
                   timeout=10)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            c.embed(["one more text"] * 2)  # 8 tokens: 6 + 8 > 12
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details()
        assert time.monotonic() - started < 1.0  # refused, not queued behind 2.4 s of work
        for future in busy:
            assert len(future.result().data) == 4 * HIDDEN * 4


def test_cancelled_call_never_reaches_a_worker(fake_model_dir) -> None:
    with running_server(model=str(fake_model_dir), backend="fake", fake_delay_ms=500,
                        workers=1) as (server, target), EmbedClient(target, timeout=30) as c:
        router = server.router
        # Two single-text calls fill the worker's two slots (one running, one prefetched).
        # Each is sent only once the previous one has become a batch, so they never share one.
        busy = []
        for i in range(2):
            busy.append(c.stub.Embed.future(make_request([f"busy {i}"])))
            wait_until(lambda n=i + 1: router.batches == n, timeout=10)
        cancelled = c.stub.Embed.future(make_request(["never embedded", "nor this"]))
        wait_until(lambda: router.queued_entries == 2, timeout=10)  # waiting behind the busy two
        assert cancelled.cancel()
        wait_until(lambda: router.queued_entries == 0, timeout=10)  # dropped on cancellation
        for future in busy:
            future.result()
        assert c.embed(["after"]).shape == (1, HIDDEN)
        # Three batches ran: the two busy calls and "after"; nothing of the cancelled call.
        assert router.batches == 3


def test_health_follows_worker_liveness(fake_model_dir, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="embedrpc")
    with running_server(model=str(fake_model_dir), backend="fake") as (server, target), \
            grpc.insecure_channel(target) as channel, EmbedClient(target, timeout=30) as c:
        health = health_pb2_grpc.HealthStub(channel)

        def status() -> int:
            return health.Check(health_pb2.HealthCheckRequest(), timeout=5).status

        assert status() == health_pb2.HealthCheckResponse.SERVING
        os.kill(server.workers[0].pid, signal.SIGKILL)
        seen: set[int] = set()
        last = [status()]

        def back_after_not_serving() -> bool:
            seen.add(last[0])
            last[0] = status()
            return (health_pb2.HealthCheckResponse.NOT_SERVING in seen
                    and last[0] == health_pb2.HealthCheckResponse.SERVING)

        wait_until(back_after_not_serving, 30, lambda: f"health went {sorted(seen)}")
        now = last[0]
        # The only worker died: NOT_SERVING until it is back, then SERVING again.
        assert health_pb2.HealthCheckResponse.NOT_SERVING in seen
        assert now == health_pb2.HealthCheckResponse.SERVING
        assert server.workers[0].restarts == 1
        assert c.embed(["after the restart"]).shape == (1, HIDDEN)
        # The log says the new process is up, with its pid (for an operator's kill -9).
        assert f"worker-cpu-0 ready again (pid {server.workers[0].pid}, restart 1)" \
            in caplog.text


def test_fake_vector_is_its_documented_formula() -> None:
    """The fake backend's vector, which the tests here expect: the CRC-32 of the ids
    (int32, little-endian) picks four rows of a table of standard normal draws
    (default_rng(20240605), [256, hidden], float32) by its bytes, lowest first, weighted
    1, 1/2, 1/4, 1/8; a batch gives each row the vector it has alone."""
    import zlib

    from embedrpc.server.worker.backends import fake_vectors

    table = np.random.default_rng(20240605).standard_normal((256, HIDDEN)).astype(np.float32)
    rows = [np.array(r, dtype=np.int32) for r in ([1, 2, 3], [151643], list(range(500)))]
    for ids in rows:
        crc = zlib.crc32(ids.astype("<i4").tobytes())
        want = sum(table[(crc >> (8 * k)) & 0xFF].astype(np.float64) / 2**k for k in range(4))
        np.testing.assert_allclose(fake_vector(ids, HIDDEN), want, rtol=1e-6, atol=1e-6)
    batch = fake_vectors(np.concatenate(rows), np.array([len(r) for r in rows], np.int32),
                         HIDDEN)
    np.testing.assert_array_equal(batch, np.stack([fake_vector(r, HIDDEN) for r in rows]))
    assert not np.allclose(fake_vector(rows[0], HIDDEN), fake_vector(rows[0][::-1], HIDDEN))
