"""The integration loop: fixed-step and adaptive Runge–Kutta solves on flat state leaves.

Written once against the array API and shared by both gradient modes (:func:`otflow.odeint`
calls :func:`integrate` directly for ``gradient="direct"``; the adjoint method calls it
for its forward solve and for each backward solve). Step acceptance is a select
(``xp.where``), never a Python ``if`` on array values, and iteration goes through the
backend's ``while_loop`` / ``fori_loop`` / ``scan``, so the same code runs eagerly in
torch and compiled in JAX. Failures are a :class:`~otflow.Status` value in the loop
state, never an exception. Nothing here validates its input: :func:`otflow.odeint` does.

The adaptive loop is the one of Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.4
(scipy's ``solve_ivp``): an embedded pair's error estimate, scaled by
``atol + rtol·max(|y₀|, |y₁|)``, accepts a step when its norm is at most 1, and a
:class:`~otflow.PIController` proposes the next step. FSAL methods (Dormand–Prince)
carry the last stage into the next step; methods without FSAL evaluate their first
stage anew in every step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ..base import Backend
from ..base.errors import Status
from .solvers import AbstractRungeKutta
from .step_size import PIController, initial_step_size, resolve_norm

__all__ = ["Stats", "LoopResult", "LoopSettings", "FlatRHS", "AdaptiveLoop", "integrate", "fixed_step_stats",
           "DEFAULT_MAX_STEPS"]

#: Default bound on the number of steps (accepted + rejected) of one adaptive solve.
DEFAULT_MAX_STEPS = 4096

#: accepted errors are floored at this before the PI controller's ``ε_prev`` sees them
_ERR_PREV_FLOOR = 1e-4


class Stats(NamedTuple):
    """Counts of one solve.

    Adaptive solves count in 0-d int32 arrays (they are known only when the loop has
    run); fixed-step solves in Python ints (they are known before it runs).
    """

    nfe: Any
    """Evaluations of ``func``."""
    n_steps: Any
    """Attempted steps (accepted + rejected)."""
    n_accepted: Any
    """Accepted steps."""
    n_rejected: Any
    """Rejected steps (always 0 for fixed-step methods)."""


class LoopResult(NamedTuple):
    """What :func:`integrate` returns."""

    ys: tuple
    """The output states: a tuple of leaves, each with a leading axis over the output times."""
    stats: Stats | None
    """The :class:`Stats` of the solve."""
    status: Any
    """A 0-d int32 array holding a :class:`~otflow.Status`."""
    t_final: Any
    """The time the solve reached (the last output time on success)."""


@dataclass(frozen=True)
class LoopSettings:
    """How to integrate, as validated by :func:`otflow.odeint`.

    :param solver: the Runge–Kutta method.
    :param backend: the backend computing the solve.
    :param steps_per_interval: fixed-step methods: the number of equal steps in each
        output interval (one count per interval); ``None`` for adaptive methods.
    :param rtol: adaptive methods: the relative tolerance.
    :param atol: adaptive methods: the absolute tolerance.
    :param step_size: adaptive methods: the first step (``None``: Hairer's starting step).
    :param max_steps: adaptive methods: the bound on attempted steps of the whole solve.
    :param norm: adaptive methods: the error norm as given to ``odeint(norm=...)``.
    :param controller: adaptive methods: the step-size controller.
    :param dt_min: adaptive methods: the smallest step magnitude (``None``: ``10·eps·max(|t|, |t₁ − t₀|)``).
    :param loop_kind: the backend's loop kind. Adaptive methods: the kind of the
        ``while_loop`` of attempted steps. Fixed-step methods: ``"checkpointed"`` runs the
        steps in the backend's checkpointed ``while_loop`` (reverse mode stores the state
        entering each step, or every few steps beyond the backend's slots, instead of every
        stage's residuals, and recomputes the stages: one more forward pass, at most two
        beyond the slots); any other kind runs them in ``fori_loop``.
    :param unroll: fixed-step methods: whether the backend may unroll the step loop
        (``fori_loop``; JAX unrolls short ones, which is faster on a CPU). The adjoint's
        solves pass ``False``: XLA kept per-step buffers of an unrolled backward solve
        alive, so its memory grew with the number of steps, and an unrolled forward solve
        only costs compilation memory there.
    """

    solver: AbstractRungeKutta
    backend: Backend
    steps_per_interval: tuple[int, ...] | None = None
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    max_steps: int = DEFAULT_MAX_STEPS
    norm: Any = None
    controller: PIController = PIController()
    dt_min: float | None = None
    loop_kind: str = "forward"
    unroll: bool = True


def fixed_step_stats(solver: AbstractRungeKutta, steps_per_interval) -> Stats:
    """The counts of a fixed-step solve, known before it runs (Python ints)."""
    total = sum(steps_per_interval)
    return Stats(nfe=total * solver.evals_per_step, n_steps=total, n_accepted=total, n_rejected=0)


class FlatRHS:
    """``func(t, y, args)`` on flat tuples of leaves: ``rhs(t, leaves, args) -> tuple of leaves``.

    The first call checks that ``func`` returned ``dy/dt`` with the structure, shapes and
    dtype of ``y`` (under tracing: the first trace).
    """

    def __init__(self, func: Callable, treedef, backend: Backend):
        self.func = func
        self.treedef = treedef
        self.backend = backend
        self.checked = False

    def __call__(self, t, y: tuple, args) -> tuple:
        out = self.func(t, self.backend.tree_unflatten(self.treedef, list(y)), args)
        out_leaves, _ = self.backend.tree_flatten(out)
        if not self.checked:
            _check_rhs(out_leaves, y)
            self.checked = True
        return tuple(out_leaves)


def _check_rhs(out_leaves, y) -> None:
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


def integrate(func: Callable, leaves, treedef, ts, args, settings: LoopSettings) -> LoopResult:
    """Solve ``dy/dt = func(t, y, args)`` from the flat initial state ``leaves`` over the output times ``ts``.

    :param func: the user's ``func(t, y, args)`` on trees shaped like ``treedef``.
    :param leaves: the leaves of ``y0`` (arrays of the backend, one floating dtype).
    :param treedef: the tree structure of ``y0`` (from ``backend.tree_flatten``).
    :param ts: the output times, a 1-D array of the state's dtype.
    :param args: passed to ``func`` unchanged.
    :param settings: the validated :class:`LoopSettings`.
    :returns: a :class:`LoopResult`; ``ys`` starts with ``y0`` at ``ts[0]``.
    """
    rhs = FlatRHS(func, treedef, settings.backend)
    y0 = tuple(leaves)
    if settings.solver.adaptive:
        norm_leaves = resolve_norm(settings.norm, treedef, settings.backend.tree_unflatten)
        return AdaptiveLoop(rhs, args, settings, norm_leaves, y0, ts).run(y0, ts)
    return _integrate_fixed(rhs, y0, ts, args, settings)


def _all_finite(xp, leaves):
    ok = None
    for x in leaves:
        v = xp.all(xp.isfinite(x))
        ok = v if ok is None else ok & v
    return ok


def _integrate_fixed(rhs: FlatRHS, y0: tuple, ts, args, settings: LoopSettings) -> LoopResult:
    """Equal steps in each output interval (``settings.steps_per_interval``) in the backend's ``fori_loop``."""
    backend, solver = settings.backend, settings.solver
    xp = backend.namespace()
    outputs, y = [], y0
    for i, n in enumerate(settings.steps_per_interval):
        t0 = ts[i]
        h = (ts[i + 1] - t0) / n

        def body(k, carry, h=h):
            t, y = carry
            y1, _, _ = solver.step(rhs, t, y, h, args)
            return (t + h, y1)

        _, y = _run_steps(backend, settings, n, body, (t0, y))
        outputs.append(y)
    ys = tuple(xp.stack([y0[j]] + [o[j] for o in outputs]) for j in range(len(y0)))
    device = backend.device_of(y0[0])
    status = xp.where(_all_finite(xp, ys), xp.asarray(int(Status.SUCCESS), dtype=xp.int32, device=device),
                      xp.asarray(int(Status.NONFINITE), dtype=xp.int32, device=device))
    return LoopResult(ys=ys, stats=fixed_step_stats(solver, settings.steps_per_interval), status=status,
                      t_final=ts[-1])


