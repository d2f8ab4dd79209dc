"""The proto passes `buf lint` (buf.yaml) and `buf breaking` against the last release's
descriptor set (protos/baseline/), and the breaking check really catches what the
compatibility rules forbid. Skipped when no buf binary can be had (examples/node's
@bufbuild/buf dev dependency, or buf on PATH)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from .node_deps import ROOT, buf_binary

BASELINE = ROOT / "protos" / "baseline" / "embedrpc-v0.1.0.binpb"
PROTO = Path("protos") / "embedrpc" / "v1" / "embedder.proto"


@pytest.fixture(scope="module")
def buf() -> Path:
    binary, why = buf_binary()
    if binary is None:
        pytest.skip(why)
    return binary


def run_buf(buf: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_buf_lint(buf: Path) -> None:
    result = run_buf(buf, ROOT, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_last_release(buf: Path) -> None:
    result = run_buf(buf, ROOT, "breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "embedrpc", tmp_path / "protos" / "embedrpc")
    return tmp_path


def edit(workspace: Path, old: str, new: str) -> None:
    path = workspace / PROTO
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("uint32 max_batch_tokens = 9;", "uint32 max_batch_tokens = 99;",
     'field "9" with name "max_batch_tokens"'),  # renumbered
    ("  string request_id = 8;\n", "",
     'field "8" with name "request_id" on message "EmbedRequest" was deleted'),  # removed
    ("uint32 dimensions = 4;", "int32 dimensions = 4;",
     'changed type from "uint32" to "int32"'),  # retyped
    ("rpc Tokenize(", "rpc Tokenise(",
     'RPC "Tokenize" on service "Embedder" was deleted'),  # renamed RPC
])
def test_breaking_check_catches_forbidden_changes(buf: Path, workspace: Path, old: str,
                                                  new: str, complaint: str) -> None:
    edit(workspace, old, new)
    result = run_buf(buf, workspace, "breaking", "--against", str(BASELINE))
    assert result.returncode != 0, f"buf breaking accepted: {old!r} → {new!r}"
    assert complaint in result.stdout, result.stdout


def test_additive_changes_pass(buf: Path, workspace: Path) -> None:
    edit(workspace, "  string request_id = 8;\n",
         "  string request_id = 8;\n  // A new optional field.\n  string tenant = 100;\n")
    edit(workspace, "message Embedding {",
         "// A new message.\nmessage Ping {\n  string note = 1;\n}\n\nmessage Embedding {")
    result = run_buf(buf, workspace, "breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_buf(buf, workspace, "lint").returncode == 0
