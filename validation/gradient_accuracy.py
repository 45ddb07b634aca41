"""Gradient accuracy and cost of odeint's gradient modes: direct backpropagation and the adjoint.

Run from the repository root::

    python -m validation.gradient_accuracy [--backend torch|jax] [--out DIR] [--quick]

Three studies, in float64:

1. **Error against tolerance.** For each problem and each tolerance ``rtol = atol``
   (forward and backward alike) the gradient of the loss is computed with
   ``gradient="direct"``, ``gradient="adjoint"`` (seminorm, the default) and
   ``gradient=otflow.Adjoint(seminorm=False)``. The error is the relative 2-norm
   distance to a reference gradient (direct mode at rtol = atol = 1e-12; the adjoint's
   reference-tolerance gradient is reported beside it). Also recorded: the forward NFE
   (``Solution.stats.nfe``), the backward NFE of the adjoint (its
   :func:`otflow.adjoint_counter`) and the median wall time of one gradient (after
   compilation). Direct mode reverse-differentiates every forward evaluation once, so
   its backward work is one VJP per forward evaluation (JAX's checkpointed loop also
   recomputes forward steps).
2. **Finite differences.** :func:`otflow.check_gradients` on each problem at rtol =
   atol = 1e-10: both modes against fourth-order central differences.
3. **Memory against the number of steps.** JAX: the compiled gradient's temporary
   memory (``memory_analysis().temp_size_in_bytes``) with ``n`` fixed RK4 steps, and
   for an adaptive Dopri5 solve with each loop kind; torch: the peak resident memory of
   a fresh process (``ru_maxrss``) after one gradient through ``n`` RK4 steps.

Problems: ``tanh4`` — a time-dependent tanh field on a batch of three 4-vectors, with
dict parameters, the initial state and the end time all differentiated, outputs at
``[0, 0.4, T]``; ``cnf`` — the RNODE objective (NLL + 0.1·E_K + 0.1·E_J) of a 2-D CNF,
an MLP 2 → 16 → 16 → 2 with time concatenated, a batch of 64, the RNODE error norm
(regularizer integrals masked).

The tables go to stdout; ``gradient_accuracy_<backend>.png`` and ``.json`` to
``--out`` (default ``validation/out/``). The exit status is 0 when, at the tightest
tolerance of the sweep, both modes are within 1e-6 of the reference and within 1e-5
of finite differences, and the adjoint's memory grows by at most 20 % from the
smallest to the largest step count; 1 otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import otflow
from otflow.ode.adjoint import adjoint_counter, adjoint_stats
from otflow.cnf.dynamics import RNODE_NORM, rnode_rhs, standard_normal_logpdf
from otflow.ode.gradcheck import check_gradients
from validation._common import get_float64_backend as _float64_backend

__all__ = ["BACKENDS", "TOLERANCES", "QUICK_TOLERANCES", "REFERENCE_TOL", "MODES", "PROBLEMS", "make_problem",
           "accuracy_study", "fd_study", "memory_study", "plot", "main"]

BACKENDS = ("torch", "jax")


def get_float64_backend(name: str):
    """``otflow.get_backend(name)`` in float64 (JAX x64 on)."""
    return _float64_backend(name, BACKENDS)
TOLERANCES = tuple(10.0 ** -k for k in range(3, 11))
QUICK_TOLERANCES = (1e-4, 1e-6, 1e-8)
REFERENCE_TOL = 1e-12
#: (label, odeint's gradient=)
MODES = (("direct", "direct"), ("adjoint", otflow.Adjoint()), ("adjoint, no seminorm", otflow.Adjoint(seminorm=False)))
PROBLEMS = ("tanh4", "cnf")
#: targets: gradient error at the tightest swept tolerance, error against FD, adjoint memory growth
REF_TARGET, FD_TARGET, MEMORY_TARGET = 1e-6, 1e-5, 1.2
REPO = Path(__file__).resolve().parents[1]


def make_problem(b, name: str):
    """``(loss, args)``: ``loss(args, counter, tol, gradient) -> (value, forward_nfe)``; with an
    :class:`otflow.Adjoint` ``gradient``, ``counter`` receives the backward counts."""
    xp = b.namespace()
    f64 = xp.float64
    if name == "tanh4":
        rng = np.random.default_rng(11)
        args = {"p": {"W": b.asarray(rng.normal(size=(4, 4)) / 2, dtype=f64),
                      "b": b.asarray(rng.normal(size=(4,)) / 2, dtype=f64),
                      "c": b.asarray(0.3, dtype=f64)},
                "y0": b.asarray(rng.normal(size=(3, 4)), dtype=f64), "T": b.asarray(1.1, dtype=f64)}

        def f(t, y, p):
            return xp.tanh(y @ p["W"] + p["b"]) - p["c"] * xp.sin(3.0 * t) * y

        def loss(q, counter, tol, gradient):
            ts = xp.stack([xp.zeros_like(q["T"]), xp.zeros_like(q["T"]) + 0.4, q["T"]])
            sol = otflow.odeint(f, q["y0"], ts, args=q["p"], rtol=tol, atol=tol, throw=False,
                                gradient=_with_counter(gradient, counter))
            value = xp.sum(xp.sin(sol.ys[1, ...])) + 0.5 * xp.sum(sol.ys[-1, ...] ** 2)
            return value, sol.stats.nfe

        return loss, args
    if name == "cnf":
        field = otflow.MLP((2,), hidden=(16, 16), conditioning="concat", zero_last=False)
        args = field.init(b, b.key(0), dtype=f64)
        n = 64
        x = b.asarray(np.random.default_rng(3).normal(size=(n, 2)), dtype=f64)
        eps = b.normal(b.key(4), (n, 2), dtype=f64)
        zero = xp.zeros((n,), dtype=f64)

        def loss(p, counter, tol, gradient):
            sol = otflow.odeint(rnode_rhs(field, backend=b), (x, zero, zero, zero), [0.0, 1.0], args=(p, eps),
                                norm=RNODE_NORM, rtol=tol, atol=tol, throw=False,
                                gradient=_with_counter(gradient, counter))
            z, dlogp, kinetic, jacobian = (leaf[-1, ...] for leaf in sol.ys)
            value = -xp.mean(standard_normal_logpdf(xp, z) - dlogp) + 0.1 * xp.mean(kinetic) + 0.1 * xp.mean(jacobian)
            return value, sol.stats.nfe

        return loss, args
    raise ValueError(f"unknown problem {name!r}; choose from {PROBLEMS}")


def _with_counter(gradient, counter):
    """``gradient`` with the step counter attached when it is the adjoint method."""
    if isinstance(gradient, otflow.Adjoint) and counter is not None:
        return dataclasses.replace(gradient, counter=counter)
    return gradient


def _flat(b, tree) -> np.ndarray:
    return np.concatenate([np.asarray(b.to_numpy(x), dtype=np.float64).ravel() for x in b.tree_leaves(tree)])


def _gradient(b, loss, args, tol, gradient, repeats: int = 3):
    """(value, flat gradient, forward NFE, backward stats, median seconds)."""
    counter = adjoint_counter(backend=b, dtype=b.namespace().float64)
    fn = b.jit(b.value_and_grad(lambda a, c: loss(a, c, tol, gradient), argnums=(0, 1), has_aux=True))
    (value, nfe), (g, gc) = fn(args, counter)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(args, counter)
        b.to_numpy(b.tree_leaves(out[1][0])[0])  # wait for the result
        times.append(time.perf_counter() - start)
    return (float(b.to_numpy(value)), _flat(b, g), int(b.to_numpy(nfe)), adjoint_stats(gc),
            float(np.median(times)) if times else float("nan"))


def accuracy_study(backend_name: str, tols: Sequence[float] = TOLERANCES, problems: Sequence[str] = PROBLEMS,
                   verbose: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows ``problem, mode, tol, error, loss_error, nfe_forward, nfe_backward, seconds`` and
    the references (``problem, loss, adjoint_vs_direct``)."""
    b = get_float64_backend(backend_name)
    rows, refs = [], []
    for pname in problems:
        loss, args = make_problem(b, pname)
        ref_value, ref, _, _, _ = _gradient(b, loss, args, REFERENCE_TOL, "direct", repeats=0)
        _, ref_adj, _, _, _ = _gradient(b, loss, args, REFERENCE_TOL, otflow.Adjoint(), repeats=0)
        agreement = float(np.linalg.norm(ref_adj - ref) / np.linalg.norm(ref))
        refs.append(dict(problem=pname, loss=ref_value, adjoint_vs_direct=agreement, n_params=int(ref.size)))
        if verbose:
            print(f"  {pname}: reference at tol {REFERENCE_TOL:g}: {ref.size} parameters, "
                  f"adjoint vs direct {agreement:.1e}", flush=True)
        for tol in tols:
            for label, gradient in MODES:
                adjoint = isinstance(gradient, otflow.Adjoint)
                value, g, nfe, stats, seconds = _gradient(b, loss, args, tol, gradient)
                rows.append(dict(problem=pname, mode=label, tol=tol,
                                 error=float(np.linalg.norm(g - ref) / np.linalg.norm(ref)),
                                 loss_error=abs(value - ref_value) / abs(ref_value), nfe_forward=nfe,
                                 nfe_backward=stats.nfe if adjoint else nfe,
                                 backward_steps=stats.n_steps if adjoint else None,
                                 seconds=seconds))
    return rows, refs


