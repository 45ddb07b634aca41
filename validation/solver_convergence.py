"""Convergence orders and work–precision of otflow's Runge–Kutta solvers.

Run from the repository root::

    python -m validation.solver_convergence [--backend numpy|array_api_strict|torch|jax]
                                            [--out DIR] [--quick]

Two studies, both in float64:

1. **Observed orders.** Each solver (euler, midpoint, rk4, dopri5 — the propagated
   fifth-order solution and, separately, the embedded fourth-order one) integrates
   linear systems ``y' = A y`` with fixed steps ``h = T/n`` through ``solver.step`` in
   the backend's ``fori_loop``. The error is the largest absolute error at ``T``
   against ``y(T) = expm(A T) y₀`` (scipy). The observed order is the least-squares
   slope of ``log err`` against ``log h`` over the asymptotic range: the
   :data:`N_FIT` smallest steps whose error is above the roundoff floor
   :data:`ROUNDOFF_FLOOR`. ``--quick`` computes only those points, so its orders are
   the full run's.

2. **Work–precision.** ``otflow.odeint(method="dopri5")`` against scipy's
   ``solve_ivp(method="RK45")`` (the same Dormand–Prince pair) for
   ``rtol = atol`` from 1e-3 to 1e-10, on the linear systems and on the Van der Pol
   oscillator (reference: scipy's DOP853 at rtol = atol = 1e-13). Each method's
   ``log NFE`` is interpolated piecewise-linearly against its ``log`` achieved error
   onto a common error grid (the overlap of the two error ranges); the target is
   otflow's NFE within 10 % of scipy's there.

The tables go to stdout; ``solver_convergence.png`` (two panels) and
``solver_convergence.json`` (every number) go to ``--out`` (default
``validation/out/``). The exit status is 0 when every observed order is within its
bound and the NFE target holds on every problem, 1 otherwise.

The functions :func:`convergence_study`, :func:`observed_orders`,
:func:`work_precision` and :func:`nfe_ratio_at_equal_error` return the numbers, for
tests and notebooks.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import scipy
import scipy.linalg
from scipy.integrate import solve_ivp

import otflow
from otflow.ode.solvers import SOLVERS
from validation._common import get_float64_backend as _float64_backend

__all__ = [
    "BACKENDS", "LINEAR_PROBLEMS", "NONLINEAR_PROBLEMS", "ORDER_BOUNDS", "ROUNDOFF_FLOOR", "N_FIT",
    "TOLERANCES", "QUICK_TOLERANCES", "NFE_TARGET", "get_float64_backend", "convergence_study", "fit_order",
    "observed_orders", "work_precision", "nfe_ratio_at_equal_error", "plot", "main",
]

BACKENDS = ("numpy", "array_api_strict", "torch", "jax")


def get_float64_backend(name: str):
    """``otflow.get_backend(name)`` in float64 (JAX x64 on)."""
    return _float64_backend(name, BACKENDS)
#: errors below this are roundoff, not truncation error, and are left out of the fits
ROUNDOFF_FLOOR = 1e-13
#: the order is fitted over this many smallest steps above the roundoff floor
N_FIT = 4
#: rtol = atol of the full work–precision study, and of ``--quick``
TOLERANCES = tuple(10.0 ** -k for k in range(3, 11))
QUICK_TOLERANCES = (1e-3, 1e-5, 1e-7, 1e-9)
#: otflow's NFE may differ from scipy RK45's by at most this fraction at equal error
NFE_TARGET = 0.10
#: the issue's bounds: (expected order, allowed deviation of the observed order)
ORDER_BOUNDS = {
    "euler": (1, 0.1),
    "midpoint": (2, 0.15),
    "rk4": (4, 0.2),
    "dopri5": (5, 0.3),
    "dopri5_embedded": (4, 0.3),
}
#: steps per run ``n`` (``h = T/n``): the full study, and ``--quick`` (the last N_FIT)
STEP_COUNTS = {
    "euler": [2 ** k for k in range(3, 12)],
    "midpoint": [2 ** k for k in range(2, 11)],
    "rk4": [2 ** k for k in range(1, 9)],
    "dopri5": [2 ** k for k in range(1, 9)],
    "dopri5_embedded": [2 ** k for k in range(1, 9)],
}
LABELS = {
    "euler": "Euler",
    "midpoint": "midpoint",
    "rk4": "RK4",
    "dopri5": "Dopri5 (5th, propagated)",
    "dopri5_embedded": "Dopri5 embedded (4th)",
}


# --------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class LinearProblem:
    """``y' = A y`` on ``[0, T]`` for a batch of initial states (rows of ``y0``)."""

    name: str
    description: str
    A: np.ndarray
    y0: np.ndarray  # (batch, dim)
    T: float

    def exact(self, t: float) -> np.ndarray:
        return self.y0 @ scipy.linalg.expm(self.A * t).T

    # work–precision interface
    def otflow_func(self, xp) -> Callable:
        return lambda t, y, a: y @ a

    def otflow_args(self) -> np.ndarray:
        return np.ascontiguousarray(self.A.T)

    def scipy_func(self) -> Callable:
        A, shape = self.A, self.y0.shape
        return lambda t, y: (y.reshape(shape) @ A.T).ravel()

    def reference(self) -> np.ndarray:
        return self.exact(self.T)

    def reference_check(self) -> str:
        return "exact: expm(A T) y₀"


