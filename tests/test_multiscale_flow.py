"""MultiscaleFlow: FFJORD's multiscale image model as a flow object — its densities against the
multiscale functions and brute force, bits/dim against their formulas, no recompilation for new
parameters, save/load on and across backends (tiny images, float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import otflow
from otflow import FunctionField
from otflow.base import CapabilityError
from otflow.cnf import (MultiscaleFlow, MultiscaleSpec, SolverOptions, dequantize, multiscale_log_prob,
                        standard_normal_logpdf)
from otflow.cnf.multiscale import split_latent, to_image_layout
from otflow.cnf.serialize import ModelFileError, read_file, write_file

#: two scales: a block on (1, 4, 4), squeeze, a block on (4, 2, 2), factor-out, a block on (2, 2, 2)
SPEC = MultiscaleSpec((1, 4, 4), n_scales=2, blocks_per_scale=1, widths=(8,), alpha=1e-3)
#: a fixed-step solver: the same steps in every computation compared, cheap to compile on JAX
RK4 = SolverOptions(method="rk4", n_steps=2, rtol=None, atol=None)
RK4_KWARGS = dict(method="rk4", n_steps=2)
T = (0.5, 0.4, 0.3)
#: eager (uncompiled) or many-compile checks: torch by default, JAX in the slow run (each of
#: JAX's eager solves compiles; the compiled evaluation paths run on JAX in the default run)
TORCH_THEN_SLOW_JAX = ["torch", pytest.param("jax", marks=pytest.mark.slow)]


def _params(b, spec=SPEC, seed=0, device=None, scale=1.0):
    """Non-zero float64 parameters drawn on the host, moved to ``b``."""
    host = otflow.get_backend("numpy")
    tree = spec.init(host, host.key(seed), dtype=np.float64, zero_last=False)
    return b.tree_map(lambda a: b.asarray(scale * np.asarray(a), device=device), tree)


def _flow(b, device=None, spec=SPEC, **kw):
    kw = dict(dict(dtype="float64", T=T, eval_solver=RK4), **kw)
    return MultiscaleFlow(spec, _params(b, spec, device=device), backend=b, device=device, **kw)


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.02, 0.98, size=shape)


def _levels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.uint8)


# ------------------------------------------------------------------------------------------
# densities and transport


@pytest.mark.parametrize("name", TORCH_THEN_SLOW_JAX)
def test_log_prob_is_the_multiscale_log_density(name):
    """(JAX's log_prob equals torch's in the default run: test_torch_and_jax_agree_on_the_same_parameters.)"""
    pytest.importorskip(name)
    b = otflow.get_backend(name)
    flow = _flow(b)
    y = _pixels((3, 1, 4, 4))
    want = b.jit(lambda p, y: multiscale_log_prob(SPEC, SPEC.fields(), p, y, T=T, solver_kwargs=RK4_KWARGS))(
        flow.params, b.asarray(y))
    np.testing.assert_allclose(flow.log_prob(y), b.to_numpy(want), rtol=1e-12)
    assert flow.last_nfe == 3 * 2 * 4  # three blocks, two RK4 steps of four stages


def test_transform_inverse_and_sampling(autodiff_backend, device):
    b = autodiff_backend
    fine = _flow(b, device, eval_solver=SolverOptions(method="rk4", n_steps=32, rtol=None, atol=None))
    y = _pixels((3, 1, 4, 4))
    z = fine.transform(y)
    assert z.shape == (3, SPEC.dim)
    np.testing.assert_allclose(fine.inverse(z), y, atol=1e-8)
    images = fine.sample(3, seed=3)
    assert images.shape == (3, 1, 4, 4) and images.min() >= 0 and images.max() <= 1
    levels = fine.sample_levels(3, seed=3)
    assert levels.dtype == np.uint8 and levels.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(levels, np.clip(np.floor(images * 256), 0, 255))
    native = fine.with_output("native").sample(3, seed=3)
    assert b.owns(native)
    np.testing.assert_array_equal(b.to_numpy(native), images)


@pytest.mark.parametrize("name", TORCH_THEN_SLOW_JAX)
def test_log_prob_is_the_change_of_variables_of_the_transform(name):
    """log p(y) = log N(z) + log|det ∂z/∂y| with the Jacobian of the whole map (logit, blocks,
    squeeze, factor-out) by central differences of transform, all perturbations in one call."""
    pytest.importorskip(name)
    b, device = otflow.get_backend(name), None
    spec = MultiscaleSpec((1, 2, 2), n_scales=2, blocks_per_scale=1, widths=(4,), alpha=0.05)
    tight = SolverOptions(rtol=1e-12, atol=1e-12)
    flow = _flow(b, device, spec=spec, T=0.8, eval_solver=tight)
    y = _pixels((2, 1, 2, 2), seed=4)
    eps, d = 1e-5, spec.dim
    shifted = [y + s * eps * np.eye(d)[j].reshape(1, 1, 2, 2) for j in range(d) for s in (1.0, -1.0)]
    z = flow.transform(np.concatenate([y, *shifted]), batch_size=2)
    z0, zs = z[:2], z[2:].reshape(d, 2, 2, d)  # (input j, ±, image, output)
    jac = (zs[:, 0] - zs[:, 1]).transpose(1, 2, 0) / (2 * eps)  # (image, output, input j)
    want = standard_normal_logpdf(np, z0) + np.linalg.slogdet(jac)[1]
    np.testing.assert_allclose(flow.log_prob(y), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", TORCH_THEN_SLOW_JAX)
def test_trajectory_starts_at_the_pixels_and_ends_at_the_latent_in_image_layout(name):
    pytest.importorskip(name)
    b, device = otflow.get_backend(name), None
    flow = _flow(b, device)
    y = _pixels((2, 1, 4, 4), seed=5)
    frames = flow.trajectory(y, [0.0, 0.5, 0.7, sum(T)])
    assert frames.shape == (4, 2, 1, 4, 4)
    np.testing.assert_allclose(frames[0], y, atol=1e-12)
    last = flow.trajectory(y, [sum(T)], space="logit")[0]
    parts = split_latent(SPEC, b.asarray(flow.transform(y), device=device))
    want = to_image_layout(SPEC, parts[-1], parts[:-1], len(SPEC.steps()))
    np.testing.assert_allclose(last, b.to_numpy(want), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="times must increase"):
        flow.trajectory(y, [0.0, 2.0])


def test_hutchinson_evaluation_is_exact_for_a_linear_field(autodiff_backend, device):
    """v = a·x: Jacobian a·I, so every Rademacher probe gives the trace."""
    b = autodiff_backend
    fields = tuple(FunctionField(lambda p, t, x: p * x, None, s) for s in SPEC.block_shapes())
    params = tuple(b.asarray(np.asarray(a), device=device) for a in (0.3, -0.2, 0.5))
    flow = MultiscaleFlow(SPEC, params, fields=fields, backend=b, device=device, dtype="float64", eval_solver=RK4)
    y = _pixels((3, 1, 4, 4), seed=6)
    np.testing.assert_allclose(flow.log_prob(y, estimator="hutchinson", seed=2), flow.log_prob(y), rtol=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        flow.log_prob(y, estimator="hutch")


@pytest.mark.parametrize("name", TORCH_THEN_SLOW_JAX)
def test_hutchinson_bits_per_dim_reports_the_estimators_spread(name):
    pytest.importorskip(name)
    b = otflow.get_backend(name)
    fields = tuple(FunctionField(lambda p, t, x: p * x, None, s) for s in SPEC.block_shapes())
    params = tuple(b.asarray(np.asarray(a)) for a in (0.3, -0.2, 0.5))
    flow = MultiscaleFlow(SPEC, params, fields=fields, backend=b, dtype="float64", eval_solver=RK4)
    levels = _levels((3, 1, 4, 4), seed=6)
    exact = flow.bits_per_dim(levels)
    hutchinson = flow.bits_per_dim(levels, estimator="hutchinson")
    np.testing.assert_allclose(hutchinson.per_image, exact.per_image, rtol=1e-12)
    assert hutchinson.standard_error == pytest.approx(exact.standard_error, rel=1e-10)
    gaussian = flow.bits_per_dim(levels, estimator="hutchinson", probe="gaussian")  # a·‖ε‖² ≠ a·d: not exact
    assert np.min(np.abs(gaussian.per_image - exact.per_image)) > 1e-6


def test_failed_solves_raise_or_give_nan_per_image():
    """Two steps allowed: the adaptive solve cannot finish; 'raise' names remedies, 'nan' warns."""
    pytest.importorskip("torch")
    flow = _flow(otflow.get_backend("torch"), eval_solver=SolverOptions(rtol=1e-10, atol=1e-10, max_steps=2))
    y = _pixels((2, 1, 4, 4), seed=12)
    with pytest.raises(otflow.SolverError, match="on_failure='nan'"):
        flow.log_prob(y)
    with pytest.warns(RuntimeWarning, match="2 of 2 points failed"):
        assert np.all(np.isnan(flow.log_prob(y, on_failure="nan")))


# ------------------------------------------------------------------------------------------
# bits per dimension


def test_bits_per_dim_is_the_dequantized_formula_and_the_midpoint_number_differs(autodiff_backend, device):
    b = autodiff_backend
    flow = _flow(b, device)
    levels = _levels((4, 4, 4), seed=7)  # (N, H, W) for one channel
    x = b.asarray(levels[:, None].astype(np.float64), device=device)
    d = SPEC.dim
    y = b.to_numpy(dequantize(b.key(11), x, backend=b))
    by_hand = -(flow.log_prob(y) - d * math.log(256)) / (d * math.log(2))
    bpd = flow.bits_per_dim(levels, seed=11)
    np.testing.assert_allclose(bpd.per_image, by_hand, rtol=1e-12)
    assert bpd.mean == pytest.approx(by_hand.mean(), rel=1e-12)
    assert bpd.standard_error == pytest.approx(by_hand.std(ddof=1) / 2, rel=1e-12)

    midpoint = flow.midpoint_bits_per_dim(levels)
    mid_by_hand = -(flow.log_prob((levels[:, None] + 0.5) / 256) - d * math.log(256)) / (d * math.log(2))
    np.testing.assert_allclose(midpoint.per_image, mid_by_hand, rtol=1e-12)
    assert np.max(np.abs(midpoint.per_image - bpd.per_image)) > 1e-4


def test_bad_pixels_and_levels_get_clear_errors(autodiff_backend, device):
    flow = _flow(autodiff_backend, device)
    with pytest.raises(TypeError, match="integer dtype.*bits_per_dim"):
        flow.log_prob(_levels((2, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        flow.log_prob(_pixels((2, 1, 4, 4)) * 255)
    with pytest.raises(ValueError, match=r"shape \(n, 1, 4, 4\)"):
        flow.log_prob(_pixels((2, 4, 4)))
    with pytest.raises(ValueError, match=r"0 … 15"):
        flow.bits_per_dim(_levels((2, 4, 4)), n_bins=16)
    with pytest.raises(ValueError, match="whole numbers"):
        flow.bits_per_dim(_pixels((2, 4, 4)))
    with pytest.raises(ValueError, match=r"levels must have shape \(N, 1, 4, 4\)"):
        flow.bits_per_dim(_levels((2, 5, 4)))


def test_conv_fields_on_the_reference_backend_are_refused_naming_torch_and_jax():
    with pytest.raises(CapabilityError, match="backend='torch'"):
        MultiscaleFlow(SPEC, _params(otflow.get_backend("numpy")), backend="numpy", dtype="float64")


# ------------------------------------------------------------------------------------------
# new parameters: no recompilation


def test_with_parameters_gives_the_new_density_without_recompiling():
    pytest.importorskip("jax")
    b = otflow.get_backend("jax")
    traces = []

    def counted(field):
        def apply(params, t, x):
            traces.append(1)  # runs while JAX traces, not when the compiled function runs
            return field.apply(params, t, x)

        return FunctionField(apply, None, field.event_shape)

    fields = tuple(counted(f) for f in SPEC.fields(zero_last=False))
    flow = MultiscaleFlow(SPEC, _params(b), fields=fields, backend=b, dtype="float64", T=T, eval_solver=RK4)
    y = _pixels((2, 1, 4, 4), seed=8)
    first = flow.log_prob(y)
    n_traces = len(traces)
    assert n_traces > 0
    other = _params(b, seed=3)
    moved = flow.with_parameters(other, T=[0.6, 0.6, 0.6])
    second = moved.log_prob(y)
    assert len(traces) == n_traces
    pytest.importorskip("torch")  # the new density from scratch, on torch (no second compilation)
    fresh = _flow(otflow.get_backend("torch"), T=0.6).with_parameters(_params(otflow.get_backend("torch"), seed=3))
    np.testing.assert_allclose(second, fresh.log_prob(y), rtol=1e-10)
    assert np.max(np.abs(second - first)) > 1e-3


# ------------------------------------------------------------------------------------------
# saving and loading


@pytest.mark.parametrize("name", TORCH_THEN_SLOW_JAX)
def test_save_and_load_round_trip(name, tmp_path):
    pytest.importorskip(name)
    b, device = otflow.get_backend(name), None
    flow = _flow(b, device)
    y = _pixels((2, 1, 4, 4), seed=9)
    path = flow.save(tmp_path / "image.safetensors", metadata={"note": "tiny"})
    header = read_file(path)[1]
    assert header["kind"] == "multiscale" and header["spec"]["image_shape"] == [1, 4, 4]
    assert header["metadata"] == {"note": "tiny"}
    loaded = otflow.load(path, backend=b, device=device)
    assert isinstance(loaded, MultiscaleFlow) and loaded.T == T and loaded.spec == SPEC
    assert loaded.eval_solver == RK4
    np.testing.assert_allclose(loaded.log_prob(y), flow.log_prob(y), rtol=0, atol=0)


def test_torch_and_jax_agree_on_the_same_parameters():
    """The same float64 parameters give the same log p on both backends."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    y = _pixels((2, 1, 4, 4), seed=10)
    torch_flow, jax_flow = _flow(otflow.get_backend("torch")), _flow(otflow.get_backend("jax"))
    np.testing.assert_allclose(torch_flow.log_prob(y), jax_flow.log_prob(y), rtol=1e-10)


