"""The Go example (examples/go/main.go, grpc-go) built with stubs that protoc-gen-go and
protoc-gen-go-grpc generate from protos/, and run against a real server.

Its vectors are compared with the fake backend's documented formula (server/worker/backends.py
`fake_vector`; Matryoshka cut to 32, then L2 norm). The Go module proxy cannot be
reached here, so the build uses Debian's Go packages in GOPATH mode
(scripts/install_client_toolchains.sh, which .ci/run runs). Skipped when a tool or the
grpc-go sources are missing.
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

from .helpers import running_server

ROOT = Path(__file__).resolve().parent.parent
GOCODE = Path("/usr/share/gocode")
HIDDEN = 64


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tools = {n: shutil.which(n) for n in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")}
    missing = [name for name, path in tools.items() if path is None]
    if not (GOCODE / "src" / "google.golang.org" / "grpc").is_dir():
        missing.append(f"{GOCODE}/src/google.golang.org/grpc")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (see this file's docstring)")
    gopath = tmp_path_factory.mktemp("gopath")
    package = gopath / "src" / "example" / "embed"
    package.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "go" / "main.go", package / "main.go")
    subprocess.run([tools["protoc"], f"-I{ROOT / 'protos'}", f"--go_out={gopath / 'src'}",
                    f"--go-grpc_out={gopath / 'src'}",
                    str(ROOT / "protos" / "embedrpc" / "v1" / "embedder.proto")],
                   check=True, capture_output=True, timeout=60)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    env = {**os.environ, "GOPATH": f"{gopath}{os.pathsep}{GOCODE}", "GO111MODULE": "off",
           "GOCACHE": str(cache / "embedrpc-tests" / "go-build"), "GOFLAGS": ""}
    out = gopath / "embed"
    result = subprocess.run([tools["go"], "build", "-o", str(out), "."], cwd=package, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_go_client_embeds(binary: Path, fake_model_dir: Path) -> None:
    texts = ["What is the capital of China?", "北京是中国的首都。"]
    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (_, target), \
            EmbedClient(target, timeout=30) as client:
        result = subprocess.run([str(binary), "-target", target, "-prompt-name", "query",
                                 "-dimensions", "32", *texts],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        tokenized = client.tokenize(texts, prompt_name="query")
        bad = subprocess.run([str(binary), "-target", target, "-dimensions", "3", "x"],
                             capture_output=True, text=True, timeout=60)
    out = json.loads(result.stdout)
    assert out["dimensions"] == 32
    assert out["usage"]["prompt_tokens"] == tokenized.usage.prompt_tokens
    rows = np.stack([fake_vector(np.array(t.ids, dtype=np.int32), HIDDEN)
                     for t in tokenized.inputs])[:, :32]
    np.testing.assert_allclose(np.array(out["embeddings"]),
                               rows / np.linalg.norm(rows, axis=1, keepdims=True), atol=1e-6)
    assert bad.returncode == 1 and "InvalidArgument" in bad.stderr and "32..64" in bad.stderr