def _damped_rotation() -> LinearProblem:
    A = np.array([[-0.5, 2.0, 0.0, 0.1],
                  [-2.0, -0.5, 0.3, 0.0],
                  [0.0, 0.0, -1.0, 1.0],
                  [0.2, 0.0, -1.0, -0.3]])
    y0 = np.array([[1.0, 0.5, -0.3, 0.2], [0.1, -1.0, 0.4, 0.7]])
    return LinearProblem("rotation4", "non-normal damped rotation, 4×4, T = 2", A, y0, 2.0)


def _random_stable() -> LinearProblem:
    rng = np.random.default_rng(16)
    n = 16
    A = rng.standard_normal((n, n)) / 4.0 - 1.2 * np.eye(n)  # Re λ ∈ [-2.21, -0.30], |λ| ≤ 2.21
    y0 = np.stack([np.linspace(1.0, -0.5, n), np.cos(np.arange(n))])
    return LinearProblem("random16", "random stable non-normal 16×16, T = 2", A, y0, 2.0)


@dataclass(frozen=True)
class VanDerPol:
    """``x'' = μ (1 − x²) x' − x`` as a first-order system, from ``(2, 0)`` over ``[0, T]``."""

    mu: float = 2.0
    T: float = 10.0
    name: str = "vanderpol"
    x0: tuple[float, float] = (2.0, 0.0)
    ref_tol: float = 1e-13

    @property
    def y0(self) -> np.ndarray:
        return np.array(self.x0, dtype=np.float64)

    @property
    def description(self) -> str:
        return f"Van der Pol, μ = {self.mu:g}, T = {self.T:g} (reference: DOP853, tol {self.ref_tol:g})"

    def otflow_func(self, xp) -> Callable:
        def f(t, y, mu):
            x, v = y[0], y[1]
            return xp.stack([v, mu * (1.0 - x * x) * v - x])

        return f

    def otflow_args(self) -> np.ndarray:
        return np.asarray(self.mu, dtype=np.float64)

    def scipy_func(self) -> Callable:
        mu = self.mu
        return lambda t, y: np.array([y[1], mu * (1.0 - y[0] ** 2) * y[1] - y[0]])

    def reference(self, tol: float | None = None) -> np.ndarray:
        tol = self.ref_tol if tol is None else tol
        sol = solve_ivp(self.scipy_func(), (0.0, self.T), self.y0, method="DOP853", rtol=tol, atol=tol)
        if sol.status != 0:
            raise RuntimeError(f"reference solve failed: {sol.message}")
        return sol.y[:, -1]

    def reference_check(self) -> str:
        diff = np.max(np.abs(self.reference() - self.reference(10 * self.ref_tol)))
        return f"reference check: max |DOP853(tol {self.ref_tol:g}) − DOP853(tol {10 * self.ref_tol:g})| = {diff:.1e}"


