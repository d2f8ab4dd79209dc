"""`embedrpc prepare`: the built graph computes the model, in every precision, and
validation refuses what it must.

The source is tests/data/tiny_qwen3 (bf16 safetensors, heads × head_dim ≠ hidden,
grouped KV heads; made by scripts/make_prepare_fixture.py), and the independent
reference is tests/data/tiny_qwen3_reference.json: sentence-transformers' vectors
(float32 from the bf16 weights) and transformers' raw last-token states.
Tolerances, per vector: float32 graph cosine >= 0.9999 and max abs <= 1e-5 (measured:
3e-7); fp16 cosine >= 0.999; bf16 and int8 as validation demands (0.999, 0.99);
batch invariance 1e-5.
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

from embedrpc.cli import main
from embedrpc.client import EmbedClient
from embedrpc.prepare import PrepareConfig, PrepareError, prepare
from embedrpc.prepare import pipeline as pipeline_module
from embedrpc.prepare import validate as validate_module
from embedrpc.prepare.builder import GraphOptions, build_graph
from embedrpc.prepare.checkpoint import (
    SafetensorsFile,
    Weights,
    bf16_to_float32,
    float32_to_bf16,
    read_config,
    write_safetensors,
)
from embedrpc.server.errors import ModelError

from .helpers import (
    TINY_CASES,
    TINY_REFERENCE,
    TINY_SOURCE,
    cosines,
    running_server,
    unit_reference,
)

FP32_COSINE, FP32_MAX_ABS, BATCH_INVARIANCE = 0.9999, 1e-5, 1e-5
# --precision as Info reports it (the proto: "float32", "float16", ...).
INFO_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8"}
LAYERS = 2


def _prepare(tmp: Path, precision: str, source: Path = TINY_SOURCE, **kwargs: Any) -> Path:
    out = tmp / f"prepared-{precision}"
    prepare(PrepareConfig(model=str(source), out=out, precision=precision, device="cpu",
                          reference=False, **kwargs), say=lambda _: None)
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("prepared")
    return {p: _prepare(tmp, p) for p in ("fp32", "fp16", "bf16", "int8")}


def _run(directory: Path, rows: list[list[int]]) -> np.ndarray:
    """All rows in one right-padded batch."""
    session = ort.InferenceSession(str(directory / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    (out,) = session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})
    assert out.dtype == np.float32 and out.shape == (len(rows), TINY_REFERENCE["dimensions"])
    return out.astype(np.float64)


def _all_cases(directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every reference text in one mixed-length batch → (got, want) as flat rows of the
    per-case results: Matryoshka cases cut to their size and renormalised, then both
    sides padded with zeros to the full size (zeros change neither cosine nor difference)."""
    rows = [r for c in TINY_CASES.values() for r in c["token_ids"]]
    got = _run(directory, rows)
    gots, wants, start = [], [], 0
    full = TINY_REFERENCE["dimensions"]
    for case in TINY_CASES.values():
        part = got[start:start + len(case["inputs"])]
        start += len(case["inputs"])
        if case["dimensions"]:
            part = part[:, :case["dimensions"]]
            part = part / np.linalg.norm(part, axis=1, keepdims=True)
        want = unit_reference(case)
        gots.append(np.pad(part, ((0, 0), (0, full - part.shape[1]))))
        wants.append(np.pad(want, ((0, 0), (0, full - want.shape[1]))))
    return np.concatenate(gots), np.concatenate(wants)


