"""FFJORD's 2-D toy distributions, seeded through an explicit ``numpy.random.Generator``.

The generators reproduce the distributions of FFJORD's ``lib/toy_data.py``
(Grathwohl et al., ICLR 2019; the same file serves RNODE) at their exact scale.
FFJORD's own code partly ignores its ``rng`` argument (checkerboard and 2spirals
draw from numpy's global generator; swissroll, circles and moons call scikit-learn
without a seed); here every draw comes from the one generator passed in.

Rows are independent draws. Where FFJORD builds a stratified batch (equal
component counts; rings, circles and moons on an equally spaced grid of angles;
the second spiral arm the mirror image of the first), each row here draws its
component and angle independently from the distribution that batch discretizes.
8gaussians and checkerboard make the same random calls in the same order as the
project's anchor scripts, so the same generator gives the same points.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np

from ...base.options import unknown_option_message

__all__ = ["DatasetInfo", "names", "info", "sample", "true_log_prob", "true_entropy"]

_SQRT1_2 = 1.0 / math.sqrt(2.0)
#: FFJORD's 8gaussians: unit vectors at multiples of 45° (in its order), radius 4, noise 0.5, all over 1.414
_UNIT8 = np.array([(1, 0), (-1, 0), (0, 1), (0, -1),
                   (_SQRT1_2, _SQRT1_2), (_SQRT1_2, -_SQRT1_2), (-_SQRT1_2, _SQRT1_2), (-_SQRT1_2, -_SQRT1_2)])
GAUSS8_CENTERS = _UNIT8 * 4.0 / 1.414
GAUSS8_SIGMA = 0.5 / 1.414
CHECKERBOARD_LOG_DENSITY = -math.log(32.0)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a toy distribution.

    :ivar name: the toy's name.
    :ivar dim: its dimension (2).
    :ivar description: the formula it is drawn from.
    :ivar density_known: whether :func:`true_log_prob` has its density in closed form.
    :ivar entropy: its differential entropy in nats when known, else None.
    :ivar entropy_method: how that number was obtained, else None.
    """

    name: str
    dim: int
    description: str
    density_known: bool
    entropy: float | None
    entropy_method: str | None


# ---------------------------------------------------------------------------------------------
# generators: each takes (rng, n) and returns float64 (n, 2)


def _gauss8(rng: np.random.Generator, n: int) -> np.ndarray:
    pts = rng.standard_normal((n, 2)) * 0.5 + 4.0 * _UNIT8[rng.integers(0, 8, n)]
    return pts / 1.414


def _checkerboard(rng: np.random.Generator, n: int) -> np.ndarray:
    x1 = rng.random(n) * 4 - 2
    x2_ = rng.random(n) - rng.integers(0, 2, n) * 2
    x2 = x2_ + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1) * 2


def _pinwheel(rng: np.random.Generator, n: int) -> np.ndarray:
    features = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])  # radial, tangential std
    features[:, 0] += 1.0
    arm = rng.integers(0, 5, n)
    angles = 2 * np.pi * arm / 5 + 0.25 * np.exp(features[:, 0])
    c, s = np.cos(angles), np.sin(angles)
    a, b = features[:, 0], features[:, 1]
    return 2 * np.stack([a * c + b * s, -a * s + b * c], 1)


def _2spirals(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.sqrt(rng.random(n)) * 540 * (2 * np.pi) / 360
    px = -np.cos(t) * t + rng.random(n) * 0.5
    py = np.sin(t) * t + rng.random(n) * 0.5
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
    x = sign[:, None] * np.stack([px, py], 1) / 3
    return x + rng.standard_normal((n, 2)) * 0.1


def _swissroll(rng: np.random.Generator, n: int) -> np.ndarray:
    # scikit-learn's make_swiss_roll(noise=1.0), columns [0, 2] (the roll's plane), over 5
    t = 1.5 * np.pi * (1 + 2 * rng.random(n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2)) * 1.0
    return x / 5


def _circles(rng: np.random.Generator, n: int) -> np.ndarray:
    # make_circles(factor=0.5, noise=0.08) times 3: radii 3 and 1.5, noise 0.24
    radius = np.where(rng.integers(0, 2, n) == 0, 1.0, 0.5)
    theta = rng.random(n) * 2 * np.pi
    x = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1) + rng.standard_normal((n, 2)) * 0.08
    return x * 3