LINEAR_PROBLEMS = (_damped_rotation(), _random_stable())
NONLINEAR_PROBLEMS = (VanDerPol(),)


# --------------------------------------------------------------------------------------------
# backends


def _f64(backend):
    return backend.namespace().float64


# --------------------------------------------------------------------------------------------
# 1. observed orders


def _fixed_step_final(backend, solver, problem: LinearProblem, n: int, embedded: bool) -> np.ndarray:
    """``y(T)`` after ``n`` equal steps of ``solver.step`` inside ``backend.fori_loop``; with
    ``embedded``, each step propagates the embedded solution ``y₁ − err`` instead."""
    dt = _f64(backend)
    y0 = backend.asarray(problem.y0, dtype=dt)
    a = backend.asarray(problem.otflow_args(), dtype=dt)
    h = backend.asarray(problem.T / n, dtype=dt)
    t0 = backend.asarray(0.0, dtype=dt)

    def f(t, y, args):
        return (y[0] @ args,)

    def body(k, carry):
        t, y = carry
        y1, err, _ = solver.step(f, t, y, h, a)
        if embedded:
            y1 = (y1[0] - err[0],)
        return (t + h, y1)

    _, (y,) = backend.fori_loop(0, n, body, (t0, (y0,)))
    return backend.to_numpy(y).astype(np.float64)


def convergence_study(backend_name: str = "numpy", quick: bool = False,
                      problems: Sequence[LinearProblem] = LINEAR_PROBLEMS,
                      solvers: Sequence[str] = tuple(STEP_COUNTS)) -> list[dict]:
    """Rows ``{problem, solver, n, h, error}``: the max-abs error at ``T`` of ``n`` fixed steps.

    ``quick`` runs only the :data:`N_FIT` smallest steps of each solver.
    """
    backend = get_float64_backend(backend_name)
    rows = []
    for problem in problems:
        exact = problem.exact(problem.T)
        for name in solvers:
            solver = SOLVERS["dopri5" if name == "dopri5_embedded" else name]()
            ns = STEP_COUNTS[name][-N_FIT:] if quick else STEP_COUNTS[name]
            for n in ns:
                y = _fixed_step_final(backend, solver, problem, n, embedded=(name == "dopri5_embedded"))
                rows.append(dict(problem=problem.name, solver=name, n=n, h=problem.T / n,
                                 error=float(np.max(np.abs(y - exact)))))
    return rows


def fit_order(hs: Sequence[float], errors: Sequence[float], *, floor: float = ROUNDOFF_FLOOR,
              n_fit: int = N_FIT) -> tuple[float, list[bool]]:
    """Least-squares slope of ``log err`` vs ``log h`` over the ``n_fit`` smallest ``h`` whose
    error is ≥ ``floor``; returns ``(slope, used)`` (``used[i]``: point ``i`` is in the fit)."""
    hs, errors = np.asarray(hs, float), np.asarray(errors, float)
    ok = np.flatnonzero(np.isfinite(errors) & (errors >= floor))
    chosen = ok[np.argsort(hs[ok])][:n_fit]
    used = [bool(i in set(chosen.tolist())) for i in range(len(hs))]
    if len(chosen) < 2:
        return float("nan"), used
    slope = np.polyfit(np.log(hs[chosen]), np.log(errors[chosen]), 1)[0]
    return float(slope), used


