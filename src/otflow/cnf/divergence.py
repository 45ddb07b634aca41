"""Divergence estimators: the trace of a field's Jacobian, exactly or stochastically.

A continuous normalizing flow transports log-density by the instantaneous change of
variables ``d log p(z(t))/dt = −tr(∂v/∂z)`` (Chen et al. 2018), so every function
evaluation of a CNF needs the divergence of the velocity field ``v``. This module
computes it for a *field* ``fn(x) -> v``: ``x`` has shape ``(batch, *features)``, ``v``
the same shape, and row ``i`` of ``v`` depends only on row ``i`` of ``x`` (no batch
normalization across rows). The divergence of a row is the trace of its Jacobian over
the flattened features, ``d = prod(features)``; image-shaped features ``(C, H, W)``
work as well as vectors.

Because rows are independent, one vector–Jacobian product (VJP) of the whole batch
with a cotangent ``ε`` of shape ``x.shape`` gives every row's ``εᵢᵀ ∂vᵢ/∂xᵢ`` at once.

The estimators, each returning a :class:`DivergenceEstimate` (the backend is a keyword,
``backend=``, or inferred from ``x``):

* :func:`exact_divergence` — the full trace, ``d`` Jacobian–vector products
  vectorized with ``vmap`` (reverse mode: VJPs with the basis vectors; or forward mode:
  JVPs), optionally in chunks of the basis to bound memory.
* :func:`hutchinson_divergence` — Hutchinson's (1989) estimator ``εᵀJε`` with Gaussian
  or Rademacher probes, as FFJORD (Grathwohl et al. 2019) and RNODE (Finlay et al.
  2020) use it, averaged over any number of probes, with its sample variance.
* :func:`hutchplusplus_divergence` — Hutch++ (Meyer, Musco, Musco & Woodruff 2021):
  a third of the products find the dominant subspace of the Jacobian, whose trace is
  taken exactly; Hutchinson estimates the rest. Better than Hutchinson when the
  Jacobian's spectrum decays, worse (up to 3× the variance) when it is flat.
* :func:`estimate_divergence` — one front end for the three.

:func:`probe_vjp` is the training hot path: one VJP gives both the Hutchinson
divergence and ``εᵀ∂v/∂x``, from which RNODE's Jacobian Frobenius regularizer
``mean_d (εᵀ∂v/∂x)²`` is formed without another pass; it returns the tuple
``(v, div, eps_jac)``.

Only VJPs are needed for the stochastic estimators (``tr(J) = tr(Jᵀ)``, so a probe's
quadratic form ``εᵀJε`` can be read off ``εᵀJ``), which every backend with autodiff
provides; the results compose with an enclosing reverse pass (training
differentiates through them).

References: M. F. Hutchinson, "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", Communications in Statistics – Simulation and
Computation 18(3), 1989. W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever,
D. Duvenaud, "FFJORD: Free-form continuous dynamics for scalable reversible generative
models", ICLR 2019. C. Finlay, J.-H. Jacobsen, L. Nurbekyan, A. M. Oberman, "How to
train your neural ODE: the world of Jacobian and kinetic regularization", ICML 2020.
R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal stochastic trace
estimation", SOSA 2021.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

from ..base.errors import CapabilityError
from ..base.options import reject_unknown_keywords, unknown_option_message
from ..base import Backend, get_backend
from .signature import backend_keyword

__all__ = [
    "DivergenceEstimate",
    "estimate_divergence",
    "probe_vjp",
    "exact_divergence",
    "hutchinson_divergence",
    "hutchplusplus_divergence",
    "ESTIMATORS",
    "PROBES",
    "EXACT_METHODS",
]

#: estimators :func:`estimate_divergence` knows
ESTIMATORS = ("exact", "hutchinson", "hutch++")
#: probe distributions: standard normal entries, or ±1 with equal probability
PROBES = ("gaussian", "rademacher")
#: ways :func:`exact_divergence` computes the trace: ``"vjp"`` (reverse mode: ``vmap``
#: of the VJP over the basis), ``"jvp"`` (forward mode: ``vmap`` of the JVP over the
#: basis), ``"loop"`` (a Python loop of ``d`` VJPs), ``"auto"`` (the loop on eager backends
#: up to d = 8, else the faster vectorized mode measured for the backend)
EXACT_METHODS = ("auto", "vjp", "jvp", "loop")

#: The exact-trace method ``"auto"`` picks per backend name, by measurement on 2 CPU cores
#: (3-hidden-layer tanh MLP of width 64, batch 512, float32, d = 2, 16, 64;
#: ``python -m validation.divergence_estimators --timing``; numbers in docs/divergence.md):
#: torch's reverse mode is 1.5–2.4× faster than its forward mode; in JAX forward mode was at
#: most 1.35× faster, within the run-to-run spread, and reverse mode also works through
#: ``jax.custom_vjp`` functions, which forward mode cannot differentiate. Backends not
#: listed use ``"vjp"``.
_EXACT_DEFAULT = {"torch": "vjp", "jax": "vjp"}
#: ``method="auto"`` loops over the basis on eager backends up to this dimension
_LOOP_MAX_DIM = 8


# ------------------------------------------------------------------------------------------
# small helpers


def _sum_features(xp, a, lead: int):
    """Sum ``a`` over every axis after the first ``lead`` ones."""
    if a.ndim == lead:
        return a
    return xp.sum(a, axis=tuple(range(lead, a.ndim)))


def _require_autodiff(backend: Backend, what: str) -> None:
    if not backend.has_autodiff:
        raise CapabilityError(
            f"{what} needs Jacobian products of the field (automatic differentiation), and the "
            f"{backend.name!r} backend has none: a field's divergence cannot be recovered from its "
            "values alone. Pass torch or JAX arrays (or backend='torch' / backend='jax'; "
            "pip install 'otflow[torch]' or 'otflow[jax]'), or use the closed-form trace if you know it."
        )


def _check_probe(probe) -> str:
    if probe not in PROBES:
        raise ValueError(unknown_option_message("probe", str(probe), PROBES))
    return probe


def _check_count(name: str, value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive int, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")
    return n


def _check_matvecs(n_matvecs) -> int:
    n = _check_count("n_matvecs", n_matvecs)
    if n % 3:
        lo, hi = 3 * (n // 3), 3 * (n // 3 + 1)
        nearest = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(
            f"Hutch++ splits its matrix–vector products into three equal parts, so their number must be "
            f"a multiple of 3; got {n} (use {nearest})."
        )
    return n


def _draw(backend: Backend, key, shape, probe: str, x):
    device = backend.device_of(x)
    if probe == "gaussian":
        return backend.normal(key, tuple(shape), dtype=x.dtype, device=device)
    return backend.rademacher(key, tuple(shape), dtype=x.dtype, device=device)


def _vjp_map(backend: Backend, fn: Callable, x):
    """``(v, mv)`` with ``mv(c)`` the row-wise products ``cᵀ ∂v/∂x`` for a stack ``c`` of
    cotangents of shape ``(k, *x.shape)`` (one forward pass, ``k`` vectorized VJPs)."""
    v, vjp_fn = backend.vjp(fn, x)
    return v, backend.vmap(lambda c: vjp_fn(c)[0])


# ------------------------------------------------------------------------------------------
# the result


@dataclass(frozen=True)
class DivergenceEstimate:
    """What every divergence estimator returns.

    :param mean: the estimate of ``tr(∂v/∂x)`` per row, shape ``(batch,)``.
    :param variance: per row, the unbiased sample variance of the single-probe estimates
        that were averaged (Hutchinson: the ``n_probes`` values ``εᵀJε``; Hutch++: the
        ``n_probes/3`` residual probes — the exact part adds no variance, since it is
        unbiased for every sketch — so ``variance / n_averaged`` estimates the variance of
        ``mean`` in both cases); ``None`` for the exact trace and when fewer than two
        probes were averaged.
    :param n_probes: Jacobian products used per row (``d`` for the exact trace).
    :param estimator: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``.
    :param velocity: the field's value ``v = fn(x)``, computed in the same forward pass
        (the CNF integrates it next to the divergence).
    """

    mean: Any
    variance: Any | None
    n_probes: int
    estimator: str
    velocity: Any = None

    @property
    def n_averaged(self) -> int:
        """How many single-probe estimates ``variance`` describes (and ``mean`` averages)."""
        return self.n_probes // 3 if self.estimator == "hutch++" else self.n_probes

    @property
    def standard_error(self):
        """``sqrt(variance / n_averaged)`` per row, or ``None`` with no variance."""
        if self.variance is None:
            return None
        return (self.variance / self.n_averaged) ** 0.5


# ------------------------------------------------------------------------------------------
# the training hot path


def _probe_vjp(backend: Backend, fn: Callable, x, eps):
    """:func:`probe_vjp` with the backend resolved: the dynamics call this once per
    right-hand-side evaluation, so it skips the public function's argument handling."""
    v, vjp_fn = backend.vjp(fn, x)
    (eps_jac,) = vjp_fn(eps)
    div = _sum_features(backend.namespace(), eps_jac * eps, 1)
    return v, div, eps_jac


