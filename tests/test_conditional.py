"""Conditional flows p(x | c): fields with a context, the flow's context handling, fit and the CLI.

The fitted conditional is checked against a closed form: ``x | c ~ N(A c + b, Σ)``, whose
KL divergence to the fitted flow is estimated by Monte Carlo with draws from the truth.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import otflow
from otflow.base import get_backend
from otflow.cnf import MLP, Flow, SolverOptions, rnode_loss
from otflow.training.cli import main
from otflow.training.data import prepare_data, read_data, sample_batch, validate_context
from otflow.training.options import FitOptions

TIGHT = SolverOptions(rtol=1e-10, atol=1e-10)

# ---- the closed form: x | c ~ N(A c + b, L Lᵀ), c ~ N(0, I) ---------------------------------
A = np.array([[2.0], [-1.0]])
B = np.array([0.5, 1.0])
L = np.array([[0.5, 0.0], [0.3, 0.4]])
SIGMA = L @ L.T
#: the mutual information I(x; c) = ½ log det(A Aᵀ + Σ)/det Σ: the smallest average KL any
#: density that ignores c can reach (the marginal p(x) reaches it)
MUTUAL_INFORMATION = 0.5 * math.log(np.linalg.det(A @ A.T + SIGMA) / np.linalg.det(SIGMA))


def gaussian_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(n, 1))
    return c @ A.T + B + rng.normal(size=(n, 2)) @ L.T, c


def true_log_prob(x, c):
    d = x - (c @ A.T + B)
    inv = np.linalg.inv(SIGMA)
    return (-0.5 * np.einsum("ni,ij,nj->n", d, inv, d) - 0.5 * np.linalg.slogdet(SIGMA)[1] - math.log(2 * math.pi))


def average_kl(log_prob, n_contexts: int = 8, n_draws: int = 400, seed: int = 99) -> float:
    """Monte-Carlo KL(p(·|c) ‖ q(·|c)) averaged over held-out contexts c ~ N(0, 1), with
    ``n_draws`` draws from the true conditional per context; ``log_prob(x, c)`` is q's."""
    rng = np.random.default_rng(seed)
    kls = []
    for c in rng.normal(size=(n_contexts, 1)):
        x = A @ c + B + rng.normal(size=(n_draws, 2)) @ L.T
        cc = np.broadcast_to(c, (n_draws, 1))
        kls.append(np.mean(true_log_prob(x, cc) - log_prob(x, c)))
    return float(np.mean(kls))


def conditional_flow(backend: str, *, context_dim=2, seed=0, standardized=True, blocks=2):
    """A random (untrained, non-trivial) conditional flow in float64 (two blocks by default;
    the JAX tests use one, which compiles in half the time)."""
    b = get_backend(backend)
    fields = [MLP((2,), hidden=(8, 8), context_dim=context_dim, zero_last=False) for _ in range(blocks)]
    keys = b.split(b.key(seed), blocks)
    params = [f.init(b, k, dtype=b.namespace().float64) for f, k in zip(fields, keys)]
    extra = dict(shift=[0.3, -0.2], scale=[1.5, 0.7], context_shift=np.linspace(-1, 1, context_dim),
                 context_scale=np.linspace(0.5, 2, context_dim)) if standardized else {}
    return Flow(fields, params, backend=b, dtype="float64", T=[0.6, 0.5][:blocks], eval_solver=TIGHT, **extra)


# ---- the field --------------------------------------------------------------------------------
@pytest.mark.parametrize("conditioning", ["concatsquash", "concat", "ignore"])
def test_field_rows_depend_on_their_own_context_only(conditioning):
    b = get_backend("numpy")
    field = MLP((3,), hidden=(5,), context_dim=2, conditioning=conditioning, zero_last=False)
    params = field.init(b, b.key(1), dtype=np.float64)
    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    v = field.apply(params, np.float64(0.3), x, c)
    c2 = c.copy()
    c2[2] += 1.0
    v2 = field.apply(params, np.float64(0.3), x, c2)
    assert np.array_equal(np.delete(v, 2, axis=0), np.delete(v2, 2, axis=0))
    assert np.max(np.abs(v[2] - v2[2])) > 1e-3  # the context is used
    # row-by-row evaluation agrees with the batch
    rows = np.concatenate([field.apply(params, np.float64(0.3), x[i:i + 1], c[i:i + 1]) for i in range(4)])
    assert np.allclose(rows, v, rtol=0, atol=1e-14)


