"""The Java example (examples/java/EmbedExample.java, grpc-java) compiled with stubs that
protoc and the grpc-java plugin generate from protos/, and run against a real server.

Its vectors are compared with the fake backend's documented formula (server/worker/backends.py
`fake_vector`; Matryoshka cut to 32, then L2 norm). Maven Central cannot be reached
here, so the jars come from Debian's packages (scripts/install_client_toolchains.sh,
which .ci/run runs). Skipped when java, javac, protoc, the plugin or a jar is missing.
"""

from __future__ import annotations

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
JARS = Path("/usr/share/java")
RUNTIME_JARS = [
    "grpc-api", "grpc-context", "grpc-core", "grpc-netty", "grpc-protobuf",
    "grpc-protobuf-lite", "grpc-stub", "protobuf", "guava", "gson", "perfmark-api",
    "netty-buffer", "netty-codec", "netty-codec-http", "netty-codec-http2", "netty-codec-socks",
    "netty-common", "netty-handler", "netty-handler-proxy", "netty-resolver", "netty-transport",
    "netty-transport-native-unix-common",
]
COMPILE_ONLY_JARS = ["geronimo-annotation-1.3-spec"]  # javax.annotation.Generated
HIDDEN = 64


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The runtime classpath, with the generated stubs and the example compiled."""
    tools = {name: shutil.which(name) for name in ("java", "javac", "protoc", "grpc_java_plugin")}
    missing = [name for name, path in tools.items() if path is None]
    missing += [f"{jar}.jar" for jar in RUNTIME_JARS + COMPILE_ONLY_JARS
                if not (JARS / f"{jar}.jar").exists()]
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (see this file's docstring)")
    work = tmp_path_factory.mktemp("java")
    gen, classes = work / "gen", work / "classes"
    gen.mkdir()
    subprocess.run([tools["protoc"], f"-I{ROOT / 'protos'}", f"--java_out={gen}",
                    f"--plugin=protoc-gen-grpc-java={tools['grpc_java_plugin']}",
                    f"--grpc-java_out={gen}", str(ROOT / "protos/embedrpc/v1/embedder.proto")],
                   check=True, capture_output=True, timeout=60)
    runtime = [str(JARS / f"{jar}.jar") for jar in RUNTIME_JARS]
    compile_cp = os.pathsep.join(runtime + [str(JARS / f"{j}.jar") for j in COMPILE_ONLY_JARS])
    sources = [str(p) for p in gen.rglob("*.java")]
    result = subprocess.run([tools["javac"], "-d", str(classes), "-cp", compile_cp, *sources,
                             str(ROOT / "examples" / "java" / "EmbedExample.java")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return os.pathsep.join([str(classes), *runtime])


def test_java_client_embeds(compiled: str, fake_model_dir: Path) -> None:
    texts = ["What is the capital of China?", "Gravity pulls masses together."]
    with running_server(model=str(fake_model_dir), backend="fake", workers=1) as (_, target), \
            EmbedClient(target, timeout=30) as client:
        result = subprocess.run(["java", "-cp", compiled, "EmbedExample", target, *texts],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        tokenized = client.tokenize(texts, prompt_name="query")
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "dimensions 32"
    vectors = np.array([[float(x) for x in line.split(" norm ")[0].split()]
                        for line in lines[1:]])
    rows = np.stack([fake_vector(np.array(t.ids, dtype=np.int32), HIDDEN)
                     for t in tokenized.inputs])[:, :32]
    np.testing.assert_allclose(vectors, rows / np.linalg.norm(rows, axis=1, keepdims=True),
                               atol=1e-6)
