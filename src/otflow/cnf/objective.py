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

from ..base import Backend, get_backend
from ..ode.integrate import odeint, resolve_solver
from .dynamics import DENSITY_NORM, RNODE_NORM, density_rhs, rnode_rhs, standard_normal_logpdf, time_span
from .signature import backend_keyword

__all__ = ["RNODELoss", "rnode_loss", "check_context", "bits_per_dim", "logit_transform", "dequantize"]

#: odeint arguments :func:`rnode_loss` sets itself, so ``solver_kwargs`` may not
_SET_BY_THE_LOSS = ("norm", "args", "backend", "throw", "check_inputs")


@dataclass(frozen=True)
class RNODELoss:
    """The value of the objective and its parts.

    :param loss: ``nll + λ_K·kinetic + λ_J·jacobian``, a 0-d array of the backend.
    :param nll: the mean negative log-likelihood (Hutchinson estimate).
    :param kinetic: the kinetic-energy integral, summed over blocks, averaged over the batch.
    :param jacobian: the Jacobian Frobenius integral, summed over blocks, averaged over the batch.
    :param nfe: right-hand-side evaluations of the solves (an int array).
    :param status: the worst :class:`~otflow.Status` of the solves (an int array; 0 is success).
    """

    loss: Any
    nll: Any
    kinetic: Any
    jacobian: Any
    nfe: Any
    status: Any


@backend_keyword
def rnode_loss(fields: Sequence, params: Sequence, x, eps, *, T: Sequence, backend: str | Backend | None = None,
               lambda_kinetic: float = 0.01, lambda_jacobian: float = 0.01, solver_kwargs: dict | None = None,
               context=None) -> RNODELoss:
    """The RNODE loss (Finlay et al. 2020, eq. 8) of a chain of CNF blocks on a batch.

    A pure function of the parameters, the batch and the probe, differentiable with
    ``backend.value_and_grad``. The error norm is chosen here: with an adaptive solver
    (asked of the solver object, ``otflow.ode.resolve_solver(method).adaptive``, so a
    name in any case, a :class:`~otflow.Dopri5` instance or a user's adaptive tableau
    all count) the regularizer integrals never control the step. Kinetic and Jacobian
    terms are summed over blocks and averaged over the batch.

    :param fields: one :class:`~otflow.VelocityField` per block.
    :param params: one parameter tree per block.
    :param x: the batch, already standardized, shape ``(batch, *event_shape)``.
    :param eps: the Hutchinson probe, shape of ``x`` (one per solve).
    :param T: the end time of every block: floats, or 0-d backend arrays (learnable).
    :param backend: a backend with autodiff (name or object); inferred from ``x`` when None.
    :param lambda_kinetic: λ_K ≥ 0.
    :param lambda_jacobian: λ_J ≥ 0; with both zero this is vanilla FFJORD and the
        regularizer integrals are not integrated at all.
    :param solver_kwargs: passed to :func:`otflow.odeint` (method, tolerances, steps,
        gradient mode, loop kind); not ``norm``, ``args``, ``backend``, ``throw`` or
        ``check_inputs``, which the loss sets.
    :param context: for conditional fields (``context_dim > 0``), the batch's contexts,
        shape ``(batch, context_dim)``, already standardized: the loss of ``p(x | c)``. It
        travels in the solves' ``args`` (constant along each trajectory; gradients with
        respect to it are computed by the adjoint and dropped). None for unconditional fields.
    :returns: an :class:`RNODELoss`.
    :raises ValueError: for a negative λ, ``solver_kwargs`` setting what the loss sets, or a
        context missing for conditional fields, given to unconditional ones, or wrong-shaped.
    """
    kw = checked_loss_options("rnode_loss", lambda_kinetic, lambda_jacobian, solver_kwargs)
    b = get_backend(backend, like=x)
    check_context(fields, context, x.shape[0], "rnode_loss")
    xp = b.namespace()
    adaptive = resolve_solver(kw.get("method", "dopri5")).adaptive
    regularized = lambda_kinetic > 0 or lambda_jacobian > 0
    zero = xp.zeros((x.shape[0],), dtype=x.dtype, device=b.device_of(x))
    z, dlogp, kin, jac = x, zero, zero, zero
    status, nfe = None, 0
    for field, p, t_end in zip(fields, params, T):
        if regularized:
            state, rhs, norm = (z, dlogp, zero, zero), rnode_rhs(field, backend=b), RNODE_NORM
        else:
            state, rhs, norm = (z, dlogp), density_rhs(field, backend=b, estimator="hutchinson"), DENSITY_NORM
        extra = {"norm": norm} if adaptive else {}
        args = (p, eps) if context is None else (p, eps, context)
        sol = odeint(rhs, state, time_span(xp, t_end), args=args, backend=b, throw=False, check_inputs=False,
                     **extra, **kw)
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