def test_concatsquash_context_enters_gate_and_shift_as_documented():
    """``(W x + b)·σ(a t + G c + g) + d t + H c`` for one layer, computed by hand."""
    b = get_backend("numpy")
    field = MLP((2,), hidden=(), context_dim=3, zero_last=False)
    (p,) = field.init(b, b.key(4), dtype=np.float64)
    rng = np.random.default_rng(1)
    x, c, t = rng.normal(size=(5, 2)), rng.normal(size=(5, 3)), 0.7
    gate = 1 / (1 + np.exp(-(p["gate_weight"] * t + c @ p["context_gate"] + p["gate_bias"])))
    expected = (x @ p["weight"] + p["bias"]) * gate + p["time_bias"] * t + c @ p["context_bias"]
    assert np.allclose(field.apply((p,), np.float64(t), x, c), expected, rtol=1e-14, atol=1e-14)


def test_unconditional_field_is_unchanged_by_the_context_option():
    """context_dim=0 keeps the parameter layout and config of earlier versions, and a
    conditional field whose context weights are zero computes the unconditional field."""
    b = get_backend("numpy")
    plain = MLP((2,), hidden=(6, 6), zero_last=False)
    params = plain.init(b, b.key(3), dtype=np.float64)
    assert all(set(layer) == {"weight", "bias", "gate_weight", "gate_bias", "time_bias"} for layer in params)
    assert "context_dim" not in plain.config()
    cond = MLP((2,), hidden=(6, 6), zero_last=False, context_dim=2)
    assert cond.config()["context_dim"] == 2
    zeroed = tuple(dict(layer, context_gate=np.zeros((2, layer["bias"].shape[0])),
                        context_bias=np.zeros((2, layer["bias"].shape[0]))) for layer in params)
    rng = np.random.default_rng(2)
    x, c = rng.normal(size=(7, 2)), rng.normal(size=(7, 2))
    assert np.allclose(cond.apply(zeroed, np.float64(0.4), x, c), plain.apply(params, np.float64(0.4), x),
                       rtol=1e-14, atol=1e-14)


def test_field_context_errors():
    b = get_backend("numpy")
    cond = MLP((2,), hidden=(4,), context_dim=2)
    params = cond.init(b, b.key(0), dtype=np.float64)
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="needs a context"):
        cond.apply(params, np.float64(0.0), x)
    with pytest.raises(ValueError, match=r"\(3, 2\), got \(3, 1\)"):
        cond.apply(params, np.float64(0.0), x, np.zeros((3, 1)))
    plain = MLP((2,), hidden=(4,))
    with pytest.raises(ValueError, match="unconditional"):
        plain.apply(plain.init(b, b.key(0), dtype=np.float64), np.float64(0.0), x, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="context_dim"):
        MLP((2,), context_dim=-1)


# ---- the flow ---------------------------------------------------------------------------------
def test_log_prob_equals_brute_force_change_of_variables():
    """log p(x | c) = log N(z) + log |det ∂z/∂x| with z = transform(x, c) and the Jacobian
    by central differences of the transform (the context held fixed)."""
    flow = conditional_flow("torch")
    rng = np.random.default_rng(5)
    x, c = rng.normal(size=(3, 2)), rng.normal(size=(3, 2))
    h = 1e-4
    for i in range(3):
        cols = []
        for k in range(2):
            e = np.zeros(2)
            e[k] = h
            pts = np.stack([x[i] + e, x[i] - e])
            z = flow.transform(pts, context=np.stack([c[i], c[i]]))
            cols.append((z[0] - z[1]) / (2 * h))
        jac = np.stack(cols, axis=1)
        z0 = flow.transform(x[i:i + 1], context=c[i])[0]
        brute = -0.5 * z0 @ z0 - math.log(2 * math.pi) + np.linalg.slogdet(jac)[1]
        assert flow.log_prob(x[i:i + 1], context=c[i])[0] == pytest.approx(brute, abs=1e-6)


def test_context_standardization_is_applied_to_raw_contexts():
    flow = conditional_flow("torch")
    raw = conditional_flow("torch", standardized=False)
    raw = Flow(raw.fields, flow.params, backend="torch", dtype="float64", T=flow.T, eval_solver=TIGHT,
               shift=[0.3, -0.2], scale=[1.5, 0.7])
    rng = np.random.default_rng(6)
    x, c = rng.normal(size=(4, 2)), rng.normal(size=(4, 2))
    c_std = (c - np.linspace(-1, 1, 2)) / np.linspace(0.5, 2, 2)
    assert np.allclose(flow.log_prob(x, context=c), raw.log_prob(x, context=c_std), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])  # JAX: 4 compilations