def _moons(rng: np.random.Generator, n: int) -> np.ndarray:
    # make_moons(noise=0.1) * 2 + (-1, -0.2)
    inner = rng.integers(0, 2, n) == 1
    theta = rng.random(n) * np.pi
    c, s = np.cos(theta), np.sin(theta)
    x = np.where(inner[:, None], np.stack([1 - c, 1 - s - 0.5], 1), np.stack([c, s], 1))
    x = x + rng.standard_normal((n, 2)) * 0.1
    return x * 2 + np.array([-1.0, -0.2])


def _rings(rng: np.random.Generator, n: int) -> np.ndarray:
    radius = 3.0 * np.array([1.0, 0.75, 0.5, 0.25])[rng.integers(0, 4, n)]
    theta = rng.random(n) * 2 * np.pi
    x = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], 1)
    return x + rng.standard_normal((n, 2)) * 0.08


# ---------------------------------------------------------------------------------------------
# densities


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _gauss8_log_prob(x: np.ndarray) -> np.ndarray:
    d2 = np.sum((x[..., None, :] - GAUSS8_CENTERS) ** 2, axis=-1)
    return _logsumexp(-d2 / (2 * GAUSS8_SIGMA ** 2), axis=-1) - math.log(8.0) \
        - math.log(2 * math.pi * GAUSS8_SIGMA ** 2)


def _checkerboard_log_prob(x: np.ndarray) -> np.ndarray:
    inside = np.all((x >= -4) & (x < 4), axis=-1)
    i, j = np.floor(x[..., 0] / 2), np.floor(x[..., 1] / 2)
    even = (i + j) % 2 == 0
    return np.where(inside & even, CHECKERBOARD_LOG_DENSITY, -np.inf)


@functools.lru_cache(maxsize=None)
def _gauss8_entropy(nodes: int = 100) -> float:
    """−E[log p] by product Gauss–Hermite quadrature under one component.

    The mixture is invariant under rotation by 45° (which permutes its components), so
    H = −Σ_k ⅛ E_{N_k}[log p] = −E_{N_0}[log p], a Gaussian expectation of a smooth
    function. 60 nodes per axis already agree with 320 to 1e-15.
    """
    z, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(−z²/2)
    w = w / w.sum()
    grid = np.stack(np.meshgrid(z, z, indexing="ij"), -1) * GAUSS8_SIGMA + GAUSS8_CENTERS[0]
    return float(-np.sum(np.outer(w, w) * _gauss8_log_prob(grid)))


# ---------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class _Toy:
    draw: object
    description: str
    log_prob: object = None
    entropy: object = None  # a zero-argument callable
    entropy_method: str | None = None


_TOYS: dict[str, _Toy] = {
    "8gaussians": _Toy(
        _gauss8,
        "equal mixture of 8 isotropic Gaussians: centres (4/1.414)·(cos kπ/4, sin kπ/4), σ = 0.5/1.414",
        _gauss8_log_prob, _gauss8_entropy,
        "Gauss–Hermite quadrature (100×100 nodes) of −E[log p] under one component, exact by the "
        "mixture's 45° symmetry; converged to 1e-15",
    ),
    "checkerboard": _Toy(
        _checkerboard,
        "uniform on the 8 cells of side 2 in [−4, 4)² where ⌊x₁/2⌋ + ⌊x₂/2⌋ is even (density 1/32)",
        _checkerboard_log_prob, lambda: math.log(32.0),
        "closed form: log 32 (uniform density 1/32 on an area of 32)",
    ),
    "pinwheel": _Toy(
        _pinwheel,
        "5 arms: a ~ N(1, 0.3²), b ~ N(0, 0.1²), θ = 2πk/5 + 0.25·eᵃ, x = 2·(a cos θ + b sin θ, b cos θ − a sin θ)",
    ),
    "2spirals": _Toy(
        _2spirals,
        "two interleaved spirals: t = 3π√U, p = (−t cos t + U₁/2, t sin t + U₂/2), x = ±p/3 + N(0, 0.1²)",
    ),
    "swissroll": _Toy(
        _swissroll,
        "t = 1.5π(1 + 2U), x = (t cos t + ε₁, t sin t + ε₂)/5 with ε ~ N(0, 1)",
    ),
    "circles": _Toy(
        _circles,
        "two concentric circles of radii 3 and 1.5 (equal weight), uniform angle, Gaussian noise σ = 0.24",
    ),
    "moons": _Toy(
        _moons,
        "two interleaving half circles (cos θ, sin θ) and (1 − cos θ, 0.5 − sin θ), θ ~ U[0, π], "
        "noise σ = 0.1, then ×2 + (−1, −0.2)",
    ),
    "rings": _Toy(
        _rings,
        "four concentric circles of radii 3, 2.25, 1.5, 0.75 (equal weight), uniform angle, noise σ = 0.08",
    ),
}