@backend_keyword
def probe_vjp(fn: Callable, x, eps, *, backend: str | Backend | None = None):
    """One vector–Jacobian product with the probe ``eps``: the Hutchinson divergence and
    the RNODE Jacobian term from the same pass.

    This is what FFJORD (Grathwohl et al. 2019) and RNODE (Finlay et al. 2020) evaluate at
    every step of a solve, with one probe drawn per solve. RNODE's Jacobian Frobenius
    regularizer is ``mean_features(eps_jac ** 2)``, an unbiased estimate of ``‖∂v/∂x‖²_F / d``
    for any probe with ``E[εεᵀ] = I`` (Gaussian or Rademacher), from this same VJP.
    Exactly one forward and one reverse pass through ``fn``; everything composes with an
    enclosing reverse pass.

    :param fn: the field, ``fn(x) -> v`` with ``v.shape == x.shape``, rows independent.
    :param x: points, shape ``(batch, *features)``.
    :param eps: the probe, shape of ``x`` (Gaussian or Rademacher entries).
    :param backend: a backend with autodiff (name or object); inferred from ``x`` when None.
    :returns: ``(v, div, eps_jac)``: ``v = fn(x)``; ``eps_jac = εᵀ ∂v/∂x`` per row (shape of
        ``x``); ``div = Σ_features eps_jac · ε``, shape ``(batch,)``, an unbiased estimate of
        ``tr(∂v/∂x)`` per row (Hutchinson 1989) when ``E[εεᵀ] = I``.
    :raises CapabilityError: when the backend cannot differentiate.
    """
    be = get_backend(backend, like=x)
    _require_autodiff(be, "probe_vjp")
    return _probe_vjp(be, fn, x, eps)


