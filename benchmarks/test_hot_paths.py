"""pytest-benchmark timings of the hot paths (not part of the default test run).

    python -m pytest benchmarks/test_hot_paths.py --benchmark-only -p no:randomly

One dopri5 step of the RNODE augmented dynamics, one step's stage arithmetic alone
(torch), one training step per backend and solver (rk4×4, dopri5 1e-5, rk4×4 and dopri5
with the adjoint, rk4×64 in the checkpointed loop), exact-trace ``log_prob`` on 2 000 points and one exact-trace
evaluation of the density dynamics on 10 000,
on the anchors' reference model (ConcatSquash MLP 2 → 64 → 64 → 64 → 2, batch 512); and one
iteration of the default fit's flow-matching stage as ``fit`` runs it (128×3 swish, batch 2048).
"""
from __future__ import annotations

import numpy as np
import pytest

import otflow
from otflow import MLP, Flow, OptimizerSpec, rnode_loss
from otflow.cnf import rnode_rhs
from otflow.training import make_trainer


def _backend(name):
    try:
        return otflow.get_backend(name)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"{name}: {e}")


BACKENDS = ["torch", "jax"]
SOLVERS = {"rk4x4": dict(method="rk4", n_steps=4), "dopri5": dict(method="dopri5", rtol=1e-5, atol=1e-5),
           # the adjoint's solves run rolled on JAX (its memory no longer grows with the steps)
           "rk4x4-adjoint": dict(method="rk4", n_steps=4, gradient="adjoint"),
           "rk4x64-checkpointed": dict(method="rk4", n_steps=64, loop_kind="checkpointed"),
           # the adjoint's adaptive backward solve on its packed (y, a, g) state
           "dopri5-adjoint": dict(method="dopri5", rtol=1e-5, atol=1e-5, gradient="adjoint")}


def _setup(name):
    b = _backend(name)
    field = MLP((2,), hidden=(64, 64, 64), zero_last=False)
    params = field.init(b, b.key(0), dtype=b.namespace().float32)
    x = b.asarray(np.random.default_rng(0).normal(size=(512, 2)).astype(np.float32))
    return b, field, params, x


@pytest.mark.parametrize("name", BACKENDS)
def test_dopri5_step(benchmark, name):
    b, field, params, x = _setup(name)
    solver = otflow.Dopri5()
    rhs = rnode_rhs(field, backend=b)
    eps = b.normal(b.key(1), (512, 2), dtype=x.dtype)
    xp = b.namespace()
    zero = xp.zeros((512,), dtype=x.dtype)
    state = (x, zero, zero, zero)
    t = b.asarray(np.float32(0.0))
    h = b.asarray(np.float32(0.1))

    def step(state, args):
        return solver.step(lambda t, y, a: tuple(rhs(t, y, a)), t, state, h, args)[0]

    step = b.jit(step)
    run = (lambda: b.to_numpy(step(state, (params, eps))[0]))
    run()
    benchmark(run)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_stage_arithmetic_torch(benchmark, method):
    """One step's stage combinations and their backward pass alone (a field of one tanh per
    leaf) on the RNODE state: the per-operation overhead of the solver's arithmetic in eager torch."""
    b = _backend("torch")
    import torch

    solver = otflow.ode.solvers.SOLVERS[method]()
    y0 = tuple(torch.randn(s, requires_grad=True) for s in [(512, 2), (512,), (512,), (512,)])
    t, h = torch.tensor(0.0), torch.tensor(0.25)

    def run():
        y1 = solver.step(lambda t, y, a: tuple(torch.tanh(v) for v in y), t, y0, h, None)[0]
        torch.autograd.backward(list(y1), [torch.ones_like(v) for v in y1])

    run()
    benchmark(run)
    assert b.eager


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("name", BACKENDS)
def test_training_step(benchmark, name, solver):
    b, field, params, x = _setup(name)
    kw = dict(SOLVERS[solver])
    if solver == "dopri5" and not b.eager:
        kw["loop_kind"] = "checkpointed"

    def loss_fn(p, xb, key):
        eps = b.normal(key, tuple(xb.shape), dtype=xb.dtype)
        out = rnode_loss([field], [p], xb, eps, T=[1.0], backend=b, solver_kwargs=kw)
        return out.loss, {"nll": out.nll, "nfe": out.nfe, "status": out.status}

    trainer = make_trainer(loss_fn, params, OptimizerSpec(lr=1e-3), backend=b)
    counter = iter(range(10**9))
    run = (lambda: trainer.step(x, b.key(next(counter)), 1e-3))
    for _ in range(3):
        run()
    benchmark(run)


@pytest.mark.parametrize("name", BACKENDS)
def test_exact_log_prob(benchmark, name):
    b, field, params, _ = _setup(name)
    flow = Flow([field], [params], backend=b)
    x = np.random.default_rng(1).normal(size=(2000, 2))
    flow.log_prob(x)
    benchmark(lambda: flow.log_prob(x))


@pytest.mark.parametrize("name", BACKENDS)
def test_exact_density_evaluation(benchmark, name):
    """One compiled (JAX) or eager evaluation of the exact-trace density dynamics on the
    side-by-side evaluation row's 10 000 points: the piece a select rather than a
    multiply-and-sum made 1.3-1.6x faster on XLA:CPU."""
    from otflow.cnf import density_rhs

    b, field, params, _ = _setup(name)
    xp = b.namespace()
    x = b.asarray(np.random.default_rng(1).normal(size=(10_000, 2)).astype(np.float32))
    state = (x, xp.zeros((10_000,), dtype=x.dtype))
    t = b.asarray(np.float32(0.3))
    rhs = density_rhs(field, backend=b)
    run = b.jit(lambda p, s: rhs(t, s, p))  # torch: unchanged (eager)
    b.to_numpy(run(params, state)[1])  # compile / warm up
    benchmark(lambda: b.to_numpy(run(params, state)[1]))


@pytest.mark.parametrize("name", BACKENDS)
def test_flow_matching_iteration(benchmark, name):
    """One iteration of the default fit's flow-matching stage as ``fit`` runs it: the batch of
    2048 pairs drawn on the host and copied, the key, the compiled step (128×3 swish, time
    concatenated) and the metrics read back."""
    from otflow.training.data import prepare_data, read_data
    from otflow.training.model import build_model
    from otflow.training.options import FitOptions

    b = _backend(name)
    opts = FitOptions.from_mapping(dict(objective="flow-matching", hidden=(128, 128, 128), activation="swish",
                                        conditioning="concat", batch_size=2048, flow_matching_time_power=2.0))
    rng = np.random.default_rng(0)
    data = prepare_data(read_data("checkerboard"), opts, rng)
    dtype = b.namespace().float32
    device = b.device()
    model = build_model(opts, data, b, dtype, device)
    trainer = make_trainer(model.loss, model.params, opts.optimizer_spec(), backend=b)
    counter = iter(range(10 ** 9))

    def iteration():
        x = model.batches(data, rng, 2048, b, dtype, device)
        m = trainer.step(x, b.key(next(counter)), 1e-3)
        return [float(b.to_numpy(m[k])) for k in ("loss", "nll", "kinetic", "jacobian", "nfe", "grad_norm")]

    iteration()
    benchmark(iteration)