def observed_orders(backend_name: str = "numpy", quick: bool = False, *, study: list[dict] | None = None,
                    problems: Sequence[LinearProblem] = LINEAR_PROBLEMS,
                    solvers: Sequence[str] = tuple(STEP_COUNTS)) -> dict[str, dict[str, float]]:
    """``{problem: {solver: observed order}}`` (runs :func:`convergence_study` unless ``study`` is given)."""
    if study is None:
        study = convergence_study(backend_name, quick, problems, solvers)
    out: dict[str, dict[str, float]] = {}
    for p in dict.fromkeys(r["problem"] for r in study):
        out[p] = {}
        for s in dict.fromkeys(r["solver"] for r in study if r["problem"] == p):
            sel = [r for r in study if r["problem"] == p and r["solver"] == s]
            out[p][s] = fit_order([r["h"] for r in sel], [r["error"] for r in sel])[0]
    return out


def order_ok(solver: str, order: float) -> bool:
    expected, tol = ORDER_BOUNDS[solver]
    return math.isfinite(order) and abs(order - expected) <= tol


# --------------------------------------------------------------------------------------------
# 2. work–precision


def _problem_by_name(name: str):
    for p in LINEAR_PROBLEMS + NONLINEAR_PROBLEMS:
        if p.name == name:
            return p
    raise ValueError(f"unknown problem {name!r}")


def work_precision(backend_name: str = "numpy", problems: Sequence = LINEAR_PROBLEMS + NONLINEAR_PROBLEMS,
                   tols: Sequence[float] = TOLERANCES) -> list[dict]:
    """Rows per (problem, tol): otflow dopri5 and scipy RK45 at ``rtol = atol = tol``.

    Keys: ``problem, tol, otflow_error, otflow_nfe, otflow_accepted, otflow_rejected,
    scipy_error, scipy_nfe, scipy_accepted, nfe_ratio_same_tol`` (otflow / scipy). Errors are
    the largest absolute error at ``T``. Problems may be given by name.
    """
    backend = get_float64_backend(backend_name)
    xp, dt = backend.namespace(), _f64(backend)
    rows = []
    for problem in problems:
        if isinstance(problem, str):
            problem = _problem_by_name(problem)
        ref = problem.reference()
        y0_np = np.asarray(problem.y0, dtype=np.float64)
        y0 = backend.asarray(y0_np, dtype=dt)
        args = backend.asarray(problem.otflow_args(), dtype=dt)
        func = problem.otflow_func(xp)
        f_sp = problem.scipy_func()
        for tol in tols:
            sol = otflow.odeint(func, y0, [0.0, problem.T], args=args, method="dopri5", rtol=tol, atol=tol,
                                max_steps=1_000_000, backend=backend)
            y_ot = backend.to_numpy(sol.ys[-1, ...]).astype(np.float64)
            sp = solve_ivp(f_sp, (0.0, problem.T), y0_np.ravel(), method="RK45", rtol=tol, atol=tol)
            if sp.status != 0:
                raise RuntimeError(f"scipy RK45 failed on {problem.name} at tol {tol:g}: {sp.message}")
            y_sp = sp.y[:, -1].reshape(y0_np.shape)
            rows.append(dict(
                problem=problem.name, tol=tol,
                otflow_error=float(np.max(np.abs(y_ot - ref))), otflow_nfe=sol.nfe,
                otflow_accepted=sol.n_accepted, otflow_rejected=sol.n_rejected,
                scipy_error=float(np.max(np.abs(y_sp - ref))), scipy_nfe=int(sp.nfev),
                scipy_accepted=len(sp.t) - 1,
                nfe_ratio_same_tol=sol.nfe / int(sp.nfev),
            ))
    return rows


def _log_curve(rows, err_key, nfe_key):
    e = np.log([r[err_key] for r in rows])
    n = np.log([r[nfe_key] for r in rows])
    order = np.argsort(e, kind="stable")
    return e[order], n[order]


