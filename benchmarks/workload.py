"""The benchmark workload: one corpus, tokenized once, cut into the batch shapes each side runs.

Every backend in the suite embeds the same texts:

- requests: what gRPC clients send, `batch` texts per Embed call, in corpus order;
- `client_batches`: what a user of an in-process library runs for the same calls: each
  window of `concurrency` requests is length-sorted and cut into `batch`-row batches
  (sentence-transformers' `encode(window, batch_size=batch)` does exactly this);
- the server's own batches, recorded while it serves those requests (runners.ServerHost),
  which raw ONNX Runtime replays to measure what the server adds to the same work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedrpc.client.bench import LengthSpec, TextGenerator

WORDS = ("the of and to in is was for on that with as by at from his an were are which this "
         "be has had it or not but what all they their we one you there been more when will "
         "capital China Beijing gravity plants energy language model search query document "
         "北京 首都 天气 東京 Москва столица القاهرة Grüße München naïve café").split()
# 4..120 words, long-tailed: 24.5 words (about 54 tokens of the demo model) on average,
# the mean the suite's published figures were measured with.
LENGTHS = "lognormal:19.7:0.7:4:120"


def corpus(n: int, seed: int = 0) -> list[str]:
    """Texts of 4..120 words (a long-tailed, multilingual mix, like documents and queries),
    drawn by the load-test harness's generator from WORDS."""
    return TextGenerator(words=WORDS, seed=seed).texts(n, LengthSpec.parse(LENGTHS))


@dataclass(frozen=True)
class Packed:
    """One batch as a worker receives it: flat int32 ids and per-row lengths."""

    ids: np.ndarray
    lengths: np.ndarray
    texts: tuple[str, ...]

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded(self) -> int:
        return int(self.lengths.max()) * len(self.lengths)


def pack(items: Sequence[tuple[str, np.ndarray]]) -> Packed:
    return Packed(ids=np.concatenate([ids for _, ids in items]),
                  lengths=np.array([len(ids) for _, ids in items], dtype=np.int32),
                  texts=tuple(text for text, _ in items))


def pack_ids(batches: Sequence[Sequence[np.ndarray]]) -> list[Packed]:
    """Batches given as token ids only (recorded from the server)."""
    return [pack([("", ids) for ids in batch]) for batch in batches]


def client_batches(texts: Sequence[str], ids: Sequence[np.ndarray], *, batch: int,
                   window: int) -> list[Packed]:
    """Windows of `window` texts, each length-sorted and cut into `batch`-row batches."""
    out = []
    for start in range(0, len(texts), window):
        items = sorted(zip(texts[start:start + window], ids[start:start + window],
                           strict=True), key=lambda item: len(item[1]))
        out.extend(pack(items[i:i + batch]) for i in range(0, len(items), batch))
    return out
