"""Gradients through odeint: direct backpropagation, the adjoint method, the checker.

float64 throughout (the JAX fixture turns x64 on). JAX compiles dominate the run
time, so the problems are small and each test compiles few distinct functions.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

import otflow
from otflow.ode.adjoint import AdjointStats, adjoint_counter, adjoint_stats
from otflow.cnf.dynamics import RNODE_NORM, rnode_rhs, standard_normal_logpdf
from otflow.ode.gradcheck import check_gradients

REPO = Path(__file__).resolve().parents[1]
MODES = ("direct", "adjoint")

# ---------------------------------------------------------------------------------------------
# problems

#: y' = y·M with M = Aᵀ (rows of y are independent states), exact solution y(t) = y0·expm(M t)
A_LIN = np.array([[-0.5, 2.0, 0.0, 0.1], [-2.0, -0.5, 0.3, 0.0], [0.0, 0.0, -1.0, 1.0], [0.2, 0.0, -1.0, -0.3]])
Y0_LIN = np.array([[1.0, 0.5, -0.3, 0.2], [0.1, -1.0, 0.4, 0.7]])
T_LIN = np.array([0.0, 0.5, 1.25])
#: the loss is Σᵢ ⟨Wᵢ, y(tᵢ)⟩ + ½‖y(t_N)‖²
W_LIN = np.random.default_rng(7).normal(size=(3, 2, 4))


def np_of(b, x) -> np.ndarray:
    return np.asarray(b.to_numpy(x), dtype=np.float64)


def linear_loss(b, method_kw, mode):
    xp = b.namespace()
    w = b.asarray(W_LIN, dtype=xp.float64)

    def loss(M, y0, ts):
        sol = otflow.odeint(lambda t, y, m: y @ m, y0, ts, args=M, gradient=mode, throw=False, **method_kw)
        return xp.sum(w * sol.ys) + 0.5 * xp.sum(sol.ys[-1, ...] ** 2)

    return loss


def linear_exact_gradients():
    """dL/dM (Fréchet derivative of expm), dL/dy0 and dL/dtᵢ of the linear loss."""
    M = A_LIN.T
    gM, gy0, gt = np.zeros_like(M), np.zeros_like(Y0_LIN), np.zeros_like(T_LIN)
    for i, t in enumerate(T_LIN):
        s = t - T_LIN[0]
        E = scipy.linalg.expm(M * s)
        y = Y0_LIN @ E
        C = W_LIN[i] + (y if i == len(T_LIN) - 1 else 0.0)  # ∂L/∂y(tᵢ)
        # ⟨C, y0·expm(M s)⟩: the adjoint of the Fréchet derivative is the derivative at Mᵀ
        gM += s * scipy.linalg.expm_frechet(M.T * s, Y0_LIN.T @ C, compute_expm=False)
        gy0 += C @ E.T
        dyds = np.sum(C * (y @ M))
        gt[i] += dyds
        gt[0] -= dyds
    return gM, gy0, gt


def nonlinear_problem(b):
    """A time-dependent tanh field with dict parameters, output times [0, 0.4, T]."""
    xp = b.namespace()
    rng = np.random.default_rng(11)
    params = {"W": b.asarray(rng.normal(size=(4, 4)) / 2, dtype=xp.float64),
              "b": b.asarray(rng.normal(size=(4,)) / 2, dtype=xp.float64),
              "c": b.asarray(0.3, dtype=xp.float64)}
    y0 = b.asarray(rng.normal(size=(3, 4)), dtype=xp.float64)
    T = b.asarray(1.1, dtype=xp.float64)

    def f(t, y, p):
        return xp.tanh(y @ p["W"] + p["b"]) - p["c"] * xp.sin(3.0 * t) * y

    def loss(q, mode, **kw):
        ts = xp.stack([xp.zeros_like(q["T"]), xp.zeros_like(q["T"]) + 0.4, q["T"]])
        options = dict(rtol=1e-11, atol=1e-11) | kw
        sol = otflow.odeint(f, q["y0"], ts, args=q["p"], gradient=mode, throw=False, **options)
        return xp.sum(xp.sin(sol.ys[1, ...])) + 0.5 * xp.sum(sol.ys[-1, ...] ** 2)

    return loss, {"p": params, "y0": y0, "T": T}


#: the small CNF: an MLP 2 → 8 → 2 with time concatenated, a batch of 16
CNF_FIELD = otflow.MLP((2,), hidden=(8,), conditioning="concat")
CNF_BATCH = 16


def cnf_params(b, *, zero_last=False):
    field = otflow.MLP((2,), hidden=(8,), conditioning="concat", zero_last=zero_last)
    return field.init(b, b.key(0), dtype=b.namespace().float64)


@functools.cache
def cnf_loss(b):
    """RNODE's augmented dynamics (z, Δlogp, E_K, E_J) and objective NLL + λ_K·E_K + λ_J·E_J.
    One function per backend, so the checker's compilations serve several tests."""
    xp = b.namespace()
    x = b.asarray(np.random.default_rng(3).normal(size=(CNF_BATCH, 2)), dtype=xp.float64)
    eps = b.normal(b.key(4), (CNF_BATCH, 2), dtype=xp.float64)
    zero = xp.zeros((CNF_BATCH,), dtype=xp.float64)

    def loss(p, mode):
        sol = otflow.odeint(rnode_rhs(CNF_FIELD, backend=b), (x, zero, zero, zero), [0.0, 1.0], args=(p, eps),
                            gradient=mode, rtol=1e-10, atol=1e-10, norm=RNODE_NORM, throw=False)
        z, dlogp, kinetic, jacobian = (leaf[-1, ...] for leaf in sol.ys)
        nll = -xp.mean(standard_normal_logpdf(xp, z) - dlogp)
        return nll + 0.1 * xp.mean(kinetic) + 0.1 * xp.mean(jacobian)

    return loss


