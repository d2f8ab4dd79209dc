"""Query–document pairs as Qwen3-Reranker's model card feeds them to the model.

The card scores a pair like this (our graph computes the score, see
embedrpc.prepare.builder; this module makes its input):

- text = `<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {document}`, the
  instruction defaulting to DEFAULT_INSTRUCTION;
- the text tokenized alone, as the card's `tokenizer(pairs, truncation='longest_first',
  max_length=max_length − len(prefix) − len(suffix))` call does: with the tokenizer's own
  special tokens (Qwen's base tokenizer adds none) and cut at the end to that many
  tokens, so a long document loses its tail and a very long query takes the document's
  place;
- then PREFIX's tokens + those ids + SUFFIX's tokens (both tokenized alone, without
  special tokens). The card's max_length is 8192 (DEFAULT_MAX_LENGTH).

The card pads on the left; embedrpc's graphs take right padding and read each row's
last real token, so the ids here are unpadded (`pad_id` is what a batch pads with).

Bounded cost, as TextEncoder bounds it (server/tokenizer.py): a text longer than
`cut_chars` (the token budget × the longest token's characters, plus a margin) certainly
has more tokens than the budget, so it is cut before tokenizing at the start of the
pre-tokenizer piece ("word") that straddles a window's end, where the cut cannot change
the tokens kept; texts are tokenized in slices of at most CHUNK_CHARS characters.

Empty queries and documents are scored as the card scores them (`<Document>: ` then the
suffix); nothing is refused for being empty.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidInput, ModelError
from .tokenizer import (
    CHUNK_CHARS,
    TRUNCATE_END,
    TRUNCATE_NAMES,
    TRUNCATE_NONE,
    TRUNCATE_START,
    WINDOW,
    Encoded,
    release_memory_soon,
)

# Qwen3-Reranker-0.6B's model card, verbatim.
DEFAULT_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer "
                       "the query")
PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on "
          "the Query and the Instruct provided. Note that the answer can only be \"yes\" or "
          "\"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
YES_TOKEN, NO_TOKEN = "yes", "no"
DEFAULT_MAX_LENGTH = 8192
PREPARED_INFO = "embedrpc_prepared.json"
_FALLBACK_PAD = "<|endoftext|>"


def model_max_length(model_dir: str | Path) -> int:
    """The longest row a reranker takes by default: the card's 8192, or fewer when
    config.json's max_position_embeddings says so."""
    positions = _optional_json(Path(model_dir) / "config.json").get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and positions > 0:
        return min(DEFAULT_MAX_LENGTH, positions)
    return DEFAULT_MAX_LENGTH


def format_pair(query: str, document: str, instruction: str | None = None) -> str:
    """The card's text for one pair; `instruction` None means DEFAULT_INSTRUCTION (an
    empty string is used as it is, as the card would)."""
    if instruction is None:
        instruction = DEFAULT_INSTRUCTION
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


