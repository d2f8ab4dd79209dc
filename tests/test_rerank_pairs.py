"""Query–document pairs tokenized as Qwen3-Reranker's model card tokenizes them.

Reference: tests/data/qwen3_reranker_reference.json, the token ids the card's code fed
to transformers (scripts/make_reranker_fixture.py: the card's own strings, tokenizer
call and truncation, with Qwen's real tokenizer) for every case: default and custom
instructions, multilingual text, long documents cut at max_length 96, empty documents,
a document exactly at the limit and one past it, special tokens typed as text. The
checkpoint is written from a seed (tests/qwen3_fixtures.py). Token ids must be equal,
exactly; no torch is needed here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedrpc.server.errors import InvalidInput, ModelError
from embedrpc.server.rerank import (
    DEFAULT_INSTRUCTION,
    DEFAULT_MAX_LENGTH,
    PairEncoder,
    format_pair,
)
from embedrpc.server.tokenizer import TRUNCATE_NONE, TRUNCATE_START, WINDOW

from . import qwen3_fixtures as fx
from .helpers import DATA

REFERENCE = json.loads((DATA / "qwen3_reranker_reference.json").read_text(encoding="utf-8"))
CASES = {c["name"]: c for c in REFERENCE["cases"]}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.write_reranker_checkpoint(tmp_path_factory.mktemp("rr") / "Qwen3-Reranker-tiny")


@pytest.fixture(scope="module")
def encoders(checkpoint: Path) -> dict[int, PairEncoder]:
    return {n: PairEncoder(checkpoint, max_length=n)
            for n in sorted({c["max_length"] for c in REFERENCE["cases"]})}


def test_fixed_tokens_are_the_cards(encoders: dict[int, PairEncoder]) -> None:
    enc = encoders[DEFAULT_MAX_LENGTH]
    assert enc.prefix_ids.tolist() == REFERENCE["prefix_ids"]
    assert enc.suffix_ids.tolist() == REFERENCE["suffix_ids"]
    assert (enc.yes_id, enc.no_id) == (REFERENCE["yes_id"], REFERENCE["no_id"])
    assert enc.default_instruction == REFERENCE["default_instruction"] == DEFAULT_INSTRUCTION
    assert enc.pad_id == 151643  # tokenizer_config's pad_token, <|endoftext|>
    assert enc.budget == DEFAULT_MAX_LENGTH - len(enc.prefix_ids) - len(enc.suffix_ids)


@pytest.mark.parametrize("name", list(CASES))
def test_token_ids_equal_the_cards(encoders: dict[int, PairEncoder], name: str) -> None:
    case = CASES[name]
    enc = encoders[case["max_length"]]
    for group in case["groups"]:
        got = enc.encode(group["query"], group["documents"], instruction=case["instruction"])
        assert [a.tolist() for a in got.ids] == group["token_ids"], group["query"][:40]
        assert got.truncated == group["truncated"]
        assert all(a.dtype == np.int32 for a in got.ids)
        assert got.total_tokens == sum(map(len, group["token_ids"]))
        # The same rows, asked for as pairs.
        pairs = [(group["query"], d) for d in group["documents"]]
        again = enc.encode_pairs(pairs, instruction=case["instruction"])
        assert [a.tolist() for a in again.ids] == group["token_ids"]


def test_documents_are_cut_as_the_card_cuts(encoders: dict[int, PairEncoder]) -> None:
    case = CASES["long_documents"]
    enc = encoders[case["max_length"]]
    (first, long_query) = case["groups"]
    # Cut documents fill max_length exactly; the short one is whole.
    assert [len(r) for r in first["token_ids"]] == [96, 96, 84, 96]
    # A query longer than the budget pushes the document out: both rows are the same.
    assert long_query["token_ids"][0] == long_query["token_ids"][1]
    # At the limit: kept whole; one sentence more: cut back to the very same tokens.
    exact = CASES["exact_limit"]
    at, past, _ = exact["groups"][0]["token_ids"]
    assert len(at) == exact["max_length"] and at == past
    assert exact["groups"][0]["truncated"][:2] == [False, True]
    # Not truncating refuses what the card would cut, naming the document and the limit.
    with pytest.raises(InvalidInput, match=r"documents\[1\] is longer than max_length 96 "
                                           r"tokens: it has 1\d\d\d "):
        enc.encode(first["query"], first["documents"][2:0:-1], truncate=TRUNCATE_NONE)
    ok = enc.encode(first["query"], first["documents"][2:3], truncate=TRUNCATE_NONE)
    assert [r.tolist() for r in ok.ids] == first["token_ids"][2:3]
    with pytest.raises(InvalidInput, match="TRUNCATE_START does not apply"):
        enc.encode("q", ["d"], truncate=TRUNCATE_START)


def test_huge_documents_cost_what_the_model_sees(encoders: dict[int, PairEncoder]) -> None:
    # A document far longer than the model can see is cut before tokenizing, where the
    # cut cannot change the tokens kept: the rows equal the card's for its beginning.
    case = CASES["long_documents"]
    enc = encoders[case["max_length"]]
    group = case["groups"][0]
    huge = group["documents"][0] * 400  # 1.8M characters; cut_chars is 7,168 here
    assert len(huge) > 100 * enc.cut_chars
    got = enc.encode(group["query"], [huge, group["documents"][2]])
    assert [r.tolist() for r in got.ids] == [group["token_ids"][0], group["token_ids"][2]]
    assert got.truncated == [True, False]
    with pytest.raises(InvalidInput, match=r"documents\[0\] is longer than max_length 96 "
                                           r"tokens: its text has 1,8"):
        enc.encode(group["query"], [huge], truncate=TRUNCATE_NONE)
    # Just past the length that is refused before tokenizing: the count it gives is the
    # whole row's, more than the limit it quotes (it gave the text's alone, which read as
    # less: "longer than max_length 128 tokens ... so at least 106", outside review)
    pair = len(format_pair(group["query"], ""))
    just_over = ("ab " * enc.cut_chars)[:enc.cut_chars + 1 - pair]
    assert len(format_pair(group["query"], just_over)) == enc.cut_chars + 1
    with pytest.raises(InvalidInput, match="with the model's fixed tokens") as refused:
        enc.encode(group["query"], [just_over], truncate=TRUNCATE_NONE)
    total = re.search(r"tokens, ([\d,]+) with the model's fixed tokens", str(refused.value))
    assert total is not None and int(total.group(1).replace(",", "")) > 96
    # One "word" longer than the window cannot be cut exactly: refused, not guessed.
    with pytest.raises(InvalidInput, match="no space, digit, punctuation"):
        enc.encode(group["query"], ["x" * (enc.cut_chars * 4)])
    with pytest.raises(InvalidInput, match="a run of more than 16,384 characters"):
        enc.encode(group["query"], ["x" * (enc.cut_chars + WINDOW + 1)])
    # A pair text no longer than cut_chars + WINDOW is tokenized whole, however long its
    # runs: the same row as the card's truncation of the whole pair text.
    from tokenizers import Tokenizer

    around = len(format_pair(group["query"], ""))  # the instruction, query and format
    tok = Tokenizer.from_file(str(enc.path / "tokenizer.json"))
    tok.enable_truncation(enc.budget)
    for document in ("x" * (enc.cut_chars + 1), "x" * (enc.cut_chars + WINDOW - around)):
        whole = tok.encode(format_pair(group["query"], document)).ids
        got = enc.encode(group["query"], [document])
        assert got.ids[0].tolist() == [*enc.prefix_ids, *whole, *enc.suffix_ids]
        assert got.truncated == [True]


def test_cut_at_the_default_length_equals_tokenizing_everything(checkpoint: Path) -> None:
    # At the card's 8192 tokens, a 1.3M-character document takes the cut path; tokenizing
    # its whole text with the card's truncation gives the same row.
    from tokenizers import Tokenizer

    enc = PairEncoder(checkpoint)
    words = "Rivers carry water, 河流 traversent la ville; числа 12345 and more. "
    document = words * (enc.cut_chars // len(words) + 2)
    assert len(document) > enc.cut_chars
    got = enc.encode("query", [document])
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tok.enable_truncation(enc.budget)
    whole = tok.encode(format_pair("query", document)).ids
    assert got.ids[0].tolist() == [*enc.prefix_ids, *whole, *enc.suffix_ids]
    assert len(got.ids[0]) == DEFAULT_MAX_LENGTH and got.truncated == [True]


def test_instruction_none_is_the_default_and_empty_is_kept(
        encoders: dict[int, PairEncoder]) -> None:
    # The card replaces only a missing instruction; an empty one is used as it is.
    enc = encoders[DEFAULT_MAX_LENGTH]
    default = CASES["default_instruction"]["groups"][0]
    got = enc.encode(default["query"], default["documents"][:1], instruction=None)
    assert got.ids[0].tolist() == default["token_ids"][0]
    empty = enc.encode(default["query"], default["documents"][:1], instruction="")
    assert empty.ids[0].tolist() != default["token_ids"][0]
    assert format_pair("q", "d", "") == "<Instruct>: \n<Query>: q\n<Document>: d"
    assert enc.encode("q", []).ids == []


def test_limits_and_broken_directories(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="leaves no room for text"):
        PairEncoder(checkpoint, max_length=48)  # the prefix and suffix alone
    assert PairEncoder(checkpoint, max_length=49).budget == 1
    broken = tmp_path / "no-yes"
    broken.mkdir()
    # The demo model's small vocabulary has neither "yes" nor "no".
    shutil.copy2(fx.DEMO_DIR / "tokenizer.json", broken / "tokenizer.json")
    with pytest.raises(ModelError, match="no 'yes' or 'no' token"):
        PairEncoder(broken)