def value_and_grads(b, loss, *args, argnums=0):
    return b.jit(b.value_and_grad(loss, argnums=argnums))(*args)


# ---------------------------------------------------------------------------------------------
# agreement with exact gradients and with finite differences


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_linear_field_gradients_match_expm(autodiff_backend, method):
    """Both modes give dL/dM, dL/dy0 and dL/dt (every output time) of the exact flow."""
    b = autodiff_backend
    if method == "dopri5":
        method_kw = dict(rtol=1e-11, atol=1e-11)
    elif b.name == "torch":  # t is concrete: step_size= gives unequal counts per interval (40 and 60)
        method_kw = dict(method="rk4", step_size=0.0125)
    else:  # t is traced under jit: n_steps=
        method_kw = dict(method="rk4", n_steps=40)
    gM, gy0, gt = linear_exact_gradients()
    args = (b.asarray(np.ascontiguousarray(A_LIN.T)), b.asarray(Y0_LIN), b.asarray(T_LIN))
    tol = 1e-8 if method == "dopri5" else 1e-6  # rk4 with h = 0.0125: O(h⁴) ≈ 1e-7
    for mode in MODES:
        _, (dM, dy0, dt) = value_and_grads(b, linear_loss(b, method_kw, mode), *args, argnums=(0, 1, 2))
        for got, want, what in ((dM, gM, "M"), (dy0, gy0, "y0"), (dt, gt, "t")):
            err = np.linalg.norm(np_of(b, got) - want) / np.linalg.norm(want)
            assert err <= tol, f"{mode}: dL/d{what} relative error {err:.2e}"


