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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidInput, ModelError
from .model import ModelSpec

TRUNCATE_END, TRUNCATE_START, TRUNCATE_NONE = 0, 1, 2  # embedrpc.v1.Truncate
TRUNCATE_NAMES = {TRUNCATE_END: "TRUNCATE_END", TRUNCATE_START: "TRUNCATE_START",
                  TRUNCATE_NONE: "TRUNCATE_NONE"}
_FALLBACK_EOS = "<|endoftext|>"
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
        encodings = self._by_side[truncate].encode_batch_fast(texts)
        appended = int(self._append_id >= 0)
        if truncate == TRUNCATE_NONE:
            lengths = [len(e) + appended for e in encodings]
            if too_long := [i for i, n in enumerate(lengths) if n > self.max_length]:
                first = too_long[0]
                raise InvalidInput(
                    f"inputs[{first}] is longer than max_length {self.max_length} tokens: it "
                    f"has {lengths[first]} (after the prompt, special tokens included); "
                    "shorten it or use TRUNCATE_END / TRUNCATE_START")
            truncated = [False] * len(encodings)
        else:
            # Only a full-length encoding can have been cut; building the overflow list
            # of a long text is costly (one object per max_length tokens).
            truncated = [len(e) + appended == self.max_length and bool(e.overflowing)
                         for e in encodings]
        # From the list .ids builds: a third faster than np.fromiter over it.
        if appended:
            ids = [np.array([*e.ids, self._append_id], dtype=np.int32) for e in encodings]
        else:
            ids = [np.array(e.ids, dtype=np.int32) for e in encodings]
        if not all(len(a) for a in ids):  # only possible without an end token
            empty = next(i for i, a in enumerate(ids) if not len(a))
            raise InvalidInput(f"inputs[{empty}] has no tokens; this model needs non-empty text")
        return Encoded(ids=ids, truncated=truncated)

    def tokens(self, ids: np.ndarray) -> list[str]:
        tok = self._by_side[TRUNCATE_END]
        return [tok.id_to_token(int(i)) or "" for i in ids]


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
