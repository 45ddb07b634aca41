"""The RNODE objective against closed forms, bits/dim and the logit transform."""
from __future__ import annotations

import math

import numpy as np
import pytest

import otflow
from otflow import MLP, Dopri5, FunctionField
from otflow.cnf import bits_per_dim, dequantize, density_rhs, logit_transform, rnode_loss, rnode_rhs
from otflow.cnf.dynamics import RNODE_NORM
from otflow.ode import AbstractRungeKutta, ButcherTableau


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
    out = rnode_loss([field], [params], x, eps, T=[T], lambda_kinetic=0.3, lambda_jacobian=0.2,
                     solver_kwargs=solver)  # the backend is inferred from x
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
    kw = dict(solver_kwargs=dict(rtol=1e-9, atol=1e-9), T=[1.0], backend=b)
    plain = rnode_loss([field], [params], x, eps, lambda_kinetic=0.0, lambda_jacobian=0.0, **kw)
    reg = rnode_loss([field], [params], x, eps, lambda_kinetic=0.01, lambda_jacobian=0.01, **kw)
    assert float(b.to_numpy(plain.kinetic)) == 0.0 and float(b.to_numpy(plain.jacobian)) == 0.0
    # the NLL part is the same solve with or without the masked-out integrals
    assert float(b.to_numpy(plain.nll)) == pytest.approx(float(b.to_numpy(reg.nll)), abs=1e-7)
    assert float(b.to_numpy(reg.kinetic)) > 0 and float(b.to_numpy(reg.jacobian)) > 0
    with pytest.raises(ValueError, match="non-negative"):
        rnode_loss([field], [params], x, eps, lambda_kinetic=-1.0, **kw)


def test_rnode_loss_gradients_are_finite_from_a_zero_field(autodiff_backend):
    b = autodiff_backend
    field = MLP((2,), hidden=(8, 8))  # zero_last=True: v ≡ 0 at initialization
    params = field.init(b, b.key(0), dtype=b.namespace().float32)
    x = b.asarray(np.random.default_rng(3).normal(size=(32, 2)).astype(np.float32))
    eps = b.normal(b.key(4), (32, 2), dtype=b.namespace().float32)
    loop = {} if b.name == "torch" else {"loop_kind": "checkpointed"}

    def loss(p):
        return rnode_loss([field], [p], x, eps, T=[1.0], backend=b, solver_kwargs=loop).loss

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
    y = dequantize(b.key(0), x)  # the backend is inferred from x
    assert np.all((y * 256 >= x) & (y * 256 < x + 1))


# ---- adaptivity is a property of the solver object --------------------------------------------
class Dopri5Copy(AbstractRungeKutta):
    """A user's method with Dormand–Prince's tableau under another name."""

    name = "my_dopri5"
    tableau = Dopri5.tableau


class BogackiShampine(AbstractRungeKutta):
    """A user's adaptive tableau: Bogacki–Shampine 3(2), FSAL."""

    name = "bs32"
    tableau = ButcherTableau.from_fractions(
        c=[0, "1/2", "3/4", 1],
        a=[[], ["1/2"], [0, "3/4"], ["2/9", "1/3", "4/9"]],
        b=["2/9", "1/3", "4/9", 0],
        b_error=["-5/72", "1/12", "1/9", "-1/8"],
        order=3,
        error_order=2,
    )


