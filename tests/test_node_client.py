"""The Node.js example client (examples/node/embed.js, @grpc/grpc-js with stubs loaded from
protos/ at run time) against a real server.

Its vectors are compared with the fake backend's documented formula (server/worker/backends.py
`fake_vector` of the token ids; Matryoshka cut, then L2 norm), computed here in numpy.
Skipped without node/npm or when npm cannot install the locked packages.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.server.worker.backends import fake_vector

from .helpers import QUERY_PROMPT, running_server
from .node_deps import NODE_CLIENT, node_modules

HIDDEN = 64


@pytest.fixture(scope="module")
def node_env() -> dict[str, str]:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    modules, why = node_modules()
    if modules is None:
        pytest.skip(why)
    # NODE_PATH finds packages installed outside examples/ (the tests' cache folder).
    return {**os.environ, "NODE_PATH": str(modules)}


def run_node(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(NODE_CLIENT / "embed.js"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


def expected(client: EmbedClient, texts: list[str], dims: int, prompt: str = "") -> np.ndarray:
    tokenized = client.tokenize(texts, prompt_name="query" if prompt else "")
    rows = np.stack([fake_vector(np.array(t.ids, dtype=np.int32), HIDDEN)
                     for t in tokenized.inputs])[:, :dims]
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_node_client_embeds(node_env: dict[str, str], fake_model_dir: Path) -> None:
    texts = ["What is the capital of China?", "北京是中国的首都。", ""]
    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (_, target), \
            EmbedClient(target, timeout=30) as client:
        result = run_node(node_env, "--target", target, "--prompt-name", "query",
                          "--dimensions", "32", *texts)
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
        assert out["model"] == fake_model_dir.name and out["dimensions"] == 32
        vectors = np.array(out["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(vectors, expected(client, texts, 32, QUERY_PROMPT),
                                   atol=1e-6)
        assert int(out["usage"]["prompt_tokens"]) == \
            client.tokenize(texts, prompt_name="query").usage.prompt_tokens

        # The server's INVALID_ARGUMENT message reaches the Node caller.
        bad = run_node(node_env, "--target", target, "--dimensions", "3", "x")
        assert bad.returncode == 1
        assert "INVALID_ARGUMENT" in bad.stderr and "32..64" in bad.stderr


def test_node_client_balances_a_static_list(node_env: dict[str, str],
                                            fake_model_dir: Path) -> None:
    """ipv4:A,B with round_robin (the example's service config) reaches a replica even
    when the other one is down."""
    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (_, target), \
            EmbedClient(target, timeout=30) as client:
        port = target.rsplit(":", 1)[1]
        result = run_node(node_env, "--target", f"ipv4:127.0.0.1:1,127.0.0.1:{port}", "hello")
        assert result.returncode == 0, result.stderr
        vectors = np.array(json.loads(result.stdout)["embeddings"], dtype=np.float32)
        np.testing.assert_allclose(vectors, expected(client, ["hello"], HIDDEN), atol=1e-6)
