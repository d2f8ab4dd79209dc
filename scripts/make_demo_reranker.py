"""Build the bundled demo reranker (server/models/demo-reranker) and its reference outputs.

    pip install ".[export]" && python scripts/make_demo_reranker.py

`embedrpc serve --model demo --model demo-reranker` then serves both demos from one
process. What this makes, all from fixed seeds, so a rerun gives the same files:

* a byte-level BPE tokenizer trained as the demo embedding model's is
  (scripts/make_demo_model.py: its corpus, Qwen's split regex and added tokens), plus the
  lines "yes" and "no", so that both are vocabulary entries (the model card reads the
  logits of those two tokens; the demo's own tokenizer has neither). Its post-processor
  is the base Qwen3 tokenizer's (it appends nothing), as Qwen3-Reranker publishes it;
  tokenizer_config.json is Qwen's, field by field, with this tokenizer's ids;
* transformers' own Qwen3ForCausalLM, randomly initialised with the demo's shape (hidden
  128, 2 layers, 4 heads / 2 KV heads, MLP 256), its LM head tied to the token
  embeddings as Qwen3-Reranker-0.6B's is; the "yes" and "no" rows are pushed apart along
  a seeded direction (YES_NO_SPREAD) so that scores spread over (0, 1); saved in
  bfloat16 as the published checkpoint is, with config.json holding Qwen3-Reranker-0.6B's
  keys (tests/qwen3_fixtures.reranker_config; max_position_embeddings 8192, the card's
  max_length, so the graph's rotary tables stay small);
* `embedrpc prepare --task rerank --precision fp32` of that checkpoint, validated against
  transformers by prepare itself: the graph ending in the card's score. The bundle is
  the prepared directory (model.onnx, tokenizer.json, tokenizer_config.json,
  config.json, embedrpc_prepared.json); the safetensors weights stay behind;
* tests/data/demo_reranker_reference.json: the model card's procedure with transformers
  on the checkpoint (scripts/make_reranker_fixture.card_reference, independent of the
  server's code), for the same cases as the Qwen-tokenizer fixture.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import make_demo_model as demo  # noqa: E402
import make_reranker_fixture as card  # noqa: E402

from tests import qwen3_fixtures as fx  # noqa: E402

OUT = ROOT / "server" / "models" / "demo-reranker"
REFERENCE = ROOT / "tests" / "data" / "demo_reranker_reference.json"
SEED = 20250606
# The demo embedding model's shape. Positions: the card's max_length (Qwen3-Reranker-0.6B
# has 40960, whose rotary tables alone would triple the graph's size); the served
# max_length is the card's 8192 either way.
SHAPE = fx.Shape(hidden_size=128, layers=2, heads=4, kv_heads=2, head_dim=32,
                 intermediate_size=256, max_position_embeddings=8192)
INITIALIZER_RANGE = 0.15  # the demo's: with 0.02 every pair gets nearly the same state
YES_NO_SPREAD = 0.1  # per element of the seeded direction added to "yes", taken from "no"
# What the prepared directory holds: the bundle.
BUNDLE = ("model.onnx", "tokenizer.json", "tokenizer_config.json", "config.json",
          "embedrpc_prepared.json")


def say(message: str) -> None:
    print(f"[make_demo_reranker] {message}", flush=True)


def write_checkpoint(directory: Path, spread: float) -> dict[str, int]:
    """Tokenizer files and a bf16 Qwen3ForCausalLM checkpoint in `directory`; returns the
    ids of the tokens that matter."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    tok = demo.build_tokenizer(demo.DEFAULT_BPE_VOCAB,
                               lines=[*demo.corpus_lines(), "yes", "no"], append_eos=False)
    demo.write_tokenizer_files(tok, directory)
    ids = {t: tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "yes", "no")}
    assert all(i is not None for i in ids.values()), ids
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=SHAPE.hidden_size,
        intermediate_size=SHAPE.intermediate_size, num_hidden_layers=SHAPE.layers,
        num_attention_heads=SHAPE.heads, num_key_value_heads=SHAPE.kv_heads,
        head_dim=SHAPE.head_dim, max_position_embeddings=SHAPE.max_position_embeddings,
        rope_theta=SHAPE.rope_theta, rms_norm_eps=1e-6, initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=True, bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"], use_sliding_window=False, sliding_window=None,
        max_window_layers=SHAPE.layers, dtype="float32")
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # RMSNorm weights start at exactly 1
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        direction = torch.randn(SHAPE.hidden_size, generator=generator) * spread
        table = model.model.embed_tokens.weight
        table[ids["yes"]] += direction
        table[ids["no"]] -= direction
    model = model.to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    # transformers' own defaults, not a file of the published layout (the test fixture's
    # has none either).
    (directory / "generation_config.json").unlink(missing_ok=True)
    # config.json as Qwen3-Reranker-0.6B publishes it, field by field (transformers 5
    # writes its own names for some; both generations read these).
    demo.write_json(directory / "config.json", fx.reranker_config(
        SHAPE, bos_id=ids["<|endoftext|>"], eos_id=ids["<|im_end|>"], vocab_size=vocab))
    return ids


