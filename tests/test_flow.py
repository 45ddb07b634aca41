"""The Flow object: closed forms for linear fields, inverse, cross-backend agreement, failures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import otflow
from _helpers import backend_available as _has
from otflow import MLP, Flow

A = np.array([[-0.3, 0.8], [-0.5, 0.2]])
T = 0.7
TIGHT = dict(rtol=1e-9, atol=1e-9)


def linear_flow(backend, T=T, **solver):
    def apply(params, t, x):
        return x @ params

    params = backend.asarray(np.ascontiguousarray(A.T))
    flow = Flow.from_velocity(apply, params, event_shape=(2,), backend=backend, dtype="float64", T=T)
    return flow.with_eval_solver(**(solver or TIGHT))


def _x(n=64, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2))


def test_linear_field_closed_forms(autodiff_backend):
    flow = linear_flow(autodiff_backend)
    x = _x()
    M = scipy.linalg.expm(A * T)
    z = flow.transform(x)
    np.testing.assert_allclose(z, x @ M.T, rtol=0, atol=1e-8)
    logp = flow.log_prob(x)
    expected = scipy.stats.multivariate_normal(np.zeros(2), np.eye(2)).logpdf(x @ M.T) + T * np.trace(A)
    np.testing.assert_allclose(logp, expected, rtol=0, atol=1e-7)
    assert isinstance(logp, np.ndarray) and logp.shape == (64,)


def test_linear_field_transform_on_reference_backend():
    """Transport needs no autodiff: the reference backend runs it; log_prob needs a derivative."""
    flow = linear_flow(otflow.get_backend("numpy"))
    x = _x()
    np.testing.assert_allclose(flow.transform(x), x @ scipy.linalg.expm(A * T).T, atol=1e-8)
    with pytest.raises(otflow.CapabilityError, match="torch"):
        flow.log_prob(x)


def test_inverse_roundtrip_error_scales_with_tolerance(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(16, 16), zero_last=False)
    params = field.init(b, b.key(3), dtype=b.namespace().float64)
    x = _x(32, 1)
    errors = []
    tols = (1e-4, 1e-7, 1e-10)
    for tol in tols:
        flow = Flow([field], [params], backend=b, dtype="float64").with_eval_solver(rtol=tol, atol=tol)
        errors.append(np.max(np.abs(flow.inverse(flow.transform(x)) - x)))
    # proportional to the tolerance (forward and backward step sequences differ, so not monotone in detail)
    assert all(e <= 30 * tol for e, tol in zip(errors, tols)), errors
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] <= 1e-5


def test_transform_matches_backward_ode(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(16,), zero_last=False)
    params = field.init(b, b.key(4), dtype=b.namespace().float64)
    flow = Flow([field], [params], backend=b, dtype="float64").with_eval_solver(**TIGHT)
    x = _x(16, 2)
    z = flow.transform(x)
    back = otflow.odeint(lambda t, y, p: field.apply(p, t, y), b.asarray(z), [1.0, 0.0], args=params, **TIGHT)
    np.testing.assert_allclose(b.to_numpy(back.ys[-1, ...]), x, atol=1e-8)


def test_standardization_is_undone_and_counted():
    b = otflow.get_backend("torch") if _has("torch") else pytest.skip("needs torch")
    shift, scale = np.array([1.0, -2.0]), np.array([2.0, 0.5])
    plain = linear_flow(b)
    std = Flow(plain.fields, plain.params, backend=b, dtype="float64", T=T, shift=shift, scale=scale
               ).with_eval_solver(**TIGHT)
    x = _x() * scale + shift
    np.testing.assert_allclose(std.log_prob(x), plain.log_prob((x - shift) / scale) - np.log(scale).sum(), atol=1e-9)
    np.testing.assert_allclose(std.inverse(std.transform(x)), x, atol=1e-7)


@pytest.mark.skipif(not (_has("torch") and _has("jax")), reason="needs torch and jax")
def test_cross_backend_same_log_prob_and_samples():
    field = MLP((2,), hidden=(16, 16), zero_last=False)
    tb, jb = otflow.get_backend("torch"), otflow.get_backend("jax")
    params_t = field.init(tb, tb.key(0), dtype=tb.namespace().float64)
    params_j = jb.tree_map(lambda p: jb.asarray(tb.to_numpy(p)), params_t)
    ft = Flow([field], [params_t], backend=tb, dtype="float64").with_eval_solver(**TIGHT)
    fj = Flow([field], [params_j], backend=jb, dtype="float64").with_eval_solver(**TIGHT)
    x = _x(50, 5)
    np.testing.assert_allclose(ft.log_prob(x), fj.log_prob(x), rtol=0, atol=1e-6)
    z = _x(20, 6)
    np.testing.assert_allclose(ft.inverse(z), fj.inverse(z), rtol=0, atol=1e-6)


def test_sample_consistent_with_transform(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(16,), zero_last=False)
    params = field.init(b, b.key(7), dtype=b.namespace().float64)
    flow = Flow([field, field], [params, params], backend=b, dtype="float64", T=[0.5, 0.5]).with_eval_solver(**TIGHT)
    xs = flow.sample(40, seed=1)
    z = b.to_numpy(b.normal(b.key(1), (40, 2), dtype=b.namespace().float64))
    np.testing.assert_allclose(flow.transform(xs), z, atol=1e-7)
    # log p(x) = log N(z) + (log-det of the map), consistent with the two-block chain
    logp = flow.log_prob(xs)
    assert np.all(np.isfinite(logp))
    np.testing.assert_array_equal(flow.sample(40, seed=1), xs)


def test_batch_composition_affects_values_only_within_tolerance(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(16,), zero_last=False)
    params = field.init(b, b.key(8), dtype=b.namespace().float64)
    flow = Flow([field], [params], backend=b, dtype="float64").with_eval_solver(rtol=1e-9, atol=1e-9)
    x = _x(30, 9)
    alone = flow.log_prob(x[:5])
    mixed = flow.log_prob(np.concatenate([x[:5], 3 * _x(25, 10)]))[:5]
    np.testing.assert_allclose(alone, mixed, rtol=0, atol=1e-6)


def test_chunking_gives_the_same_values(autodiff_backend):
    flow = linear_flow(autodiff_backend)
    x = _x(37)
    np.testing.assert_allclose(flow.log_prob(x, batch_size=10), flow.log_prob(x), atol=1e-8)


def test_trajectory_endpoints(autodiff_backend):
    flow = linear_flow(autodiff_backend)
    x = _x(8)
    traj = flow.trajectory(x, [0.0, 0.35, T])
    assert traj.shape == (3, 8, 2)
    np.testing.assert_allclose(traj[0], x, atol=1e-12)
    np.testing.assert_allclose(traj[1], x @ scipy.linalg.expm(A * 0.35).T, atol=1e-8)
    np.testing.assert_allclose(traj[-1], flow.transform(x), atol=1e-8)


def test_native_arrays_in_native_arrays_out(autodiff_backend):
    b = autodiff_backend
    flow = linear_flow(b)
    x = b.asarray(_x(8))
    out = flow.log_prob(x)
    assert b.owns(out)


@pytest.mark.parametrize("bad,exc,match", [
    (np.zeros((4, 3)), ValueError, r"shape \(n, 2\)"),
    (np.zeros(2), ValueError, "single point"),
    (np.zeros((0, 2)), ValueError, "empty"),
    (np.array([[np.nan, 0.0]]), ValueError, "NaN"),
    (np.array([["a", "b"]]), TypeError, "real numbers"),
])
def test_bad_inputs(bad, exc, match):
    flow = linear_flow(otflow.get_backend("numpy"))
    with pytest.raises(exc, match=match):
        flow.transform(bad)


def test_evaluation_failure_policy(autodiff_backend):
    b = autodiff_backend
    flow = linear_flow(b).with_eval_solver(rtol=1e-10, atol=1e-10, max_steps=12)
    x = np.concatenate([_x(3), [[1e6, -1e6]]])
    with pytest.raises(otflow.SolverError, match="on_failure='nan'"):
        flow.log_prob(x)
    # with a budget that ordinary points meet, only the outlier fails
    def fast_blowup(params, t, y):
        xp = b.namespace()
        return y * y * xp.abs(y) * 1e3

    bad = Flow.from_velocity(fast_blowup, (), event_shape=(2,), backend=b, dtype="float64")
    bad = bad.with_eval_solver(max_steps=200)
    with pytest.warns(RuntimeWarning, match="1 of 4 points failed"):
        out = bad.transform(np.array([[0.0, 0.0], [1e-3, 1e-3], [50.0, 50.0], [0.0, 1e-3]]), on_failure="nan")
    assert np.isnan(out[2]).all() and np.isfinite(np.delete(out, 2, axis=0)).all()
    with pytest.raises(ValueError, match="on_failure"):
        flow.log_prob(_x(2), on_failure="ignore")


def test_flow_validation():
    b = otflow.get_backend("numpy")
    field = MLP((2,))
    params = field.init(b, b.key(0), dtype=np.float64)
    with pytest.raises(ValueError, match="T must be"):
        Flow([field], [params], backend=b, T=-1.0)
    with pytest.raises(ValueError, match="parameter trees"):
        Flow([field], [], backend=b)
    with pytest.raises(TypeError, match="Did you mean 'batch_size'"):
        Flow([field], [params], backend=b).transform(_x(2), batchsize=3)
    assert "Flow(blocks=1" in repr(Flow([field], [params], backend=b))
    assert math.isclose(Flow([field], [params], backend=b, scale=[2.0, 4.0]).log_scale_sum, math.log(8.0))