@pytest.mark.parametrize("problem", ["nonlinear", "cnf"])
def test_modes_agree_with_finite_differences(autodiff_backend, problem):
    """The checker on a nonlinear field (parameters, y0 and the end time T together) and on
    a small CNF: every mode within 1e-5 of fourth-order central differences."""
    b = autodiff_backend
    loss, args = nonlinear_problem(b) if problem == "nonlinear" else (cnf_loss(b), cnf_params(b))
    report = check_gradients(loss, args, n_directions=3)
    report.assert_ok(1e-5)
    assert report.fd_errors.keys() == set(MODES) and ("direct", "adjoint") in report.pair_errors
    text = str(report)
    assert "direct vs FD" in text and "adjoint vs FD" in text and "direct vs adjoint" in text


def test_end_time_gradient_fixed_step(autodiff_backend):
    """A learnable end time with a fixed-step method (n_steps: works with a traced t)."""
    b = autodiff_backend
    xp = b.namespace()
    M = b.asarray(np.ascontiguousarray(A_LIN.T))
    y0 = b.asarray(Y0_LIN)
    T = 0.8
    y_T = Y0_LIN @ scipy.linalg.expm(A_LIN.T * T)
    want = float(np.sum(y_T * (y_T @ A_LIN.T)))  # d/dT ½‖y(T)‖² = ⟨y(T), y(T)·M⟩
    for mode in MODES:
        def loss(T_, mode=mode):
            ts = xp.stack([xp.zeros_like(T_), T_])
            sol = otflow.odeint(lambda t, y, m: y @ m, y0, ts, args=M, method="rk4", n_steps=64, gradient=mode)
            return 0.5 * xp.sum(sol.ys[-1, ...] ** 2)

        _, g = value_and_grads(b, loss, b.asarray(T))
        assert float(np_of(b, g)) == pytest.approx(want, rel=1e-6), mode


def test_decreasing_times_and_tree_state():
    """Backward in time (t decreasing, as Flow.inverse integrates) with a tuple state."""
    b = otflow.get_backend("torch")
    xp = b.namespace()
    W = b.asarray(np.random.default_rng(5).normal(size=(3, 3)) / 2)
    y0 = (b.asarray(np.random.default_rng(6).normal(size=(4, 3))), b.asarray(np.zeros(4)))

    def f(t, state, w):
        x, _ = state
        v = xp.tanh(x @ w) * (1.0 + t)
        return (v, xp.sum(v * v, axis=1))

    def loss(q, mode):
        sol = otflow.odeint(f, (q["x"], y0[1]), [1.0, 0.4, 0.0], args=q["w"], gradient=mode, rtol=1e-11,
                            atol=1e-11, norm=otflow.ErrorNorm(mask=(True, False)))
        return xp.sum(sol.ys[0][1] ** 3) + xp.sum(sol.ys[1][-1])

    check_gradients(loss, {"x": y0[0], "w": W}, n_directions=2).assert_ok(1e-6)


def test_adjoint_converges_to_direct_as_tolerance_shrinks():
    """optimize-then-discretize → discretize-then-optimize: the difference between the
    modes falls with the tolerance (torch: eager, no compile per tolerance)."""
    b = otflow.get_backend("torch")
    loss, args = nonlinear_problem(b)
    diffs = []
    for tol in (1e-4, 1e-6, 1e-8, 1e-10):
        g = {m: value_and_grads(b, lambda q, m=m: loss(q, m, rtol=tol, atol=tol), args)[1] for m in MODES}
        flat = {m: np.concatenate([np_of(b, x).ravel() for x in b.tree_leaves(g[m])]) for m in MODES}
        diffs.append(np.linalg.norm(flat["adjoint"] - flat["direct"]) / np.linalg.norm(flat["direct"]))
    assert all(later < earlier for earlier, later in zip(diffs, diffs[1:])), diffs
    assert diffs[-1] < 1e-8 and diffs[0] / diffs[-1] > 1e3, diffs