def _run_steps(backend: Backend, settings: LoopSettings, n: int, body: Callable, carry):
    """``body(k, carry)`` for ``k = 0 … n − 1``, in the loop ``settings`` asks for.

    ``"checkpointed"``: the backend's checkpointed ``while_loop`` bounded by ``n`` (its
    condition is true until the ``n``-th step), whose reverse pass stores the states entering
    the steps (or the checkpointed segments, beyond the backend's slots) and recomputes the
    rest. ``unroll=False``: a rolled ``backend.scan``. Otherwise ``backend.fori_loop`` (which a backend may unroll).
    """
    if settings.loop_kind == "checkpointed" and not backend.eager:
        def step(state):
            k, c = state
            return k + 1, body(k, c)

        k0 = backend.namespace().asarray(0, dtype=backend.namespace().int32, device=backend.device_of(carry[1][0]))
        return backend.while_loop(lambda state: state[0] < n, step, (k0, carry), max_steps=n, kind="checkpointed")[1]
    if not settings.unroll:
        def scan_body(c, _):
            return body(None, c), ()

        return backend.scan(scan_body, carry, None, length=n)[0]
    return backend.fori_loop(0, n, body, carry)


class AdaptiveLoop:
    """One adaptive solve: a ``backend.scan`` over the output intervals, each a
    ``backend.while_loop`` of attempted steps that lands exactly on the interval's end.

    The loop state is a dict of arrays: ``t``, ``y``, ``f0`` (FSAL methods: ``func`` at
    ``(t, y)``, carried into the next step; ``()`` otherwise), ``h`` (the next step, signed),
    ``err_prev`` (the last accepted error, for the PI controller), ``rejected`` (whether the
    last attempt was rejected), the counters and ``status``. Step-size decisions see only
    gradient-stopped values.
    """

    def __init__(self, rhs: FlatRHS, args, settings: LoopSettings, norm_leaves: Callable, y0: tuple, ts):
        self.rhs, self.args, self.settings, self.norm_leaves = rhs, args, settings, norm_leaves
        self.solver = solver = settings.solver
        # static properties, read once rather than in every step
        self.fsal, self.evals_per_step, self.error_order = solver.fsal, solver.evals_per_step, solver.error_order
        self.controller, self.rtol, self.atol = settings.controller, settings.rtol, settings.atol
        self.backend = settings.backend
        xp = self.xp = self.backend.namespace()
        self.sg = self.backend.stop_gradient
        self.dtype = y0[0].dtype
        self.device = self.backend.device_of(y0[0])
        self.eps = float(xp.finfo(self.dtype).eps)
        self.direction = xp.where(ts[-1] > ts[0], self.const(1.0), self.const(-1.0))
        self.span_total = self.sg(xp.abs(ts[-1] - ts[0]))
        self.dt_floor = None if settings.dt_min is None else self.const(float(settings.dt_min))

    def const(self, value, dtype=None):
        return self.xp.asarray(value, dtype=self.dtype if dtype is None else dtype, device=self.device)

    def run(self, y0: tuple, ts) -> LoopResult:
        xp = self.xp
        state = self.initial_state(y0, ts)
        final, ys = self.backend.scan(self.run_interval, state, ts[1:])
        stats = Stats(nfe=final["nfe"], n_steps=final["n_steps"], n_accepted=final["n_accepted"],
                      n_rejected=final["n_rejected"])
        ys = tuple(xp.concat([xp.expand_dims(a, axis=0), b], axis=0) for a, b in zip(y0, ys))
        return LoopResult(ys=ys, stats=stats, status=final["status"], t_final=final["t"])

    def initial_state(self, y0: tuple, ts) -> dict:
        """The state at ``ts[0]``: the first step from ``step_size`` or Hairer's algorithm
        (one evaluation of ``func``, plus the one at ``t₀`` that it and FSAL share)."""
        xp, sg, s = self.xp, self.sg, self.settings
        t_start = ts[0]
        fsal = self.fsal
        f0 = self.rhs(t_start, y0, self.args) if (fsal or s.step_size is None) else None
        nfe0 = 0 if f0 is None else 1
        if s.step_size is not None:
            h0 = self.const(float(s.step_size))
        else:
            first_span = sg(xp.abs(ts[1] - t_start))
            h0 = initial_step_size(xp, self.rhs, sg(t_start), sg(y0), sg(f0), self.args, self.direction,
                                   first_span, s.rtol, s.atol, self.norm_leaves, self.error_order)
            h0 = sg(h0)
            nfe0 += 1
        zero_i = self.const(0, xp.int32)
        return dict(t=t_start, y=y0, f0=f0 if fsal else (), h=h0 * self.direction, err_prev=self.const(1.0),
                    rejected=self.const(False, xp.bool), n_steps=zero_i, n_accepted=zero_i, n_rejected=zero_i,
                    nfe=self.const(nfe0, xp.int32), status=zero_i)

    def run_interval(self, state: dict, t_end):
        """Attempt steps until ``t_end`` is reached or the solve fails (a ``scan`` body)."""
        direction = self.direction

        def unfinished(s):
            return (s["status"] == 0) & (direction * (t_end - s["t"]) > 0)

        def attempt(s):
            return self.attempt_step(s, t_end)

        state = self.backend.while_loop(unfinished, attempt, state, max_steps=self.settings.max_steps,
                                        kind=self.settings.loop_kind)
        return state, state["y"]

    def scaled_error_norm(self, y, y1, y_err):
        """``‖e / (atol + rtol·max(|y|, |y₁|))‖`` on gradient-stopped values."""
        xp, sg, rtol, atol = self.xp, self.sg, self.rtol, self.atol
        ys, y1s, es = sg(y), sg(y1), sg(y_err)
        scaled = [e / (atol + rtol * xp.maximum(xp.abs(a), xp.abs(b))) for e, a, b in zip(es, ys, y1s)]
        return self.norm_leaves(scaled, xp)

    def attempt_step(self, s: dict, t_end) -> dict:
        """One attempted step, shortened to land on ``t_end``; accepted or rejected by select."""
        xp, sg, direction = self.xp, self.sg, self.direction
        t, y, h = s["t"], s["y"], s["h"]
        remaining = t_end - t
        clip = xp.abs(sg(h)) >= xp.abs(sg(remaining))
        h_use = xp.where(clip, remaining, h)
        fsal = self.fsal
        y1, y_err, f1 = self.solver.step(self.rhs, t, y, h_use, self.args, s["f0"] if fsal else None)
        err = self.scaled_error_norm(y, y1, y_err)
        finite = xp.isfinite(err)
        accept = finite & (err <= 1.0)
        factor = self.controller.factor(xp, err, s["err_prev"], accept, s["rejected"], self.error_order)
        h_next = sg(h_use) * factor
        # after landing on an output time, do not keep the shortened step
        h_next = xp.where(accept & clip, direction * xp.maximum(xp.abs(h_next), xp.abs(sg(h))), h_next)
        t_new = xp.where(accept, xp.where(clip, t_end, t + h_use), t)
        n_steps = s["n_steps"] + 1
        acc_i = xp.astype(accept, xp.int32)
        return dict(
            t=t_new,
            y=tuple(xp.where(accept, a, b) for a, b in zip(y1, y)),
            f0=tuple(xp.where(accept, a, b) for a, b in zip(f1, s["f0"])) if fsal else (),
            h=h_next,
            err_prev=xp.where(accept, xp.maximum(err, self.const(_ERR_PREV_FLOOR)), s["err_prev"]),
            rejected=~accept,
            n_steps=n_steps, n_accepted=s["n_accepted"] + acc_i, n_rejected=s["n_rejected"] + (1 - acc_i),
            nfe=s["nfe"] + self.evals_per_step,
            status=self.status_after(s["status"], accept, finite, h_next, t_new, t_end, n_steps),
        )

    def status_after(self, status, accept, finite, h_next, t_new, t_end, n_steps):
        """``DT_UNDERFLOW`` (or ``NONFINITE``) when a rejected step shrinks below ``dt_min``;
        ``MAX_STEPS`` when the steps run out before the end."""
        xp, int32 = self.xp, self.xp.int32
        floor = (self.const(10 * self.eps) * xp.maximum(xp.abs(self.sg(t_new)), self.span_total)
                 if self.dt_floor is None else self.dt_floor)
        underflow = (~accept) & (xp.abs(h_next) < floor)
        unfinished = self.direction * (t_end - t_new) > 0
        status = xp.where(underflow, xp.where(finite, self.const(int(Status.DT_UNDERFLOW), int32),
                                              self.const(int(Status.NONFINITE), int32)), status)
        return xp.where((status == 0) & unfinished & (n_steps >= self.settings.max_steps),
                        self.const(int(Status.MAX_STEPS), int32), status)
