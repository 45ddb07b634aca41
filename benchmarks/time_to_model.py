"""Time to a good model: otflow's default ``fit`` against the anchor scripts, on the same data.

    python benchmarks/time_to_model.py --data 8gaussians --budget 300 --target-kl 0.05 0.1
    python benchmarks/time_to_model.py --data checkerboard --budget 600 --impls otflow-jax diffrax

Writes one ``.npz`` of ``train`` rows (``--n-train`` draws) and ``test`` rows (``--n-test``
fresh draws of another seed), and trains on it, each implementation in a fresh process
pinned to its own CPU core with one thread (``--parallel 2`` runs two at once on a
two-core machine; nothing else may run meanwhile):

* ``otflow-torch``/``otflow-jax``: ``otflow.fit(train)`` with every default (the user's
  figure: validation, host reads and compilation included), capped at ``--budget``
  seconds; its held-out estimate over time is the validation NLL of its ``history``
  against the run's wall time (``elapsed``);
* ``torchdiffeq``/``diffrax``: the anchor scripts (``shared/anchors``: RNODE, Dormand–Prince
  1e-5, λ = 0.01, width 64) with ``--data file`` for as many iterations as fit in the
  budget (from their README's seconds per iteration), killed at 1.5× the budget otherwise;
  their estimate over time is the training NLL of fresh batches (``--trace``) against the
  sum of their step times (their loop's own overhead is not counted), averaged
  over a sliding window of ``--window`` iterations (the batches are rows of the same
  50 000-row set, drawn afresh, so this tracks the held-out NLL of these low-dimensional
  models).

Reported per implementation: the first time its estimate reaches each target
(``entropy + KL``), and the exact-trace test NLL at the end (Dormand–Prince 1e-5 on the
``test`` rows: otflow's ``log_prob``; the anchors' own ``--eval-points``) minus the true
entropy. Prints a Markdown table; ``--json`` keeps the curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"
ANCHOR_SCRIPTS = {"torchdiffeq": "torchdiffeq_rnode.py", "diffrax": "diffrax_rnode.py"}
#: seconds per iteration of the anchors' default problem on one core (their README gives 0.11 and 0.07 on 2 cores):
#: the iterations asked for are budget / this, the run is killed at the budget otherwise
ANCHOR_SECONDS_PER_ITER = {"torchdiffeq": 0.15, "diffrax": 0.09}

#: otflow variants besides the default ``fit``: RNODE alone with its own defaults (trained until
#: the budget ends: ``max_iters`` out of the way), and flow matching alone with the two-stage
#: recipe's flow-matching stage (validated ten times). ``"recipe": True`` takes the field and the
#: path times from ``otflow.training.stages.TWO_STAGE_DEFAULTS``, and a string value names the
#: ``FitOptions`` default to use, so the variant follows the recipe when it changes.
VARIANTS = {
    "": {},
    "rnode": {"objective": "rnode", "max_iters": 10 ** 7},
    "flow-matching": {"objective": "flow-matching", "recipe": True, "schedule": "cosine",
                      "max_iters": "flow_matching_iters", "batch_size": "flow_matching_batch_size",
                      "lr": "flow_matching_lr", "eval_every": 0.1},
}

_OTFLOW_RUN = """
import json, sys, time, numpy as np, otflow
from otflow import FitOptions
path, backend, budget, history, out, variant = sys.argv[1:7]
options = json.loads(variant)
if options.pop("recipe", False):  # the field and path times of the default's flow-matching stage
    from otflow.training.stages import TWO_STAGE_DEFAULTS
    options.update({k: TWO_STAGE_DEFAULTS[k] for k in ("hidden", "activation", "conditioning",
                                                       "flow_matching_time_power")})
defaults = FitOptions()
for name, value in list(options.items()):
    if isinstance(value, str) and hasattr(defaults, value):
        options[name] = getattr(defaults, value)  # the two-stage recipe's own flow-matching settings