def test_round_trips_with_per_sample_and_broadcast_contexts(backend):
    flow = conditional_flow(backend, blocks=2 if backend == "torch" else 1)
    rng = np.random.default_rng(7)
    x, c = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    z = flow.transform(x, context=c)
    assert np.allclose(flow.inverse(z, context=c), x, rtol=0, atol=1e-7)
    one = c[1]
    z1 = flow.transform(x, context=one)
    assert np.allclose(z1, flow.transform(x, context=np.tile(one, (5, 1))), rtol=0, atol=1e-12)
    assert np.allclose(flow.inverse(z1, context=one), x, rtol=0, atol=1e-7)
    # chunked evaluation (with padding of the last chunk on JAX) chunks the context with x
    assert np.allclose(flow.log_prob(x, context=c, batch_size=2), flow.log_prob(x, context=c), rtol=0, atol=1e-8)
    if backend == "jax":
        return  # the rest runs the same core code; each new evaluation kind is another JAX compilation
    # a sample of one context equals the sample of that context tiled
    s1 = flow.sample(5, context=one, seed=3)
    assert np.allclose(s1, flow.sample(5, context=np.tile(one, (5, 1)), seed=3), rtol=0, atol=1e-12)
    base = flow.backend.to_numpy(flow.backend.normal(flow.backend.key(3), (5, 2), dtype=flow.dtype,
                                                     device=flow.device))
    assert np.allclose(flow.transform(s1, context=one), base, rtol=0, atol=1e-7)
    assert np.allclose(flow.trajectory(x, [flow.T[0] + flow.T[1]], context=c)[0], z, rtol=0, atol=1e-7)


def test_torch_and_jax_agree_and_save_load_round_trips(tmp_path):
    flow = conditional_flow("torch")
    rng = np.random.default_rng(8)
    x, c = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    expected = flow.log_prob(x, context=c)
    path = flow.save(tmp_path / "cond.safetensors")
    for backend in ("torch", "jax"):
        loaded = otflow.load(path, backend=backend)
        assert loaded.context_dim == 2
        # chunks of 4: on JAX the last chunk and its contexts are padded to 4 rows
        assert np.allclose(loaded.log_prob(x, context=c, batch_size=4), expected, rtol=0, atol=1e-8), backend
    # and back: saved from JAX, loaded on torch
    jax_path = otflow.load(path, backend="jax").save(tmp_path / "from_jax.safetensors")
    assert np.allclose(otflow.load(jax_path, backend="torch").log_prob(x, context=c), expected, rtol=0, atol=1e-8)


