"""Accuracy of ``Flow.inverse(Flow.transform(x))`` and of ``log_prob`` against the evaluation tolerance.

Run from the repository root::

    python -m validation.inverse_accuracy [--backend torch|jax] [--out DIR]

Two studies in float64, each at ``rtol = atol = tol`` for ``tol`` = 1e-3 … 1e-10
(``flow.with_eval_solver(rtol=tol, atol=tol)``, Dormand–Prince), on :data:`N_POINTS`
standard normal points:

1. **Round trip.** ``max`` and ``mean`` over all coordinates of
   ``|inverse(transform(x)) − x|`` for two one-block flows over ``[0, 1]``:

   * ``mlp`` — a random FFJORD/RNODE field ``otflow.MLP((2,), hidden=(64, 64, 64),
     zero_last=False)`` (tanh, concatsquash; weights from seed :data:`MLP_SEED`; torch and
     JAX draw different weights from the same seed, so it is a different field on each);
   * ``linear`` — ``v(t, x) = A x`` with the non-normal ``A`` of :data:`A`, for which
     ``transform`` is also compared with the closed form ``expm(A T) x``.

   The number of field evaluations of each solve (``flow.last_nfe``) is recorded.
   Forward and backward solves take different adaptive steps, so their errors do not
   cancel: the round-trip error is about the sum of two global errors.

2. **Density.** For the linear field, ``max`` and ``mean`` of
   ``|log_prob(x) − (log N(expm(A T) x; 0, I) + T · tr A)|``, with NFE.

The tables go to stdout; ``inverse_accuracy_<backend>.png`` (three panels) and
``inverse_accuracy_<backend>.json`` (every number) go to ``--out`` (default
``validation/out/``). The exit status is 0 when every error is at most
:data:`TARGET_FACTOR` × tol (plus the roundoff allowance :data:`ROUNDOFF`), 1 otherwise.

:func:`roundtrip_study` and :func:`logprob_study` return the rows, for tests and notebooks.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import scipy.linalg

import otflow
from otflow import MLP, Flow
from validation._common import get_float64_backend as _float64_backend

__all__ = ["BACKENDS", "TOLERANCES", "A", "T", "N_POINTS", "MLP_SEED", "X_SEED", "TARGET_FACTOR", "ROUNDOFF",
           "get_float64_backend", "mlp_flow", "linear_flow", "roundtrip_study", "logprob_study", "plot", "main"]

BACKENDS = ("torch", "jax")


def get_float64_backend(name: str):
    """``otflow.get_backend(name)`` in float64 (JAX x64 on)."""
    return _float64_backend(name, BACKENDS)
#: rtol = atol of the evaluation solver
TOLERANCES = tuple(10.0 ** -k for k in range(3, 11))
#: the linear field ``v = A x`` (a damped, non-normal rotation; tr A = −0.1) and the time horizon
A = np.array([[-0.3, 0.8], [-0.5, 0.2]])
T = 1.0
N_POINTS = 256
MLP_SEED = 0
X_SEED = 1
#: target: every error ≤ TARGET_FACTOR · tol + ROUNDOFF (the bound of tests/test_flow.py)
TARGET_FACTOR = 30.0
ROUNDOFF = 1e-13
MAX_STEPS = 100_000


def mlp_flow(backend) -> Flow:
    """The random MLP flow: ``MLP((2,), hidden=(64, 64, 64), zero_last=False)``, seed :data:`MLP_SEED`."""
    field = MLP((2,), hidden=(64, 64, 64), zero_last=False)
    params = field.init(backend, backend.key(MLP_SEED), dtype=backend.namespace().float64)
    return Flow([field], [params], backend=backend, dtype="float64", T=T)


def linear_flow(backend) -> Flow:
    """``v(t, x) = A x`` (rows: ``x @ Aᵀ``) as a pure function with parameters ``Aᵀ``."""

    def apply(params, t, x):
        return x @ params

    params = backend.asarray(np.ascontiguousarray(A.T), dtype=backend.namespace().float64)
    return Flow.from_velocity(apply, params, event_shape=(2,), backend=backend, dtype="float64", T=T)


def _points() -> np.ndarray:
    return np.random.default_rng(X_SEED).standard_normal((N_POINTS, 2))


def _solver(flow: Flow, tol: float) -> Flow:
    return flow.with_eval_solver(rtol=tol, atol=tol, max_steps=MAX_STEPS)


def roundtrip_study(backend_name: str = "torch", tols: Sequence[float] = TOLERANCES) -> list[dict]:
    """Rows ``{field, tol, max_error, mean_error, nfe_transform, nfe_inverse, transform_max_error}``
    (the last one only for the linear field: ``max |transform(x) − expm(A T) x|``)."""
    backend = get_float64_backend(backend_name)
    x = _points()
    exact_z = x @ scipy.linalg.expm(A * T).T
    rows = []
    for name, flow in (("mlp", mlp_flow(backend)), ("linear", linear_flow(backend))):
        for tol in tols:
            f = _solver(flow, tol)
            z = np.asarray(f.transform(x), dtype=np.float64)
            nfe_t = f.last_nfe
            back = np.asarray(f.inverse(z), dtype=np.float64)
            nfe_i = f.last_nfe
            err = np.abs(back - x)
            row = dict(field=name, tol=tol, max_error=float(err.max()), mean_error=float(err.mean()),
                       nfe_transform=int(nfe_t), nfe_inverse=int(nfe_i))
            if name == "linear":
                row["transform_max_error"] = float(np.max(np.abs(z - exact_z)))
            rows.append(row)
    return rows


def linear_logp_exact(x: np.ndarray) -> np.ndarray:
    """``log N(expm(A T) x; 0, I) + T · tr A`` per row."""
    z = x @ scipy.linalg.expm(A * T).T
    return -0.5 * np.sum(z * z, axis=1) - math.log(2 * math.pi) + T * np.trace(A)


def logprob_study(backend_name: str = "torch", tols: Sequence[float] = TOLERANCES) -> list[dict]:
    """Rows ``{tol, max_error, mean_error, nfe}`` of the linear field's ``log_prob``."""
    backend = get_float64_backend(backend_name)
    x = _points()
    exact = linear_logp_exact(x)
    flow = linear_flow(backend)
    rows = []
    for tol in tols:
        f = _solver(flow, tol)
        err = np.abs(np.asarray(f.log_prob(x), dtype=np.float64) - exact)
        rows.append(dict(tol=tol, max_error=float(err.max()), mean_error=float(err.mean()), nfe=int(f.last_nfe)))
    return rows