def test_zero_initialized_field_gives_finite_gradients(autodiff_backend):
    """RNODE starts from v ≡ 0 (zero last layer): an exactly zero error estimate must give
    finite gradients, and the last layer's gradient is nonzero, in both modes.

    Against finite differences only to 1e-3: at v ≡ 0 the error estimate is exactly zero,
    so the steps grow as fast as the controller allows, while at θ ± h·v they are set by
    the tolerance: the computed loss changes its discretization right at this point
    (measured: both modes 1e-5 from FD, 2e-6 from each other)."""
    b = autodiff_backend
    report = check_gradients(cnf_loss(b), cnf_params(b, zero_last=True), n_directions=2)
    for mode in MODES:
        leaves = [np_of(b, x) for x in b.tree_leaves(report.gradients[mode])]
        assert all(np.all(np.isfinite(x)) for x in leaves), mode
        last = [np_of(b, x) for x in b.tree_leaves(report.gradients[mode][-1])]
        assert any(np.any(x != 0) for x in last), mode
    report.assert_ok(1e-3)


def test_module_parameters_in_args_receive_gradients():
    """A user's torch.nn.Module parameters passed in args get .grad in both modes (and the
    same one), with either torch VJP implementation."""
    torch = pytest.importorskip("torch")
    from otflow_torch import TorchBackend

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    y0 = torch.randn(5, 3, dtype=torch.float64)

    def f(t, y, params):
        return torch.func.functional_call(net, params, (y,))

    results = {}
    for impl in ("func", "autograd"):
        for mode in MODES:
            net.zero_grad()
            params = dict(net.named_parameters())
            sol = otflow.odeint(f, y0, [0.0, 1.0], args=params, gradient=mode, rtol=1e-9, atol=1e-9,
                                backend=TorchBackend(vjp_impl=impl))
            (sol.ys[-1] ** 2).sum().backward()
            grads = {k: p.grad for k, p in net.named_parameters()}
            assert all(g is not None and bool(torch.any(g != 0)) for g in grads.values()), (impl, mode)
            results[impl, mode] = torch.cat([g.ravel() for g in grads.values()])
    ref = results["func", "direct"]
    for key, g in results.items():
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-9, msg=str(key))


# ---------------------------------------------------------------------------------------------
# the adjoint's options, counts and failures


def test_adjoint_counter_reports_backward_work_and_seminorm_saves_steps():
    b = otflow.get_backend("torch")
    params = cnf_params(b)
    stats = {}
    for seminorm in (True, False):
        counter = adjoint_counter(backend=b, dtype=b.namespace().float64)
        p = b.tree_map(lambda x: x.detach().requires_grad_(), params)
        xp = b.namespace()
        x = b.asarray(np.random.default_rng(3).normal(size=(16, 2)))
        eps = b.normal(b.key(4), (16, 2), dtype=xp.float64)
        zero = xp.zeros((16,), dtype=xp.float64)
        sol = otflow.odeint(rnode_rhs(CNF_FIELD, backend=b), (x, zero, zero, zero), [0.0, 0.5, 1.0], args=(p, eps),
                            norm=RNODE_NORM, rtol=1e-6, atol=1e-6,
                            gradient=otflow.Adjoint(seminorm=seminorm, counter=counter))
        (xp.sum(sol.ys[0][-1] ** 2) + xp.sum(sol.ys[2][-1]) + xp.sum(sol.ys[1][1])).backward()
        stats[seminorm] = adjoint_stats(counter.grad)
    on, off = stats[True], stats[False]
    assert on.n_failed == 0 and on.n_steps > 0 and on.n_steps == on.n_accepted + on.n_rejected
    assert on.nfe == 6 * on.n_steps + 2 * 2  # two intervals, each: f(t₀) + the initial-step probe
    assert on.nfe <= off.nfe, (on, off)
    assert adjoint_stats(None) == AdjointStats(0, 0, 0, 0, 0)


