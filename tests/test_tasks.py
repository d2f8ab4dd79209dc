"""Which task a model directory serves (embedrpc.server.tasks.model_task), rule by rule.

The expected answers are issue 14's rules: a prepared directory's record; sentence-
transformers files → embedding (a CrossEncoder's are not); an ONNX graph with hidden
states or sentence_embedding → embedding, with `score` → reranker; a checkpoint whose
directory name or hub id contains "reranker" (any case) → reranker; anything else →
embedding. Graph outputs are read without loading the graph; they must equal what the
onnx package reads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from embedrpc.server.errors import ModelError
from embedrpc.server.tasks import graph_outputs, model_task

from .helpers import DATA


def _graph(path: Path, outputs: list[str]) -> Path:
    """A small valid ONNX file whose outputs are `outputs` (identities of input_ids), with
    an initializer to skip over."""
    h, tp = onnx.helper, onnx.TensorProto
    nodes = [h.make_node("Identity", ["input_ids"], [o]) for o in outputs]
    weight = onnx.numpy_helper.from_array(np.zeros((64, 8), np.float32), "w")
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("input_ids", tp.INT64, [1])],
                         [h.make_tensor_value_info(o, tp.INT64, [1]) for o in outputs],
                         initializer=[weight])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(h.make_model(graph), str(path))
    return path


def _checkpoint(path: Path) -> Path:
    """config.json and a safetensors file, nothing else (a Hugging Face checkpoint)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    (path / "model.safetensors").write_bytes(b"")
    return path


def test_prepared_directories_say_their_task(tmp_path: Path) -> None:
    rerank = tmp_path / "prepared-a"
    rerank.mkdir()
    (rerank / "embedrpc_prepared.json").write_text(json.dumps({"task": "rerank"}))
    assert model_task(rerank) == "rerank"
    older = tmp_path / "prepared-before-tasks-reranker"  # the record wins over the name
    older.mkdir()
    (older / "embedrpc_prepared.json").write_text(json.dumps({"precision": "fp16"}))
    assert model_task(older) == "embed"
    assert model_task(rerank, task="rerank") == "rerank"
    with pytest.raises(ModelError, match="was prepared as a reranker model"):
        model_task(rerank, task="embed")
    with pytest.raises(ModelError, match="was prepared as an embedding model"):
        model_task(older, task="rerank")
    (rerank / "embedrpc_prepared.json").write_text(json.dumps({"task": "classify"}))
    with pytest.raises(ModelError, match="task 'classify' is unknown"):
        model_task(rerank)


def test_sentence_transformers_files_make_an_embedding_model(tmp_path: Path) -> None:
    named = shutil.copytree(DATA / "tiny_qwen3", tmp_path / "my-Reranker-embeddings")
    assert model_task(named) == "embed"
    # A sentence-transformers CrossEncoder is not an embedding model: the name decides.
    cross = _checkpoint(tmp_path / "Qwen3-Reranker-0.6B-seq-cls")
    (cross / "config_sentence_transformers.json").write_text(json.dumps(
        {"model_type": "CrossEncoder"}))
    (cross / "modules.json").write_text("[]")
    assert model_task(cross) == "rerank"


def test_onnx_graphs_by_their_outputs(tmp_path: Path) -> None:
    scored = _graph(tmp_path / "plain" / "model.onnx", ["score"]).parent
    assert model_task(scored) == "rerank"
    hidden = _graph(tmp_path / "x-reranker-hidden" / "onnx" / "model.onnx",
                    ["last_hidden_state", "present.0.key"]).parent.parent
    assert model_task(hidden) == "embed"  # hidden states: embedding, whatever the name
    pooled = _graph(tmp_path / "pooled-reranker" / "model.onnx",
                    ["token_embeddings", "sentence_embedding"]).parent
    assert model_task(pooled) == "embed"
    # A generation graph (logits) says neither: the name decides.
    logits_named = _graph(tmp_path / "Qwen3-Reranker-0.6B-ONNX" / "onnx" / "model.onnx",
                          ["logits"]).parent.parent
    assert model_task(logits_named) == "rerank"
    logits = _graph(tmp_path / "Qwen3-0.6B-ONNX" / "onnx" / "model.onnx",
                    ["logits"]).parent.parent
    assert model_task(logits) == "embed"
    for layout in (DATA / "layouts" / "onnx_community" / "onnx" / "model.onnx",
                   DATA / "layouts" / "optimum" / "model.onnx"):
        assert graph_outputs(layout) == [o.name for o in onnx.load(
            str(layout), load_external_data=False).graph.output]
    broken = tmp_path / "broken" / "model.onnx"
    broken.parent.mkdir()
    broken.write_bytes(b"\x0a\xff\xff\xff\xff\x0f")  # a field longer than the file
    with pytest.raises(ModelError, match="not a readable ONNX file"):
        model_task(broken.parent)


def test_checkpoints_by_name_or_hub_id(tmp_path: Path) -> None:
    assert model_task(_checkpoint(tmp_path / "Qwen3-Reranker-0.6B")) == "rerank"
    assert model_task(_checkpoint(tmp_path / "my-RERANKER")) == "rerank"
    plain = _checkpoint(tmp_path / "rerankers" / "Qwen3-Embedding-0.6B")
    assert model_task(plain) == "embed"  # a parent directory's name does not count
    snapshot = _checkpoint(tmp_path / "snapshots" / "0123abcd")
    assert model_task(snapshot) == "embed"
    assert model_task(snapshot, name="Qwen/Qwen3-Reranker-4B") == "rerank"
    assert model_task(snapshot, name="Qwen/Qwen3-Embedding-4B") == "embed"
    # An explicit task is taken as it is for anything not prepared.
    assert model_task(plain, task="rerank") == "rerank"
    assert model_task(tmp_path / "Qwen3-Reranker-0.6B", task="embed") == "embed"
    with pytest.raises(ModelError, match="--task 'score'"):
        model_task(plain, task="score")