def nfe_ratio_at_equal_error(rows: Sequence[dict], problem: str | None = None, n_grid: int = 9) -> dict:
    """otflow NFE / scipy NFE at equal achieved error on one problem's work–precision rows.

    Each method's ``log NFE`` is interpolated piecewise-linearly in its ``log error`` onto
    ``n_grid`` log-spaced errors spanning the overlap of the two error ranges. Returns
    ``{problem, grid, ratios, min, max, geomean, holds}``; ``holds`` means every ratio is
    within ``1 ± NFE_TARGET`` (False, with empty ``grid``, if the error ranges do not overlap).
    """
    if problem is not None:
        rows = [r for r in rows if r["problem"] == problem]
    names = {r["problem"] for r in rows}
    if len(names) != 1:
        raise ValueError(f"rows of exactly one problem are needed, got {sorted(names)}")
    eo, no = _log_curve(rows, "otflow_error", "otflow_nfe")
    es, ns = _log_curve(rows, "scipy_error", "scipy_nfe")
    lo, hi = max(eo[0], es[0]), min(eo[-1], es[-1])
    out = dict(problem=names.pop(), grid=[], ratios=[], min=float("nan"), max=float("nan"),
               geomean=float("nan"), holds=False)
    if not lo <= hi:
        return out
    grid = np.linspace(lo, hi, n_grid) if hi > lo else np.array([lo])
    ratios = np.exp(np.interp(grid, eo, no) - np.interp(grid, es, ns))
    out.update(grid=np.exp(grid).tolist(), ratios=ratios.tolist(), min=float(ratios.min()),
               max=float(ratios.max()), geomean=float(np.exp(np.mean(np.log(ratios)))),
               holds=bool(np.all(np.abs(ratios - 1.0) <= NFE_TARGET)))
    return out


# --------------------------------------------------------------------------------------------
# figure


