"""Checking a prepared graph against float32 references on built-in texts.

The texts are tokenized exactly as the server will tokenize them (prompts, EOS,
truncation), then embedded in mixed-length, right-padded batches. References:

* the float32 prepared graph, each text alone and in the same batches (batch
  invariance: padding must not change a vector);
* transformers' own Qwen3 implementation on the source checkpoint, one text at a
  time, when torch and transformers are installed.

A candidate passes when every vector is finite and its cosine to the float32
graph's is at least the precision's threshold.

Rerankers (Qwen3-Reranker) are checked on built-in query–document pairs tokenized as
the server tokenizes them (embedrpc.server.rerank, the model card's format and
truncation), by the largest |score difference| and by the order of each query's
documents (RERANK_MAX_ABS); the transformers reference follows the model card's
procedure, its tokenization included.
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


# ------------------------------------------------------------------ rerankers
#
# A reranker's output is a probability, so it is checked as one: the largest absolute
# score difference (cosine means nothing for a scalar), and the order of each query's
# documents. fp32 is held to transformers (the model card's procedure), the other
# precisions to the float32 graph. Two documents whose reference scores differ by no
# more than the precision's bound are a tie: the bound allows either order.

RERANK_MAX_ABS = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 2e-3, "int8": 1e-2}
RERANK_REFERENCE_MAX_ABS = RERANK_MAX_ABS["fp32"]
# A reranker whose scores on the built-in pairs (queries with relevant and unrelated
# documents) all agree this closely cannot rank anything: its yes/no rows are broken.
RERANK_MIN_SPREAD = 1e-6


@dataclass(frozen=True)
class RerankGroup:
    """One query and its documents, scored under one instruction (None: the card's)."""

    kind: str
    query: str
    documents: tuple[str, ...]
    instruction: str | None = None


def rerank_validation_groups() -> list[RerankGroup]:
    """The built-in pairs: short multilingual documents, a custom instruction, long
    documents (cut at the validation length), empty and one-character documents."""
    long_a = "".join(_LONG_PARTS[i % len(_LONG_PARTS)] for i in range(200))
    long_b = " ".join(f"Item {i}: the value is {i * 37 % 101}." for i in range(400))
    return [
        RerankGroup("documents", _QUERIES[0], _SHORT[:9]),
        RerankGroup("multilingual", _QUERIES[3], _SHORT[8:14]),
        RerankGroup("instruction", _QUERIES[2], (_SHORT[3], _SHORT[4], _SHORT[0], _SHORT[6]),
                    "Given a question in German, retrieve German passages that answer it"),
        RerankGroup("code", "how do I add two numbers", _SHORT[14:18]),
        RerankGroup("long", _QUERIES[1], (long_a, long_b, _SHORT[2])),
        RerankGroup("edge", _QUERIES[1], ("", " ", "a", _SHORT[13])),
    ]


def rerank_tokenize(model_dir: Path, *, max_length: int
                    ) -> tuple[list[np.ndarray], list[RerankGroup], Any]:
    """Token rows of the validation pairs as the server makes them (embedrpc.server.rerank:
    the card's format and truncation at `max_length`), the groups, and the encoder."""
    from embedrpc.server.errors import ModelError
    from embedrpc.server.rerank import PairEncoder

    try:
        encoder = PairEncoder(model_dir, max_length=max_length)
    except ModelError as exc:
        raise PrepareError(f"the prepared directory would not serve: {exc}") from exc
    groups = rerank_validation_groups()
    rows = []
    for g in groups:
        rows.extend(encoder.encode(g.query, list(g.documents), instruction=g.instruction).ids)
    return rows, groups, encoder


def rerank_transformers_reference(source: Path, groups: Sequence[RerankGroup], *,
                                  max_length: int, log: Callable[[str], None]
                                  ) -> tuple[np.ndarray, list[list[int]]] | None:
    """The model card's procedure with transformers on the checkpoint, float32: its
    tokenizer (left padding) and truncation, batches of BATCH_ROWS pairs, softmax over
    the last position's logits of "no" and "yes". Returns (scores, the token ids it fed
    without padding), or None when torch or transformers is not installed.

    Only the last position's logits are computed (logits_to_keep=1): the same numbers as
    the card's logits[:, -1, :], without a [batch, length, 151,669] tensor."""
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        return None
    from transformers.utils import logging as hf_logging

    from embedrpc.server.rerank import PREFIX, SUFFIX, format_pair

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_key = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    tokenizer = AutoTokenizer.from_pretrained(str(source), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(source),
                                                 **{dtype_key: torch.float32}).eval()
    yes = tokenizer.convert_tokens_to_ids("yes")
    no = tokenizer.convert_tokens_to_ids("no")
    prefix = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(SUFFIX, add_special_tokens=False)
    texts = [format_pair(g.query, d, g.instruction) for g in groups for d in g.documents]
    scores: list[float] = []
    fed: list[list[int]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), BATCH_ROWS):
            inputs = tokenizer(texts[start:start + BATCH_ROWS], padding=False,
                               truncation="longest_first", return_attention_mask=False,
                               max_length=max_length - len(prefix) - len(suffix))
            inputs["input_ids"] = [prefix + ids + suffix for ids in inputs["input_ids"]]
            batch = tokenizer.pad(inputs, padding=True, return_tensors="pt")
            fed.extend([t for t, m in zip(row, mask, strict=True) if m] for row, mask in zip(
                batch["input_ids"].tolist(), batch["attention_mask"].tolist(), strict=True))
            logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
            pair = torch.stack([logits[:, no], logits[:, yes]], dim=1)
            scores.extend(torch.nn.functional.log_softmax(pair, dim=1)[:, 1].exp().tolist())
    log(f"transformers reference (model card): {len(texts)} pairs in "
        f"{time.perf_counter() - started:.1f}s")
    return np.asarray(scores, dtype=np.float64), fed