def test_flow_context_errors():
    flow = conditional_flow("torch")
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="conditional.*pass context="):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="conditional.*pass context="):
        flow.sample(3)
    with pytest.raises(ValueError, match="2 rows but there are 3 points"):
        flow.log_prob(x, context=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"context must have shape \(n, 2\)"):
        flow.log_prob(x, context=np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        flow.log_prob(x, context=np.full(2, np.nan))
    plain = Flow.from_velocity(MLP((2,), hidden=(4,)), backend="torch")
    with pytest.raises(ValueError, match="unconditional.*context= does not apply"):
        plain.log_prob(x, context=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="context_dim=0"):
        Flow(plain.fields, plain.params, backend="torch", context_shift=[0.0])


# ---- the loss ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", pytest.param("jax", marks=pytest.mark.slow)])  # JAX: two compilations
def test_adjoint_gradient_equals_direct_gradient_with_context(backend):
    b = get_backend(backend)
    flow = conditional_flow(backend, standardized=False, blocks=1)
    rng = np.random.default_rng(9)
    f64 = b.namespace().float64
    x, c, eps = (b.asarray(rng.normal(size=(4, 2)), dtype=f64) for _ in range(3))

    def grads(gradient):
        def loss(params):
            return rnode_loss(flow.fields, params, x, eps, T=list(flow.T), backend=b, context=c,
                              solver_kwargs=dict(method="rk4", n_steps=8, gradient=gradient)).loss

        value, g = b.jit(b.value_and_grad(loss))(list(flow.params))
        return float(b.to_numpy(value)), np.concatenate([np.ravel(b.to_numpy(a)) for a in b.tree_leaves(g)])

    v_direct, g_direct = grads("direct")
    v_adjoint, g_adjoint = grads("adjoint")
    assert v_adjoint == pytest.approx(v_direct, rel=1e-12)
    # rk4's discrete forward pass against the continuous adjoint's rk4 backward solve: O(h⁴)
    assert np.allclose(g_adjoint, g_direct, rtol=1e-4, atol=1e-6)
    assert np.max(np.abs(g_direct)) > 1e-3


def test_rnode_loss_context_errors():
    flow = conditional_flow("torch", standardized=False)
    b = flow.backend
    x = b.asarray(np.zeros((3, 2)), dtype=flow.dtype)
    with pytest.raises(ValueError, match="conditional.*pass context="):
        rnode_loss(flow.fields, flow.params, x, x, T=[1.0, 1.0], backend=b)
    with pytest.raises(ValueError, match=r"\(3, 2\), got \(2, 2\)"):
        rnode_loss(flow.fields, flow.params, x, x, T=[1.0, 1.0], backend=b, context=x[:2])


# ---- the data ---------------------------------------------------------------------------------
def test_split_standardization_and_batches_keep_rows_with_their_contexts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 2)) * [3.0, 1.0] + 5.0
    c = np.stack([2 * x[:, 0], x[:, 1] - x[:, 0]], axis=1)  # a function of the row
    source = read_data(x)
    data = prepare_data(source, FitOptions(val_fraction=0.2), np.random.default_rng(1), validate_context(c, source))
    raw_x = data.train * data.scale + data.shift
    raw_c = data.context * data.context_scale + data.context_shift
    assert np.allclose(raw_c, np.stack([2 * raw_x[:, 0], raw_x[:, 1] - raw_x[:, 0]], axis=1))
    assert np.allclose(data.val_context, np.stack([2 * data.val[:, 0], data.val[:, 1] - data.val[:, 0]], axis=1))
    assert np.allclose(data.context.mean(axis=0), 0) and np.allclose(data.context.std(axis=0), 1)
    b = get_backend("numpy")
    batch = sample_batch(data, np.random.default_rng(2), 16, b, np.float64, None)
    assert batch.shape == (16, 4)
    bx = batch[:, :2] * data.scale + data.shift
    bc = batch[:, 2:] * data.context_scale + data.context_shift
    assert np.allclose(bc, np.stack([2 * bx[:, 0], bx[:, 1] - bx[:, 0]], axis=1))
    # a data-parallel process's part is its rows of the whole batch, contexts included
    part = sample_batch(data, np.random.default_rng(2), 16, b, np.float64, None, part=slice(8, 16))
    assert np.array_equal(part, batch[8:16])


def test_fit_refuses_bad_contexts():
    x, c = gaussian_data(40, 0)
    with pytest.raises(ValueError, match="39 rows but the data have 40"):
        otflow.fit(x, context=c[:39], max_iters=1)
    bad = c.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        otflow.fit(x, context=bad, max_iters=1)
    with pytest.raises(ValueError, match=r"2-D.*c\[:, None\]"):
        otflow.fit(x, context=c[:, 0], max_iters=1)
    with pytest.raises(ValueError, match="image data is not supported yet"):
        otflow.fit(np.zeros((4, 3, 3), dtype=np.uint8), context=np.zeros((4, 1)), max_iters=1)
    with pytest.raises(ValueError, match="embedded data set"):
        otflow.fit("moons", context=np.zeros((4, 1)), max_iters=1)
    with pytest.raises(ValueError, match="coupling='ot'.*conditional"):
        otflow.fit(x, context=c, objective="flow-matching", coupling="ot", max_iters=1, backend="torch")


def test_fit_resume_with_context_is_exact_and_checks_the_context(tmp_path):
    x, c = gaussian_data(200, 1)
    opts = dict(objective="rnode", backend="torch", hidden=(8,), batch_size=32, method="rk4", steps=2, eval_every=2, quiet=True,
                val_fraction=0.1, eval_rtol=1e-4, eval_atol=1e-4)
    whole = otflow.fit(x, context=c, max_iters=4, **opts)
    ck = str(tmp_path / "ck.safetensors")
    otflow.fit(x, context=c, max_iters=2, checkpoint=ck, **opts)
    resumed = otflow.fit(x, context=c, resume=ck, max_iters=4, backend="torch")
    for a, b in zip(resumed.backend.tree_leaves(resumed.params), whole.backend.tree_leaves(whole.params)):
        assert np.array_equal(resumed.backend.to_numpy(a), whole.backend.to_numpy(b))
    assert whole.context_dim == 1 and "val_nll" in whole.history[-1]
    with pytest.raises(ValueError, match="context of length 1.*no context"):
        otflow.fit(x, resume=ck, max_iters=4, backend="torch")
    with pytest.raises(ValueError, match="context of length 1.*context of length 2"):
        otflow.fit(x, context=np.concatenate([c, c], axis=1), resume=ck, max_iters=4, backend="torch")


