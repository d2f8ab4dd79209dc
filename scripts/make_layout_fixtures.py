"""Make the model layouts users really have, and sentence-transformers references for them.

    pip install ".[export,test]"
    python scripts/make_layout_fixtures.py --optimum-cli /path/to/venv/bin/optimum-cli

Writes, from tests/data/tiny_qwen3 (a checkpoint with the published Qwen3-Embedding
metadata, made by scripts/make_prepare_fixture.py), whose reference is
tests/data/tiny_qwen3_reference.json:

* tests/data/layouts/optimum/: what `optimum-cli export onnx --task feature-extraction`
  writes for it, unchanged. optimum detects the sentence-transformers model and exports
  its whole pipeline: outputs `token_embeddings` and the pooled, normalised
  `sentence_embedding`; the directory has no sentence-transformers files. optimum-onnx
  pins transformers < 4.58, so it runs from its own virtualenv (--optimum-cli);
* tests/data/layouts/onnx_community/: the generation-style layout of
  onnx-community/Qwen3-Embedding-0.6B-ONNX (the graph under onnx/, inputs input_ids,
  attention_mask, position_ids and past_key_values.N.key/value, outputs last_hidden_state
  and present.N.*, tokenizer files saved by transformers with left padding, no
  sentence-transformers files), exported here with torch from the same weights;

and, for checkpoints too large to commit that the tests write themselves
(tests/qwen3_fixtures.py: weights from a seed, metadata as published), the vectors
sentence-transformers computes for them:

* tests/data/qwen3_realtok_reference.json: Qwen's real 151,669-token tokenizer;
* tests/data/qwen3_4b_shape_reference.{json,npy}, qwen3_8b_shape_reference.{json,npy}:
  the 4B and 8B shapes (hidden 2560 / 4096, 32 query heads, 8 KV heads, head_dim 128),
  one layer, the demo's vocabulary.

Each layout is checked here against the reference with onnxruntime before it is kept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
import make_demo_model as demo  # noqa: E402

from tests import qwen3_fixtures as fx  # noqa: E402

DATA = ROOT / "tests" / "data"
SOURCE = DATA / "tiny_qwen3"
LAYOUTS = DATA / "layouts"


def say(message: str) -> None:
    print(f"[make_layout_fixtures] {message}", flush=True)


# --------------------------------------------------------------------------- layouts


def optimum_layout(optimum_cli: str, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([optimum_cli, "export", "onnx", "--model", str(SOURCE), "--task",
                        "feature-extraction", tmp], check=True)
        shutil.copytree(tmp, out)


def onnx_community_layout(out: Path) -> None:
    """Export with past_key_values inputs (fed empty when embedding), as onnx-community's
    Qwen3-Embedding-0.6B-ONNX has them, with the TorchScript exporter."""
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    model = AutoModel.from_pretrained(str(SOURCE), dtype=torch.float32).eval()
    cfg = model.config
    layers, kv, head_dim = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim

    class WithPast(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                    *past: Any) -> tuple[Any, ...]:
            cache = DynamicCache(config=cfg)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:layers]:
                present += [layer.keys, layer.values]
            return (out.last_hidden_state, *present)

    past_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    present_names = [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {0: "batch_size", 1: "sequence_length"},
        "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
    }
    axes |= {n: {0: "batch_size", 2: "past_sequence_length"} for n in past_names}
    axes |= {n: {0: "batch_size", 2: "total_sequence_length"} for n in present_names}
    # Traced with a non-empty past and padding, so nothing specialises on either.
    batch, seq, past_len = 2, 5, 3
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    mask = torch.ones(batch, past_len + seq, dtype=torch.long)
    mask[1, -2:] = 0
    positions = torch.arange(past_len, past_len + seq).expand(batch, seq)
    past = [torch.randn(batch, kv, past_len, head_dim) for _ in past_names]
    shutil.rmtree(out, ignore_errors=True)
    (out / "onnx").mkdir(parents=True)
    with torch.no_grad():
        torch.onnx.export(WithPast(model).eval(), (ids, mask, positions, *past),
                          str(out / "onnx" / "model.onnx"),
                          input_names=["input_ids", "attention_mask", "position_ids",
                                       *past_names],
                          output_names=["last_hidden_state", *present_names],
                          dynamic_axes=axes, opset_version=18, dynamo=False)
    demo.tidy_onnx(out / "onnx" / "model.onnx")
    shutil.copy2(SOURCE / "config.json", out / "config.json")
    AutoTokenizer.from_pretrained(str(SOURCE), padding_side="left").save_pretrained(str(out))


def check_layout(directory: Path, onnx_path: Path, reference: dict[str, Any]) -> float:
    """Each reference text alone through the graph as a user would run it: min cosine."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    worst = 1.0
    for case in reference["cases"]:
        if case["dimensions"] or not case["normalize"]:
            continue
        for ids, want in zip(case["token_ids"], case["embeddings"], strict=True):
            row = np.array([ids], dtype=np.int64)
            feeds = {"input_ids": row, "attention_mask": np.ones_like(row)}
            if "position_ids" in inputs:
                feeds["position_ids"] = np.arange(row.shape[1], dtype=np.int64)[None]
            for name, arg in inputs.items():
                if name.startswith("past_key_values"):
                    feeds[name] = np.zeros((1, arg.shape[1], 0, arg.shape[3]), np.float32)
            if "sentence_embedding" in outputs:
                got = session.run(["sentence_embedding"], feeds)[0][0]
            else:
                got = session.run(["last_hidden_state"], feeds)[0][0, -1]
            got = got / np.linalg.norm(got)
            worst = min(worst, float(got @ np.asarray(want)))
    assert worst >= 0.99999, (directory, worst)
    return worst


