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


def test_output_setting_decides_the_array_type_of_every_method(autodiff_backend):
    """One flow, one output type: ``"numpy"`` (default) or ``"native"``, whatever the input."""
    b = autodiff_backend
    flow = linear_flow(b)
    x_np, x_native = _x(8), b.asarray(_x(8))

    def outputs(f, x):
        return [f.log_prob(x), f.transform(x), f.inverse(x), f.sample(4), f.trajectory(x, [0.0, T])]

    for x in (x_np, x_native):
        assert all(isinstance(out, np.ndarray) for out in outputs(flow, x))
        native = flow.with_output("native")
        assert native.output == "native" and flow.output == "numpy"
        results = outputs(native, x)
        assert all(b.owns(out) for out in results)
        np.testing.assert_array_equal(b.to_numpy(results[0]), flow.log_prob(x))
    with pytest.raises(ValueError, match="unknown output 'nativ'. Did you mean 'native'"):
        flow.with_output("nativ")
    with pytest.raises(ValueError, match="Did you mean 'numpy'"):
        Flow(flow.fields, flow.params, backend=b, output="nunpy")


def test_sample_numpy_keyword_names_its_replacement(autodiff_backend):
    flow = linear_flow(autodiff_backend)
    with pytest.raises(TypeError, match=r"with_output\('native'\)\.sample\(n\)"):
        flow.sample(4, numpy=False)


def test_declared_attributes(autodiff_backend):
    flow = linear_flow(autodiff_backend)
    assert (flow.history, flow.fit_info, flow.last_nfe) == (None, None, None)
    flow.transform(_x(4))
    nfe = flow.last_nfe
    assert isinstance(nfe, int) and nfe > 0
    flow.log_prob(_x(40), batch_size=10)  # four chunks, each at least one dopri5 step
    assert flow.last_nfe >= 4 * 7


def test_with_parameters_installs_parameters_and_T(autodiff_backend):
    b = autodiff_backend
    flow = linear_flow(b)
    params = b.asarray(np.ascontiguousarray(0.5 * A.T))
    record = [{"it": 0, "loss": 1.0}]
    moved = flow.with_parameters([params], T=0.3, history=record, fit_info={"iterations": 1})
    assert moved.T == (0.3,) and moved.history is record and moved.fit_info == {"iterations": 1}
    assert flow.T == (T,) and flow.history is None  # the original is unchanged
    x = _x(16)
    np.testing.assert_allclose(moved.transform(x), x @ scipy.linalg.expm(0.5 * A * 0.3).T, atol=1e-8)
    fresh = Flow.from_velocity(flow.fields[0], params, backend=b, dtype="float64", T=0.3,
                               eval_solver=flow.eval_solver)
    np.testing.assert_array_equal(moved.log_prob(x), fresh.log_prob(x))
    # T as a backend array (what a learnable log T gives) and one per block
    assert flow.with_parameters([params], T=b.asarray(np.array([0.25]))).T == (0.25,)
    with pytest.raises(ValueError, match="1 fields but 2 parameter trees"):
        flow.with_parameters([params, params])
    for bad in (-1.0, [0.1, 0.2], float("nan"), "x"):
        with pytest.raises(ValueError, match="T must be a positive finite float"):
            flow.with_parameters([params], T=bad)


def test_from_velocity_rejects_misspelled_keywords(autodiff_backend):
    with pytest.raises(TypeError, match="Did you mean 'eval_solver'"):
        Flow.from_velocity(lambda t, x: -x, event_shape=(2,), backend=autodiff_backend, evalsolver=None)
    with pytest.raises(ValueError, match="positive ints"):
        Flow.from_velocity(lambda t, x: -x, event_shape=(0,), backend=autodiff_backend)
    with pytest.raises(TypeError, match="cannot use a int as a velocity field"):
        Flow.from_velocity(3, event_shape=(2,), backend=autodiff_backend)


# ---- the evaluation solver: adaptivity from the solver object ---------------------------------
class Dopri5Copy(otflow.ode.AbstractRungeKutta):
    """A user's method with Dormand–Prince's tableau under another name."""

    name = "my_dopri5"
    tableau = otflow.Dopri5.tableau