def check_context(fields: Sequence, context, batch: int, name: str) -> None:
    """Refuse a context that does not fit the fields: missing for conditional fields, given
    to unconditional ones, or not of shape ``(batch, context_dim)``.

    :param fields: the blocks' fields.
    :param context: the context given, or None.
    :param batch: the number of rows of the batch.
    :param name: the caller, for the messages.
    :raises ValueError: naming the problem and the fix.
    """
    dims = {getattr(f, "context_dim", 0) for f in fields}
    if len(dims) != 1:
        raise ValueError(f"{name}: the blocks disagree on context_dim ({sorted(dims)}); build every block with "
                         "the same context_dim")
    dim = dims.pop()
    if dim == 0 and context is not None:
        raise ValueError(f"{name}: the fields are unconditional (context_dim=0) but a context was given; drop "
                         "context= or build the fields with MLP(..., context_dim=...)")
    if dim > 0 and context is None:
        raise ValueError(f"{name}: the fields are conditional (context_dim={dim}); pass context= of shape "
                         f"(batch, {dim})")
    if dim > 0 and tuple(context.shape) != (batch, dim):
        raise ValueError(f"{name}: context must have shape (batch, context_dim) = ({batch}, {dim}), got "
                         f"{tuple(context.shape)}")


def checked_loss_options(name: str, lambda_kinetic: float, lambda_jacobian: float, solver_kwargs: dict | None) -> dict:
    """The checks every RNODE loss makes of its options.

    :param name: the loss's name, for the messages.
    :param lambda_kinetic: λ_K.
    :param lambda_jacobian: λ_J.
    :param solver_kwargs: the odeint keywords given.
    :returns: a copy of ``solver_kwargs``.
    :raises ValueError: a negative λ, or ``solver_kwargs`` setting what the loss sets.
    """
    if lambda_kinetic < 0 or lambda_jacobian < 0:
        raise ValueError(f"λ must be non-negative, got lambda_kinetic={lambda_kinetic}, "
                         f"lambda_jacobian={lambda_jacobian}")
    kw = dict(solver_kwargs or {})
    fixed = [k for k in _SET_BY_THE_LOSS if k in kw]
    if fixed:
        raise ValueError(f"{name} sets {', '.join(fixed)} itself; remove {'it' if len(fixed) == 1 else 'them'} "
                         "from solver_kwargs")
    return kw


def bits_per_dim(log_prob, dim: int, *, n_bins: int = 256):
    """Bits per dimension of data quantized to ``n_bins`` levels and scaled to [0, 1).

    The expectation of the continuous log-density of the dequantized data bounds the
    discrete log-likelihood from below (Theis, van den Oord & Bethge 2016), so
    ``bpd = −(log p(y) − d·log n_bins) / (d·log 2)``; a uniform density gives
    ``log2(n_bins)``.

    :param log_prob: ``log p(y)`` of the dequantized data ``y = (x + u)/n_bins`` on ``[0, 1)^d``
        (any array type, or a float).
    :param dim: ``d``, the number of dimensions of one sample.
    :param n_bins: the number of quantization levels.
    :returns: bits per dimension, shaped like ``log_prob``.
    """
    return -(log_prob - dim * math.log(n_bins)) / (dim * math.log(2.0))


@backend_keyword
def dequantize(key, x, *, backend: str | Backend | None = None, n_bins: int = 256):
    """Uniform dequantization (Theis, van den Oord & Bethge 2016) of integer levels
    ``x ∈ {0, …, n_bins−1}`` to ``(x + u)/n_bins`` with ``u ~ U[0, 1)`` per entry.

    :param key: a random key of the backend.
    :param x: the levels, a floating array of the backend.
    :param backend: a backend name or object; inferred from ``x`` when None.
    :param n_bins: the number of levels.
    :returns: ``(x + u)/n_bins``, in ``[0, 1)`` for levels in range.
    """
    b = get_backend(backend, like=x)
    u = b.uniform(key, tuple(x.shape), dtype=x.dtype, device=b.device_of(x))
    return (x + u) / n_bins


def logit_transform(y, *, alpha: float = 1e-6):
    """The logit transform ``s = logit(α + (1 − 2α)·y)`` and its log-determinant.

    FFJORD and RNODE train image flows on ``s`` (α = 1e-6 for MNIST, 0.05 for CIFAR10);
    ``log p_y(y) = log p_s(s) + Σ log |ds/dy|``.

    :param y: values in ``[0, 1)``, shape ``(batch, ...)`` (any array-API array).
    :param alpha: the margin α in ``[0, 0.5)``.
    :returns: ``(s, log_det)``: ``s`` shaped like ``y``; ``log_det`` the sum of
        ``log |ds/dy|`` over every axis but the first.
    :raises ValueError: for α outside ``[0, 0.5)``.
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