def within_target(error: float, tol: float) -> bool:
    return math.isfinite(error) and error <= TARGET_FACTOR * tol + ROUNDOFF


# --------------------------------------------------------------------------------------------
# figure


def plot(rt_rows: list[dict], lp_rows: list[dict], path: Path, *, title: str = "") -> Path:
    """Three panels: round-trip error vs tol; linear log_prob error vs tol; NFE vs tol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"mlp": "tab:blue", "linear": "tab:green"}
    labels = {"mlp": "random MLP (64, 64, 64)", "linear": "linear v = Ax"}
    tols = np.array(sorted({r["tol"] for r in rt_rows}))
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5.4), constrained_layout=True)

    def guides(ax):
        ax.loglog(tols, tols, color="0.45", lw=1, ls="--", label="error = tol")
        ax.loglog(tols, TARGET_FACTOR * tols, color="0.7", lw=1, ls=":", label=f"target {TARGET_FACTOR:g} × tol")

    for name in dict.fromkeys(r["field"] for r in rt_rows):
        sel = sorted((r for r in rt_rows if r["field"] == name), key=lambda r: r["tol"])
        ts = [r["tol"] for r in sel]
        ax1.loglog(ts, [r["max_error"] for r in sel], "-o", color=colors[name], ms=5, label=f"{labels[name]}: max")
        ax1.loglog(ts, [r["mean_error"] for r in sel], "--s", color=colors[name], ms=4, mfc="none",
                   label=f"{labels[name]}: mean")
        ax3.semilogx(ts, [r["nfe_transform"] for r in sel], "-o", color=colors[name], ms=9, mfc="none", lw=2.5,
                     alpha=0.6, label=f"{labels[name]}: transform")
        ax3.semilogx(ts, [r["nfe_inverse"] for r in sel], "--s", color=colors[name], ms=5,
                     label=f"{labels[name]}: inverse")
    guides(ax1)
    ax1.set_title("Round trip |inverse(transform(x)) − x|")
    ax1.set_ylabel("absolute error (over all coordinates)")

    sel = sorted(lp_rows, key=lambda r: r["tol"])
    ts = [r["tol"] for r in sel]
    ax2.loglog(ts, [r["max_error"] for r in sel], "-o", color="tab:red", ms=5, label="max")
    ax2.loglog(ts, [r["mean_error"] for r in sel], "--s", color="tab:red", ms=4, mfc="none", label="mean")
    guides(ax2)
    ax2.set_title("Linear field: |log_prob − closed form|")
    ax2.set_ylabel("absolute error of log p(x)")
    ax3.semilogx(ts, [r["nfe"] for r in sel], ":^", color="tab:red", ms=4, label="linear: log_prob")
    ax3.set_title("Work: field evaluations per solve")
    ax3.text(0.98, 0.03, "overlapping curves: equal NFE", transform=ax3.transAxes, fontsize=8, ha="right",
             va="bottom", color="0.35")
    ax3.set_ylabel("NFE (flow.last_nfe)")

    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("evaluation tolerance rtol = atol")
        ax.invert_xaxis()  # tighter tolerances to the right
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# printing and the command line


def _print_roundtrip(rows: list[dict]) -> bool:
    ok = True
    print(f"\n## Round trip max / mean |inverse(transform(x)) − x| over {N_POINTS}×2 coordinates, T = {T:g}")
    for name in dict.fromkeys(r["field"] for r in rows):
        sel = [r for r in rows if r["field"] == name]
        linear = name == "linear"
        desc = ("linear v = Ax, A = " + np.array2string(A, separator=", ").replace("\n", "")) if linear else \
            "random MLP((2,), hidden=(64, 64, 64), zero_last=False), tanh, concatsquash"
        print(f"\n   {name}: {desc}")
        extra = f" {'|z − expm(AT)x|':>16}" if linear else ""
        print(f"   {'tol':>7} | {'max err':>10} {'mean err':>10} {'max/tol':>8} | {'NFE fwd':>7} {'NFE inv':>7}{extra}")
        for r in sel:
            good = within_target(r["max_error"], r["tol"])
            ok &= good
            extra = f" {r['transform_max_error']:>16.3e}" if linear else ""
            print(f"   {r['tol']:>7.0e} | {r['max_error']:>10.3e} {r['mean_error']:>10.3e} "
                  f"{r['max_error'] / r['tol']:>8.2f} | {r['nfe_transform']:>7d} {r['nfe_inverse']:>7d}{extra}"
                  f"{'' if good else '  OVER TARGET'}")
    return ok


def _print_logprob(rows: list[dict]) -> bool:
    ok = True
    print("\n## Linear field: max / mean |log_prob(x) − (log N(expm(AT)x) + T·tr A)|")
    print(f"   {'tol':>7} | {'max err':>10} {'mean err':>10} {'max/tol':>8} | {'NFE':>6}")
    for r in rows:
        good = within_target(r["max_error"], r["tol"])
        ok &= good
        print(f"   {r['tol']:>7.0e} | {r['max_error']:>10.3e} {r['mean_error']:>10.3e} "
              f"{r['max_error'] / r['tol']:>8.2f} | {r['nfe']:>6d}{'' if good else '  OVER TARGET'}")
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.inverse_accuracy",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch", help="backend (default torch)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="folder for inverse_accuracy_<backend>.png and .json (default validation/out/)")
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    backend = get_float64_backend(opts.backend)
    print(f"# otflow {otflow.__version__} inverse/log_prob accuracy — backend {opts.backend} "
          f"({type(backend).__name__}), float64, dopri5, rtol = atol = tol")
    print(f"# python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}")
    rt = roundtrip_study(opts.backend)
    rt_ok = _print_roundtrip(rt)
    lp = logprob_study(opts.backend)
    lp_ok = _print_logprob(lp)

    verdict = (f"every error {'≤' if rt_ok and lp_ok else 'NOT ≤'} {TARGET_FACTOR:g} × tol "
               f"(round trip {'ok' if rt_ok else 'OVER'}, log_prob {'ok' if lp_ok else 'OVER'})")
    png = plot(rt, lp, opts.out / f"inverse_accuracy_{opts.backend}.png",
               title=f"otflow Flow accuracy vs evaluation tolerance — backend {opts.backend}, float64, "
                     f"{N_POINTS} points, T = {T:g}: {verdict}")
    data = dict(backend=opts.backend, n_points=N_POINTS, T=T, A=A.tolist(), mlp_seed=MLP_SEED, x_seed=X_SEED,
                target_factor=TARGET_FACTOR, roundoff=ROUNDOFF, roundtrip=rt, log_prob=lp,
                roundtrip_ok=rt_ok, log_prob_ok=lp_ok)
    json_path = opts.out / f"inverse_accuracy_{opts.backend}.json"
    json_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    print(f"\nwrote {png} and {json_path} ({time.perf_counter() - start:.1f} s)")
    print(f"RESULT: {verdict}")
    return 0 if rt_ok and lp_ok else 1


if __name__ == "__main__":
    sys.exit(main())