def _info(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "embedrpc_prepared.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------ safetensors


def test_bf16_conversion_follows_the_format(tmp_path: Path) -> None:
    # bf16 is the top half of a float32; rounding is to nearest, ties to even.
    values = np.array([1.0, -2.5, 1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, 1e-40], dtype=np.float32)
    bits = float32_to_bf16(values)
    assert bits.tolist() == [0x3F80, 0xC020, 0x3F80, 0x3F82, 0x7F62, 0x0001]
    assert bf16_to_float32(bits)[:4].tolist() == [1.0, -2.5, 1.0, 1 + 4 * 2**-8]
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3) / 4, "b": values[:4]}
    for dtype in ("F32", "F16", "BF16"):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, tensors, dtype)
        f = SafetensorsFile(path)
        assert f.dtype_name("a") == dtype
        np.testing.assert_array_equal(f.get("a"), tensors["a"])  # exact in all three
        assert f.get("b").shape == (4,)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sharded_checkpoint_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               precision: str) -> None:
    # Two shards named by model.safetensors.index.json, `model.` prefixes (as
    # Qwen3ForCausalLM saves them) and an lm_head that is not used; the graph's weights
    # go to model.onnx_data (forced here; real models pass 1 GiB).
    sharded = tmp_path / "sharded"
    shutil.copytree(TINY_SOURCE, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    f = SafetensorsFile(TINY_SOURCE / "model.safetensors")
    names = f.names()
    half = len(names) // 2
    weight_map = {}
    for shard, part in (("a.safetensors", names[:half]), ("b.safetensors", names[half:])):
        write_safetensors(sharded / shard, {f"model.{n}": f.get(n) for n in part}, "BF16")
        weight_map.update({f"model.{n}": shard for n in part})
    write_safetensors(sharded / "c.safetensors", {"lm_head.weight": np.zeros((2, 2))})
    weight_map["lm_head.weight"] = "c.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    monkeypatch.setattr(pipeline_module, "EXTERNAL_DATA_BYTES", 0)
    out = _prepare(tmp_path, precision, sharded)
    assert (out / "model.onnx_data").stat().st_size > (out / "model.onnx").stat().st_size
    assert _info(out)["graph"]["external_data"] is True
    assert not (out / "model.safetensors.index.json").exists()
    assert [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == [
        "sentence_embedding"]
    got, want = _all_cases(out)
    assert cosines(got, want).min() >= (FP32_COSINE if precision == "fp32" else 0.999)


# ------------------------------------------------------------------ float32 graph


def test_fp32_graph_matches_transformers(prepared: dict[str, Path]) -> None:
    got, want = _all_cases(prepared["fp32"])
    cos = cosines(got, want)
    assert cos.min() >= FP32_COSINE, cos.min()
    assert np.abs(got - want).max() <= FP32_MAX_ABS, np.abs(got - want).max()


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_vectors_do_not_depend_on_padding_or_batch_mates(prepared: dict[str, Path],
                                                         precision: str) -> None:
    rows = [r for name in ("documents", "multilingual", "long", "edge")
            for r in TINY_CASES[name]["token_ids"]]
    assert len({len(r) for r in rows}) > 5
    together = _run(prepared[precision], rows)
    alone = np.concatenate([_run(prepared[precision], [r]) for r in rows])
    reversed_ = _run(prepared[precision], rows[::-1])[::-1]
    assert np.abs(together - alone).max() <= BATCH_INVARIANCE
    assert np.abs(reversed_ - alone).max() <= BATCH_INVARIANCE


def test_graph_is_fused_and_self_contained(prepared: dict[str, Path]) -> None:
    directory = prepared["fp32"]
    model = onnx.load(str(directory / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GroupQueryAttention") == LAYERS
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * LAYERS
    # input norm of layer 0 and the per-head q/k norms
    assert ops.count("SimplifiedLayerNormalization") == 1 + 2 * LAYERS
    assert "Softmax" not in ops and "Pow" not in ops  # nothing left unfused
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    (output,) = model.graph.output
    assert output.name == "sentence_embedding"
    assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # A model directory: tokenizer and sentence-transformers files, no checkpoint weights.
    names = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "modules.json",
            "1_Pooling/config.json", "config_sentence_transformers.json",
            "embedrpc_prepared.json", "model.onnx"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    assert not any(p.name.startswith(".") for p in directory.parent.iterdir())  # no staging
    info = _info(directory)
    assert info["precision"] == "fp32" and info["pooling"] == "lasttoken"
    assert info["validation"]["batch_invariance_max_abs"] <= BATCH_INVARIANCE
    assert info["graph"]["ops"]["com.microsoft.GroupQueryAttention"] == LAYERS


def _poison_padding(model: onnx.ModelProto, value: float) -> str:
    """Set the final hidden states at padded positions to `value` before pooling reads
    them, as an attention kernel that leaves padded query rows unspecified may. Returns
    the poisoned tensor's name (also made a graph output, to show the poison is there)."""
    h, tp = onnx.helper, onnx.TensorProto
    nodes = list(model.graph.node)
    at = next(i for i, n in enumerate(nodes) if n.name.startswith("final_norm"))
    final = nodes[at].output[0]
    for node in nodes[at + 1:]:
        for k, name in enumerate(node.input):
            if name == final:
                node.input[k] = "poisoned"
    model.graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([-1], np.int64), "poison_axis"),
        onnx.numpy_helper.from_array(np.array(value, np.float32), "poison_value")])
    poison = [h.make_node("Cast", ["attention_mask"], ["poison_real"], to=tp.BOOL),
              h.make_node("Unsqueeze", ["poison_real", "poison_axis"], ["poison_real3"]),
              h.make_node("Where", ["poison_real3", final, "poison_value"], ["poisoned"])]
    del model.graph.node[:]
    model.graph.node.extend(nodes[:at + 1] + poison + nodes[at + 1:])
    model.graph.output.append(h.make_tensor_value_info("poisoned", tp.FLOAT, None))
    return "poisoned"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_mean_pooling_ignores_non_finite_padding(value: float) -> None:
    # Mean pooling selects the real tokens (Where) instead of multiplying by the mask: NaN
    # or inf at a padded position times 0 would be NaN for the whole row. Reference: the
    # same graph on each text alone, where there is no padding (BATCH_INVARIANCE).
    model = build_graph(read_config(TINY_SOURCE), Weights(TINY_SOURCE),
                        GraphOptions(pooling="mean"))
    pool_node = next(n for n in model.graph.node if n.name.startswith("pool_mask"))
    assert pool_node.op_type == "Where"
    clean = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    poisoned_name = _poison_padding(model, value)
    poisoned = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    rows = [r for name in ("documents", "multilingual", "long")
            for r in TINY_CASES[name]["token_ids"]]
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    got, states = poisoned.run(["sentence_embedding", poisoned_name],
                               {"input_ids": ids, "attention_mask": mask})
    assert (mask == 0).any() and not np.isfinite(states[mask == 0]).any()  # poison in place
    alone = np.concatenate([clean.run(["sentence_embedding"], {
        "input_ids": np.array([r], np.int64), "attention_mask": np.ones((1, len(r)), np.int64)
    })[0] for r in rows])
    assert np.isfinite(got).all()
    assert np.abs(got - alone).max() <= BATCH_INVARIANCE


def test_prepare_on_cuda_says_where_the_float32_reference_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA branch of the pipeline, with its sessions made on the CPU (no GPU here):
    # the float32 reference's attention has no CUDA kernel, and prepare says so.
    class CpuRunner(validate_module.Runner):
        def __init__(self, path: Path, device: str, threads: int = 0) -> None:
            assert device == "cuda:0"
            super().__init__(path, "cpu", threads)

    monkeypatch.setattr(validate_module, "Runner", CpuRunner)
    said: list[str] = []
    info = prepare(PrepareConfig(model=str(TINY_SOURCE), out=tmp_path / "out", precision="fp16",
                                 device="cuda:0", reference=False), say=said.append)
    where = info["validation"]["reference_device"]
    assert where.startswith("cuda:0") and "GroupQueryAttention" in where and "CPU" in where
    assert any(line.strip() == f"the float32 reference runs on {where}" for line in said)
    assert info["validation"]["method"] == "fp16 graph on cuda:0"
    assert validate_module.reference_placement("cpu") == "cpu"
    fp32 = prepare(PrepareConfig(model=str(TINY_SOURCE), out=tmp_path / "fp32", precision="fp32",
                                 device="cuda:0", reference=False), say=said.append)
    assert fp32["validation"]["reference_device"] == where
    assert any("prepare fp16 or bf16 to serve on a GPU" in line for line in said)


# ------------------------------------------------------------------ other precisions


def _initializer_types(directory: Path) -> dict[str, int]:
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    return {t.name: t.data_type for t in model.graph.initializer}


def test_fp16_keeps_norms_in_float32_and_runs_on_cpu(prepared: dict[str, Path]) -> None:
    directory = prepared["fp16"]
    types = _initializer_types(directory)
    tp = onnx.TensorProto
    assert types["layers.0.qkv_proj"] == types["layers.1.down_proj"] == tp.FLOAT16
    assert types["embed_tokens"] == tp.FLOAT16
    assert types["layers.0.input_layernorm"] == types["norm"] == tp.FLOAT
    info = _info(directory)
    assert info["validation"]["vs_fp32"]["min_cosine"] >= 0.999
    assert info["validation"]["method"] == "fp16 graph on cpu + fp16 emulated in float32 on cpu"
    got, want = _all_cases(directory)
    assert cosines(got, want).min() >= 0.999


def test_bf16_is_built_and_validated_by_emulation(prepared: dict[str, Path]) -> None:
    directory = prepared["bf16"]
    types = _initializer_types(directory)
    assert types["layers.0.gate_up_proj"] == onnx.TensorProto.BFLOAT16
    assert types["norm"] == onnx.TensorProto.FLOAT
    info = _info(directory)
    assert info["validation"]["method"] == "bf16 emulated in float32 on cpu"
    assert info["validation"]["vs_fp32"]["min_cosine"] >= 0.999


def test_bf16_is_refused_on_the_cpu_with_what_to_do_instead(
        prepared: dict[str, Path], tmp_path: Path) -> None:
    # ONNX Runtime's CPU provider has no bf16 MatMul: serving the graph there would fail
    # with "Could not find an implementation for MatMul(13)"; say why and what works.
    with pytest.raises(ModelError, match=r"a bf16 prepared graph runs on a GPU only .*"
                       r"prepare --precision fp32 \(exact\) or int8 \(fastest\)"), \
            running_server(model=str(prepared["bf16"]), workers=1):
        pass
    # A checkpoint served with --precision bf16 on the CPU is refused before preparing.
    with pytest.raises(ModelError, match=r"--precision bf16 runs on a GPU only"), \
            running_server(model=str(TINY_SOURCE), precision="bf16", workers=1,
                           cache_dir=str(tmp_path / "cache")):
        pass
    assert not (tmp_path / "cache").exists()


def test_int8_passes_validation(prepared: dict[str, Path]) -> None:
    directory = prepared["int8"]
    ops = [n.op_type for n in onnx.load(str(directory / "model.onnx")).graph.node]
    assert ops.count("MatMulInteger") == 4 * LAYERS and "MatMul" not in ops
    types = _initializer_types(directory)
    assert types["layers.0.qkv_proj"] == onnx.TensorProto.INT8
    assert types["layers.0.qkv_proj.scale"] == types["embed_tokens"] == onnx.TensorProto.FLOAT
    assert _info(directory)["validation"]["vs_fp32"]["min_cosine"] >= 0.99
    got, want = _all_cases(directory)
    assert cosines(got, want).min() >= 0.99


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_served_end_to_end(prepared: dict[str, Path], precision: str) -> None:
    directory = prepared[precision]
    direct, _ = _all_cases(directory)
    with running_server(model=str(directory), workers=1) as (_, target), \
            EmbedClient(target, timeout=60) as client:
        info = client.info()
        assert info.dimensions == TINY_REFERENCE["dimensions"]
        assert info.precision == INFO_NAMES[precision]  # the proto's names
        served = []
        for case in TINY_CASES.values():
            got = client.embed(case["inputs"], prompt_name=case["prompt_name"],
                               instruction=case["instruction"], dimensions=case["dimensions"])
            assert [list(i.ids) for i in client.tokenize(
                case["inputs"], prompt_name=case["prompt_name"],
                instruction=case["instruction"]).inputs] == case["token_ids"]
            served.append(np.pad(got, ((0, 0), (0, TINY_REFERENCE["dimensions"] - got.shape[1]))))
    served_all = np.concatenate(served).astype(np.float64)
    # The server gives what the graph gives, though its batches differ (int8 too: its
    # activation scales are per token).
    assert np.abs(served_all - direct).max() <= BATCH_INVARIANCE
    _, want = _all_cases(directory)
    assert cosines(served_all, want).min() >= (FP32_COSINE if precision == "fp32" else 0.99)


# ------------------------------------------------------------------ refusals


def _variant(tmp: Path, tensor: str, factor: float) -> Path:
    """A copy of the source with one tensor scaled."""
    target = tmp / f"variant-{tensor}"
    shutil.copytree(TINY_SOURCE, target)
    f = SafetensorsFile(TINY_SOURCE / "model.safetensors")
    tensors = {n: f.get(n) for n in f.names()}
    tensors[tensor] = tensors[tensor] * factor
    write_safetensors(target / "model.safetensors", tensors, "F32")
    return target


def test_fp16_range_scaling_rescues_large_activations(tmp_path: Path) -> None:
    # up_proj × 4096 pushes layer 0's MLP values past 65504 (fp16's largest).
    hot = _variant(tmp_path, "layers.0.mlp.up_proj.weight", 4096.0)
    with pytest.raises(PrepareError, match="non-finite"):
        _prepare(tmp_path / "unguarded", "fp16", hot, fp16_guard=False)
    assert not (tmp_path / "unguarded" / "prepared-fp16").exists()
    info = _info(_prepare(tmp_path, "fp16", hot))
    assert info["validation"]["activation_absmax"]["mlp"] > 65504
    assert set(info["fp16_scales"]) == {"0"}
    attention_divisor, mlp_divisor = info["fp16_scales"]["0"]
    assert attention_divisor == 1.0 and mlp_divisor >= 16 and np.log2(mlp_divisor) % 1 == 0
    assert info["validation"]["vs_fp32"]["min_cosine"] >= 0.999


def test_refuses_a_model_that_overflows_fp16(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    # Embeddings beyond fp16's range become inf in an fp16 table: nothing can save that.
    hot = _variant(tmp_path, "embed_tokens.weight", 1e6)
    out = tmp_path / "out"
    code = main(["prepare", "--model", str(hot), "--out", str(out), "--precision", "fp16",
                 "--device", "cpu", "--no-reference"])
    assert code == 1
    err = capsys.readouterr().err
    assert "validation failed, nothing written" in err and "non-finite" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [hot.name]


def test_refuses_a_graph_that_computes_something_else(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    build = pipeline_module.build_graph

    def corrupted(*args: Any, **kwargs: Any) -> Any:
        model = build(*args, **kwargs)
        if args[2].precision == "fp16":  # leave the float32 reference intact
            for tensor in model.graph.initializer:
                if tensor.name == "layers.1.o_proj":
                    values = onnx.numpy_helper.to_array(tensor)
                    tensor.CopyFrom(onnx.numpy_helper.from_array(-values, tensor.name))
        return model

    monkeypatch.setattr(pipeline_module, "build_graph", corrupted)
    with pytest.raises(PrepareError,
                       match=r"fp16 vs float32 \(fp16 graph on cpu\): cosine .* is below 0.999"):
        _prepare(tmp_path, "fp16")
    assert list(tmp_path.iterdir()) == []


def test_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="no such directory"):
        _prepare(tmp_path, "fp32", tmp_path / "missing")
    bert = tmp_path / "bert"
    shutil.copytree(TINY_SOURCE, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(PrepareError, match="builds Qwen3 models only"):
        _prepare(tmp_path, "fp32", bert)
    # A checkpoint without its tokenizer: said before anything is built, naming the
    # user's directory.
    untokenized = tmp_path / "untokenized"
    shutil.copytree(TINY_SOURCE, untokenized, ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(PrepareError, match=rf"{untokenized}: no tokenizer.json; a checkpoint "
                       "directory needs it beside config.json and the safetensors weights"):
        _prepare(tmp_path, "fp32", untokenized)
    # Weights cut short (an interrupted download): the file is named, not "cannot reshape".
    cut = tmp_path / "cut"
    shutil.copytree(TINY_SOURCE, cut)
    weights = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(weights[:100_000])
    with pytest.raises(PrepareError, match=r"model.safetensors: truncated: its header "
                       r"describes [\d,]+ bytes of tensors and the file holds [\d,]+; "
                       "download it again"):
        _prepare(tmp_path, "fp32", cut)
    with pytest.raises(PrepareError, match="int8 is for the CPU"):
        PrepareConfig(model=str(TINY_SOURCE), out=tmp_path / "x", precision="int8", device="cuda")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(PrepareError, match="use --force"):
        prepare(PrepareConfig(model=str(TINY_SOURCE), out=existing, precision="fp32", device="cpu",
                              reference=False), say=lambda _: None)
    assert (existing / "keep.txt").read_text() == "mine"


def test_cli_prints_progress_and_writes_the_directory(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["prepare", "--model", str(TINY_SOURCE), "--out", str(out), "--precision", "fp32",
                 "--device", "cpu", "--no-reference"]) == 0
    printed = capsys.readouterr().out
    assert "[prepare] building the float32 graph" in printed and f"wrote {out}" in printed
    assert _info(out)["validation"]["fp32_vs_transformers"] == "skipped: --no-reference"


def test_transformers_reference_when_installed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "with-reference"
    info = prepare(PrepareConfig(model=str(TINY_SOURCE), out=out, precision="fp32", device="cpu"),
                   say=lambda _: None)
    stats = info["validation"]["fp32_vs_transformers"]
    assert stats["min_cosine"] >= FP32_COSINE and stats["max_abs"] <= FP32_MAX_ABS


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_low_precision_on_cuda_validates_and_serves(tmp_path: Path, precision: str) -> None:
    # The real fp16/bf16 graph on the GPU (not an emulation), against float32: 0.999.
    out = tmp_path / f"{precision}-cuda"
    info = prepare(PrepareConfig(model=str(TINY_SOURCE), out=out, precision=precision,
                                 device="cuda:0", reference=False), say=lambda _: None)
    assert info["validation"]["method"] == f"{precision} graph on cuda:0"
    assert info["validation"]["vs_fp32"]["min_cosine"] >= 0.999
    _, want = _all_cases(_prepare(tmp_path, "fp32"))
    with running_server(model=str(out), device="cuda:0") as (_, target), \
            EmbedClient(target, timeout=60) as client:
        assert client.info().precision == INFO_NAMES[precision]
        served = [client.embed(c["inputs"], prompt_name=c["prompt_name"],
                               instruction=c["instruction"], dimensions=c["dimensions"])
                  for c in TINY_CASES.values()]
    got = np.concatenate([np.pad(g, ((0, 0), (0, TINY_REFERENCE["dimensions"] - g.shape[1])))
                          for g in served])
    assert cosines(got.astype(np.float64), want).min() >= 0.999