# ------------------------------------------------------------------------------------------
# exact trace


def _resolve_exact_method(backend: Backend, method, d: int) -> str:
    """The concrete method for ``method``; ``"auto"`` loops over the basis on eager backends
    up to ``d = 8`` (they pay a fixed cost per vmap call: torch, d = 2, batch 10 000 took
    0.21 s per evaluation solve with the loop against 0.47 s with the vmapped basis), else
    takes the backend's entry of ``_EXACT_DEFAULT``."""
    if method not in EXACT_METHODS:
        raise ValueError(unknown_option_message("exact-divergence method", str(method), EXACT_METHODS))
    if method != "auto":
        return method
    if backend.eager and d <= _LOOP_MAX_DIM:
        return "loop"
    return _EXACT_DEFAULT.get(backend.name, "vjp")


def _exact_trace(backend: Backend, fn: Callable, x, method: str = "auto", chunk_size: int | None = None):
    """``(v, div)``: :func:`exact_divergence` with the backend resolved (the evaluation
    dynamics call this once per right-hand-side evaluation)."""
    _require_autodiff(backend, "the exact divergence")
    xp = backend.namespace()
    batch, feat = x.shape[0], tuple(x.shape[1:])
    d = math.prod(feat)
    n_chunks = 1 if chunk_size is None else math.ceil(d / _check_count("chunk_size", chunk_size))
    method = _resolve_exact_method(backend, method, d)
    device = backend.device_of(x)
    if method == "loop":
        return _loop_trace(backend, fn, x, d, feat)
    c = math.ceil(d / n_chunks)  # equal chunks; basis rows past d are zero and add nothing
    if method == "vjp":
        v, products = _vjp_map(backend, fn, x)
    else:
        v = fn(x)
        products = backend.vmap(lambda t: backend.jvp(fn, (x,), (t,))[1])
    cols = xp.reshape(xp.arange(d, device=device), (1, d))
    zero = xp.zeros((), dtype=x.dtype, device=device)

    def chunk_trace(start):
        rows = xp.reshape(xp.arange(c, device=device) + start, (c, 1))
        mask = xp.broadcast_to(xp.reshape(rows == cols, (c, 1, *feat)), (c, batch, *feat))
        basis = xp.astype(mask, x.dtype)
        # the diagonal entries picked with a select, not as sum(products * basis): XLA:CPU
        # reads a multiply-and-sum as a contraction and fuses the whole vmapped backward
        # pass with it into one kernel, about 1.6x slower per evaluation (d = 2, 10 000
        # rows) than the separate, 2-way partitioned kernels that a select leaves
        diagonal = xp.where(mask, products(basis), zero)
        return xp.sum(_sum_features(xp, diagonal, 2), axis=0)

    if n_chunks == 1:
        return v, chunk_trace(0)
    return v, backend.fori_loop(0, n_chunks, lambda i, acc: acc + chunk_trace(i * c),
                                xp.zeros((batch,), dtype=x.dtype, device=device))


