"""The RNODE paper's claims, measured: vanilla FFJORD against RNODE on the same data,
budget and seeds.

    python -m validation.rnode_study [--backend jax] [--data 8gaussians checkerboard digits]
                                     [--budget 120] [--out validation/out] [--quick]

Finlay, Jacobsen, Nurbekyan & Oberman ("How to train your neural ODE", ICML 2020) claim
that (a) the kinetic and Jacobian penalties make a CNF reach the same likelihood in less
time, (b) with them fixed-step RK4 trains, while without them it degrades or fails, and
(c) regularized flows need fewer function evaluations (NFE) at evaluation. Four recipes,
the same field, seed, optimizer and wall-clock budget on each data set:

* ``vanilla``: FFJORD, λ_K = λ_J = 0, adaptive Dormand–Prince (rtol = atol = 1e-5);
* ``rnode``: λ_K = λ_J = 0.01, adaptive Dormand–Prince;
* ``rnode-rk4``: λ = 0.01, fixed-step RK4 with step 0.25 (RNODE's image recipe);
* ``vanilla-rk4``: λ = 0, fixed-step RK4 with step 0.25;

and, as the simulation-free references, ``flow-matching`` (mini-batch OT coupling,
:mod:`otflow.training.flow_matching`) and ``fm+rnode`` (independent-coupling flow matching
for half the budget, then RNODE fine-tuning, ``fit(..., init=flow)``, for the other half). Reported per recipe: the held-out NLL (and its gap
to the true entropy where it is known) at the end, its curve against training time and
iterations (validation every ``eval_every``), the training NFE per iteration (forward; the
backward pass of direct backprop retraces it), evaluation NFE at rtol = atol = 1e-5 with
the exact trace, skipped iterations, the time to reach the common target (the worse of
the vanilla and RNODE final NLLs), and how straight the learned paths are: the ratio
``‖z(T) − x‖² / (T·∫‖v‖² dt)`` (1 for straight constant-speed paths; the integral from a
65-point trajectory) and the learned map's mean transport cost ``‖z(T) − x‖²`` against the
discrete optimal-transport cost between the same standardized points and as many normal
draws (exact assignment, scipy's ``linear_sum_assignment``).

Writes ``rnode_study.json``, ``rnode_study.md`` (the tables) and ``rnode_study.png`` (NLL against time and iterations) under
``--out``. ``--budget`` is each run's ``max_time`` (wall clock, validation included).
Time is training-step time (the sum of each iteration's ``sec``; validation excluded).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

import otflow
from otflow import datasets

#: the recipes compared, as fit options on top of the common ones
RECIPES = {
    "vanilla": dict(objective="rnode", lambda_kinetic=0.0, lambda_jacobian=0.0, method="dopri5"),
    "rnode": dict(objective="rnode", lambda_kinetic=0.01, lambda_jacobian=0.01, method="dopri5"),
    "rnode-rk4": dict(objective="rnode", lambda_kinetic=0.01, lambda_jacobian=0.01, method="rk4", steps=4),
    "vanilla-rk4": dict(objective="rnode", lambda_kinetic=0.0, lambda_jacobian=0.0, method="rk4", steps=4),
    "flow-matching": dict(objective="flow-matching", coupling="ot", eval_every=500),
    "fm+rnode": dict(objective="flow-matching", coupling="independent", eval_every=500),
}
#: recipes trained in two stages: the first half of the budget with the recipe above, the second
#: fine-tuning the result with these options (``fit(..., init=flow)``)
FINE_TUNE = {"fm+rnode": dict(lambda_kinetic=0.01, lambda_jacobian=0.01, method="dopri5")}


def load_data(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Training rows, held-out rows and the true entropy (None when unknown).

    ``digits`` are scikit-learn's 8×8 digits as 64-D vectors, dequantized with uniform
    noise on their 17 levels (a density over R^64; its entropy is unknown)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        x = load_digits().data.astype(np.float64)
        rng = np.random.default_rng(seed)
        x = x + rng.uniform(size=x.shape)
        perm = rng.permutation(len(x))
        return x[perm[300:]], x[perm[:300]], None
    train = datasets.sample(name, n, seed=seed)
    test = datasets.sample(name, 10_000, seed=seed + 1000)
    return train, test, datasets.true_entropy(name)


def path_straightness(flow, x: np.ndarray, n_times: int = 65) -> tuple[float, float]:
    """``(ratio, cost)``: mean ``‖z(T) − x‖² / (ΣT·∫‖v‖² dt)`` and mean ``‖z(T) − x‖²``, in
    the flow's standardized coordinates.

    ``∫‖v‖² dt`` is approximated by ``Σ ‖Δz‖²/Δt`` on ``n_times`` equally spaced times (a
    lower bound that converges as the grid is refined); by Cauchy–Schwarz the ratio is at
    most 1, with equality exactly for straight constant-speed paths.
    """
    total = float(sum(flow.T))
    times = np.linspace(0.0, total, n_times)
    z = np.asarray(flow.with_output("numpy").trajectory(x, times), dtype=np.float64)
    z = z.reshape(n_times, z.shape[1], -1)
    dt = np.diff(times)[:, None]
    energy = np.sum(np.sum(np.diff(z, axis=0) ** 2, axis=2) / dt, axis=0)
    cost = np.sum((z[-1] - z[0]) ** 2, axis=1)
    return float(np.mean(cost / (total * energy))), float(np.mean(cost))


def discrete_ot_cost(x: np.ndarray, seed: int) -> float:
    """Mean squared distance of the optimal assignment of ``x`` to as many normal draws."""
    from scipy.optimize import linear_sum_assignment

    z = np.random.default_rng(seed).standard_normal(x.shape)
    cost = np.sum(x * x, axis=1)[:, None] + np.sum(z * z, axis=1)[None, :] - 2.0 * (x @ z.T)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def run_recipe(recipe: str, train: np.ndarray, test: np.ndarray, entropy, *, backend: str, budget: float,
               seed: int, common: dict, n_transport: int) -> dict:
    """Train one recipe for ``budget`` seconds and measure it."""
    start = time.perf_counter()
    first = budget / 2 if recipe in FINE_TUNE else budget
    flow = otflow.fit(train, backend=backend, seed=seed, max_time=first, quiet=True,
                      **{**common, **RECIPES[recipe]})
    history = list(flow.history)
    if recipe in FINE_TUNE:
        flow = otflow.fit(train, backend=backend, seed=seed + 1, max_time=budget - first, quiet=True, init=flow,
                          **common, **FINE_TUNE[recipe])
        history += flow.history
    wall = time.perf_counter() - start
    step_time = np.cumsum([h["sec"] for h in history])
    curve = [(i + 1, float(step_time[i]), float(h["val_nll"])) for i, h in enumerate(history)
             if h.get("val_nll") is not None]
    logp = np.asarray(flow.log_prob(test), dtype=np.float64)
    eval_nfe = flow.last_nfe
    nll, se = float(-logp.mean()), float(logp.std(ddof=1) / math.sqrt(len(logp)))
    x = test[:n_transport]
    ratio, map_cost = path_straightness(flow, x)
    header = flow.header()
    shift = np.asarray(header["shift"] if header["shift"] is not None else 0.0, dtype=np.float64)
    scale = np.asarray(header["scale"] if header["scale"] is not None else 1.0, dtype=np.float64)
    ot_cost = discrete_ot_cost((x - shift) / scale, seed)
    return {"recipe": recipe, "iterations": len(history), "wall_seconds": wall, "step_seconds": float(step_time[-1]),
            "skipped": int(flow.fit_info["skipped_iterations"]), "test_nll": nll, "test_se": se,
            "kl_gap": None if entropy is None else nll - entropy, "eval_nfe": int(eval_nfe),
            "train_nfe": float(np.mean([h["nfe_forward"] for h in history])), "curve": curve,
            "straightness": ratio, "map_cost": map_cost, "ot_cost": ot_cost}


def time_to_reach(curve: list, target: float) -> float | None:
    """Training time at the first validation whose NLL is at most ``target`` (None: never)."""
    for _, seconds, nll in curve:
        if nll <= target:
            return seconds
    return None


def verdicts(rows: dict) -> list[str]:
    """The paper's three claims, checked on one data set's rows."""
    van, reg = rows["vanilla"], rows["rnode"]
    target = max(_best_nll(van), _best_nll(reg))
    t_van, t_reg = time_to_reach(van["curve"], target), time_to_reach(reg["curve"], target)
    out = [f"target NLL {target:.4f}: vanilla reaches it after {_seconds(t_van)}, RNODE after {_seconds(t_reg)}"]
    if t_reg is not None and t_van is not None and abs(t_reg - t_van) <= 0.1 * max(t_reg, t_van):
        a = "no difference here (within 10 % of the time)"
    elif t_reg is not None and (t_van is None or t_reg < t_van):
        a = "holds here"
    else:
        a = "does not hold here"
    out.append(f"(a) RNODE reaches the same likelihood in less time: {a}")
    rk4, vrk4 = rows["rnode-rk4"], rows["vanilla-rk4"]
    margin = 2.0 * math.hypot(rk4.get("test_se", 0.0), vrk4.get("test_se", 0.0))
    b = vrk4["test_nll"] - rk4["test_nll"] > margin or vrk4["skipped"] > rk4["skipped"]
    out.append(f"(b) RK4 step 0.25: regularized NLL {rk4['test_nll']:.4f} (eval NFE {rk4['eval_nfe']}, "
               f"{rk4['skipped']} skipped), unregularized {vrk4['test_nll']:.4f} (eval NFE {vrk4['eval_nfe']}, "
               f"{vrk4['skipped']} skipped): " + ("holds here (without regularization it degrades beyond two "
                                                 "standard errors or fails)" if b else
                                                 "does not hold here (no degradation beyond two standard "
                                                 "errors, no failures without it)"))
    c = reg["eval_nfe"] < van["eval_nfe"]
    out.append(f"(c) evaluation NFE, RNODE {reg['eval_nfe']} vs vanilla {van['eval_nfe']}: "
               f"{'holds' if c else 'does not hold'} here")
    return out


def _best_nll(row: dict) -> float:
    """The best validation NLL of a run (its test NLL when it was never validated)."""
    return min((c[2] for c in row["curve"]), default=row["test_nll"])


def _seconds(t):
    return "never" if t is None else f"{t:.0f} s"


def markdown_tables(results: dict, notes: dict) -> str:
    """One Markdown table per data set (a row per recipe) with its verdict lines, for the docs."""
    out = []
    for name, rows in results.items():
        out += [f"### {name}", "",
                "| recipe | iterations | step s | test NLL ± SE | KL gap | train NFE | eval NFE | skipped | "
                "straightness | map cost | OT cost |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for recipe, r in rows.items():
            gap = "–" if r["kl_gap"] is None else f"{r['kl_gap']:.4f}"
            out.append(f"| {recipe} | {r['iterations']} | {r['step_seconds']:.0f} | {r['test_nll']:.4f} ± "
                       f"{r['test_se']:.4f} | {gap} | {r['train_nfe']:.0f} | {r['eval_nfe']} | {r['skipped']} | "
                       f"{r['straightness']:.3f} | {r['map_cost']:.3f} | {r['ot_cost']:.3f} |")
        out.append("")
        out += [f"* {line}" for line in notes.get(name, [])]
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for column, (name, rows) in enumerate(results.items()):
        for row_index, (x_index, label) in enumerate(((1, "training time (s)"), (0, "iterations"))):
            ax = axes[row_index, column]
            for recipe, row in rows.items():
                if row["curve"]:
                    ax.plot([c[x_index] for c in row["curve"]], [c[2] for c in row["curve"]], label=recipe,
                            marker=".")
            ax.set_title(name)
            ax.set_xlabel(label)
            ax.set_xscale("log" if x_index == 0 else "linear")
            ax.set_ylabel("validation NLL (nats)")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="jax")
    p.add_argument("--data", nargs="*", default=["8gaussians", "checkerboard", "digits"])
    p.add_argument("--recipes", nargs="*", default=list(RECIPES))
    p.add_argument("--budget", type=float, default=120.0, help="training seconds per recipe")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-transport", type=int, default=2000, help="points for the straightness and OT costs")
    p.add_argument("--out", default="validation/out")
    p.add_argument("--quick", action="store_true", help="tiny budgets and sizes: checks the study runs")
    a = p.parse_args(argv)
    # standardize=True: the study's published runs standardized every data set (fit's default then)
    common = dict(hidden=(64, 64, 64), batch_size=512, eval_every=50, val_points=2000, lr=1e-3, max_iters=10 ** 7,
                  standardize=True)
    if a.quick:
        a.budget, a.n_train, a.n_transport = 3.0, 2000, 100
        common.update(hidden=(16, 16), batch_size=128, eval_every=5, val_points=200)
    results, notes = {}, {}
    for name in a.data:
        train, test, entropy = load_data(name, a.n_train, a.seed)
        rows = {}
        for recipe in a.recipes:
            rows[recipe] = r = run_recipe(recipe, train, test, entropy, backend=a.backend, budget=a.budget,
                                          seed=a.seed, common=common, n_transport=a.n_transport)
            gap = "" if r["kl_gap"] is None else f" KL gap {r['kl_gap']:.4f}"
            print(f"{name:12s} {recipe:13s} {r['iterations']:6d} it {r['step_seconds']:6.0f} s  test NLL "
                  f"{r['test_nll']:.4f} ± {r['test_se']:.4f}{gap}  train NFE {r['train_nfe']:.0f}  eval NFE "
                  f"{r['eval_nfe']}  skipped {r['skipped']}  straightness {r['straightness']:.3f}  map cost "
                  f"{r['map_cost']:.3f} vs OT {r['ot_cost']:.3f}", flush=True)
        results[name] = rows
        if all(k in rows for k in ("vanilla", "rnode", "rnode-rk4", "vanilla-rk4")):
            notes[name] = verdicts(rows)
            for line in notes[name]:
                print(f"  {line}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rnode_study.json").write_text(json.dumps({"backend": a.backend, "budget": a.budget, "results": results,
                                                      "verdicts": notes}, indent=1))
    (out / "rnode_study.md").write_text(markdown_tables(results, notes))
    plot(results, out / "rnode_study.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
