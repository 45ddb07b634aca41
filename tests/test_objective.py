"""The RNODE objective against closed forms, bits/dim and the logit transform."""
from __future__ import annotations

import math

import numpy as np
import pytest

import otflow
from otflow import MLP, FunctionField
from otflow.cnf import bits_per_dim, dequantize, logit_transform, rnode_loss


def _scaled_identity_field(a):
    """v(t, x) = a·x: z(t) = x·e^{at}, εᵀ∇v = a·ε."""
    return FunctionField(lambda p, t, x: p * x, None, (3,))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_rnode_loss_closed_form_for_a_linear_field(autodiff_backend, method):
    b = autodiff_backend
    a, T = 0.5, 0.8
    rng = np.random.default_rng(0)
    x_np, eps_np = rng.normal(size=(16, 3)), rng.normal(size=(16, 3))
    x, eps = b.asarray(x_np), b.asarray(eps_np)
    field = _scaled_identity_field(a)
    params = b.asarray(np.asarray(a))
    solver = dict(method="dopri5", rtol=1e-10, atol=1e-10) if method == "dopri5" else dict(method="rk4", n_steps=200)
    out = rnode_loss(b, [field], [params], x, eps, T=[T], lambda_kinetic=0.3, lambda_jacobian=0.2,
                     solver_kwargs=solver)
    z = x_np * math.exp(a * T)
    dlogp = -a * T * np.sum(eps_np * eps_np, axis=1)          # −∫ Hutchinson divergence
    logpz = -0.5 * np.sum(z * z, axis=1) - 1.5 * math.log(2 * math.pi)
    nll = -np.mean(logpz - dlogp)
    kinetic = np.mean(0.5 * a * a * np.mean(x_np ** 2, axis=1) * (math.exp(2 * a * T) - 1) / (2 * a))
    jacobian = np.mean(a * a * np.mean(eps_np ** 2, axis=1) * T)
    tol = 1e-8 if method == "dopri5" else 1e-7
    for got, want in [(out.nll, nll), (out.kinetic, kinetic), (out.jacobian, jacobian),
                      (out.loss, nll + 0.3 * kinetic + 0.2 * jacobian)]:
        assert float(b.to_numpy(got)) == pytest.approx(want, rel=tol, abs=tol)
    assert int(b.to_numpy(out.status)) == 0


def test_vanilla_ffjord_skips_the_regularizers(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(8,), zero_last=False)
    params = field.init(b, b.key(0), dtype=b.namespace().float64)
    x = b.asarray(np.random.default_rng(1).normal(size=(8, 2)))
    eps = b.normal(b.key(2), (8, 2), dtype=b.namespace().float64)
    kw = dict(solver_kwargs=dict(rtol=1e-9, atol=1e-9), T=[1.0])
    plain = rnode_loss(b, [field], [params], x, eps, lambda_kinetic=0.0, lambda_jacobian=0.0, **kw)
    reg = rnode_loss(b, [field], [params], x, eps, lambda_kinetic=0.01, lambda_jacobian=0.01, **kw)
    assert float(b.to_numpy(plain.kinetic)) == 0.0 and float(b.to_numpy(plain.jacobian)) == 0.0
    # the NLL part is the same solve with or without the masked-out integrals
    assert float(b.to_numpy(plain.nll)) == pytest.approx(float(b.to_numpy(reg.nll)), abs=1e-7)
    assert float(b.to_numpy(reg.kinetic)) > 0 and float(b.to_numpy(reg.jacobian)) > 0
    with pytest.raises(ValueError, match="non-negative"):
        rnode_loss(b, [field], [params], x, eps, lambda_kinetic=-1.0, **kw)


def test_rnode_loss_gradients_are_finite_from_a_zero_field(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(8, 8))  # zero_last=True: v ≡ 0 at initialization
    params = field.init(b, b.key(0), dtype=b.namespace().float32)
    x = b.asarray(np.random.default_rng(3).normal(size=(32, 2)).astype(np.float32))
    eps = b.normal(b.key(4), (32, 2), dtype=b.namespace().float32)
    loop = {} if b.name == "torch" else {"loop_kind": "checkpointed"}

    def loss(p):
        return rnode_loss(b, [field], [p], x, eps, T=[1.0], solver_kwargs=loop).loss

    value, grads = b.value_and_grad(loss)(params)
    leaves = [b.to_numpy(g) for g in b.tree_leaves(grads)]
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)
    x_np = b.to_numpy(x).astype(np.float64)
    assert float(b.to_numpy(value)) == pytest.approx(np.mean(0.5 * np.sum(x_np ** 2, 1) + math.log(2 * math.pi)),
                                                      rel=1e-5)


def test_bits_per_dim_of_the_uniform_density_is_eight():
    assert bits_per_dim(np.zeros(4), 64) == pytest.approx(np.full(4, 8.0))
    assert bits_per_dim(np.zeros(1), 10, n_bins=2) == pytest.approx(1.0)


def test_logit_transform_log_determinant_matches_finite_differences():
    y = np.random.default_rng(0).uniform(0.01, 0.99, size=(5, 4))
    s, logdet = logit_transform(y, alpha=0.05)
    h = 1e-6
    deriv = (logit_transform(y + h, alpha=0.05)[0] - logit_transform(y - h, alpha=0.05)[0]) / (2 * h)
    np.testing.assert_allclose(logdet, np.sum(np.log(deriv), axis=1), rtol=1e-7)
    with pytest.raises(ValueError, match="alpha"):
        logit_transform(y, alpha=0.6)


def test_dequantize_stays_in_its_bin():
    b = otflow.get_backend("numpy")
    x = np.arange(256, dtype=np.float64)[None, :].repeat(3, 0)
    y = dequantize(b, b.key(0), x)
    assert np.all((y * 256 >= x) & (y * 256 < x + 1))