def _loop_trace(backend: Backend, fn: Callable, x, d: int, feat: tuple):
    """FFJORD's way: one forward pass and a Python loop of ``d`` VJPs with the basis vectors."""
    xp = backend.namespace()
    v, vjp_fn = backend.vjp(fn, x)
    cols = xp.reshape(xp.arange(d, device=backend.device_of(x)), (1, *feat))
    div = None
    for k in range(d):
        e = xp.broadcast_to(xp.astype(cols == k, x.dtype), x.shape)
        term = xp.reshape(vjp_fn(e)[0], (x.shape[0], d))[:, k]  # row k of eₖᵀJ: J_kk, no product or sum
        div = term if div is None else div + term
    return v, div


@backend_keyword
def exact_divergence(fn: Callable, x, *, backend: str | Backend | None = None, method: str = "auto",
                     chunk_size: int | None = None) -> DivergenceEstimate:
    """The exact divergence ``tr(∂v/∂x)`` of every row: ``d`` Jacobian products with the
    basis vectors.

    The cost is ``d`` products, so this is the evaluation default for small ``d`` and
    the reference the stochastic estimators are tested against. On a backend whose
    ``vmap`` is a Python loop (``has_vmap`` False) it still works, ``d`` times slower.

    :param fn: the field, ``fn(x) -> v`` with ``v.shape == x.shape``, rows independent.
    :param x: points, shape ``(batch, *features)``; ``d = prod(features)``.
    :param backend: a backend with autodiff (name or object); inferred from ``x`` when None.
    :param method: ``"vjp"`` — one forward pass, then ``vmap`` of the VJP over the basis
        (row ``k`` of ``eₖᵀJ`` is ``J_kk``); ``"jvp"`` — ``vmap`` of the forward-mode JVP
        over the basis (plus one plain forward pass for ``v``); ``"loop"`` — one forward pass
        and a Python loop of ``d`` VJPs (FFJORD's way; fastest on eager backends for small
        ``d``); ``"auto"`` — ``"loop"`` on eager backends up to d = 8, else the faster of
        ``"vjp"``/``"jvp"`` as measured for the backend (see docs/divergence.md).
    :param chunk_size: process at most this many basis vectors at a time. The vectorized
        products hold ``chunk_size × batch × d`` numbers (``d × batch × d`` unchunked,
        e.g. 1.2 GB in float32 for batch 512 and d = 784); chunks run in the backend's
        ``fori_loop`` (a compiled, differentiable loop in JAX).
    :returns: a :class:`DivergenceEstimate` with ``mean`` the trace per row, ``variance``
        None, ``n_probes = d`` and ``velocity = fn(x)``.
    :raises CapabilityError: when the backend cannot differentiate.
    """
    be = get_backend(backend, like=x)
    v, div = _exact_trace(be, fn, x, method, chunk_size)
    return DivergenceEstimate(mean=div, variance=None, n_probes=math.prod(x.shape[1:]), estimator="exact",
                              velocity=v)


