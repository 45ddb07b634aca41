"""otflow's side of the anchors' reference problem (../shared/anchors/README.md).

Same data, model, probe, loss, solver settings and timing loop as
``torchdiffeq_rnode.py`` / ``diffrax_rnode.py``, trained through otflow's own
trainer (``otflow.training.make_trainer``), so the printed JSON line can be put beside
theirs. It uses otflow's public API only (``otflow.get_backend``, ``otflow.MLP``,
``otflow.rnode_loss``, ``otflow.OptimizerSpec``, ``otflow.training.make_trainer``,
``otflow.Flow``)::

    python benchmarks/otflow_rnode.py --backend torch --solver dopri5 --grad direct
    python benchmarks/otflow_rnode.py --backend jax --solver rk4 --data mixture --dim 64 --width 256 --batch 256

It accepts every anchor option (``--anchors DIR`` points at the anchors folder,
default ``../shared/anchors`` beside the repository).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_ANCHORS = HERE.parent.parent / "shared" / "anchors"


def _anchor_common(path):
    sys.path.insert(0, str(path))
    import common  # noqa: E402

    return common


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    backend_name, anchors = "torch", DEFAULT_ANCHORS
    for flag in ("--backend", "--anchors"):
        if flag in argv:
            i = argv.index(flag)
            value = argv[i + 1]
            del argv[i:i + 2]
            if flag == "--backend":
                backend_name = value
            else:
                anchors = Path(value)
    common = _anchor_common(anchors)
    a = common.parse_args(argv)
    if a.threads and backend_name == "torch":
        import torch

        torch.set_num_threads(a.threads)
    if backend_name == "jax":
        import jax  # noqa: F401

    import otflow
    from otflow import MLP, OptimizerSpec, rnode_loss
    from otflow.training import make_trainer

    b = otflow.get_backend(backend_name)
    xp = b.namespace()
    dim = common.data_dim(a)
    field = MLP((dim,), hidden=(a.width,) * a.depth, zero_last=False)
    params = field.init(b, b.key(a.seed), dtype=xp.float32)
    if a.solver == "rk4":
        solver = dict(method="rk4", n_steps=a.steps)
    else:
        solver = dict(method="dopri5", rtol=a.rtol, atol=a.atol, max_steps=4096)
        if not b.eager:
            solver["loop_kind"] = "checkpointed"
    if a.grad == "adjoint":
        solver["gradient"] = "adjoint"

    def loss_fn(p, x, key):
        eps = b.normal(key, tuple(x.shape), dtype=x.dtype)
        out = rnode_loss([field], [p], x, eps, T=[a.T], backend=b, lambda_kinetic=a.lam_k, lambda_jacobian=a.lam_j,
                         solver_kwargs=solver)
        return out.loss, {"nll": out.nll, "nfe": out.nfe, "status": out.status}

    trainer = make_trainer(loss_fn, params, OptimizerSpec(lr=a.lr), backend=b)
    rng = np.random.default_rng(a.seed)
    trace = common.Trace(a.trace)
    times, nfes, losses = [], [], []
    for it in range(a.warmup + a.iters):
        x = b.asarray(common.sample(a.data, a.batch, dim, rng, a.data_file))
        key = b.key(it)
        start = time.perf_counter()
        m = trainer.step(x, key, a.lr)
        nll = float(b.to_numpy(m["nll"]))
        elapsed = time.perf_counter() - start
        nfe = int(b.to_numpy(m["nfe"]))
        trace(it=it, nll=nll, nfe_fwd=nfe, sec=elapsed)
        if it >= a.warmup:
            times.append(elapsed)
            nfes.append(nfe)
            losses.append(nll)
    extra = {}
    if a.eval_points:
        from otflow import Flow

        flow = Flow([field], [trainer.params], backend=b, T=a.T)
        x = common.sample(a.data, a.eval_points, dim, rng, a.data_file, split="test")
        flow.log_prob(x)  # compile / warm up
        secs = []
        for _ in range(3):
            start = time.perf_counter()
            logp = flow.log_prob(x)
            secs.append(time.perf_counter() - start)
        extra = {"eval_points": a.eval_points, "eval_sec_median": sorted(secs)[1], "eval_nfe": flow.last_nfe,
                 "eval_nll": float(-np.mean(logp))}
    return common.report(f"otflow-{backend_name}", a, times, nfes, losses, extra)


if __name__ == "__main__":
    main()
