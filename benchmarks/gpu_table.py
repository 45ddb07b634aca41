"""The performance table at GPU scale, for a lent GPU machine (one H200): under 3 minutes.

Runs the side-by-side comparison (benchmarks/side_by_side.py) at batch 10 000 in 2-D and
64-D, and a 784-dimensional MNIST-sized case, with few iterations per run::

    python benchmarks/gpu_table.py --device cuda            # on the GPU machine (torch sides on CUDA)
    python benchmarks/gpu_table.py --dry-run                # tiny sizes on the CPU, to check it runs

The GPU image has torch, jax, torchdiffeq and diffrax but not array-api-compat: carry
its wheel (``pip download array-api-compat -d wheels/``) and install it first
(``pip install --no-index wheels/*.whl``). JAX uses the GPU by default; the torch sides
(anchor and otflow) run with ``torch.set_default_device`` set from ``--device`` (the
environment variable ``OTFLOW_BENCH_TORCH_DEVICE`` that side_by_side.py reads).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import side_by_side  # noqa: E402

GPU_CASES = {
    "2d-dopri5-10k": ["--solver", "dopri5", "--batch", "10000"],
    "2d-rk4-10k": ["--solver", "rk4", "--batch", "10000"],
    "64d-rk4-10k": ["--data", "mixture", "--dim", "64", "--width", "256", "--batch", "10000", "--solver", "rk4"],
    "784d-rk4": ["--data", "mixture", "--dim", "784", "--width", "1024", "--batch", "1000", "--solver", "rk4"],
}
DRY = {"--batch": "64", "--width": "32", "--dim": "8"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    p.add_argument("--device", default=None, help="torch device for both torch sides, e.g. cuda")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--anchors", default=str(side_by_side.ANCHORS))
    a = p.parse_args(argv)
    cases = {}
    for name, args in GPU_CASES.items():
        args = list(args)
        if a.dry_run:
            for i, tok in enumerate(args[:-1]):
                if tok in DRY:
                    args[i + 1] = DRY[tok]
        cases[name] = args
    side_by_side.CASES.update(cases)
    if a.device:
        os.environ["OTFLOW_BENCH_TORCH_DEVICE"] = a.device
    start = time.perf_counter()
    side_by_side.main(["--cases", *cases, "--repeats", "1", "--iters", str(a.iters), "--warmup", str(a.warmup),
                       "--anchors", a.anchors])
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
