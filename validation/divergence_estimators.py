"""Bias, variance and cost of otflow's divergence estimators.

Run from the repository root::

    python -m validation.divergence_estimators [--backend torch|jax] [--out DIR] [--timing]

Three studies (the first two in float64):

1. **Probes.** The field is a random tanh MLP (3 hidden layers of width 64) in
   d = 16 at one point, whose Jacobian ``J`` is computed exactly. Each estimator is
   repeated :data:`N_REPS` times (the point is tiled along the batch, so every row draws
   its own probes) for M probes per estimate: Hutchinson with Gaussian and with
   Rademacher probes (M = 1 … 256) and Hutch++ (M = 3 … 36 matrix–vector products).
   Reported: the bias ``mean(estimates) − tr J`` with its standard error, the variance
   of the estimates against the theory ``v₁/M`` (``v₁ = 2‖S‖²_F`` Gaussian,
   ``2(‖S‖²_F − Σ J_ii²)`` Rademacher, ``S = (J + Jᵀ)/2``), and the mean of the
   per-row sample variances the estimator returns, divided by M.

2. **Hutch++ vs Hutchinson at equal matvecs** m = 3 … 45, Gaussian and Rademacher
   probes, on four Jacobians: a symmetric matrix with a decaying spectrum
   (λᵢ = i⁻², d = 64), one with a flat spectrum (λᵢ uniform on [0.5, 1.5], d = 64),
   and random tanh MLPs in d = 16 and d = 64 (variances averaged over 4 points).
   Reported: both variances and their ratio (< 1: Hutch++ wins).

3. **Exact-trace timings** (``--timing``; always both torch and JAX, float32, CPU):
   reverse mode (``vmap`` of the VJP over the basis) against forward mode (``vmap`` of
   the JVP) for d = 2, 16, 64 at batch 512 with the same MLP, and one Hutchinson probe
   for scale. JAX functions are jitted and timed after compilation; each entry is the
   fastest of several alternated repeats (robust to other load on the cores).

The tables go to stdout; ``divergence_estimators_<backend>.png`` (three panels) and
``divergence_estimators_<backend>.json`` go to ``--out`` (default ``validation/out/``).
The exit status is 0 when every Hutchinson/Hutch++ bias (studies 1 and 2) is within
:data:`BIAS_SE` standard errors and every Hutchinson variance in study 1 within
:data:`VAR_TOL` of theory, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

import otflow
from otflow.cnf.divergence import exact_divergence, hutchinson_divergence, hutchplusplus_divergence
from validation._common import get_float64_backend

__all__ = [
    "BACKENDS", "N_REPS", "PROBE_COUNTS", "HUTCHPP_COUNTS", "COMPARE_COUNTS", "TIMING_DIMS", "BIAS_SE", "VAR_TOL",
    "get_backend", "mlp_field", "linear_field", "spectrum_matrix", "jacobians", "single_probe_variance",
    "probe_study", "hutchpp_comparison", "timing_study", "plot", "main",
]

BACKENDS = ("torch", "jax")
#: repetitions of each estimate (rows of the tiled batch)
N_REPS = 4000
#: probes per Hutchinson estimate, and matvecs per Hutch++ estimate, in study 1 (Hutch++ is
#: exact once m/3 ≥ d = 16, so its counts stop below 48)
PROBE_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
HUTCHPP_COUNTS = (3, 6, 12, 24, 36)
#: matvecs per estimate in study 2 (m/3 < 16, so Hutch++ is not exact on the d = 16 MLP)
COMPARE_COUNTS = (3, 6, 12, 24, 45)
#: study 3
TIMING_DIMS = (2, 16, 64)
TIMING_BATCH = 512
#: pass criteria
BIAS_SE = 4.0
VAR_TOL = 0.15
#: the MLP of every study: 3 hidden tanh layers of this width
WIDTH = 64
HIDDEN = 3
#: largest number of (probe × row) products vectorized at once (memory bound)
_BLOCK = 1 << 16


def get_backend(name: str):
    """``otflow.get_backend(name)`` in float64 (JAX x64 on)."""
    return get_float64_backend(name, BACKENDS)


# --------------------------------------------------------------------------------------------
# fields


def mlp_params(d: int, seed: int, *, width: int = WIDTH, hidden: int = HIDDEN) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights ``N(0, 1/fan_in)`` and biases ``N(0, 0.1²)`` of a d → width×hidden → d MLP."""
    rng = np.random.default_rng(seed)
    sizes = [d] + [width] * hidden + [d]
    return [(rng.standard_normal((m, n)) / math.sqrt(m), 0.1 * rng.standard_normal(n))
            for m, n in zip(sizes[:-1], sizes[1:])]


