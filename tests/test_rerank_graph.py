"""The reranker graph (embedrpc.prepare.builder, task rerank) computes the model card's
score, in every precision.

Source: the tiny Qwen3-Reranker checkpoint written from a seed (tests/qwen3_fixtures.py);
reference: tests/data/qwen3_reranker_reference.json, the card's scores with transformers
in float32 for the same files (scripts/make_reranker_fixture.py). Every reference row
(65..119 tokens) goes through the graph in one right-padded batch.

Tolerances, max |score difference| to the reference: fp32 1e-4 (measured 1.5e-6); fp16
2e-3, the issue's bound, for the real fp16 graph on the CPU and its fp16-rounding float32
emulation (measured 1.4e-3 and 1.6e-3). bf16 and int8 do not reach the issue's bounds
(2e-3, 1e-2) on this model: bf16 keeps 8 significant bits and int8 quantises each
token's activations to 8 bits, which moves these logits (−4.6..4.2) by about 0.1 and
0.2. They are held here to what their arithmetic gives, with room: bf16 (emulated) 0.03
(measured 0.024), int8 0.08 (measured 0.048 here, 0.058 on prepare's own pairs);
`embedrpc prepare` refuses them at the issue's bounds unless --max-score-diff says
otherwise (tests/test_rerank_prepare.py). Ranking: within each query, documents whose
reference scores differ by more than the tolerance keep their order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from embedrpc.prepare import PrepareError
from embedrpc.prepare.builder import GraphOptions, build_graph
from embedrpc.prepare.checkpoint import SafetensorsFile, Weights, read_config, write_safetensors

from . import qwen3_fixtures as fx
from .helpers import DATA

REFERENCE = json.loads((DATA / "qwen3_reranker_reference.json").read_text(encoding="utf-8"))
GROUPS = [g for c in REFERENCE["cases"] for g in c["groups"]]
ROWS = [r for g in GROUPS for r in g["token_ids"]]
WANT = np.array([s for g in GROUPS for s in g["scores"]], dtype=np.float64)
TOKENS = (REFERENCE["yes_id"], REFERENCE["no_id"])
# (precision, emulate) → max |score difference| allowed (see the module's docstring)
BOUNDS = {("fp32", False): 1e-4, ("fp16", False): 2e-3, ("fp16", True): 2e-3,
          ("bf16", True): 0.03, ("int8", False): 0.08}
BATCH_INVARIANCE = 1e-5
LAYERS = fx.RERANKER_SHAPES["tiny"].layers


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_reranker_checkpoint(tmp_path_factory.mktemp("rr") / "Qwen3-Reranker-tiny")


def _options(precision: str = "fp32", emulate: bool = False, **kw: Any) -> GraphOptions:
    return GraphOptions(precision=precision, emulate=emulate, task="rerank",
                        rerank_tokens=TOKENS, **kw)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _scores(session: ort.InferenceSession, rows: list[list[int]]) -> np.ndarray:
    """All rows in one right-padded batch (pads are <|endoftext|>, never read)."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), 151643, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    (out,) = session.run(["score"], {"input_ids": ids, "attention_mask": mask})
    assert out.dtype == np.float32 and out.shape == (len(rows),)
    return out.astype(np.float64)


@pytest.mark.parametrize(("precision", "emulate"), list(BOUNDS))
def test_scores_match_the_model_card(checkpoint: Path, precision: str, emulate: bool) -> None:
    model = build_graph(read_config(checkpoint), Weights(checkpoint),
                        _options(precision, emulate))
    got = _scores(_session(model), ROWS)
    bound = BOUNDS[(precision, emulate)]
    assert np.isfinite(got).all()
    assert np.abs(got - WANT).max() <= bound, np.abs(got - WANT).max()
    assert fx.ranking_swaps(got, WANT, GROUPS, bound) == []


