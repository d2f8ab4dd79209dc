"""Pooling, Matryoshka truncation and L2 normalisation (numpy, float32).

Rows are right-padded: row i holds `lengths[i]` real tokens followed by padding.
"""

from __future__ import annotations

import numpy as np


def pool(hidden: np.ndarray, lengths: np.ndarray, mode: str) -> np.ndarray:
    """[B, L, H] hidden states → [B, H] pooled vectors (float32)."""
    rows = np.arange(hidden.shape[0])
    if mode == "lasttoken":
        # The last real token (EOS for Qwen3-Embedding); right padding puts it at len-1.
        return np.ascontiguousarray(hidden[rows, lengths - 1], dtype=np.float32)
    if mode == "cls":
        return np.ascontiguousarray(hidden[:, 0], dtype=np.float32)
    if mode == "mean":
        mask = np.arange(hidden.shape[1])[None, :] < lengths[:, None]
        # Selected, not multiplied by the mask: a padded position may hold inf or NaN
        # (kernels may leave padded rows unspecified), and NaN times 0 is NaN.
        real = np.where(mask[:, :, None], hidden.astype(np.float32, copy=False),
                        np.float32(0))
        return real.sum(axis=1) / np.maximum(lengths, 1)[:, None].astype(np.float32)
    raise ValueError(f"unknown pooling mode {mode!r}")


def finish(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka: keep the first `dimensions` values, then L2-normalise (if asked)."""
    out = np.array(vectors[:, :dimensions], dtype=np.float32)  # a copy we own
    if normalize:
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))  # np.linalg.norm's, a third less
        # A zero vector stays zero instead of becoming NaN (as torch's normalize does).
        np.maximum(norms, 1e-12, out=norms)
        out /= norms[:, None]
    return out
