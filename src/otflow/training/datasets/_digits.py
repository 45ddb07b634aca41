"""scikit-learn's 8×8 digits (17 intensity levels) and the helpers to model them as a density.

The images are the 1797 test digits of the UCI "Optical Recognition of Handwritten
Digits" set that scikit-learn ships inside its package (nothing is downloaded):
8×8 pixels, each an integer count 0–16. There are 17 levels, not 256, so the
dequantized data are ``(x + u)/17`` and bits per dimension use ``log 17``.
"""
from __future__ import annotations

import numpy as np

from ...cnf.objective import bits_per_dim, logit_transform
from ._split import Split
from ._toys import _generator

__all__ = ["DIGITS_LEVELS", "DIGITS_DIM", "load_digits", "digits_dequantize", "digits_logit",
           "digits_bits_per_dim"]

#: intensity levels of a digits pixel: the integers 0, 1, …, 16
DIGITS_LEVELS = 17
#: pixels per image (8 × 8)
DIGITS_DIM = 64


def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:
        raise ImportError(
            "otflow.datasets.load_digits needs scikit-learn (it ships the digits; nothing is downloaded): "
            "pip install scikit-learn, or pip install 'otflow[data]'"
        ) from e
    bunch = _load()
    return bunch.images, bunch.target


def load_digits(*, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                images: bool = False, return_labels: bool = False):
    """The 1797 digits as integer levels 0–16, shuffled and split train/val/test.

    With the default fractions the split has 1437 / 180 / 180 images (validation and
    test sizes are ``round(fraction·1797)``, training takes the rest).

    :param seed: seeds the shuffle.
    :param fractions: the train, validation and test fractions (non-negative, summing to 1).
    :param images: rows as ``(1, 8, 8)`` images instead of vectors of 64 pixels.
    :param return_labels: also return the digit classes.
    :returns: a :class:`Split` of int64 levels; with ``return_labels``, ``(split, labels)``,
        ``labels`` a :class:`Split` of the classes in the same order.
    :raises ValueError: bad fractions.
    :raises ImportError: without scikit-learn (which ships the digits).
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    pixels, target = _sklearn_digits()
    x = np.rint(np.asarray(pixels)).astype(np.int64)
    y = np.asarray(target).astype(np.int64)
    n = x.shape[0]
    x = x.reshape(n, 1, 8, 8) if images else x.reshape(n, DIGITS_DIM)
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(fractions[1] * n), round(fractions[2] * n)
    n_train = n - n_val - n_test
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    split = Split(*(x[p] for p in parts))
    if return_labels:
        return split, Split(*(y[p] for p in parts))
    return split


def digits_dequantize(x, *, seed: int | None = None, rng: np.random.Generator | None = None,
                      n_levels: int = DIGITS_LEVELS) -> np.ndarray:
    """Uniform dequantization (Theis, van den Oord & Bethge 2016): integer levels
    ``x ∈ {0, …, 16}`` to ``y = (x + u)/17 ∈ [0, 1)``, ``u ~ U[0, 1)`` independently per pixel
    (:func:`otflow.dequantize` on numpy).

    :param x: the levels (any numeric array of integers in range).
    :param seed: seeds ``numpy.random.default_rng`` (0 when neither ``seed`` nor ``rng`` is given).
    :param rng: a generator to draw ``u`` from instead (it advances).
    :param n_levels: the number of levels.
    :returns: ``y`` as float64, shaped like ``x``.
    :raises ValueError: values that are not integer levels ``0 … n_levels − 1``.
    """
    x = np.asarray(x)
    if x.size and (not np.all(np.equal(np.mod(x, 1), 0)) or x.min() < 0 or x.max() > n_levels - 1):
        raise ValueError(f"x must hold integer levels 0…{n_levels - 1}")
    u = _generator(seed, rng).random(x.shape)
    return (x.astype(np.float64) + u) / n_levels


def digits_logit(y, *, alpha: float = 1e-6):
    """The logit transform of dequantized digits (:func:`otflow.logit_transform`).

    A flow trained on ``s`` gives ``log p(y) = log p(s) + log_det``;
    :func:`digits_bits_per_dim` adds ``log_det`` back.

    :param y: dequantized digits in ``[0, 1)``, one row per image.
    :param alpha: the margin α in ``[0, 0.5)``.
    :returns: ``(s, log_det)``: ``s = logit(α + (1 − 2α)·y)`` and ``log |ds/dy|`` summed per row.
    """
    return logit_transform(np.asarray(y, dtype=np.float64), alpha=alpha)


def digits_bits_per_dim(log_prob, *, log_det=None, dim: int = DIGITS_DIM,
                        n_levels: int = DIGITS_LEVELS) -> np.ndarray:
    """Bits per pixel of digits from a log-density of the dequantized (and maybe logit) data:
    ``−(log p(y) − 64·log 17)/(64·log 2)`` (:func:`otflow.bits_per_dim` with ``n_bins=17``),
    an upper bound on the discrete negative log-likelihood; the uniform density gives
    log₂ 17 ≈ 4.087.

    :param log_prob: ``log p(y)`` on ``[0, 1)^64``, or ``log p(s)`` of the logit-transformed data.
    :param log_det: with ``log p(s)``, the ``log_det`` :func:`digits_logit` returned.
    :param dim: pixels per image.
    :param n_levels: levels per pixel.
    :returns: bits per pixel, one per row.
    """
    lp = np.asarray(log_prob, dtype=np.float64)
    if log_det is not None:
        lp = lp + np.asarray(log_det, dtype=np.float64)
    return bits_per_dim(lp, dim, n_bins=n_levels)
