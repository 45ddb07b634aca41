"""The CNF's augmented dynamics, written once against the array API.

FFJORD (Grathwohl et al., ICLR 2019) integrates the state together with the
instantaneous change of variables ``d log p(z(t))/dt = −tr(∂v/∂z)``; RNODE
(Finlay, Jacobsen, Nurbekyan & Oberman, ICML 2020, eqs. 6–8) adds two
integrals to the state, both from the same Hutchinson vector–Jacobian product:

* kinetic energy ``∫ ½·mean_d ‖v‖² dt`` (the optimal-transport cost), and
* Jacobian Frobenius norm ``∫ mean_d ‖εᵀ∇v‖² dt``,

with ``mean_d`` the mean over the ``d`` features (the scaling of the RNODE code,
so the λ values transfer). The probe ``ε`` is drawn once per solve and passed
in ``args``; the integrals are left out of adaptive error control.
"""
from __future__ import annotations

import math

from .divergence import exact_divergence, probe_vjp
from ..ode.step_size import ErrorNorm

__all__ = ["standard_normal_logpdf", "feature_sum", "feature_mean", "flow_rhs", "density_rhs", "rnode_rhs",
           "DENSITY_NORM", "RNODE_NORM"]

#: error control of (z, Δlogp): the largest per-leaf RMS (as the FFJORD/RNODE code)
DENSITY_NORM = ErrorNorm("leaf_rms_max")
#: error control of (z, Δlogp, E_kinetic, E_jacobian): the regularizer integrals are masked out
RNODE_NORM = ErrorNorm("leaf_rms_max", mask=(True, True, False, False))


def feature_sum(xp, x):
    """Sum over every axis but the first (the batch axis)."""
    return xp.sum(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def feature_mean(xp, x):
    """Mean over every axis but the first."""
    return xp.mean(x, axis=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def standard_normal_logpdf(xp, z):
    """``log N(z; 0, I)`` per row, summed over the features."""
    d = math.prod(z.shape[1:])
    return -0.5 * feature_sum(xp, z * z) - 0.5 * d * math.log(2 * math.pi)


def flow_rhs(field):
    """``dz/dt = v(t, z)`` with ``args = params`` (transport only, no density)."""

    def rhs(t, z, params):
        return field.apply(params, t, z)

    return rhs


def density_rhs(backend, field, estimator: str = "exact"):
    """``d(z, Δlogp)/dt = (v, −div v)``; ``args = params`` for ``"exact"``, ``(params, eps)``
    for ``"hutchinson"`` (a fixed probe for the whole solve)."""
    if estimator == "exact":

        def rhs(t, state, params):
            z, _ = state
            v, div = exact_divergence(backend, lambda y: field.apply(params, t, y), z)
            return (v, -div)

    elif estimator == "hutchinson":

        def rhs(t, state, args):
            params, eps = args
            z, _ = state
            v, div, _ = probe_vjp(backend, lambda y: field.apply(params, t, y), z, eps)
            return (v, -div)

    else:
        raise ValueError(f"density_rhs: estimator must be 'exact' or 'hutchinson', got {estimator!r}")
    return rhs


def rnode_rhs(backend, field):
    """``d(z, Δlogp, E_K, E_J)/dt`` with one VJP per evaluation; ``args = (params, eps)``."""

    def rhs(t, state, args):
        params, eps = args
        z = state[0]
        xp = backend.namespace()
        v, div, eps_jac = probe_vjp(backend, lambda y: field.apply(params, t, y), z, eps)
        kinetic = 0.5 * feature_mean(xp, v * v)
        jacobian = feature_mean(xp, eps_jac * eps_jac)
        return (v, -div, kinetic, jacobian)

    return rhs