def test_adjoint_counter_under_jax_jit():
    jax = pytest.importorskip("jax")
    b = otflow.get_backend("jax")
    jnp = b.namespace()
    M = jnp.asarray(np.ascontiguousarray(A_LIN.T))
    y0 = jnp.asarray(Y0_LIN)

    def loss(M, counter):
        sol = otflow.odeint(lambda t, y, m: y @ m, y0, [0.0, 1.0], args=M, rtol=1e-6, atol=1e-6,
                            gradient=otflow.Adjoint(counter=counter))
        return jnp.sum(sol.ys[-1] ** 2)

    _, (gM, gc) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(M, adjoint_counter(backend=b, like=y0))
    s = adjoint_stats(gc)
    assert s.n_failed == 0 and s.nfe == 6 * s.n_steps + 2 and s.n_steps > 3


def test_backward_failure_raises_or_gives_nan():
    """A backward solve that runs out of steps: SolverError at the boundary (torch, eager),
    NaN gradients and n_failed = 1 with throw=False."""
    b = otflow.get_backend("torch")
    torch = pytest.importorskip("torch")
    M = torch.tensor(np.ascontiguousarray(A_LIN.T), requires_grad=True)
    y0 = torch.tensor(Y0_LIN)
    kw = dict(args=M, rtol=1e-3, atol=1e-3, max_steps=12)
    sol = otflow.odeint(lambda t, y, m: y @ m, y0, [0.0, 1.0], gradient=otflow.Adjoint(rtol=1e-12, atol=1e-12), **kw)
    with pytest.raises(otflow.MaxStepsReached, match=r"backward.*Adjoint\(rtol="):
        sol.ys[-1].sum().backward()
    counter = adjoint_counter(backend=b, like=y0)
    sol = otflow.odeint(lambda t, y, m: y @ m, y0, [0.0, 1.0], throw=False,
                        gradient=otflow.Adjoint(rtol=1e-12, atol=1e-12, counter=counter), **kw)
    sol.ys[-1].sum().backward()
    assert bool(torch.all(torch.isnan(M.grad))) and adjoint_stats(counter.grad).n_failed == 1


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(gradient="adjiont"), ValueError, "Did you mean 'adjoint'"),
    (dict(gradient=None), TypeError, r"otflow.Adjoint\(\.\.\.\)"),
    (dict(gradient="adjoint", method="rk4", n_steps=4), None, None),  # the string form still works
    (dict(gradient=otflow.Adjoint(rtol=1e-6), method="rk4", n_steps=4), ValueError, "fixed-step"),
    (dict(gradeint="adjoint"), TypeError, "Did you mean 'gradient'"),
])
def test_gradient_options_validated(kwargs, error, match):
    if error is None:
        otflow.odeint(lambda t, y, a: -y, np.ones(2), [0.0, 1.0], **kwargs)
        return
    with pytest.raises(error, match=match):
        otflow.odeint(lambda t, y, a: -y, np.ones(2), [0.0, 1.0], **kwargs)


@pytest.mark.parametrize("keyword,value,replacement", [
    ("adjoint_rtol", 1e-6, r"adjoint_rtol= was replaced by gradient=otflow\.Adjoint\(rtol=\.\.\.\)"),
    ("adjoint_atol", 1e-6, r"adjoint_atol= was replaced by gradient=otflow\.Adjoint\(atol=\.\.\.\)"),
    ("adjoint_seminorm", False, r"adjoint_seminorm= was replaced by gradient=otflow\.Adjoint\(seminorm=\.\.\.\)"),
    ("adjoint_counter", np.zeros(5), r"adjoint_counter= was replaced by gradient=otflow\.Adjoint\(counter=\.\.\.\)"),
])
def test_replaced_adjoint_keywords_name_their_replacement(keyword, value, replacement):
    """The first release's adjoint_* keywords of odeint are refused with the new spelling
    (before: they were odeint's own keywords and were accepted)."""
    with pytest.raises(TypeError, match=replacement):
        otflow.odeint(lambda t, y, a: -y, np.ones(2), [0.0, 1.0], gradient="adjoint", **{keyword: value})


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rtol=-1.0), ValueError, r"Adjoint\(rtol=\.\.\.\) must be a finite non-negative number"),
    (dict(atol=float("nan")), ValueError, r"Adjoint\(atol=\.\.\.\)"),
    (dict(rtol="tight"), TypeError, r"Adjoint\(rtol=\.\.\.\) must be a non-negative float"),
    (dict(seminorm="yes"), TypeError, r"Adjoint\(seminorm=\.\.\.\) must be True or False"),
    (dict(counter=np.zeros(3)), ValueError, r"adjoint_counter\(\) \(shape \(5,\)\), got shape \(3,\)"),
    (dict(counter=[0.0] * 5), TypeError, "must be an array"),
])
def test_adjoint_options_validated_on_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        otflow.Adjoint(**kwargs)


