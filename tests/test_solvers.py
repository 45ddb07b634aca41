"""The solver core: tableaux, orders of convergence, adaptive control, statuses, bad input.

Runs on every installed backend through the ``backend`` fixture (numpy,
array-api-strict, torch, jax); float64 throughout unless a dtype is under test.
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given, settings
from hypothesis import strategies as st

import otflow
from otflow.ode.solvers import SOLVERS, ButcherTableau

# ---------------------------------------------------------------------------------------------
# problems with known solutions

_RNG = np.random.default_rng(20261128)
#: a stable, non-normal 4×4 linear system (eigenvalues with negative real parts, rotation)
A_LIN = np.array([[-0.5, 2.0, 0.0, 0.1], [-2.0, -0.5, 0.3, 0.0], [0.0, 0.0, -1.0, 1.0], [0.2, 0.0, -1.0, -0.3]])
Y0_LIN = np.array([[1.0, 0.5, -0.3, 0.2], [0.1, -1.0, 0.4, 0.7]])  # a batch of two initial states


def linear_problem(backend, dtype="float64"):
    xp = backend.namespace()
    dt = getattr(xp, dtype)
    y0 = backend.asarray(Y0_LIN, dtype=dt)

    def f(t, y, args):
        return y @ args

    return f, y0, backend.asarray(np.ascontiguousarray(A_LIN.T), dtype=dt)


def exact_linear(t: float) -> np.ndarray:
    return Y0_LIN @ scipy.linalg.expm(A_LIN * t).T


def np_of(backend, x) -> np.ndarray:
    return backend.to_numpy(x).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# tableaux


def _order_conditions(b, a, c, order):
    """Residuals of the Runge–Kutta order conditions up to ``min(order, 4)`` (all trees) and the
    quadrature conditions Σ b c^(k-1) = 1/k up to ``order``."""
    s = len(b)
    A = [[Fraction(0)] * s for _ in range(s)]
    for i, row in enumerate(a):
        for j, v in enumerate(row):
            A[i][j] = Fraction(v)
    b = [Fraction(x) for x in b]
    c = [Fraction(x) for x in c]
    res = []
    for k in range(1, order + 1):
        res.append(sum(bi * ci ** (k - 1) for bi, ci in zip(b, c)) - Fraction(1, k))
    Ac = [sum(A[i][j] * c[j] for j in range(s)) for i in range(s)]
    if order >= 3:
        res.append(sum(b[i] * Ac[i] for i in range(s)) - Fraction(1, 6))
    if order >= 4:
        res.append(sum(b[i] * c[i] * Ac[i] for i in range(s)) - Fraction(1, 8))
        res.append(sum(b[i] * sum(A[i][j] * c[j] ** 2 for j in range(s)) for i in range(s)) - Fraction(1, 12))
        res.append(sum(b[i] * sum(A[i][j] * Ac[j] for j in range(s)) for i in range(s)) - Fraction(1, 24))
    return res


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_tableau_coefficient_properties(name):
    tab = SOLVERS[name].tableau
    for i, row in enumerate(tab.a):
        assert len(row) == i
        assert sum(row) == pytest.approx(tab.c[i], abs=1e-15)
    assert sum(tab.b) == pytest.approx(1.0, abs=1e-15)
    for r in _order_conditions(tab.b, tab.a, tab.c, tab.order):
        assert abs(float(r)) < 1e-14
    if tab.adaptive:
        assert sum(tab.b_error) == pytest.approx(0.0, abs=1e-15)
        embedded = [x - e for x, e in zip(tab.b, tab.b_error)]
        for r in _order_conditions(embedded, tab.a, tab.c, tab.error_order):
            assert abs(float(r)) < 1e-13
        # the embedded solution is not of the full order (otherwise the estimate is zero)
        assert any(abs(float(r)) > 1e-6 for r in _order_conditions(embedded, tab.a, tab.c, tab.order))


def test_fsal_is_derived():
    assert SOLVERS["dopri5"].tableau.fsal
    assert not SOLVERS["rk4"].tableau.fsal
    assert otflow.Dopri5().evals_per_step == 6
    assert otflow.RK4().evals_per_step == 4


@pytest.mark.parametrize("bad", [
    dict(c=[0, "1/2"], a=[[], ["1/3"]], b=[0, 1], order=2),          # row sum ≠ c
    dict(c=[0, "1/2"], a=[[], ["1/2"]], b=["1/2", "1/3"], order=2),  # b does not sum to 1
    dict(c=[0, "1/2"], a=[[], ["1/2"]], b=[0, 1], order=2, b_error=["1/2", 0], error_order=1),
    dict(c=["1/2", "1/2"], a=[[], ["1/2"]], b=[0, 1], order=2),      # c[0] ≠ 0 (implicit)
])
def test_bad_tableau_refused(bad):
    with pytest.raises(ValueError, match="tableau"):
        ButcherTableau.from_fractions(**bad)


def test_float_tableau_checked_on_construction():
    with pytest.raises(ValueError, match="sums to"):
        ButcherTableau(c=(0.0, 0.5), a=((), (0.4,)), b=(0.0, 1.0), order=2)


# ---------------------------------------------------------------------------------------------
# order of convergence (fixed steps)


def _fixed_step_solve(backend, solver, f, y0, args, T, n, embedded=False):
    """Integrate with ``n`` equal steps of ``solver.step``; with ``embedded`` return the
    embedded (lower-order) solution of each step instead of the propagated one."""
    xp = backend.namespace()
    h = xp.asarray(T / n, dtype=y0.dtype)
    fl = lambda t, y, a: (f(t, y[0], a),)  # noqa: E731

    def body(k, carry):
        t, y = carry
        y1, err, _ = solver.step(fl, t, y, h, args)
        if embedded:
            y1 = (y1[0] - err[0],)
        return (t + h, y1)

    _, (y,) = backend.fori_loop(0, n, body, (xp.asarray(0.0, dtype=y0.dtype), (y0,)))
    return np_of(backend, y)


def _observed_order(errors, ns):
    slope = np.polyfit(np.log(1.0 / np.asarray(ns, dtype=float)), np.log(errors), 1)[0]
    return slope


ORDERS = [("euler", 1, 0.1, [64, 128, 256, 512]), ("midpoint", 2, 0.15, [16, 32, 64, 128]),
          ("rk4", 4, 0.2, [8, 16, 32, 64]), ("dopri5", 5, 0.3, [4, 8, 16, 32])]


@pytest.mark.parametrize("name,order,tol,ns", ORDERS)
def test_order_of_convergence(backend, name, order, tol, ns):
    f, y0, args = linear_problem(backend)
    solver = SOLVERS[name]()
    T = 2.0
    exact = exact_linear(T)
    errors = [np.max(np.abs(_fixed_step_solve(backend, solver, f, y0, args, T, n) - exact)) for n in ns]
    assert abs(_observed_order(errors, ns) - order) <= tol, errors


def test_dopri5_embedded_order(backend):
    f, y0, args = linear_problem(backend)
    ns = [4, 8, 16, 32]
    errors = [np.max(np.abs(_fixed_step_solve(backend, otflow.Dopri5(), f, y0, args, 2.0, n, embedded=True)
                            - exact_linear(2.0))) for n in ns]
    assert abs(_observed_order(errors, ns) - 4) <= 0.3


@pytest.mark.parametrize("name", ["euler", "midpoint", "rk4"])
def test_fixed_step_odeint_matches_stepping(backend, name):
    f, y0, args = linear_problem(backend)
    sol = otflow.odeint(f, y0, [0.0, 1.0, 2.0], args=args, method=name, step_size=0.1)
    ref = _fixed_step_solve(backend, SOLVERS[name](), f, y0, args, 1.0, 10)
    np.testing.assert_allclose(np_of(backend, sol.ys)[1], ref, rtol=1e-13, atol=1e-14)
    assert int(sol.stats.n_steps) == 20
    assert int(sol.stats.nfe) == 20 * SOLVERS[name]().evals_per_step


# ---------------------------------------------------------------------------------------------
# user-defined tableaux: with and without FSAL


class HeunEuler(otflow.ode.AbstractRungeKutta):
    """Heun's method with the embedded Euler method: 2(1), two stages, no FSAL."""

    tableau = ButcherTableau.from_fractions(c=[0, 1], a=[[], [1]], b=["1/2", "1/2"], order=2,
                                            b_error=["-1/2", "1/2"], error_order=1)