def test_graph_ends_in_one_score_and_never_in_logits(checkpoint: Path) -> None:
    config = read_config(checkpoint)
    weights = Weights(checkpoint)
    model = build_graph(config, weights, _options())
    (output,) = model.graph.output
    assert output.name == "score"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in output.type.tensor_type.shape.dim] == ["batch"]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["embedrpc.task"] == "rerank"
    assert meta["embedrpc.rerank_tokens"] == f"{TOKENS[0]},{TOKENS[1]}"
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS and ops.count("Sigmoid") == 1
    assert "Softmax" not in ops and "Gemm" not in ops
    # Only the embedding table is vocabulary-sized: no [H, vocab] LM head anywhere.
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert [n for n, s in shapes.items() if config.vocab_size in s] == ["embed_tokens"]
    assert shapes["score_head"] == (config.hidden_size, 1)
    head = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer
                                           if t.name == "score_head"))[:, 0]
    table = SafetensorsFile(checkpoint / "model.safetensors").get("model.embed_tokens.weight")
    np.testing.assert_array_equal(head, table[TOKENS[0]] - table[TOKENS[1]])
    # Four projections per layer and the head; the last layer's MLP reads one row.
    assert ops.count("MatMul") == 4 * LAYERS + 1
    assert weights.unused() == []


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_scores_do_not_depend_on_padding_or_batch_mates(checkpoint: Path,
                                                        precision: str) -> None:
    session = _session(build_graph(read_config(checkpoint), Weights(checkpoint),
                                   _options(precision)))
    together = _scores(session, ROWS)
    alone = np.array([_scores(session, [r])[0] for r in ROWS])
    reversed_ = _scores(session, ROWS[::-1])[::-1]
    assert np.abs(together - alone).max() <= BATCH_INVARIANCE
    assert np.abs(reversed_ - alone).max() <= BATCH_INVARIANCE


def _with_head(checkpoint: Path, target: Path, *, tie: bool, head: str | None) -> Path:
    """A copy with config.json's tie_word_embeddings set and an lm_head.weight stored:
    None (none), "same" (the embeddings, as an untied save of this model has it) or
    "swapped" (the embeddings with the yes and no rows exchanged)."""
    shutil.copytree(checkpoint, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    f = SafetensorsFile(checkpoint / "model.safetensors")
    tensors = {n: f.get(n) for n in f.names()}
    if head is not None:
        lm_head = tensors["model.embed_tokens.weight"].copy()
        if head == "swapped":
            lm_head[list(TOKENS)] = lm_head[list(TOKENS[::-1])]
        tensors["lm_head.weight"] = lm_head
    write_safetensors(target / "model.safetensors", tensors, "BF16")
    return target


def test_lm_head_from_lm_head_weight_or_the_tied_embeddings(checkpoint: Path,
                                                           tmp_path: Path) -> None:
    # An untied checkpoint (as Qwen3-Reranker-8B is saved) reads lm_head.weight: with the
    # embeddings' values stored there, the card's scores are the reference's.
    untied = _with_head(checkpoint, tmp_path / "untied", tie=False, head="same")
    got = _scores(_session(build_graph(read_config(untied), Weights(untied), _options())),
                  ROWS)
    assert np.abs(got - WANT).max() <= BOUNDS[("fp32", False)]
    # A stored lm_head is the head (transformers 5 loads it even when config.json ties):
    # with yes and no exchanged, softmax over (no, yes) gives 1 − the reference.
    swapped = _with_head(checkpoint, tmp_path / "swapped", tie=True, head="swapped")
    got = _scores(_session(build_graph(read_config(swapped), Weights(swapped), _options())),
                  ROWS)
    assert np.abs(got - (1.0 - WANT)).max() <= BOUNDS[("fp32", False)]
    # Untied with no lm_head: nothing to score with.
    headless = _with_head(checkpoint, tmp_path / "headless", tie=False, head=None)
    with pytest.raises(PrepareError, match=r"no lm_head\.weight and config\.json does not tie"):
        build_graph(read_config(headless), Weights(headless), _options())


def test_options_refuse_a_reranker_without_its_tokens() -> None:
    with pytest.raises(ValueError, match="rerank_tokens"):
        GraphOptions(task="rerank")
    with pytest.raises(ValueError, match="rerank_tokens"):
        GraphOptions(task="rerank", rerank_tokens=TOKENS, pooling="mean")
    with pytest.raises(ValueError, match="task 'classify'"):
        GraphOptions(task="classify")
