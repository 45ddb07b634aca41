"""Peak memory of one training iteration as the number of solver steps grows, otflow against the anchors.

The 64-D case of the anchors (``--data mixture --dim 64 --width 256 --batch 256``, RNODE
loss, RK4 with ``--steps`` fixed steps over T = 1) for

* otflow torch: ``direct``, ``adjoint``;
* otflow JAX: ``direct``, ``adjoint``, ``checkpointed`` (direct through the checkpointed loop);
* torchdiffeq (``direct``, ``adjoint``) and diffrax (``direct`` = RecursiveCheckpointAdjoint,
  ``adjoint`` = BacksolveAdjoint), the scripts of ``../shared/anchors``;

each in a fresh process, which trains ``--iters`` iterations after one warm-up. The number
is the process's peak resident set (``ru_maxrss``: the same counter for every
implementation, framework and compilation included; the anchors' from ``os.wait4``,
otflow's read by the worker after its iterations); otflow's JAX rows also give XLA's
compiled scratch memory of the gradient (``memory_analysis().temp_size_in_bytes``,
compiled after the peak was read).
With ``--images`` the multiscale image model (batch 200 by default) runs through
``benchmarks/images_cpu.py --memory`` for otflow's modes. One command::

    python benchmarks/memory.py                           # steps 8 32 128, the 64-D case
    python benchmarks/memory.py --steps 8 --dim 8 --width 16 --batch 16 --images --image-batch 8 --image-widths 8
    python benchmarks/memory.py --json out.json

The ratio columns divide otflow's peak by the anchor's in the same mode (direct: diffrax's
RecursiveCheckpointAdjoint; otflow JAX checkpointed is also put against it). Seconds per
iteration are printed too, as a rough guide only: run the whole table on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"

#: (implementation, mode): how each row runs
ROWS = [("otflow-torch", "direct"), ("otflow-torch", "adjoint"), ("torchdiffeq", "direct"), ("torchdiffeq", "adjoint"),
        ("otflow-jax", "direct"), ("otflow-jax", "checkpointed"), ("otflow-jax", "adjoint"), ("diffrax", "direct"),
        ("diffrax", "adjoint")]

#: the anchor each otflow row is divided by
ANCHOR_OF = {("otflow-torch", "direct"): ("torchdiffeq", "direct"),
             ("otflow-torch", "adjoint"): ("torchdiffeq", "adjoint"),
             ("otflow-jax", "direct"): ("diffrax", "direct"),
             ("otflow-jax", "checkpointed"): ("diffrax", "direct"),
             ("otflow-jax", "adjoint"): ("diffrax", "adjoint")}


def worker(backend_name: str, mode: str, a) -> dict:
    """One otflow run of the anchors' reference problem in this process (the otflow rows)."""
    sys.path.insert(0, str(Path(a.anchors)))
    import common  # the anchors' data and problem definition

    import numpy as np

    import otflow
    from otflow import MLP, OptimizerSpec, rnode_loss
    from otflow.training import make_trainer

    if a.threads and backend_name == "torch":
        import torch

        torch.set_num_threads(a.threads)
    b = otflow.get_backend(backend_name)
    xp = b.namespace()
    field = MLP((a.dim,), hidden=(a.width,) * 3, zero_last=False)
    params = field.init(b, b.key(0), dtype=xp.float32)
    solver = dict(method="rk4", n_steps=a.steps, gradient="adjoint" if mode == "adjoint" else "direct")
    if mode == "checkpointed":
        solver["loop_kind"] = "checkpointed"

    def loss_fn(p, x, key):
        eps = b.normal(key, tuple(x.shape), dtype=x.dtype)
        out = rnode_loss([field], [p], x, eps, T=[1.0], backend=b, lambda_kinetic=0.01, lambda_jacobian=0.01,
                         solver_kwargs=solver)
        return out.loss, {"nll": out.nll, "nfe": out.nfe, "status": out.status}

    trainer = make_trainer(loss_fn, params, OptimizerSpec(lr=1e-3), backend=b)
    rng = np.random.default_rng(0)
    out = {}
    secs = []
    for it in range(1 + a.iters):
        x = b.asarray(common.sample("mixture", a.batch, a.dim, rng, None))
        t0 = time.perf_counter()
        m = trainer.step(x, b.key(it), 1e-3)
        float(b.to_numpy(m["loss"]))
        if it:
            secs.append(time.perf_counter() - t0)
    out["sec_per_iter"] = sorted(secs)[len(secs) // 2]
    # the peak of the training iterations alone (the compilation below would add its own)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if backend_name == "jax":
        import jax

        grad = jax.jit(jax.grad(lambda p, x, k: loss_fn(p, x, k)[0]))
        out["xla_temp_bytes"] = int(grad.lower(params, x, b.key(0)).compile().memory_analysis().temp_size_in_bytes)
    return out


def _run(cmd, timeout) -> dict:
    """Run ``cmd``; its last JSON line of output plus its peak resident set (``os.wait4``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        started = time.monotonic()
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - started > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                return {"error": f"timed out after {timeout} s"}
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode != 0:
        return {"error": (errors.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    record = json.loads(text.strip().splitlines()[-1])
    # otflow's workers report the peak before their extra compilation (XLA's analysis)
    record.setdefault("peak_rss_mb", usage.ru_maxrss / 1024)  # kilobytes on Linux
    return record


def measure(impl: str, mode: str, steps: int, a) -> dict:
    common = ["--data", "mixture", "--dim", str(a.dim), "--width", str(a.width), "--batch", str(a.batch),
              "--solver", "rk4", "--steps", str(steps)]
    if a.threads and "torch" in impl:
        common += ["--threads", str(a.threads)]
    if impl.startswith("otflow"):
        cmd = [sys.executable, __file__, "--worker", impl.split("-")[1], mode, *common, "--iters", str(a.iters),
               "--anchors", str(a.anchors)]
    else:
        script = Path(a.anchors) / ("torchdiffeq_rnode.py" if impl == "torchdiffeq" else "diffrax_rnode.py")
        cmd = [sys.executable, str(script), *common, "--grad", mode, "--iters", str(a.iters), "--warmup", "1"]
    record = _run(cmd, a.timeout)
    if "sec_per_iter_median" in record:
        record["sec_per_iter"] = record["sec_per_iter_median"]
    return record


def vector_table(a) -> dict:
    results = {}
    rows = [r for r in ROWS if r[0] in a.impls]
    for steps in a.steps:
        for impl, mode in rows:
            rec = measure(impl, mode, steps, a)
            results[(steps, impl, mode)] = rec
            print(f"steps {steps:4d} {impl:13s} {mode:13s} "
                  + (rec["error"] if "error" in rec else
                     f"peak RSS {rec['peak_rss_mb']:8.0f} MB  {rec['sec_per_iter']:.3f} s/it"
                     + (f"  XLA temp {rec['xla_temp_bytes'] / 2 ** 20:.1f} MB" if "xla_temp_bytes" in rec else "")),
                  flush=True)
    print()
    print(f"vector case: dim {a.dim}, width {a.width}, batch {a.batch}, RK4; peak RSS in MB, ratio otflow/anchor")
    print("| steps | implementation | mode | peak RSS MB | XLA temp MB | s/it | ratio to anchor (memory) |")
    print("|---|---|---|---|---|---|---|")
    for (steps, impl, mode), rec in results.items():
        if "error" in rec:
            print(f"| {steps} | {impl} | {mode} | error: {rec['error'][:60]} | | | |")
            continue
        anchor = results.get((steps, *ANCHOR_OF[(impl, mode)])) if (impl, mode) in ANCHOR_OF else None
        ratio = (f"{rec['peak_rss_mb'] / anchor['peak_rss_mb']:.2f} ({'/'.join(ANCHOR_OF[(impl, mode)])})"
                 if anchor and "peak_rss_mb" in anchor else "")
        xla = f"{rec['xla_temp_bytes'] / 2 ** 20:.1f}" if "xla_temp_bytes" in rec else ""
        print(f"| {steps} | {impl} | {mode} | {rec['peak_rss_mb']:.0f} | {xla} | {rec['sec_per_iter']:.3f} | {ratio} |")
    return {f"{s} {i} {m}": r for (s, i, m), r in results.items()}


def image_table(a) -> list:
    cmd = [sys.executable, str(HERE / "images_cpu.py"), "--memory", "--backends", *a.image_backends,
           "--batch", str(a.image_batch), "--widths", *map(str, a.image_widths), "--timeout", str(a.timeout)]
    if a.image_modes:
        cmd += ["--modes", *a.image_modes]
    if a.image_data:
        cmd += ["--data", a.image_data]
    done = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print()
    print(f"image model (multiscale, RK4 × 4 steps, widths {a.image_widths}, batch {a.image_batch}): "
          "peak memory of one iteration above the process's resident set before it")
    print("| backend | mode | peak MB | counter | s (2nd step) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['mode']} | error: {r['error'][:70]} | | |")
        else:
            print(f"| {r['backend']} | {r['mode']} | {r['peak_bytes'] / 2 ** 20:.0f} | {r['counter'][:40]} | "
                  f"{r['second_step_s']:.2f} |")
    if done.returncode != 0:
        print(done.stderr.strip().splitlines()[-1:] or "", file=sys.stderr)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[8, 32, 128], help="RK4 steps over T = 1")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=2, help="timed iterations after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on both torch sides (0: default)")
    p.add_argument("--impls", nargs="+", default=["otflow-torch", "torchdiffeq", "otflow-jax", "diffrax"])
    p.add_argument("--images", action="store_true", help="also the image model for otflow's modes")
    p.add_argument("--image-batch", type=int, default=200)
    p.add_argument("--image-widths", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--image-backends", nargs="+", default=["torch", "jax"])
    p.add_argument("--image-data", default=None)
    p.add_argument("--image-modes", nargs="+", default=None, choices=["direct", "adjoint", "checkpointed"],
                   help="only these modes of the image model (direct at batch 200 needs > 24 GiB on a CPU)")
    p.add_argument("--no-vectors", action="store_true", help="only the image model")
    p.add_argument("--anchors", default=str(ANCHORS))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--data", default="mixture", help=argparse.SUPPRESS)
    p.add_argument("--solver", default="rk4", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.steps = a.steps[0]
        print(json.dumps(worker(*a.worker, a)))
        return
    out = {}
    if not a.no_vectors:
        out["vectors"] = vector_table(a)
    if a.images:
        out["images"] = image_table(a)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