def mlp_field(backend, d: int, seed: int, *, dtype=None, device=None) -> Callable:
    """A tanh MLP field on ``(batch, d)`` inputs (rows independent)."""
    xp = backend.namespace()
    dtype = xp.float64 if dtype is None else dtype
    params = [(backend.asarray(w, dtype=dtype, device=device), backend.asarray(b, dtype=dtype, device=device))
              for w, b in mlp_params(d, seed)]

    def fn(x):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = xp.tanh(h)
        return h

    return fn


def linear_field(backend, a: np.ndarray, *, device=None) -> Callable:
    """``v = x Aᵀ`` (every row's Jacobian is ``A``)."""
    at = backend.asarray(np.ascontiguousarray(a.T), dtype=backend.namespace().float64, device=device)
    return lambda x: x @ at


def spectrum_matrix(d: int, kind: str, seed: int) -> np.ndarray:
    """A symmetric ``U diag(λ) Uᵀ`` with a random orthogonal ``U``: ``"decaying"`` λᵢ = i⁻²,
    ``"flat"`` λᵢ uniform on [0.5, 1.5]."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, d)))
    if kind == "decaying":
        lam = 1.0 / np.arange(1, d + 1) ** 2
    elif kind == "flat":
        lam = rng.uniform(0.5, 1.5, d)
    else:
        raise ValueError(f"unknown spectrum {kind!r}")
    return (u * lam) @ u.T


def jacobians(backend, fn: Callable, x) -> np.ndarray:
    """Every row's full Jacobian, ``(batch, d, d)`` numpy, from ``vmap`` of the VJP over the
    basis (row k of ``eₖᵀJ`` is row k of ``J``); ``x`` of shape ``(batch, d)``."""
    xp = backend.namespace()
    batch, d = x.shape
    _, vjp_fn = backend.vjp(fn, x)
    eye = backend.asarray(np.eye(d), dtype=x.dtype, device=backend.device_of(x))
    basis = xp.broadcast_to(xp.reshape(eye, (d, 1, d)), (d, batch, d))
    rows = backend.vmap(lambda c: vjp_fn(c)[0])(basis)  # (d, batch, d): [k, i, :] = J_i[k, :]
    return np.transpose(backend.to_numpy(rows), (1, 0, 2))


def single_probe_variance(j: np.ndarray, probe: str) -> float:
    """Variance of ``εᵀJε``: ``2‖S‖²_F`` (Gaussian) or ``2(‖S‖²_F − Σ J_ii²)`` (Rademacher)."""
    s = 0.5 * (j + j.T)
    fro2 = float(np.sum(s * s))
    return 2.0 * fro2 if probe == "gaussian" else 2.0 * (fro2 - float(np.sum(np.diag(j) ** 2)))


# --------------------------------------------------------------------------------------------
# repeated estimates


def _z(bias: float, se: float, scale: float) -> float:
    """``bias / se``; an estimator that is exact up to roundoff (Hutch++ with m/3 ≥ d) has
    ``se ≈ 0`` and gets z = 0 when its bias is roundoff too."""
    if se > 1e-12 * max(1.0, abs(scale)):
        return bias / se
    return 0.0 if abs(bias) <= 1e-9 * max(1.0, abs(scale)) else math.inf


def _estimator(backend, fn: Callable, kind: str, m: int, probe: str) -> Callable:
    """``f(x, key) -> (mean, var or None)`` for one estimator, jitted where the backend can."""
    if kind == "hutchinson":
        def f(x, key):
            est = hutchinson_divergence(fn, x, key, backend=backend, n_probes=m, probe=probe)
            return est.mean, est.variance
    else:
        def f(x, key):
            return hutchplusplus_divergence(fn, x, key, backend=backend, n_matvecs=m, probe=probe).mean, None
    return backend.jit(f)


def repeated_estimates(backend, fn: Callable, x0: np.ndarray, kind: str, m: int, probe: str, reps: int,
                       seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``reps`` independent estimates at the point ``x0`` (d,): the point is tiled along the
    batch in blocks of at most ``_BLOCK / m`` rows. Returns the estimates and the returned
    per-row variances (None for Hutch++ or one probe)."""
    xp = backend.namespace()
    block = max(1, min(reps, _BLOCK // m))
    f = _estimator(backend, fn, kind, m, probe)
    keys = backend.split(backend.key(seed), math.ceil(reps / block))
    x = backend.asarray(np.tile(x0, (block, 1)), dtype=xp.float64)
    means, variances = [], []
    for key in keys:
        mean, var = f(x, key)
        means.append(backend.to_numpy(mean))
        if var is not None:
            variances.append(backend.to_numpy(var))
    means = np.concatenate(means)[:reps]
    return means, (np.concatenate(variances)[:reps] if variances else None)


def probe_study(backend, *, d: int = 16, reps: int = N_REPS, seed: int = 0) -> dict:
    """Study 1: bias and variance vs the number of probes on a tanh MLP at one point."""
    xp = backend.namespace()
    fn = mlp_field(backend, d, seed)
    x0 = np.random.default_rng(seed + 1).standard_normal(d)
    j = jacobians(backend, fn, backend.asarray(x0[None], dtype=xp.float64))[0]
    exact = float(np.trace(j))
    div = exact_divergence(fn, backend.asarray(x0[None], dtype=xp.float64), backend=backend).mean
    rows = []
    runs = [("hutchinson", "gaussian", PROBE_COUNTS), ("hutchinson", "rademacher", PROBE_COUNTS),
            ("hutch++", "gaussian", HUTCHPP_COUNTS)]
    for r, (kind, probe, counts) in enumerate(runs):
        v1 = single_probe_variance(j, probe)
        for i, m in enumerate(counts):
            est, var = repeated_estimates(backend, fn, x0, kind, m, probe, reps, seed=1000 * r + i)
            bias = float(est.mean() - exact)
            se = float(est.std(ddof=1) / math.sqrt(reps))
            variance = float(est.var(ddof=1))
            rows.append(dict(
                estimator=kind, probe=probe, m=m, bias=bias, bias_se=se, bias_z=_z(bias, se, exact),
                variance=variance, theory=v1 / m if kind == "hutchinson" else None,
                returned_variance_over_m=float(var.mean() / m) if var is not None else None,
            ))
    return dict(d=d, reps=reps, exact=exact, exact_divergence=float(backend.to_numpy(div)[0]),
                v1_gaussian=single_probe_variance(j, "gaussian"), v1_rademacher=single_probe_variance(j, "rademacher"),
                singular_values=np.linalg.svd(j, compute_uv=False).tolist(), rows=rows)


def hutchpp_comparison(backend, *, reps: int = N_REPS, seed: int = 0, n_points: int = 4) -> list[dict]:
    """Study 2: Hutch++ and Hutchinson variances at equal matvecs on four Jacobians."""
    xp = backend.namespace()
    cases = []
    for kind in ("decaying", "flat"):
        a = spectrum_matrix(64, kind, seed)
        cases.append((f"{kind} spectrum, d=64", linear_field(backend, a), [np.zeros(64)], [a]))
    for d in (16, 64):
        fn = mlp_field(backend, d, seed + d)
        pts = np.random.default_rng(seed + d + 1).standard_normal((n_points, d))
        js = list(jacobians(backend, fn, backend.asarray(pts, dtype=xp.float64)))
        cases.append((f"tanh MLP, d={d}", fn, list(pts), js))
    rows = []
    for ci, (name, fn, pts, js) in enumerate(cases):
        sv = np.mean([np.linalg.svd(j, compute_uv=False) for j in js], axis=0)
        for probe in ("gaussian", "rademacher"):
            for mi, m in enumerate(COMPARE_COUNTS):
                var_h, var_pp, theory, bias_pp = 0.0, 0.0, 0.0, []
                for pi, (x0, j) in enumerate(zip(pts, js)):
                    n = reps // len(pts)
                    s = 100_000 + 1000 * ci + 100 * mi + 10 * pi + (probe == "rademacher")
                    est_h, _ = repeated_estimates(backend, fn, x0, "hutchinson", m, probe, n, seed=s)
                    est_pp, _ = repeated_estimates(backend, fn, x0, "hutch++", m, probe, n, seed=s + 50_000)
                    var_h += est_h.var(ddof=1) / len(pts)
                    var_pp += est_pp.var(ddof=1) / len(pts)
                    theory += single_probe_variance(j, probe) / m / len(pts)
                    bias_pp.append(_z(est_pp.mean() - np.trace(j), est_pp.std(ddof=1) / math.sqrt(n), np.trace(j)))
                rows.append(dict(case=name, probe=probe, m=m, var_hutchinson=float(var_h),
                                 var_hutchinson_theory=float(theory), var_hutchpp=float(var_pp),
                                 ratio=float(var_pp / var_h), hutchpp_bias_z_max=float(np.max(np.abs(bias_pp))),
                                 top_sv_share=float(np.sum(sv[: max(1, m // 3)] ** 2) / np.sum(sv ** 2))))
    return rows


# --------------------------------------------------------------------------------------------
# timings


def _timed(f: Callable, sync: Callable, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(f())
        best = min(best, time.perf_counter() - t0)
    return best


def timing_study(dims: Sequence[int] = TIMING_DIMS, *, batch: int = TIMING_BATCH, repeats: int = 7,
                 rounds: int = 3) -> list[dict]:
    """Study 3: seconds per exact trace (reverse vs forward mode) and per one-probe
    Hutchinson estimate, float32 CPU, torch and JAX; the fastest of ``rounds × repeats``
    alternated calls."""
    rows = []
    for name in BACKENDS:
        be = get_backend(name)
        xp = be.namespace()
        dev = be.device("cpu")
        if name == "jax":
            def sync(out):
                return out.block_until_ready()
        else:
            def sync(out):
                return out
        for d in dims:
            fn = mlp_field(be, d, seed=d, dtype=xp.float32, device=dev)
            x = be.asarray(np.random.default_rng(d).standard_normal((batch, d)), dtype=xp.float32, device=dev)
            key = be.key(0)
            fns = {
                "vjp": be.jit(lambda x: exact_divergence(fn, x, backend=be, method="vjp").mean),
                "jvp": be.jit(lambda x: exact_divergence(fn, x, backend=be, method="jvp").mean),
                "hutchinson_1": be.jit(lambda x, k: hutchinson_divergence(fn, x, k, backend=be).mean),
            }
            calls = {"vjp": lambda: fns["vjp"](x), "jvp": lambda: fns["jvp"](x),
                     "hutchinson_1": lambda: fns["hutchinson_1"](x, key)}
            for c in calls.values():  # compile / warm up
                sync(c())
            best = {k: math.inf for k in calls}
            for _ in range(rounds):
                for k, c in calls.items():
                    best[k] = min(best[k], _timed(c, sync, repeats))
            a, b = (be.to_numpy(calls[k]()) for k in ("vjp", "jvp"))
            rows.append(dict(backend=name, d=d, batch=batch, vjp_ms=1e3 * best["vjp"], jvp_ms=1e3 * best["jvp"],
                             hutchinson_1_ms=1e3 * best["hutchinson_1"],
                             faster="vjp" if best["vjp"] < best["jvp"] else "jvp",
                             max_abs_diff=float(np.max(np.abs(a - b)))))
    return rows


# --------------------------------------------------------------------------------------------
# plot and command line


def plot(study: dict, comparison: list[dict], path: Path, *, title: str = "") -> Path:
    """Three panels: variance vs M with the 1/M lines; bias ± 3 SE vs M; Hutch++/Hutchinson
    variance ratio at equal matvecs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 6.4), constrained_layout=True)
    styles = {("hutchinson", "gaussian"): ("tab:blue", "o", "Hutchinson, Gaussian"),
              ("hutchinson", "rademacher"): ("tab:orange", "s", "Hutchinson, Rademacher"),
              ("hutch++", "gaussian"): ("tab:green", "^", "Hutch++, Gaussian")}
    for (kind, probe), (color, marker, label) in styles.items():
        sel = [r for r in study["rows"] if r["estimator"] == kind and r["probe"] == probe]
        ms = np.array([r["m"] for r in sel], dtype=float)
        ax1.loglog(ms, [r["variance"] for r in sel], marker, color=color, ms=6, mfc="none", label=f"{label}: measured")
        if kind == "hutchinson":
            v1 = study[f"v1_{probe}"]
            grid = np.array([ms[0], ms[-1]])
            ax1.loglog(grid, v1 / grid, "-", color=color, lw=1, label=f"theory {v1:.3g}/M")
        off = {"gaussian": 0.96, "rademacher": 1.04}[probe] * (1.0 if kind == "hutchinson" else 1.0)
        ax2.errorbar(ms * off, [r["bias"] for r in sel], yerr=[3 * r["bias_se"] for r in sel], fmt=marker,
                     color=color, ms=5, mfc="none", capsize=3, label=label)
    _log_ticks(ax1, PROBE_COUNTS)
    ax1.set_xlabel("M (probes; matvecs for Hutch++)")
    ax1.set_ylabel("variance of the estimate")
    ax1.set_title(f"Variance vs M: tanh MLP, d={study['d']}, {study['reps']} repetitions")
    ax1.legend(fontsize=8)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.axhline(0.0, color="0.3", lw=0.8)
    ax2.set_xscale("log")
    _log_ticks(ax2, PROBE_COUNTS)
    ax2.set_xlabel("M (probes; matvecs for Hutch++)")
    ax2.set_ylabel("bias = mean − exact trace  (bars: ±3 SE)")
    ax2.set_title(f"Bias vs M (exact trace {study['exact']:.4f})")
    ax2.legend(fontsize=8)
    ax2.grid(True, which="both", alpha=0.3)

    colors = ["tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, case in enumerate(dict.fromkeys(r["case"] for r in comparison)):
        for probe, ls, mk in (("gaussian", "-", "o"), ("rademacher", "--", "s")):
            sel = [r for r in comparison if r["case"] == case and r["probe"] == probe]
            ax3.loglog([r["m"] for r in sel], [r["ratio"] for r in sel], ls + mk, color=colors[i % 4], ms=5,
                       mfc="none" if probe == "rademacher" else colors[i % 4],
                       label=f"{case}, {probe}")
    ax3.axhline(1.0, color="0.2", lw=1)
    ax3.axhline(3.0, color="0.5", lw=0.8, ls=":")
    ax3.text(40, 3.3, "3×", fontsize=8, color="0.35", va="bottom")
    ax3.text(4.3, 0.8, "↓ Hutch++ wins", fontsize=8, color="0.25", va="top")
    ax3.text(4.3, 1.25, "↑ Hutchinson wins", fontsize=8, color="0.25", va="bottom")
    _log_ticks(ax3, COMPARE_COUNTS)
    ax3.set_xlabel("matvecs per estimate")
    ax3.set_ylabel("Var(Hutch++) / Var(Hutchinson)")
    ax3.set_title("Hutch++ vs Hutchinson at equal matvecs")
    ax3.legend(fontsize=7, loc="lower left")
    ax3.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_ticks(ax, ticks) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.xaxis.set_major_locator(FixedLocator(list(ticks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _fmt(x, spec=".4g") -> str:
    return "—" if x is None else format(x, spec)


def _print_study(study: dict) -> bool:
    ok = True
    print(f"\n## 1. Bias and variance vs M — tanh MLP, d = {study['d']}, {study['reps']} repetitions per M")
    print(f"   exact trace {study['exact']:.6f} (full Jacobian) / {study['exact_divergence']:.6f} (exact_divergence); "
          f"single-probe variance v₁: Gaussian {study['v1_gaussian']:.4f}, Rademacher {study['v1_rademacher']:.4f}")
    print(f"   {'estimator':<11} {'probe':<10} {'M':>4} {'bias':>10} {'SE':>9} {'z':>6} {'variance':>10} "
          f"{'theory v₁/M':>11} {'ratio':>6} {'returned var/M':>14}")
    for r in study["rows"]:
        ratio = None if r["theory"] is None else r["variance"] / r["theory"]
        bias_ok = abs(r["bias_z"]) <= BIAS_SE
        var_ok = ratio is None or abs(ratio - 1) <= VAR_TOL
        ok &= bias_ok and var_ok
        print(f"   {r['estimator']:<11} {r['probe']:<10} {r['m']:>4} {r['bias']:>10.4g} {r['bias_se']:>9.3g} "
              f"{r['bias_z']:>6.2f} {r['variance']:>10.4g} {_fmt(r['theory']):>11} {_fmt(ratio, '.3f'):>6} "
              f"{_fmt(r['returned_variance_over_m']):>14}{'' if bias_ok and var_ok else '  <-- out of bounds'}")
    return ok


def _print_comparison(rows: list[dict]) -> None:
    print("\n## 2. Hutch++ vs Hutchinson at equal matvecs (variance of the estimate; ratio < 1: Hutch++ wins)")
    print("   top-m/3 share = fraction of ‖J‖²_F in the m/3 largest singular values")
    print(f"   {'case':<24} {'probe':<10} {'m':>3} {'Var Hutchinson':>14} {'(theory)':>10} {'Var Hutch++':>12} "
          f"{'ratio':>7} {'top-m/3 share':>13} {'H++ |z| max':>11}")
    for r in rows:
        print(f"   {r['case']:<24} {r['probe']:<10} {r['m']:>3} {r['var_hutchinson']:>14.4g} "
              f"{r['var_hutchinson_theory']:>10.4g} {r['var_hutchpp']:>12.4g} {r['ratio']:>7.3f} "
              f"{r['top_sv_share']:>13.3f} {r['hutchpp_bias_z_max']:>11.2f}")


def _print_timing(rows: list[dict]) -> None:
    print(f"\n## 3. Exact trace, ms per call (batch {TIMING_BATCH}, tanh MLP {HIDDEN}×{WIDTH}, float32, CPU; "
          "fastest of alternated repeats)")
    print(f"   {'backend':<7} {'d':>4} {'vmap-VJP':>9} {'vmap-JVP':>9} {'faster':>7} {'1-probe Hutchinson':>19} "
          f"{'|vjp − jvp|':>11}")
    for r in rows:
        print(f"   {r['backend']:<7} {r['d']:>4} {r['vjp_ms']:>9.2f} {r['jvp_ms']:>9.2f} {r['faster']:>7} "
              f"{r['hutchinson_1_ms']:>19.2f} {r['max_abs_diff']:>11.2e}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.divergence_estimators",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="backend of studies 1 and 2 (default torch)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="folder for the PNG and JSON (default validation/out/)")
    parser.add_argument("--timing", action="store_true", help="also time the exact trace on torch and JAX (study 3)")
    parser.add_argument("--reps", type=int, default=N_REPS, help=f"repetitions per estimate (default {N_REPS})")
    opts = parser.parse_args(argv)

    start = time.perf_counter()
    backend = get_backend(opts.backend)
    print(f"# otflow {otflow.__version__} divergence estimators — backend {opts.backend}, float64")
    print(f"# python {platform.python_version()}, numpy {np.__version__}")
    study = probe_study(backend, reps=opts.reps)
    ok = _print_study(study)
    comparison = hutchpp_comparison(backend, reps=opts.reps)
    _print_comparison(comparison)
    ok &= all(r["hutchpp_bias_z_max"] <= BIAS_SE for r in comparison)
    timing = None
    if opts.timing:
        timing = timing_study()
        _print_timing(timing)
    verdict = (f"Hutchinson/Hutch++ bias within {BIAS_SE:g} SE and Hutchinson variance within {VAR_TOL:.0%} of theory: "
               + ("yes" if ok else "NO"))
    png = plot(study, comparison, opts.out / f"divergence_estimators_{opts.backend}.png",
               title=f"otflow divergence estimators, backend {opts.backend}, float64 — {verdict}")
    json_path = opts.out / f"divergence_estimators_{opts.backend}.json"
    json_path.write_text(json.dumps(dict(backend=opts.backend, probe_study=study, hutchpp_comparison=comparison,
                                         timing=timing, ok=ok), indent=1), encoding="utf-8")
    print(f"\nwrote {png} and {json_path} ({time.perf_counter() - start:.1f} s)")
    print(f"RESULT: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