class BogackiShampine(otflow.ode.AbstractRungeKutta):
    """Bogacki & Shampine (1989) 3(2): four stages, FSAL (three new evaluations per step)."""

    name = "bs32"
    tableau = ButcherTableau.from_fractions(
        c=[0, "1/2", "3/4", 1], a=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]], b=["2/9", "1/3", "4/9", 0],
        order=3, b_error=["-5/72", "1/12", "1/9", "-1/8"], error_order=2)


#: (method, FSAL, new evaluations per step, step counts of the order sweeps)
USER_METHODS = [(HeunEuler, False, 2, [64, 128, 256, 512]), (BogackiShampine, True, 3, [16, 32, 64, 128])]


def test_user_tableaux_properties():
    assert HeunEuler.name == "heuneuler" and BogackiShampine.name == "bs32"
    assert not HeunEuler().fsal and BogackiShampine().fsal
    assert HeunEuler().adaptive and BogackiShampine().adaptive
    for cls, _, _, _ in USER_METHODS:
        tab = cls.tableau
        for r in _order_conditions(tab.b, tab.a, tab.c, tab.order):
            assert abs(float(r)) < 1e-14
        embedded = [x - e for x, e in zip(tab.b, tab.b_error)]
        for r in _order_conditions(embedded, tab.a, tab.c, tab.error_order):
            assert abs(float(r)) < 1e-14
    with pytest.raises(TypeError, match="needs a class attribute tableau"):
        type("NoTableau", (otflow.ode.AbstractRungeKutta,), {})