def names() -> tuple[str, ...]:
    """The names of the 2-D toy distributions (FFJORD's, Grathwohl et al. 2019, and more).

    :returns: the names :func:`sample` accepts.
    """
    return tuple(_TOYS)


def _toy(name: str) -> _Toy:
    if not isinstance(name, str) or name not in _TOYS:
        raise ValueError(unknown_option_message("dataset", str(name), _TOYS))
    return _TOYS[name]


def info(name: str) -> DatasetInfo:
    """What is known about the toy ``name``.

    :param name: one of :func:`names`.
    :returns: its :class:`DatasetInfo` (dimension, formula, the true entropy when known).
    :raises ValueError: an unknown name (naming the nearest).
    """
    toy = _toy(name)
    return DatasetInfo(
        name=name, dim=2, description=toy.description, density_known=toy.log_prob is not None,
        entropy=toy.entropy() if toy.entropy is not None else None, entropy_method=toy.entropy_method,
    )


def _generator(seed, rng) -> np.random.Generator:
    if rng is not None:
        if seed is not None:
            raise TypeError("give either seed= or rng=, not both")
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return rng
    return np.random.default_rng(0 if seed is None else seed)


def sample(name: str, n: int, *, seed: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` independent points of the toy ``name``.

    :param name: one of :func:`names`.
    :param n: the number of points, ≥ 0.
    :param seed: seeds ``numpy.random.default_rng`` (0 when neither ``seed`` nor ``rng`` is
        given): the same seed gives the same points.
    :param rng: a generator to draw from instead (it advances).
    :returns: a float64 array of shape ``(n, 2)``.
    :raises ValueError: an unknown name or a negative ``n``.
    :raises TypeError: a non-integer ``n``, or both ``seed`` and ``rng``.
    """
    toy = _toy(name)
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"n must be an integer, got {n!r}") from None
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    out = toy.draw(_generator(seed, rng), n)
    return np.ascontiguousarray(out, dtype=np.float64)


def true_log_prob(name: str, x) -> np.ndarray:
    """The true log-density of the toy ``name``.

    Known for ``checkerboard`` (log 1/32 on the support, −inf off it) and ``8gaussians``.

    :param name: a toy whose density is known.
    :param x: points of shape ``(..., 2)``.
    :returns: the log-densities, shape ``x.shape[:-1]``.
    :raises ValueError: a toy without a closed-form density, or points not of shape ``(..., 2)``.
    """
    toy = _toy(name)
    if toy.log_prob is None:
        known = [k for k, t in _TOYS.items() if t.log_prob is not None]
        raise ValueError(f"the density of {name!r} has no closed form here; known: {', '.join(known)}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2), got {x.shape}")
    return toy.log_prob(x)


def true_entropy(name: str) -> float | None:
    """The differential entropy of the toy ``name``: the lowest NLL a model can reach.

    ``checkerboard``: log 32 = 3.4657; ``8gaussians``: 2.83188 (quadrature, see :func:`info`).

    :param name: one of :func:`names`.
    :returns: the entropy in nats, or None when the density is not known.
    :raises ValueError: an unknown name.
    """
    toy = _toy(name)
    return toy.entropy() if toy.entropy is not None else None