def test_conditional_flow_matching_warm_starts_an_rnode_run():
    """fit(x, context=c, init=fm): the RNODE run starts from the conditional flow-matching
    flow (the same log-density before any step) and keeps its context standardization."""
    x, c = gaussian_data(300, 3)
    opts = dict(backend="torch", hidden=(8,), batch_size=32, quiet=True, val_fraction=0.0, dtype="float64")
    # standardized explicitly (these data are on unit scale, which "auto" leaves as they are)
    fm = otflow.fit(x, context=c, objective="flow-matching", max_iters=3, standardize=True, **opts)
    assert fm.context_scale is not None
    tuned = otflow.fit(x, context=c, init=fm, max_iters=1, lr=1e-12, method="rk4", steps=2, **opts)
    assert np.allclose(tuned.log_prob(x[:5], context=c[:5]), fm.log_prob(x[:5], context=c[:5]), rtol=0, atol=1e-8)
    assert np.allclose(tuned.backend.to_numpy(tuned.context_scale), fm.backend.to_numpy(fm.context_scale))
    with pytest.raises(ValueError, match="init: the flow takes a context of length 1.*run's contexts have 0"):
        otflow.fit(x, init=fm, max_iters=1, **opts)


# ---- the closed form --------------------------------------------------------------------------
def _fit_kl(context: bool, objective: str, backend: str, max_iters: int, **extra) -> float:
    x, c = gaussian_data(2000, 0)
    flow = otflow.fit(x, context=c if context else None, backend=backend, objective=objective, max_iters=max_iters,
                      hidden=(32, 32), batch_size=256, lr=3e-3, quiet=True, val_fraction=0.0, dtype="float64",
                      eval_rtol=1e-5, eval_atol=1e-5, seed=0, **extra)
    if context:
        return average_kl(lambda xs, cc: flow.log_prob(xs, context=cc))
    return average_kl(lambda xs, cc: flow.log_prob(xs))


def test_conditional_flow_matching_fit_is_close_to_the_closed_form():
    """Conditional flow matching (JAX, 600 iterations): the average KL to N(A c + b, Σ) over
    held-out contexts is small; the same fit ignoring c cannot beat I(x; c) ≈ 1.93 nats."""
    kl = _fit_kl(True, "flow-matching", "jax", 600)
    ignored = _fit_kl(False, "flow-matching", "jax", 600)
    assert kl < 0.15
    assert ignored > 0.8 * MUTUAL_INFORMATION  # Monte-Carlo average over 8 contexts, not the exact bound
    assert ignored > kl + 1.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_conditional_rnode_fit_is_close_to_the_closed_form(backend):
    """The RNODE objective (rk4, 8 steps, 800 iterations): KL below 0.1 nats; c ignored ≥ 1 nat
    worse (measured on JAX: 0.022 and 1.89 nats)."""
    kl = _fit_kl(True, "rnode", backend, 800, method="rk4", steps=8)
    ignored = _fit_kl(False, "rnode", backend, 800, method="rk4", steps=8)
    assert kl < 0.1
    assert ignored > kl + 1.0


# ---- the command line ---------------------------------------------------------------------------
def test_cli_fits_samples_and_evaluates_a_conditional_flow(tmp_path, capsys):
    x, c = gaussian_data(200, 2)
    table = np.concatenate([x[:, :1], c, x[:, 1:]], axis=1)  # the context is column 1
    csv = tmp_path / "data.csv"
    np.savetxt(csv, table, delimiter=",")
    model = tmp_path / "model.safetensors"
    assert main(["fit", str(csv), "--context-columns", "1", "--backend", "torch", "--objective", "rnode", "--max-iters", "2",
                 "--method", "rk4", "--steps", "2", "--batch-size", "32", "--quiet", "--set", "hidden=[8]",
                 "-o", str(model)]) == 0
    flow = otflow.load(model, backend="torch")
    assert flow.context_dim == 1
    out = tmp_path / "s.npy"
    assert main(["sample", str(model), "-n", "5", "-o", str(out), "--context", "0.5", "--seed", "1"]) == 0
    assert np.allclose(np.load(out), flow.sample(5, context=[0.5], seed=1))
    logp = tmp_path / "lp.npy"
    assert main(["log-prob", str(model), str(csv), "-o", str(logp)]) == 0
    assert np.allclose(np.load(logp), flow.log_prob(x, context=c), rtol=1e-6, atol=1e-6)
    capsys.readouterr()
    assert main(["sample", str(model), "-n", "5", "-o", str(out)]) == 2
    assert "--context" in capsys.readouterr().err
    assert main(["fit", str(csv), "--context-columns", "3", "--max-iters", "1"]) == 2
    assert "out of range" in capsys.readouterr().err
