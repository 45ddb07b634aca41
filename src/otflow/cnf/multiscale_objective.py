"""The RNODE loss of FFJORD's multiscale image model.

Finlay, Jacobsen, Nurbekyan & Oberman, "How to train your neural ODE", ICML 2020, train
their image models (FFJORD's multiscale ``ODENVP``, Grathwohl et al., ICLR 2019) with
eq. (8) exactly as the vector models:

    L = E_y[ −log p(y) ] + λ_K Σ_blocks ∫₀ᵀ ½·mean_d ‖v‖² dt + λ_J Σ_blocks ∫₀ᵀ mean_d ‖εᵀ∇v‖² dt

where each block integrates RNODE's augmented dynamics (:func:`~otflow.cnf.rnode_rhs`)
on its own ``(C, H, W)`` state, ``mean_d`` is the mean over that block's state entries,
and ``ε`` is the block's Hutchinson probe, one per solve and shared by the divergence and
the Jacobian term. Between blocks the state is squeezed and half its channels are
factored out (:mod:`.multiscale`); ``log p(y)`` includes the logit transform's
log-determinant.
"""
from __future__ import annotations

from typing import Sequence

from ..base import Backend, get_backend
from ..ode.integrate import odeint, resolve_solver
from .dynamics import DENSITY_NORM, RNODE_NORM, density_rhs, rnode_rhs, time_span
from .multiscale import (MultiscaleSpec, _block_args, _block_times, _check_images, _check_model, _through_scales,
                         factored_log_density)
from .objective import RNODELoss, checked_loss_options, logit_transform
from .signature import backend_keyword

__all__ = ["multiscale_rnode_loss"]


@backend_keyword
def multiscale_rnode_loss(spec: MultiscaleSpec, fields: Sequence, params: Sequence, y, probes: Sequence, *, T,
                          backend: str | Backend | None = None, lambda_kinetic: float = 0.01,
                          lambda_jacobian: float = 0.01, solver_kwargs: dict | None = None) -> RNODELoss:
    """The RNODE loss (Finlay et al. 2020, eq. 8) of the multiscale image model on a batch.

    Logit transform (α of ``spec``), then :meth:`MultiscaleSpec.steps`: every block
    integrates RNODE's ``(z, Δlogp, E_K, E_J)`` with its probe (the regularizer integrals
    left out of adaptive error control, :data:`~otflow.cnf.RNODE_NORM`), or FFJORD's
    Hutchinson ``(z, Δlogp)`` when both λ are 0 (then the integrals are not integrated at
    all); squeezes and factor-outs as the spec says. A pure function of the parameters, the
    batch and the probes, differentiable with ``backend.value_and_grad``.

    ``nll`` is the mean over the batch of ``−log p(y)`` in nats per image, the density of
    the dequantized pixels ``y ∈ [0, 1)^D`` with the logit log-determinant included — the
    quantity whose ``(nll + D·log n_bins)/(D·log 2)`` is the standard bits per dimension
    (with the Hutchinson estimate of the divergence, so an unbiased estimate of it).
    ``kinetic`` and ``jacobian`` are the per-block integrals (each a mean over the block's
    own state entries, as :func:`~otflow.cnf.rnode_rhs` computes them), summed over blocks
    and averaged over the batch.

    :param spec: the architecture.
    :param fields: one velocity field per block (:meth:`MultiscaleSpec.fields`).
    :param params: one parameter tree per block.
    :param y: dequantized pixels in ``[0, 1)``, shape ``(batch, *spec.image_shape)``
        (:func:`~otflow.dequantize` of the levels).
    :param probes: one Hutchinson probe per block, shaped ``(batch, *shape)`` for each shape
        of :meth:`MultiscaleSpec.block_shapes` (Gaussian or Rademacher), fixed for the block's solve.
    :param T: the end time of every block: one float (or 0-d array, learnable) for all, or one per block.
    :param backend: a backend with autodiff (name or object); inferred from ``y`` when None.
    :param lambda_kinetic: λ_K ≥ 0.
    :param lambda_jacobian: λ_J ≥ 0; with both zero this is vanilla FFJORD.
    :param solver_kwargs: passed to :func:`otflow.odeint` (method, tolerances, steps,
        gradient mode, loop kind); not ``norm``, ``args``, ``backend``, ``throw`` or
        ``check_inputs``, which the loss sets.
    :returns: an :class:`~otflow.RNODELoss` (``nfe`` summed over the blocks' solves,
        ``status`` the worst of them).
    :raises ValueError: a negative λ, ``solver_kwargs`` setting what the loss sets, or
        fields, parameters, times, probes or images that do not fit the spec.
    """
    kw = checked_loss_options("multiscale_rnode_loss", lambda_kinetic, lambda_jacobian, solver_kwargs)
    _check_model(spec, fields, params)
    _check_images(spec, y, "y")
    b = get_backend(backend, like=y)
    xp = b.namespace()
    times = _block_times(spec, T)
    args = _block_args(spec, params, "hutchinson", probes, y.shape[0])
    regularized = lambda_kinetic > 0 or lambda_jacobian > 0
    if regularized:
        rhs, norm = [rnode_rhs(field, backend=b) for field in fields], RNODE_NORM
    else:
        rhs, norm = [density_rhs(field, backend=b, estimator="hutchinson") for field in fields], DENSITY_NORM
    extra = {"norm": norm} if resolve_solver(kw.get("method", "dopri5")).adaptive else {}
    solves = []  # (nfe, status) of every block

    def solve(k, z, totals):
        state = (z, *totals) if regularized else (z, totals[0])
        sol = odeint(rhs[k], state, time_span(xp, times[k]), args=args[k], backend=b, throw=False,
                     check_inputs=False, **extra, **kw)
        final = [leaf[-1, ...] for leaf in sol.ys]
        solves.append((sol.stats.nfe, sol.status))
        return final[0], (tuple(final[1:]) if regularized else (final[1], *totals[1:]))

    s, log_det = logit_transform(y, alpha=spec.alpha)
    zero = xp.zeros((y.shape[0],), dtype=y.dtype, device=b.device_of(y))
    latents, (dlogp, kin, jac) = _through_scales(spec, s, (zero, zero, zero), solve)
    nll = -xp.mean(factored_log_density(latents) - dlogp + log_det)
    kinetic, jacobian = xp.mean(kin), xp.mean(jac)
    status = solves[0][1]
    for _, block_status in solves[1:]:
        status = xp.maximum(status, block_status)
    loss = nll + lambda_kinetic * kinetic + lambda_jacobian * jacobian
    return RNODELoss(loss=loss, nll=nll, kinetic=kinetic, jacobian=jacobian, nfe=sum(n for n, _ in solves),
                     status=status)
