"""Fused elementwise functions backends register for the core (otflow.base.native): the
fields give the same values with and without them, and the registry refuses bad entries."""
from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from otflow.base import get_backend, native, register_native
from otflow.cnf import MLP

from _helpers import framework_installed


def test_register_native_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown function 'gelu'"):
        register_native("numpy", "gelu", np.tanh)
    with pytest.raises(TypeError, match="callable"):
        register_native("numpy", "silu", 3)
    assert native(np, "silu") is None  # numpy runs the written-out forms


@pytest.mark.skipif(not framework_installed("torch"), reason="needs torch")
@pytest.mark.parametrize("activation,conditioning", [("swish", "concatsquash"), ("swish", "concat"),
                                                     ("tanh", "concatsquash")])
def test_torch_fused_functions_equal_the_written_out_forms(activation, conditioning):
    import torch

    b = get_backend("torch")  # importing the backend registers torch.sigmoid and SiLU
    field = MLP((3,), hidden=(16, 16), activation=activation, conditioning=conditioning, zero_last=False)
    params = field.init(b, b.key(0), dtype=torch.float64)
    x = torch.randn(50, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xp = array_api_compat.array_namespace(x)
    assert native(xp, "silu") is torch.nn.functional.silu and native(xp, "sigmoid") is torch.sigmoid
    fused = field.apply(params, 0.3, x)
    saved = {name: native(xp, name) for name in ("sigmoid", "silu")}
    try:
        for name in saved:
            register_native(xp.__name__, name, None)
        written_out = field.apply(params, 0.3, x)
    finally:
        for name, fn in saved.items():
            register_native(xp.__name__, name, fn)
    assert float(written_out.abs().max()) > 0.05  # the field is not trivially zero
    np.testing.assert_allclose(fused.numpy(), written_out.numpy(), rtol=0, atol=1e-15)


@pytest.mark.parametrize("fused", [True, False])
def test_swish_and_its_gradient_stay_finite_for_large_negative_inputs(fused):
    """The written-out sigmoid used to be 1/(1 + exp(−x)): exp(−x) = inf below x ≈ −88 in
    float32 and the gradient inf/inf = NaN (a flow-matching run at lr 4e-3 skipped hundreds
    of iterations for it). Both forms, fused (jax.nn) and written out, stay finite."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from otflow.cnf.fields import _activate

    get_backend("jax")
    xp = array_api_compat.array_namespace(jnp.zeros(1))
    x = jnp.array([-1000.0, -100.0, -88.5, -10.0, 0.0, 10.0, 100.0], jnp.float32)
    saved = {name: native(xp, name) for name in ("sigmoid", "silu")}
    try:
        if not fused:
            for name in saved:
                register_native(xp.__name__, name, None)
        value, grad = jax.value_and_grad(lambda v: jnp.sum(_activate(xp, "swish", v)))(x)
        each = _activate(xp, "swish", x)
    finally:
        for name, fn in saved.items():
            register_native(xp.__name__, name, fn)
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))
    with np.errstate(over="ignore"):  # exp(1000) = inf gives the right limit, 0
        expected = np.asarray(x, np.float64) / (1.0 + np.exp(-np.asarray(x, np.float64)))
    np.testing.assert_allclose(np.asarray(each, np.float64), expected, rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(np.asarray(grad)[:3], 0.0, atol=1e-30)  # σ(x)(1 + x(1 − σ(x))) → 0
