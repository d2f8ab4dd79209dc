"""Every model layout a user really has, served exactly, against sentence-transformers.

The layouts (made by scripts/make_layout_fixtures.py and tests/qwen3_fixtures.py) all
carry the published Qwen3-Embedding metadata: tokenizer_config.json names <|im_end|> as
eos_token while the tokenizer appends <|endoftext|>, which is the pooled token.

- a Hugging Face checkpoint directory (safetensors, no ONNX graph) given straight to
  `serve`: prepared into the cache on first start, reused on the next;
- optimum's `export onnx --task feature-extraction` output (the graph pools and
  normalises; no sentence-transformers files in the directory);
- onnx-community's generation-style layout (onnx/model.onnx with position_ids and
  past_key_values inputs, last_hidden_state output, no sentence-transformers files);
- Qwen's real 151,669-token tokenizer;
- the 4B and 8B shapes (hidden 2560 / 4096, 32 query heads × 128, 8 KV heads), shrunk
  to one layer;
- a Hugging Face id naming a checkpoint (the hub replaced by a local copy).

References: sentence-transformers' vectors for the same weights, made offline by the
scripts. Tolerances, per vector, float32 on the CPU: cosine >= 0.9999 and
max abs <= 1e-4; the token ids the server feeds equal sentence-transformers', so
usage.prompt_tokens counts each text's end token once.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedrpc.client import EmbedClient
from embedrpc.prepare.cache import checkpoint_key, prepared_checkpoint
from embedrpc.server.model import load_model_spec

from . import qwen3_fixtures as fx
from .helpers import DATA, running_server

COSINE_MIN, MAX_ABS = 0.9999, 1e-4
TINY = DATA / "tiny_qwen3"
TINY_REFERENCE = json.loads((DATA / "tiny_qwen3_reference.json").read_text(encoding="utf-8"))


def _reference(stem: str) -> dict[str, Any]:
    reference = json.loads((DATA / f"{stem}.json").read_text(encoding="utf-8"))
    if "embeddings_file" in reference:  # wide shapes: the vectors are stored as float32
        vectors = np.load(DATA / reference["embeddings_file"])
        start = 0
        for case in reference["cases"]:
            case["embeddings"] = vectors[start:start + len(case["inputs"])]
            start += len(case["inputs"])
    return reference


def _expected(case: dict[str, Any], graph_normalises: bool) -> np.ndarray:
    want = np.asarray(case["embeddings"], dtype=np.float32)
    if graph_normalises and not case["normalize"]:
        # A graph that pools and normalises (optimum's export of a sentence-transformers
        # model; a prepared checkpoint) returns unit vectors whatever the request says:
        # what the model's sentence-transformers pipeline, which ends in Normalize, returns.
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
    return want


def assert_serves_reference(target: str, reference: dict[str, Any], *,
                            graph_normalises: bool = False) -> None:
    with EmbedClient(target, timeout=120) as client:
        info = client.info()
        assert info.dimensions == reference["dimensions"]
        assert (info.pooled_token, info.pooled_token_source) == ("<|endoftext|>", "tokenizer")
        for case in reference["cases"]:
            args = dict(prompt_name=case["prompt_name"], instruction=case["instruction"])
            tokens = client.tokenize(case["inputs"], **args)
            assert [list(t.ids) for t in tokens.inputs] == case["token_ids"], case["name"]
            response = client.embed_response(case["inputs"], dimensions=case["dimensions"],
                                             normalize=case["normalize"], **args)
            assert response.usage.prompt_tokens == sum(map(len, case["token_ids"]))
            got = np.frombuffer(response.data, dtype="<f4").reshape(len(case["inputs"]), -1)
            want = _expected(case, graph_normalises)
            cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(
                want, axis=1)
            assert cosine.min() >= COSINE_MIN, (case["name"], cosine)
            assert np.abs(got - want).max() <= MAX_ABS, (case["name"],
                                                          np.abs(got - want).max())


def test_checkpoint_is_prepared_on_first_start_and_reused(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO), running_server(model=str(TINY), workers=1,
                                                       cache_dir=str(cache)) as (srv, target):
        assert_serves_reference(target, TINY_REFERENCE, graph_normalises=True)
        assert srv.spec.name == "tiny_qwen3"  # Info names the checkpoint, not the cache
    (prepared,) = [p for p in (cache / "prepared").iterdir() if p.is_dir()]
    info = json.loads((prepared / "embedrpc_prepared.json").read_text())
    assert info["precision"] == "fp32" and info["source"] == str(TINY)
    assert "preparing it (fp32" in caplog.text and "pooled token: '<|endoftext|>'" in caplog.text
    graph = (prepared / "model.onnx").stat()
    caplog.clear()
    with caplog.at_level(logging.INFO), running_server(
            model=str(TINY), workers=1, cache_dir=str(cache)) as (_, target), \
            EmbedClient(target) as client:
        assert client.info().dimensions == TINY_REFERENCE["dimensions"]
    assert "using the prepared fp32 graph" in caplog.text and "preparing it" not in caplog.text
    assert (prepared / "model.onnx").stat().st_mtime_ns == graph.st_mtime_ns


def test_cache_key_follows_content_and_precision(tmp_path: Path) -> None:
    source = shutil.copytree(TINY, tmp_path / "ckpt")
    cache = tmp_path / "cache"
    key = checkpoint_key(source, "fp32", cache)
    assert checkpoint_key(source, "fp32", cache) == key  # stable (and memoised)
    assert checkpoint_key(source, "int8", cache) != key
    config = json.loads((source / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (source / "config.json").write_text(json.dumps(config))
    assert checkpoint_key(source, "fp32", cache) != key
    (source / "model.onnx").write_bytes(b"not read by prepare")  # other formats: ignored
    edited = checkpoint_key(source, "fp32", cache)
    (source / "model.onnx").unlink()
    assert checkpoint_key(source, "fp32", cache) == edited


def test_two_processes_preparing_one_checkpoint_take_turns(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    results: list[Path] = []
    messages: list[str] = []

    def run() -> None:
        results.append(prepared_checkpoint(TINY, precision="fp32", device="cpu",
                                           cache_dir=cache, say=messages.append,
                                           reference=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 2 and results[0] == results[1]
    assert sum("preparing it" in m for m in messages) == 1  # the other one reused it
    assert not list((cache / "prepared").glob(".*partial*"))


def test_optimum_export(caplog: pytest.LogCaptureFixture) -> None:
    layout = DATA / "layouts" / "optimum"
    assert not (layout / "modules.json").exists()  # as optimum writes it
    spec = load_model_spec(str(layout))
    assert spec.pooling == "lasttoken" and spec.prompts["query"] == fx.QUERY_PROMPT
    assert any("config_sentence_transformers.json" in a for a in spec.assumed)
    assert spec.max_length == 8192  # the model's own limit (tokenizer_config), capped
    # The reference was made with the checkpoint's max_seq_length 128; a user of the real
    # model needs no flag (its limit is the same on both sides).
    with caplog.at_level(logging.INFO), running_server(model=str(layout), workers=1,
                                                       max_length=128) as (_, target):
        assert_serves_reference(target, TINY_REFERENCE, graph_normalises=True)
    assert "Qwen3-Embedding's prompts" in caplog.text


def test_onnx_community_generation_layout() -> None:
    layout = DATA / "layouts" / "onnx_community"
    assert (layout / "onnx" / "model.onnx").is_file() and not (layout / "model.onnx").exists()
    assert json.loads((layout / "tokenizer_config.json").read_text())["eos_token"] == \
        "<|im_end|>"
    with running_server(model=str(layout), workers=1, max_length=128) as (srv, target):
        assert {"position_ids", "past_key_values.0.key"} <= set(srv.workers[0].info["inputs"])
        assert_serves_reference(target, TINY_REFERENCE)


def test_real_qwen_tokenizer_checkpoint(tmp_path: Path) -> None:
    reference = _reference("qwen3_realtok_reference")
    source = fx.write_checkpoint(tmp_path / "Qwen3-Embedding-realtok", "realtok")
    with running_server(model=str(source), workers=1,
                        cache_dir=str(tmp_path / "cache")) as (srv, target):
        assert srv.encoder.pooled.id == 151643
        assert_serves_reference(target, reference, graph_normalises=True)


@pytest.mark.parametrize("shape", ["4b", "8b"])
def test_4b_and_8b_shapes(tmp_path: Path, shape: str) -> None:
    reference = _reference(f"qwen3_{shape}_shape_reference")
    source = fx.write_checkpoint(tmp_path / f"qwen3-{shape}-shape", shape)
    with running_server(model=str(source), workers=1,
                        cache_dir=str(tmp_path / "cache")) as (srv, target):
        assert srv.spec.hidden_size == fx.SHAPES[shape].hidden_size
        assert_serves_reference(target, reference, graph_normalises=True)


def test_hub_id_of_a_checkpoint_is_downloaded_and_prepared(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    hub = {"Qwen/Qwen3-Embedding-tiny": TINY, "onnx-community/tiny-ONNX":
           DATA / "layouts" / "onnx_community"}
    asked: dict[str, list[str]] = {}

    class FakeApi:
        def list_repo_files(self, repo_id: str) -> list[str]:
            return [p.relative_to(hub[repo_id]).as_posix()
                    for p in hub[repo_id].rglob("*") if p.is_file()]

    def fake_download(repo_id: str, allow_patterns: list[str]) -> str:
        asked[repo_id] = allow_patterns
        out = tmp_path / "hub" / repo_id.replace("/", "--")
        shutil.copytree(hub[repo_id], out, dirs_exist_ok=True)
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    with running_server(model="Qwen/Qwen3-Embedding-tiny", workers=1,
                        cache_dir=str(tmp_path / "cache")) as (_, target):
        with EmbedClient(target) as client:
            assert client.info().model == "Qwen/Qwen3-Embedding-tiny"
        assert_serves_reference(target, TINY_REFERENCE, graph_normalises=True)
    assert "*.safetensors" in asked["Qwen/Qwen3-Embedding-tiny"]
    assert not any("onnx" in p for p in asked["Qwen/Qwen3-Embedding-tiny"])
    spec = load_model_spec("onnx-community/tiny-ONNX", onnx_file="model.onnx")
    assert spec.onnx_path.name == "model.onnx"
    assert "*.safetensors" not in asked["onnx-community/tiny-ONNX"]
    assert "onnx/model.onnx" in asked["onnx-community/tiny-ONNX"]


def test_model_card_script_checks_the_matrix(demo_server: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # scripts/check_model_card.py on the demo model, against sentence-transformers'
    # vectors for the same queries and documents (the real weights are not here).
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "check_model_card", Path(__file__).parent.parent / "scripts" / "check_model_card.py")
    assert spec and spec.loader
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    demo = json.loads((DATA / "demo_reference.json").read_text(encoding="utf-8"))
    cases = {c["name"]: c for c in demo["cases"]}
    assert cases["queries"]["inputs"][:2] == script.QUERIES
    queries = np.asarray(cases["queries"]["embeddings"][:2], dtype=np.float64)
    documents = cases["documents"]["inputs"][:2]
    expected = queries @ np.asarray(cases["documents"]["embeddings"][:2], dtype=np.float64).T
    args = ["--target", demo_server[1], "--document", documents[0], "--document",
            documents[1], "--expect", *map(str, expected.ravel())]
    assert script.main(args) == 0
    assert "OK" in capsys.readouterr().out
    off = expected.ravel() + np.array([0, 0, 0.003, 0])  # one entry off by more than 0.002
    args[-4:] = map(str, off)
    assert script.main(args) == 1
    assert "FAIL" in capsys.readouterr().out
