"""The RNODE training objective, bits per dimension and the logit transform.

Finlay, Jacobsen, Nurbekyan & Oberman, "How to train your neural ODE: the world
of Jacobian and kinetic regularization", ICML 2020, eq. (8):

    L = E_x[ −log p(x) ] + λ_K ∫₀ᵀ ½·mean_d ‖v‖² dt + λ_J ∫₀ᵀ mean_d ‖εᵀ∇v‖² dt

with ``log p(x)`` from the Hutchinson estimate of the divergence (one Gaussian or
Rademacher probe ``ε`` per solve, shared with the Jacobian term). λ_K = λ_J = 0
is vanilla FFJORD (Grathwohl et al., ICLR 2019); the regularizer integrals are
then not integrated at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from .dynamics import DENSITY_NORM, RNODE_NORM, density_rhs, rnode_rhs, standard_normal_logpdf
from ..ode.odeint import odeint

__all__ = ["RNODELoss", "rnode_loss", "bits_per_dim", "logit_transform", "dequantize"]


@dataclass(frozen=True)
class RNODELoss:
    """The value of the objective and its parts (arrays of the backend; ``nfe`` an int array)."""

    loss: Any
    nll: Any
    kinetic: Any
    jacobian: Any
    nfe: Any
    status: Any


def rnode_loss(backend, fields: Sequence, params: Sequence, x, eps, *, T: Sequence[float],
               lambda_kinetic: float = 0.01, lambda_jacobian: float = 0.01, solver_kwargs: dict | None = None
               ) -> RNODELoss:
    """The RNODE loss of a chain of CNF blocks on a batch ``x`` (already standardized) with probe ``eps``.

    ``solver_kwargs`` go to :func:`otflow.odeint` (method, tolerances, steps, gradient
    mode); the error norm is chosen here: regularizer integrals never control the step.
    Kinetic and Jacobian terms are summed over blocks and averaged over the batch.
    """
    if lambda_kinetic < 0 or lambda_jacobian < 0:
        raise ValueError(f"λ must be non-negative, got lambda_kinetic={lambda_kinetic}, "
                         f"lambda_jacobian={lambda_jacobian}")
    xp = backend.namespace()
    kw = dict(solver_kwargs or {})
    adaptive = kw.get("method", "dopri5") == "dopri5"
    regularized = lambda_kinetic > 0 or lambda_jacobian > 0
    n = x.shape[0]
    zero = xp.zeros((n,), dtype=x.dtype, device=backend.device_of(x))
    z, dlogp, kin, jac = x, zero, zero, zero
    status, nfe = None, 0
    for field, p, t_end in zip(fields, params, T):
        if regularized:
            state = (z, dlogp, zero, zero)
            rhs = rnode_rhs(backend, field)
            norm = RNODE_NORM
        else:
            state = (z, dlogp)
            rhs = density_rhs(backend, field, "hutchinson")
            norm = DENSITY_NORM
        extra = {"norm": norm} if adaptive else {}
        if isinstance(t_end, (int, float)):
            ts = [0.0, float(t_end)]
        else:  # a learnable end time (a 0-d array of the backend)
            ts = xp.stack([xp.zeros_like(t_end), t_end])
        sol = odeint(rhs, state, ts, args=(p, eps), backend=backend, throw=False, check_inputs=False, **extra, **kw)
        final = [leaf[-1, ...] for leaf in sol.ys]
        z, dlogp = final[0], final[1]
        if regularized:
            kin, jac = kin + final[2], jac + final[3]
        status = sol.status if status is None else xp.maximum(status, sol.status)
        nfe = nfe + sol.stats.nfe
    nll = -xp.mean(standard_normal_logpdf(xp, z) - dlogp)
    kinetic, jacobian = xp.mean(kin), xp.mean(jac)
    loss = nll + lambda_kinetic * kinetic + lambda_jacobian * jacobian
    return RNODELoss(loss=loss, nll=nll, kinetic=kinetic, jacobian=jacobian, nfe=nfe, status=status)


def bits_per_dim(log_prob, dim: int, *, n_bins: int = 256):
    """Bits per dimension of data quantized to ``n_bins`` levels and scaled to [0, 1).

    ``log_prob`` is the continuous log-density of the dequantized data ``y = (x + u)/n_bins``
    (``u ~ U[0, 1)``) on [0, 1)^d; its expectation bounds the discrete log-likelihood from
    below (Theis, van den Oord & Bethge 2016), so
    ``bpd = −(log p(y) − d·log n_bins) / (d·log 2)``.
    """
    return -(log_prob - dim * math.log(n_bins)) / (dim * math.log(2.0))


def dequantize(backend, key, x, *, n_bins: int = 256):
    """Uniform dequantization of integer levels ``x ∈ {0, …, n_bins−1}`` to ``(x + u)/n_bins``."""
    u = backend.uniform(key, tuple(x.shape), dtype=x.dtype, device=backend.device_of(x))
    return (x + u) / n_bins


def logit_transform(y, *, alpha: float = 1e-6):
    """``s = logit(α + (1 − 2α)·y)`` for ``y ∈ [0, 1)`` and ``log |ds/dy|`` summed per row.

    FFJORD and RNODE train image flows on ``s`` (α = 1e-6 for MNIST, 0.05 for CIFAR10);
    ``log p_y(y) = log p_s(s) + Σ log |ds/dy|``.
    """
    from array_api_compat import array_namespace

    xp = array_namespace(y)
    if not 0 <= alpha < 0.5:
        raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
    p = alpha + (1 - 2 * alpha) * y
    s = xp.log(p) - xp.log1p(-p)
    log_det = math.log(1 - 2 * alpha) - xp.log(p) - xp.log1p(-p)
    axes = tuple(range(1, y.ndim))
    return s, (xp.sum(log_det, axis=axes) if axes else log_det)
