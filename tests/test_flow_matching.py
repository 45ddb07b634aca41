"""Flow matching (objective="flow-matching") and warm starts (fit(..., init=flow))."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

import otflow
from otflow.base import get_backend
from otflow.cnf import MLP, Flow, FunctionField
from otflow.training.data import prepare_data, read_data
from otflow.training.flow_matching import FlowMatchingBatches, FlowMatchingLoss, ot_coupling
from otflow.training.model import build_model
from otflow.training.options import FitOptions


def test_ot_coupling_is_the_optimal_assignment():
    rng = np.random.default_rng(3)
    x, z = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    paired = ot_coupling(x, z)
    best = min(np.sum((x - z[list(p)]) ** 2) for p in itertools.permutations(range(6)))
    assert np.sum((x - paired) ** 2) == pytest.approx(best, rel=1e-12)
    assert sorted(map(tuple, paired)) == sorted(map(tuple, z))  # a permutation of the draws


def test_ot_batches_pair_closer_than_independent_ones():
    rng = np.random.default_rng(0)
    opts = FitOptions.from_mapping({"objective": "flow-matching"})
    data = prepare_data(read_data(np.random.default_rng(1).normal(size=(500, 3))), opts, rng)
    b = get_backend("numpy")
    costs = {}
    for coupling in ("independent", "ot"):
        pairs = FlowMatchingBatches(coupling)(data, np.random.default_rng(5), 128, b, np.float64, None)
        assert pairs.shape == (128, 2, 3)
        costs[coupling] = np.mean(np.sum((pairs[:, 0] - pairs[:, 1]) ** 2, axis=1))
    # same rows and draws (same generator state), only the pairing differs
    assert costs["ot"] < 0.7 * costs["independent"]


def _time_field(offset: float) -> FunctionField:
    """v(t, x) = t + offset in every coordinate (to read back the time each row saw)."""

    def apply(params, t, x):
        return x * 0.0 + t + offset

    return FunctionField(apply, initial_params=None, event_shape=(2,))


def test_loss_maps_path_time_to_blocks_and_targets(autodiff_backend):
    """Two blocks over [0, T] each: row i at path time s_i is in block floor(2 s_i) at local
    time (2 s_i - k) T, its target velocity (z - x)/(2T)."""
    b = autodiff_backend
    T, batch = 0.7, 64
    rng = np.random.default_rng(2)
    x, z = rng.normal(size=(batch, 2)), rng.normal(size=(batch, 2))
    pairs = b.asarray(np.stack([x, z], axis=1), dtype=b.namespace().float64)
    key = b.key(11)
    loss_fn = FlowMatchingLoss([_time_field(0.0), _time_field(10.0)], T, b)
    loss, aux = loss_fn({"fields": (None, None)}, pairs, key)
    s = b.to_numpy(b.uniform(key, (batch,), dtype=b.namespace().float64))[:, None]
    block = np.minimum(np.floor(2 * s), 1)
    velocity = (2 * s - block) * T + 10.0 * block
    target = (z - x) / (2 * T)
    assert float(b.to_numpy(loss)) == pytest.approx(np.mean((velocity - target) ** 2), rel=1e-10)
    kinetic = 2 * T * 0.5 * np.mean(velocity ** 2)  # Σ_blocks ∫ ½ mean_d v² dt, one sample per row
    assert float(b.to_numpy(aux["kinetic"])) == pytest.approx(kinetic, rel=1e-10)
    assert int(b.to_numpy(aux["nfe"])) == 2 and int(b.to_numpy(aux["status"])) == 0
    assert np.isnan(b.to_numpy(aux["nll"]))


def test_time_power_draws_path_times_toward_the_data(autodiff_backend):
    """time_power=p: row i sits at path time s_i = u_i**p (u_i the uniform draw of the key),
    at the point (1 - s_i) x_i + s_i z_i; the velocity the field sees and the loss follow."""
    b = autodiff_backend
    f64 = b.namespace().float64
    T, batch, power = 0.5, 64, 2.5
    rng = np.random.default_rng(7)
    x, z = rng.normal(size=(batch, 2)), rng.normal(size=(batch, 2))
    pairs = b.asarray(np.stack([x, z], axis=1), dtype=f64)
    key = b.key(5)
    point_field = FunctionField(lambda params, t, y: y, initial_params=None, event_shape=(2,))  # v = ψ(s)
    loss, aux = FlowMatchingLoss([point_field], T, b, time_power=power)({"fields": (None,)}, pairs, key)
    s = b.to_numpy(b.uniform(key, (batch,), dtype=f64))[:, None] ** power
    velocity = (1 - s) * x + s * z
    assert float(b.to_numpy(loss)) == pytest.approx(np.mean((velocity - (z - x) / T) ** 2), rel=1e-10)
    assert float(b.to_numpy(aux["kinetic"])) == pytest.approx(T * 0.5 * np.mean(velocity ** 2), rel=1e-10)
    assert np.median(s) < 0.5 ** power * 1.5  # most rows near the data end


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), True, "2"])
def test_time_power_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError, match="time_power must be a finite positive number"):
        FlowMatchingLoss([_time_field(0.0)], 1.0, get_backend("numpy"), time_power=bad)


@pytest.mark.parametrize("conditioning", ["concatsquash", "concat"])
def test_mlp_row_times_equal_row_by_row_calls(autodiff_backend, conditioning):
    """An MLP takes a column of times directly; the result equals calling it row by row."""
    b = autodiff_backend
    f64 = b.namespace().float64
    mlp = MLP((3,), hidden=(8,), conditioning=conditioning, zero_last=False)
    params = mlp.init(b, b.key(0), dtype=f64)
    rng = np.random.default_rng(4)
    pairs = b.asarray(rng.normal(size=(16, 2, 3)), dtype=f64)
    wrapped = FunctionField(mlp.apply, initial_params=params, event_shape=(3,))
    direct = FlowMatchingLoss([mlp], 1.0, b)({"fields": (params,)}, pairs, b.key(1))[0]
    by_rows = FlowMatchingLoss([wrapped], 1.0, b)({"fields": (params,)}, pairs, b.key(1))[0]
    assert float(b.to_numpy(direct)) == pytest.approx(float(b.to_numpy(by_rows)), rel=1e-12)


def _gaussian(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) @ np.array([[1.0, 0.0], [0.8, 0.6]]) + np.array([1.0, -2.0])


#: entropy of the Gaussian above: ½ log det(2πe Σ), Σ = AᵀA with det A = 0.6
GAUSSIAN_ENTROPY = float(np.log(2 * np.pi * np.e) + np.log(0.6))


def test_flow_matching_fit_learns_a_gaussian(autodiff_backend):
    """Simulation-free training reaches the true entropy's neighbourhood, measured by the
    exact likelihood of validation rows."""
    flow = otflow.fit(_gaussian(4000, 0), backend=autodiff_backend, objective="flow-matching", coupling="ot", hidden=(32, 32),
                      max_iters=400, batch_size=256, lr=3e-3, eval_every=400, val_points=500, quiet=True)
    assert isinstance(flow, Flow)
    records = flow.history
    assert all(np.isnan(r["nll"]) for r in records)  # no likelihood during simulation-free training
    assert records[-1]["nfe_forward"] == 1
    test = _gaussian(2000, 1)
    nll = -float(np.mean(flow.log_prob(test)))
    assert nll - GAUSSIAN_ENTROPY < 0.1
    assert np.mean([r["loss"] for r in records[-20:]]) < 0.8 * np.mean([r["loss"] for r in records[:20]])


def test_warm_start_keeps_the_flow_and_fine_tunes(tmp_path):
    x = _gaussian(3000, 0)
    fm = otflow.fit(x, backend="torch", objective="flow-matching", hidden=(16, 16), max_iters=150, lr=3e-3,
                    eval_every=150, val_points=300, quiet=True)
    # a one-iteration run with a negligible learning rate starts from (and stays at) fm's parameters
    same = otflow.fit(x, backend="jax", init=fm, hidden=(16, 16), max_iters=1, lr=1e-12, val_fraction=0.0,
                      method="rk4", steps=4, quiet=True)
    probe = _gaussian(200, 7)
    np.testing.assert_allclose(same.log_prob(probe), fm.log_prob(probe), rtol=1e-4, atol=1e-4)
    # from a file too, and fine-tuning with RNODE improves (or keeps) the likelihood
    path = fm.save(tmp_path / "fm.safetensors")
    tuned = otflow.fit(x, backend="torch", init=path, hidden=(16, 16), max_iters=60, lr=1e-3, eval_every=60,
                       val_points=300, method="rk4", steps=4, quiet=True)
    assert tuned.fit_info["best_val_nll"] <= fm.fit_info["best_val_nll"] + 0.02


def test_warm_start_refuses_another_architecture():
    fm = Flow.from_velocity(MLP((2,), hidden=(8,)), backend="numpy")
    with pytest.raises(ValueError, match=r"hidden.*\(8,\).*hidden=\[8\]|hidden=\(8,\)|hidden"):
        otflow.fit(_gaussian(100, 0), backend="torch", init=fm, hidden=(16,), max_iters=1, quiet=True)
    with pytest.raises(TypeError, match="init must be an otflow.Flow"):
        otflow.fit(_gaussian(100, 0), backend="torch", init=3, max_iters=1, quiet=True)


@pytest.mark.parametrize("options, match", [
    ({"objective": "rnode", "coupling": "ot"}, "coupling='ot' pairs data and noise for flow matching; the 'rnode'"),
    ({"coupling": "ot", "learn_T": True}, "with learn_T=True objective='auto' trains with RNODE alone"),
    ({"objective": "flow-matching+rnode", "learn_T": True}, r"learn_T=True does not apply to objective='flow-matching\+rnode'"),
    ({"objective": "flow-matching", "coupling": "sinkhorn"}, "coupling"),
    ({"objective": "flow-matching", "learn_T": True}, "learn_T=True does not apply"),
    ({"objective": "flow-matching", "lambda_kinetic": 0.1}, "lambda_kinetic.*flow-matching"),
    ({"objective": "flow-matching", "method": "rk4"}, "method.*flow-matching"),
    ({"objective": "maximum-likelihood"}, "objective"),
])
def test_objective_options_are_checked(options, match):
    with pytest.raises(ValueError, match=match):
        otflow.fit(_gaussian(100, 0), backend="torch", max_iters=1, quiet=True, **options)


def test_build_model_picks_the_objective():
    b = get_backend("numpy")
    rng = np.random.default_rng(0)
    opts = FitOptions.from_mapping({"objective": "flow-matching", "n_blocks": 2})
    data = prepare_data(read_data(_gaussian(100, 0)), opts, rng)
    model = build_model(opts, data, b, np.float64, None)
    assert isinstance(model.loss, FlowMatchingLoss) and isinstance(model.batches, FlowMatchingBatches)
    assert model.batches.coupling == "independent"