# ------------------------------------------------------------------------------------------
# Hutchinson


def _hutchinson(backend: Backend, fn: Callable, x, key, n: int, probe: str):
    """``(v, mean, var)`` of ``n`` probes; ``var`` None for one probe."""
    xp = backend.namespace()
    if n == 1:
        eps = _draw(backend, key, x.shape, probe, x)
        v, div, _ = _probe_vjp(backend, fn, x, eps)
        return v, div, None
    eps = _draw(backend, key, (n, *x.shape), probe, x)
    v, products = _vjp_map(backend, fn, x)
    samples = _sum_features(xp, products(eps) * eps, 2)  # (n, batch)
    mean = xp.mean(samples, axis=0)
    var = xp.sum((samples - mean) ** 2, axis=0) / (n - 1)
    return v, mean, var


@backend_keyword
def hutchinson_divergence(fn: Callable, x, key, *, backend: str | Backend | None = None, n_probes: int = 1,
                          probe: str = "gaussian") -> DivergenceEstimate:
    """Hutchinson's estimator of the divergence, averaged over ``n_probes`` probes.

    For a row with Jacobian ``J`` and ``S = (J + Jᵀ)/2`` a single probe has variance
    ``2‖S‖²_F`` (Gaussian) or ``2(‖S‖²_F − Σᵢ Jᵢᵢ²)`` (Rademacher, the minimum over probe
    distributions with identity covariance; Hutchinson 1989).

    :param fn: the field, ``fn(x) -> v`` with ``v.shape == x.shape``, rows independent.
    :param x: points, shape ``(batch, *features)``.
    :param key: a random key of the backend (each row gets its own probes).
    :param backend: a backend with autodiff (name or object); inferred from ``x`` when None.
    :param n_probes: probes per row; they share one forward pass and their VJPs run
        vectorized (``vmap`` over the probes).
    :param probe: ``"gaussian"`` (FFJORD/RNODE's default) or ``"rademacher"``.
    :returns: a :class:`DivergenceEstimate`: ``mean`` (batch,) the average of the
        single-probe estimates ``εᵀJε``; ``variance`` (batch,) their unbiased sample
        variance, ``None`` when ``n_probes == 1``; ``velocity = fn(x)``.
    :raises CapabilityError: when the backend cannot differentiate.
    """
    _check_probe(probe)
    n = _check_count("n_probes", n_probes)
    be = get_backend(backend, like=x)
    _require_autodiff(be, "Hutchinson's divergence estimator")
    v, mean, var = _hutchinson(be, fn, x, key, n, probe)
    return DivergenceEstimate(mean=mean, variance=var, n_probes=n, estimator="hutchinson", velocity=v)


# ------------------------------------------------------------------------------------------
# Hutch++


def _orthonormalize(xp, y):
    """An orthonormal basis of the column space of each matrix in ``y`` (batch, d, k):
    ``Q`` of shape (batch, d, min(d, k)). Batched ``xp.linalg.qr`` (the array-API linalg
    extension) where the namespace has it, else :func:`_gram_schmidt`."""
    linalg = getattr(xp, "linalg", None)
    if linalg is not None and hasattr(linalg, "qr"):
        q, _ = linalg.qr(y)
        return q
    return _gram_schmidt(xp, y)