def fd_study(backend_name: str, problems: Sequence[str] = PROBLEMS, tol: float = 1e-10) -> list[dict]:
    """:func:`otflow.check_gradients` of each problem at rtol = atol = ``tol``."""
    b = get_float64_backend(backend_name)
    out = []
    for pname in problems:
        loss, args = make_problem(b, pname)
        report = check_gradients(lambda a, mode: loss(a, None, tol, mode)[0], args, n_directions=4)
        out.append(dict(problem=pname, tol=tol, fd_errors=report.fd_errors,
                        direct_vs_adjoint=report.pair_errors[("direct", "adjoint")], fd_noise=report.fd_noise,
                        table=str(report)))
    return out


# --------------------------------------------------------------------------------------------
# memory

_TORCH_RSS = textwrap.dedent("""
    import resource, sys
    import torch, otflow
    torch.set_num_threads(1)
    n, mode = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    W = (torch.randn(64, 64, dtype=torch.float64) / 8).requires_grad_()
    y0 = torch.randn(512, 64, dtype=torch.float64)  # 256 KiB of state
    f = lambda t, y, w: torch.tanh(y @ w)
    with torch.no_grad():  # the baseline: everything loaded, one forward solve
        otflow.odeint(f, y0, [0.0, 1.0], args=W, method="rk4", n_steps=n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sol = otflow.odeint(f, y0, [0.0, 1.0], args=W, method="rk4", n_steps=n, gradient=mode)
    sol.ys[-1].pow(2).sum().backward()
    print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")

MEMORY_STEPS = {"jax": (10, 100, 1000), "torch": (10, 100, 300)}


def memory_study(backend_name: str) -> list[dict]:
    """Rows ``mode, steps, bytes`` (JAX: compiled temporary bytes; torch: peak RSS growth
    over the forward-only baseline, in bytes)."""
    rows = []
    if backend_name == "jax":
        import jax

        b = get_float64_backend("jax")
        jnp = b.namespace()
        rng = np.random.default_rng(0)
        W = jnp.asarray(rng.normal(size=(64, 64)) / 8)
        y0 = jnp.asarray(rng.normal(size=(512, 64)))

        def temp_bytes(**kw):
            def loss(W):
                sol = otflow.odeint(lambda t, y, w: jnp.tanh(y @ w), y0, [0.0, 1.0], args=W, **kw)
                return jnp.sum(sol.ys[-1] ** 2)

            return int(jax.jit(jax.grad(loss)).lower(W).compile().memory_analysis().temp_size_in_bytes)

        for n in MEMORY_STEPS["jax"]:
            for mode in ("direct", "adjoint"):
                rows.append(dict(mode=mode, steps=n, bytes=temp_bytes(method="rk4", n_steps=n, gradient=mode)))
        for label, kw in (("direct, checkpointed loop", dict(loop_kind="checkpointed")),
                          ("direct, bounded loop", dict(loop_kind="bounded")),
                          ("adjoint", dict(gradient="adjoint"))):
            for max_steps in (256, 4096):
                rows.append(dict(mode=f"dopri5 {label}", steps=f"max_steps={max_steps}",
                                 bytes=temp_bytes(rtol=1e-6, atol=1e-6, max_steps=max_steps, **kw)))
        return rows
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "backends"),
                                                        os.environ.get("PYTHONPATH", "")]))
    for n in MEMORY_STEPS["torch"]:
        for mode in ("direct", "adjoint"):
            out = subprocess.run([sys.executable, "-c", _TORCH_RSS, str(n), mode], env=env, capture_output=True,
                                 text=True, check=True, timeout=600)
            base, peak = (int(v) for v in out.stdout.split()[-2:])
            rows.append(dict(mode=mode, steps=n, bytes=(peak - base) * 1024, peak_rss=peak * 1024))
    return rows


# --------------------------------------------------------------------------------------------
# output


def _print_accuracy(rows, refs):
    print("\n## 1. gradient error vs tolerance (rtol = atol, forward and backward)")
    for ref in refs:
        p = ref["problem"]
        print(f"\n### {p} ({ref['n_params']} parameters; reference loss {ref['loss']:.10g}; at tol "
              f"{REFERENCE_TOL:g} the adjoint is {ref['adjoint_vs_direct']:.1e} from direct)")
        print(f"{'tol':>7}  {'mode':<21} {'grad error':>10} {'loss error':>10} {'fwd NFE':>8} {'bwd NFE':>8} "
              f"{'time [ms]':>9}")
        for r in (r for r in rows if r["problem"] == p):
            print(f"{r['tol']:7.0e}  {r['mode']:<21} {r['error']:10.2e} {r['loss_error']:10.2e} {r['nfe_forward']:8d} "
                  f"{r['nfe_backward']:8d} {1e3 * r['seconds']:9.2f}")
    print("\n(direct: bwd NFE = VJPs of the taped forward evaluations, i.e. the forward NFE)")


def _print_memory(rows, backend_name):
    what = ("compiled temporary memory of the gradient (JAX memory_analysis)" if backend_name == "jax"
            else "peak RSS growth of one gradient over a forward-only baseline (fresh process)")
    print(f"\n## 3. memory: {what}")
    print(f"{'mode':<32} {'steps':>16} {'MiB':>10}")
    for r in rows:
        print(f"{r['mode']:<32} {str(r['steps']):>16} {r['bytes'] / 2 ** 20:10.2f}")


def plot(rows: list[dict], memory: list[dict], path: Path, *, title: str = "") -> Path:
    """Three panels: gradient error vs tolerance; error vs total NFE; memory vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"direct": "tab:blue", "adjoint": "tab:red", "adjoint, no seminorm": "tab:orange"}
    styles = {"tanh4": "-o", "cnf": "--s"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), constrained_layout=True)
    for p in dict.fromkeys(r["problem"] for r in rows):
        for m in colors:
            sel = [r for r in rows if r["problem"] == p and r["mode"] == m]
            if not sel:
                continue
            kw = dict(color=colors[m], ms=4, lw=1.2, label=f"{p}: {m}", mfc="none" if p == "cnf" else colors[m])
            axes[0].loglog([r["tol"] for r in sel], [r["error"] for r in sel], styles.get(p, "-o"), **kw)
            axes[1].loglog([r["nfe_forward"] + r["nfe_backward"] for r in sel], [r["error"] for r in sel],
                           styles.get(p, "-o"), **kw)
    axes[0].set_xlabel("rtol = atol")
    axes[0].set_ylabel("relative gradient error")
    axes[0].set_title("Gradient error vs tolerance")
    axes[0].invert_xaxis()
    axes[1].set_xlabel("forward NFE + backward NFE (direct: VJPs)")
    axes[1].set_title("Gradient error vs work")
    for ax in axes[:2]:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fixed = [r for r in memory if isinstance(r["steps"], int)]
    for m, c in (("direct", "tab:blue"), ("adjoint", "tab:red")):
        sel = [r for r in fixed if r["mode"] == m]
        axes[2].loglog([r["steps"] for r in sel], [max(r["bytes"], 1) / 2 ** 20 for r in sel], "-o", color=c,
                       label=m)
    axes[2].set_xlabel("RK4 steps")
    axes[2].set_ylabel("MiB")
    axes[2].set_title("Gradient memory vs steps")
    axes[2].grid(True, alpha=0.3)
    axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation.gradient_accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--quick", action="store_true", help=f"tolerances {QUICK_TOLERANCES} only")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine two threads can be "
                             "several times slower)")
    opts = parser.parse_args(argv)
    start = time.perf_counter()
    get_float64_backend(opts.backend)
    threads = ""
    if opts.backend == "torch":
        import torch

        torch.set_num_threads(opts.torch_threads)
        threads = f", torch threads {opts.torch_threads}"
    print(f"# otflow {otflow.__version__} gradient validation — backend {opts.backend}, float64"
          f"{', quick' if opts.quick else ''}; python {platform.python_version()}, {os.cpu_count()} CPUs{threads}")
    tols = QUICK_TOLERANCES if opts.quick else TOLERANCES
    rows, refs = accuracy_study(opts.backend, tols)
    _print_accuracy(rows, refs)

    print("\n## 2. against central finite differences (otflow.check_gradients, tol 1e-10)")
    fd = fd_study(opts.backend)
    for r in fd:
        print(f"\n### {r['problem']}\n{r['table']}")

    memory = memory_study(opts.backend)
    _print_memory(memory, opts.backend)

    tightest = min(tols)
    ref_ok = all(r["error"] <= REF_TARGET for r in rows if r["tol"] == tightest)
    fd_ok = all(v <= FD_TARGET for r in fd for v in list(r["fd_errors"].values()) + [r["direct_vs_adjoint"]])
    adj = [r for r in memory if r["mode"] == "adjoint" and isinstance(r["steps"], int)]
    floor = 2 ** 20  # torch: growth below 1 MiB is allocator noise
    mem_ok = max(adj[-1]["bytes"], floor) <= MEMORY_TARGET * max(adj[0]["bytes"], floor)
    verdict = (f"reference target {'holds' if ref_ok else 'FAILS'}; FD target {'holds' if fd_ok else 'FAILS'}; "
               f"adjoint memory {'flat' if mem_ok else 'GROWS'}")
    png = plot(rows, memory, opts.out / f"gradient_accuracy_{opts.backend}.png",
               title=f"otflow gradients, backend {opts.backend}, float64: {verdict}")
    data = dict(backend=opts.backend, quick=opts.quick, reference_tol=REFERENCE_TOL, references=refs, accuracy=rows,
                finite_differences=fd, memory=memory, ref_ok=ref_ok, fd_ok=fd_ok, memory_ok=mem_ok)
    json_path = opts.out / f"gradient_accuracy_{opts.backend}.json"
    json_path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
    print(f"\nwrote {png} and {json_path} ({time.perf_counter() - start:.1f} s)")
    print(f"RESULT: {verdict}")
    return 0 if ref_ok and fd_ok and mem_ok else 1


if __name__ == "__main__":
    sys.exit(main())
