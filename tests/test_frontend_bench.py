"""benchmarks/frontend_bench.py end to end in its quickest mode: the JSON it writes has the
shape its readers expect and finite, positive figures. Its speed is not tested (a
benchmark, not a test)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from tokenizers import Tokenizer

from embedrpc.server.worker.backends import fake_vector
from embedrpc.v1 import embedder_pb2 as pb
from embedrpc.v1 import embedder_pb2_grpc as pb_grpc

from .helpers import QWEN_EOS_ID, qwen_tokenizer_file

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "frontend_bench.py"
BARE = ROOT / "benchmarks" / "bare_server.py"
FIGURES = ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "server_cpu_cores",
           "cpu_us_per_request", "cpu_us_per_text", "client_cpu_cores")


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_run_writes_a_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "frontend_bench.json"
    # One front-end setting keeps it short whether or not serve has --frontends yet.
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--duration", "0.5", "--warmup", "0.25",
         "--frontends", "1", "--gpu", "off", "--json", str(out),
         "--work", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())

    assert report["benchmark"] == "frontend_bench"
    assert isinstance(report["frontends_available"], bool)
    assert report["machine"]["cores"] >= 1 and report["code"]["package"]
    assert report["workload"]["texts"] == 256 and positive(report["workload"]["mean_tokens"])
    tok = report["tokenizer"]
    assert positive(tok["batch32_us_per_text"]) and positive(tok["single_us_per_text"])

    rows = {(row["load"], row["setup"]): row for row in report["rows"]}
    assert set(rows) == {(load, setup) for load in ("single", "batch32")
                         for setup in ("floor", "bare", "embedrpc")}
    for (load, setup), row in rows.items():
        assert row["available"], row
        batch = 1 if load == "single" else 32
        assert row["batch"] == batch and row["clients"] == (32 if batch == 1 else 4)
        for name in FIGURES:
            assert positive(row[name]), (load, setup, name, row.get(name))
        assert row["p99_ms"] >= row["p50_ms"]
        assert math.isclose(row["texts_per_s"], batch * row["requests_per_s"], rel_tol=1e-9)
        assert math.isclose(row["cpu_us_per_request"], batch * row["cpu_us_per_text"],
                            rel_tol=1e-9)
        assert len(row["rounds"]) == 1
        if setup == "embedrpc":
            assert row["rows_per_batch"] >= 1  # from its Prometheus histogram
    floor = rows[("batch32", "floor")]
    assert math.isclose(floor["floor_us_per_text"],
                        floor["cpu_us_per_text"] + tok["batch32_us_per_text"])
    for load in ("single", "batch32"):
        for key in ("embedrpc/vs_floor", "bare/vs_floor", "embedrpc/vs_bare"):
            assert positive(report["ratios"][f"{load}/{key}"]), key
    # embedrpc / bare is the quotient of their figures (per request for single texts,
    # per text for 32-text requests), round by round.
    for load, figure in (("single", "cpu_us_per_request"), ("batch32", "cpu_us_per_text")):
        mine, bare = rows[(load, "embedrpc")], rows[(load, "bare")]
        assert math.isclose(report["ratios"][f"{load}/embedrpc/vs_bare"],
                            mine["rounds"][0][figure] / bare["rounds"][0][figure])
    assert "bare design" in report["table"]

    assert report["gpu"] == {"ran": False, "skipped": "--gpu off"}
    assert len(report["targets"]) == 5
    assert "| single-text Embed, 32 clients | floor" in report["table"]
    assert report["table"] in proc.stdout


def test_the_bare_server_embeds_as_the_fake_backend_does(fake_model_dir: Path) -> None:
    """The bare design does the per-text work embedrpc does with --backend fake: the same
    tokens (end token appended, truncated at the model's max length) and the fake
    backend's documented formula, L2-normalised; checked against that formula on ids
    from the tokenizer itself (1e-6: float32 normalisation), not against embedrpc."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(BARE), "--port", str(port),
                             "--model-dir", str(fake_model_dir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    raw = Tokenizer.from_file(str(qwen_tokenizer_file()))  # adds no end token
    texts = ["hello world", "Ünïcode, 中文 and more", "word " * 200]  # the last: cut at 64
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.EmbedderStub(channel)
            deadline = time.monotonic() + 60
            while True:
                try:
                    stub.Info(pb.InfoRequest(), timeout=2)
                    break
                except grpc.RpcError:
                    assert proc.poll() is None, proc.communicate()[1][-2000:]
                    assert time.monotonic() < deadline, "the bare server did not start"
                    time.sleep(0.2)
            reply = stub.Embed(pb.EmbedRequest(inputs=texts, request_id="r1"), timeout=30)
            batch = [stub.Embed.future(pb.EmbedRequest(inputs=[t]), timeout=30) for t in texts]
            singles = [f.result() for f in batch]  # several at once: batched together
    finally:
        proc.terminate()
        proc.wait(30)
    ids = [[*raw.encode(t).ids[:63], QWEN_EOS_ID] for t in texts]
    want = np.stack([fake_vector(np.array(i, dtype=np.int32), 64) for i in ids])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert reply.count == 3 and reply.dimensions == 64 and reply.request_id == "r1"
    assert reply.usage.prompt_tokens == sum(map(len, ids)) and len(ids[2]) == 64
    got = np.frombuffer(reply.data, "<f4").reshape(3, 64)
    np.testing.assert_allclose(got, want, atol=1e-6)
    for one, row in zip(singles, want, strict=True):
        np.testing.assert_allclose(np.frombuffer(one.data, "<f4"), row, atol=1e-6)