def _gram_schmidt(xp, y):
    """Batched modified Gram–Schmidt with one re-orthogonalization pass ("twice is
    enough"), written with array-API core ops. Columns that vanish numerically (rank
    deficiency) become zero columns, so ``Q Qᵀ`` is still an orthogonal projector."""
    d, k = y.shape[-2], y.shape[-1]
    tiny = 64 * xp.finfo(y.dtype).eps
    qs = []
    for j in range(min(d, k)):
        col = y[..., j:j + 1]
        scale = xp.sqrt(xp.sum(col * col, axis=-2, keepdims=True))
        for _ in range(2):
            for q in qs:
                col = col - xp.sum(q * col, axis=-2, keepdims=True) * q
        norm = xp.sqrt(xp.sum(col * col, axis=-2, keepdims=True))
        keep = norm > tiny * scale
        qs.append(xp.where(keep, col / xp.where(keep, norm, xp.ones_like(norm)), xp.zeros_like(col)))
    return xp.concat(qs, axis=-1)


def _hutchplusplus(backend: Backend, fn: Callable, x, key, n_matvecs: int, probe: str):
    """Hutch++ returning ``(v, estimate, residual_var)``; see :func:`hutchplusplus_divergence`."""
    xp = backend.namespace()
    k = n_matvecs // 3
    batch, feat = x.shape[0], tuple(x.shape[1:])
    d = math.prod(feat)
    key_s, key_g = backend.split(key, 2)
    s = _draw(backend, key_s, (k, *x.shape), probe, x)
    g = _draw(backend, key_g, (k, *x.shape), probe, x)
    v, products = _vjp_map(backend, fn, x)

    def to_columns(a):  # (m, batch, *feat) -> (batch, d, m)
        return xp.permute_dims(xp.reshape(a, (a.shape[0], batch, d)), (1, 2, 0))

    def to_cotangents(a):  # (batch, d, m) -> (m, batch, *feat)
        return xp.reshape(xp.permute_dims(a, (2, 0, 1)), (a.shape[-1], batch, *feat))

    # Hutch++ on B = Jᵀ (tr B = tr J; B·s is a VJP). Q spans B·S; Q is a constant for the
    # outer reverse pass: the estimate is unbiased for every fixed Q, so its gradient is too.
    q = _orthonormalize(xp, backend.stop_gradient(to_columns(products(s))))  # (batch, d, r)
    r = q.shape[-1]
    gm = to_columns(g)
    g_perp = gm - xp.matmul(q, xp.matmul(xp.matrix_transpose(q), gm))
    cot = to_cotangents(xp.concat([q, g_perp], axis=-1))  # (r + k, batch, *feat)
    quad = _sum_features(xp, products(cot) * cot, 2)  # (r + k, batch): cᵀ J c
    resid = quad[r:, ...]
    estimate = xp.sum(quad[:r, ...], axis=0) + xp.mean(resid, axis=0)
    var = None
    if k > 1:
        var = xp.sum((resid - xp.mean(resid, axis=0)) ** 2, axis=0) / (k - 1)
    return v, estimate, var