# The long documents' text budget: this tokenizer's small vocabulary takes more tokens
# than Qwen's; 128 leave room for the short document's pair (82 tokens) but not for the
# long query's (255), as the fixture's 48 do with Qwen's tokenizer.
LONG_CASE_BUDGET = 128


def reference_cases(checkpoint: Path) -> list[dict[str, Any]]:
    """The fixture's cases, the long documents' max_length made for this tokenizer
    (LONG_CASE_BUDGET)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    wrap = sum(len(tok.encode(s, add_special_tokens=False).ids)
               for s in (card.CARD_PREFIX, card.CARD_SUFFIX))
    cases = card.cases()
    for case in cases:
        if case["max_length"] == card.SHORT_MAX_LENGTH:
            case["max_length"] = wrap + LONG_CASE_BUDGET
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--spread", type=float, default=YES_NO_SPREAD)
    ns = parser.parse_args(argv)
    demo.quiet_libraries()
    started = time.perf_counter()
    from embedrpc.prepare import PrepareConfig, prepare

    with tempfile.TemporaryDirectory(prefix="embedrpc-demo-reranker-") as tmp:
        checkpoint = Path(tmp) / "demo-reranker-checkpoint"
        ids = write_checkpoint(checkpoint, ns.spread)
        vocab = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        say(f"checkpoint: vocab {vocab}, yes {ids['yes']}, no {ids['no']}")
        prepared = Path(tmp) / "prepared"
        info = prepare(PrepareConfig(model=str(checkpoint), out=prepared, precision="fp32",
                                     device="cpu", task="rerank"),
                       say=lambda m: say(f"prepare: {m}"))
        checks = info["validation"]
        say(f"prepare validated: {json.dumps(checks.get('fp32_vs_transformers'))}")
        reference = card.card_reference(checkpoint, reference_cases(checkpoint))
        every = [s for c in reference["cases"] for g in c["groups"] for s in g["scores"]]
        # Random weights, yet scores spread over (0, 1), not bunched near 0.5.
        assert min(every) < 0.1 and max(every) > 0.9, (min(every), max(every))
        by_name = {c["name"]: c for c in reference["cases"]}
        assert by_name["exact_limit"]["groups"][0]["truncated"] == [False, True, False]
        long_cut = [c for g in by_name["long_documents"]["groups"] for c in g["truncated"]]
        assert long_cut == [True, True, False, True, True, True], long_cut
        # The bundle: the prepared directory, its record naming where it came from.
        info["source"] = "demo-reranker (scripts/make_demo_reranker.py)"
        (prepared / "embedrpc_prepared.json").write_text(json.dumps(info, indent=2) + "\n",
                                                        encoding="utf-8")
        files = sorted(p.name for p in prepared.iterdir())
        assert files == sorted(BUNDLE), files
        if ns.out.exists():  # only what this script writes is replaced
            for name in BUNDLE:
                (ns.out / name).unlink(missing_ok=True)
        ns.out.mkdir(parents=True, exist_ok=True)
        for name in BUNDLE:
            shutil.copy2(prepared / name, ns.out / name)
    out = {"model": "demo-reranker",
           "checkpoint": {"seed": SEED, "yes_no_spread": ns.spread,
                          "initializer_range": INITIALIZER_RANGE, **SHAPE.__dict__,
                          "made_by": "transformers Qwen3ForCausalLM, bfloat16"},
           **reference}
    ns.reference.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n",
                            encoding="utf-8")
    size = sum(p.stat().st_size for p in ns.out.iterdir())
    say(f"wrote {ns.out} ({size:,} bytes) and {ns.reference} ({len(every)} pairs, scores "
        f"{min(every):.3f}..{max(every):.3f}) in {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