@pytest.mark.parametrize("cls,fsal,evals,ns", USER_METHODS, ids=["heun_euler", "bogacki_shampine"])
def test_user_tableau_orders(backend, cls, fsal, evals, ns):
    """Observed orders on a fixed-step sweep: the propagated solution's (the method's order)
    and the embedded solution's (the error estimate's order); and the local error estimate
    of one step shrinks like h^(error order + 1)."""
    f, y0, args = linear_problem(backend)
    solver = cls()
    T = 2.0
    exact = exact_linear(T)
    for embedded, order in ((False, solver.order), (True, solver.error_order)):
        errors = [np.max(np.abs(_fixed_step_solve(backend, solver, f, y0, args, T, n, embedded) - exact))
                  for n in ns]
        assert abs(_observed_order(errors, ns) - order) <= 0.15, (embedded, errors)
    xp = backend.namespace()
    fl = lambda t, y, a: (f(t, y[0], a),)  # noqa: E731
    hs = [0.08, 0.04, 0.02, 0.01]
    estimates = [np.max(np.abs(np_of(backend, solver.step(fl, xp.asarray(0.0, dtype=y0.dtype), (y0,),
                                                           xp.asarray(h, dtype=y0.dtype), args)[1][0])))
                 for h in hs]
    local_order = np.polyfit(np.log(hs), np.log(estimates), 1)[0]
    assert abs(local_order - (solver.error_order + 1)) <= 0.15, estimates