def compare_scores(got: np.ndarray, want: np.ndarray, groups: Sequence[RerankGroup],
                   tie: float) -> dict[str, Any]:
    """Largest |score difference| (and where), non-finite scores, and each query's
    documents put in a different order (pairs whose `want` scores differ by more than
    `tie` but come out the other way round)."""
    got64 = np.asarray(got, dtype=np.float64).reshape(-1)
    want64 = np.asarray(want, dtype=np.float64).reshape(-1)
    finite = np.isfinite(got64)
    diff = np.where(finite, np.abs(got64 - want64), np.inf)
    swaps: list[tuple[int, int]] = []
    start = 0
    for g in groups:
        idx = range(start, start + len(g.documents))
        for i in idx:
            for j in idx:
                if want64[i] - want64[j] > tie and not got64[i] > got64[j]:
                    swaps.append((i, j))
        start += len(g.documents)
    return {
        "max_abs": float(diff.max()) if len(diff) else 0.0,
        "worst": int(np.argmax(diff)) if len(diff) else -1,
        "non_finite": [int(i) for i in np.flatnonzero(~finite)],
        "ranking_swaps": swaps,
        "ranking_identical": not swaps,
    }


def score_summary(stats: dict[str, Any]) -> dict[str, Any]:
    return {"max_abs": stats["max_abs"], "ranking_identical": stats["ranking_identical"],
            "ranking_swaps": len(stats["ranking_swaps"])}


def check_scores(name: str, stats: dict[str, Any], bound: float,
                 labels: Sequence[str]) -> str | None:
    """None if it passes, else a message naming the pairs at fault."""
    if stats["non_finite"]:
        which = ", ".join(labels[i] for i in stats["non_finite"][:3])
        return f"{name}: non-finite scores (NaN or inf) for {which}"
    if not stats["max_abs"] <= bound:
        return (f"{name}: scores differ by up to {stats['max_abs']:.2e} (allowed {bound:g}; "
                f"worst: {labels[stats['worst']]})")
    if stats["ranking_swaps"]:
        i, j = stats["ranking_swaps"][0]
        return (f"{name}: the ranking changes: {labels[j]} comes before {labels[i]} "
                f"({len(stats['ranking_swaps'])} pairs of documents swapped)")
    return None


def pair_labels(groups: Sequence[RerankGroup]) -> list[str]:
    """"pair #n (kind: document start)" for messages."""
    labels = []
    for g in groups:
        for d in g.documents:
            shown = d[:30].replace("\n", " ") + ("…" if len(d) > 30 else "")
            labels.append(f"pair #{len(labels)} ({g.kind}: {shown!r})")
    return labels