def plot(study: list[dict], wp_rows: list[dict], path: Path, *, summaries: Sequence[dict] = (),
         title: str = "") -> Path:
    """Two panels: error vs h per solver (log-log, reference slopes); NFE vs achieved error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colors = dict(zip(STEP_COUNTS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    problems = list(dict.fromkeys(r["problem"] for r in study))
    styles = ["-o", "--s", ":^"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.8), constrained_layout=True)

    for pi, p in enumerate(problems):
        for s in STEP_COUNTS:
            sel = [r for r in study if r["problem"] == p and r["solver"] == s]
            if not sel:
                continue
            hs = [r["h"] for r in sel]
            es = [r["error"] for r in sel]
            ax1.loglog(hs, es, styles[pi % len(styles)], color=colors[s], ms=4, lw=1.3,
                       mfc="none" if pi else colors[s])
            if pi == 0:  # a reference slope under the first problem's fitted points
                slope, used = fit_order(hs, es)
                pts = [(h, e) for h, e, u in zip(hs, es, used) if u]
                if pts:
                    order = ORDER_BOUNDS[s][0]
                    h_hi, e_hi = max(pts)
                    h_lo = min(pts)[0]
                    c = 0.25 * e_hi / h_hi ** order
                    ax1.loglog([h_lo, h_hi], [c * h_lo ** order, c * h_hi ** order], color="0.35", lw=1, ls=(0, (2, 2)))
                    ax1.annotate(f"h$^{order}$", (h_lo, c * h_lo ** order), textcoords="offset points",
                                 xytext=(-4, -10), fontsize=8, color="0.25", ha="right")
    ax1.axhline(ROUNDOFF_FLOOR, color="0.6", lw=0.8)
    ax1.text(ax1.get_xlim()[0] * 1.1, ROUNDOFF_FLOOR * 1.3, "roundoff floor: points below are not fitted",
             fontsize=7, color="0.4", ha="left", va="bottom")
    handles = [Line2D([], [], color=colors[s], lw=2, label=LABELS[s]) for s in STEP_COUNTS]
    handles += [Line2D([], [], color="0.3", ls=styles[i % 3][:-1], marker=styles[i % 3][-1], ms=4,
                       mfc="none" if i else "0.3", label=p) for i, p in enumerate(problems)]
    handles.append(Line2D([], [], color="0.35", lw=1, ls=(0, (2, 2)), label="slope = nominal order"))
    ax1.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3)
    ax1.set_xlabel("step size h")
    ax1.set_ylabel("max |error| at T")
    ax1.set_title("Fixed-step convergence on y' = Ay")
    ax1.grid(True, which="major", alpha=0.3)

    wp_problems = list(dict.fromkeys(r["problem"] for r in wp_rows))
    wp_colors = ["tab:blue", "tab:green", "tab:red", "tab:purple"]
    for i, p in enumerate(wp_problems):
        sel = sorted((r for r in wp_rows if r["problem"] == p), key=lambda r: r["tol"])
        c = wp_colors[i % len(wp_colors)]
        ax2.loglog([r["otflow_error"] for r in sel], [r["otflow_nfe"] for r in sel], "-o", color=c, ms=5,
                   label=f"{p}: otflow dopri5")
        ax2.loglog([r["scipy_error"] for r in sel], [r["scipy_nfe"] for r in sel], "--x", color=c, ms=7,
                   label=f"{p}: scipy RK45")
    ax2.invert_xaxis()
    if summaries:
        lines = ["otflow NFE / scipy NFE at equal error:"]
        lines += [f"{s['problem']}: {s['min']:.3f} … {s['max']:.3f}" if s["grid"] else f"{s['problem']}: no overlap"
                  for s in summaries]
        ax2.text(0.98, 0.03, "\n".join(lines), transform=ax2.transAxes, fontsize=8, ha="right", va="bottom",
                 bbox=dict(boxstyle="round", fc="white", ec="0.7"))
    ax2.set_xlabel("max |error| at T (achieved)")
    ax2.set_ylabel("function evaluations (NFE)")
    tols = sorted({r["tol"] for r in wp_rows})
    ax2.set_title(f"Work–precision, rtol = atol = {tols[-1]:.0e} … {tols[0]:.0e}")
    ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2)
    ax2.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# printing and the command line


def _print_convergence(study: list[dict], orders: dict) -> bool:
    all_ok = True
    for p in dict.fromkeys(r["problem"] for r in study):
        problem = _problem_by_name(p)
        print(f"\n## Fixed-step convergence: {p} — {problem.description}")
        print(f"   max |y_n − expm(AT) y₀| over the batch; '*' = in the fit (the {N_FIT} smallest h with "
              f"error ≥ {ROUNDOFF_FLOOR:g})")
        for s in dict.fromkeys(r["solver"] for r in study if r["problem"] == p):
            sel = [r for r in study if r["problem"] == p and r["solver"] == s]
            slope, used = fit_order([r["h"] for r in sel], [r["error"] for r in sel])
            expected, tol = ORDER_BOUNDS[s]
            ok = order_ok(s, slope)
            all_ok &= ok
            print(f"\n   {LABELS[s]}: observed order {slope:.3f}  (expected {expected} ± {tol}: "
                  f"{'ok' if ok else 'OUT OF BOUNDS'})")
            print(f"   {'n':>6} {'h':>11} {'error':>11} {'local slope':>12}")
            prev = None
            for r, u in zip(sel, used):
                local = ("" if prev is None or r["error"] <= 0 or prev["error"] <= 0 else
                         f"{math.log(prev['error'] / r['error']) / math.log(prev['h'] / r['h']):.3f}")
                print(f"   {r['n']:>6} {r['h']:>11.4e} {r['error']:>11.3e} {local:>12} {'*' if u else ''}")
                prev = r
    print("\n## Observed orders (least-squares slope over the asymptotic range)")
    solvers = list(STEP_COUNTS)
    print("   " + f"{'problem':<10}" + "".join(f"{s:>17}" for s in solvers))
    for p, by_solver in orders.items():
        print("   " + f"{p:<10}" + "".join(f"{by_solver.get(s, float('nan')):>17.3f}" for s in solvers))
    print("   " + f"{'expected':<10}" + "".join(f"{f'{ORDER_BOUNDS[s][0]} ± {ORDER_BOUNDS[s][1]}':>17}"
                                              for s in solvers))
    return all_ok


def _print_work_precision(rows: list[dict], summaries: list[dict]) -> bool:
    print("\n## Work–precision: otflow odeint(method='dopri5') vs scipy solve_ivp(method='RK45'), rtol = atol")
    for p in dict.fromkeys(r["problem"] for r in rows):
        problem = _problem_by_name(p)
        print(f"\n   {p} — {problem.description}; {problem.reference_check()}")
        print(f"   {'tol':>7} | {'otflow err':>10} {'NFE':>6} {'acc':>5} {'rej':>4} | "
              f"{'scipy err':>10} {'NFE':>6} {'acc':>5} | {'NFE ratio (same tol)':>20}")
        for r in (r for r in rows if r["problem"] == p):
            print(f"   {r['tol']:>7.0e} | {r['otflow_error']:>10.3e} {r['otflow_nfe']:>6d} {r['otflow_accepted']:>5d} "
                  f"{r['otflow_rejected']:>4d} | {r['scipy_error']:>10.3e} {r['scipy_nfe']:>6d} "
                  f"{r['scipy_accepted']:>5d} | {r['nfe_ratio_same_tol']:>20.3f}")
    print(f"\n## NFE ratio otflow/scipy at equal achieved error (target: within 1 ± {NFE_TARGET:g})")
    print(f"   {'problem':<10} {'error range':>21} {'min':>7} {'max':>7} {'geomean':>8}  holds")
    all_ok = True
    for s in summaries:
        all_ok &= s["holds"]
        rng = f"{s['grid'][0]:.1e}…{s['grid'][-1]:.1e}" if s["grid"] else "no overlap"
        print(f"   {s['problem']:<10} {rng:>21} {s['min']:>7.3f} {s['max']:>7.3f} {s['geomean']:>8.3f}  "
              f"{'yes' if s['holds'] else 'NO'}")
    print(f"\n   Target 'otflow NFE within {NFE_TARGET:.0%} of scipy RK45 at equal achieved error': "
          + ("HOLDS on every problem" if all_ok else "DOES NOT HOLD"))
    return all_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.solver_convergence", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="numpy",
                        help="backend of the fixed-step study and of otflow's work-precision solves (default numpy)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="folder for solver_convergence.png and .json (default validation/out/)")
    parser.add_argument("--quick", action="store_true",
                        help=f"only the {N_FIT} fitted step sizes per solver and tolerances {QUICK_TOLERANCES}")
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    backend = get_float64_backend(opts.backend)
    print(f"# otflow {otflow.__version__} solver validation — backend {opts.backend} ({type(backend).__name__}), "
          f"float64{', quick' if opts.quick else ''}")
    print(f"# python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    study = convergence_study(opts.backend, opts.quick)
    orders = observed_orders(study=study)
    orders_ok = _print_convergence(study, orders)

    tols = QUICK_TOLERANCES if opts.quick else TOLERANCES
    wp = work_precision(opts.backend, tols=tols)
    summaries = [nfe_ratio_at_equal_error(wp, p) for p in dict.fromkeys(r["problem"] for r in wp)]
    wp_ok = _print_work_precision(wp, summaries)

    verdict = (f"orders {'within' if orders_ok else 'OUTSIDE'} bounds; NFE target "
               f"{'holds' if wp_ok else 'DOES NOT HOLD'}")
    png = plot(study, wp, opts.out / "solver_convergence.png", summaries=summaries,
               title=f"otflow solvers, backend {opts.backend}, float64{' (quick)' if opts.quick else ''}: {verdict}")
    data = dict(backend=opts.backend, quick=opts.quick, roundoff_floor=ROUNDOFF_FLOOR, n_fit=N_FIT,
                convergence=study, observed_orders=orders, work_precision=wp, nfe_ratio_at_equal_error=summaries,
                orders_ok=orders_ok, nfe_target_holds=wp_ok)
    json_path = opts.out / "solver_convergence.json"
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"\nwrote {png} and {json_path} ({time.perf_counter() - start:.1f} s)")
    print(f"RESULT: {verdict}")
    return 0 if orders_ok and wp_ok else 1


if __name__ == "__main__":
    sys.exit(main())