@pytest.mark.parametrize("cls,fsal,evals,ns", USER_METHODS, ids=["heun_euler", "bogacki_shampine"])
def test_user_tableau_adaptive_solve(backend, cls, fsal, evals, ns):
    """A user's embedded pair, with or without FSAL, solves y' = -y to tolerance through
    odeint (as an instance and as a class). Before: a method without FSAL raised TypeError
    inside the adaptive loop (a select over its missing last stage)."""
    xp = backend.namespace()
    y0 = backend.asarray(np.array([1.0, -2.0, 0.5]))
    tol = 1e-6 if fsal else 1e-5
    for method in (cls(), cls):
        sol = otflow.odeint(lambda t, y, a: -y, y0, [0.0, 0.5, 2.0], method=method, rtol=tol, atol=tol)
        exact = np.array([1.0, -2.0, 0.5]) * np.exp(-np.array([0.0, 0.5, 2.0]))[:, None]
        np.testing.assert_allclose(np_of(backend, sol.ys), exact, rtol=0, atol=100 * tol)
        assert sol.n_steps == sol.n_accepted + sol.n_rejected and sol.n_accepted > 5
        # f(t0) and Hairer's probe, then the new evaluations of each attempted step
        assert sol.nfe == 2 + evals * sol.n_steps, (sol.nfe, sol.n_steps)
    # with a given first step: no probe, and a method without FSAL needs no f(t0) either
    sol = otflow.odeint(lambda t, y, a: -y, y0, [0.0, 2.0], method=cls(), rtol=tol, atol=tol, step_size=0.01)
    assert sol.nfe == (1 if fsal else 0) + evals * sol.n_steps
    with pytest.raises(ValueError, match="is adaptive"):
        otflow.odeint(lambda t, y, a: -y, y0, [0.0, 2.0], method=cls(), n_steps=4)
    del xp


class MyDopri5(otflow.ode.AbstractRungeKutta):
    """A user's copy of Dormand–Prince's tableau under another name."""

    tableau = otflow.Dopri5.tableau


@pytest.mark.parametrize("method", ["DOPRI5", "Dopri5", otflow.Dopri5(), otflow.Dopri5, MyDopri5()],
                         ids=["upper", "title", "instance", "class", "user_tableau"])
