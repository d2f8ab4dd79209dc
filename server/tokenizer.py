"""Prompts, instructions and tokenization, exactly as sentence-transformers does them.

- A named prompt is prepended as text (`prompt + input`), as sentence-transformers does.
- An instruction becomes `Instruct: {instruction}\\nQuery:{input}` (Qwen3-Embedding's
  format: no space after `Query:`).
- For last-token pooling the sequence must end with the EOS token. The published
  Qwen3-Embedding tokenizer appends it with a post-processor; a tokenizer that does
  not (the base Qwen3 one) gets one added here. Truncation counts the special tokens,
  so a truncated input still ends with EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer, processors

from .errors import InvalidInput, ModelError
from .model import ModelSpec

TRUNCATE_END, TRUNCATE_START, TRUNCATE_NONE = 0, 1, 2  # embedrpc.v1.Truncate
TRUNCATE_NAMES = {TRUNCATE_END: "TRUNCATE_END", TRUNCATE_START: "TRUNCATE_START",
                  TRUNCATE_NONE: "TRUNCATE_NONE"}
_FALLBACK_EOS = "<|endoftext|>"


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
    """Owns the tokenizer: prompts → ids with truncation and the EOS guarantee."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.max_length = spec.max_length
        try:
            base = Tokenizer.from_file(str(spec.tokenizer_path))
        except Exception as exc:  # the Rust side raises plain Exception
            raise ModelError(f"{spec.tokenizer_path}: cannot load tokenizer: {exc}") from exc
        base.no_padding()
        base.no_truncation()
        eos = spec.eos_token or (_FALLBACK_EOS if base.token_to_id(_FALLBACK_EOS) is not None
                                 else None)
        self.eos_id = base.token_to_id(eos) if eos else None
        self.appends_eos = False
        if spec.pooling == "lasttoken":
            if self.eos_id is None:
                raise ModelError(f"{spec.path}: last-token pooling needs an EOS token "
                                 "(eos_token in tokenizer_config.json)")
            if base.encode("a").ids[-1] != self.eos_id:
                # The pooled token must be EOS, as in the published Qwen3-Embedding tokenizer.
                base.post_processor = _append_eos(base.post_processor, eos, self.eos_id)
                self.appends_eos = True
        pad = spec.pad_token
        pad_id = base.token_to_id(pad) if pad else None
        self.pad_id = pad_id if pad_id is not None else (self.eos_id or 0)
        self.special_tokens = base.num_special_tokens_to_add(False)
        if self.max_length <= self.special_tokens:
            raise ModelError(f"max_length {self.max_length} leaves no room for text")
        # One tokenizer per truncation side: the setting is global to a Tokenizer.
        self._by_side = {}
        for mode, side in ((TRUNCATE_END, "right"), (TRUNCATE_START, "left")):
            tok = Tokenizer.from_str(base.to_str())
            tok.enable_truncation(self.max_length, direction=side)
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
        if truncate == TRUNCATE_NONE:
            lengths = [len(e) for e in encodings]
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
            truncated = [len(e) == self.max_length and bool(e.overflowing) for e in encodings]
        # From the list .ids builds: a third faster than np.fromiter over it.
        ids = [np.array(e.ids, dtype=np.int32) for e in encodings]
        if not all(len(a) for a in ids):  # only possible without EOS or other specials
            empty = next(i for i, a in enumerate(ids) if not len(a))
            raise InvalidInput(f"inputs[{empty}] has no tokens; this model needs non-empty text")
        return Encoded(ids=ids, truncated=truncated)

    def tokens(self, ids: np.ndarray) -> list[str]:
        tok = self._by_side[TRUNCATE_END]
        return [tok.id_to_token(int(i)) or "" for i in ids]


def _append_eos(existing: processors.PostProcessor | None, eos: str,
                eos_id: int) -> processors.PostProcessor:
    template = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)]
    )
    return processors.Sequence([existing, template]) if existing is not None else template
