"""MNIST-sized image flows on a GPU: iterations/s and peak memory, torch-CUDA and JAX-GPU, one command.

    python benchmarks/gpu_images.py                 # < 5 minutes on one GPU
    python benchmarks/gpu_images.py --data ~/mnist  # real MNIST-format data instead of random pixels

Every configuration runs in a fresh process (so peak memory is its own): RNODE's MNIST
model (1×28×28, three scales, two blocks per scale, conv widths 64,64,64, softplus),
batches of 200, fixed-step RK4 with step 0.25 over T = 1, λ_K = λ_J = 0.01, float32; for
each backend direct backprop and the adjoint (and on JAX the checkpointed loop). Two
warm-up steps (compilation on JAX), then ``--steps`` timed steps. Peak memory is the
framework's own counter: ``torch.cuda.max_memory_allocated`` and JAX's
``device.memory_stats()["peak_bytes_in_use"]``. Data: uniformly random uint8 pixels unless
``--data`` names image files (IDX, CIFAR-10 binary, .npy/.npz). ``--allow-cpu`` runs on
the CPU (a check of the script itself; shrink it with ``--widths 8 --batch 8 --size 8``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

MODES = {"torch": ("direct", "adjoint"), "jax": ("direct", "adjoint", "checkpointed")}


def worker(backend_name: str, mode: str, args) -> dict:
    import otflow
    from otflow.training.data import prepare_data, read_data, sample_batch
    from otflow.training.model import build_model
    from otflow.training.options import FitOptions
    from otflow.training.trainer import make_trainer

    b = otflow.get_backend(backend_name)
    device = b.device(args.device or ("cpu" if args.allow_cpu else "gpu"))
    if args.data:
        images = otflow.datasets.load_images(args.data).train[: 4 * args.batch]
    else:
        images = np.random.default_rng(0).integers(0, 256, (4 * args.batch, 1, args.size, args.size), dtype=np.uint8)
    opts = FitOptions.from_mapping({"batch_size": args.batch, "hidden": tuple(args.widths), "method": "rk4",
                                    "steps": 4, "gradient": "adjoint" if mode == "adjoint" else "direct",
                                    "val_fraction": 0.0, "quiet": True})
    dtype = b.namespace().float32
    rng = np.random.default_rng(0)
    data = prepare_data(read_data(images), opts, rng)
    model = build_model(opts, data, b, dtype, device)
    if mode == "checkpointed":
        model.loss.solver_kwargs["loop_kind"] = "checkpointed"
    trainer = make_trainer(model.loss, model.params, opts.optimizer_spec(), backend=b)
    batches = [sample_batch(data, rng, opts.batch_size, b, dtype, device) for _ in range(args.steps + 2)]

    def sync(metrics):
        b.to_numpy(metrics["loss"])  # waits for the device

    t0 = time.perf_counter()
    for i in range(2):
        sync(trainer.step(batches[i], b.key(i), 1e-3))
    warmup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(2, args.steps + 2):
        m = trainer.step(batches[i], b.key(i), 1e-3)
    sync(m)
    seconds = time.perf_counter() - t0
    out = {"backend": backend_name, "mode": mode, "device": str(device), "batch": args.batch,
           "image": [1, args.size, args.size], "widths": args.widths, "data": args.data or "random uint8",
           "warmup_s": warmup, "iters_per_s": args.steps / seconds, "nfe_per_iter": int(b.to_numpy(m["nfe"])),
           "loss": float(b.to_numpy(m["loss"]))}
    if backend_name == "torch" and device.type == "cuda":
        import torch

        out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["counter"] = "torch.cuda.max_memory_allocated"
    elif backend_name == "jax" and device.platform == "gpu":
        out["peak_bytes"] = int((device.memory_stats() or {}).get("peak_bytes_in_use", -1))
        out["counter"] = "jax device.memory_stats()['peak_bytes_in_use']"
    else:
        import resource

        out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["counter"] = "process peak RSS (CPU check run)"
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["torch", "jax"])
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--size", type=int, default=28, help="side of the random images")
    p.add_argument("--widths", type=int, nargs="+", default=[64, 64, 64])
    p.add_argument("--data", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--allow-cpu", action="store_true")
    p.add_argument("--timeout", type=float, default=100, help="seconds per configuration")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker, args)))
        return
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for backend in args.backends:
        for mode in MODES[backend]:
            cmd = [sys.executable, __file__, *passthrough, "--worker", backend, mode]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps({"backend": backend, "mode": mode, "error": f"over {args.timeout} s"}), flush=True)
                continue
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                print(json.dumps({"backend": backend, "mode": mode, "error": last}), flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{backend:5s} {mode:12s} {row['iters_per_s']:8.3f} it/s  peak {row['peak_bytes'] / 2**20:9.1f} MiB"
                  f"  NFE/it {row['nfe_per_iter']}  warm-up {row['warmup_s']:.1f} s  ({row['device']})", flush=True)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
