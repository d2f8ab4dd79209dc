"""Reading model directories: what is found where, and clear errors for what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedrpc.server.devices import resolve_devices
from embedrpc.server.errors import ModelError
from embedrpc.server.model import DEMO_DIR, load_model_spec, resolve_model_path

from .helpers import write_model_dir


def _pooling(model: Path, **modes: bool) -> None:
    (model / "1_Pooling").mkdir(exist_ok=True)
    (model / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, **{f"pooling_mode_{k}": v for k, v in modes.items()}}))


def test_demo_resolves_to_the_bundled_model() -> None:
    assert resolve_model_path("demo") == ("demo", DEMO_DIR)


def test_missing_files_are_named(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    (model / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match=r"missing tokenizer\.json"):
        load_model_spec(str(model))


def test_onnx_location(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    (model / "model.onnx").unlink()
    (model / "onnx").mkdir()
    (model / "onnx" / "model_fp16.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"no model\.onnx.*onnx/model_fp16\.onnx.*--onnx-file"):
        load_model_spec(str(model))
    spec = load_model_spec(str(model), onnx_file="model_fp16.onnx")
    assert spec.onnx_path == model / "onnx" / "model_fp16.onnx"
    (model / "onnx" / "model.onnx").write_bytes(b"")
    assert load_model_spec(str(model)).onnx_path == model / "onnx" / "model.onnx"


def test_not_a_directory_and_not_an_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such directory"):
        load_model_spec(str(tmp_path / "missing" / "deeper" / "x"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelError, match="is a file"):
        load_model_spec(str(tmp_path / "file"))


def test_hub_id_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Hugging Face"):
        load_model_spec("nobody-here/no-such-model-xyz")


def test_max_length_sources_in_sentence_transformers_order(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m", max_length=100)  # tokenizer_config
    assert load_model_spec(str(model)).max_length == 100
    (model / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 77}))
    assert load_model_spec(str(model)).max_length == 77
    assert load_model_spec(str(model), max_length=20).max_length == 20
    (model / "sentence_bert_config.json").unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1e30}))
    # No usable tokenizer limit: config.json's 40960, capped at 8192.
    assert load_model_spec(str(model)).max_length == 8192


@pytest.mark.parametrize(("modes", "expected"), [
    ({"lasttoken": True}, "lasttoken"),
    ({"mean_tokens": True, "cls_token": False}, "mean"),
    ({"cls_token": True}, "cls"),
])
def test_pooling_modes(tmp_path: Path, modes: dict[str, bool], expected: str) -> None:
    model = write_model_dir(tmp_path / "m")
    _pooling(model, **modes)
    assert load_model_spec(str(model)).pooling == expected


@pytest.mark.parametrize("modes", [{}, {"max_tokens": True}, {"cls_token": True,
                                                               "mean_tokens": True}])
def test_unsupported_pooling_is_refused(tmp_path: Path, modes: dict[str, bool]) -> None:
    model = write_model_dir(tmp_path / "m")
    _pooling(model, **modes)
    with pytest.raises(ModelError, match="exactly one of"):
        load_model_spec(str(model))


def test_normalize_module_from_modules_json(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    _pooling(model, lasttoken=True)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    (model / "modules.json").write_text(json.dumps(modules))
    assert load_model_spec(str(model)).normalize is False
    modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize"})
    (model / "modules.json").write_text(json.dumps(modules))
    assert load_model_spec(str(model)).normalize is True


def test_bad_prompts_are_refused(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    (model / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {"q": 1}}))
    with pytest.raises(ModelError, match="prompts"):
        load_model_spec(str(model))


@pytest.mark.parametrize(("device", "expected"), [
    ("cpu", ["cpu"]), ("CPU", ["cpu"]), ("cuda:0", ["cuda:0"]), ("cuda:1,0", ["cuda:1", "cuda:0"]),
])
def test_device_lists(device: str, expected: list[str]) -> None:
    assert resolve_devices(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:a", "cuda:0,0", "cuda:-1"])
def test_bad_devices(device: str) -> None:
    with pytest.raises(ModelError, match="--device"):
        resolve_devices(device)


def test_auto_device_falls_back_to_cpu_without_gpu() -> None:
    from embedrpc.server.devices import cuda_device_count

    if cuda_device_count():
        pytest.skip("this machine has a GPU")
    assert resolve_devices("auto") == ["cpu"]
    with pytest.raises(ModelError, match="no GPU"):
        resolve_devices("cuda")


def test_qwen3_export_without_sentence_transformers_files_gets_qwen3_prompts(
        tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    (model / "config_sentence_transformers.json").unlink()
    assert load_model_spec(str(model)).prompts == {}
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "model_type": "qwen3"}))
    spec = load_model_spec(str(model))
    # The prompt published with Qwen3-Embedding (config_sentence_transformers.json).
    assert spec.prompts["query"] == ("Instruct: Given a web search query, retrieve relevant "
                                     "passages that answer the query\nQuery:")
    assert spec.pooling == "lasttoken" and spec.normalize
