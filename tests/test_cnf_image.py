"""The image building blocks of the CNF layer: FFJORD's conv field, squeeze, factor-out, logit
preprocessing, bits/dim, and the multiscale log-density against brute force and flattened
computations (tiny images, float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import otflow
from otflow import MLP, FunctionField
from otflow.base import CapabilityError
from otflow.cnf import (ConvField, MultiscaleSpec, bin_midpoints, density_rhs, dequantize, dequantized_bits_per_dim,
                        exact_divergence, factored_log_density, logit_preprocess, logit_transform, merge_channels,
                        midpoint_bits_per_dim, multiscale_inverse, multiscale_log_prob, multiscale_transform,
                        split_channels, squeeze, standard_normal_logpdf, unsqueeze)
from otflow.cnf.fields import CONDITIONINGS, field_from_config
from otflow.cnf.multiscale import FACTOR_OUT, SQUEEZE

#: a fixed-step method for the comparisons (cheap to compile on JAX; adaptive steps could differ between
#: two computations by rounding alone)
MIDPOINT = dict(method="midpoint", n_steps=2)


def _np(b, x):
    return np.asarray(b.to_numpy(x), dtype=np.float64)


def _levels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float64)


def _pixels(b, shape, seed, device=None):
    """Dequantized pixels ``(x + u)/256``, drawn on the host (JAX compiles every draw's shape)."""
    rng = np.random.default_rng(seed)
    return b.asarray((_levels(shape, seed) + rng.uniform(size=shape)) / 256, device=device)


def _to_backend(b, tree, device=None):
    return b.tree_map(lambda a: b.asarray(a, device=device), tree)


def _jacobians(b, fn, x_np, device):
    """Per-row Jacobians ``(batch, D, D)`` of a row-independent ``fn`` by forward-mode columns."""
    batch, d = x_np.shape[0], math.prod(x_np.shape[1:])
    x = b.asarray(x_np, device=device)
    column = b.jit(lambda x, tangent: b.jvp(fn, (x,), (tangent,))[1])  # compiled once on JAX
    columns = []
    for j in range(d):
        basis = np.zeros((batch, d))
        basis[:, j] = 1.0
        columns.append(_np(b, column(x, b.asarray(basis.reshape(x_np.shape), device=device))).reshape(batch, d))
    return np.stack(columns, axis=2)


# ------------------------------------------------------------------------------------------
# squeeze and factor-out


def test_squeeze_moves_each_2x2_patch_into_channels_and_unsqueeze_undoes_it(backend, device):
    x_np = np.random.default_rng(0).normal(size=(2, 3, 4, 6))
    x = backend.asarray(x_np, device=device)
    y = squeeze(x)
    assert tuple(y.shape) == (2, 12, 2, 3)
    y_np = _np(backend, y)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                np.testing.assert_array_equal(y_np[:, 4 * c + 2 * i + j], x_np[:, c, i::2, j::2])
    np.testing.assert_array_equal(_np(backend, unsqueeze(y)), x_np)


def test_squeeze_is_a_permutation_matrix():
    shape = (2, 4, 4)
    d = math.prod(shape)
    basis = np.eye(d).reshape(d, *shape)
    matrix = np.asarray(squeeze(basis)).reshape(d, d).T  # column j = squeeze(e_j)
    assert set(np.unique(matrix)) == {0.0, 1.0}
    np.testing.assert_array_equal(matrix.sum(axis=0), np.ones(d))
    np.testing.assert_array_equal(matrix.sum(axis=1), np.ones(d))
    assert abs(np.linalg.det(matrix)) == pytest.approx(1.0, abs=1e-12)


def test_squeeze_refuses_odd_sides_and_unsqueeze_channels_not_divisible_by_four():
    with pytest.raises(ValueError, match="even H and W"):
        squeeze(np.zeros((1, 1, 3, 4)))
    with pytest.raises(ValueError, match="multiple of 4"):
        unsqueeze(np.zeros((1, 6, 2, 2)))


def test_split_and_merge_channels_round_trip_and_the_parts_densities_add_up(backend, device):
    z_np = np.random.default_rng(1).normal(size=(3, 4, 2, 2))
    z = backend.asarray(z_np, device=device)
    kept, factored = split_channels(z)
    np.testing.assert_array_equal(_np(backend, kept), z_np[:, :2])
    np.testing.assert_array_equal(_np(backend, factored), z_np[:, 2:])
    np.testing.assert_array_equal(_np(backend, merge_channels(kept, factored)), z_np)
    whole = -0.5 * np.sum(z_np ** 2, axis=(1, 2, 3)) - 0.5 * 16 * math.log(2 * math.pi)
    np.testing.assert_allclose(_np(backend, factored_log_density([kept, factored])), whole, rtol=1e-13)
    with pytest.raises(ValueError, match="C even"):
        split_channels(backend.asarray(np.zeros((1, 3, 2, 2)), device=device))


# ------------------------------------------------------------------------------------------
# logit preprocessing and bits per dimension


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_logit_preprocess_log_det_equals_the_brute_force_jacobian(autodiff_backend, device, alpha):
    b = autodiff_backend
    levels = b.asarray(_levels((3, 1, 4, 4)), device=device)
    key = b.key(7)
    s, log_det = logit_preprocess(key, levels, alpha=alpha)
    y = dequantize(key, levels)  # the same noise
    np.testing.assert_allclose(_np(b, s), _np(b, logit_transform(y, alpha=alpha)[0]), rtol=1e-14)
    jac = _jacobians(b, lambda v: logit_transform(v, alpha=alpha)[0], _np(b, y), device)
    sign, brute = np.linalg.slogdet(jac)
    assert np.all(sign > 0)
    np.testing.assert_allclose(_np(b, log_det), brute, rtol=1e-12)


def test_bits_per_dim_of_a_uniform_density_is_8_both_ways():
    levels = _levels((4, 1, 4, 4))
    uniform = lambda y: np.zeros(y.shape[0])  # noqa: E731 - log p = 0 on [0, 1)^D
    be = otflow.get_backend("numpy")
    np.testing.assert_array_equal(dequantized_bits_per_dim(uniform, be.key(0), levels), np.full(4, 8.0))
    np.testing.assert_array_equal(midpoint_bits_per_dim(uniform, levels), np.full(4, 8.0))


def test_the_standard_and_the_midpoint_bits_per_dim_evaluate_different_pixels():
    """p(y) = Π 2y_i on [0, 1)^D: the standard number is taken at the dequantized pixels,
    RNODE's at the bin midpoints, and they differ."""
    be = otflow.get_backend("numpy")
    levels = _levels((5, 1, 4, 4), seed=3)
    d = 16
    density = lambda y: np.sum(np.log(2 * y), axis=(1, 2, 3))  # noqa: E731
    key = be.key(11)
    y = np.asarray(dequantize(key, levels, backend=be))
    assert np.all((y >= levels / 256) & (y < (levels + 1) / 256)) and not np.allclose(y, (levels + 0.5) / 256)
    standard = dequantized_bits_per_dim(density, key, levels)
    midpoint = midpoint_bits_per_dim(density, levels)
    np.testing.assert_allclose(standard, -(density(y) - d * math.log(256)) / (d * math.log(2)), rtol=1e-14)
    np.testing.assert_allclose(midpoint, -(density((levels + 0.5) / 256) - d * math.log(256)) / (d * math.log(2)),
                               rtol=1e-14)
    assert np.all(np.abs(standard - midpoint) > 1e-6)
    np.testing.assert_array_equal(bin_midpoints(levels), (levels + 0.5) / 256)


def test_bits_per_dim_refuses_integer_levels():
    with pytest.raises(TypeError, match="floating array"):
        midpoint_bits_per_dim(lambda y: y, np.zeros((2, 1, 4, 4), dtype=np.int64))


# ------------------------------------------------------------------------------------------
# the conv field


def _conv_same_reference(x, weight, bias):
    """A 3×3 cross-correlation with zero padding 1, in plain numpy."""
    _, _, h, w = x.shape
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((x.shape[0], weight.shape[0], h, w)) + bias[None, :, None, None]
    for di in range(3):
        for dj in range(3):
            out += np.einsum("bchw,oc->bohw", padded[:, :, di:di + h, dj:dj + w], weight[:, :, di, dj])
    return out


def _conv_field_reference(field, params, t, x):
    """FFJORD's ConcatConv2d / ConcatSquashConv2d / IgnoreConv2d stack, in plain numpy."""
    h = x
    for i, layer in enumerate(params):
        if field.conditioning == "concat":
            h = np.concatenate([np.full_like(h[:, :1], t), h], axis=1)
        h = _conv_same_reference(h, layer["weight"], layer["bias"])
        if field.conditioning == "concatsquash":
            gate = 1 / (1 + np.exp(-(layer["gate_weight"] * t + layer["gate_bias"])))
            h = h * gate[None, :, None, None] + (layer["time_bias"] * t)[None, :, None, None]
        if i < len(params) - 1:
            h = np.logaddexp(h, 0) if field.activation == "softplus" else np.tanh(h)
    return h


@pytest.mark.parametrize("conditioning, activation", [("concat", "softplus"), ("concatsquash", "tanh"),
                                                     ("ignore", "softplus")])
def test_conv_field_computes_ffjords_conv_net(autodiff_backend, device, conditioning, activation):
    b = autodiff_backend
    field = ConvField((2, 4, 4), widths=(3, 5), activation=activation, conditioning=conditioning, zero_last=False)
    host = otflow.get_backend("numpy")
    params_np = field.init(host, host.key(0), dtype=np.float64)
    assert params_np[0]["weight"].shape == (3, 2 + (conditioning == "concat"), 3, 3)
    x_np = np.random.default_rng(2).normal(size=(3, 2, 4, 4))
    v = field.apply(_to_backend(b, params_np, device), b.asarray(np.asarray(0.7), device=device),
                    b.asarray(x_np, device=device))
    np.testing.assert_allclose(_np(b, v), _conv_field_reference(field, params_np, 0.7, x_np), rtol=1e-12,
                               atol=1e-13)


def test_conv_field_starts_at_zero_with_zero_last(autodiff_backend, device):
    b = autodiff_backend
    host = otflow.get_backend("numpy")
    for conditioning in CONDITIONINGS:  # the last layer's every term of v is zero
        field = ConvField((1, 4, 4), widths=(4,), conditioning=conditioning)
        last = field.init(host, host.key(0), dtype=np.float64)[-1]
        assert all(not np.any(last[name]) for name in ("weight", "bias", "time_bias") if name in last)
    x = b.asarray(np.random.default_rng(3).normal(size=(2, 1, 4, 4)), device=device)
    t = b.asarray(np.asarray(0.3), device=device)
    field = ConvField((1, 4, 4), widths=(4,), conditioning="concatsquash")
    v = field.apply(field.init(b, b.key(0), dtype=b.namespace().float64, device=device), t, x)
    np.testing.assert_array_equal(_np(b, v), np.zeros((2, 1, 4, 4)))
    moving = ConvField((1, 4, 4), widths=(4,), conditioning="concatsquash", zero_last=False)
    assert np.max(np.abs(_np(b, moving.apply(moving.init(b, b.key(0), dtype=b.namespace().float64, device=device),
                                              t, x)))) > 1e-3


def test_conv_field_rows_are_independent_and_its_exact_divergence_is_the_jacobian_trace(autodiff_backend, device):
    b = autodiff_backend
    field = ConvField((2, 4, 4), widths=(4, 4), conditioning="concatsquash", zero_last=False)
    host = otflow.get_backend("numpy")
    params = _to_backend(b, field.init(host, host.key(1), dtype=np.float64), device)
    t = b.asarray(np.asarray(0.4), device=device)
    x_np = np.random.default_rng(4).normal(size=(3, 2, 4, 4))
    fn = lambda x: field.apply(params, t, x)  # noqa: E731
    v = _np(b, fn(b.asarray(x_np, device=device)))
    bumped = x_np.copy()
    bumped[1] += 0.5
    v_bumped = _np(b, fn(b.asarray(bumped, device=device)))
    np.testing.assert_array_equal(v_bumped[[0, 2]], v[[0, 2]])
    assert np.max(np.abs(v_bumped[1] - v[1])) > 1e-3
    jac = _jacobians(b, fn, x_np, device)
    div = exact_divergence(fn, b.asarray(x_np, device=device), method="vjp").mean
    np.testing.assert_allclose(_np(b, div), np.trace(jac, axis1=1, axis2=2), rtol=1e-12)


def test_conv_field_config_round_trips():
    field = ConvField((3, 8, 8), widths=(16, 32), activation="tanh", conditioning="concatsquash", zero_last=False)
    assert field_from_config(field.config()) == field


def test_conv_field_refuses_bad_shapes_and_options():
    with pytest.raises(ValueError, match="for vectors use otflow.MLP"):
        ConvField((4, 4))
    with pytest.raises(ValueError, match="widths must be positive ints"):
        ConvField((1, 4, 4), widths=(8, 0))
    with pytest.raises(ValueError, match="activation"):
        ConvField((1, 4, 4), activation="relu")
    field = ConvField((1, 4, 4), widths=(2,))
    with pytest.raises(ValueError, match=r"shape \(batch, 1, 4, 4\)"):
        field.apply(None, 0.0, np.zeros((2, 1, 4, 5)))


def test_conv_field_on_a_backend_without_convolution_names_the_fix():
    strict = otflow.get_backend("array_api_strict")
    field = ConvField((1, 4, 4), widths=(2,))
    params = field.init(strict, strict.key(0), dtype=strict.namespace().float64)
    x = strict.asarray(np.zeros((1, 1, 4, 4)))
    with pytest.raises(CapabilityError, match="conv2d.*torch or JAX"):
        field.apply(params, strict.asarray(0.0, dtype=strict.namespace().float64), x)


# ------------------------------------------------------------------------------------------
# the multiscale architecture


def test_the_default_spec_is_rnodes_mnist_model():
    spec = MultiscaleSpec()
    assert (spec.image_shape, spec.n_scales, spec.blocks_per_scale, spec.widths) == ((1, 28, 28), 3, 2, (64, 64, 64))
    assert spec.block_shapes() == ((1, 28, 28),) * 2 + ((4, 14, 14),) * 2 + ((2, 14, 14),) * 2 + ((8, 7, 7),) * 2 \
        + ((4, 7, 7),) * 2
    assert spec.n_blocks == 10 == len(spec.fields())
    assert spec.latent_shapes() == ((2, 14, 14), (4, 7, 7), (4, 7, 7))
    assert sum(math.prod(s) for s in spec.latent_shapes()) == spec.dim == 784
    assert spec.steps() == (0, 1, SQUEEZE, 2, 3, FACTOR_OUT, 4, 5, SQUEEZE, 6, 7, FACTOR_OUT, 8, 9)
    assert MultiscaleSpec((3, 32, 32)).n_scales == 4  # ODENVP's count on CIFAR10


def test_spec_refuses_scales_that_squeeze_an_odd_side():
    with pytest.raises(ValueError, match="squeezes a 7×7 state.*use n_scales=3 or fewer"):
        MultiscaleSpec((1, 28, 28), n_scales=4)
    with pytest.raises(ValueError, match="image_shape"):
        MultiscaleSpec((28, 28))
    with pytest.raises(ValueError, match="conditioning"):
        MultiscaleSpec((1, 4, 4), conditioning="hyper")


#: a tiny two-scale model: blocks on (2, 4, 4), then (8, 2, 2), then (4, 2, 2)
TINY = MultiscaleSpec((2, 4, 4), n_scales=2, blocks_per_scale=1, widths=(3,), alpha=0.05)


def _tiny_fields(kind: str):
    if kind == "conv":
        return tuple(ConvField(s, widths=(3,), conditioning="concatsquash", zero_last=False)
                     for s in TINY.block_shapes())
    return tuple(MLP(s, hidden=(6,), zero_last=False) for s in TINY.block_shapes())


def _tiny_model(b, kind, device):
    """Fields with their float64 parameters, drawn on the host and moved to ``b``."""
    fields = _tiny_fields(kind)
    host = otflow.get_backend("numpy")
    params = tuple(f.init(host, k, dtype=np.float64) for f, k in zip(fields, host.split(host.key(5), len(fields))))
    return fields, _to_backend(b, params, device)


def _squeeze_indices(c, h, w):
    """Flat index of the source of every entry of a squeezed (c, h, w) state, from the
    definition: channel 4c' + 2i + j at (h', w') is channel c' at (2h' + i, 2w' + j)."""
    idx = np.empty(4 * c * (h // 2) * (w // 2), dtype=np.int64)
    for cc in range(c):
        for i in range(2):
            for j in range(2):
                for hh in range(h // 2):
                    for ww in range(w // 2):
                        out = ((4 * cc + 2 * i + j) * (h // 2) + hh) * (w // 2) + ww
                        idx[out] = (cc * h + 2 * hh + i) * w + 2 * ww + j
    return idx


def _flat_field(field, shape):
    def apply(params, t, x):
        xp = otflow.get_backend(like=x).namespace()
        v = field.apply(params, t, xp.reshape(x, (x.shape[0], *shape)))
        return xp.reshape(v, (x.shape[0], math.prod(shape)))

    return FunctionField(apply, None, (math.prod(shape),))


def _flattened_log_prob(b, fields, params, y, T, squeeze_indices):
    """TINY's log p(y) on flattened vectors: logit, block 0, squeeze as an index permutation,
    block 1, keep the first half of the vector, block 2; normal density of both halves."""
    xp = b.namespace()
    shapes = TINY.block_shapes()
    z, log_det = logit_transform(xp.reshape(y, (y.shape[0], -1)), alpha=TINY.alpha)
    total = xp.zeros_like(log_det)

    def block(k, z, total):
        rhs = density_rhs(_flat_field(fields[k], shapes[k]), backend=b)
        sol = otflow.odeint(rhs, (z, total), [0.0, T], args=params[k], backend=b, **MIDPOINT)
        return sol.ys[0][-1], sol.ys[1][-1]

    z, total = block(0, z, total)
    z = xp.take(z, squeeze_indices, axis=1)
    z, total = block(1, z, total)
    kept, factored = z[:, :16], z[:, 16:]
    kept, total = block(2, kept, total)
    return standard_normal_logpdf(xp, factored) + standard_normal_logpdf(xp, kept) - total + log_det


def test_multiscale_log_prob_equals_the_flattened_computation(autodiff_backend, device):
    b = autodiff_backend
    fields, params = _tiny_model(b, "conv", device)
    y = _pixels(b, (3, 2, 4, 4), 3, device)
    indices = b.asarray(_squeeze_indices(2, 4, 4), device=device)
    image = b.jit(lambda p, y: multiscale_log_prob(TINY, fields, p, y, T=0.6, solver_kwargs=MIDPOINT))(params, y)
    flat = b.jit(lambda p, y: _flattened_log_prob(b, fields, p, y, 0.6, indices))(params, y)
    np.testing.assert_allclose(_np(b, image), _np(b, flat), rtol=1e-10, atol=1e-10)
    assert np.max(np.abs(_np(b, image) - _np(b, logit_transform(y, alpha=TINY.alpha)[1]))) > 1e-3


def test_multiscale_log_prob_of_zero_fields_is_the_logit_density(autodiff_backend, device):
    """v ≡ 0: log p(y) = log N(logit(y)) + log-det of the logit, every factored part counted."""
    b = autodiff_backend
    fields = TINY.fields()  # zero_last: v ≡ 0, so one Euler step is exact
    host = otflow.get_backend("numpy")
    params = _to_backend(b, TINY.init(host, host.key(1), dtype=np.float64), device)
    y = _pixels(b, (2, 2, 4, 4), 5, device)
    s, log_det = logit_transform(y, alpha=TINY.alpha)
    want = _np(b, standard_normal_logpdf(b.namespace(), s) + log_det)
    got = b.jit(lambda p, y: multiscale_log_prob(TINY, fields, p, y, T=[0.5, 0.5, 0.5],
                                                 solver_kwargs=dict(method="euler", n_steps=1)))(params, y)
    np.testing.assert_allclose(_np(b, got), want, rtol=1e-12)


def test_hutchinson_probes_reach_their_blocks(autodiff_backend, device):
    """For v = a·x the Jacobian is a·I, so Rademacher probes give the exact trace."""
    b = autodiff_backend
    fields = tuple(FunctionField(lambda p, t, x: p * x, None, s) for s in TINY.block_shapes())
    params = tuple(b.asarray(np.asarray(a), device=device) for a in (0.3, -0.2, 0.5))
    y = _pixels(b, (2, 2, 4, 4), 6, device)
    probes = tuple(b.asarray(np.random.default_rng(10 + k).choice([-1.0, 1.0], size=(2, *s)), device=device)
                   for k, s in enumerate(TINY.block_shapes()))

    def log_prob(p, y, probes):
        exact = multiscale_log_prob(TINY, fields, p, y, T=1.0, solver_kwargs=MIDPOINT)
        return exact, multiscale_log_prob(TINY, fields, p, y, T=1.0, estimator="hutchinson", probes=probes,
                                          solver_kwargs=MIDPOINT)

    exact, hutch = b.jit(log_prob)(params, y, probes)
    np.testing.assert_allclose(_np(b, hutch), _np(b, exact), rtol=1e-12)
    with pytest.raises(ValueError, match="probe 1 must have shape"):
        multiscale_log_prob(TINY, fields, params, y, T=1.0, estimator="hutchinson",
                            probes=(probes[0], probes[0], probes[2]), solver_kwargs=MIDPOINT)
    with pytest.raises(ValueError, match="needs probes="):
        multiscale_log_prob(TINY, fields, params, y, T=1.0, estimator="hutchinson")


def test_multiscale_inverse_undoes_the_transform(autodiff_backend, device):
    b = autodiff_backend
    fields, params = _tiny_model(b, "mlp", device)
    y = _pixels(b, (3, 2, 4, 4), 7, device)
    tight = dict(rtol=1e-11, atol=1e-11)

    def round_trip(p, y):
        z = multiscale_transform(TINY, fields, p, y, T=0.6, solver_kwargs=tight)
        return z, multiscale_inverse(TINY, fields, p, z, T=0.6, solver_kwargs=tight)

    z, back = b.jit(round_trip)(params, y)
    assert tuple(z.shape) == (3, 32)
    np.testing.assert_allclose(_np(b, back), _np(b, y), atol=1e-8)


def test_multiscale_functions_refuse_what_does_not_fit_the_spec(autodiff_backend, device):
    b = autodiff_backend
    fields, params = _tiny_model(b, "mlp", device)
    y = _pixels(b, (1, 2, 4, 4), 6, device)
    with pytest.raises(ValueError, match="3 CNF blocks.*got 2 fields"):
        multiscale_log_prob(TINY, fields[:2], params[:2], y, T=1.0)
    with pytest.raises(ValueError, match=r"block 1 runs on states \(8, 2, 2\)"):
        multiscale_log_prob(TINY, (fields[0], fields[0], fields[2]), params, y, T=1.0)
    with pytest.raises(ValueError, match="one per block"):
        multiscale_log_prob(TINY, fields, params, y, T=[1.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(batch, 2, 4, 4\)"):
        multiscale_log_prob(TINY, fields, params, y[:, :1], T=1.0)
    with pytest.raises(ValueError, match="set norm themselves"):
        multiscale_log_prob(TINY, fields, params, y, T=1.0, solver_kwargs=dict(norm="max"))
    with pytest.raises(ValueError, match=r"z must have shape \(batch, 32\)"):
        multiscale_inverse(TINY, fields, params, y, T=1.0)


def test_torch_and_jax_agree_on_the_multiscale_model():
    """The same float64 parameters, drawn on the host: log p (exact and Hutchinson with the
    same probes) and the latent agree between torch and JAX."""
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    host = otflow.get_backend("numpy")
    probes_np = [np.random.default_rng(20 + k).normal(size=(2, *s)) for k, s in enumerate(TINY.block_shapes())]
    y_np = np.asarray(dequantize(host.key(8), _levels((2, 2, 4, 4), seed=9), backend=host))
    results = []
    for name in ("torch", "jax"):
        b = otflow.get_backend(name)
        fields, params = _tiny_model(b, "conv", None)
        kw = dict(T=[0.4, 0.5, 0.6], solver_kwargs=MIDPOINT)

        def outputs(p, y, probes):
            return (multiscale_log_prob(TINY, fields, p, y, **kw),
                    multiscale_log_prob(TINY, fields, p, y, estimator="hutchinson", probes=probes, **kw),
                    multiscale_transform(TINY, fields, p, y, **kw))

        out = b.jit(outputs)(params, b.asarray(y_np), tuple(b.asarray(p) for p in probes_np))
        results.append([_np(b, o) for o in out])
    for torch_out, jax_out in zip(*results):
        np.testing.assert_allclose(torch_out, jax_out, rtol=1e-10, atol=1e-12)


def test_spec_config_round_trips():
    spec = MultiscaleSpec((3, 8, 8), n_scales=2, blocks_per_scale=1, widths=(4, 5), activation="tanh",
                          conditioning="concatsquash", alpha=0.05)
    assert MultiscaleSpec.from_config(spec.config()) == spec
    assert MultiscaleSpec.from_config(MultiscaleSpec().config()) == MultiscaleSpec()


def test_the_image_layout_undoes_squeezes_and_factor_outs():
    """With identity blocks the latent parts, put back in image layout, are the input; the
    latent's flat layout and its parts convert both ways (numpy: no solve is run)."""
    from otflow.cnf.multiscale import _through_scales, flatten_latents, split_latent, to_image_layout

    s = np.random.default_rng(0).normal(size=(2, 2, 4, 4))
    parts, _ = _through_scales(TINY, s, None, lambda k, z, total: (z, total))
    np.testing.assert_array_equal(to_image_layout(TINY, parts[-1], parts[:-1], len(TINY.steps())), s)
    z = flatten_latents(parts)
    assert z.shape == (2, 32)
    for part, back in zip(parts, split_latent(TINY, z)):
        np.testing.assert_array_equal(part, back)


def test_run_functions_report_status_and_nfe_and_take_per_block_solver_settings():
    pytest.importorskip("torch")
    from otflow.cnf.multiscale import run_log_prob

    b = otflow.get_backend("torch")
    fields, params = _tiny_model(b, "mlp", None)
    y = _pixels(b, (2, 2, 4, 4), 11)
    per_block = [dict(method="rk4", n_steps=n) for n in (1, 2, 3)]
    result = run_log_prob(TINY, fields, params, y, T=0.5, solver_kwargs=per_block)
    assert int(result.status) == otflow.Status.SUCCESS and int(result.nfe) == 4 * (1 + 2 + 3)
    same = run_log_prob(TINY, fields, params, y, T=0.5, solver_kwargs=dict(method="rk4", n_steps=2))
    assert int(same.nfe) == 4 * 6
    np.testing.assert_allclose(_np(b, multiscale_log_prob(TINY, fields, params, y, T=0.5,
                                                          solver_kwargs=dict(method="rk4", n_steps=2))),
                               _np(b, same.value), rtol=0, atol=0)
    assert np.max(np.abs(_np(b, result.value) - _np(b, same.value))) > 0
    with pytest.raises(ValueError, match="one per block \\(3\\), got 2"):
        run_log_prob(TINY, fields, params, y, T=0.5, solver_kwargs=per_block[:2])
