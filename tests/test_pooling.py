"""Pooling, Matryoshka truncation and L2 normalisation against numpy written out here."""

from __future__ import annotations

import numpy as np
import pytest

from embedrpc.server.pooling import finish, pool

TOL = {"rtol": 1e-6, "atol": 1e-6}  # float32 results vs float64 references
RNG = np.random.default_rng(3)
LENGTHS = np.array([4, 1, 6, 3])
# Right-padded hidden states; the padding holds large values so a leak shows.
HIDDEN = RNG.standard_normal((4, 6, 5)).astype(np.float32)
for _row, _n in enumerate(LENGTHS):
    HIDDEN[_row, _n:] = 1e3


def reference(hidden: np.ndarray, mode: str) -> np.ndarray:
    rows = []
    for row, n in enumerate(LENGTHS):
        real = hidden[row, :n].astype(np.float64)
        rows.append({"lasttoken": real[n - 1], "cls": real[0],
                     "mean": real.sum(axis=0) / n}[mode])
    return np.stack(rows)


@pytest.mark.parametrize("mode", ["lasttoken", "mean", "cls"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_pool(mode: str, dtype: type) -> None:
    hidden = HIDDEN.astype(dtype)  # fp16: the reference sees the same rounded values
    out = pool(hidden, LENGTHS, mode)
    assert out.dtype == np.float32 and out.shape == (4, 5)
    np.testing.assert_allclose(out, reference(hidden, mode), **TOL)


@pytest.mark.parametrize("mode", ["lasttoken", "mean", "cls"])
def test_non_finite_padding_does_not_leak(mode: str) -> None:
    # Kernels may leave padded rows unspecified (inf, NaN): only real tokens count, so
    # the result is the reference computed from the real tokens alone (which are finite).
    hidden = HIDDEN.copy()
    for row, n in enumerate(LENGTHS):
        hidden[row, n:] = [np.nan, np.inf, -np.inf, np.nan, 1e3][:hidden.shape[2]]
    out = pool(hidden, LENGTHS, mode)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, reference(hidden, mode), **TOL)


def test_pool_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="max"):
        pool(HIDDEN, LENGTHS, "max")


@pytest.mark.parametrize("dimensions", [1, 3, 5])
def test_finish_truncates_then_normalises(dimensions: int) -> None:
    vectors = RNG.standard_normal((3, 5)).astype(np.float32) * 7
    out = finish(vectors, dimensions, normalize=True)
    kept = vectors[:, :dimensions].astype(np.float64)
    expected = kept / np.sqrt((kept**2).sum(axis=1, keepdims=True))
    assert out.dtype == np.float32 and out.shape == (3, dimensions)
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, **TOL)


def test_finish_without_normalize_only_truncates() -> None:
    vectors = RNG.standard_normal((2, 6)).astype(np.float32)
    out = finish(vectors, 4, normalize=False)
    np.testing.assert_array_equal(out, vectors[:, :4])
    out[:] = 0  # a copy: the caller's array is untouched
    assert np.all(vectors[:, :4] != 0)


def test_zero_vector_stays_zero() -> None:
    vectors = np.array([[0, 0, 0, 0], [3, 4, 0, 0]], dtype=np.float32)
    out = finish(vectors, 2, normalize=True)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[0], [0, 0])
    np.testing.assert_allclose(out[1], [0.6, 0.8], **TOL)  # 3-4-5 triangle


def test_finish_matches_a_float64_reference_at_several_rows() -> None:
    """The L2 norm finish uses (einsum of squares) against numpy's float64 norm; float32
    rounding only (relative 1e-6)."""
    rng = np.random.default_rng(3)
    for rows in (1, 2, 33):
        v = rng.standard_normal((rows, 1024)).astype(np.float32) * rng.uniform(1e-3, 1e3)
        want = v[:, :256].astype(np.float64)
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(finish(v, 256, True), want, rtol=1e-6, atol=1e-7)