if options.get("eval_every") == 0.1:
    options["eval_every"] = max(1, options["max_iters"] // 10)
if "hidden" in options:
    options["hidden"] = tuple(options["hidden"])
with np.load(path) as f:
    train, test = f["train"], f["test"]
t0 = time.perf_counter()
flow = otflow.fit(train, backend=backend, max_time=float(budget), history=history, quiet=True, **options)
seconds = time.perf_counter() - t0
logp = np.asarray(flow.log_prob(test), dtype=np.float64)
json.dump({"seconds": seconds, "test_nll": float(-logp.mean()), "test_se": float(logp.std(ddof=1) / len(logp) ** 0.5),
           "eval_nfe": int(flow.last_nfe), "iterations": flow.fit_info["iterations"],
           "options": {k: flow.fit_info["options"][k] for k in ("objective", "method", "steps", "hidden",
                                                               "flow_matching_iters", "max_iters")}},
          open(out, "w"))
"""


def _environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    env.setdefault("PYTHONWARNINGS", "ignore")
    return env


def _command(impl: str, data_file: str, budget: float, work: Path) -> tuple[list[str], dict]:
    if impl.startswith("otflow"):
        backend, _, variant = impl.split("-", 1)[1].partition(":")
        files = {"history": work / f"{impl}.history.jsonl", "result": work / f"{impl}.json"}
        return [sys.executable, "-c", _OTFLOW_RUN, data_file, backend, str(budget), str(files["history"]),
                str(files["result"]), json.dumps(VARIANTS[variant])], files
    files = {"trace": work / f"{impl}.trace.jsonl", "stdout": work / f"{impl}.out"}
    iters = max(10, int(budget / ANCHOR_SECONDS_PER_ITER[impl]))
    return [sys.executable, str(ANCHORS / ANCHOR_SCRIPTS[impl]), "--data", "file", "--data-file", data_file,
            "--iters", str(iters), "--warmup", "0", "--threads", "1", "--trace", str(files["trace"]),
            "--eval-points", "20000"], files


def _curve(impl: str, files: dict, window: int) -> list[tuple[float, float]]:
    """``(seconds, held-out NLL estimate)`` over the run."""
    if impl.startswith("otflow"):
        records = [json.loads(line) for line in open(files["history"])] if files["history"].exists() else []
        return [(float(r["elapsed"]), float(r["val_nll"])) for r in records if "val_nll" in r]
    records = [json.loads(line) for line in open(files["trace"])] if files["trace"].exists() else []
    seconds = np.cumsum([r["sec"] for r in records])  # the steps' own time: the anchors' loop overhead is not counted
    return [(float(seconds[k - 1]), float(np.mean([r["nll"] for r in records[k - window:k]])))
            for k in range(window, len(records) + 1, max(1, window // 5))]


def _final(impl: str, files: dict, entropy: float) -> dict:
    if impl.startswith("otflow"):
        if not files["result"].exists():
            return {}
        r = json.load(open(files["result"]))
        return {"final_kl": r["test_nll"] - entropy, "final_se": r["test_se"], "eval_nfe": r["eval_nfe"],
                "iterations": r["iterations"], "options": r["options"]}
    lines = [line for line in open(files["stdout"]).read().splitlines() if line.startswith("{")] \
        if files["stdout"].exists() else []
    if not lines:
        return {}
    r = json.loads(lines[-1])
    return {"final_kl": r["eval_nll"] - entropy, "eval_nfe": r.get("eval_nfe"), "iterations": r["iters"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="8gaussians", choices=["8gaussians", "checkerboard", "digits"])
    p.add_argument("--budget", type=float, default=300.0, help="seconds per implementation")
    otflow_impls = [f"otflow-{b}{':' + v if v else ''}" for b in ("jax", "torch") for v in VARIANTS]
    p.add_argument("--impls", nargs="*", default=["otflow-jax", "diffrax", "otflow-torch", "torchdiffeq"],
                   choices=[*otflow_impls, "diffrax", "torchdiffeq"],
                   help="otflow-B is the default fit on backend B; otflow-B:rnode RNODE alone; "
                   "otflow-B:flow-matching the recipe's flow-matching stage alone")
    p.add_argument("--target-kl", type=float, nargs="*", default=[0.1, 0.05],
                   help="KL gaps (data of known entropy) or, for digits, test NLLs in nats")
    p.add_argument("--plot", default=None, help="write the curves (held-out estimate against seconds) here")
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--window", type=int, default=50, help="anchor iterations averaged for their estimate")
    p.add_argument("--parallel", type=int, default=2, help="runs at once, each pinned to its own core")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    from otflow import datasets

    work = Path(tempfile.mkdtemp(prefix="otflow-ttm-"))
    data_file = str(work / f"{a.data}.npz")
    if a.data == "digits":
        train, test = _digits()
        entropy = 0.0  # unknown: the "KL" columns are test NLLs
    else:
        entropy = datasets.true_entropy(a.data)
        train, test = datasets.sample(a.data, a.n_train, seed=0), datasets.sample(a.data, a.n_test, seed=12345)
    np.savez(data_file, train=train.astype(np.float32), test=test.astype(np.float32))
    cores = sorted(os.sched_getaffinity(0))
    pending, running, files = list(a.impls), {}, {}
    while pending or running:
        while pending and len(running) < min(a.parallel, len(cores)):
            impl = pending.pop(0)
            core = next(c for c in cores if c not in {c for _, c, _ in running.values()})
            cmd, files[impl] = _command(impl, data_file, a.budget, work)
            out = open(work / f"{impl}.out", "w")
            proc = subprocess.Popen(["taskset", "-c", str(core), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env=_environment())
            running[impl] = (proc, core, time.perf_counter())
            print(f"# {impl} started on core {core}", flush=True)
        time.sleep(1.0)
        for impl, (proc, core, started) in list(running.items()):
            # otflow stops itself at the budget (then evaluates); an anchor gets 1.5× it plus its evaluation
            limit = a.budget * 1.5 + 120
            if proc.poll() is None and time.perf_counter() - started > limit:
                proc.kill()
            if proc.poll() is not None:
                del running[impl]
                print(f"# {impl} done after {time.perf_counter() - started:.0f} s (rc {proc.returncode})", flush=True)
    rows, curves = [], {}
    for impl in a.impls:
        curve = _curve(impl, files[impl], a.window)
        curves[impl] = curve
        reach = []
        for kl in a.target_kl:
            hit = next((t for t, nll in curve if nll - entropy <= kl), None)
            reach.append("not in budget" if hit is None else f"{hit:.0f} s")
        final = _final(impl, files[impl], entropy)
        kl_text = "–" if "final_kl" not in final else (
            f"{final['final_kl']:.3f}" + (f" ± {final['final_se']:.3f}" if "final_se" in final else ""))
        rows.append([impl, *reach, kl_text, str(final.get("eval_nfe", "–")), str(final.get("iterations", "–"))])
    what = "NLL" if a.data == "digits" else "KL"
    header = ["implementation", *[f"time to {what} ≤ {kl:g}" for kl in a.target_kl], f"test {what} at the end",
              "eval NFE", "iterations"]
    print(f"\n{a.data}, budget {a.budget:.0f} s per implementation, one core each"
          + ("" if a.data == "digits" else f", entropy {entropy:.4f}") + "\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if a.json:
        json.dump({"data": a.data, "budget": a.budget, "rows": rows, "curves": curves}, open(a.json, "w"))
    if a.plot:
        _plot(curves, entropy, what, a.data, a.plot)
    return 0


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8×8 digits as 64-D vectors, dequantized with uniform noise on their 17
    levels; 300 held-out rows (the RNODE study's split)."""
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float64)
    rng = np.random.default_rng(0)
    x = x + rng.uniform(size=x.shape)
    perm = rng.permutation(len(x))
    return x[perm[300:]], x[perm[:300]]


def _plot(curves: dict, entropy: float, what: str, data: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for impl, curve in curves.items():
        if curve:
            t, v = zip(*curve)
            ax.plot(t, np.asarray(v) - entropy, marker="." if len(t) < 40 else None, label=impl)
    ax.set_xlabel("seconds (one CPU core)")
    ax.set_ylabel("held-out NLL (nats)" if what == "NLL" else "KL gap (nats)")
    ax.set_title(f"{data}: held-out estimate against wall time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
