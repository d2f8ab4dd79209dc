"""Prompts, instructions and tokenization, exactly as sentence-transformers does them.

- A named prompt is prepended as text (`prompt + input`), as sentence-transformers does.
- An instruction becomes `Instruct: {instruction}\\nQuery:{input}` (Qwen3-Embedding's
  format: no space after `Query:`).
- Last-token pooling reads the hidden state of the token the model's tokenizer puts
  last. sentence-transformers never appends anything: it pools what the tokenizer
  produced. So the pooled token is found by *encoding probe texts*: when every one
  ends with the same special token (Qwen3-Embedding's post-processor appends
  `<|endoftext|>`), that token is pooled and nothing is added. Only a tokenizer that
  appends nothing (the base Qwen3 one) gets an end token appended here: the one
  config.json's `eos_token_id` names, else tokenizer_config's `eos_token`. The name
  in tokenizer_config is never compared with what the tokenizer appends: the
  published Qwen3-Embedding files name `<|im_end|>` there while the tokenizer
  appends `<|endoftext|>`, which is the token the model was trained to pool.
- Truncation counts the special tokens, so a truncated input still ends with the
  pooled token, and usage counts it once.

Bounded cost. What a request costs is bounded by what the model will see, not by what
the client sent (tokenizing costs ~100 bytes of memory per character):

- A text longer than `cut_chars` (max_length × the longest token's characters, plus a
  margin) certainly has more than max_length tokens, so it is cut before tokenizing,
  where the cut cannot change the tokens kept. TRUNCATE_END: a window of cut_chars +
  WINDOW characters is tokenized and only tokens of *complete* pre-tokenizer pieces
  ("words") are kept; pieces are tokenized independently, and a piece's extent depends
  on the text up to one character past it (true of the GPT-2/Qwen/Llama-3-style split
  regexes and the whitespace ones), so these are the full text's first tokens. A text
  no longer than cut_chars + WINDOW is tokenized whole (a window would be all of it);
  in a longer one, a piece (a run with no space, digit or punctuation) that starts
  within max_length × the longest token's characters and goes on past the window is
  longer than WINDOW characters, and is refused. TRUNCATE_START: the kept suffix starts
  right after a line break, which every one of those pre-tokenizers ends a piece at,
  wherever it started reading; a text with no line break there keeps WINDOW extra
  characters, in which the pre-tokenizer's pieces line up again with the full text's.
  TRUNCATE_NONE refuses such a text without tokenizing it ("at least N tokens").
- Texts are tokenized in slices of at most CHUNK_CHARS characters, so a request's
  transient memory does not grow with its size, and large tokenizations (in threads)
  share a budget of BUDGET_CHARS characters at a time.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidInput, ModelError
from .model import ModelSpec

TRUNCATE_END, TRUNCATE_START, TRUNCATE_NONE = 0, 1, 2  # embedrpc.v1.Truncate
TRUNCATE_NAMES = {TRUNCATE_END: "TRUNCATE_END", TRUNCATE_START: "TRUNCATE_START",
                  TRUNCATE_NONE: "TRUNCATE_NONE"}
_FALLBACK_EOS = "<|endoftext|>"
# Characters past the budget that a cut looks at: the longest pre-tokenizer piece (a run
# without a space, digit or punctuation) that can straddle the cut.
WINDOW = 16_384
# Most characters given to the tokenizer in one call, and at once across threads.
CHUNK_CHARS = 1 << 20
BUDGET_CHARS = 8 << 20
# Smaller tokenizations never wait for the budget (they may run on the event loop).
_UNBUDGETED_CHARS = 64 << 10
_LINE_BREAKS = "\r\n"
# Who puts the pooled token at the end of every text.
TOKENIZER_APPENDS = "tokenizer"  # the tokenizer's own post-processor (sentence-transformers)
SERVER_APPENDS = "server"  # embedrpc, because the tokenizer appends nothing
# Texts the tokenizer is tried on to see what it puts last: a space, scripts, the
# query prompt's shape, and text that ends like a special token would. Not the empty
# text: a tokenizer that only prepends a BOS token ends it with that.
_PROBES = (" ", "a", "Hello, world.", "北京是中国的首都。", "Instruct: x\nQuery:y",
           "🙂", "<|", "text</s>")


def instruction_prompt(instruction: str) -> str:
    return f"Instruct: {instruction}\nQuery:"


@dataclass(frozen=True, slots=True)
class Encoded:
    """Token ids for a list of texts (one int32 array each), as the model sees them."""

    ids: list[np.ndarray]
    truncated: list[bool]

    @property
    def total_tokens(self) -> int:
        return sum(len(a) for a in self.ids)


class TextEncoder:
    """Owns the tokenizer: prompts → ids, truncated, ending with the pooled token."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.max_length = spec.max_length
        try:
            base = Tokenizer.from_file(str(spec.tokenizer_path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelError(f"{spec.tokenizer_path}: cannot load tokenizer: {exc}") from exc
        base.no_padding()
        base.no_truncation()
        self.pooled = PooledToken(id=-1, token="", source="")
        if spec.pooling == "lasttoken":
            self.pooled = pooled_token(base, spec)
        # The server's own end token, appended after the tokenizer (and its truncation,
        # which then leaves room for it); -1: none.
        self._append_id = self.pooled.id if self.pooled.source == SERVER_APPENDS else -1
        appended = int(self._append_id >= 0)
        pad = spec.pad_token
        pad_id = base.token_to_id(pad) if pad else None
        # Right padding never reaches a pooled position; any id the model knows will do.
        self.pad_id = pad_id if pad_id is not None else max(self.pooled.id, 0)
        self.special_tokens = base.num_special_tokens_to_add(False) + appended
        if self.max_length <= self.special_tokens:
            raise ModelError(f"max_length {self.max_length} leaves no room for text")
        # One tokenizer per truncation side: the setting is global to a Tokenizer.
        self._by_side = {}
        for mode, side in ((TRUNCATE_END, "right"), (TRUNCATE_START, "left")):
            tok = Tokenizer.from_str(base.to_str())
            tok.enable_truncation(self.max_length - appended, direction=side)
            self._by_side[mode] = tok
        self._by_side[TRUNCATE_NONE] = base  # untruncated: an error can say the length
        # No token covers more characters than its string has (byte-level tokens: bytes),
        # so a text of more than max_length × longest characters has over max_length
        # tokens.
        self.longest_token = max(len(t) for t in base.get_vocab(with_added_tokens=True))
        self.cut_chars = self.max_length * self.longest_token + 1024
        self._budget = _CharBudget(BUDGET_CHARS)

    def prompt_for(self, prompt_name: str, instruction: str) -> str:
        """The text put before every input; validates the request's choice."""
        if prompt_name and instruction:
            raise InvalidInput("set prompt_name or instruction, not both")
        if instruction:
            return instruction_prompt(instruction)
        if prompt_name:
            try:
                return self.spec.prompts[prompt_name]
            except KeyError:
                allowed = ", ".join(repr(p) for p in sorted(self.spec.prompts)) or "none"
                raise InvalidInput(
                    f"unknown prompt_name {prompt_name!r}; this model has: {allowed}"
                ) from None
        if self.spec.default_prompt_name:
            return self.spec.prompts[self.spec.default_prompt_name]
        return ""

    def encode(self, texts: list[str], *, prompt: str = "",
               truncate: int = TRUNCATE_END) -> Encoded:
        if truncate not in TRUNCATE_NAMES:
            raise InvalidInput(f"truncate={truncate} is unknown; use one of "
                               f"{', '.join(f'{v} ({k})' for k, v in TRUNCATE_NAMES.items())}")
        if prompt:
            texts = [prompt + t for t in texts]
        total = sum(map(len, texts))
        if total > CHUNK_CHARS:
            # The request's own memory (its message, its texts) is freed only after it is
            # answered: give it back to the system a little later.
            release_memory_soon()
        cut = [i for i, t in enumerate(texts) if len(t) > self.cut_chars] \
            if total > self.cut_chars else []
        if cut:
            texts = list(texts)
            for i in cut:
                texts[i] = self._cut(texts[i], i, truncate)
        ids: list[np.ndarray] = []
        truncated: list[bool] = []
        if total <= _UNBUDGETED_CHARS:  # one slice, no budget: most requests, at no cost
            self._encode_slice(texts, 0, truncate, ids, truncated)
            slices: Iterator[tuple[int, int]] = iter(())
        else:
            slices = _slices(texts, CHUNK_CHARS)
        for start, stop in slices:
            chars = sum(len(t) for t in texts[start:stop])
            with self._budget.take(chars if chars > _UNBUDGETED_CHARS else 0):
                self._encode_slice(texts[start:stop], start, truncate, ids, truncated)
        for i in cut:  # longer than max_length, certainly
            truncated[i] = True
        if not all(len(a) for a in ids):  # only possible without an end token
            empty = next(i for i, a in enumerate(ids) if not len(a))
            raise InvalidInput(f"inputs[{empty}] has no tokens; this model needs non-empty text")
        return Encoded(ids=ids, truncated=truncated)

    def _encode_slice(self, texts: list[str], first: int, truncate: int,
                      ids: list[np.ndarray], truncated: list[bool]) -> None:
        encodings = self._by_side[truncate].encode_batch_fast(texts)
        appended = int(self._append_id >= 0)
        if truncate == TRUNCATE_NONE:
            lengths = [len(e) + appended for e in encodings]
            if too_long := [i for i, n in enumerate(lengths) if n > self.max_length]:
                index = too_long[0]
                raise InvalidInput(
                    f"inputs[{first + index}] is longer than max_length {self.max_length} "
                    f"tokens: it has {lengths[index]} (after the prompt, special tokens "
                    "included); shorten it or use TRUNCATE_END / TRUNCATE_START")
            truncated.extend([False] * len(encodings))
        else:
            # Only a full-length encoding can have been cut; building the overflow list
            # of a long text is costly (one object per max_length tokens).
            truncated.extend(len(e) + appended == self.max_length and bool(e.overflowing)
                             for e in encodings)
        # From the list .ids builds: a third faster than np.fromiter over it.
        if appended:
            ids.extend(np.array([*e.ids, self._append_id], dtype=np.int32) for e in encodings)
        else:
            ids.extend(np.array(e.ids, dtype=np.int32) for e in encodings)

    def _cut(self, text: str, index: int, truncate: int) -> str:
        """`text` (longer than cut_chars) shortened so that tokenizing it with truncation
        gives the full text's tokens (see the module's docstring)."""
        if truncate == TRUNCATE_NONE:
            raise InvalidInput(
                f"inputs[{index}] is longer than max_length {self.max_length} tokens: it has "
                f"{len(text):,} characters (after the prompt), so at least "
                f"{-(-len(text) // self.longest_token):,} tokens; shorten it or use "
                "TRUNCATE_END / TRUNCATE_START")
        if len(text) <= self.cut_chars + WINDOW:
            return text  # no longer than a window: tokenized whole, exact at no extra cost
        if truncate == TRUNCATE_START:
            window = text[-(self.cut_chars + WINDOW):]
            head = window[:WINDOW + 1]
            for p in range(1, len(head)):  # right after a line break: a piece boundary
                if head[p - 1] in _LINE_BREAKS and head[p] not in _LINE_BREAKS:
                    return window[p:]
            return window  # no line break: WINDOW characters for the pieces to line up
        window = text[:self.cut_chars + WINDOW]
        with self._budget.take(len(window)):
            words = self._by_side[TRUNCATE_NONE].encode(window, add_special_tokens=False)
        last = words.word_ids[-1] if words.word_ids else None
        # Where the last piece starts: it may go on past the window, the others are whole.
        start = next((words.offsets[i][0] for i, w in enumerate(words.word_ids)
                      if w is not None and w == last), len(window))
        if start < self.max_length * self.longest_token:
            raise InvalidInput(
                f"inputs[{index}] has a run of more than {WINDOW:,} characters with no space, "
                "digit, punctuation or line break (one word to the tokenizer); such a text "
                "cannot be cut exactly, shorten it")
        return window[:start]

    def tokens(self, ids: np.ndarray) -> list[str]:
        tok = self._by_side[TRUNCATE_END]
        return [tok.id_to_token(int(i)) or "" for i in ids]


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise): after a
    large tokenization, RSS returns near where it was."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None
_release_pending = threading.Lock()


def release_memory_soon(delay: float = 1.0) -> None:
    """release_memory() in `delay` seconds (one pending at a time), from a thread."""
    if not _release_pending.acquire(blocking=False):
        return  # one is already due

    def run() -> None:
        try:
            release_memory()
        finally:
            _release_pending.release()

    timer = threading.Timer(delay, run)
    timer.daemon = True
    timer.start()


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


class _CharBudget:
    """At most `limit` characters being tokenized at once, across threads; a larger
    request waits until it runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._changed = threading.Condition()

    @contextmanager
    def take(self, chars: int) -> Iterator[None]:
        if chars <= 0:
            yield
            return
        with self._changed:
            self._changed.wait_for(lambda: self.used == 0 or self.used + chars <= self.limit)
            self.used += chars
        try:
            yield
        finally:
            with self._changed:
                self.used -= chars
                self._changed.notify_all()


@dataclass(frozen=True, slots=True)
class PooledToken:
    """The token whose hidden state last-token pooling returns, and who appends it."""

    id: int
    token: str
    source: str  # TOKENIZER_APPENDS or SERVER_APPENDS ("" without last-token pooling)
    why: str = ""  # where the token was found (for the start-up log)

    def describe(self) -> str:
        if not self.source:
            return "none (not last-token pooling)"
        who = ("appended by the tokenizer's post-processor" if self.source == TOKENIZER_APPENDS
               else f"appended by embedrpc: the tokenizer appends no end token ({self.why})")
        return f"{self.token!r} (id {self.id}), {who}"


def pooled_token(tok: Tokenizer, spec: ModelSpec) -> PooledToken:
    """What last-token pooling reads, decided from the tokenizer's behaviour.

    The tokenizer appends an end token when every probe text ends with the same token
    added by its post-processor (`special_tokens_mask`; a special token typed in the
    text does not count); then that token is pooled. Otherwise the model's end token
    is appended by the server: config.json's `eos_token_id`, else tokenizer_config's
    `eos_token`, else `<|endoftext|>`.
    """
    endings = set()
    for text in _PROBES:
        enc = tok.encode(text)
        special = bool(enc.ids) and enc.special_tokens_mask[-1] == 1
        endings.add(enc.ids[-1] if special else None)
    if len(endings) == 1 and None not in endings:
        (token_id,) = endings
        return PooledToken(id=token_id, token=tok.id_to_token(token_id) or "",
                           source=TOKENIZER_APPENDS, why="tokenizer.json post-processor")
    candidates = []
    if spec.config_eos_token_id is not None:
        candidates.append((tok.id_to_token(spec.config_eos_token_id),
                           f"config.json eos_token_id {spec.config_eos_token_id}"))
    if spec.eos_token:
        candidates.append((spec.eos_token, "tokenizer_config.json eos_token"))
    candidates.append((_FALLBACK_EOS, "the Qwen3 end token"))
    for token, source in candidates:
        token_id = tok.token_to_id(token) if token else None
        if token_id is not None:
            return PooledToken(id=token_id, token=token, source=SERVER_APPENDS, why=source)
    raise ModelError(f"{spec.path}: last-token pooling needs an end token, but the tokenizer "
                     "appends none and neither config.json's eos_token_id nor "
                     "tokenizer_config.json's eos_token names a token of its vocabulary")
