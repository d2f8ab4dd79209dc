"""Which task a model directory serves: text embeddings or Qwen3-Reranker pair scores.

`model_task(path)` decides, in this order (`--task auto`, issue 14):

1. a directory `embedrpc prepare` wrote says so in embedrpc_prepared.json (`task`;
   directories prepared before rerankers existed have none and are embedding models);
2. sentence-transformers files (modules.json, config_sentence_transformers.json,
   sentence_bert_config.json, 1_Pooling/config.json) make an embedding model, unless
   config_sentence_transformers.json says the model is a CrossEncoder;
3. an ONNX graph (model.onnx at the top or under onnx/) that outputs hidden states
   (last_hidden_state, token_embeddings) or `sentence_embedding` is an embedding model;
   one that outputs `score` (a reranker graph prepare built) is a reranker;
4. a checkpoint (or anything else) whose directory name, or the hub id it was
   downloaded as, contains "reranker" (any case) is a reranker;
5. anything else is an embedding model, as before rerankers existed.

An explicit task ("embed" or "rerank") is taken as it is, except that a prepared
directory cannot be served as the other task (its graph computes one of them).

Reading a graph's outputs here costs no weights: the ONNX file's protobuf is walked
field by field over a memory map, skipping initializers, so the main process can ask
before any worker loads the model.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any

from .errors import ModelError

EMBED, RERANK = "embed", "rerank"
TASKS = (EMBED, RERANK)
TASK_CHOICES = ("auto", EMBED, RERANK)
PREPARED_INFO = "embedrpc_prepared.json"
EMBEDDING_OUTPUTS = ("last_hidden_state", "token_embeddings", "sentence_embedding")
RERANK_OUTPUT = "score"
_ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
             "1_Pooling/config.json")
_NAME_MARK = "reranker"


def model_task(path: str | Path, *, name: str | None = None, task: str = "auto") -> str:
    """"embed" or "rerank" for the model directory `path` (see the module's rules).

    name: the hub id the directory was downloaded as (a hub snapshot's own directory is
    a commit hash); default: the directory's name. task: "auto", or "embed"/"rerank" to
    override detection (refused for a prepared directory of the other task).
    Raises ModelError for an unknown task or a contradiction."""
    if task not in TASK_CHOICES:
        raise ModelError(f"--task {task!r}: use one of {', '.join(TASK_CHOICES)}")
    path = Path(path)
    prepared = prepared_task(path)
    if prepared is not None:
        if task not in ("auto", prepared):
            raise ModelError(f"{path} was prepared as a{'n' if prepared == EMBED else ''} "
                             f"{_WORDS[prepared]} model (its graph computes only that); "
                             f"prepare the checkpoint again with --task {task}")
        return prepared
    if task != "auto":
        return task
    return detect_task(path, name=name)


_WORDS = {EMBED: "embedding", RERANK: "reranker"}


def prepared_task(path: Path) -> str | None:
    """The task embedrpc_prepared.json records, "embed" for one that predates tasks, or
    None when `path` was not written by `embedrpc prepare`."""
    info_path = path / PREPARED_INFO
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {info_path}: {exc}") from exc
    task = info.get("task", EMBED) if isinstance(info, dict) else EMBED
    if task not in TASKS:
        raise ModelError(f"{info_path}: task {task!r} is unknown (this embedrpc serves "
                         f"{', '.join(TASKS)})")
    return str(task)


def detect_task(path: Path, *, name: str | None = None) -> str:
    """Rules 2-5 of the module's docstring (no prepared-directory record)."""
    if _has_sentence_transformers_files(path):
        return EMBED
    graph = _find_graph(path)
    if graph is not None:
        outputs = graph_outputs(graph)
        if RERANK_OUTPUT in outputs:
            return RERANK
        if any(o in outputs for o in EMBEDDING_OUTPUTS):
            return EMBED
    label = name or path.name
    return RERANK if _NAME_MARK in label.lower() else EMBED


def _has_sentence_transformers_files(path: Path) -> bool:
    if not any((path / f).is_file() for f in _ST_FILES):
        return False
    config = path / "config_sentence_transformers.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True  # the embedding side reports a broken file
        # sentence-transformers saves its model class there since v4; older files have none
        if isinstance(data, dict) and data.get("model_type") == "CrossEncoder":
            return False
    return True


def _find_graph(path: Path) -> Path | None:
    for candidate in (path / "model.onnx", path / "onnx" / "model.onnx"):
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------ ONNX outputs, cheaply
# Field numbers of onnx.proto: ModelProto.graph = 7; GraphProto.output = 12;
# ValueInfoProto.name = 1.

def graph_outputs(onnx_path: Path) -> list[str]:
    """The output names of an ONNX model file, without parsing its weights."""
    try:
        with onnx_path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                names = []
                for graph in _fields(view, 0, len(view), 7):
                    for output in _fields(view, *graph, 12):
                        for name in _fields(view, *output, 1):
                            names.append(bytes(view[name[0]:name[1]]).decode("utf-8"))
                return names
            finally:
                view.release()
    except (OSError, ValueError) as exc:
        raise ModelError(f"{onnx_path}: not a readable ONNX file ({exc})") from exc


def _varint(buf: Any, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: Any, start: int, end: int, number: int) -> list[tuple[int, int]]:
    """(start, end) of each length-delimited field `number` in buf[start:end]."""
    found = []
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if field == number:
                found.append((pos, pos + length))
            pos += length
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("field runs past its message")
    return found