def test_adjoint_is_one_frozen_choice():
    adj = otflow.Adjoint(rtol=1e-7)
    assert (adj.rtol, adj.atol, adj.seminorm, adj.counter) == (1e-7, None, True, None)
    assert otflow.Adjoint(rtol=1) == otflow.Adjoint(rtol=1.0) and otflow.Adjoint() != adj
    with pytest.raises(AttributeError):
        adj.rtol = 1e-3  # frozen
    assert otflow.Adjoint is otflow.ode.Adjoint


def test_adjoint_counter_backend_is_keyword_only():
    """adjoint_counter(backend=None, *, ...) took the backend positionally; now it is
    keyword-only and a positional call says so (before: the call succeeded)."""
    with pytest.raises(TypeError, match=r"adjoint_counter\(backend='numpy'\)"):
        adjoint_counter("numpy")
    counter = adjoint_counter(backend="numpy", dtype="float64")
    np.testing.assert_array_equal(counter, np.zeros(5))
    assert counter.dtype == np.float64


def test_adjoint_tolerances_reach_the_backward_solve():
    """Adjoint(rtol, atol) set the backward solve's tolerances: tighter ones take more
    backward steps and give a gradient closer to the exact one, with the same forward solve."""
    torch = pytest.importorskip("torch")
    b = otflow.get_backend("torch")
    gM, _, _ = linear_exact_gradients()
    results = {}
    for tol in (1e-4, 1e-10):
        M = torch.tensor(np.ascontiguousarray(A_LIN.T), requires_grad=True)
        counter = adjoint_counter(backend=b, dtype=torch.float64)
        loss = linear_loss(b, dict(rtol=1e-10, atol=1e-10), otflow.Adjoint(rtol=tol, atol=tol, counter=counter))
        loss(M, b.asarray(Y0_LIN), b.asarray(T_LIN)).backward()
        err = np.linalg.norm(np_of(b, M.grad) - gM) / np.linalg.norm(gM)
        results[tol] = (err, adjoint_stats(counter.grad))
    (loose_err, loose), (tight_err, tight) = results[1e-4], results[1e-10]
    assert tight.n_steps > 3 * loose.n_steps, (loose, tight)
    assert tight_err < 1e-8 < loose_err, (loose_err, tight_err)


class Fehlberg45(otflow.ode.AbstractRungeKutta):
    """Fehlberg's 4(5) pair, the fifth-order solution propagated: six stages, no FSAL."""

    tableau = otflow.ButcherTableau.from_fractions(
        c=[0, "1/4", "3/8", "12/13", 1, "1/2"],
        a=[[], ["1/4"], ["3/32", "9/32"], ["1932/2197", "-7200/2197", "7296/2197"],
           ["439/216", -8, "3680/513", "-845/4104"], ["-8/27", 2, "-3544/2565", "1859/4104", "-11/40"]],
        b=["16/135", 0, "6656/12825", "28561/56430", "-9/50", "2/55"],
        b_error=["1/360", 0, "-128/4275", "-2197/75240", "1/50", "2/55"],
        order=5, error_order=4)


