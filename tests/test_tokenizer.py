"""Prompts, truncation and the EOS guarantee, against the raw Qwen3 tokenizer.

Reference: Qwen3-Embedding pools the hidden state of `<|endoftext|>` (id 151643),
which its published tokenizer appends after truncation; queries are
`Instruct: {task}\\nQuery:{query}` (Qwen3-Embedding model card).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, processors

from embedrpc.server.errors import InvalidInput
from embedrpc.server.model import load_model_spec
from embedrpc.server.tokenizer import (
    TRUNCATE_END,
    TRUNCATE_NONE,
    TRUNCATE_START,
    TextEncoder,
)

from .conftest import QUERY_PROMPT, QWEN_EOS_ID, qwen_tokenizer_file, write_model_dir

MAX = 64
TEXTS = ["What is the capital of China?", "", "   ", "北京是中国的首都。", "مرحبا بالعالم",
         "Grüße aus München", "🚀🔥", "line\nbreak\ttab"]
LONG = " ".join(f"token{i}" for i in range(400))


@pytest.fixture(scope="module")
def raw() -> Tokenizer:
    return Tokenizer.from_file(str(qwen_tokenizer_file()))


@pytest.fixture(scope="module")
def encoder(fake_model_dir: Path) -> TextEncoder:
    return TextEncoder(load_model_spec(str(fake_model_dir)))


def test_eos_appended_when_the_tokenizer_does_not(encoder: TextEncoder, raw: Tokenizer) -> None:
    assert encoder.appends_eos and encoder.eos_id == QWEN_EOS_ID
    got = encoder.encode(TEXTS)
    for text, ids in zip(TEXTS, got.ids, strict=True):
        assert ids.tolist() == [*raw.encode(text).ids, QWEN_EOS_ID]
    assert got.truncated == [False] * len(TEXTS)


def test_truncation_keeps_eos_at_both_ends(encoder: TextEncoder, raw: Tokenizer) -> None:
    body = raw.encode(LONG).ids
    end = encoder.encode([LONG], truncate=TRUNCATE_END)
    assert end.ids[0].tolist() == [*body[: MAX - 1], QWEN_EOS_ID] and end.truncated == [True]
    start = encoder.encode([LONG], truncate=TRUNCATE_START)
    assert start.ids[0].tolist() == [*body[-(MAX - 1):], QWEN_EOS_ID]
    exact = raw.decode(body[: MAX - 1])  # exactly max_length with EOS: not truncated
    assert encoder.encode([exact]).truncated == [len(raw.encode(exact).ids) + 1 > MAX]


def test_truncate_none_rejects_long_inputs(encoder: TextEncoder) -> None:
    with pytest.raises(InvalidInput, match=r"inputs\[1\] is longer than max_length 64"):
        encoder.encode(["short", LONG], truncate=TRUNCATE_NONE)
    assert encoder.encode(["short"], truncate=TRUNCATE_NONE).truncated == [False]
    with pytest.raises(InvalidInput, match="TRUNCATE_END"):
        encoder.encode(["x"], truncate=5)


def test_prompts_and_instructions(encoder: TextEncoder, raw: Tokenizer) -> None:
    assert encoder.prompt_for("query", "") == QUERY_PROMPT
    assert encoder.prompt_for("", "Find code") == "Instruct: Find code\nQuery:"
    assert encoder.prompt_for("", "") == ""
    with pytest.raises(InvalidInput, match="not both"):
        encoder.prompt_for("query", "Find code")
    with pytest.raises(InvalidInput, match="unknown prompt_name 'nope'"):
        encoder.prompt_for("nope", "")
    got = encoder.encode(["capital of China"], prompt=QUERY_PROMPT).ids[0].tolist()
    assert got == [*raw.encode(QUERY_PROMPT + "capital of China").ids, QWEN_EOS_ID]


def test_default_prompt_name_applies_when_none_given(tmp_path: Path) -> None:
    model = write_model_dir(tmp_path / "m")
    cfg = json.loads((model / "config_sentence_transformers.json").read_text())
    cfg["default_prompt_name"] = "query"
    (model / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    assert TextEncoder(load_model_spec(str(model))).prompt_for("", "") == QUERY_PROMPT


def test_no_second_eos_when_the_tokenizer_appends_it(tmp_path: Path, raw: Tokenizer) -> None:
    # Like the published Qwen3-Embedding tokenizer: a post-processor appends EOS.
    with_eos = Tokenizer.from_file(str(qwen_tokenizer_file()))
    with_eos.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", QWEN_EOS_ID)])
    tok_file = tmp_path / "tokenizer.json"
    with_eos.save(str(tok_file))
    model = write_model_dir(tmp_path / "m", tokenizer=tok_file)
    encoder = TextEncoder(load_model_spec(str(model)))
    assert not encoder.appends_eos
    assert encoder.encode(["hello"]).ids[0].tolist() == [*raw.encode("hello").ids, QWEN_EOS_ID]
    assert encoder.encode([LONG]).ids[0].tolist() == [*raw.encode(LONG).ids[: MAX - 1],
                                                      QWEN_EOS_ID]
