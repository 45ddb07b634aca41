"""KL gaps of fitted flows on the 2-D toys whose density is known (checkerboard, 8gaussians).

    python -m validation.toy_kl [--backends torch jax] [--data checkerboard 8gaussians] [--iters 2000]

For each backend and data set: ``otflow.fit`` with the defaults (``objective="auto"``: flow
matching, then RNODE fine-tuning for ``--iters`` iterations), then the test NLL on fresh
points with the exact trace and Dormand–Prince 1e-5, minus the true entropy, with its
standard error, and the wall time. Writes ``validation/out/toy_kl.json``.
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


def run(backend: str, name: str, iters: int, n_test: int, seed: int, **options) -> dict:
    start = time.perf_counter()
    flow = otflow.fit(name, backend=backend, max_iters=iters, seed=seed, quiet=True, **options)
    train_s = time.perf_counter() - start
    x = datasets.sample(name, n_test, seed=seed + 1000)
    t0 = time.perf_counter()
    logp = np.asarray(flow.log_prob(x), dtype=np.float64)
    eval_s = time.perf_counter() - t0
    nll, se = -logp.mean(), logp.std(ddof=1) / math.sqrt(n_test)
    ent = datasets.true_entropy(name)
    return {"backend": backend, "data": name, "iters": iters, "train_seconds": train_s,
            "sec_per_iter": sum(h["sec"] for h in flow.history) / len(flow.history),
            "test_nll": nll, "se": se, "entropy": ent, "kl_gap": nll - ent, "eval_seconds": eval_s,
            "eval_nfe": flow.last_nfe, "mean_train_nfe": float(np.mean([h["nfe_forward"] for h in flow.history]))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="*", default=["torch", "jax"])
    p.add_argument("--data", nargs="*", default=["checkerboard", "8gaussians"])
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="validation/out")
    a = p.parse_args(argv)
    rows = []
    print("| data | backend | iterations | train s | s/it | train NFE | test NLL | KL gap ± SE | eval NFE |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in a.data:
        for backend in a.backends:
            r = run(backend, name, a.iters, a.n_test, a.seed, lr=a.lr)
            rows.append(r)
            print(f"| {name} | {backend} | {a.iters} | {r['train_seconds']:.0f} | {r['sec_per_iter']:.3f} | "
                  f"{r['mean_train_nfe']:.1f} | {r['test_nll']:.4f} | {r['kl_gap']:.4f} ± {r['se']:.4f} | "
                  f"{r['eval_nfe']} |", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "toy_kl.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