def test_user_method_without_fsal_in_both_gradient_modes(autodiff_backend):
    """A user's adaptive pair without FSAL (Fehlberg 4(5)) forward, and backward by either
    mode: dL/dθ and dL/dy0 of L = Σ y(T)², y' = θ·y, match the exact ones. Before: TypeError
    in the adaptive loop."""
    b = autodiff_backend
    y0 = b.asarray(np.array([1.0, -0.5]))
    theta, T = -0.7, 1.3
    want_theta = 2 * T * float(np.sum(np.array([1.0, -0.5]) ** 2)) * np.exp(2 * theta * T)
    want_y0 = 2 * np.array([1.0, -0.5]) * np.exp(2 * theta * T)
    for mode in MODES:
        def loss(th, y, mode=mode):
            sol = otflow.odeint(lambda t, z, a: a * z, y, [0.0, T], args=th, method=Fehlberg45(), rtol=1e-10,
                                atol=1e-10, gradient=mode)
            return b.namespace().sum(sol.ys[-1] ** 2)

        _, (g_theta, g_y0) = value_and_grads(b, loss, b.asarray(np.asarray(theta)), y0, argnums=(0, 1))
        assert float(np_of(b, g_theta)) == pytest.approx(want_theta, rel=1e-8), mode
        np.testing.assert_allclose(np_of(b, g_y0), want_y0, rtol=1e-8, err_msg=mode)


def test_stats_pass_through_the_adjoint_unchanged(autodiff_backend):
    """Under differentiation (the custom VJP in action) the adjoint's Solution.stats are the
    forward loop's: equal to direct mode's; fixed-step counts stay Python ints."""
    b = autodiff_backend
    y0 = b.asarray(Y0_LIN)
    for kw in (dict(rtol=1e-7, atol=1e-7), dict(method="midpoint", step_size=0.1)):
        counts = {}
        for mode in MODES:
            def loss(M, mode=mode):
                sol = otflow.odeint(lambda t, y, m: y @ m, y0, [0.0, 0.5, 1.0], args=M, gradient=mode, **kw)
                if "method" in kw:
                    assert all(type(v) is int for v in sol.stats), sol.stats
                return b.namespace().sum(sol.ys[-1] ** 2), tuple(sol.stats)

            (_, stats), _ = b.value_and_grad(loss, has_aux=True)(b.asarray(np.ascontiguousarray(A_LIN.T)))
            counts[mode] = tuple(int(np_of(b, v)) for v in stats)
        assert counts["direct"] == counts["adjoint"], counts
        assert counts["adjoint"][0] > 0 and counts["adjoint"][1] == counts["adjoint"][2] + counts["adjoint"][3]


def test_reference_backend_solves_with_either_mode():
    """No autodiff on numpy: gradient="adjoint" simply solves."""
    sols = [otflow.odeint(lambda t, y, a: -y, np.ones(2), [0.0, 1.0], gradient=m, rtol=1e-8, atol=1e-8)
            for m in MODES]
    np.testing.assert_array_equal(sols[0].ys, sols[1].ys)
    assert sols[0].nfe == sols[1].nfe


def test_forward_values_and_stats_identical_between_modes(autodiff_backend):
    b = autodiff_backend
    y0 = b.asarray(Y0_LIN)
    M = b.asarray(np.ascontiguousarray(A_LIN.T))
    # loop_kind="forward" in both modes: JAX then compiles no checkpointed loop
    for kw in (dict(rtol=1e-7, atol=1e-7, loop_kind="forward"), dict(method="midpoint", step_size=0.1)):
        sols = [otflow.odeint(lambda t, y, m: y @ m, y0, [0.0, 0.5, 1.0], args=M, gradient=m, **kw) for m in MODES]
        np.testing.assert_allclose(np_of(b, sols[0].ys), np_of(b, sols[1].ys), rtol=1e-13, atol=1e-14)
        assert sols[0].nfe == sols[1].nfe and sols[0].n_steps == sols[1].n_steps
        assert float(np_of(b, sols[1].t_final)) == 1.0 and sols[1].result is otflow.Status.SUCCESS