# --------------------------------------------------------------------------- references


def big_shape_cases() -> list[demo.Case]:
    """Fewer texts for the wide shapes (their vectors are 2560 and 4096 floats)."""
    by_name = {c.name: c for c in demo.reference_cases()}
    return [by_name["documents"], by_name["queries"],
            demo.Case("multilingual", by_name["multilingual"].inputs[:3]),
            by_name["long"], demo.Case("edge", by_name["edge"].inputs[:3])]


def reference_for(name: str, cases: list[demo.Case]) -> tuple[dict[str, Any], np.ndarray]:
    """sentence-transformers' vectors for checkpoint `name` (written to a temp dir)."""
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    with tempfile.TemporaryDirectory() as tmp:
        directory = fx.write_checkpoint(Path(tmp) / name, name)
        st = SentenceTransformer(str(directory), device="cpu",
                                 model_kwargs={"dtype": torch.float32})
        assert st.max_seq_length == fx.MAX_SEQ_LENGTH, st.max_seq_length
        eos = st.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert st.tokenizer.eos_token == "<|im_end|>"  # as published
        rows, out_cases = [], []
        for case in cases:
            features = st.preprocess(case.inputs, prompt=case.prompt() or None)
            ids = [[int(i) for i, m in zip(r, k, strict=True) if m] for r, k in
                   zip(features["input_ids"].tolist(), features["attention_mask"].tolist(),
                       strict=True)]
            assert all(r[-1] == eos and len(r) <= fx.MAX_SEQ_LENGTH for r in ids), case.name
            vectors = np.asarray(case.st_encode(st), dtype=np.float32)
            assert np.isfinite(vectors).all(), case.name
            rows.append(vectors)
            out_cases.append({"name": case.name, "inputs": case.inputs,
                              "prompt_name": case.prompt_name, "instruction": case.instruction,
                              "dimensions": case.dimensions, "normalize": case.normalize,
                              "token_ids": ids})
        vectors = np.concatenate(rows)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        off = (unit @ unit.T)[~np.eye(len(unit), dtype=bool)]
        say(f"  {name}: {len(vectors)} vectors, pairwise cosine {off.min():.3f} .. "
            f"{off.max():.3f}")
        reference = {
            "model": name, "checkpoint": fx.describe(name), "max_length": fx.MAX_SEQ_LENGTH,
            "dimensions": fx.SHAPES[name].hidden_size,
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "sentence_transformers": sentence_transformers.__version__},
            "cases": out_cases,
        }
    return reference, vectors


def write_reference(name: str, cases: list[demo.Case], binary: bool) -> None:
    reference, vectors = reference_for(name, cases)
    stem = "qwen3_realtok_reference" if name == "realtok" else f"qwen3_{name}_shape_reference"
    if binary:
        reference["embeddings_file"] = f"{stem}.npy"
        np.save(DATA / f"{stem}.npy", vectors.astype("<f4"))
    else:
        start = 0
        for case in reference["cases"]:
            n = len(case["inputs"])
            case["embeddings"] = [[float(x) for x in row] for row in vectors[start:start + n]]
            start += n
    (DATA / f"{stem}.json").write_text(json.dumps(reference, ensure_ascii=False, indent=1)
                                       + "\n", encoding="utf-8")
    say(f"  wrote {stem}.json{' + .npy' if binary else ''}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--optimum-cli", help="optimum-cli of a venv with optimum-onnx "
                        "(without it the optimum layout is left as it is)")
    parser.add_argument("--only", choices=("layouts", "references"), default=None)
    ns = parser.parse_args(argv)
    demo.quiet_libraries()
    reference = json.loads((DATA / "tiny_qwen3_reference.json").read_text(encoding="utf-8"))
    if ns.only in (None, "layouts"):
        if ns.optimum_cli:
            say("optimum export (feature-extraction)")
            optimum_layout(ns.optimum_cli, LAYOUTS / "optimum")
        say("onnx-community layout (past_key_values inputs)")
        onnx_community_layout(LAYOUTS / "onnx_community")
        for layout, graph in (("optimum", "model.onnx"), ("onnx_community", "onnx/model.onnx")):
            if (LAYOUTS / layout / graph).is_file():
                cos = check_layout(LAYOUTS / layout, LAYOUTS / layout / graph, reference)
                say(f"  {layout}: min cosine to sentence-transformers {cos:.7f}")
    if ns.only in (None, "references"):
        say("references (sentence-transformers)")
        write_reference("realtok", demo.reference_cases(), binary=False)
        for name in ("4b", "8b"):
            write_reference(name, big_shape_cases(), binary=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
