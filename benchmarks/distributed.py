"""Throughput of data-parallel training: 1 vs N processes (torch) or devices (JAX).

The case is the side-by-side script's ``64d-rk4`` reference (8-component Gaussian
mixture in 64-D, MLP of 3 hidden layers of 256, global batch 256, RK4 with 4 steps on
T = 1, float32, RNODE λ's 0.01). Each configuration runs in fresh processes: torch ranks
get torchrun's environment (``otflow`` initializes the process group: gloo on CPU,
NCCL with ``--gpu``); JAX runs in one process over a mesh of N devices (on CPU,
``XLA_FLAGS=--xla_force_host_platform_device_count=N``). The step is otflow's trainer
(``make_trainer(..., data_parallel=...)``), the same one ``fit`` uses.

Reported per configuration: the median step time, throughput (global samples per
second), and the communication time per step, timed separately: torch, the median of an
all-reduce of one buffer the size of the gradients plus metrics (what the trainer sends
each step); JAX, a jitted sum over the mesh of a gradient-sized array (the all-reduce
XLA inserts)::

    python benchmarks/distributed.py                       # torch and jax, 1 vs 2, CPU
    python benchmarks/distributed.py --backends torch --n 2 --iters 20 --json out.json
    python benchmarks/distributed.py --gpu --n 0           # every GPU of the machine (0: all)
    python benchmarks/distributed.py --tiny                # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

CASE = dict(dim=64, width=256, depth=3, batch=256, steps=4)
TINY = dict(dim=4, width=8, depth=1, batch=8, steps=1)


def _sizes(a) -> dict:
    return TINY if a.tiny else CASE


def _data(n: int, dim: int, rng):
    import numpy as np

    centers = np.random.default_rng(1234).standard_normal((8, dim)) * 2.0
    return (centers[rng.integers(0, 8, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def _trainer(backend_name: str, replicas, sizes: dict, device):
    """The reference model's trainer on this process's replicas."""
    import otflow
    from otflow import MLP, OptimizerSpec, rnode_loss
    from otflow.training import make_trainer

    b = otflow.get_backend(backend_name)
    dim = sizes["dim"]
    field = MLP((dim,), hidden=(sizes["width"],) * sizes["depth"], zero_last=False)
    params = field.init(b, b.key(0), dtype=b.namespace().float32, device=device)
    solver = dict(method="rk4", n_steps=sizes["steps"])

    def loss_fn(p, x, key):
        eps = b.normal(key, tuple(x.shape), dtype=x.dtype, device=b.device_of(x))
        out = rnode_loss([field], [p], x, eps, T=[1.0], backend=b, lambda_kinetic=0.01, lambda_jacobian=0.01,
                         solver_kwargs=solver)
        return out.loss, {"nll": out.nll, "nfe": out.nfe, "status": out.status}

    return b, make_trainer(loss_fn, params, OptimizerSpec(lr=1e-3), backend=b, data_parallel=replicas)


def _time_steps(b, trainer, replicas, sizes, a, device) -> list[float]:
    import numpy as np

    rng = np.random.default_rng(0)
    part = replicas.rows(sizes["batch"])
    times = []
    for it in range(a.warmup + a.iters):
        x = _data(sizes["batch"], sizes["dim"], rng)
        x = replicas.place_batch(b.asarray(x if part is None else x[part], device=device))
        start = time.perf_counter()
        m = trainer.step(x, b.key(it), 1e-3)
        float(b.to_numpy(m["loss"]))  # wait for the step
        if it >= a.warmup:
            times.append(time.perf_counter() - start)
    return times


def torch_worker(a) -> None:
    """One rank (or the only process): time the steps and, with several ranks, the all-reduce."""
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    import otflow
    from otflow.training.distributed import resolve_replicas

    sizes = _sizes(a)
    b = otflow.get_backend("torch")
    spec = "cuda" if a.gpu else "cpu"
    replicas = resolve_replicas(b, None, spec)
    device = replicas.device(b, spec)
    b, trainer = _trainer("torch", replicas, sizes, device)
    times = _time_steps(b, trainer, replicas, sizes, a, device)
    comm = []
    if replicas.processes > 1:
        import torch.distributed as dist

        n = sum(p.numel() for p in trainer._leaves) + 8
        buf = torch.zeros(n, dtype=torch.float32, device=device)
        for i in range(a.warmup + a.iters):
            if a.gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(buf)
            if a.gpu:
                torch.cuda.synchronize()
            if i >= a.warmup:
                comm.append(time.perf_counter() - start)
    if replicas.is_main:
        _print_record("torch", replicas.shards, sizes, times, comm)


def jax_worker(a) -> None:
    """The whole mesh in one process: time the sharded step and a gradient-sized all-reduce."""
    import jax

    from otflow.training.distributed import resolve_replicas

    import otflow

    sizes = _sizes(a)
    b = otflow.get_backend("jax")
    spec = "gpu" if a.gpu else "cpu"
    n = a.n if a.n else len(jax.devices(spec))
    devices = n if n > 1 else None
    replicas = resolve_replicas(b, devices, spec)
    device = b.device(spec)
    b, trainer = _trainer("jax", replicas, sizes, device)
    times = _time_steps(b, trainer, replicas, sizes, a, device)
    comm = []
    if n > 1:
        import jax.numpy as jnp

        size = sum(x.size for x in jax.tree_util.tree_leaves(trainer.params)) + 8
        parts = jax.device_put(jnp.zeros((n, size), jnp.float32), replicas.batch_sharding)
        total = jax.jit(lambda g: g.sum(axis=0), out_shardings=replicas.replicated)
        for i in range(a.warmup + a.iters):
            start = time.perf_counter()
            total(parts).block_until_ready()
            if i >= a.warmup:
                comm.append(time.perf_counter() - start)
    _print_record("jax", n, sizes, times, comm)


def _print_record(backend: str, n: int, sizes: dict, times: list, comm: list) -> None:
    step = statistics.median(times)
    print(json.dumps({"backend": backend, "n": n, "global_batch": sizes["batch"], "dim": sizes["dim"],
                      "step_sec_median": step, "samples_per_sec": sizes["batch"] / step,
                      "comm_sec_median": statistics.median(comm) if comm else 0.0, "iters": len(times)}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gpu_count(backend: str) -> int:
    probe = ("import torch; print(torch.cuda.device_count())" if backend == "torch" else
             "import jax; print(len(jax.devices('gpu')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def run(backend: str, n: int, a, passthrough: list) -> dict:
    """One configuration in fresh processes; rank 0's record."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", backend, *passthrough]
    env = dict(os.environ)
    if backend == "jax":
        if not a.gpu:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
        out = subprocess.run([*cmd, "--n", str(n)], env=env, capture_output=True, text=True, timeout=a.timeout)
        outs = [out]
    else:
        port = _free_port()
        procs = []
        for rank in range(n):
            env_r = dict(env, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(n), LOCAL_WORLD_SIZE=str(n),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            if n == 1:
                env_r = {k: v for k, v in env_r.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
            procs.append(subprocess.Popen(cmd, env=env_r, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs = []
        for p in procs:
            stdout, stderr = p.communicate(timeout=a.timeout)
            outs.append(subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr))
    for out in outs:
        if out.returncode != 0:
            return {"backend": backend, "n": n, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(outs[0].stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="*", default=["torch", "jax"], choices=["torch", "jax"])
    p.add_argument("--n", type=int, default=2, help="processes/devices of the parallel run (0: all GPUs, with --gpu)")
    p.add_argument("--gpu", action="store_true", help="train on GPUs (torch: NCCL, one process per GPU)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: default)")
    p.add_argument("--tiny", action="store_true", help="a tiny model: checks the script works, measures nothing")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--parallel-only", action="store_true", help="run only the N-process/device configuration")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        (torch_worker if a.worker == "torch" else jax_worker)(a)
        return
    passthrough = ["--iters", str(a.iters), "--warmup", str(a.warmup), "--threads", str(a.threads)]
    passthrough += ["--gpu"] * a.gpu + ["--tiny"] * a.tiny
    records = []
    for backend in a.backends:
        n = a.n if a.n else _gpu_count(backend)
        for count in [n] if a.parallel_only else sorted({1, n}):
            rec = run(backend, count, a, passthrough)
            records.append(rec)
            if "error" in rec:
                print(f"{backend:6s} n={count}: error: {rec['error']}")
            else:
                print(f"{backend:6s} n={count}: step {rec['step_sec_median'] * 1e3:8.2f} ms  "
                      f"{rec['samples_per_sec']:10.1f} samples/s  all-reduce {rec['comm_sec_median'] * 1e3:7.3f} ms")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
