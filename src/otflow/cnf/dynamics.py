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

A conditional field ``v(t, x | c)`` (``field.context_dim > 0``) gets its context through
the ``args`` of the solve, next to the parameters and the probe, never in the state: the
context is constant along the trajectory, the divergence is taken with respect to the
state only, and the RNODE integrals are unchanged.
"""
from __future__ import annotations

import math

from ..base import Backend, get_backend
from ..ode.step_size import ErrorNorm
from .divergence import _exact_trace, _probe_vjp
from .signature import backend_keyword

__all__ = ["standard_normal_logpdf", "feature_sum", "feature_mean", "flow_rhs", "density_rhs", "rnode_rhs",
           "DENSITY_NORM", "RNODE_NORM", "DENSITY_ESTIMATORS", "time_span", "is_conditional"]

#: error control of (z, Δlogp): the largest per-leaf RMS (as the FFJORD/RNODE code)
DENSITY_NORM = ErrorNorm("leaf_rms_max")
#: error control of (z, Δlogp, E_kinetic, E_jacobian): the regularizer integrals are masked out
RNODE_NORM = ErrorNorm("leaf_rms_max", mask=(True, True, False, False))
#: divergence estimators :func:`density_rhs` integrates
DENSITY_ESTIMATORS = ("exact", "hutchinson")


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


def time_span(xp, t_end, *, reverse: bool = False):
    """The output times of a block's solve, ``[0, T]`` (or ``[T, 0]`` with ``reverse``).

    :param xp: the array namespace.
    :param t_end: ``T``: a Python float (a list of floats is returned, which
        :func:`otflow.odeint` reads without a device round trip) or a 0-d backend array (a
        learnable ``T``, or one passed into compiled code; an array is returned).
    :param reverse: integrate from ``T`` back to 0.
    :returns: the two times.
    """
    if isinstance(t_end, (int, float)):
        span = [0.0, float(t_end)]
        return span[::-1] if reverse else span
    span = [xp.zeros_like(t_end), t_end]
    return xp.stack(span[::-1] if reverse else span)


def is_conditional(field) -> bool:
    """Whether ``field`` takes a context vector (its ``context_dim`` is positive)."""
    return getattr(field, "context_dim", 0) > 0


def flow_rhs(field):
    """``dz/dt = v(t, z)`` with ``args = params`` (transport only, no density); for a
    conditional field ``dz/dt = v(t, z | c)`` with ``args = (params, context)``.

    :param field: a :class:`~otflow.VelocityField`.
    :returns: ``rhs(t, z, args)`` for :func:`otflow.odeint`.
    """
    if is_conditional(field):

        def rhs(t, z, args):
            params, context = args
            return field.apply(params, t, z, context)

        return rhs

    def rhs(t, z, params):
        return field.apply(params, t, z)

    return rhs


def _velocity(field, params, t, context):
    """``y ↦ v(t, y)`` (or ``v(t, y | context)``), the function whose divergence is taken."""
    if context is None:
        return lambda y: field.apply(params, t, y)
    return lambda y: field.apply(params, t, y, context)


@backend_keyword
def density_rhs(field, *, backend: str | Backend, estimator: str = "exact"):
    """FFJORD's augmented dynamics ``d(z, Δlogp)/dt = (v, −div v)``.

    :param field: a :class:`~otflow.VelocityField`.
    :param backend: the backend (name or object) whose autodiff takes the divergence.
    :param estimator: ``"exact"`` (the trace, evaluation) with ``args = params``, or
        ``"hutchinson"`` (one probe for the whole solve, FFJORD's training estimate) with
        ``args = (params, eps)``. A conditional field takes its context last:
        ``args = (params, context)`` and ``(params, eps, context)``.
    :returns: ``rhs(t, (z, Δlogp), args)`` for :func:`otflow.odeint`.
    :raises ValueError: for another estimator.
    """
    b = get_backend(backend)
    conditional = is_conditional(field)
    if estimator == "exact":

        def rhs(t, state, args):
            params, context = args if conditional else (args, None)
            v, div = _exact_trace(b, _velocity(field, params, t, context), state[0])
            return (v, -div)

    elif estimator == "hutchinson":

        def rhs(t, state, args):
            params, eps, context = args if conditional else (*args, None)
            v, div, _ = _probe_vjp(b, _velocity(field, params, t, context), state[0], eps)
            return (v, -div)

    else:
        raise ValueError(f"density_rhs: estimator must be one of {', '.join(map(repr, DENSITY_ESTIMATORS))}, "
                         f"got {estimator!r}")
    return rhs


@backend_keyword
def rnode_rhs(field, *, backend: str | Backend):
    """RNODE's augmented dynamics ``d(z, Δlogp, E_K, E_J)/dt`` (Finlay et al. 2020, eqs. 6–8)
    with one VJP per evaluation.

    :param field: a :class:`~otflow.VelocityField`.
    :param backend: the backend (name or object) whose autodiff takes the VJP.
    :returns: ``rhs(t, (z, Δlogp, E_K, E_J), (params, eps))`` for :func:`otflow.odeint`
        (``(params, eps, context)`` for a conditional field); integrate it with
        :data:`RNODE_NORM` so the regularizer integrals stay out of error control.
    """
    b = get_backend(backend)
    xp = b.namespace()
    conditional = is_conditional(field)

    def rhs(t, state, args):
        params, eps, context = args if conditional else (*args, None)
        v, div, eps_jac = _probe_vjp(b, _velocity(field, params, t, context), state[0], eps)
        kinetic = 0.5 * feature_mean(xp, v * v)
        jacobian = feature_mean(xp, eps_jac * eps_jac)
        return (v, -div, kinetic, jacobian)

    return rhs