@backend_keyword
def hutchplusplus_divergence(fn: Callable, x, key, *, backend: str | Backend | None = None, n_matvecs: int,
                             probe: str = "gaussian") -> DivergenceEstimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021) estimate of the divergence.

    Only VJPs are used: with ``B = Jᵀ`` (same trace), ``B·s`` is the VJP with ``s``. Per row,
    with ``S, G`` of ``m/3`` random columns: ``Q = orth(B S)`` (batched ``xp.linalg.qr``,
    or a Gram–Schmidt fallback), then
    ``tr(QᵀBQ) + (3/m) tr(Gᵀ(I − QQᵀ) B (I − QQᵀ)G)``. Unbiased for any ``Q``. Its variance
    beats Hutchinson's at equal ``m`` when the top ``m/3`` singular values of ``J`` carry
    most of ``‖J‖_F``; on a flat spectrum the exact part buys little and the residual gets
    only a third of the probes, so the variance can be up to ~3× Hutchinson's.
    ``Q`` is held constant for an enclosing reverse pass (no QR backward).

    :param fn: the field, ``fn(x) -> v`` with ``v.shape == x.shape``, rows independent.
    :param x: points, shape ``(batch, *features)``.
    :param key: a random key of the backend.
    :param backend: a backend with autodiff (name or object); inferred from ``x`` when None.
    :param n_matvecs: Jacobian products per row, a multiple of 3 (``ValueError``
        otherwise): ``m/3`` to sketch, ``m/3`` for the exact part, ``m/3`` probes.
    :param probe: distribution of the sketch and probe entries, ``"gaussian"`` or
        ``"rademacher"`` (the paper's choice).
    :returns: a :class:`DivergenceEstimate`: ``mean`` (batch,) the estimate, ``variance``
        the sample variance of the ``m/3`` residual probes (None for ``m = 3``),
        ``n_probes = m``, ``velocity = fn(x)``.
    :raises CapabilityError: when the backend cannot differentiate.
    """
    probe = _check_probe(probe)
    n = _check_matvecs(n_matvecs)
    be = get_backend(backend, like=x)
    _require_autodiff(be, "the Hutch++ divergence estimator")
    v, estimate, var = _hutchplusplus(be, fn, x, key, n, probe)
    return DivergenceEstimate(mean=estimate, variance=var, n_probes=n, estimator="hutch++", velocity=v)


# ------------------------------------------------------------------------------------------
# the front end


@reject_unknown_keywords
def estimate_divergence(fn: Callable, x, *, backend: str | Backend | None = None, estimator: str = "hutchinson",
                        n_probes: int = 1, probe: str = "gaussian", seed: int | None = None, key=None,
                        chunk_size: int | None = None) -> DivergenceEstimate:
    """Estimate the divergence ``tr(∂fn/∂x)`` of a field at the points ``x`` with any estimator.

    :param fn: the field, ``fn(x) -> v`` with ``v.shape == x.shape``; row ``i`` of ``v``
        depends only on row ``i`` of ``x``.
    :param x: points, shape ``(batch, *features)`` (image-shaped features are fine).
    :param backend: a backend name or object; inferred from ``x`` when None. It must
        differentiate (torch or JAX).
    :param estimator: ``"hutchinson"`` (default), ``"hutch++"`` or ``"exact"``.
    :param n_probes: Jacobian products per row for the stochastic estimators (a multiple
        of 3 for ``"hutch++"``); ignored by ``"exact"``.
    :param probe: ``"gaussian"`` or ``"rademacher"``; ignored by ``"exact"``.
    :param seed: integer seed of the probes (default 0); or give ``key``, not both.
    :param key: a random key of the backend.
    :param chunk_size: for ``"exact"``: basis vectors per vectorized chunk (bounds memory).
    :returns: a :class:`DivergenceEstimate`, as the estimator's own function returns it.
    :raises CapabilityError: when the backend cannot differentiate.
    :raises ValueError: for an unknown estimator or probe (naming the nearest valid one),
        a bad probe count, or ``seed`` and ``key`` together.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(unknown_option_message("estimator", str(estimator), ESTIMATORS))
    probe = _check_probe(probe)
    n = _check_matvecs(n_probes) if estimator == "hutch++" else _check_count("n_probes", n_probes)
    if seed is not None and key is not None:
        raise ValueError("give either seed or key, not both")
    be = get_backend(backend, like=x)
    _require_autodiff(be, "estimate_divergence")
    if x.ndim < 2:
        raise ValueError(f"x must have shape (batch, *features) with at least one feature axis, "
                         f"got shape {tuple(x.shape)}")
    if estimator == "exact":
        return exact_divergence(fn, x, backend=be, chunk_size=chunk_size)
    if key is None:
        key = be.key(0 if seed is None else seed)
    if estimator == "hutchinson":
        return hutchinson_divergence(fn, x, key, backend=be, n_probes=n, probe=probe)
    return hutchplusplus_divergence(fn, x, key, backend=be, n_matvecs=n, probe=probe)
