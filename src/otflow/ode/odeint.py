"""``odeint``: solve ``dy/dt = func(t, y, args)`` with any backend.

The loop is written once against the array API: step acceptance is a select
(``xp.where``), never a Python ``if`` on array values, and iteration goes
through the backend's ``while_loop`` / ``fori_loop`` / ``scan``, so the same
code runs eagerly in torch and compiled in JAX. Failures are a :class:`Status`
inside the loop and an exception only at the public boundary.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .adjoint import COUNTER_FIELDS, adjoint_solve
from ..base.errors import MaxStepsReached, NonFiniteState, Status, StepSizeUnderflow
from ..base.options import reject_unknown_keywords, unknown_option_message
from .step_size import ErrorNorm, PIController, initial_step_size, resolve_norm
from ..base import Backend, get_backend
from .solvers import SOLVERS, AbstractRungeKutta

__all__ = ["odeint", "resolve_solver", "Solution", "Stats", "DEFAULT_RTOL", "DEFAULT_ATOL", "DEFAULT_MAX_STEPS", "GRADIENTS"]

#: How :func:`odeint` is differentiated: ``"direct"`` backpropagates through the solver's
#: operations (discretize-then-optimize); ``"adjoint"`` solves the adjoint equations
#: backward in time (optimize-then-discretize). See ``docs/gradients.md``.
GRADIENTS = ("direct", "adjoint")

#: Default tolerances: the FFJORD/RNODE training setting (rtol = atol = 1e-5).
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
#: rtol below this many machine epsilons of the state's dtype draws a warning
_RTOL_EPS_FACTOR = 64
#: Default bound on the number of steps (accepted + rejected) of one solve.
DEFAULT_MAX_STEPS = 4096


@dataclass(frozen=True)
class Stats:
    """Counts of one solve (0-d integer arrays, or Python ints where known statically)."""

    nfe: Any
    n_steps: Any
    n_accepted: Any
    n_rejected: Any


@dataclass(frozen=True)
class Solution:
    """What :func:`odeint` returns.

    ``ys`` has the structure of ``y0`` with a leading axis over ``ts``. ``status`` is a
    0-d int array holding a :class:`Status`; ``t_final`` is the time the solve reached
    (equal to ``ts[-1]`` on success).
    """

    ts: Any
    ys: Any
    stats: Stats
    status: Any
    t_final: Any

    @property
    def nfe(self) -> int:
        return int(self.stats.nfe)

    @property
    def n_steps(self) -> int:
        return int(self.stats.n_steps)

    @property
    def n_accepted(self) -> int:
        return int(self.stats.n_accepted)

    @property
    def n_rejected(self) -> int:
        return int(self.stats.n_rejected)

    @property
    def result(self) -> Status:
        return Status(int(self.status))


# --------------------------------------------------------------------------------------------
# validation at the boundary


#: other libraries' names for the methods otflow has
_OTHER_NAMES = {"rk45": "dopri5", "dopri": "dopri5", "dormand_prince": "dopri5", "rk": "rk4", "rk4_classic": "rk4",
                "explicit_euler": "euler", "forward_euler": "euler", "explicit_midpoint": "midpoint"}


def resolve_solver(method) -> AbstractRungeKutta:
    """The solver object for ``method``: a name (case-insensitive), a solver class or instance.

    Whether a method is adaptive, its order and its stages are properties of this object;
    every layer asks it rather than comparing names.
    """
    if isinstance(method, AbstractRungeKutta):
        return method
    if isinstance(method, type) and issubclass(method, AbstractRungeKutta):
        return method()
    if isinstance(method, str):
        key = method.lower()
        if key in SOLVERS:
            return SOLVERS[key]()
        if key in _OTHER_NAMES:
            raise ValueError(f"unknown method {method!r}. Did you mean {_OTHER_NAMES[key]!r}? "
                             f"Valid: {', '.join(map(repr, SOLVERS))}.")
        raise ValueError(unknown_option_message("method", method, SOLVERS))
    raise TypeError(f"method must be a name ({', '.join(SOLVERS)}) or a solver instance, got {type(method).__name__}")


def _check_tolerance(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a non-negative float, got {value!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return v


def _host_times(t) -> np.ndarray | None:
    """``t`` as a float64 numpy array when it can be read without tracing, else None."""
    if isinstance(t, (list, tuple)):
        return np.asarray([float(x) for x in t], dtype=np.float64)
    if isinstance(t, np.ndarray):
        return t.astype(np.float64)
    return None


def _check_times(ht: np.ndarray) -> None:
    if ht.ndim != 1 or ht.shape[0] < 2:
        raise ValueError(f"t must be a 1-D sequence of at least two times, got shape {ht.shape}")
    if not np.all(np.isfinite(ht)):
        raise ValueError(f"t must be finite, got {ht}")
    d = np.diff(ht)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError(f"t must be strictly increasing or strictly decreasing, got {ht}")


# --------------------------------------------------------------------------------------------
# the public entry point


@reject_unknown_keywords
def odeint(
    func: Callable,
    y0,
    t,
    *,
    args=None,
    method="dopri5",
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    step_size: float | None = None,
    n_steps: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    norm=None,
    controller: PIController | None = None,
    dt_min: float | None = None,
    loop_kind: str | None = None,
    gradient: str = "direct",
    adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None,
    adjoint_seminorm: bool = True,
    adjoint_counter=None,
    backend: str | Backend | None = None,
    throw: bool = True,
    check_inputs: bool = True,
) -> Solution:
    """Solve ``dy/dt = func(t, y, args)`` from ``y(t[0]) = y0`` and return ``y`` at every ``t``.

    Parameters
    ----------
    func:
        ``func(t, y, args) -> dy/dt`` with the tree structure, shapes and dtype of ``y``.
        Everything that may need a gradient (parameters, a probe, the end time) must
        travel in ``args``, never in a closure, so the adjoint method can see it.
    y0:
        An array or a tree (tuple, list, dict) of floating arrays of one dtype.
    t:
        1-D strictly increasing or decreasing output times (at least two). May be a
        (traced, differentiable) array of the backend. Every output time is hit
        exactly: steps are shortened to land on it (no interpolation).
    args:
        A tree of arrays passed to ``func``.
    method:
        ``"dopri5"`` (adaptive, default), ``"rk4"``, ``"midpoint"``, ``"euler"`` (fixed
        step), or a solver instance.
    rtol, atol:
        Relative and absolute tolerances of adaptive methods (default 1e-5 each, the
        FFJORD/RNODE setting). The error of a step, scaled by
        ``atol + rtol·max(|y₀|, |y₁|)``, must have ``norm ≤ 1``. Ignored by fixed-step
        methods only if left at their defaults; otherwise refused.
    step_size:
        Fixed-step methods: the largest step; each output interval is cut into
        ``ceil(|Δt| / step_size)`` equal steps. Adaptive methods: the first step
        (Hairer's starting-step algorithm chooses it otherwise).
    n_steps:
        Fixed-step methods only: equal steps per output interval (use this when ``t``
        is traced, e.g. a learnable end time under ``jax.jit``).
    max_steps:
        Bound on the steps (accepted + rejected) of an adaptive solve.
    norm:
        The error norm: ``None``/``"rms"``, ``"max"``, ``"leaf_rms_max"``, an
        :class:`~otflow.ErrorNorm` (with a ``mask`` to leave state components out of
        error control), or a callable of the scaled-error tree returning a 0-d array.
    controller:
        A :class:`~otflow.PIController` (default: scipy's integral controller settings).
    dt_min:
        Smallest allowed step magnitude; the default is ``10·eps·max(|t|, |t₁ - t₀|)``.
    loop_kind:
        The backend's while-loop kind for adaptive solves (``"forward"``, ``"bounded"``,
        ``"checkpointed"``; see :data:`otflow.backend.LOOP_KINDS`). Default: with
        ``gradient="direct"`` on a backend that cannot reverse-differentiate a
        ``"forward"`` loop (JAX), ``"checkpointed"`` (memory sublinear in the number of
        steps); ``"forward"`` otherwise (torch's eager loop is always differentiable; the
        adjoint's forward solve keeps no tape). Pass ``"forward"`` for JAX solves that are
        never reverse-differentiated: cheaper to compile and to run.
    gradient:
        How reverse-mode gradients flow through the solve (see ``docs/gradients.md``):
        ``"direct"`` (default) backpropagates through every solver operation, the exact
        gradient of the computed solution, memory growing with the number of steps;
        ``"adjoint"`` (Chen et al. 2018) solves the adjoint equations backward from
        ``t[-1]`` to ``t[0]`` with their own tolerances, memory independent of the number
        of steps, the gradient accurate to the backward tolerance. Both give gradients
        with respect to ``y0``, the array leaves of ``args`` and ``t``.
    adjoint_rtol, adjoint_atol:
        Tolerances of the adjoint's backward solve (adaptive methods); default: ``rtol``
        and ``atol``.
    adjoint_seminorm:
        Leave the parameter adjoint (the gradient being accumulated) out of the backward
        solve's error control (Kidger, Chen & Lyons 2021); the state and its adjoint
        are controlled with ``norm`` (its mask applies to both). Default True.
    adjoint_counter:
        An :func:`otflow.adjoint_counter`: its gradient receives the backward solve's
        counts (read them with :func:`otflow.adjoint_stats`).
    backend:
        A backend name or object; inferred from ``y0`` when None (numpy arrays run on the
        reference backend).
    throw:
        Raise :class:`~otflow.SolverError` (``MaxStepsReached``, ``StepSizeUnderflow``,
        ``NonFiniteState``) when the solve fails. Under ``jax.jit`` the status is not
        concrete: the solution's ``status`` must be checked by the caller.
    check_inputs:
        Check on the host that ``y0`` is finite (one device-to-host copy per leaf). Loops
        whose inputs are validated elsewhere (the training step, ``Flow`` evaluation) pass
        ``False``; a non-finite state is then still reported by the solve's status.

    Returns
    -------
    Solution
        ``ts``, ``ys`` (leading axis over ``t``), ``stats`` (``nfe``, ``n_steps``,
        ``n_accepted``, ``n_rejected``), ``status`` and ``t_final``.
    """
    backend = get_backend(backend, like=y0)
    xp = backend.namespace()
    solver = resolve_solver(method)
    rtol = _check_tolerance("rtol", rtol)
    atol = _check_tolerance("atol", atol)
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if controller is not None and not isinstance(controller, PIController):
        raise TypeError(f"controller must be a PIController, got {type(controller).__name__}")
    if loop_kind is not None and loop_kind not in ("forward", "bounded", "checkpointed"):
        raise ValueError(unknown_option_message("loop_kind", loop_kind, ("forward", "bounded", "checkpointed")))
    _check_gradient_options(gradient, adjoint_rtol, adjoint_atol, adjoint_seminorm, adjoint_counter)

    leaves, treedef = backend.tree_flatten(y0)
    if not leaves:
        raise ValueError("y0 has no arrays")
    leaves = [_as_state_array(backend, xp, x) for x in leaves]
    dtype = leaves[0].dtype
    for x in leaves[1:]:
        if x.dtype != dtype:
            raise TypeError(f"all leaves of y0 must share one dtype; got {dtype} and {x.dtype}. Cast them first.")
    backend.check_dtype(dtype)
    device = backend.device_of(leaves[0])
    for x in leaves if check_inputs else ():
        # on the host: under jax.jit even an operation on a concrete (closed-over) array is traced
        if backend.is_concrete(x) and not np.all(np.isfinite(backend.to_numpy(x))):
            raise ValueError("y0 contains NaN or inf; every initial value must be finite")

    eps = float(xp.finfo(dtype).eps)
    if solver.adaptive and 0 < rtol < _RTOL_EPS_FACTOR * eps:
        warnings.warn(
            f"rtol={rtol:g} is below {_RTOL_EPS_FACTOR}× the machine epsilon of {dtype} "
            f"({_RTOL_EPS_FACTOR * eps:.1e}); "
            "the solver cannot meet it and will take tiny steps. Use float64 or a larger rtol.",
            RuntimeWarning, stacklevel=2)
    if solver.adaptive and rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: an adaptive solver needs a positive tolerance")

    host_t = _host_times(t)
    if host_t is not None:
        _check_times(host_t)
        ts = backend.asarray(host_t, dtype=dtype, device=device)
    else:
        ts = backend.asarray(t, device=device)
        if ts.dtype != dtype:
            ts = xp.astype(ts, dtype)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"t must be a 1-D sequence of at least two times, got shape {tuple(ts.shape)}")
        if backend.is_concrete(ts):
            host_t = backend.to_numpy(ts).astype(np.float64)
            _check_times(host_t)

    if solver.adaptive:
        if n_steps is not None:
            raise ValueError(f"n_steps applies to fixed-step methods; {solver.name!r} is adaptive "
                             "(use step_size= for its first step)")
        if step_size is not None and not (float(step_size) > 0):
            raise ValueError(f"step_size must be positive, got {step_size!r}")
        counts = None
    else:
        if (rtol, atol) != (DEFAULT_RTOL, DEFAULT_ATOL) or norm is not None or controller is not None:
            raise ValueError(f"{solver.name!r} is a fixed-step method: rtol, atol, norm and controller do not apply")
        if adjoint_rtol is not None or adjoint_atol is not None:
            raise ValueError(f"{solver.name!r} is a fixed-step method: adjoint_rtol and adjoint_atol do not apply "
                             "(the backward solve takes the forward solve's steps in reverse)")
        counts = _fixed_step_counts(solver, host_t, step_size, n_steps)

    if loop_kind is None:
        direct_needs_reverse = (gradient == "direct" and solver.adaptive and backend.has_autodiff
                                and "forward" not in backend.reverse_loop_kinds)
        loop_kind = "checkpointed" if direct_needs_reverse else "forward"
    options = dict(solver=solver, backend=backend, rtol=rtol, atol=atol, step_size=step_size, counts=counts,
                   max_steps=int(max_steps), norm=norm, controller=controller or PIController(), dt_min=dt_min,
                   loop_kind=loop_kind)
    if gradient == "adjoint" and backend.has_autodiff:
        counter = adjoint_counter
        if counter is None:
            counter = xp.zeros((len(COUNTER_FIELDS),), dtype=dtype, device=device)
        ys_leaves, stats, status, t_final = adjoint_solve(
            func, leaves, treedef, ts, args, counter, adjoint_rtol=rtol if adjoint_rtol is None else adjoint_rtol,
            adjoint_atol=atol if adjoint_atol is None else adjoint_atol, seminorm=adjoint_seminorm, throw=throw,
            solve_flat=_solve_flat, **options)
        if counts is not None:  # fixed steps: the counts are static
            total = sum(counts) * (ts.shape[0] - 1 if len(counts) == 1 else 1)
            stats = Stats(nfe=total * solver.evals_per_step, n_steps=total, n_accepted=total, n_rejected=0)
        else:
            stats = Stats(*stats)
        sol = Solution(ts=ts, ys=backend.tree_unflatten(treedef, list(ys_leaves)), stats=stats, status=status,
                       t_final=t_final)
    else:
        sol = solve(func, leaves, treedef, ts, args, **options)
    if throw and backend.is_concrete(sol.status):
        raise_for_status(sol, backend, max_steps=max_steps)
    return sol


def _check_gradient_options(gradient, adjoint_rtol, adjoint_atol, adjoint_seminorm, adjoint_counter) -> None:
    if not isinstance(gradient, str) or gradient not in GRADIENTS:
        raise ValueError(unknown_option_message("gradient", str(gradient), GRADIENTS))
    if not isinstance(adjoint_seminorm, bool):
        raise TypeError(f"adjoint_seminorm must be True or False, got {adjoint_seminorm!r}")
    if gradient == "direct":
        given = [name for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol),
                                      ("adjoint_counter", adjoint_counter)) if v is not None]
        if not adjoint_seminorm:
            given.append("adjoint_seminorm")
        if given:
            raise ValueError(f"{', '.join(given)} only apply with gradient='adjoint' (gradient='direct' "
                             "backpropagates through the forward solve)")
        return
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if v is not None:
            _check_tolerance(name, v)
    if adjoint_counter is not None:
        shape = tuple(getattr(adjoint_counter, "shape", ()))
        if shape != (len(COUNTER_FIELDS),):
            raise ValueError(f"adjoint_counter must come from otflow.adjoint_counter() (shape "
                             f"({len(COUNTER_FIELDS)},)), got shape {shape}")


def _as_state_array(backend, xp, x):
    if not backend.owns(x):
        x = backend.asarray(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"y0 must hold real floating arrays, got dtype {x.dtype}; cast it (e.g. to float32 or float64)")
    return x


def _fixed_step_counts(solver, host_t, step_size, n_steps) -> list[int]:
    if (step_size is None) == (n_steps is None):
        raise ValueError(f"fixed-step method {solver.name!r} needs exactly one of step_size= or n_steps=")
    n_intervals = None if host_t is None else host_t.shape[0] - 1
    if n_steps is not None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps <= 0:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        if n_intervals is None:
            return [int(n_steps)]  # the number of intervals is read from the traced t's shape later
        return [int(n_steps)] * n_intervals
    h = float(step_size)
    if not (h > 0 and math.isfinite(h)):
        raise ValueError(f"step_size must be positive and finite, got {step_size!r}")
    if host_t is None:
        raise ValueError("step_size needs concrete output times to count the steps; with a traced t "
                         "(e.g. a learnable end time under jit) pass n_steps= instead")
    return [max(1, math.ceil(abs(d) / h * (1 - 1e-12))) for d in np.diff(host_t)]


def raise_for_status(sol: Solution, backend: Backend, *, max_steps: int | None = None) -> None:
    """Raise the :class:`SolverError` matching a failed solution's status (no-op on success)."""
    status = Status(int(backend.to_numpy(sol.status)))
    if status is Status.SUCCESS:
        return
    t_final = float(backend.to_numpy(sol.t_final))
    ts = backend.to_numpy(sol.ts)
    span = f"[{ts[0]:g}, {ts[-1]:g}]"
    counts = (f"{int(sol.stats.n_steps)} steps ({int(sol.stats.n_accepted)} accepted, "
              f"{int(sol.stats.n_rejected)} rejected), {int(sol.stats.nfe)} evaluations")
    if status is Status.MAX_STEPS:
        raise MaxStepsReached(
            f"max_steps={max_steps} reached at t={t_final:g} of {span} after {counts}. Remedies: raise max_steps, "
            "loosen rtol/atol, check the dynamics for blow-up or stiffness, or use a fixed-step method "
            "(method='rk4', step_size=...).", sol)
    if status is Status.DT_UNDERFLOW:
        raise StepSizeUnderflow(
            f"step size underflow at t={t_final:g} of {span} after {counts}: the error estimate stayed above "
            "tolerance as the step shrank to the floor. The solution may be singular or very stiff there; loosen "
            "rtol/atol, lower dt_min, or regularize the dynamics (e.g. RNODE's kinetic and Jacobian terms).", sol)
    raise NonFiniteState(
        f"the state became NaN or inf at t={t_final:g} of {span} after {counts}. Check func for overflow or "
        "division by zero; with a fixed-step method, use smaller steps.", sol)


# --------------------------------------------------------------------------------------------
# the solve itself (no validation, no host reads but the adaptive loop's condition)


def solve(func, leaves, treedef, ts, args, *, solver, backend, rtol, atol, step_size, counts, max_steps,
          norm, controller, dt_min, loop_kind) -> Solution:
    """The unchecked solve on flat state leaves; :func:`odeint` validates and calls this."""
    ys_leaves, stats, status, t_final = _solve_flat(
        func, leaves, treedef, ts, args, solver=solver, backend=backend, rtol=rtol, atol=atol, step_size=step_size,
        counts=counts, max_steps=max_steps, norm=norm, controller=controller, dt_min=dt_min, loop_kind=loop_kind)
    return Solution(ts=ts, ys=backend.tree_unflatten(treedef, list(ys_leaves)), stats=stats, status=status,
                    t_final=t_final)


def _solve_flat(func, leaves, treedef, ts, args, *, solver, backend, rtol, atol, step_size, counts, max_steps,
                norm, controller, dt_min, loop_kind):
    """:func:`solve` returning ``(ys_leaves, stats, status, t_final)`` (the adjoint's building block)."""
    xp = backend.namespace()
    checked = []

    def f(t, y, a):
        out = func(t, backend.tree_unflatten(treedef, list(y)), a)
        out_leaves, out_def = backend.tree_flatten(out)
        if not checked:
            _check_rhs(out_leaves, out_def, y, treedef)
            checked.append(True)
        return tuple(out_leaves)

    y0 = tuple(leaves)
    if solver.adaptive:
        out = _solve_adaptive(f, y0, ts, args, solver, backend, xp, rtol, atol, step_size, max_steps,
                              resolve_norm(norm, treedef, backend.tree_unflatten), controller, dt_min, loop_kind)
    else:
        out = _solve_fixed(f, y0, ts, args, solver, backend, xp, counts)
    return out


def _check_rhs(out_leaves, out_def, y, treedef):
    if len(out_leaves) != len(y):
        raise ValueError(f"func returned {len(out_leaves)} arrays but the state has {len(y)}; "
                         "it must return dy/dt with the structure of y")
    for o, s in zip(out_leaves, y):
        if tuple(o.shape) != tuple(s.shape):
            raise ValueError(f"func returned an array of shape {tuple(o.shape)} for a state of shape "
                             f"{tuple(s.shape)}; dy/dt must have the shape of y")
        if o.dtype != s.dtype:
            raise TypeError(f"func returned dtype {o.dtype} for a state of dtype {s.dtype}; "
                            "dy/dt must have the dtype of y (check the dtype of parameters and constants)")


def _all_finite(xp, leaves):
    ok = None
    for x in leaves:
        v = xp.all(xp.isfinite(x))
        ok = v if ok is None else ok & v
    return ok


def _stack_outputs(xp, y0, ys):
    """Prepend ``y0`` to the per-interval outputs ``ys`` (leaves with a leading axis)."""
    return tuple(xp.concat([xp.expand_dims(a, axis=0), b], axis=0) for a, b in zip(y0, ys))


def _solve_fixed(f, y0, ts, args, solver, backend, xp, counts):
    n_intervals = ts.shape[0] - 1
    if len(counts) != n_intervals:
        counts = counts * n_intervals if len(counts) == 1 else counts
    outputs, y = [], y0
    for i in range(n_intervals):
        n = counts[i]
        t0, t1 = ts[i], ts[i + 1]
        h = (t1 - t0) / n

        def body(k, carry, h=h):
            t, y = carry
            y1, _, _ = solver.step(f, t, y, h, args)
            return (t + h, y1)

        _, y = backend.fori_loop(0, n, body, (t0, y))
        outputs.append(y)
    ys = tuple(xp.stack([y0[j]] + [o[j] for o in outputs]) for j in range(len(y0)))
    total = sum(counts)
    ok = _all_finite(xp, ys)
    device = backend.device_of(y0[0])
    status = xp.where(ok, xp.asarray(int(Status.SUCCESS), dtype=xp.int32, device=device),
                      xp.asarray(int(Status.NONFINITE), dtype=xp.int32, device=device))
    stats = Stats(nfe=total * solver.evals_per_step, n_steps=total, n_accepted=total, n_rejected=0)
    return ys, stats, status, ts[-1]


def _solve_adaptive(f, y0, ts, args, solver, backend, xp, rtol, atol, step_size, max_steps, norm_leaves,
                    controller, dt_min, loop_kind):
    sg = backend.stop_gradient
    dtype = y0[0].dtype
    device = backend.device_of(y0[0])
    int32 = xp.int32

    def const(value, dt=dtype):
        return xp.asarray(value, dtype=dt, device=device)

    t_start, t_stop = ts[0], ts[-1]
    direction = xp.where(t_stop > t_start, const(1.0), const(-1.0))
    eps = float(xp.finfo(dtype).eps)
    span_total = sg(xp.abs(t_stop - t_start))
    floor = const(float(dt_min)) if dt_min is not None else None

    f0 = f(t_start, y0, args)
    nfe0 = 1
    if step_size is not None:
        h0 = const(float(step_size))
    else:
        first_span = sg(xp.abs(ts[1] - t_start))
        h0 = initial_step_size(xp, f, sg(t_start), sg(y0), sg(f0), args, direction, first_span, rtol, atol,
                               norm_leaves, solver.error_order)
        h0 = sg(h0)
        nfe0 += 1
    zero_i = const(0, int32)
    state0 = dict(
        t=t_start, y=y0, f0=f0, h=h0 * direction,
        err_prev=const(1.0), rejected=const(False, xp.bool),
        n_steps=zero_i, n_accepted=zero_i, n_rejected=zero_i,
        nfe=const(nfe0, int32), status=zero_i,
    )
    per_step = solver.evals_per_step
    err_order = solver.error_order

    def interval(state, t_end):
        def cond(s):
            return (s["status"] == 0) & (direction * (t_end - s["t"]) > 0)

        def body(s):
            t, y, h = s["t"], s["y"], s["h"]
            remaining = t_end - t
            clip = xp.abs(sg(h)) >= xp.abs(sg(remaining))
            h_use = xp.where(clip, remaining, h)
            y1, y_err, f1 = solver.step(f, t, y, h_use, args, s["f0"])
            ys, y1s, es = sg(y), sg(y1), sg(y_err)
            scaled = [e / (atol + rtol * xp.maximum(xp.abs(a), xp.abs(b))) for e, a, b in zip(es, ys, y1s)]
            err = norm_leaves(scaled, xp)
            finite = xp.isfinite(err)
            accept = finite & (err <= 1.0)
            factor = controller.factor(xp, err, s["err_prev"], accept, s["rejected"], err_order)
            h_used = sg(h_use)
            h_next = h_used * factor
            h_next = xp.where(accept & clip, direction * xp.maximum(xp.abs(h_next), xp.abs(sg(h))), h_next)
            t_new = xp.where(accept, xp.where(clip, t_end, t + h_use), t)
            y_new = tuple(xp.where(accept, a, b) for a, b in zip(y1, y))
            f_new = tuple(xp.where(accept, a, b) for a, b in zip(f1, s["f0"]))
            n_steps = s["n_steps"] + 1
            lim = (const(10 * eps) * xp.maximum(xp.abs(sg(t_new)), span_total)
                   if floor is None else floor)
            underflow = (~accept) & (xp.abs(h_next) < lim)
            unfinished = direction * (t_end - t_new) > 0
            status = s["status"]
            status = xp.where(underflow, xp.where(finite, const(int(Status.DT_UNDERFLOW), int32),
                                                  const(int(Status.NONFINITE), int32)), status)
            status = xp.where((status == 0) & unfinished & (n_steps >= max_steps),
                              const(int(Status.MAX_STEPS), int32), status)
            acc_i = xp.astype(accept, int32)
            return dict(
                t=t_new, y=y_new, f0=f_new, h=h_next,
                err_prev=xp.where(accept, xp.maximum(err, const(1e-4)), s["err_prev"]),
                rejected=~accept,
                n_steps=n_steps, n_accepted=s["n_accepted"] + acc_i, n_rejected=s["n_rejected"] + (1 - acc_i),
                nfe=s["nfe"] + per_step, status=status,
            )

        state = backend.while_loop(cond, body, state, max_steps=max_steps, kind=loop_kind)
        return state, state["y"]

    final, ys = backend.scan(interval, state0, ts[1:])
    stats = Stats(nfe=final["nfe"], n_steps=final["n_steps"], n_accepted=final["n_accepted"],
                  n_rejected=final["n_rejected"])
    return _stack_outputs(xp, y0, ys), stats, final["status"], final["t"]
