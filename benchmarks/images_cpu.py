"""Image flows on this machine: fixed-time training runs and peak memory per iteration.

Training (the default): ``otflow.fit`` on MNIST-format data for ``--minutes`` per backend
and per λ, RNODE's MNIST recipe (widths 64,64,64, two blocks per scale, batch 200, RK4 with
step 0.25 over T = 1), then the held-out standard bits/dim (uniform dequantization) on the
test images, iterations/s, and the NFE of training and of the evaluation::

    python benchmarks/images_cpu.py --minutes 20                       # torch and jax, λ = 0.01
    python benchmarks/images_cpu.py --minutes 20 --lambda 0.01 0 --backends torch
    python benchmarks/images_cpu.py --data ~/fashion-mnist --test-images 1000

Memory (``--memory``): one training iteration at ``--batch`` (200) per gradient mode —
direct backprop, the adjoint, and on JAX the checkpointed loop — each in a fresh process;
peak memory from the frameworks' own counters on a GPU (``torch.cuda.max_memory_allocated``,
JAX's ``device.memory_stats()["peak_bytes_in_use"]``) and on the CPU the process's peak
resident set (``resource.getrusage``) above the resident set before the first step::

    python benchmarks/images_cpu.py --memory --backends torch jax

Data: ``--data`` (an IDX directory or file, CIFAR-10 binary, an ``.npz``/``.npy``); by
default the Fashion-MNIST IDX files of the Debian package ``dataset-fashion-mnist`` if
installed (``apt-get install dataset-fashion-mnist``), else scikit-learn's 8×8 digits
(17 levels). ``--n-train``, ``--widths``, ``--batch`` shrink a run (a quick check:
``--minutes 0.2 --n-train 200 --widths 8 --batch 16 --test-images 20``).
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

#: where the Debian package dataset-fashion-mnist may put its IDX files
FASHION_MNIST_GLOBS = ("/usr/share/dataset-fashion-mnist", "/usr/share/*fashion*mnist*", "/usr/share/*/fashion*mnist*",
                       "/usr/share/*/*/fashion*mnist*")


def find_images(path: str | None):
    """The image data of a run: ``path``, else Fashion-MNIST from the Debian package, else the digits."""
    import otflow.datasets as D

    if path:
        return D.load_images(path)
    for pattern in FASHION_MNIST_GLOBS:
        for candidate in sorted(glob.glob(pattern)):
            if os.path.isdir(candidate) and D.is_image_source(candidate):
                return D.load_images(candidate)
    return D.load_images("digits-images")


def recipe(args) -> dict:
    """The fit options of a run (RNODE's MNIST recipe unless shrunk on the command line)."""
    opts = dict(batch_size=args.batch, hidden=tuple(args.widths), method="rk4", steps=4, quiet=True, seed=args.seed,
                gradient=args.gradient)
    if args.blocks_per_scale is not None:
        opts["blocks_per_scale"] = args.blocks_per_scale
    return opts


def train_one(images, backend: str, lam: float, args) -> dict:
    """One fixed-time run and its held-out evaluation."""
    import otflow

    train, test = images.train, images.test
    if test is None:  # no test part (the digits): hold the last images out of training
        train, test = train[:-args.test_images], train[-args.test_images:]
    train = train if args.n_train is None else train[:args.n_train]
    test = test[:args.test_images]
    # an ImageData keeps the number of levels (a bare uint8 array means 256: the digits have 17)
    data = dataclasses.replace(images, train=train, test=None, train_labels=None, test_labels=None)
    started = time.perf_counter()
    flow = otflow.fit(data, backend=backend, max_time=args.minutes * 60,
                      max_iters=args.iters or 10 ** 9, val_fraction=0.0,
                      lambda_kinetic=lam, lambda_jacobian=lam, **recipe(args))
    info = flow.fit_info
    history = flow.history
    estimator = info["options"]["eval_estimator"]
    t0 = time.perf_counter()
    bpd = flow.bits_per_dim(test, n_bins=images.n_levels, estimator=estimator)
    eval_seconds = time.perf_counter() - t0
    failed = sum(1 for r in history if not r["applied"])
    steady = history[min(2, len(history) - 1):]  # the first iterations compile (JAX)
    return {"backend": backend, "lambda": lam, "iterations": info["iterations"], "seconds": info["seconds"],
            "iters_per_s": len(steady) / max(sum(r["sec"] for r in steady), 1e-12),
            "train_nfe_per_iter": float(np.mean([r["nfe_forward"] for r in history])),
            "skipped_iterations": failed, "last_loss": history[-1]["loss"], "last_nll": history[-1]["nll"],
            "test_images": len(test), "test_source": "test part" if images.test is not None else "last images, held out of training",
            "bpd": bpd.mean, "bpd_se": bpd.standard_error, "eval_estimator": estimator,
            "eval_nfe": getattr(flow, "last_nfe", None), "eval_seconds": eval_seconds,
            # RNODE's midpoint number takes the exact trace: d VJPs per evaluation, hours on
            # a CPU for 28×28 images; it is computed where the evaluation uses the exact trace
            "midpoint_bpd": None if args.no_midpoint or estimator != "exact" else flow.midpoint_bits_per_dim(
                test[:args.midpoint_images], n_bins=images.n_levels).mean,
            "wall_seconds": time.perf_counter() - started, "n_levels": images.n_levels,
            "image_shape": list(images.image_shape)}


# ------------------------------------------------------------------------------------------
# memory


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(backend_name: str, mode: str, args) -> dict:
    """One training iteration of the image model in this process, and its peak memory."""
    import otflow
    from otflow.training.data import prepare_data, read_data, sample_batch
    from otflow.training.model import build_model
    from otflow.training.options import FitOptions
    from otflow.training.trainer import make_trainer

    images = find_images(args.data)
    train = images.train[: max(args.batch * 2, 4)]
    args.gradient = "adjoint" if mode == "adjoint" else "direct"
    opts = FitOptions.from_mapping({**recipe(args), "val_fraction": 0.0})
    b = otflow.get_backend(backend_name)
    device = b.device(args.device)
    dtype = getattr(b.namespace(), "float32")
    rng = np.random.default_rng(0)
    data = prepare_data(read_data(train), opts, rng)
    model = build_model(opts, data, b, dtype, device)
    if mode == "checkpointed":
        model.loss.solver_kwargs["loop_kind"] = "checkpointed"
    trainer = make_trainer(model.loss, model.params, opts.optimizer_spec(), backend=b)
    x = sample_batch(data, rng, opts.batch_size, b, dtype, device)
    on_gpu = "cuda" in str(device) or "gpu" in str(device).lower()
    if backend_name == "torch" and on_gpu:
        import torch

        torch.cuda.reset_peak_memory_stats()
    rss_before = _current_rss_bytes()
    t0 = time.perf_counter()
    m = trainer.step(x, b.key(0), 1e-3)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.step(x, b.key(1), 1e-3)
    second = time.perf_counter() - t0
    out = {"backend": backend_name, "mode": mode, "batch": opts.batch_size, "device": str(device),
           "first_step_s": first, "second_step_s": second, "loss": float(b.to_numpy(m["loss"]))}
    if backend_name == "torch" and on_gpu:
        import torch

        out["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        out["counter"] = "torch.cuda.max_memory_allocated"
    elif backend_name == "jax" and on_gpu:
        stats = device.memory_stats() or {}
        out["peak_bytes"] = int(stats.get("peak_bytes_in_use", -1))
        out["counter"] = "jax device.memory_stats()['peak_bytes_in_use']"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
        out["peak_bytes"] = int(peak - rss_before)
        out["peak_rss_bytes"] = int(peak)
        out["counter"] = "resource.getrusage ru_maxrss − RSS before the first step (includes compilation on JAX)"
    return out


def step_worker(backend_name: str, args) -> dict:
    """Seconds per training iteration of the image model (``--warmup`` untimed, then
    ``--iters`` timed), in the record format of the anchors' scripts: the side-by-side
    script's image row (``benchmarks/side_by_side.py --cases 8x8-images``)."""
    import otflow
    from otflow.training.data import prepare_data, read_data, sample_batch
    from otflow.training.model import build_model
    from otflow.training.options import FitOptions
    from otflow.training.trainer import make_trainer

    images = find_images(args.data)
    opts = FitOptions.from_mapping({**recipe(args), "val_fraction": 0.0})
    b = otflow.get_backend(backend_name)
    device = b.device(args.device)
    dtype = getattr(b.namespace(), "float32")
    rng = np.random.default_rng(args.seed)
    data = prepare_data(read_data(dataclasses.replace(images, test=None, test_labels=None, train_labels=None)),
                        opts, rng)
    model = build_model(opts, data, b, dtype, device)
    trainer = make_trainer(model.loss, model.params, opts.optimizer_spec(), backend=b)
    times, nfes, losses = [], [], []
    for it in range(args.warmup + (args.iters or 10)):
        x = sample_batch(data, rng, opts.batch_size, b, dtype, device)
        start = time.perf_counter()
        m = trainer.step(x, b.key(it), 1e-3)
        loss = float(b.to_numpy(m["nll"]))
        elapsed = time.perf_counter() - start
        if it >= args.warmup:
            times.append(elapsed)
            nfes.append(int(b.to_numpy(m["nfe"])))
            losses.append(loss)
    times = sorted(times)
    return {"impl": f"otflow-{backend_name}", "data": images.source, "image_shape": list(images.image_shape),
            "batch": opts.batch_size, "widths": list(opts.hidden), "gradient": opts.gradient,
            "iters": len(times), "sec_per_iter_median": times[len(times) // 2], "sec_per_iter_min": times[0],
            "nfe_forward_mean": float(np.mean(nfes)), "loss_first": losses[0], "loss_last": losses[-1]}


def memory_table(args) -> list[dict]:
    rows = []
    for backend in args.backends:
        modes = ["direct", "adjoint"] + (["checkpointed"] if backend == "jax" else [])
        for mode in [m for m in modes if args.modes is None or m in args.modes]:
            cmd = [sys.executable, __file__, "--memory-worker", backend, mode, *_passthrough(args)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            if done.returncode != 0:
                rows.append({"backend": backend, "mode": mode, "error": (done.stderr.strip().splitlines() or
                                                                        [f"exit {done.returncode}"])[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _passthrough(args) -> list[str]:
    out = ["--batch", str(args.batch), "--widths", *map(str, args.widths), "--seed", str(args.seed)]
    if args.data:
        out += ["--data", args.data]
    if args.device:
        out += ["--device", args.device]
    if args.blocks_per_scale is not None:
        out += ["--blocks-per-scale", str(args.blocks_per_scale)]
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="image data (default: Fashion-MNIST from the Debian package, else digits)")
    p.add_argument("--backends", nargs="+", default=["torch", "jax"])
    p.add_argument("--minutes", type=float, default=20.0, help="training time per backend and λ")
    p.add_argument("--iters", type=int, default=None,
                   help="stop after this many iterations (with --minutes as the time limit): runs that compare "
                        "settings at equal iterations do not depend on how busy the machine is")
    p.add_argument("--lambda", dest="lambdas", type=float, nargs="+", default=[0.01], help="λ_K = λ_J values")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--blocks-per-scale", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None, help="train on the first N images only")
    p.add_argument("--test-images", type=int, default=1000, help="held-out images evaluated")
    p.add_argument("--midpoint-images", type=int, default=200, help="images of RNODE's midpoint number")
    p.add_argument("--no-midpoint", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--memory", action="store_true", help="peak memory of one iteration per gradient mode")
    p.add_argument("--modes", nargs="+", default=None, choices=["direct", "adjoint", "checkpointed"],
                   help="with --memory: only these gradient modes")
    p.add_argument("--gradient", default="direct", choices=["direct", "adjoint"],
                   help="training gradient (direct backprop keeps every RK4 stage: at batch 200 on 28×28 images "
                        "it needs more than 24 GiB of CPU memory; the adjoint's memory does not grow with the steps)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--memory-worker", nargs=2, metavar=("BACKEND", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--step-worker", metavar="BACKEND", default=None,
                   help="print one JSON record of seconds per training iteration (--warmup, --iters) and exit")
    p.add_argument("--warmup", type=int, default=2, help="with --step-worker: untimed iterations first")
    args = p.parse_args(argv)
    if args.step_worker:
        print(json.dumps(step_worker(args.step_worker, args)))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker, args)))
        return
    if args.memory:
        rows = memory_table(args)
    else:
        images = find_images(args.data)
        print(f"data: {images.source} ({images.format}), train {images.train.shape}, "
              f"test {None if images.test is None else images.test.shape}, {images.n_levels} levels", flush=True)
        rows = []
        for backend in args.backends:
            for lam in args.lambdas:
                rows.append(train_one(images, backend, lam, args))
                r = rows[-1]
                print(f"{backend:5s} λ={lam:<5g} {r['iterations']:6d} it in {r['seconds']:.0f} s "
                      f"({r['iters_per_s']:.3f} it/s), train NFE/it {r['train_nfe_per_iter']:.0f}, "
                      f"skipped {r['skipped_iterations']}; held-out bits/dim (standard, dequantized, "
                      f"{r['eval_estimator']}) {r['bpd']:.4f} ± {r['bpd_se']:.4f} on {r['test_images']} images, "
                      f"eval NFE {r['eval_nfe']}", flush=True)
                print(json.dumps(r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
