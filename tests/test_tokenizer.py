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
import random
import threading
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
    WINDOW,
    TextEncoder,
    _CharBudget,
    _slices,
)

from .helpers import (
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


# --------------------------------------------------------------------------- long texts
# Texts longer than cut_chars (max_length × the longest token's characters) are cut
# before tokenizing; the reference is the same tokenizer run on the whole text.

def _mixed_text(rng: random.Random, chars: int, *, line_breaks: bool) -> str:
    words = ["hello", "world", "北京", "的", "Grüße", "🚀", "x", "---", "   ", "12345",
             "can't", "e\u0301", "<|im_end|>", "\t", *(["\n", "\n\n"] if line_breaks else [])]
    parts: list[str] = []
    while sum(map(len, parts)) < chars:
        parts.append(rng.choice(words) + (" " if rng.random() < 0.5 else ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def published_encoder(tmp_path_factory: pytest.TempPathFactory) -> TextEncoder:
    tmp = tmp_path_factory.mktemp("published")
    return TextEncoder(load_model_spec(str(write_model_dir(
        tmp / "m", tokenizer=published_tokenizer(tmp / "t")))))


@pytest.mark.parametrize("published", [True, False], ids=["published", "base"])
@pytest.mark.parametrize("truncate", [TRUNCATE_END, TRUNCATE_START], ids=["end", "start"])
def test_long_texts_are_cut_without_changing_the_kept_tokens(
        request: pytest.FixtureRequest, published: bool, truncate: int) -> None:
    encoder = request.getfixturevalue("published_encoder" if published else "encoder")
    assert encoder.cut_chars == MAX * encoder.longest_token + 1024
    rng = random.Random(1)
    # With and without line breaks (TRUNCATE_START cuts right after one when it can).
    texts = [_mixed_text(rng, int(encoder.cut_chars * rng.uniform(1.05, 2)),
                         line_breaks=bool(i % 2)) for i in range(6)]
    got = encoder.encode(texts, truncate=truncate)
    appended = [QWEN_EOS_ID] if not published else []
    for text, ids in zip(texts, got.ids, strict=True):
        assert len(text) > encoder.cut_chars  # each one was cut
        whole = encoder._by_side[truncate].encode(text)  # the whole text, truncated
        assert ids.tolist() == [*whole.ids, *appended]
    assert got.truncated == [True] * len(texts)


def test_truncate_none_refuses_a_text_too_long_to_tokenize(encoder: TextEncoder) -> None:
    text = "word " * (encoder.cut_chars // 5 + 10)
    with pytest.raises(InvalidInput, match=r"inputs\[0\] is longer than max_length 64 tokens: "
                       r"it has [\d,]+ characters .*so at least [\d,]+ tokens"):
        encoder.encode([text], truncate=TRUNCATE_NONE)


def test_a_word_too_long_to_cut_exactly_is_refused(encoder: TextEncoder) -> None:
    # A run of letters is one piece to the pre-tokenizer: its tokens near the start could
    # depend on its end, so it cannot be cut; it must not be tokenized whole either.
    with pytest.raises(InvalidInput, match="a run of more than 16,384 characters"):
        encoder.encode(["a" * (encoder.cut_chars + 20_000)])
    # At the bound: a text no longer than cut_chars + WINDOW (16,384) is tokenized whole,
    # whatever its runs, so a run just over cut_chars (3,585 characters on the demo
    # model, refused before with a message that said 16,384) is accepted and exact.
    for text in ("a" * (encoder.cut_chars + 1), "a" * (encoder.cut_chars + WINDOW),
                 "x " * 10 + "北" * (encoder.cut_chars + 5)):
        whole = encoder._by_side[TRUNCATE_END].encode(text)
        got = encoder.encode([text])
        assert got.ids[0].tolist() == [*whole.ids, QWEN_EOS_ID] and got.truncated == [True]
    # One past it the run goes on beyond the window: refused, and the run named is
    # longer than 16,384 characters, as the message says.
    with pytest.raises(InvalidInput, match="a run of more than 16,384 characters"):
        encoder.encode(["a" * (encoder.cut_chars + WINDOW + 1)])
    # Just under the bound it is cut exactly (the run ends inside the window).
    text = "b" * (encoder.cut_chars - 500) + " tail" * 100
    whole = encoder._by_side[TRUNCATE_END].encode(text)
    assert encoder.encode([text]).ids[0].tolist() == [*whole.ids, QWEN_EOS_ID]


def test_tokenizing_is_done_in_bounded_slices() -> None:
    texts = ["a" * 400, "b" * 700, "c" * 2000, "d" * 10, "e" * 990]
    assert list(_slices(texts, 1000)) == [(0, 1), (1, 2), (2, 3), (3, 5)]
    assert list(_slices([], 1000)) == []


def test_large_tokenizations_share_a_character_budget() -> None:
    budget = _CharBudget(100)
    order: list[str] = []
    held = []

    def second() -> None:
        held.append(budget.take(50))
        held[0].__enter__()
        order.append("second")

    with budget.take(80):
        waiting = threading.Thread(target=second)
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive() and budget.used == 80  # 80 + 50 > 100: it waits
        order.append("first done")
    waiting.join(5)
    assert order == ["first done", "second"] and budget.used == 50
    held[0].__exit__(None, None, None)
    assert budget.used == 0
    with _CharBudget(100).take(500):  # larger than the budget: runs alone
        pass
