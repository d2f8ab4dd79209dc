"""Checking a prepared graph against float32 references on built-in texts.

The texts are tokenized exactly as the server will tokenize them (prompts, EOS,
truncation), then embedded in mixed-length, right-padded batches. References:

* the float32 prepared graph, each text alone and in the same batches (batch
  invariance: padding must not change a vector);
* transformers' own Qwen3 implementation on the source checkpoint, one text at a
  time, when torch and transformers are installed.

A candidate passes when every vector is finite and its cosine to the float32
graph's is at least the precision's threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PrepareError

# Minimum cosine to the float32 graph, per precision; float32 itself is held to the
# transformers reference.
THRESHOLDS = {"fp32": 0.9999, "fp16": 0.999, "bf16": 0.999, "int8": 0.99}
REFERENCE_COSINE = 0.9999
BATCH_INVARIANCE_MAX_ABS = 1e-4
BATCH_ROWS = 8

_SHORT = (
    "The capital of France is Paris, a city on the river Seine.",
    "Graphics processors run thousands of small computations in parallel.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Der Rhein ist einer der längsten Flüsse Europas.",
    "Künstliche Intelligenz verändert die Arbeitswelt grundlegend.",
    "La tour Eiffel a été construite pour l'Exposition universelle de 1889.",
    "¿Dónde está la estación de tren más cercana?",
    "Столица России — Москва, крупнейший город страны.",
    "长江是中国最长的河流，全长约六千三百公里。",
    "富士山は日本で一番高い山です。",
    "نهر النيل هو أطول نهر في أفريقيا.",
    "गंगा भारत की सबसे पवित्र नदी मानी जाती है।",
    "서울은 대한민국의 수도이다.",
    "Coffee ☕ first, then work 💻 — see you at 9:30! 👍🏽",
    "def add(a: int, b: int) -> int:\n    return a + b",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "3.14159 26535 89793 23846",
    "a",
    "",
)
_QUERIES = (
    "What is the capital of China?",
    "how do plants make food",
    "Wie hoch ist die Zugspitze?",
    "量子计算机是如何工作的？",
)
_LONG_PARTS = (
    "Embeddings map text to vectors so that similar meanings end up close together. ",
    "A search engine ranks documents by how well they answer the query. ",
    "Die Suchmaschine findet Dokumente, die zur Anfrage passen. ",
    "搜索引擎根据查询对文档进行排序。",
    "Le moteur de recherche classe les pages selon leur pertinence. ",
    "Поисковая система находит документы по запросу. ",
)


@dataclass(frozen=True)
class ValidationText:
    kind: str
    text: str
    prompt: str = ""


def validation_texts(prompts: dict[str, str]) -> list[ValidationText]:
    """The built-in set: short multilingual documents, queries with the model's query
    prompt (or Qwen3's instruction format), long texts, edge cases."""
    query_prompt = prompts.get("query") or (
        "Instruct: Given a web search query, retrieve relevant passages that answer the "
        "query\nQuery:")
    texts = [ValidationText("document", t) for t in _SHORT]
    texts += [ValidationText("query", q, query_prompt) for q in _QUERIES]
    long_a = "".join(_LONG_PARTS[i % len(_LONG_PARTS)] for i in range(200))
    long_b = " ".join(f"Item {i}: the value is {i * 37 % 101}." for i in range(400))
    texts += [ValidationText("long", long_a), ValidationText("long", long_b)]
    return texts


def tokenize(model_dir: Path, *, onnx_file: str,
             max_length: int) -> tuple[list[np.ndarray], list[str], int]:
    """Token ids of the validation texts as the server makes them (prompts, EOS,
    truncation at the model's limit or `max_length`); their kinds; the pad id."""
    from embedrpc.server.errors import ModelError
    from embedrpc.server.model import load_model_spec
    from embedrpc.server.tokenizer import TextEncoder

    try:
        spec = load_model_spec(str(model_dir), onnx_file=onnx_file)
        if spec.max_length > max_length:
            spec = load_model_spec(str(model_dir), onnx_file=onnx_file, max_length=max_length)
        encoder = TextEncoder(spec)
    except ModelError as exc:
        raise PrepareError(f"the prepared directory would not serve: {exc}") from exc
    texts = validation_texts(spec.prompts)
    rows = []
    for t in texts:
        rows.extend(encoder.encode([t.text], prompt=t.prompt).ids)
    return rows, [t.kind for t in texts], encoder.pad_id


def reference_placement(device: str) -> str:
    """Where the float32 reference graph runs on `device`. ONNX Runtime's CUDA provider
    registers GroupQueryAttention for fp16 and bf16 only, so in the float32 graph that node
    runs on the CPU (ONNX Runtime copies its inputs and output each layer) and the rest on
    the GPU: correct, and slower than an fp16 graph, which is only the candidate."""
    if device == "cpu":
        return "cpu"
    return (f"{device}, except GroupQueryAttention (attention), which runs on the CPU: "
            "ONNX Runtime has CUDA kernels for it in fp16 and bf16 only")


class Runner:
    """An ONNX Runtime session that embeds token rows in right-padded batches."""

    def __init__(self, path: Path, device: str, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if device.startswith("cuda"):
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            _, _, index = device.partition(":")
            cuda: dict[str, Any] = {"device_id": int(index or 0), "use_tf32": 0}
            providers: list[Any] = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:
            raise PrepareError(f"ONNX Runtime cannot load {path.name} on {device}: "
                               f"{exc}") from exc
        if device.startswith("cuda") and \
                self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise PrepareError(f"--device {device}: the CUDA execution provider is not usable "
                               "(onnxruntime-gpu, CUDA and cuDNN are needed)")

    def embed(self, rows: Sequence[np.ndarray], pad_id: int, batch_rows: int = BATCH_ROWS,
              outputs: Sequence[str] = ("sentence_embedding",)) -> list[np.ndarray]:
        """Batches of `batch_rows` in the given order (mixed lengths, right padding)."""
        results: list[list[np.ndarray]] = [[] for _ in outputs]
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start:start + batch_rows]
            width = max(len(r) for r in chunk)
            ids = np.full((len(chunk), width), pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for i, row in enumerate(chunk):
                ids[i, :len(row)] = row
                mask[i, :len(row)] = 1
            values = self.session.run(list(outputs), {"input_ids": ids,
                                                      "attention_mask": mask})
            for store, value in zip(results, values, strict=True):
                store.append(np.asarray(value, dtype=np.float32).reshape(
                    len(chunk), -1) if value.ndim else np.asarray(value).reshape(1))
        return [np.concatenate(r) for r in results]


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    """Cosine and absolute difference per row; non-finite rows named."""
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    finite = np.isfinite(got64).all(axis=1)
    norms = np.linalg.norm(got64, axis=1) * np.linalg.norm(want64, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(finite, (got64 * want64).sum(axis=1) / np.maximum(norms, 1e-30),
                          np.nan)
    return {
        "min_cosine": float(np.nanmin(cosine)) if finite.any() else float("nan"),
        "mean_cosine": float(np.nanmean(cosine)) if finite.any() else float("nan"),
        "max_abs": float(np.nanmax(np.abs(got64 - want64)[finite])) if finite.any()
        else float("nan"),
        "non_finite_rows": [int(i) for i in np.flatnonzero(~finite)],
        "cosines": cosine,
    }


def transformers_reference(source: Path, rows: Sequence[np.ndarray], pooling: str,
                           normalize: bool, log: Callable[[str], None]) -> np.ndarray | None:
    """transformers' Qwen3 on the checkpoint, float32, one text at a time (no padding).
    None when torch or transformers is not installed."""
    try:
        import torch
        import transformers
        from transformers import AutoModel
    except ImportError:
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    model = AutoModel.from_pretrained(str(source), **{dtype_key: torch.float32}).eval()
    vectors = []
    with torch.inference_mode():
        for row in rows:
            hidden = model(input_ids=torch.tensor(np.asarray(row, dtype=np.int64)[None]))
            states = hidden.last_hidden_state[0]
            if pooling == "lasttoken":
                vec = states[-1]
            elif pooling == "cls":
                vec = states[0]
            else:
                vec = states.mean(dim=0)
            vectors.append(vec.float().numpy())
    out = np.stack(vectors).astype(np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    log(f"transformers reference: {len(rows)} texts in {time.perf_counter() - started:.1f}s")
    return out


def summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "cosines"}


def check(name: str, stats: dict[str, Any], threshold: float, kinds: Sequence[str]) -> str | None:
    """None if it passes, else a message naming the worst texts."""
    if stats["non_finite_rows"]:
        which = ", ".join(f"#{i} ({kinds[i]})" for i in stats["non_finite_rows"][:5])
        return f"{name}: non-finite values (NaN or inf) for text {which}"
    if not stats["min_cosine"] >= threshold:
        worst = np.argsort(stats["cosines"])[:3]
        which = ", ".join(f"#{i} ({kinds[i]}) {stats['cosines'][i]:.6f}" for i in worst)
        return (f"{name}: cosine {stats['min_cosine']:.6f} is below {threshold} "
                f"(worst: {which})")
    return None
