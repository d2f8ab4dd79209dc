"""OrtBackend on tiny synthetic ONNX graphs whose output is a formula numpy can compute.

Every graph looks up a fixed random table E (VOCAB × HIDDEN) and scales it:

    hidden[b, t, :] = E[input_ids[b, t]] · m[b, t] · p[b, t]

    m = 1 + attention_mask   (padding stays visible, so pooling must skip it itself)
      or attention_mask      (the `masked` graphs)
    p = 1 + position_ids     (graphs with a position_ids input), else 1

For a text's real token t that is E[a_t] · (2 or 1) · (1 + t or 1): the reference is
computed text by text in float64 and never looks at padding or batch-mates.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from embedrpc.server.errors import ModelError
from embedrpc.server.worker.backends import OrtBackend
from embedrpc.server.worker.spec import WorkerSpec, right_pad

VOCAB, HIDDEN, PAD = 50, 8, 0
E = np.random.default_rng(7).standard_normal((VOCAB, HIDDEN)).astype(np.float32)
TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 graph vs float64 reference
# Right-padded batch of different lengths; ids avoid PAD so padding is told apart.
TEXTS = [np.array(t, dtype=np.int32) for t in
         ([5, 9, 13, 2, 44], [7, 3], [11, 12, 13, 14, 15, 16, 17], [49])]
INT64, INT32, FLOAT = TensorProto.INT64, TensorProto.INT32, TensorProto.FLOAT


def build(tmp_path: Path, *, ids: str = "input_ids", ids_type: int = INT64,
          mask: bool = True, mask_type: int = INT64, position: bool = False,
          pos_type: int = INT64, token_type: int | None = None,
          past_heads: int | str | None = None, output: str = "last_hidden_state",
          masked: bool = False, pooled: bool = False, fp16: bool = False,
          extra_input: str | None = None, hidden_dim: int | str = HIDDEN) -> str:
    """Write a graph computing the formula above; return its path."""
    batch_seq = ["batch", "seq"]
    inputs = [helper.make_tensor_value_info(ids, ids_type, batch_seq)]
    outputs = []
    inits = [numpy_helper.from_array(E, "E"),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
             numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")]
    nodes = [helper.make_node("Gather", ["E", ids], ["h0"])]
    h = "h0"

    def scale(name: str, source: str, plus_one: bool) -> None:
        nonlocal h
        nodes.append(helper.make_node("Cast", [source], [f"{name}_f"], to=FLOAT))
        factor = f"{name}_f"
        if plus_one:
            nodes.append(helper.make_node("Add", [factor, "one"], [f"{name}_p1"]))
            factor = f"{name}_p1"
        nodes.append(helper.make_node("Unsqueeze", [factor, "last_axis"], [f"{name}_u"]))
        nodes.append(helper.make_node("Mul", [h, f"{name}_u"], [f"{name}_h"]))
        h = f"{name}_h"

    if mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", mask_type, batch_seq))
        scale("mask", "attention_mask", plus_one=not masked)
    if position:
        inputs.append(helper.make_tensor_value_info("position_ids", pos_type, batch_seq))
        scale("pos", "position_ids", plus_one=True)
    consumed = []  # inputs added as ReduceSum: 0 for the empty or zero tensors fed to them
    if token_type is not None:
        inputs.append(helper.make_tensor_value_info("token_type_ids", token_type, batch_seq))
        nodes.append(helper.make_node("Cast", ["token_type_ids"], ["token_type_f"], to=FLOAT))
        consumed.append("token_type_f")
    if past_heads is not None:
        for kind in ("key", "value"):
            name = f"past_key_values.0.{kind}"
            inputs.append(helper.make_tensor_value_info(
                name, FLOAT, ["batch", past_heads, "past_len", 8]))
            consumed.append(name)
            outputs.append(helper.make_tensor_value_info(
                f"present.0.{kind}", FLOAT, ["batch", past_heads, "past_len", 8]))
            nodes.append(helper.make_node("Identity", [name], [f"present.0.{kind}"]))
    if extra_input is not None:
        inputs.append(helper.make_tensor_value_info(extra_input, FLOAT, batch_seq))
        consumed.append(extra_input)
    for name in consumed:
        nodes.append(helper.make_node("ReduceSum", [name], [f"{name}_sum"], keepdims=0))
        nodes.append(helper.make_node("Add", [h, f"{name}_sum"], [f"{name}_h"]))
        h = f"{name}_h"
    shape: list[int | str] = ["batch", "seq", hidden_dim]
    if pooled:  # sentence_embedding = Σ_t hidden[b, t]
        nodes.append(helper.make_node("ReduceSum", [h, "axis_1"], ["summed"], keepdims=0))
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"))
        h, shape = "summed", ["batch", hidden_dim]
    out_type = FLOAT
    if fp16:
        nodes.append(helper.make_node("Cast", [h], ["h16"], to=TensorProto.FLOAT16))
        h, out_type = "h16", TensorProto.FLOAT16
    nodes.append(helper.make_node("Identity", [h], [output]))
    outputs.insert(0, helper.make_tensor_value_info(output, out_type, shape))
    graph = helper.make_graph(nodes, "synthetic", inputs, outputs, initializer=inits)
    # IR 8 loads in every ONNX Runtime the project supports (>= 1.20).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return str(path)


def backend(path: str, pooling: str = "lasttoken", hidden_size: int = HIDDEN) -> OrtBackend:
    return OrtBackend(WorkerSpec.of(onnx_path=path, device="cpu", threads=1, pooling=pooling,
                                 pad_id=PAD, hidden_size=hidden_size))


def states(ids: np.ndarray, *, masked: bool = False, position: bool = False) -> np.ndarray:
    """The formula's hidden states of one text's real tokens, [len, H] float64."""
    factor = np.full(len(ids), 1.0 if masked else 2.0)
    if position:
        factor *= 1 + np.arange(len(ids))
    return E[ids].astype(np.float64) * factor[:, None]


def pooled(texts: Sequence[np.ndarray], mode: str, **formula: bool) -> np.ndarray:
    out = []
    for ids in texts:
        s = states(ids, **formula)
        out.append({"lasttoken": s[-1], "mean": s.mean(axis=0), "cls": s[0]}[mode])
    return np.stack(out)


def embed(b: OrtBackend, texts: Sequence[np.ndarray]) -> np.ndarray:
    lengths = np.array([len(t) for t in texts], dtype=np.int32)
    out = b.embed(np.concatenate(texts).astype(np.int32), lengths)
    assert out.dtype == np.float32 and out.shape == (len(texts), b.hidden_size)
    return out


# -- pooling modes and graph variants ----------------------------------------------


@pytest.mark.parametrize("mode", ["lasttoken", "mean", "cls"])
def test_pooling_modes_match_the_formula(tmp_path: Path, mode: str) -> None:
    b = backend(build(tmp_path), mode)
    np.testing.assert_allclose(embed(b, TEXTS), pooled(TEXTS, mode), **TOL)
    # Alone or in a batch, the same vector (padding must not leak in).
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embed(b, [text])[0], pooled(TEXTS, mode)[i], **TOL)


@pytest.mark.parametrize("mode", ["lasttoken", "mean"])
def test_generation_style_export(tmp_path: Path, mode: str) -> None:
    """position_ids, empty past_key_values.* and extra present.* outputs."""
    b = backend(build(tmp_path, position=True, past_heads=2, masked=True), mode)
    assert set(b.describe()["inputs"]) == {"input_ids", "attention_mask", "position_ids",
                                           "past_key_values.0.key", "past_key_values.0.value"}
    expected = pooled(TEXTS, mode, masked=True, position=True)
    np.testing.assert_allclose(embed(b, TEXTS), expected, **TOL)


@pytest.mark.parametrize("other_type", [INT64, INT32], ids=["int64-others", "int32-others"])
def test_int32_input_ids(tmp_path: Path, other_type: int) -> None:
    # Some exports declare every integer input int32, some only input_ids.
    path = build(tmp_path, ids_type=INT32, mask_type=other_type, position=True,
                 pos_type=other_type, token_type=other_type, masked=True)
    b = backend(path)
    assert "token_type_ids" in b.describe()["inputs"]
    expected = pooled(TEXTS, "lasttoken", masked=True, position=True)
    np.testing.assert_allclose(embed(b, TEXTS), expected, **TOL)


def test_graph_without_attention_mask(tmp_path: Path) -> None:
    # Without a mask input the formula's m is 1 everywhere; last token and mean skip padding.
    b = backend(build(tmp_path, mask=False), "mean")
    expected = np.stack([E[t].astype(np.float64).mean(axis=0) for t in TEXTS])
    np.testing.assert_allclose(embed(b, TEXTS), expected, **TOL)


def test_token_embeddings_output_name(tmp_path: Path) -> None:
    b = backend(build(tmp_path, output="token_embeddings"), "mean")
    assert b.describe()["output"] == "token_embeddings"
    np.testing.assert_allclose(embed(b, TEXTS), pooled(TEXTS, "mean"), **TOL)


@pytest.mark.parametrize("mode", ["lasttoken", "cls"])
def test_pooled_output_is_returned_as_is(tmp_path: Path, mode: str) -> None:
    b = backend(build(tmp_path, output="sentence_embedding", pooled=True, masked=True), mode)
    assert b.describe()["output"] == "sentence_embedding"
    # The graph's own pooling (a masked sum), whatever the spec's pooling mode says.
    expected = np.stack([states(t, masked=True).sum(axis=0) for t in TEXTS])
    np.testing.assert_allclose(embed(b, TEXTS), expected, **TOL)


# -- graphs the server cannot serve ----------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param({"ids": "tokens"}, "no input_ids input", id="no-input_ids"),
    pytest.param({"extra_input": "pixel_values"}, "unknown graph input 'pixel_values'",
                 id="unknown-input"),
    pytest.param({"output": "logits"}, "no usable output", id="only-logits"),
    pytest.param({"past_heads": "num_kv_heads"}, "past_key_values.0.key: cannot tell KV heads",
                 id="symbolic-kv-heads"),
])
def test_unservable_graphs_raise_model_error(tmp_path: Path, kwargs: dict[str, object],
                                            message: str) -> None:
    path = build(tmp_path, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match=message):
        backend(path)


def test_unloadable_file_is_a_model_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a graph")
    with pytest.raises(ModelError, match="cannot load"):
        backend(str(path))


# -- warm-up and description -----------------------------------------------------------


def test_warmup_and_describe(tmp_path: Path) -> None:
    b = backend(build(tmp_path))
    b.warmup()
    info = b.describe()
    assert info["hidden_size"] == HIDDEN
    assert info["precision"] == "float32"
    assert info["output"] == "last_hidden_state"
    assert info["device"] == "cpu"
    assert info["providers"][0] == "CPUExecutionProvider"


def test_symbolic_hidden_dim_falls_back_to_the_spec(tmp_path: Path) -> None:
    b = backend(build(tmp_path, hidden_dim="hidden"), hidden_size=HIDDEN)
    assert b.describe()["hidden_size"] == HIDDEN
    b.warmup()


def test_float16_output(tmp_path: Path) -> None:
    b = backend(build(tmp_path, fp16=True), "mean")
    assert b.describe()["precision"] == "float16"
    b.warmup()
    # fp16 holds ~11 significant bits: relative error up to 2**-11 per value.
    np.testing.assert_allclose(embed(b, TEXTS), pooled(TEXTS, "mean"), rtol=2e-3, atol=2e-3)


# -- right_pad ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_right_pad(dtype: type) -> None:
    ids = np.array([1, 2, 3, 4, 5, 6], dtype=np.int32)
    lengths = np.array([3, 1, 2], dtype=np.int32)
    padded, mask = right_pad(ids, lengths, pad_id=9, dtype=dtype)
    np.testing.assert_array_equal(padded, np.array([[1, 2, 3], [4, 9, 9], [5, 6, 9]]))
    np.testing.assert_array_equal(mask, np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert padded.dtype == dtype and mask.dtype == dtype
