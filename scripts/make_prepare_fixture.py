"""Make the tiny Qwen3 checkpoint and reference outputs that tests/test_prepare.py uses.

    pip install ".[export]" && python scripts/make_prepare_fixture.py

Writes, from fixed seeds:

* tests/data/tiny_qwen3/: a Hugging Face + sentence-transformers directory like the published
  Qwen3-Embedding one (config.json naming Qwen3ForCausalLM, model.safetensors in **bfloat16**
  as the published weights are, the demo model's tokenizer, prompts, last-token pooling,
  Normalize). The shape differs from the demo on purpose: heads × head_dim (4 × 32 = 128) is
  not the hidden size (96), as in Qwen3-Embedding-0.6B (16 × 128 vs 1024), and there are
  grouped key/value heads (2);
* tests/data/tiny_qwen3_reference.json: sentence-transformers' vectors for the cases of
  scripts/make_demo_model.py (documents, queries with the prompt, an instruction, Matryoshka,
  multilingual, texts past max length, edge cases) and transformers' raw last-token states,
  all computed in float32 from the bf16 weights, so `embedrpc prepare` is checked against an
  independent implementation without torch in the test environment.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_demo_model as demo

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "tiny_qwen3"
REFERENCE = ROOT / "tests" / "data" / "tiny_qwen3_reference.json"
SEED = 20250711
MAX_SEQ_LENGTH = 128
ARCH = demo.Arch(hidden_size=96, layers=2, heads=4, kv_heads=2, head_dim=32,
                 intermediate_size=128, max_position_embeddings=512)


def main() -> int:
    import sentence_transformers
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    demo.quiet_libraries()
    tokenizer_dir = demo.DEFAULT_OUT
    with tempfile.TemporaryDirectory(prefix="embedrpc-fixture-") as tmp:
        scratch = Path(tmp) / "tiny_qwen3"
        scratch.mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(tokenizer_dir / name, scratch / name)
        eos_id = json.loads((tokenizer_dir / "config.json").read_text())["eos_token_id"]
        vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
        model = demo.build_model(ARCH, vocab, eos_id, SEED)
        # Store bf16 weights, as the published checkpoints do; the reference runs in float32
        # on exactly these (bf16-representable) values.
        model = model.to(torch.bfloat16)
        demo.save_model_dir(model, scratch, MAX_SEQ_LENGTH)
        config = demo.read_json(scratch / "config.json")
        config["torch_dtype"] = "bfloat16"  # the published key (transformers 4.51)
        demo.write_json(scratch / "config.json", config)

        st = SentenceTransformer(str(scratch), device="cpu",
                                 model_kwargs={"dtype": torch.float32})
        assert st.max_seq_length == MAX_SEQ_LENGTH
        assert next(st.parameters()).dtype == torch.float32
        hf_tok = AutoTokenizer.from_pretrained(str(scratch))
        hf = AutoModel.from_pretrained(str(scratch), dtype=torch.float32).eval()
        cases = []
        for case in demo.reference_cases():
            full = [case.prompt() + t for t in case.inputs]
            ids = [list(map(int, x)) for x in
                   hf_tok(full, truncation=True, max_length=MAX_SEQ_LENGTH)["input_ids"]]
            if case.name == "raw_pooled":
                with torch.no_grad():
                    vectors = np.stack([hf(input_ids=torch.tensor([row])).last_hidden_state[0, -1]
                                        .numpy() for row in ids])
            else:
                vectors = case.st_encode(st)
            vectors = np.asarray(vectors, dtype=np.float32)
            assert np.isfinite(vectors).all(), case.name
            cases.append({"name": case.name, "inputs": case.inputs,
                          "prompt_name": case.prompt_name, "instruction": case.instruction,
                          "dimensions": case.dimensions, "normalize": case.normalize,
                          "token_ids": ids,
                          "embeddings": [[float(x) for x in row] for row in vectors]})
        reference = {
            "model": "tiny_qwen3", "dimensions": ARCH.hidden_size,
            "max_length": MAX_SEQ_LENGTH, "weights": "bfloat16, computed in float32",
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "sentence_transformers": sentence_transformers.__version__},
            "cases": cases,
        }
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for path in sorted(scratch.rglob("*")):
            rel = path.relative_to(scratch)
            if path.is_dir():
                (OUT / rel).mkdir(exist_ok=True)
            else:
                shutil.copy2(path, OUT / rel)
    REFERENCE.write_text(json.dumps(reference, ensure_ascii=False, indent=1) + "\n",
                         encoding="utf-8")
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}: {path.stat().st_size:,} bytes")
    print(f"{REFERENCE.relative_to(ROOT)}: {REFERENCE.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
