"""Side-by-side timing of otflow against the anchors (torchdiffeq, diffrax) on identical work.

Runs each implementation as a fresh subprocess, alternating them within every
repeat (these shared machines drift), and prints the ratio table of medians::

    python benchmarks/side_by_side.py                      # every row, 2 repeats
    python benchmarks/side_by_side.py --cases 2d-dopri5 --repeats 3 --iters 20
    python benchmarks/side_by_side.py --threads 1 --json out.json

Rows are the anchors README's cases, ``8x8-images`` (otflow only: the anchors have no
image model; torch against JAX on RNODE's image recipe) and ``64d-rk4-2dev`` (otflow only:
the ``64d-rk4`` step data-parallel over 2 torch ranks or 2 JAX host devices); the ratio columns are otflow-torch/torchdiffeq,
otflow-jax/diffrax and best-otflow/best-anchor (targets: ≤ 1.0, ≤ 1.0, ≤ 0.8).
``--impls ... bare-torch bare-jax`` adds the bare chains (``bare_chain.py``: each row's field
evaluations with no solver around them, in the anchors' own field code) and a second table of
the best anchor and the best otflow against them; ``bare-jax-recompute`` is JAX's chain with
every evaluation recomputed in the backward pass (the checkpointed loops' schedule; training
rows only).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"

CASES = {
    "2d-dopri5": ["--solver", "dopri5", "--grad", "direct"],
    "2d-dopri5-adjoint": ["--solver", "dopri5", "--grad", "adjoint"],
    "2d-rk4": ["--solver", "rk4", "--grad", "direct"],
    "64d-rk4": ["--data", "mixture", "--dim", "64", "--width", "256", "--batch", "256", "--solver", "rk4"],
    "64d-dopri5": ["--data", "mixture", "--dim", "64", "--width", "256", "--batch", "256", "--solver", "dopri5"],
    "2d-eval": ["--solver", "dopri5", "--iters", "5", "--warmup", "2", "--eval-points", "10000"],
}

#: rows only otflow runs (the anchors have no image model): the digits as 8×8 images,
#: RNODE's recipe (RK4 × 4, widths 64, two blocks per scale) at batch 64
OTFLOW_ONLY_CASES = {
    "8x8-images": ["--data", "digits-images", "--batch", "64", "--widths", "64", "64", "64"],
}

#: data-parallel rows (otflow only: the anchors train on one device): the ``64d-rk4`` case
#: with its global batch of 256 split over 2 torch ranks (gloo, one thread each) or a mesh of
#: 2 JAX host devices, through ``benchmarks/distributed.py`` (``fit``'s trainer); compare
#: with the one-device ``64d-rk4`` row
DATA_PARALLEL_CASES = {"64d-rk4-2dev": 2}

IMPLS = {
    "torchdiffeq": lambda anchors: [str(anchors / "torchdiffeq_rnode.py")],
    "otflow-torch": lambda anchors: [str(HERE / "otflow_rnode.py"), "--backend", "torch", "--anchors", str(anchors)],
    "diffrax": lambda anchors: [str(anchors / "diffrax_rnode.py")],
    "otflow-jax": lambda anchors: [str(HERE / "otflow_rnode.py"), "--backend", "jax", "--anchors", str(anchors)],
    "bare-torch": lambda anchors: [str(HERE / "bare_chain.py"), "--backend", "torch", "--anchors", str(anchors)],
    "bare-jax": lambda anchors: [str(HERE / "bare_chain.py"), "--backend", "jax", "--anchors", str(anchors)],
    "bare-jax-recompute": lambda anchors: [str(HERE / "bare_chain.py"), "--backend", "jax", "--recompute",
                                           "--anchors", str(anchors)],
}
#: the four implementations the table compares; the bare chains (``benchmarks/bare_chain.py``: the
#: row's field evaluations chained by Euler steps and backpropagated plainly, the anchors' own
#: field code; what the row's arithmetic costs with no solver, not a lower bound) run when named
#: in ``--impls``
COMPARED = ["torchdiffeq", "otflow-torch", "diffrax", "otflow-jax"]

#: the bare chains' evaluations per solve: the fewest forward NFE any implementation used on the row
#: (2-D dopri5 19 by diffrax, 64-D dopri5 22.8 by torchdiffeq, rounded up; RK4 × 4 is 16); the
#: adjoint rows have none (their backward pass is another solve)
BARE_NFE = {"2d-dopri5": 19, "2d-rk4": 16, "64d-rk4": 16, "64d-dopri5": 23, "2d-eval": 19}


def run_one(impl, args, anchors, timeout, case=None):
    if case in DATA_PARALLEL_CASES:
        return _data_parallel(impl, DATA_PARALLEL_CASES[case], args, timeout)
    if case in OTFLOW_ONLY_CASES:
        if not impl.startswith("otflow"):
            return {"error": "no anchor for this case"}
        script, rest = str(HERE / "images_cpu.py"), ["--step-worker", impl.split("-", 1)[1]]
    elif impl.startswith("bare") and case not in BARE_NFE:
        return {"error": "no bare chain for this case"}
    elif impl == "bare-jax-recompute" and case.endswith("eval"):
        return {"error": "evaluation has no backward pass to recompute"}
    else:
        script, *rest = IMPLS[impl](anchors)
        if impl.startswith("bare"):
            rest += ["--nfe", str(BARE_NFE[case])]
    device = os.environ.get("OTFLOW_BENCH_TORCH_DEVICE")
    if device and impl in ("torchdiffeq", "otflow-torch"):
        # torch's default device for every tensor the script creates (the anchors take no device option)
        shim = (f"import sys, runpy, torch; torch.set_default_device({device!r}); sys.argv = sys.argv[1:]; "
                "runpy.run_path(sys.argv[0], run_name='__main__')")
        cmd = [sys.executable, "-c", shim, script, *rest, *args]
    else:
        cmd = [sys.executable, script, *rest, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _data_parallel(impl, n, args, timeout):
    """One data-parallel configuration through ``distributed.py``: its step time as the row's figure."""
    if not impl.startswith("otflow"):
        return {"error": "no anchor for this case"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "records.json")
        cmd = [sys.executable, str(HERE / "distributed.py"), "--backends", impl.split("-", 1)[1], "--n", str(n),
               "--parallel-only", "--threads", "1", "--json", path, *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0 or not os.path.exists(path):
            return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
        rec = json.loads(Path(path).read_text())[0]
    if "error" in rec:
        return rec
    return {**rec, "sec_per_iter_median": rec["step_sec_median"], "nfe_forward_mean": None}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    every = list(CASES) + list(OTFLOW_ONLY_CASES) + list(DATA_PARALLEL_CASES)
    p.add_argument("--cases", nargs="*", default=every, choices=every)
    p.add_argument("--impls", nargs="*", default=COMPARED, choices=list(IMPLS),
                   help="implementations to run (default: the four compared; add bare-torch bare-jax for the bare chains)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--iters", type=int, default=None, help="timed iterations per run (anchors' default 40)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both torch sides (0: default)")
    p.add_argument("--anchors", default=str(ANCHORS))
    p.add_argument("--timeout", type=int, default=900)
    p.add_argument("--json", default=None, help="write every run's record here")
    a = p.parse_args(argv)
    anchors = Path(a.anchors)
    records = {}
    for case in a.cases:
        args = list(CASES[case] if case in CASES else OTFLOW_ONLY_CASES.get(case, []))
        impls = [i for i in a.impls if (case in CASES and (not i.startswith("bare") or case in BARE_NFE)
                                        and not (i == "bare-jax-recompute" and case.endswith("eval")))
                 or i.startswith("otflow")]
        if a.iters is not None and "--iters" not in args:
            args += ["--iters", str(a.iters)]
        if a.warmup is not None and "--warmup" not in args:
            args += ["--warmup", str(a.warmup)]
        if a.threads and case in CASES:
            args += ["--threads", str(a.threads)]
        for rep in range(a.repeats):
            order = impls if rep % 2 == 0 else list(reversed(impls))
            for impl in order:
                rec = run_one(impl, args, anchors, a.timeout, case)
                records.setdefault(case, {}).setdefault(impl, []).append(rec)
                key = _time_key(case)
                print(f"{case:18s} {impl:13s} rep {rep}: {rec.get(key, rec.get('error'))}  "
                      f"nfe {rec.get('eval_nfe' if case.endswith('eval') else 'nfe_forward_mean')}", flush=True)
    print()
    print("| case | torchdiffeq | otflow-torch | diffrax | otflow-jax | torch ratio | jax ratio | best ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for case, per in records.items():
        med = _medians(case, per)

        def fmt(v):
            return "—" if v is None else f"{v:.4f}"

        def ratio(x, y):
            return "—" if x is None or y is None else f"{x / y:.2f}"

        anchors_best = min([v for k, v in med.items() if k in ("torchdiffeq", "diffrax") and v], default=None)
        ours_best = min([v for k, v in med.items() if k.startswith("otflow") and v], default=None)
        print(f"| {case} | {fmt(med.get('torchdiffeq'))} | {fmt(med.get('otflow-torch'))} | {fmt(med.get('diffrax'))} "
              f"| {fmt(med.get('otflow-jax'))} | {ratio(med.get('otflow-torch'), med.get('torchdiffeq'))} "
              f"| {ratio(med.get('otflow-jax'), med.get('diffrax'))} | {ratio(ours_best, anchors_best)} |")
    if any(i.startswith("bare") for i in a.impls):
        _bare_table(records)
    if a.json:
        Path(a.json).write_text(json.dumps(records, indent=1))


def _time_key(case: str) -> str:
    """The record's figure for a case: seconds per evaluation call or per training iteration."""
    return "eval_sec_median" if case.endswith("eval") else "sec_per_iter_median"


def _medians(case: str, per: dict) -> dict:
    """``{impl: median of its runs' figure}`` (None for an implementation whose runs all failed)."""
    key = _time_key(case)
    out = {}
    for impl, recs in per.items():
        vals = [r[key] for r in recs if key in r]
        out[impl] = statistics.median(vals) if vals else None
    return out


def _bare_table(records) -> None:
    """The bare chains against the best anchor and the best otflow backend (medians)."""
    print()
    print("| case | bare-torch | bare-jax | bare-jax-recompute | best anchor / best bare | best otflow / best bare |")
    print("|---|---|---|---|---|---|")
    for case, per in records.items():
        med = {k: v for k, v in _medians(case, per).items() if v is not None}
        bare = min([v for k, v in med.items() if k.startswith("bare")], default=None)
        if bare is None:
            continue
        anchor = min([v for k, v in med.items() if k in ("torchdiffeq", "diffrax")], default=None)
        ours = min([v for k, v in med.items() if k.startswith("otflow")], default=None)
        cells = [f"{med[k]:.4f}" if k in med else "—" for k in ("bare-torch", "bare-jax", "bare-jax-recompute")]
        cells += ["—" if v is None else f"{v / bare:.2f}" for v in (anchor, ours)]
        print(f"| {case} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