def _loss_problem(b):
    field = MLP((2,), hidden=(8,), zero_last=False)
    params = field.init(b, b.key(5), dtype=b.namespace().float64)
    x = b.asarray(np.random.default_rng(6).normal(size=(16, 2)))
    eps = b.normal(b.key(7), (16, 2), dtype=b.namespace().float64)
    return field, params, x, eps


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_regularizers_stay_out_of_error_control_whatever_names_the_adaptive_method(autodiff_backend, lam):
    """``Dopri5()``, ``"DOPRI5"`` and a user's copy of its tableau take exactly the steps of
    ``"dopri5"`` (the error norm of FFJORD/RNODE: per-leaf RMS, regularizers masked out).
    Before the fix only the lower-case name was recognized as adaptive, and the others
    controlled the step with every state component (losses differed by ~1e-8)."""
    b = autodiff_backend
    field, params, x, eps = _loss_problem(b)

    def run(method):
        out = rnode_loss([field], [params], x, eps, T=[1.0], backend=b, lambda_kinetic=lam, lambda_jacobian=lam,
                         solver_kwargs=dict(method=method, rtol=1e-6, atol=1e-6))
        return int(b.to_numpy(out.nfe)), float(b.to_numpy(out.loss))

    ref_nfe, ref_loss = run("dopri5")
    for method in ("DOPRI5", Dopri5(), Dopri5Copy()):
        nfe, loss = run(method)
        assert nfe == ref_nfe, method
        assert loss == pytest.approx(ref_loss, rel=1e-13, abs=0), method


def test_a_user_adaptive_tableau_integrates_the_regularizers_outside_error_control(autodiff_backend):
    """The loss with a user's adaptive method equals the direct solve of RNODE's dynamics with
    the masked norm (same steps, same numbers)."""
    b = autodiff_backend
    xp = b.namespace()
    field, params, x, eps = _loss_problem(b)
    method = BogackiShampine()
    assert method.adaptive
    out = rnode_loss([field], [params], x, eps, T=[1.0], backend=b, lambda_kinetic=0.5, lambda_jacobian=0.5,
                     solver_kwargs=dict(method=method, rtol=1e-6, atol=1e-6))
    zero = xp.zeros((16,), dtype=xp.float64)
    sol = otflow.odeint(rnode_rhs(field, backend=b), (x, zero, zero, zero), [0.0, 1.0], args=(params, eps),
                        method=method, norm=RNODE_NORM, rtol=1e-6, atol=1e-6)
    assert int(b.to_numpy(out.nfe)) == sol.nfe
    z, dlogp, kin, jac = (b.to_numpy(leaf[-1]) for leaf in sol.ys)
    nll = -np.mean(-0.5 * np.sum(z * z, axis=1) - math.log(2 * math.pi) - dlogp)
    expected = nll + 0.5 * np.mean(kin) + 0.5 * np.mean(jac)
    assert float(b.to_numpy(out.loss)) == pytest.approx(expected, rel=1e-13, abs=0)


def test_solver_kwargs_may_not_set_what_the_loss_sets(autodiff_backend):
    b = autodiff_backend
    field, params, x, eps = _loss_problem(b)
    with pytest.raises(ValueError, match="rnode_loss sets norm itself; remove it from solver_kwargs"):
        rnode_loss([field], [params], x, eps, T=[1.0], solver_kwargs={"norm": "rms"})


# ---- the old backend-first form ----------------------------------------------------------------
def test_the_old_backend_first_form_names_the_new_one(autodiff_backend):
    b = autodiff_backend
    field, params, x, eps = _loss_problem(b)
    calls = {
        r"rnode_loss\(fields, params, x, eps, \*, T, backend=None, lambda_kinetic=0\.01, lambda_jacobian=0\.01, "
        r"solver_kwargs=None, context=None\)": lambda: rnode_loss(b, [field], [params], x, eps, T=[1.0]),
        r"dequantize\(key, x, \*, backend=None, n_bins=256\)": lambda: dequantize(b, b.key(0), x),
        r"density_rhs\(field, \*, backend, estimator='exact'\)": lambda: density_rhs(b, field, "exact"),
        r"rnode_rhs\(field, \*, backend\)": lambda: rnode_rhs(b, field),
    }
    for form, call in calls.items():
        with pytest.raises(TypeError, match=rf"takes the backend as a keyword.*{form}"):
            call()
    # some other object where the backend went: too many positional arguments, same hint
    with pytest.raises(TypeError, match=r"takes 2 positional arguments but 3 were given; the backend is a keyword.*"
                                        r"dequantize\(key, x, \*, backend=None, n_bins=256\)"):
        dequantize(object(), b.key(0), x)
