"""``odeint``: solve ``dy/dt = func(t, y, args)`` with any backend.

This module is the public boundary of the ODE layer: it validates every input, builds
the :class:`~otflow.ode.loop.LoopSettings`, runs the integration loop
(:mod:`.loop`) directly or inside the adjoint method's custom VJP (:mod:`.adjoint`),
and turns a failed solve's :class:`~otflow.Status` into an exception.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..base import LOOP_KINDS, Backend, get_backend
from ..base.errors import MaxStepsReached, NonFiniteState, Status, StepSizeUnderflow
from ..base.options import reject_unknown_keywords, unknown_option_message
from .adjoint import GRADIENTS, Adjoint, adjoint_integrate, resolve_gradient
from .loop import DEFAULT_MAX_STEPS, LoopSettings, Stats, integrate
from .solvers import SOLVERS, AbstractRungeKutta
from .step_size import PIController, check_tolerance, resolve_norm

__all__ = ["odeint", "resolve_solver", "fixed_step_count", "raise_for_status", "Solution", "Stats", "DEFAULT_RTOL",
           "DEFAULT_ATOL", "DEFAULT_MAX_STEPS", "GRADIENTS"]

#: The tolerances of adaptive methods when ``rtol``/``atol`` are not given: the FFJORD/RNODE
#: training setting (rtol = atol = 1e-5).
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
#: rtol below this many machine epsilons of the state's dtype draws a warning
_RTOL_EPS_FACTOR = 64


@dataclass(frozen=True)
class Solution:
    """What :func:`odeint` returns.

    :param ts: the output times (an array of the state's dtype).
    :param ys: the structure of ``y0`` with a leading axis over ``ts`` on every leaf.
    :param stats: the :class:`Stats` of the solve (the forward solve with ``gradient="adjoint"``).
    :param status: a 0-d int array holding a :class:`~otflow.Status`.
    :param t_final: the time the solve reached (``ts[-1]`` on success).
    """

    ts: Any
    ys: Any
    stats: Stats
    status: Any
    t_final: Any

    @property
    def nfe(self) -> int:
        """Evaluations of ``func`` (read on the host)."""
        return int(self.stats.nfe)

    @property
    def n_steps(self) -> int:
        """Attempted steps, accepted and rejected (read on the host)."""
        return int(self.stats.n_steps)

    @property
    def n_accepted(self) -> int:
        """Accepted steps (read on the host)."""
        return int(self.stats.n_accepted)

    @property
    def n_rejected(self) -> int:
        """Rejected steps (read on the host)."""
        return int(self.stats.n_rejected)

    @property
    def result(self) -> Status:
        """The status as a :class:`~otflow.Status` (read on the host)."""
        return Status(int(self.status))


# --------------------------------------------------------------------------------------------
# the public entry point

#: keywords of the first release and what replaced them
_REPLACED_KEYWORDS = {
    "adjoint_rtol": "gradient=otflow.Adjoint(rtol=...)",
    "adjoint_atol": "gradient=otflow.Adjoint(atol=...)",
    "adjoint_seminorm": "gradient=otflow.Adjoint(seminorm=...)",
    "adjoint_counter": "gradient=otflow.Adjoint(counter=...)",
}


@reject_unknown_keywords(replaced=_REPLACED_KEYWORDS)
def odeint(
    func: Callable,
    y0,
    t,
    *,
    args=None,
    method="dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    n_steps: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    norm=None,
    controller: PIController | None = None,
    dt_min: float | None = None,
    loop_kind: str | None = None,
    gradient: str | Adjoint = "direct",
    backend: str | Backend | None = None,
    throw: bool = True,
    check_inputs: bool = True,
) -> Solution:
    """Solve ``dy/dt = func(t, y, args)`` from ``y(t[0]) = y0`` and return ``y`` at every ``t``.

    Explicit Runge–Kutta methods (Hairer, Nørsett & Wanner, *Solving ODEs I*, 1993):
    fixed-step or adaptive with an embedded error estimate, as in FFJORD (Grathwohl et al.,
    ICLR 2019) and RNODE (Finlay et al., ICML 2020). See ``docs/solvers.md`` and
    ``docs/gradients.md``.

    :param func: ``func(t, y, args) -> dy/dt`` with the tree structure, shapes and dtype of
        ``y``. Everything that may need a gradient (parameters, a probe, the end time) must
        travel in ``args``, never in a closure, so the adjoint method can see it.
    :param y0: an array or a tree (tuple, list, dict) of floating arrays of one dtype.
    :param t: 1-D strictly increasing or decreasing output times (at least two). May be a
        (traced, differentiable) array of the backend. Every output time is hit exactly:
        steps are shortened to land on it (no interpolation).
    :param args: a tree of arrays passed to ``func``.
    :param method: a name (``"dopri5"``, the default and adaptive; ``"rk4"``, ``"midpoint"``,
        ``"euler"``, fixed-step; case-insensitive), a solver class or instance — also a
        user's subclass of :class:`~otflow.ode.solvers.AbstractRungeKutta` with its own
        :class:`~otflow.ButcherTableau`, with or without FSAL. Whether the method is adaptive
        is a property of its tableau (an embedded error estimate).
    :param rtol: adaptive methods: the relative tolerance (``None``: 1e-5, the FFJORD/RNODE
        setting). The error of a step, scaled by ``atol + rtol·max(|y₀|, |y₁|)``, must have
        ``norm ≤ 1``. Fixed-step methods refuse it.
    :param atol: adaptive methods: the absolute tolerance (``None``: 1e-5). Fixed-step
        methods refuse it.
    :param step_size: fixed-step methods: the largest step; each output interval is cut into
        ``ceil(|Δt| / step_size)`` equal steps. Adaptive methods: the first step (Hairer's
        starting-step algorithm chooses it otherwise).
    :param n_steps: fixed-step methods only: equal steps per output interval (use this when
        ``t`` is traced, e.g. a learnable end time under ``jax.jit``).
    :param max_steps: adaptive methods: the bound on the steps (accepted + rejected) of the solve.
    :param norm: adaptive methods: the error norm, ``None``/``"rms"``, ``"max"``,
        ``"leaf_rms_max"``, an :class:`~otflow.ErrorNorm` (with a ``mask`` to leave state
        components out of error control), or a callable of the scaled-error tree returning a
        0-d array. Fixed-step methods refuse it.
    :param controller: adaptive methods: a :class:`~otflow.PIController` (default: scipy's
        integral controller settings). Fixed-step methods refuse it.
    :param dt_min: adaptive methods: the smallest allowed step magnitude (default
        ``10·eps·max(|t|, |t₁ − t₀|)``). Fixed-step methods refuse it.
    :param loop_kind: the backend's while-loop kind for adaptive solves (``"forward"``,
        ``"bounded"``, ``"checkpointed"``; see :data:`otflow.base.LOOP_KINDS`). Default: with
        ``gradient="direct"`` on a backend that cannot reverse-differentiate a ``"forward"``
        loop (JAX), ``"checkpointed"`` (memory sublinear in ``max_steps``; on JAX online
        checkpointing that stores every step's input up to 64 steps, so the gradient costs
        2 forward passes + 1 backward pass of the steps taken);
        ``"forward"`` otherwise (torch's eager loop is always differentiable; the adjoint's
        forward solve keeps no tape). Pass ``"forward"`` for JAX solves that are never
        reverse-differentiated: cheaper to compile and to run. Fixed-step methods on a
        compiled backend (JAX): ``"checkpointed"`` runs the steps in the checkpointed loop,
        so ``gradient="direct"`` stores the state entering each step instead of every
        stage's residuals, for one more forward pass (64-D RNODE at 64 RK4 steps: 26 MB of
        XLA scratch instead of 1.6 GB; see ``docs/performance.md``, Memory); the default is
        the plain loop, the fastest for the few steps of RNODE's recipes.
    :param gradient: how reverse-mode gradients flow through the solve: ``"direct"``
        (default) backpropagates through every solver operation, the exact gradient of the
        computed solution, memory growing with the number of steps; ``"adjoint"`` or an
        :class:`~otflow.Adjoint` (its backward tolerances, seminorm and step counter) solves
        the adjoint equations backward from ``t[-1]`` to ``t[0]`` (Chen et al., NeurIPS
        2018), memory independent of the number of steps, the gradient accurate to the
        backward tolerance. Both give gradients with respect to ``y0``, the array leaves of
        ``args`` and ``t``. On a backend without autodiff both simply solve.
    :param backend: a backend name or object; inferred from ``y0`` when None (numpy arrays
        run on the reference backend).
    :param throw: raise a :class:`~otflow.SolverError` (``MaxStepsReached``,
        ``StepSizeUnderflow``, ``NonFiniteState``) when the solve fails. Under ``jax.jit``
        the status is not concrete: the solution's ``status`` must be checked by the caller.
    :param check_inputs: check on the host that ``y0`` is finite (one device-to-host copy per
        leaf). Loops whose inputs are validated elsewhere (the training step, ``Flow``
        evaluation) pass ``False``; a non-finite state is then still reported by the status.
    :returns: a :class:`Solution`: ``ts``, ``ys`` (leading axis over ``t``), ``stats``
        (``nfe``, ``n_steps``, ``n_accepted``, ``n_rejected``), ``status`` and ``t_final``.
    :raises ValueError: bad ``y0``, ``t`` or option values, or options that do not apply
        to the method (each message names the problem and the fix).
    :raises TypeError: a misspelled or replaced keyword (naming the valid or new one), a
        non-floating ``y0``, a ``func`` returning the wrong dtype.
    :raises otflow.SolverError: the solve failed and ``throw`` is true.
    """
    backend = get_backend(backend, like=y0)
    solver = resolve_solver(method)
    adjoint = resolve_gradient(gradient)
    _check_common_options(max_steps, loop_kind)
    leaves, treedef = _state_leaves(backend, y0, check_inputs)
    ts, host_t = _output_times(backend, t, leaves[0].dtype, backend.device_of(leaves[0]))
    if loop_kind is None:
        direct_needs_reverse = (adjoint is None and solver.adaptive and backend.has_autodiff
                                and "forward" not in backend.reverse_loop_kinds)
        loop_kind = "checkpointed" if direct_needs_reverse else "forward"
    if solver.adaptive:
        settings = _adaptive_settings(solver, backend, leaves[0].dtype, rtol=rtol, atol=atol, step_size=step_size,
                                      n_steps=n_steps, max_steps=max_steps, norm=norm, controller=controller,
                                      dt_min=dt_min, loop_kind=loop_kind)
    else:
        settings = _fixed_step_settings(solver, backend, host_t, ts, rtol=rtol, atol=atol, step_size=step_size,
                                        n_steps=n_steps, norm=norm, controller=controller, dt_min=dt_min,
                                        adjoint=adjoint, loop_kind=loop_kind)
    if adjoint is not None and backend.has_autodiff:
        result = adjoint_integrate(func, leaves, treedef, ts, args, settings, adjoint, throw=throw)
    else:
        result = integrate(func, leaves, treedef, ts, args, settings)
    sol = Solution(ts=ts, ys=backend.tree_unflatten(treedef, list(result.ys)), stats=result.stats,
                   status=result.status, t_final=result.t_final)
    if throw and backend.is_concrete(sol.status):
        raise_for_status(sol, backend, max_steps=max_steps)
    return sol


# --------------------------------------------------------------------------------------------
# validation at the boundary


#: other libraries' names for the methods otflow has
_OTHER_NAMES = {"rk45": "dopri5", "dopri": "dopri5", "dormand_prince": "dopri5", "rk": "rk4", "rk4_classic": "rk4",
                "explicit_euler": "euler", "forward_euler": "euler", "explicit_midpoint": "midpoint"}


def resolve_solver(method) -> AbstractRungeKutta:
    """The solver object for ``method``.

    Whether a method is adaptive, its order and its stages are properties of this object;
    every layer asks it rather than comparing names.

    :param method: a name of :data:`~otflow.ode.solvers.SOLVERS` (case-insensitive), a
        solver class or a solver instance (also of a user's subclass).
    :returns: a solver instance.
    :raises ValueError: an unknown name (the nearest valid one, or otflow's name for another
        library's, is suggested).
    :raises TypeError: neither a name nor a solver.
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
    raise TypeError(f"method must be a name ({', '.join(SOLVERS)}), a subclass of AbstractRungeKutta or an "
                    f"instance of one, got {type(method).__name__}")


def _check_common_options(max_steps, loop_kind) -> None:
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
    if loop_kind is not None and loop_kind not in LOOP_KINDS:
        raise ValueError(unknown_option_message("loop_kind", loop_kind, LOOP_KINDS))


def _as_state_array(backend, x):
    if not backend.owns(x):
        x = backend.asarray(x)
    if not backend.namespace().isdtype(x.dtype, "real floating"):
        raise TypeError(f"y0 must hold real floating arrays, got dtype {x.dtype}; cast it (e.g. to float32 or float64)")
    return x


def _state_leaves(backend, y0, check_inputs: bool):
    """The leaves of ``y0`` as arrays of ``backend`` with one floating dtype, and its structure."""
    leaves, treedef = backend.tree_flatten(y0)
    if not leaves:
        raise ValueError("y0 has no arrays")
    leaves = [_as_state_array(backend, x) for x in leaves]
    dtype = leaves[0].dtype
    for x in leaves[1:]:
        if x.dtype != dtype:
            raise TypeError(f"all leaves of y0 must share one dtype; got {dtype} and {x.dtype}. Cast them first.")
    backend.check_dtype(dtype)
    for x in leaves if check_inputs else ():
        # on the host: under jax.jit even an operation on a concrete (closed-over) array is traced
        if backend.is_concrete(x) and not np.all(np.isfinite(backend.to_numpy(x))):
            raise ValueError("y0 contains NaN or inf; every initial value must be finite")
    return leaves, treedef


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


def _output_times(backend, t, dtype, device):
    """``(ts, host_t)``: the output times as a backend array of the state's dtype, and as a
    float64 numpy array when they can be read on the host (None when traced)."""
    host_t = _host_times(t)
    if host_t is not None:
        _check_times(host_t)
        return backend.asarray(host_t, dtype=dtype, device=device), host_t
    ts = backend.asarray(t, device=device)
    if ts.dtype != dtype:
        ts = backend.namespace().astype(ts, dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"t must be a 1-D sequence of at least two times, got shape {tuple(ts.shape)}")
    if backend.is_concrete(ts):
        host_t = backend.to_numpy(ts).astype(np.float64)
        _check_times(host_t)
    return ts, host_t


def _adaptive_settings(solver, backend, dtype, *, rtol, atol, step_size, n_steps, max_steps, norm, controller,
                       dt_min, loop_kind) -> LoopSettings:
    if n_steps is not None:
        raise ValueError(f"n_steps applies to fixed-step methods; {solver.name!r} is adaptive "
                         "(use step_size= for its first step)")
    rtol = DEFAULT_RTOL if rtol is None else check_tolerance("rtol", rtol)
    atol = DEFAULT_ATOL if atol is None else check_tolerance("atol", atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol are both 0: an adaptive solver needs a positive tolerance")
    eps = float(backend.namespace().finfo(dtype).eps)
    if 0 < rtol < _RTOL_EPS_FACTOR * eps:
        warnings.warn(
            f"rtol={rtol:g} is below {_RTOL_EPS_FACTOR}× the machine epsilon of {dtype} "
            f"({_RTOL_EPS_FACTOR * eps:.1e}); "
            "the solver cannot meet it and will take tiny steps. Use float64 or a larger rtol.",
            RuntimeWarning, stacklevel=4)  # the caller of odeint, past its decorator
    if step_size is not None:
        step_size = _positive_finite("step_size", step_size)
    if dt_min is not None:
        dt_min = _positive_finite("dt_min", dt_min)
    if controller is not None and not isinstance(controller, PIController):
        raise TypeError(f"controller must be a PIController, got {type(controller).__name__}")
    resolve_norm(norm, None, None)  # refuses an unknown kind or type now, not inside the loop
    return LoopSettings(solver=solver, backend=backend, rtol=rtol, atol=atol, step_size=step_size,
                        max_steps=int(max_steps), norm=norm, controller=controller or PIController(), dt_min=dt_min,
                        loop_kind=loop_kind)


def _positive_finite(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive float, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return v


def _fixed_step_settings(solver, backend, host_t, ts, *, rtol, atol, step_size, n_steps, norm, controller, dt_min,
                         adjoint, loop_kind: str = "forward") -> LoopSettings:
    given = [name for name, v in (("rtol", rtol), ("atol", atol), ("norm", norm), ("controller", controller),
                                  ("dt_min", dt_min)) if v is not None]
    if given:
        raise ValueError(f"{solver.name!r} is a fixed-step method: {', '.join(given)} "
                         f"{'does' if len(given) == 1 else 'do'} not apply (they control adaptive steps); "
                         "leave them out, or use an adaptive method such as method='dopri5'")
    if adjoint is not None and (adjoint.rtol is not None or adjoint.atol is not None):
        raise ValueError(f"{solver.name!r} is a fixed-step method: Adjoint(rtol=..., atol=...) do not apply "
                         "(the backward solve takes the forward solve's steps in reverse)")
    steps = _fixed_step_counts(solver, host_t, ts.shape[0] - 1, step_size, n_steps)
    return LoopSettings(solver=solver, backend=backend, steps_per_interval=steps, loop_kind=loop_kind)


def _fixed_step_counts(solver, host_t, n_intervals: int, step_size, n_steps) -> tuple[int, ...]:
    """The number of equal steps in each output interval."""
    if (step_size is None) == (n_steps is None):
        raise ValueError(f"fixed-step method {solver.name!r} needs exactly one of step_size= or n_steps=")
    if n_steps is not None:
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps <= 0:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        return (int(n_steps),) * n_intervals
    h = _positive_finite("step_size", step_size)
    if host_t is None:
        raise ValueError("step_size needs concrete output times to count the steps; with a traced t "
                         "(e.g. a learnable end time under jit) pass n_steps= instead")
    return tuple(fixed_step_count(abs(d), h) for d in np.diff(host_t))


def fixed_step_count(span: float, step_size: float) -> int:
    """The number of equal steps of at most ``step_size`` that cover ``span`` (at least one).

    :param span: the length of the interval, ``|t₁ − t₀|``.
    :param step_size: the largest step.
    :returns: ``ceil(span / step_size)``, with a relative slack of 1e-12 so that a span that
        is a whole number of steps in exact arithmetic is not given one step more.
    """
    return max(1, math.ceil(span / float(step_size) * (1 - 1e-12)))


def raise_for_status(sol: Solution, backend: Backend, *, max_steps: int | None = None) -> None:
    """Raise the :class:`~otflow.SolverError` matching a failed solution's status (nothing on success).

    :param sol: a solution of :func:`odeint` (its status is read on the host).
    :param backend: the backend of the solution's arrays.
    :param max_steps: the bound the solve ran under, named in the message.
    :raises otflow.MaxStepsReached: the steps ran out before the last output time.
    :raises otflow.StepSizeUnderflow: a rejected step shrank below ``dt_min``.
    :raises otflow.NonFiniteState: the state became NaN or inf.
    """
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