def test_adaptivity_comes_from_the_solver_object(backend, method):
    """Every spelling of an adaptive method behaves as "dopri5": the same steps and values,
    tolerances accepted, n_steps refused."""
    f, y0, args = linear_problem(backend)
    ref = otflow.odeint(f, y0, [0.0, 1.0, 2.0], args=args, rtol=1e-7, atol=1e-7)
    sol = otflow.odeint(f, y0, [0.0, 1.0, 2.0], args=args, method=method, rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(np_of(backend, sol.ys), np_of(backend, ref.ys))
    assert (sol.nfe, sol.n_steps, sol.n_rejected) == (ref.nfe, ref.n_steps, ref.n_rejected)
    assert otflow.ode.resolve_solver(method).adaptive
    with pytest.raises(ValueError, match="is adaptive"):
        otflow.odeint(f, y0, [0.0, 1.0], args=args, method=method, n_steps=4)


# ---------------------------------------------------------------------------------------------
# tolerances: None means "not given"


@pytest.mark.parametrize("given", [dict(rtol=1e-5), dict(atol=1e-5), dict(rtol=1e-6), dict(norm="rms"),
                                   dict(controller=otflow.PIController()), dict(dt_min=1e-3)],
                         ids=["default_rtol", "default_atol", "rtol", "norm", "controller", "dt_min"])
def test_fixed_step_methods_refuse_adaptive_options(given):
    """Any rtol/atol/norm/controller/dt_min given to a fixed-step method is refused, also one
    equal to the adaptive default (before: rtol=1e-5 and atol=1e-5 passed silently, being
    the defaults, and dt_min was ignored)."""
    name = next(iter(given))
    with pytest.raises(ValueError, match=rf"'rk4' is a fixed-step method: {name} does not apply"):
        otflow.odeint(_f, np.ones(2), [0.0, 1.0], method="rk4", step_size=0.1, **given)


def test_adaptive_tolerances_default_to_1e_5():
    f = lambda t, y, a: -y  # noqa: E731
    default = otflow.odeint(f, np.ones(3), [0.0, 3.0])
    explicit = otflow.odeint(f, np.ones(3), [0.0, 3.0], rtol=1e-5, atol=1e-5)
    rtol_only = otflow.odeint(f, np.ones(3), [0.0, 3.0], rtol=1e-5)
    assert otflow.ode.DEFAULT_RTOL == otflow.ode.DEFAULT_ATOL == 1e-5
    for sol in (explicit, rtol_only):
        np.testing.assert_array_equal(sol.ys, default.ys)
        assert sol.nfe == default.nfe
    tighter = otflow.odeint(f, np.ones(3), [0.0, 3.0], atol=1e-9)  # rtol stays 1e-5
    assert tighter.nfe > default.nfe


# ---------------------------------------------------------------------------------------------
# adaptive control


def test_adaptive_error_proportional_to_tolerance():
    backend = otflow.get_backend("numpy")
    f, y0, args = linear_problem(backend)
    tols = [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10]
    errors = []
    for tol in tols:
        sol = otflow.odeint(f, y0, [0.0, 5.0], args=args, rtol=tol, atol=tol)
        errors.append(np.max(np.abs(np_of(backend, sol.ys)[-1] - exact_linear(5.0))))
    slope = np.polyfit(np.log(tols), np.log(errors), 1)[0]
    assert 0.8 <= slope <= 1.2, (slope, errors)
    # and the error is of the size of the tolerance, not orders of magnitude above it
    assert all(e < 100 * t for e, t in zip(errors, tols)), errors


def test_output_times_hit_exactly(backend):
    f, y0, args = linear_problem(backend)
    ts = [0.0, 0.3, 0.31, 1.7, 4.0]
    sol = otflow.odeint(f, y0, ts, args=args, rtol=1e-10, atol=1e-12)
    assert float(np_of(backend, sol.t_final)) == 4.0
    np.testing.assert_array_equal(np_of(backend, sol.ts), np.asarray(ts))
    ys = np_of(backend, sol.ys)
    assert ys.shape == (len(ts),) + Y0_LIN.shape
    for i, t in enumerate(ts):
        np.testing.assert_allclose(ys[i], exact_linear(t), rtol=0, atol=1e-8)


def test_forward_then_backward_returns_start(backend):
    f, y0, args = linear_problem(backend)
    fwd = otflow.odeint(f, y0, [0.0, 2.0], args=args, rtol=1e-10, atol=1e-12)
    back = otflow.odeint(f, fwd.ys[-1, ...], [2.0, 0.0], args=args, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_of(backend, back.ys)[-1], Y0_LIN, atol=1e-8)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_and_device_kept(backend, dtype):
    f, y0, args = linear_problem(backend, dtype)
    for method, opts in [("dopri5", dict(rtol=1e-5, atol=1e-6)), ("rk4", dict(n_steps=32))]:
        sol = otflow.odeint(f, y0, [0.0, 1.0], args=args, method=method, **opts)
        assert sol.ys.dtype == y0.dtype
        assert str(backend.device_of(sol.ys)) == str(backend.device_of(y0))
        tol = 1e-4 if dtype == "float32" else 1e-5
        np.testing.assert_allclose(np_of(backend, sol.ys)[-1], exact_linear(1.0), atol=tol)


def test_tree_states(backend):
    """A tuple state (as the CNF uses) and a dict state: an oscillator plus its energy integral."""
    xp = backend.namespace()
    omega = backend.asarray(np.array([[0.0, 1.0], [-1.0, 0.0]]))

    def f(t, state, args):
        x, e = state
        return (x @ args, xp.sum(x * x, axis=1))

    x0 = backend.asarray(np.array([[1.0, 0.0], [0.0, 2.0]]))
    e0 = backend.asarray(np.zeros(2))
    sol = otflow.odeint(f, (x0, e0), [0.0, 1.0], args=omega, rtol=1e-10, atol=1e-12)
    x1, e1 = sol.ys
    np.testing.assert_allclose(np_of(backend, e1)[-1], [1.0, 4.0], rtol=1e-8)
    np.testing.assert_allclose(np_of(backend, x1)[-1][0], [math.cos(1.0), math.sin(1.0)], atol=1e-9)

    def g(t, state, args):
        return {"x": state["x"] @ args, "e": xp.sum(state["x"] * state["x"], axis=1)}

    sol2 = otflow.odeint(g, {"x": x0, "e": e0}, [0.0, 1.0], args=omega, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np_of(backend, sol2.ys["e"])[-1], [1.0, 4.0], rtol=1e-8)


def test_masked_norm_leaves_components_out_of_error_control():
    """A fast-growing integral that is masked out does not shrink the steps."""
    backend = otflow.get_backend("numpy")

    def f(t, state, args):
        x, r = state
        return (-x, 1e3 * np.cos(50 * t) * np.ones_like(r))

    y0 = (np.ones(3), np.zeros(1))
    full = otflow.odeint(f, y0, [0.0, 1.0], rtol=1e-6, atol=1e-6)
    masked = otflow.odeint(f, y0, [0.0, 1.0], rtol=1e-6, atol=1e-6, norm=otflow.ErrorNorm(mask=(True, False)))
    assert masked.n_steps < full.n_steps / 3
    np.testing.assert_allclose(masked.ys[0][-1], np.exp(-1.0), rtol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        otflow.odeint(f, y0, [0.0, 1.0], norm=otflow.ErrorNorm(mask=(True, False, True)))
    with pytest.raises(ValueError, match="every state component"):
        otflow.ErrorNorm(mask=(False, False))
    del backend


@pytest.mark.parametrize("kind", ["rms", "max", "leaf_rms_max"])
def test_norm_kinds_and_callables(kind):
    f = lambda t, y, a: -y  # noqa: E731
    sol = otflow.odeint(f, np.ones(4), [0.0, 1.0], norm=kind, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(sol.ys[-1], np.exp(-1.0), rtol=1e-7)
    user = otflow.odeint(f, np.ones(4), [0.0, 1.0], rtol=1e-8, atol=1e-8,
                         norm=lambda e: np.sqrt(np.mean(e ** 2)))
    ref = otflow.odeint(f, np.ones(4), [0.0, 1.0], rtol=1e-8, atol=1e-8)
    assert user.n_steps == ref.n_steps


def test_zero_field_takes_few_steps():
    sol = otflow.odeint(lambda t, y, a: 0.0 * y, np.ones(3), [0.0, 1.0])
    np.testing.assert_array_equal(sol.ys[-1], np.ones(3))
    assert sol.n_steps < 20 and sol.n_rejected == 0


def test_work_matches_scipy_rk45_on_the_same_problem():
    """Same method, same initial step rule, same integral controller: equal step counts (±10 %)."""
    from scipy.integrate import solve_ivp

    f_np = lambda t, y: A_LIN @ y  # noqa: E731
    for tol in (1e-4, 1e-7):
        ref = solve_ivp(f_np, (0.0, 5.0), Y0_LIN[0], method="RK45", rtol=tol, atol=tol)
        sol = otflow.odeint(lambda t, y, a: A_LIN @ y, Y0_LIN[0], [0.0, 5.0], rtol=tol, atol=tol)
        assert abs(sol.nfe - ref.nfev) <= 0.1 * ref.nfev, (tol, sol.nfe, ref.nfev)


@settings(max_examples=15)
@given(scale=st.floats(0.1, 3.0), tol_exp=st.integers(4, 9), T=st.floats(0.1, 4.0), rot=st.floats(-3.0, 3.0))
def test_adaptive_error_bounded_by_tolerance_property(scale, tol_exp, T, rot):
    A = np.array([[-scale, rot], [-rot, -scale]])
    y0 = np.array([1.0, -0.5])
    tol = 10.0 ** -tol_exp
    sol = otflow.odeint(lambda t, y, a: A @ y, y0, [0.0, T], rtol=tol, atol=tol)
    exact = scipy.linalg.expm(A * T) @ y0
    assert np.max(np.abs(sol.ys[-1] - exact)) < 200 * tol
    assert sol.n_accepted + sol.n_rejected == sol.n_steps


# ---------------------------------------------------------------------------------------------
# statuses and exceptions at the boundary


def test_max_steps_raises_with_time_and_remedies():
    with pytest.raises(otflow.MaxStepsReached, match=r"max_steps=5 reached at t=.*raise max_steps") as info:
        otflow.odeint(lambda t, y, a: np.cos(30 * t) * y, np.ones(2), [0.0, 10.0], max_steps=5)
    sol = info.value.solution
    assert sol.result is otflow.Status.MAX_STEPS and sol.n_steps == 5
    sol = otflow.odeint(lambda t, y, a: np.cos(30 * t) * y, np.ones(2), [0.0, 10.0], max_steps=5, throw=False)
    assert sol.result is otflow.Status.MAX_STEPS
    assert 0.0 < float(sol.t_final) < 10.0


def test_blow_up_gives_step_size_underflow():
    with pytest.raises(otflow.StepSizeUnderflow, match="underflow at t=1"):
        otflow.odeint(lambda t, y, a: y * y, np.ones(1), [0.0, 2.0])


def test_nonfinite_fixed_step_reported():
    with np.errstate(all="ignore"):
        with pytest.raises(otflow.NonFiniteState, match="NaN or inf"):
            otflow.odeint(lambda t, y, a: np.exp(50 * y), np.ones(1), [0.0, 2.0], method="euler", step_size=0.5)


def test_nonfinite_rhs_in_adaptive_solve_is_rejected_then_reported():
    def f(t, y, a):
        return np.where(t > 0.5, np.nan, -y)

    with np.errstate(all="ignore"):
        with pytest.raises((otflow.NonFiniteState, otflow.StepSizeUnderflow)):
            otflow.odeint(f, np.ones(2), [0.0, 1.0])


# ---------------------------------------------------------------------------------------------
# bad input


def _f(t, y, a):
    return -y


@pytest.mark.parametrize("y0,match", [
    (np.array([1.0, np.nan]), "NaN or inf"),
    (np.array([1.0, np.inf]), "NaN or inf"),
    (np.array([1, 2]), "real floating"),
    (np.array([1 + 1j]), "real floating"),
])
def test_bad_initial_state(y0, match):
    with pytest.raises((ValueError, TypeError), match=match):
        otflow.odeint(_f, y0, [0.0, 1.0])


@pytest.mark.parametrize("t,match", [
    ([0.0, 1.0, 0.5], "strictly increasing or strictly decreasing"),
    ([0.0, 0.0], "strictly"),
    ([0.0], "at least two"),
    ([0.0, np.nan], "finite"),
])
def test_bad_times(t, match):
    with pytest.raises(ValueError, match=match):
        otflow.odeint(_f, np.ones(2), t)


@pytest.mark.parametrize("opts,exc,match", [
    (dict(rtol=-1e-3), ValueError, "rtol"),
    (dict(atol=float("nan")), ValueError, "atol"),
    (dict(rtol=0.0, atol=0.0), ValueError, "both 0"),
    (dict(method="rk45"), ValueError, "dopri5"),
    (dict(method="rk5"), ValueError, "Did you mean"),
    (dict(methd="rk4"), TypeError, "Did you mean 'method'"),
    (dict(step_sise=0.1), TypeError, "step_size"),
    (dict(max_steps=0), ValueError, "max_steps"),
    (dict(method="rk4"), ValueError, "step_size= or n_steps="),
    (dict(method="rk4", step_size=0.1, n_steps=3), ValueError, "exactly one"),
    (dict(method="rk4", step_size=-0.1), ValueError, "positive"),
    (dict(method="rk4", step_size=0.1, rtol=1e-3), ValueError, "fixed-step"),
    (dict(method=3), TypeError, "AbstractRungeKutta"),
    (dict(step_size=float("inf")), ValueError, "step_size must be positive and finite"),
    (dict(dt_min=-1.0), ValueError, "dt_min must be positive"),
    (dict(controller="pi"), TypeError, "PIController"),
    (dict(n_steps=4), ValueError, "adaptive"),
    (dict(norm="l2"), ValueError, "unknown norm kind"),
    (dict(norm="rsm"), ValueError, "Did you mean 'rms'"),
    (dict(loop_kind="scan"), ValueError, "loop_kind"),
    (dict(backend="tensorflow"), ValueError, "unknown backend"),
])
def test_bad_options(opts, exc, match):
    with pytest.raises(exc, match=match):
        otflow.odeint(_f, np.ones(2), [0.0, 1.0], **opts)


def test_rhs_with_wrong_shape_or_dtype():
    with pytest.raises(ValueError, match="shape"):
        otflow.odeint(lambda t, y, a: np.ones(3), np.ones(2), [0.0, 1.0])
    with pytest.raises(TypeError, match="dtype"):
        otflow.odeint(lambda t, y, a: (-y).astype(np.float32), np.ones(2), [0.0, 1.0])
    with pytest.raises(ValueError, match="returned 1 arrays"):
        otflow.odeint(lambda t, y, a: -y[0], (np.ones(2), np.ones(2)), [0.0, 1.0])


def test_tiny_rtol_warns():
    with pytest.warns(RuntimeWarning, match="machine epsilon"):
        otflow.odeint(_f, np.ones(2, dtype=np.float32), [0.0, 0.1], rtol=1e-9, atol=1e-9, max_steps=100000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        otflow.odeint(_f, np.ones(2), [0.0, 0.1], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# cross-backend agreement (float64)

CROSS_BACKENDS = ["numpy", "array_api_strict", "torch", "jax"]


def _available(name):
    try:
        otflow.get_backend(name)
        return True
    except (otflow.BackendUnavailable, ValueError):
        return False


def _solve_on(name, method, **opts):
    b = otflow.get_backend(name)
    f, y0, args = linear_problem(b)
    xp = b.namespace()

    def g(t, y, a):  # a nonlinear, time-dependent field on top of the linear one
        return f(t, y, a) + 0.1 * xp.sin(3.0 * t) * xp.tanh(y)

    sol = otflow.odeint(g, y0, [0.0, 0.7, 2.0], args=args, method=method, **opts)
    return np_of(b, sol.ys), int(b.to_numpy(sol.stats.n_steps))


@pytest.mark.parametrize("method,opts", [("rk4", dict(step_size=0.05)), ("midpoint", dict(n_steps=7)),
                                         ("dopri5", dict(rtol=1e-8, atol=1e-10))])
def test_cross_backend_agreement(method, opts):
    names = [n for n in CROSS_BACKENDS if _available(n)]
    ref_ys, ref_steps = _solve_on("numpy", method, **opts)
    for name in names[1:]:
        ys, steps = _solve_on(name, method, **opts)
        if method == "dopri5":
            assert steps == ref_steps, f"{name}: {steps} steps vs numpy's {ref_steps} (an accept/reject flip)"
            np.testing.assert_allclose(ys, ref_ys, rtol=0, atol=1e-10 + 1e-4 * opts["rtol"], err_msg=name)
        else:
            np.testing.assert_allclose(ys, ref_ys, rtol=1e-12, atol=1e-14, err_msg=name)


# ---------------------------------------------------------------------------------------------
# differentiating through the adaptive loop


@pytest.mark.parametrize("kind", ["bounded", "checkpointed"])
def test_zero_field_first_step_gives_finite_gradients(autodiff_backend, kind):
    """v = θ·y with θ = 0: the first error estimate is exactly zero; step-size control must
    not turn that into NaN gradients (it is gradient-stopped and guarded)."""
    b = autodiff_backend
    if b.name == "torch" and kind == "checkpointed":
        pytest.skip("torch's eager loop is one kind")
    y0 = b.asarray(np.array([[1.0, -2.0], [0.5, 0.25]]))

    def loss(theta):
        sol = otflow.odeint(lambda t, y, a: a * y, y0, [0.0, 1.0], args=theta, loop_kind=kind)
        return b.namespace().sum(sol.ys[-1, ...])

    value, grad = b.value_and_grad(loss)(b.asarray(np.asarray(0.0)))
    g = float(b.to_numpy(grad))
    assert math.isfinite(g)
    # d/dθ Σ y0·e^{θT} at θ = 0 is Σ y0·T
    assert g == pytest.approx(float(np.sum([[1.0, -2.0], [0.5, 0.25]])), rel=1e-6)
    assert float(b.to_numpy(value)) == pytest.approx(-0.25)
