"""The bare chain under a side-by-side row: the row's field evaluations with nothing around them.

    python benchmarks/bare_chain.py --backend jax --nfe 16 --solver rk4 --data mixture --dim 64 --width 256 --batch 256
    python benchmarks/bare_chain.py --backend torch --nfe 19 --solver dopri5 --eval-points 10000

Takes the anchor scripts' options (``shared/anchors/common.py``) and their own field
code (the equinox and torch ``VelocityField`` with RNODE's augmented dynamics, or the
exact-trace dynamics for evaluation), and times ``--nfe`` evaluations of it chained by
explicit Euler steps over ``[0, T]``:

* training rows: the RNODE loss of the chain, its gradient by plain backpropagation
  (every evaluation's residuals kept: no solver, no step-size control, no error norm, no
  checkpointing, no recomputation) and the Adam update, as one jitted step on JAX (the
  chain unrolled) and eagerly on torch, timed like the anchors (median seconds per
  iteration after warm-up);
* the evaluation row (``--eval-points N``): the exact-trace chain on ``N`` points, forward
  only (the anchors' ``exact_density``: one VJP per basis vector);
* ``--recompute`` (JAX): each evaluation wrapped in ``jax.checkpoint``, so the backward pass
  recomputes it from its input state instead of reading stored residuals. That is the
  schedule of otflow's and diffrax's checkpointed adaptive loops (2 forward + 1 backward
  passes of every evaluation) with no solver around it.

With the NFE of the row (the fewest any implementation used), this is what the row's
arithmetic costs in the simplest program each framework runs. It is **not** a lower
bound: on these CPUs a solver that recomputes its steps (otflow's and diffrax's
checkpointed loops) can beat the chain that stores every residual, and a rolled loop can
beat the unrolled chain. Where every implementation of a row sits at the chain's time,
the row is the field's arithmetic and no solver can take 20 % off it by doing the same
evaluations. Prints one JSON line like the anchors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ANCHORS = HERE.parent.parent / "shared" / "anchors"


def _median_seconds(call, repeats: int = 3) -> float:
    """The median wall time of ``repeats`` calls (the anchors time evaluation this way)."""
    secs = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        secs.append(time.perf_counter() - start)
    return sorted(secs)[len(secs) // 2]


def _jax_chain(a, nfe: int, recompute: bool = False) -> dict:
    import diffrax_rnode as anchor
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
    from common import data_dim, sample

    dim = data_dim(a)
    key = jax.random.PRNGKey(a.seed)
    model = anchor.VelocityField(dim, a.width, a.depth, key)
    h = a.T / nfe
    augmented = jax.checkpoint(anchor.augmented) if recompute else anchor.augmented

    def chain(model, x, noise):
        zero = jnp.zeros((x.shape[0], 1), x.dtype)
        state = (x, zero, zero, zero)
        for k in range(nfe):
            d = augmented(jnp.asarray(k * h, x.dtype), state, (model, noise))
            state = tuple(s + h * ds for s, ds in zip(state, d))
        return state

    def loss_fn(model, x, noise):
        z, dlogp, kin, jac = chain(model, x, noise)
        logpz = -0.5 * jnp.sum(z * z, axis=1, keepdims=True) - 0.5 * dim * math.log(2 * math.pi)
        nll = -jnp.mean(logpz - dlogp)
        return nll + a.lam_k * jnp.mean(kin) + a.lam_j * jnp.mean(jac), nll

    opt = optax.adam(a.lr)
    opt_state = opt.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, noise):
        (_, nll), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, x, noise)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, nll

    @eqx.filter_jit
    def exact_chain(model, x):
        zero = jnp.zeros((x.shape[0], 1), x.dtype)
        state = (x, zero)
        for k in range(nfe):
            d = anchor.exact_density(jnp.asarray(k * h, x.dtype), state, model)
            state = tuple(s + h * ds for s, ds in zip(state, d))
        return state[1]

    rng = np.random.default_rng(a.seed)
    times = []
    for it in range(a.warmup + a.iters):
        x = jnp.asarray(sample(a.data, a.batch, dim, rng, a.data_file))
        key, sub = jax.random.split(key)
        noise = jax.random.normal(sub, x.shape, x.dtype)
        start = time.perf_counter()
        model, opt_state, nll = step(model, opt_state, x, noise)
        float(jax.block_until_ready(nll))
        if it >= a.warmup:
            times.append(time.perf_counter() - start)
    out = {"sec_per_iter_median": float(np.median(times))}
    if a.eval_points:
        x = jnp.asarray(sample(a.data, a.eval_points, dim, rng, a.data_file, split="test"))
        jax.block_until_ready(exact_chain(model, x))  # compile
        out["eval_sec_median"] = _median_seconds(lambda: jax.block_until_ready(exact_chain(model, x)))
    return out


def _torch_chain(a, nfe: int) -> dict:
    import torch
    import torchdiffeq_rnode as anchor
    from common import data_dim, sample

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    dim = data_dim(a)
    net = anchor.VelocityField(dim, a.width, a.depth)
    func = anchor.Augmented(net)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    h = a.T / nfe
    times_t = [torch.tensor(k * h) for k in range(nfe)]

    def chain(f, state):
        for t in times_t:
            d = f(t, state)
            state = tuple(s + h * ds for s, ds in zip(state, d))
        return state

    rng = np.random.default_rng(a.seed)
    times = []
    for it in range(a.warmup + a.iters):
        x = torch.from_numpy(sample(a.data, a.batch, dim, rng, a.data_file))
        func.noise = torch.randn_like(x)
        start = time.perf_counter()
        zero = torch.zeros(x.shape[0], 1)
        z, dlogp, kin, jac = chain(func, (x, zero, zero, zero))
        logpz = -0.5 * (z * z).sum(1, keepdim=True) - 0.5 * dim * math.log(2 * math.pi)
        nll = -(logpz - dlogp).mean()
        loss = nll + a.lam_k * kin.mean() + a.lam_j * jac.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        float(nll.detach())
        if it >= a.warmup:
            times.append(time.perf_counter() - start)
    out = {"sec_per_iter_median": float(np.median(times))}
    if a.eval_points:
        exact = anchor.ExactDensity(net)
        x = torch.from_numpy(sample(a.data, a.eval_points, dim, rng, a.data_file, split="test"))
        with torch.no_grad():
            out["eval_sec_median"] = _median_seconds(lambda: chain(exact, (x, torch.zeros(x.shape[0], 1))))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=True)
    p.add_argument("--backend", required=True, choices=["jax", "torch"])
    p.add_argument("--nfe", type=int, required=True, help="field evaluations per solve (the row's fewest)")
    p.add_argument("--anchors", default=str(ANCHORS), help="the anchor scripts' folder (their field code)")
    p.add_argument("--recompute", action="store_true",
                   help="JAX: recompute every evaluation in the backward pass (jax.checkpoint) instead of storing it")
    own, rest = p.parse_known_args(argv)
    if own.nfe < 1:
        p.error(f"--nfe must be at least 1, got {own.nfe}")
    if own.recompute and own.backend != "jax":
        p.error("--recompute is implemented for --backend jax only (jax.checkpoint around each evaluation)")
    sys.path.insert(0, os.path.abspath(own.anchors))
    from common import parse_args

    a = parse_args(rest)
    if a.grad != "direct":
        p.error("the bare chain is defined for direct backpropagation (--grad direct); the adjoint's backward solve "
                "is a different computation")
    out = _jax_chain(a, own.nfe, own.recompute) if own.backend == "jax" else _torch_chain(a, own.nfe)
    impl = f"bare-{own.backend}" + ("-recompute" if own.recompute else "")
    out = {"impl": impl, "nfe_forward_mean": own.nfe, "iters": a.iters, **out}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