def test_eval_solver_method_may_be_a_name_in_any_case_or_a_solver_object(autodiff_backend):
    """``Dopri5()``, ``"DOPRI5"`` and a user's adaptive tableau evaluate exactly as
    ``"dopri5"`` (tolerances passed, the density's error norm applied). Before the fix the
    others counted as fixed-step: their tolerances were dropped and the norm not set."""
    flow = linear_flow(autodiff_backend, rtol=1e-6, atol=1e-6)
    x = _x(32)
    ref = flow.log_prob(x)
    ref_nfe = flow.last_nfe
    for method in ("DOPRI5", otflow.Dopri5(), Dopri5Copy()):
        other = flow.with_eval_solver(method=method)
        assert other.eval_solver.is_adaptive()
        np.testing.assert_array_equal(other.log_prob(x), ref)
        assert other.last_nfe == ref_nfe


def test_fixed_step_eval_solver(autodiff_backend):
    """A fixed-step method by step size: each block's [0, T] in ceil(T/step) equal steps, also
    where compiled code sees T as an array (JAX)."""
    b = autodiff_backend
    flow = linear_flow(b).with_eval_solver(method="rk4", step_size=0.1, rtol=None, atol=None)
    x = _x(8)
    direct = otflow.odeint(lambda t, y, p: y @ p, b.asarray(x), [0.0, T], args=flow.params[0], method="rk4",
                           step_size=0.1)
    np.testing.assert_allclose(flow.transform(x), b.to_numpy(direct.ys[-1]), rtol=0, atol=1e-14)
    assert flow.last_nfe == 4 * 7  # ceil(0.7 / 0.1) steps of 4 evaluations
    np.testing.assert_allclose(flow.transform(x), x @ scipy.linalg.expm(A * T).T, atol=1e-5)


def test_solver_options_validation():
    with pytest.raises(ValueError, match=r"'rk4' is a fixed-step method: rtol do not apply; pass rtol=None"):
        otflow.SolverOptions(method="rk4", rtol=1e-5, n_steps=4)
    with pytest.raises(ValueError, match="exactly one of step_size= or n_steps="):
        otflow.SolverOptions(method="euler")
    with pytest.raises(ValueError, match="n_steps applies to fixed-step methods"):
        otflow.SolverOptions(n_steps=4)
    with pytest.raises(ValueError, match="Did you mean 'dopri5'"):
        otflow.SolverOptions(method="dopri")
    # files written when every method stored rtol = atol = 1e-5 still load
    old = {"method": "rk4", "rtol": 1e-5, "atol": 1e-5, "step_size": None, "n_steps": 8, "max_steps": 4096}
    assert otflow.SolverOptions.from_config(old) == otflow.SolverOptions(method="rk4", n_steps=8)


def test_a_flow_with_a_user_method_cannot_be_saved(tmp_path):
    b = otflow.get_backend("numpy")
    field = MLP((2,), hidden=(4,), zero_last=False)
    flow = Flow([field], [field.init(b, b.key(0), dtype=np.float64)], backend=b, dtype="float64")
    flow = flow.with_eval_solver(**TIGHT)
    with pytest.raises(ValueError, match=r"user-defined method Dopri5Copy .*with_eval_solver\(method='dopri5'\)"):
        flow.with_eval_solver(method=Dopri5Copy()).save(tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()
    # a built-in method given as an object or in capitals is saved under its name
    path = flow.with_eval_solver(method=otflow.Dopri5(), rtol=1e-7).save(tmp_path / "g.safetensors")
    loaded = otflow.load(path, backend="numpy")
    assert loaded.eval_solver == otflow.SolverOptions(method="dopri5", rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(loaded.transform(_x(4)), flow.transform(_x(4)), atol=1e-6)


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
    with pytest.raises(TypeError, match="eval_solver must be an otflow.SolverOptions"):
        Flow([field], [params], backend=b, eval_solver={"rtol": 1e-6})
    with pytest.raises(TypeError, match="Did you mean 'batch_size'"):
        Flow([field], [params], backend=b).transform(_x(2), batchsize=3)
    assert "Flow(blocks=1" in repr(Flow([field], [params], backend=b))
    assert math.isclose(Flow([field], [params], backend=b, scale=[2.0, 4.0]).log_scale_sum, math.log(8.0))