# ---------------------------------------------------------------------------------------------
# the checker itself


def test_checker_catches_a_wrong_gradient_and_warns_in_float32():
    torch = pytest.importorskip("torch")
    b = otflow.get_backend("torch")
    p = {"a": torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)}

    def loss(q, mode):  # "adjoint" deliberately returns half the true gradient
        x = q["a"]
        return (x * x).sum() if mode == "direct" else (b.stop_gradient(x) * x).sum()

    report = check_gradients(loss, p, n_directions=2)
    assert report.fd_errors["direct"] < 1e-9 and report.fd_errors["adjoint"] > 0.4
    assert report.pair_errors["direct", "adjoint"] == pytest.approx(0.5)
    assert not report.ok(1e-3)
    with pytest.raises(AssertionError, match="adjoint vs FD"):
        report.assert_ok(1e-3)
    with pytest.warns(UserWarning, match="float64"):
        check_gradients(lambda q, m: (q * q).sum(), torch.ones(3), modes=("direct",))
    with pytest.raises(ValueError, match="Did you mean 'adjoint'"):
        check_gradients(loss, p, modes=("adjont",))


# ---------------------------------------------------------------------------------------------
# memory


def test_jax_adjoint_memory_does_not_grow_with_steps():
    """Compiled temporary memory of the gradient: flat in the number of steps for the
    adjoint (≤ 1.2× from 10 to 100 fixed steps), linear for direct backpropagation."""
    jax = pytest.importorskip("jax")
    b = otflow.get_backend("jax")
    jnp = b.namespace()
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(size=(32, 32)) / 6)
    y0 = jnp.asarray(rng.normal(size=(256, 32)))

    def temp_bytes(mode, n):
        def loss(W):
            sol = otflow.odeint(lambda t, y, w: jnp.tanh(y @ w), y0, [0.0, 1.0], args=W, method="rk4", n_steps=n,
                                gradient=mode)
            return jnp.sum(sol.ys[-1] ** 2)

        return jax.jit(jax.grad(loss)).lower(W).compile().memory_analysis().temp_size_in_bytes

    adjoint = [temp_bytes("adjoint", n) for n in (10, 100)]
    direct = [temp_bytes("direct", n) for n in (10, 100)]
    assert adjoint[1] <= 1.2 * adjoint[0], adjoint
    assert direct[1] >= 5 * direct[0] and direct[1] > 10 * adjoint[1], direct


_RSS_SCRIPT = textwrap.dedent("""
    import resource
    import torch, otflow
    torch.set_num_threads(1)  # two threads on two shared cores can be 5× slower
    torch.manual_seed(0)
    W = (torch.randn(64, 64, dtype=torch.float64) / 8).requires_grad_()
    y0 = torch.randn(2048, 64, dtype=torch.float64)  # 1 MiB of state
    for n in (20, 200):  # the peak so far, after each gradient
        sol = otflow.odeint(lambda t, y, w: torch.tanh(y @ w), y0, [0.0, 1.0], args=W, method="rk4", n_steps=n,
                            gradient="adjoint")
        sol.ys[-1].pow(2).sum().backward()
        assert W.grad is not None
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def test_torch_adjoint_peak_memory_does_not_grow_with_steps():
    """Peak RSS of a fresh process after an adjoint gradient through 20 rk4 steps, then
    through 200 (a 1 MiB state; direct backpropagation keeps ~12 MiB per step, so 200
    steps would add ~2.4 GiB)."""
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "backends"),
                                                        os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    small, large = (int(v) for v in out.stdout.split()[-2:])
    assert large <= 1.2 * small, (small, large)