class PairEncoder:
    """Owns a reranker's tokenizer: (query, document) pairs → the token ids the card feeds.

    Built from a model directory (a prepared reranker or its checkpoint: tokenizer.json,
    config.json, tokenizer_config.json when present). Attributes a caller needs:

    - max_length: the longest row (prefix + text + suffix), the card's 8192 unless the
      model allows fewer positions or `max_length` says otherwise;
    - budget: the tokens left for the text (max_length − len(prefix) − len(suffix));
    - prefix_ids, suffix_ids: the fixed tokens around every text;
    - yes_id, no_id: the tokens whose logits the score compares (the graph has them
      built in; a prepared directory records them and they are checked here);
    - pad_id: what to pad batches with (right padding; never read by the graph).
    """

    def __init__(self, model_dir: str | Path, *, max_length: int | None = None) -> None:
        self.path = Path(model_dir)
        tokenizer_path = self.path / "tokenizer.json"
        try:
            base = Tokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelError(f"{tokenizer_path}: cannot load tokenizer: {exc}") from exc
        base.no_padding()
        base.no_truncation()
        if max_length is not None and max_length < 1:
            raise ModelError(f"max_length {max_length}: must be positive")
        self.max_length = max_length or model_max_length(self.path)
        self.prefix_ids = np.array(base.encode(PREFIX, add_special_tokens=False).ids,
                                   dtype=np.int32)
        self.suffix_ids = np.array(base.encode(SUFFIX, add_special_tokens=False).ids,
                                   dtype=np.int32)
        # The card's convert_tokens_to_ids("yes") / ("no"): vocabulary entries, no space.
        yes, no = base.token_to_id(YES_TOKEN), base.token_to_id(NO_TOKEN)
        if yes is None or no is None:
            raise ModelError(f"{tokenizer_path}: no {YES_TOKEN!r} or {NO_TOKEN!r} token; a "
                             "Qwen3-Reranker scores with the logits of those two tokens")
        self.yes_id, self.no_id = int(yes), int(no)
        self._check_prepared()
        tok_cfg = _optional_json(self.path / "tokenizer_config.json")
        pad = tok_cfg.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = base.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            pad_id = base.token_to_id(_FALLBACK_PAD)
        self.pad_id = int(pad_id) if pad_id is not None else 0
        special = base.num_special_tokens_to_add(False)
        self.budget = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        if self.budget <= special:
            raise ModelError(
                f"max_length {self.max_length} leaves no room for text: the card's prefix "
                f"and suffix take {len(self.prefix_ids) + len(self.suffix_ids)} tokens")
        truncating = Tokenizer.from_str(base.to_str())
        # The card's truncation: one sequence, cut at the end (longest_first has only
        # one sequence to shorten).
        truncating.enable_truncation(self.budget, direction="right", strategy="longest_first")
        self._by_mode = {TRUNCATE_END: truncating, TRUNCATE_NONE: base}
        # No token covers more characters than its string has, so a text of more than
        # budget × longest characters has more than `budget` tokens.
        self.longest_token = max(len(t) for t in base.get_vocab(with_added_tokens=True))
        self.cut_chars = self.budget * self.longest_token + 1024
        self.default_instruction = DEFAULT_INSTRUCTION

    def _check_prepared(self) -> None:
        """A prepared reranker's graph has its yes/no rows built in: they must be the
        tokenizer's."""
        info = _optional_json(self.path / PREPARED_INFO).get("rerank")
        if not isinstance(info, dict):
            return
        built = (info.get("yes_token_id"), info.get("no_token_id"))
        if built != (self.yes_id, self.no_id):
            raise ModelError(f"{self.path}: the graph scores with token ids {built} (yes, "
                             f"no) but tokenizer.json has ({self.yes_id}, {self.no_id}); "
                             "prepare the model again")

    @property
    def wrap_tokens(self) -> int:
        """Tokens every row has besides its text (prefix and suffix)."""
        return len(self.prefix_ids) + len(self.suffix_ids)

    def format(self, query: str, document: str, instruction: str | None = None) -> str:
        return format_pair(query, document, instruction)

    def encode(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
               truncate: int = TRUNCATE_END) -> Encoded:
        """One query against many documents: a row per document, in order."""
        return self._encode([format_pair(query, d, instruction) for d in documents],
                            truncate, "documents")

    def encode_pairs(self, pairs: Sequence[tuple[str, str]], *,
                     instruction: str | None = None, truncate: int = TRUNCATE_END) -> Encoded:
        """Any (query, document) pairs: a row per pair, in order."""
        return self._encode([format_pair(q, d, instruction) for q, d in pairs], truncate,
                            "pairs")

    def _encode(self, texts: list[str], truncate: int, field: str) -> Encoded:
        if truncate == TRUNCATE_START:
            raise InvalidInput("truncate=TRUNCATE_START does not apply to reranking: the "
                               "model card cuts a pair's text at its end (the document), "
                               "keeping the instruction and query; use TRUNCATE_END or "
                               "TRUNCATE_NONE", field="truncate")
        if truncate not in TRUNCATE_NAMES:
            raise InvalidInput(f"truncate={truncate} is unknown; use {TRUNCATE_END} "
                               f"(TRUNCATE_END) or {TRUNCATE_NONE} (TRUNCATE_NONE)",
                               field="truncate")
        if sum(map(len, texts)) > CHUNK_CHARS:
            release_memory_soon()
        cut = [i for i, t in enumerate(texts) if len(t) > self.cut_chars]
        for i in cut:
            texts[i] = self._cut(texts[i], i, truncate, field)
        ids: list[np.ndarray] = []
        truncated: list[bool] = []
        tok = self._by_mode[truncate]
        for start, stop in _slices(texts, CHUNK_CHARS):
            for offset, e in enumerate(tok.encode_batch_fast(texts[start:stop])):
                if truncate == TRUNCATE_NONE and len(e) > self.budget:
                    raise InvalidInput(
                        f"{field}[{start + offset}] is longer than max_length "
                        f"{self.max_length} tokens: it has {len(e) + self.wrap_tokens} "
                        "(instruction, query, document and the model's fixed tokens); "
                        "shorten it or use TRUNCATE_END", field=field)
                # Only a full-length encoding can have been cut.
                truncated.append(len(e) == self.budget and bool(e.overflowing))
                ids.append(np.concatenate([self.prefix_ids,
                                           np.array(e.ids, dtype=np.int32),
                                           self.suffix_ids]))
        for i in cut:  # longer than the budget, certainly
            truncated[i] = True
        return Encoded(ids=ids, truncated=truncated)

    def _cut(self, text: str, index: int, truncate: int, field: str) -> str:
        """`text` (longer than cut_chars) shortened so that tokenizing it with truncation
        gives the full text's tokens: up to the start of the pre-tokenizer piece that a
        window of cut_chars + WINDOW characters ends in (pieces are tokenized on their
        own, and a piece's extent depends on the text up to one character past it)."""
        if truncate == TRUNCATE_NONE:
            least = -(-len(text) // self.longest_token)
            raise InvalidInput(
                f"{field}[{index}] is longer than max_length {self.max_length} tokens: its "
                f"text has {len(text):,} characters (instruction, query and document), so "
                f"at least {least:,} tokens, {least + self.wrap_tokens:,} with the model's "
                "fixed tokens; shorten it or use TRUNCATE_END", field=field)
        if len(text) <= self.cut_chars + WINDOW:
            return text  # no longer than a window: tokenized whole, exact at no extra cost
        window = text[:self.cut_chars + WINDOW]
        words = self._by_mode[TRUNCATE_NONE].encode(window, add_special_tokens=False)
        last = words.word_ids[-1] if words.word_ids else None
        start = next((words.offsets[i][0] for i, w in enumerate(words.word_ids)
                      if w is not None and w == last), len(window))
        if start < self.budget * self.longest_token:
            raise InvalidInput(
                f"{field}[{index}] has a run of more than {WINDOW:,} characters with no "
                "space, digit, punctuation or line break (one word to the tokenizer); such "
                "a text cannot be cut exactly, shorten it", field=field)
        return window[:start]

    def describe(self) -> dict[str, Any]:
        """What the start-up log and Info can say about the pair format."""
        return {"max_length": self.max_length, "text_budget": self.budget,
                "prefix_tokens": len(self.prefix_ids), "suffix_tokens": len(self.suffix_ids),
                "yes_token_id": self.yes_id, "no_token_id": self.no_id,
                "default_instruction": self.default_instruction}


def _optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _slices(texts: list[str], chars: int) -> Iterator[tuple[int, int]]:
    """Consecutive [start, stop) ranges of `texts` holding at most `chars` characters
    (one text alone when it is longer)."""
    start, total = 0, 0
    for i, text in enumerate(texts):
        if total and total + len(text) > chars:
            yield start, i
            start, total = i, 0
        total += len(text)
    if start < len(texts):
        yield start, len(texts)
