"""Prompts, truncation and the pooled end token, against the raw Qwen3 tokenizer.

Reference: Qwen3-Embedding pools the hidden state of `<|endoftext|>` (id 151643),
which its published tokenizer appends after truncation (a TemplateProcessing
post-processor, `$A <|endoftext|>`), while its tokenizer_config.json names
`<|im_end|>` (151645) as eos_token (QwenLM/Qwen3-Embedding issue #122 prints these
ids). sentence-transformers pools the last token the tokenizer produced and never
appends one. Queries are `Instruct: {task}\\nQuery:{query}` (Qwen3-Embedding model card).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, processors

from embedrpc.server.errors import InvalidInput
from embedrpc.server.model import load_model_spec
from embedrpc.server.tokenizer import (
    SERVER_APPENDS,
    TOKENIZER_APPENDS,
    TRUNCATE_END,
    TRUNCATE_NONE,
    TRUNCATE_START,
    TextEncoder,
)

from .conftest import (
    QUERY_PROMPT,
    QWEN_EOS_ID,
    QWEN_IM_END_ID,
    qwen_tokenizer_file,
    write_model_dir,
)

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


def published_tokenizer(directory: Path) -> Path:
    """Qwen's tokenizer.json with the post-processor Qwen3-Embedding publishes."""
    tok = Tokenizer.from_file(str(qwen_tokenizer_file()))
    tok.post_processor = processors.TemplateProcessing(
        single="$A:0 <|endoftext|>:0", pair="$A:0 <|endoftext|>:0 $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", QWEN_EOS_ID)])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


def test_eos_appended_when_the_tokenizer_does_not(encoder: TextEncoder, raw: Tokenizer) -> None:
    # The base tokenizer appends nothing: config.json's eos_token_id (151643) is appended,
    # not tokenizer_config.json's eos_token (<|im_end|>).
    assert encoder.pooled.source == SERVER_APPENDS and encoder.pooled.id == QWEN_EOS_ID
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


def test_published_files_pool_the_token_the_tokenizer_appends(tmp_path: Path,
                                                                raw: Tokenizer) -> None:
    # The files as published: the tokenizer appends <|endoftext|>, tokenizer_config.json
    # says eos_token <|im_end|>. Nothing may be appended after the tokenizer's token (the
    # bug this guards against appended <|im_end|>: one token too many, wrong vectors).
    model = write_model_dir(tmp_path / "m", tokenizer=published_tokenizer(tmp_path / "t"))
    assert json.loads((model / "tokenizer_config.json").read_text())["eos_token"] == \
        "<|im_end|>"
    encoder = TextEncoder(load_model_spec(str(model)))
    assert encoder.pooled.source == TOKENIZER_APPENDS
    assert (encoder.pooled.id, encoder.pooled.token) == (QWEN_EOS_ID, "<|endoftext|>")
    for text in TEXTS:
        ids = encoder.encode([text]).ids[0].tolist()
        assert ids == [*raw.encode(text).ids, QWEN_EOS_ID], text
        assert QWEN_IM_END_ID not in ids
    got = encoder.encode(TEXTS)
    assert got.total_tokens == sum(len(raw.encode(t).ids) + 1 for t in TEXTS)  # counted once
    assert encoder.encode([LONG]).ids[0].tolist() == [*raw.encode(LONG).ids[: MAX - 1],
                                                      QWEN_EOS_ID]
    start = encoder.encode([LONG], truncate=TRUNCATE_START).ids[0].tolist()
    assert start == [*raw.encode(LONG).ids[-(MAX - 1):], QWEN_EOS_ID]


def test_config_eos_token_id_wins_over_tokenizer_config(tmp_path: Path) -> None:
    # A tokenizer that appends nothing gets config.json's end token; without one in
    # config.json, tokenizer_config.json's eos_token; the log line says which.
    model = write_model_dir(tmp_path / "m")
    encoder = TextEncoder(load_model_spec(str(model)))
    assert encoder.pooled.id == QWEN_EOS_ID and "config.json" in encoder.pooled.describe()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64}))
    encoder = TextEncoder(load_model_spec(str(model)))
    assert (encoder.pooled.id, encoder.pooled.source) == (QWEN_IM_END_ID, SERVER_APPENDS)
    assert "tokenizer_config.json" in encoder.pooled.describe()
    assert encoder.encode(["hi"]).ids[0].tolist()[-1] == QWEN_IM_END_ID


def test_special_tokens_typed_in_text_are_not_taken_for_an_end_token(tmp_path: Path,
                                                                      raw: Tokenizer) -> None:
    # Probe texts that end in a special token of the vocabulary (here one is made special)
    # do not make the tokenizer look like it appends one: only post-processor tokens count.
    tok = Tokenizer.from_file(str(qwen_tokenizer_file()))
    tok.add_special_tokens(["🙂"])  # one probe text ends with it
    tok.save(str(tmp_path / "tokenizer.json"))
    model = write_model_dir(tmp_path / "m", tokenizer=tmp_path / "tokenizer.json")
    encoder = TextEncoder(load_model_spec(str(model)))
    assert (encoder.pooled.source, encoder.pooled.id) == (SERVER_APPENDS, QWEN_EOS_ID)
    assert encoder.encode(["a text that ends with <|im_end|>"]).ids[0].tolist() == [
        *raw.encode("a text that ends with <|im_end|>").ids, QWEN_EOS_ID]


def test_bos_only_tokenizer_gets_the_end_token_appended(tmp_path: Path, raw: Tokenizer) -> None:
    # Llama-style "<s> $A": the last token is the text's own, so the end token is appended.
    tok = Tokenizer.from_file(str(qwen_tokenizer_file()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 151644)])
    tok.save(str(tmp_path / "tokenizer.json"))
    model = write_model_dir(tmp_path / "m", tokenizer=tmp_path / "tokenizer.json")
    encoder = TextEncoder(load_model_spec(str(model)))
    assert encoder.pooled.source == SERVER_APPENDS
    assert encoder.encode(["hello"]).ids[0].tolist() == [151644, *raw.encode("hello").ids,
                                                         QWEN_EOS_ID]
