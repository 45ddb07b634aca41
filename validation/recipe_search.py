"""Search for the default recipe of :func:`otflow.fit` on the 2-D toys (issue 13).

    python -m validation.recipe_search --data checkerboard --budget 120 \
        --recipe '{"objective": "flow-matching", "hidden": [256, 256, 256]}' \
        [--finetune '{"max_iters": 300}'] [--log benchmarks/results-2026-11-29-recipe.txt]

Runs ``otflow.fit(data, **recipe)`` (``max_time`` is the budget unless the recipe sets it),
optionally followed by a fine-tuning run ``fit(data, init=flow, **finetune)``, then measures
the KL gap on fresh held-out draws: the exact-trace test NLL (Dormand–Prince 1e-5) of
``--n-test`` points of a seed the training never saw, minus the data's true entropy
(:func:`otflow.datasets.true_entropy`). Appends one line (recipe, budget, iterations,
wall seconds, KL gap ± SE, evaluation NFE) to the log. Pin it to one core for rankings:
``OMP_NUM_THREADS=1 XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 1 python -m ...``.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

import otflow
from otflow import datasets


def kl_gap(flow, name: str, n_test: int, seed: int) -> tuple[float, float, int]:
    """``(gap, standard error, evaluation NFE)`` of ``flow`` on ``n_test`` fresh draws of ``name``."""
    x = datasets.sample(name, n_test, seed=seed)
    logp = np.asarray(flow.log_prob(x), dtype=np.float64)
    return float(-logp.mean() - datasets.true_entropy(name)), float(logp.std(ddof=1) / math.sqrt(n_test)), \
        int(flow.last_nfe)


def _options(text: str | None) -> dict:
    options = json.loads(text) if text else {}
    if "hidden" in options:
        options["hidden"] = tuple(options["hidden"])
    return options


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="checkerboard")
    p.add_argument("--backend", default=None)
    p.add_argument("--budget", type=float, default=120.0, help="max_time of the (first) run, seconds")
    p.add_argument("--recipe", default=None, help="fit options as JSON")
    p.add_argument("--finetune", default=None, help="options of a fine-tuning fit(init=flow) as JSON")
    p.add_argument("--n-test", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default="benchmarks/results-2026-11-29-recipe.txt")
    p.add_argument("--label", default="")
    p.add_argument("--save", default=None, help="save the first run's flow here")
    p.add_argument("--start", default=None, help="skip the first run: fine-tune this saved flow")
    p.add_argument("--fm-time-power", type=float, default=None,
                   help="flow matching's path times s = u**P: the recipe's flow_matching_time_power (the name "
                        "the session-2 log lines use)")
    a = p.parse_args(argv)
    recipe = _options(a.recipe)
    if a.fm_time_power is not None:
        recipe["flow_matching_time_power"] = a.fm_time_power
    recipe.setdefault("max_time", a.budget)
    start = time.perf_counter()
    if a.start:
        flow = otflow.load(a.start, backend=a.backend)
        iters, step_s, recipe = 0, 0.0, {"start": a.start}
    else:
        flow = otflow.fit(a.data, backend=a.backend, seed=a.seed, quiet=True, **recipe)
        iters = len(flow.history)
        step_s = sum(h["sec"] for h in flow.history)
        if a.save:
            flow.save(a.save)
    if a.finetune:
        flow = otflow.fit(a.data, backend=a.backend, seed=a.seed + 1, quiet=True, init=flow, **_options(a.finetune))
        iters = f"{iters}+{len(flow.history)}"
    wall = time.perf_counter() - start
    gap, se, nfe = kl_gap(flow, a.data, a.n_test, a.seed + 12345)
    line = (f"{a.label or '-'} | {a.data} | backend {a.backend or 'default'} | recipe {json.dumps(recipe)} | "
            f"finetune {a.finetune or '-'} | iterations {iters} | wall {wall:.0f} s (first run's steps {step_s:.0f} s) | KL {gap:.4f} ± {se:.4f} | "
            f"eval NFE {nfe}")
    print(line, flush=True)
    with open(a.log, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
