"""Pixels in and bits per dimension out: the preprocessing of FFJORD's image models.

Images are integer levels ``x ∈ {0, …, n_bins−1}^D`` (``n_bins = 256`` for 8-bit data). A
continuous density is fitted to dequantized pixels ``y = (x + u)/n_bins`` with
``u ~ U[0, 1)^D`` (Theis, van den Oord & Bethge, ICLR 2016), moved to the real line by the
logit transform ``s = logit(α + (1 − 2α)·y)`` whose log-determinant is part of the density
(Dinh, Sohl-Dickstein & Bengio, ICLR 2017; FFJORD, Grathwohl et al., ICLR 2019, uses
α = 1e-6 on MNIST and α = 0.05 on CIFAR10).

Two bits-per-dimension numbers come out of such a model, and they are never the same
function:

* :func:`dequantized_bits_per_dim` — the standard number, the one FFJORD, RNODE and the
  literature report: ``−(log p(y) − D·log n_bins)/(D·log 2)`` at uniformly dequantized
  pixels. Its expectation over ``u`` upper-bounds the discrete model's bits per dimension
  (Jensen's inequality).
* :func:`midpoint_bits_per_dim` — the same formula at the bin midpoints
  ``y = (x + ½)/n_bins``, no noise: the evaluation RNODE's code (Finlay et al., ICML 2020)
  runs. A one-point (midpoint-rule) estimate of each bin's probability, deterministic but
  not a bound, so it is reported beside the standard number, never in its place.
"""
from __future__ import annotations

import math
from typing import Callable

from array_api_compat import array_namespace

from ..base import Backend
from .objective import bits_per_dim, dequantize, logit_transform
from .signature import backend_keyword

__all__ = ["LOGIT_ALPHA", "bin_midpoints", "logit_preprocess", "logit_inverse", "dequantized_bits_per_dim",
           "midpoint_bits_per_dim"]

#: FFJORD's logit margin α per data set (RNODE's MNIST script uses 1e-5)
LOGIT_ALPHA = {"mnist": 1e-6, "cifar10": 0.05}


def _check_levels(levels) -> None:
    xp = array_namespace(levels)
    if not xp.isdtype(levels.dtype, "real floating"):
        raise TypeError(f"the pixel levels must be a floating array (got dtype {levels.dtype}); "
                        "convert them first, e.g. x.astype(float32), keeping the integer values 0 … n_bins−1")
    if levels.ndim < 2:
        raise ValueError(f"the pixel levels must be a batch, shape (batch, C, H, W), got shape {tuple(levels.shape)}")


def bin_midpoints(levels, *, n_bins: int = 256):
    """The centres of the pixels' quantization bins, ``(x + ½)/n_bins`` (no noise).

    :param levels: integer levels ``0 … n_bins−1`` in a floating array, shape ``(batch, ...)``.
    :param n_bins: the number of levels.
    :returns: ``(x + ½)/n_bins``, in ``(0, 1)``.
    :raises TypeError: for an integer array.
    """
    _check_levels(levels)
    return (levels + 0.5) / n_bins


@backend_keyword
def logit_preprocess(key, levels, *, alpha: float, n_bins: int = 256, backend: str | Backend | None = None):
    """FFJORD's image preprocessing: uniform dequantization ``y = (x + u)/n_bins`` then the
    logit transform ``s = logit(α + (1 − 2α)·y)``.

    :param key: a random key of the backend (one ``u`` per pixel).
    :param levels: integer levels ``0 … n_bins−1`` in a floating array, shape ``(batch, ...)``.
    :param alpha: the logit margin α in ``[0, 0.5)`` (:data:`LOGIT_ALPHA`: 1e-6 for MNIST,
        0.05 for CIFAR10).
    :param n_bins: the number of levels.
    :param backend: a backend name or object; inferred from ``levels`` when None.
    :returns: ``(s, log_det)``: ``s`` shaped like ``levels``; ``log_det`` the summed
        ``log |ds/dy|`` per image, so ``log p(y) = log p_s(s) + log_det``.
    :raises TypeError: for an integer array.
    :raises ValueError: for α outside ``[0, 0.5)``.
    """
    _check_levels(levels)
    return logit_transform(dequantize(key, levels, backend=backend, n_bins=n_bins), alpha=alpha)


def logit_inverse(s, *, alpha: float):
    """The pixels ``y = (σ(s) − α)/(1 − 2α)`` of logit-space values (sampling's last step).

    :param s: values on the real line (any array-API array).
    :param alpha: the margin α the forward transform used.
    :returns: ``y``, shaped like ``s``.
    :raises ValueError: for α outside ``[0, 0.5)``.
    """
    if not 0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
    xp = array_namespace(s)
    return (1.0 / (1.0 + xp.exp(-s)) - alpha) / (1 - 2 * alpha)


def _dimension(levels) -> int:
    return math.prod(levels.shape[1:])


@backend_keyword
def dequantized_bits_per_dim(log_prob: Callable, key, levels, *, n_bins: int = 256,
                             backend: str | Backend | None = None):
    """The standard bits per dimension: ``−(log p(y) − D·log n_bins)/(D·log 2)`` at
    uniformly dequantized pixels ``y = (x + u)/n_bins``, ``u ~ U[0, 1)^D``.

    This is the number FFJORD (Grathwohl et al. 2019) and RNODE (Finlay et al. 2020) report
    in their tables; averaged over ``u`` it upper-bounds the discrete model's bits per
    dimension. :func:`midpoint_bits_per_dim` is a different number.

    :param log_prob: ``log_prob(y) -> log p(y)`` per image, the model's density of pixels in
        ``[0, 1)^D`` with every log-determinant, the logit transform's included (e.g.
        ``lambda y: multiscale_log_prob(spec, fields, params, y, T=T)``).
    :param key: a random key of the backend (the dequantization noise).
    :param levels: integer levels ``0 … n_bins−1`` in a floating array, shape ``(batch, C, H, W)``.
    :param n_bins: the number of levels.
    :param backend: a backend name or object; inferred from ``levels`` when None.
    :returns: bits per dimension per image, shape ``(batch,)``; a uniform density gives
        ``log2(n_bins)`` (8 for 8-bit images).
    :raises TypeError: for an integer array.
    """
    _check_levels(levels)
    y = dequantize(key, levels, backend=backend, n_bins=n_bins)
    return bits_per_dim(log_prob(y), _dimension(levels), n_bins=n_bins)


def midpoint_bits_per_dim(log_prob: Callable, levels, *, n_bins: int = 256):
    """RNODE's evaluation number: ``−(log p(y) − D·log n_bins)/(D·log 2)`` at the bin
    midpoints ``y = (x + ½)/n_bins``, without noise.

    The density at a bin's centre times the bin's volume estimates the bin's probability
    (the midpoint rule): deterministic, but not a bound on the discrete model's bits per
    dimension, so it is not comparable with :func:`dequantized_bits_per_dim`, the number
    the papers' tables give; report it under its own name.

    :param log_prob: ``log_prob(y) -> log p(y)`` per image, as for :func:`dequantized_bits_per_dim`.
    :param levels: integer levels ``0 … n_bins−1`` in a floating array, shape ``(batch, C, H, W)``.
    :param n_bins: the number of levels.
    :returns: bits per dimension per image, shape ``(batch,)``.
    :raises TypeError: for an integer array.
    """
    return bits_per_dim(log_prob(bin_midpoints(levels, n_bins=n_bins)), _dimension(levels), n_bins=n_bins)
