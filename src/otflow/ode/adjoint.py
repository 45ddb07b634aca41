"""The adjoint method: gradients of an ODE solve from a second, backward solve.

``odeint(..., gradient="adjoint")`` (or ``gradient=Adjoint(...)``) wraps the solve in
the backend's ``custom_vjp`` (written once here, against the array API). The forward
pass runs the integration loop (:mod:`.loop`) without a tape and keeps only the output
times, the output states and the arguments; the backward pass integrates the augmented
system (Chen, Rubanova, Bettencourt & Duvenaud, NeurIPS 2018, eq. 4 and appendix B;
Pontryagin et al. 1962)

    dy/dt = f(t, y, θ)
    da/dt = −aᵀ ∂f/∂y          a = ∂L/∂y
    dg/dt = −aᵀ ∂f/∂θ          g = ∂L/∂θ, accumulated

from ``t_N`` back to ``t_0`` with the same loop, one output interval at a time: at each
output time ``t_i`` the state is reset to the stored forward value ``y_i`` and the output
cotangent ``∂L/∂y_i`` is added to ``a`` (torchdiffeq's ``odeint_adjoint`` does the
same). The output times get ``∂L/∂t_i = (∂L/∂y_i)ᵀ f(t_i, y_i)`` for ``i ≥ 1`` and
``∂L/∂t_0 = −a(t_0⁺)ᵀ f(t_0, y_0)``. Memory is independent of the number of steps.

The backward solve integrates the augmented state ``(y, a, g)`` packed into one flat
array (``_FlatLayout``), as torchdiffeq's ``odeint_adjoint`` does: each stage
combination, accept/reject select and error estimate of the loop is then one array
operation instead of one per leaf (the parameter adjoint alone has a leaf per weight
and bias). The packing only moves numbers: every value is the one the per-leaf solve
computes.

Error control of the backward solve (adaptive methods): the forward ``norm`` is
applied to ``y`` and to ``a`` separately (so a forward mask, such as the CNF's
masked regularizer integrals, masks the matching adjoint components too) and the
larger value is taken; with ``Adjoint(seminorm=True)`` the parameter adjoint ``g``
is left out (Kidger, Chen & Lyons, "'Hey, that's not an ODE': Faster ODE
Adjoints via Seminorms", ICML 2021): ``g`` never feeds back into ``y`` or ``a``,
so its local error does not grow. Fixed-step methods integrate backward with the
same method and the same step counts as the forward solve.

The backward step counts leave the custom VJP through the cotangent of a dummy
zero argument (the convention of :meth:`otflow.base.Backend.custom_vjp`):
:func:`adjoint_counter` makes that argument, :func:`adjoint_stats` reads its
gradient.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..base import Backend, get_backend
from ..base.errors import MaxStepsReached, NonFiniteState, Status, StepSizeUnderflow
from ..base.options import unknown_option_message
from .loop import FlatRHS, LoopResult, LoopSettings, fixed_step_stats, integrate
from .step_size import ErrorNorm, check_tolerance, resolve_norm

__all__ = ["Adjoint", "AdjointStats", "adjoint_counter", "adjoint_stats", "COUNTER_FIELDS", "GRADIENTS",
           "resolve_gradient", "adjoint_integrate"]

#: the names ``odeint(gradient=...)`` accepts: ``"direct"`` backpropagates through the solver's
#: operations (discretize-then-optimize); ``"adjoint"`` is ``Adjoint()``, the adjoint equations
#: solved backward in time (optimize-then-discretize). See ``docs/gradients.md``.
GRADIENTS = ("direct", "adjoint")

#: what the entries of an adjoint counter's gradient count, in order
COUNTER_FIELDS = ("nfe", "n_steps", "n_accepted", "n_rejected", "n_failed")


@dataclass(frozen=True)
class Adjoint:
    """``odeint(..., gradient=Adjoint(...))``: reverse-mode gradients by the adjoint method
    (Chen et al., NeurIPS 2018), with the backward solve's options. ``gradient="adjoint"``
    is ``Adjoint()``.

    :param rtol: the backward solve's relative tolerance (adaptive methods; ``None``: the
        forward ``rtol``). Fixed-step methods integrate backward on the forward grid and
        refuse it.
    :param atol: the backward solve's absolute tolerance, likewise.
    :param seminorm: leave the parameter adjoint (the gradient being accumulated) out of the
        backward solve's error control (Kidger, Chen & Lyons, ICML 2021); the state and its
        adjoint are controlled with the forward ``norm`` (its mask applies to both).
    :param counter: an :func:`adjoint_counter`; its gradient receives the backward solve's
        counts (read them with :func:`adjoint_stats`). Any number of solves may share one.
    :raises TypeError: a tolerance that is not a number, ``seminorm`` not a bool, a counter
        that is not an array.
    :raises ValueError: a negative or non-finite tolerance, a counter of the wrong shape.
    """

    rtol: float | None = None
    atol: float | None = None
    seminorm: bool = True
    counter: Any = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, check_tolerance(f"Adjoint({name}=...)", value))
        if not isinstance(self.seminorm, bool):
            raise TypeError(f"Adjoint(seminorm=...) must be True or False, got {self.seminorm!r}")
        if self.counter is not None:
            shape = getattr(self.counter, "shape", None)
            if shape is None:
                raise TypeError(f"Adjoint(counter=...) must be an array from otflow.adjoint_counter(), "
                                f"got {type(self.counter).__name__}")
            if tuple(shape) != (len(COUNTER_FIELDS),):
                raise ValueError(f"Adjoint(counter=...) must come from otflow.adjoint_counter() (shape "
                                 f"({len(COUNTER_FIELDS)},)), got shape {tuple(shape)}")


def resolve_gradient(gradient) -> Adjoint | None:
    """``odeint``'s ``gradient=`` as an :class:`Adjoint`, or ``None`` for ``"direct"``.

    :raises ValueError: an unknown name (the nearest valid one is suggested).
    :raises TypeError: neither a name nor an :class:`Adjoint`.
    """
    if isinstance(gradient, Adjoint):
        return gradient
    if isinstance(gradient, str):
        if gradient == "direct":
            return None
        if gradient == "adjoint":
            return Adjoint()
        raise ValueError(unknown_option_message("gradient", gradient, GRADIENTS))
    raise TypeError(f"gradient must be 'direct', 'adjoint' or an otflow.Adjoint(...), got {type(gradient).__name__}")


@dataclass(frozen=True)
class AdjointStats:
    """Counts of the adjoint backward solves that shared one counter (summed over them).

    :param nfe: evaluations of the augmented dynamics, each one call of ``func`` with one
        vector–Jacobian product (the ``N + 1`` plain evaluations of ``func`` for the
        output-time gradients are not included).
    :param n_steps: attempted steps of the backward solves.
    :param n_accepted: accepted steps.
    :param n_rejected: rejected steps.
    :param n_failed: backward solves that did not reach ``t_0`` (their gradients are NaN).
    """

    nfe: int
    n_steps: int
    n_accepted: int
    n_rejected: int
    n_failed: int


def adjoint_counter(*positional, backend: str | Backend | None = None, like=None, dtype=None, device=None):
    """A zero array whose gradient receives the adjoint's backward counts.

    Pass it as ``odeint(..., gradient=otflow.Adjoint(counter=counter))`` (any number of
    solves may share it; the counts add up) and differentiate with respect to it:

    * torch: the counter is created with ``requires_grad=True``; after
      ``loss.backward()`` read ``otflow.adjoint_stats(counter.grad)`` (zero ``counter.grad``
      between backward passes, as for any tensor: gradients accumulate);
    * JAX: make it an argument of the differentiated function,
      ``jax.grad(loss, argnums=(0, 1))(params, counter)``, and read
      ``otflow.adjoint_stats(grads[1])``; this works under ``jit``.

    :param backend: a backend name or object (inferred from ``like`` when None); keyword only.
    :param like: an array whose backend, dtype and device the counter takes.
    :param dtype: a floating dtype (default: that of ``like``, else float32; counts are
        exact up to 2²⁴ in float32).
    :param device: where the counter lives (default: that of ``like``, else the default).
    :returns: a zero array of shape ``(5,)`` (see :data:`COUNTER_FIELDS`).
    :raises TypeError: a positional argument (the backend is ``backend=``).
    """
    if positional:
        raise TypeError(f"adjoint_counter() takes keyword arguments only: pass the backend as "
                        f"adjoint_counter(backend={positional[0]!r}) (or like=an array)")
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
    """Decode the gradient of an :func:`adjoint_counter`.

    :param counter_grad: ``counter.grad`` in torch, the counter's entry of ``jax.grad`` in
        JAX; ``None`` (torch: no backward pass reached the counter) gives all zeros.
    :returns: the summed :class:`AdjointStats`.
    :raises ValueError: an array that is not the gradient of a counter (wrong shape).
    """
    if counter_grad is None:
        return AdjointStats(0, 0, 0, 0, 0)
    values = np.asarray(get_backend(None, like=counter_grad).to_numpy(counter_grad), dtype=np.float64).reshape(-1)
    if values.shape[0] != len(COUNTER_FIELDS):
        raise ValueError(f"adjoint_stats: expected the gradient of an adjoint_counter (shape ({len(COUNTER_FIELDS)},)),"
                         f" got shape {values.shape}")
    return AdjointStats(*(int(round(v)) for v in values))


# --------------------------------------------------------------------------------------------
# the packed augmented state


class _FlatLayout:
    """Arrays of fixed shapes packed end to end into one 1-D array, and unpacked as views.

    The adjoint's backward solve carries ``(y, a, g)`` this way, so the integration loop
    sees one leaf. Unpacking slices and reshapes (no copy where the backend has views);
    packing is one ``concat``.

    :param shapes: the shape of each array, in order.
    """

    def __init__(self, shapes):
        self.shapes = tuple(tuple(int(n) for n in s) for s in shapes)
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.offsets = tuple(sum(self.sizes[:i]) for i in range(len(self.sizes)))
        self.size = sum(self.sizes)

    def pack(self, xp, arrays):
        """One 1-D array holding ``arrays`` (shaped as ``shapes``) end to end.

        :param xp: the array namespace.
        :param arrays: one array per shape, all of one dtype.
        :returns: a 1-D array of length :attr:`size`.
        """
        return xp.concat([xp.reshape(x, (-1,)) for x in arrays], axis=0)

    def unpack(self, xp, flat, start: int = 0) -> tuple:
        """The arrays packed in ``flat`` from position ``start`` on.

        :param xp: the array namespace.
        :param flat: a 1-D array (or a longer one whose segment from ``start`` holds them).
        :param start: where the first array begins.
        :returns: a tuple of arrays shaped as ``shapes``.
        """
        return tuple(xp.reshape(flat[start + o:start + o + n], s)
                     for o, n, s in zip(self.offsets, self.sizes, self.shapes))


# --------------------------------------------------------------------------------------------
# the custom VJP


def adjoint_integrate(func: Callable, leaves, treedef, ts, args, settings: LoopSettings, gradient: Adjoint, *,
                      throw: bool) -> LoopResult:
    """:func:`~otflow.ode.loop.integrate` with the adjoint method as its reverse-mode rule.

    :param func: the user's ``func(t, y, args)``.
    :param leaves: the flat initial state; ``treedef`` its structure.
    :param ts: the output times (differentiable).
    :param args: the user's tree: array leaves are differentiated, other leaves are constants.
    :param settings: the forward solve's settings (the backward solve derives its own).
    :param gradient: the backward solve's options; tolerances ``None`` take the forward ones.
    :param throw: raise a :class:`~otflow.SolverError` from the backward pass when its
        solve fails and its status can be read; otherwise the gradients are NaN.
    :returns: the forward solve's :class:`~otflow.ode.loop.LoopResult` (its statistics are
        the loop's: adaptive counts pass through the custom VJP, fixed-step counts are static).
    """
    backend = settings.backend
    counter = gradient.counter
    if counter is None:
        counter = backend.namespace().zeros((len(COUNTER_FIELDS),), dtype=leaves[0].dtype,
                                            device=backend.device_of(leaves[0]))
    solve = _AdjointSolve(func, treedef, args, settings, gradient, throw, counter.dtype)
    solve.constant_times = _is_constant(backend, ts)
    fn = backend.custom_vjp(solve.primal, solve.fwd, solve.bwd)
    result = fn(tuple(leaves), ts, solve.dynamic_args(args), counter)
    if result.stats is None:
        result = result._replace(stats=fixed_step_stats(settings.solver, settings.steps_per_interval))
    return result


def _is_constant(backend: Backend, x) -> bool:
    """Whether ``x`` is known to need no gradient: a concrete array that says it does not
    require one (a torch tensor with ``requires_grad=False``; duck-typed, the core imports no
    framework). Arrays without the attribute (JAX) may be differentiated and count as not constant."""
    return getattr(x, "requires_grad", None) is False and backend.is_concrete(x)


class _AdjointSolve:
    """The three functions of the custom VJP (``primal``, ``fwd``, ``bwd``) of one solve.

    Holds only static data (settings, tree structures, the non-array leaves of ``args``);
    arrays arrive as arguments, so JAX sees no closed-over tracers.
    """

    def __init__(self, func, treedef, args, settings: LoopSettings, gradient: Adjoint, throw: bool, counter_dtype):
        # the forward solve rolled too: nothing of it is differentiated, and an unrolled
        # fixed-step loop only costs compilation memory (64-D RNODE, RK4 × 8: peak RSS of a
        # training process 756 MB unrolled, 513 MB rolled; XLA temporaries 16 MB both)
        settings = dataclasses.replace(settings, unroll=False)
        self.func, self.treedef, self.settings, self.throw = func, treedef, settings, throw
        self.counter_dtype = counter_dtype
        self.backend = b = settings.backend
        self.xp = b.namespace()
        self.sg = b.stop_gradient
        arg_leaves, self.arg_def = b.tree_flatten(args)
        self.is_dyn = [b.owns(x) for x in arg_leaves]
        self.static = [None if d else x for x, d in zip(arg_leaves, self.is_dyn)]
        self.is_diff = [self.xp.isdtype(x.dtype, "real floating") for x, d in zip(arg_leaves, self.is_dyn) if d]
        self.rhs = FlatRHS(func, treedef, b)
        self.constant_times = False  # set by adjoint_integrate: skip the output times' cotangents
        self.seminorm = gradient.seminorm
        solver = settings.solver
        self.state_norm = resolve_norm(settings.norm, treedef, b.tree_unflatten) if solver.adaptive else None
        norm = settings.norm
        self.param_norm = ErrorNorm(norm.kind if isinstance(norm, ErrorNorm) else norm if isinstance(norm, str)
                                    else "rms")
        self.backward_settings = dataclasses.replace(
            settings, rtol=settings.rtol if gradient.rtol is None else gradient.rtol,
            atol=settings.atol if gradient.atol is None else gradient.atol, step_size=None,
            norm=self.augmented_error_norm if solver.adaptive else None, loop_kind="forward",
            # rolled: XLA kept per-step buffers of an unrolled backward solve alive (its
            # compiled memory grew linearly with the steps; rolled it is flat)
            unroll=False)

    # ---- arguments ------------------------------------------------------------------------
    def dynamic_args(self, args) -> tuple:
        """The array leaves of ``args`` (the custom VJP's differentiable argument)."""
        leaves, _ = self.backend.tree_flatten(args)
        return tuple(x for x, d in zip(leaves, self.is_dyn) if d)

    def assemble(self, dyn):
        """``args`` rebuilt from its array leaves ``dyn`` and the static leaves."""
        it = iter(dyn)
        leaves = [next(it) if d else s for d, s in zip(self.is_dyn, self.static)]
        return self.backend.tree_unflatten(self.arg_def, leaves)

    def with_diff(self, dyn, diff):
        """``dyn`` with its floating leaves replaced by ``diff``."""
        it = iter(diff)
        return tuple(next(it) if d else x for x, d in zip(dyn, self.is_diff))

    # ---- forward ----------------------------------------------------------------------------
    def primal(self, y0, ts, dyn, counter) -> LoopResult:
        result = integrate(self.func, list(y0), self.treedef, ts, self.assemble(dyn), self.settings)
        # fixed-step counts are static Python ints, which a custom VJP cannot return: the
        # caller takes them from the settings (fixed_step_stats)
        return result if self.settings.solver.adaptive else result._replace(stats=None)

    def fwd(self, y0, ts, dyn, counter):
        out = self.primal(self.sg(tuple(y0)), self.sg(ts), self.sg(tuple(dyn)), counter)
        # the inputs themselves as residuals (torch then saves them by reference, not as copies)
        return out, (ts, out.ys, tuple(dyn))

    # ---- backward ---------------------------------------------------------------------------
    def set_layout(self, y_shapes, g_shapes) -> None:
        """Fix the packing of the augmented state ``(y, a, g)`` (static shapes: the state's
        leaves, twice, then the differentiable argument leaves)."""
        self.n_y = len(y_shapes)
        self.y_layout = _FlatLayout(y_shapes)
        self.g_layout = _FlatLayout(g_shapes)
        self.layout = _FlatLayout(tuple(y_shapes) * 2 + tuple(g_shapes))

    def augmented_error_norm(self, scaled):
        """The backward solve's error norm of the packed scaled error of ``(y, a, g)``: the
        forward norm of ``y`` and of ``a`` (and, without the seminorm, the norm of ``g``)."""
        xp, size = self.xp, self.y_layout.size
        value = xp.maximum(self.state_norm(list(self.y_layout.unpack(xp, scaled)), xp),
                           self.state_norm(list(self.y_layout.unpack(xp, scaled, size)), xp))
        if not self.seminorm and self.g_layout.sizes:
            value = xp.maximum(value, self.param_norm.on_leaves(list(self.g_layout.unpack(xp, scaled, 2 * size)), xp))
        return value

    def augmented_rhs(self, t, state, dyn):
        """``(f, −aᵀ∂f/∂y, −aᵀ∂f/∂θ)`` on the packed state: one ``func`` evaluation and one VJP."""
        xp, size = self.xp, self.y_layout.size
        y = self.y_layout.unpack(xp, state)
        # the VJP is linear in its cotangent and IEEE negation is exact, so the VJP of −a is
        # −(the VJP of a) to the last bit: one negation instead of one per cotangent leaf
        minus_a = self.y_layout.unpack(xp, -state[size:2 * size])
        diff = tuple(x for x, d in zip(dyn, self.is_diff) if d)

        def f_of(y_, p_):
            return self.rhs(t, y_, self.assemble(self.with_diff(dyn, p_)))

        f_value, vjp_fn = self.backend.vjp(f_of, y, diff)
        minus_a_y, minus_a_p = vjp_fn(minus_a)
        dtype = state.dtype
        parts = [*f_value, *minus_a_y, *(v if v.dtype == dtype else xp.astype(v, dtype) for v in minus_a_p)]
        # a plain array out: no graph survives between evaluations (torch's backward runs
        # with grad mode on), so the backward solve's memory stays flat
        return self.sg(self.layout.pack(xp, parts))

    def dot(self, u, v):
        total = None
        for x, w in zip(u, v):
            s = self.xp.sum(x * w)
            total = s if total is None else total + s
        return total

    def time_cotangent(self, t, y, ct, dyn):
        """``ctᵀ f(t, y)``, the cotangent of an output time (zero when the times are constants:
        then the ``N + 1`` evaluations of ``func`` it takes are skipped)."""
        if self.constant_times:
            return self.xp.zeros((), dtype=y[0].dtype, device=self.backend.device_of(y[0]))
        return self.dot(ct, self.rhs(t, y, self.assemble(dyn)))

    def backward_interval(self, carry, x, *, dyn, steps):
        """Integrate the augmented system over one output interval, from ``t_hi`` down to ``t_lo``.

        ``carry``: ``(a, g, counts)`` with ``counts`` = (nfe, steps, accepted, rejected, failed,
        worst status); ``x``: ``(t_hi, t_lo, y_hi, ∂L/∂y_hi)``; ``dyn``: the array leaves of
        ``args``; ``steps``: the forward solve's step count in this interval (fixed-step
        methods) or ``None``. Returns the new carry and ``∂L/∂t_hi``.
        """
        xp = self.xp
        a_int, g, counts = carry
        t_hi, t_lo, y_hi, ct_hi = x
        dt_hi = self.time_cotangent(t_hi, y_hi, ct_hi, dyn)
        a = tuple(u + c for u, c in zip(a_int, ct_hi))
        aug0 = self.layout.pack(xp, (*y_hi, *a, *g))
        settings = self.backward_settings
        if steps is not None:
            settings = dataclasses.replace(settings, steps_per_interval=(steps,))
        _, aug_def = self.backend.tree_flatten(aug0)
        out = integrate(self.augmented_rhs, [aug0], aug_def, xp.stack([t_hi, t_lo]), dyn, settings)
        end = self.layout.unpack(xp, out.ys[0][-1, ...])
        n_y = self.n_y
        failed = xp.astype(out.status != int(Status.SUCCESS), xp.int32)
        st = out.stats
        counts = (counts[0] + st.nfe, counts[1] + st.n_steps, counts[2] + st.n_accepted, counts[3] + st.n_rejected,
                  xp.maximum(counts[4], failed), xp.maximum(counts[5], out.status))
        return (end[n_y:2 * n_y], end[2 * n_y:], counts), dt_hi

    def bwd(self, residuals, out_ct: LoopResult):
        """The cotangents of ``(y0, ts, dyn, counter)``; the counter's is the backward counts."""
        xp, b, settings = self.xp, self.backend, self.settings
        ts, ys, dyn = self.sg(residuals)
        ct_ys = tuple(xp.zeros_like(y) if c is None else xp.astype(self.sg(c), y.dtype) for c, y in zip(out_ct.ys, ys))
        device = b.device_of(ys[0])
        zero_i = xp.asarray(0, dtype=xp.int32, device=device)
        diff0 = [x for x, d in zip(dyn, self.is_diff) if d]
        self.set_layout([tuple(y.shape[1:]) for y in ys], [tuple(x.shape) for x in diff0])
        carry = (tuple(xp.zeros_like(y[0, ...]) for y in ys),
                 tuple(xp.zeros(x.shape, dtype=ys[0].dtype, device=device) for x in diff0),
                 (zero_i,) * 6)
        if settings.solver.adaptive:
            xs = (xp.flip(ts[1:], axis=0), xp.flip(ts[:-1], axis=0),
                  tuple(xp.flip(y[1:, ...], axis=0) for y in ys), tuple(xp.flip(c[1:, ...], axis=0) for c in ct_ys))
            carry, dts = b.scan(functools.partial(self.backward_interval, dyn=dyn, steps=None), carry, xs)
            dts = xp.flip(dts, axis=0)
        else:
            dts = []
            for i in range(len(settings.steps_per_interval), 0, -1):
                x = (ts[i], ts[i - 1], tuple(y[i, ...] for y in ys), tuple(c[i, ...] for c in ct_ys))
                carry, dt_i = self.backward_interval(carry, x, dyn=dyn, steps=settings.steps_per_interval[i - 1])
                dts.append(dt_i)
            dts = xp.stack(dts[::-1])
        a_int, g, counts = carry
        dt0 = -self.time_cotangent(ts[0], tuple(y[0, ...] for y in ys), a_int, dyn)
        ts_ct = None if self.constant_times else xp.concat([xp.reshape(dt0, (1,)), xp.astype(dts, dt0.dtype)], axis=0)
        y0_ct = tuple(u + c[0, ...] for u, c in zip(a_int, ct_ys))
        failed, status = counts[4], counts[5]
        if self.throw and b.is_concrete(status) and int(b.to_numpy(status)) != int(Status.SUCCESS):
            _raise_backward_failure(b, Status(int(b.to_numpy(status))), ts, settings.max_steps)
        ok = failed == 0

        def nan_if_failed(v):
            return xp.where(ok, v, xp.full_like(v, float("nan")))

        g_it = iter(g)
        dyn_ct = tuple(xp.astype(nan_if_failed(next(g_it)), x.dtype) if d else None for x, d in zip(dyn, self.is_diff))
        counts_ct = xp.stack([xp.astype(c, self.counter_dtype) for c in counts[:4]]
                             + [xp.astype(failed, self.counter_dtype)])
        ts_ct = None if ts_ct is None else xp.astype(nan_if_failed(ts_ct), ts.dtype)
        return (tuple(nan_if_failed(v) for v in y0_ct), ts_ct, dyn_ct, counts_ct)


def _raise_backward_failure(backend, status: Status, ts, max_steps) -> None:
    cls = {Status.MAX_STEPS: MaxStepsReached, Status.DT_UNDERFLOW: StepSizeUnderflow}.get(status, NonFiniteState)
    t = backend.to_numpy(ts)
    raise cls(
        f"gradient='adjoint': the backward (adjoint) solve from t={t[-1]:g} to t={t[0]:g} failed with "
        f"{status.name} (max_steps={max_steps}). Remedies: loosen its tolerances "
        "(gradient=otflow.Adjoint(rtol=..., atol=...)), raise max_steps, keep Adjoint(seminorm=True), "
        "or use gradient='direct'.")