def test_files_cross_load_between_backends(tmp_path):
    """A file saved on torch loads on JAX (and back) with the same log p (float64)."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    y = _pixels((2, 1, 4, 4), seed=10)
    torch_flow = _flow(otflow.get_backend("torch"))
    path = torch_flow.save(tmp_path / "torch.safetensors")
    on_jax = otflow.load(path, backend="jax")
    assert on_jax.backend.name == "jax"
    np.testing.assert_allclose(on_jax.log_prob(y), torch_flow.log_prob(y), rtol=1e-10)
    back = otflow.load(on_jax.save(tmp_path / "jax.safetensors"), backend="torch")
    np.testing.assert_allclose(back.log_prob(y), torch_flow.log_prob(y), rtol=1e-10)


def test_vector_flow_files_still_load_as_flows(tmp_path):
    pytest.importorskip("torch")
    flow = otflow.Flow.from_velocity(otflow.MLP((2,), hidden=(4,), zero_last=False), backend="torch",
                                     dtype="float64")
    loaded = otflow.load(flow.save(tmp_path / "vector.safetensors"), backend="torch")
    assert type(loaded) is otflow.Flow
    x = np.random.default_rng(0).normal(size=(3, 2))
    np.testing.assert_allclose(loaded.log_prob(x), flow.log_prob(x), rtol=0, atol=0)


def test_damaged_or_mismatched_image_model_files_get_model_file_errors(tmp_path):
    pytest.importorskip("torch")
    flow = _flow(otflow.get_backend("torch"))
    arrays, header = read_file(flow.save(tmp_path / "good.safetensors"))

    def rewrite(name, arrays, header):
        return write_file(tmp_path / name, arrays, header)

    no_spec = {k: v for k, v in header.items() if k != "spec"}
    with pytest.raises(ModelFileError, match="incomplete or from an incompatible version"):
        otflow.load(rewrite("no_spec.safetensors", arrays, no_spec), backend="torch")
    bigger = dict(header, spec=dict(header["spec"], widths=[16]),
                  fields=[dict(f, widths=[16]) for f in header["fields"]])
    with pytest.raises(ModelFileError, match="has shape"):
        otflow.load(rewrite("bigger.safetensors", arrays, bigger), backend="torch")
    missing = {k: v for k, v in arrays.items() if not k.startswith("params.2.")}
    with pytest.raises(ModelFileError, match="lacks the array 'params.2"):
        otflow.load(rewrite("missing.safetensors", missing, header), backend="torch")
    with pytest.raises(ModelFileError, match="kind 'video'"):
        otflow.load(rewrite("video.safetensors", arrays, dict(header, kind="video")), backend="torch")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        otflow.load(tmp_path / "cut.safetensors", backend="torch")
