"""The adjoint method: gradients of an ODE solve from a second, backward solve.

``odeint(..., gradient="adjoint")`` wraps the solve in the backend's
``custom_vjp`` (written once here, against the array API). The forward pass
solves without a tape and keeps only the output times, the output states and
the arguments; the backward pass integrates the augmented system (Chen, Rubanova,
Bettencourt & Duvenaud, NeurIPS 2018, eq. 4 and appendix B; Pontryagin et al. 1962)

    dy/dt = f(t, y, θ)
    da/dt = −aᵀ ∂f/∂y          a = ∂L/∂y
    dg/dt = −aᵀ ∂f/∂θ          g = ∂L/∂θ, accumulated

from ``t_N`` back to ``t_0``, one output interval at a time: at each output time
``t_i`` the state is reset to the stored forward value ``y_i`` and the output
cotangent ``∂L/∂y_i`` is added to ``a`` (torchdiffeq's ``odeint_adjoint`` does the
same). The output times get ``∂L/∂t_i = (∂L/∂y_i)ᵀ f(t_i, y_i)`` for ``i ≥ 1`` and
``∂L/∂t_0 = −a(t_0⁺)ᵀ f(t_0, y_0)``. Memory is independent of the number of steps.

Error control of the backward solve (adaptive methods): the forward ``norm`` is
applied to ``y`` and to ``a`` separately (so a forward mask, such as the CNF's
masked regularizer integrals, masks the matching adjoint components too) and the
larger value is taken; with ``adjoint_seminorm=True`` the parameter adjoint ``g``
is left out (Kidger, Chen & Lyons, "'Hey, that's not an ODE': Faster ODE
Adjoints via Seminorms", ICML 2021): ``g`` never feeds back into ``y`` or ``a``,
so its local error does not grow. Fixed-step methods integrate backward with the
same method and the same step counts as the forward solve.

The backward step counts leave the custom VJP through the cotangent of a dummy
zero argument (the convention of :meth:`otflow.backend.Backend.custom_vjp`):
:func:`adjoint_counter` makes that argument, :func:`adjoint_stats` reads its
gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..base.errors import MaxStepsReached, NonFiniteState, Status, StepSizeUnderflow
from .step_size import ErrorNorm, resolve_norm
from ..base import Backend, get_backend

__all__ = ["AdjointStats", "adjoint_counter", "adjoint_stats", "COUNTER_FIELDS"]

#: what the entries of an adjoint counter's gradient count, in order
COUNTER_FIELDS = ("nfe", "n_steps", "n_accepted", "n_rejected", "n_failed")


@dataclass(frozen=True)
class AdjointStats:
    """Counts of the adjoint backward solves that shared one counter (summed over them).

    ``nfe``: evaluations of the augmented dynamics, each one call of ``func`` with one
    vector–Jacobian product (the ``N + 1`` plain evaluations of ``func`` for the
    output-time gradients are not included); ``n_steps``, ``n_accepted``,
    ``n_rejected``: steps of the backward solves; ``n_failed``: backward solves that
    did not reach ``t_0`` (their gradients are NaN).
    """

    nfe: int
    n_steps: int
    n_accepted: int
    n_rejected: int
    n_failed: int


def adjoint_counter(backend: str | Backend | None = None, *, like=None, dtype=None, device=None):
    """A zero array whose gradient receives the adjoint's backward counts.

    Pass it to ``odeint(..., gradient="adjoint", adjoint_counter=counter)`` (any number of
    solves may share it; the counts add up) and differentiate with respect to it:

    * torch: the counter is created with ``requires_grad=True``; after
      ``loss.backward()`` read ``otflow.adjoint_stats(counter.grad)`` (zero ``counter.grad``
      between backward passes, as for any tensor: gradients accumulate);
    * JAX: make it an argument of the differentiated function,
      ``jax.grad(loss, argnums=(0, 1))(params, counter)``, and read
      ``otflow.adjoint_stats(grads[1])``; this works under ``jit``.

    :param backend: a backend name or object (inferred from ``like`` when None).
    :param like: an array whose backend, dtype and device the counter takes.
    :param dtype: a floating dtype (default: that of ``like``, else float32; counts are
        exact up to 2²⁴ in float32).
    :param device: where the counter lives (default: that of ``like``, else the default).
    :returns: a zero array of shape ``(5,)`` (see :data:`COUNTER_FIELDS`).
    """
    b = get_backend(backend, like=like)
    xp = b.namespace()
    if dtype is None:
        dtype = like.dtype if like is not None and b.owns(like) else xp.float32
    elif isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    if device is None and like is not None and b.owns(like):
        device = b.device_of(like)
    counter = xp.zeros((len(COUNTER_FIELDS),), dtype=dtype, device=device)
    # torch: a leaf that requires grad receives .grad (duck-typed: the core imports no framework)
    if callable(getattr(counter, "requires_grad_", None)):
        counter = counter.requires_grad_()
    return counter


def adjoint_stats(counter_grad) -> AdjointStats:
    """Decode the gradient of an :func:`adjoint_counter` (``counter.grad`` in torch, the
    counter's entry of ``jax.grad`` in JAX) into :class:`AdjointStats`. ``None`` (torch:
    no backward pass reached the counter) gives all zeros."""
    if counter_grad is None:
        return AdjointStats(0, 0, 0, 0, 0)
    values = np.asarray(get_backend(None, like=counter_grad).to_numpy(counter_grad), dtype=np.float64).reshape(-1)
    if values.shape[0] != len(COUNTER_FIELDS):
        raise ValueError(f"adjoint_stats: expected the gradient of an adjoint_counter (shape ({len(COUNTER_FIELDS)},)),"
                         f" got shape {values.shape}")
    return AdjointStats(*(int(round(v)) for v in values))


# --------------------------------------------------------------------------------------------
# the custom VJP


def _is_floating(backend, xp, x) -> bool:
    return backend.owns(x) and xp.isdtype(x.dtype, "real floating")


def adjoint_solve(func, leaves, treedef, ts, args, counter, *, solver, backend, rtol, atol, step_size, counts,
                  max_steps, norm, controller, dt_min, loop_kind, adjoint_rtol, adjoint_atol, seminorm, throw,
                  solve_flat):
    """The solve of :func:`otflow.odeint` with the adjoint method as its reverse-mode rule.

    ``leaves``/``treedef``: the flat initial state; ``args``: the user's tree (array leaves
    are differentiated, other leaves are constants); ``counter``: the dummy argument
    (an :func:`adjoint_counter` or a fresh zero array). ``solve_flat`` is
    ``otflow._integrate._solve_flat`` (passed in to avoid an import cycle). Returns
    ``(ys_leaves, stats, status, t_final)`` like ``_solve_flat``.
    """
    xp = backend.namespace()
    sg = backend.stop_gradient
    dtype = leaves[0].dtype
    n_y = len(leaves)

    arg_leaves, arg_def = backend.tree_flatten(args)
    is_dyn = [backend.owns(x) for x in arg_leaves]
    static = [None if d else x for x, d in zip(arg_leaves, is_dyn)]
    dyn0 = tuple(x for x, d in zip(arg_leaves, is_dyn) if d)
    is_diff = [_is_floating(backend, xp, x) for x in dyn0]

    def assemble(dyn):
        it = iter(dyn)
        return backend.tree_unflatten(arg_def, [next(it) if d else s for d, s in zip(is_dyn, static)])

    def with_diff(dyn, diff):
        it = iter(diff)
        return tuple(next(it) if d else x for x, d in zip(dyn, is_diff))

    def f_flat(t, y, a):
        out = func(t, backend.tree_unflatten(treedef, list(y)), a)
        return tuple(backend.tree_flatten(out)[0])

    fwd_kw = dict(solver=solver, backend=backend, rtol=rtol, atol=atol, step_size=step_size, counts=counts,
                  max_steps=max_steps, norm=norm, controller=controller, dt_min=dt_min, loop_kind=loop_kind)

    def int_array(v):
        return xp.asarray(v, dtype=xp.int32, device=backend.device_of(leaves[0]))

    def forward(y0, ts, dyn, counter):
        ys, stats, status, t_final = solve_flat(func, list(y0), treedef, ts, assemble(dyn), **fwd_kw)
        packed = (int_array(stats.nfe), int_array(stats.n_steps), int_array(stats.n_accepted),
                  int_array(stats.n_rejected))
        return (tuple(ys), t_final, status, packed)

    def fwd(y0, ts, dyn, counter):
        out = forward(sg(tuple(y0)), sg(ts), sg(tuple(dyn)), counter)
        # the inputs themselves as residuals (torch then saves them by reference, not as copies)
        return out, (ts, out[0], tuple(dyn))

    # ---- the backward pass ------------------------------------------------------------------
    fwd_norm = resolve_norm(norm, treedef, backend.tree_unflatten) if solver.adaptive else None
    g_norm = ErrorNorm(norm.kind if isinstance(norm, ErrorNorm) else norm if isinstance(norm, str) else "rms")

    def bwd_norm(tree):
        y, a, g = tree
        value = xp.maximum(fwd_norm(list(y), xp), fwd_norm(list(a), xp))
        if not seminorm and len(g):
            value = xp.maximum(value, g_norm.on_leaves(list(g), xp))
        return value

    def aug_func(t, state, dyn):
        y, a, _ = state
        diff = tuple(x for x, d in zip(dyn, is_diff) if d)

        def fy(y_, p_):
            return f_flat(t, y_, assemble(with_diff(dyn, p_)))

        fy_val, vjp_fn = backend.vjp(fy, tuple(y), diff)
        a_y, a_p = vjp_fn(tuple(a))
        out = (tuple(fy_val), tuple(-v for v in a_y), tuple(-xp.astype(v, dtype) for v in a_p))
        # a plain array tree out: no graph survives between evaluations (torch's backward
        # runs with grad mode on), so the backward solve's memory stays flat
        return sg(out)

    bwd_kw = dict(solver=solver, backend=backend, rtol=adjoint_rtol, atol=adjoint_atol, step_size=None,
                  max_steps=max_steps, norm=bwd_norm if solver.adaptive else None, controller=controller,
                  dt_min=dt_min, loop_kind="forward")

    def dot(u, v):
        total = None
        for x, w in zip(u, v):
            s = xp.sum(x * w)
            total = s if total is None else total + s
        return total

    def bwd(residuals, out_ct):
        ts, ys, dyn = sg(residuals)
        ct_ys = tuple(xp.zeros_like(y) if c is None else xp.astype(sg(c), y.dtype) for c, y in zip(out_ct[0], ys))
        n_int = ts.shape[0] - 1

        def interval(carry, x, count):
            """Integrate the augmented system over one output interval, from t_hi down to t_lo."""
            a_int, g, stats = carry
            t_hi, t_lo, y_hi, ct_hi = x
            dt_hi = dot(ct_hi, f_flat(t_hi, y_hi, assemble(dyn)))
            a = tuple(u + c for u, c in zip(a_int, ct_hi))
            aug_leaves, aug_def = backend.tree_flatten((tuple(y_hi), a, tuple(g)))
            pair = xp.stack([t_hi, t_lo])
            out, st, status, _ = solve_flat(aug_func, aug_leaves, aug_def, pair, dyn,
                                            counts=None if count is None else [count], **bwd_kw)
            end = [leaf[-1, ...] for leaf in out]
            a_new, g_new = tuple(end[n_y:2 * n_y]), tuple(end[2 * n_y:])
            failed = xp.astype(status != int(Status.SUCCESS), xp.int32)
            stats = (stats[0] + st.nfe, stats[1] + st.n_steps, stats[2] + st.n_accepted, stats[3] + st.n_rejected,
                     xp.maximum(stats[4], failed), xp.maximum(stats[5], status))
            return (a_new, g_new, stats), dt_hi

        device = backend.device_of(ys[0])
        zero_i = xp.asarray(0, dtype=xp.int32, device=device)
        diff0 = [x for x, d in zip(dyn, is_diff) if d]
        carry = (tuple(xp.zeros_like(y[0, ...]) for y in ys),
                 tuple(xp.zeros(x.shape, dtype=dtype, device=device) for x in diff0),
                 (zero_i,) * 6)
        if solver.adaptive:
            xs = (xp.flip(ts[1:], axis=0), xp.flip(ts[:-1], axis=0),
                  tuple(xp.flip(y[1:, ...], axis=0) for y in ys), tuple(xp.flip(c[1:, ...], axis=0) for c in ct_ys))
            carry, dts = backend.scan(lambda c, x: interval(c, x, None), carry, xs)
            dts = xp.flip(dts, axis=0)
        else:
            per = counts * n_int if len(counts) == 1 else counts
            dts = []
            for i in range(n_int, 0, -1):
                x = (ts[i], ts[i - 1], tuple(y[i, ...] for y in ys), tuple(c[i, ...] for c in ct_ys))
                carry, dt_i = interval(carry, x, per[i - 1])
                dts.append(dt_i)
            dts = xp.stack(dts[::-1])
        a_int, g, stats = carry
        ct0 = tuple(c[0, ...] for c in ct_ys)
        y0 = tuple(y[0, ...] for y in ys)
        dt0 = -dot(a_int, f_flat(ts[0], y0, assemble(dyn)))
        ts_ct = xp.concat([xp.reshape(dt0, (1,)), xp.astype(dts, dt0.dtype)], axis=0)
        y0_ct = tuple(u + c for u, c in zip(a_int, ct0))

        failed, status = stats[4], stats[5]
        if throw and backend.is_concrete(status) and int(backend.to_numpy(status)) != int(Status.SUCCESS):
            _raise_backward_failure(backend, Status(int(backend.to_numpy(status))), ts, max_steps)
        ok = failed == 0

        def nan_if_failed(v):
            return xp.where(ok, v, xp.full_like(v, float("nan")))

        y0_ct = tuple(nan_if_failed(v) for v in y0_ct)
        ts_ct = nan_if_failed(ts_ct)
        g_it = iter(g)
        dyn_ct = tuple(xp.astype(nan_if_failed(next(g_it)), x.dtype) if d else None for x, d in zip(dyn, is_diff))
        counts_out = xp.stack([xp.astype(s, counter.dtype) for s in stats[:4]]
                              + [xp.astype(failed, counter.dtype)])
        return (y0_ct, xp.astype(ts_ct, ts.dtype), dyn_ct, counts_out)

    def primal(y0, ts, dyn, counter):
        return forward(y0, ts, dyn, counter)

    fn = backend.custom_vjp(primal, fwd, bwd)
    ys, t_final, status, packed = fn(tuple(leaves), ts, dyn0, counter)
    return ys, packed, status, t_final


def _raise_backward_failure(backend, status: Status, ts, max_steps) -> None:
    cls = {Status.MAX_STEPS: MaxStepsReached, Status.DT_UNDERFLOW: StepSizeUnderflow}.get(status, NonFiniteState)
    t = backend.to_numpy(ts)
    raise cls(
        f"gradient='adjoint': the backward (adjoint) solve from t={t[-1]:g} to t={t[0]:g} failed with "
        f"{status.name} (max_steps={max_steps}). Remedies: loosen adjoint_rtol/adjoint_atol, raise max_steps, "
        "keep adjoint_seminorm=True, or use gradient='direct'.")

