"""The `embedrpc` command as a user runs it: serve, embed, info, tokenize, signals, env vars."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .helpers import EMBEDRPC, server_log, start_server


@pytest.fixture(scope="module")
def demo_process() -> Iterator[tuple[subprocess.Popen, str]]:
    proc, target = start_server("--model", "demo", "--workers", "2")
    yield proc, target
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EMBEDRPC, *args], capture_output=True, text=True, input=stdin,
                          timeout=60)


def test_health_serving_after_warmup(demo_process) -> None:
    _, target = demo_process
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_embed_prints_json_vectors(demo_process) -> None:
    _, target = demo_process
    result = run_cli("embed", "--target", target, "--prompt-name", "query",
                     "What is the capital of China?", "Explain gravity")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    vectors = np.array(out["embeddings"])
    assert vectors.shape == (2, 128) and out["dimensions"] == 128
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert out["usage"]["prompt_tokens"] > 0
    # Texts from stdin, Matryoshka size.
    result = run_cli("embed", "--target", target, "--dimensions", "64", stdin="one\ntwo\n")
    assert np.array(json.loads(result.stdout)["embeddings"]).shape == (2, 64)


def test_a_closed_pipe_ends_the_output_quietly(demo_process) -> None:
    # `embedrpc embed ... | head -c 100`: the reader leaves early; no BrokenPipeError
    # traceback on stderr.
    _, target = demo_process
    embed = subprocess.Popen([*EMBEDRPC, "embed", "--target", target, "x " * 50],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert embed.stdout is not None
    embed.stdout.close()  # before it writes: the whole reply meets a closed pipe
    _, err = embed.communicate(timeout=60)
    assert embed.returncode == 1 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_info_and_tokenize(demo_process) -> None:
    _, target = demo_process
    info = json.loads(run_cli("info", "--target", target).stdout)
    assert info["model"] == "demo" and info["dimensions"] == 128 and info["workers"] == 2
    assert "query" in info["prompt_names"] and info["pooling"] == "lasttoken"
    # The demo mirrors the published files: the tokenizer appends <|endoftext|> (2000 in
    # the demo's vocabulary), tokenizer_config.json names <|im_end|>.
    assert (info["pooled_token"], info["pooled_token_id"], info["pooled_token_source"]) == (
        "<|endoftext|>", 2000, "tokenizer")
    tok = json.loads(run_cli("tokenize", "--target", target, "hello world").stdout)
    assert tok["inputs"][0]["tokens"][-1] == "<|endoftext|>"


def test_client_errors_are_reported(demo_process) -> None:
    _, target = demo_process
    result = run_cli("embed", "--target", target, "--dimensions", "7", "x")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "32..128" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(signum: int) -> None:
    proc, _ = start_server("--model", "demo", "--grace-seconds", "2")
    proc.send_signal(signum)
    assert proc.wait(30) == 0
    log = server_log(proc)
    assert "shutting down" in log and "stopped" in log


def test_bad_model_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("serve", "--model", str(tmp_path), "--device", "cpu")
    assert result.returncode == 2
    assert "missing tokenizer.json, config.json" in result.stderr


def test_flags_read_the_environment() -> None:
    result = subprocess.run([*EMBEDRPC, "serve", "--help"], capture_output=True, text=True,
                            env={**os.environ, "EMBEDRPC_MAX_INPUTS": "5"}, timeout=30)
    assert "default: 5; env EMBEDRPC_MAX_INPUTS" in " ".join(result.stdout.split())
    result = subprocess.run([*EMBEDRPC, "serve", "--help"], capture_output=True, text=True,
                            env={**os.environ, "EMBEDRPC_WORKERS": "many"}, timeout=30)
    assert result.returncode == 2 and "EMBEDRPC_WORKERS='many'" in result.stderr
