"""Native modules as velocity fields: ``otflow.cnf.native_field`` for ``torch.nn.Module`` and Equinox.

Native modules belong to the model layer: ``native_field`` finds the adapter of the
backend in the ``otflow.native_fields`` entry-point group (or one registered with
``register_native_field``); the Backend protocol has no ``as_field``. A module used through
``Flow.from_velocity`` must give the numbers of an explicit :class:`otflow.FunctionField`
with the same weights; on torch the flow's parameters are the module's own
``nn.Parameter`` objects (gradients of the training objective land in their ``.grad``, an
optimizer over ``module.parameters()`` moves the flow); Equinox modules are split into an
array tree and a static part. The Equinox tests are skipped when equinox is not installed.
"""
from __future__ import annotations

import numpy as np
import pytest

import otflow
from otflow import MLP, Flow, FunctionField
from otflow.cnf import native_field, register_native_field, rnode_loss

from _helpers import framework_installed

TIGHT = dict(rtol=1e-7, atol=1e-7)  # both flows do the same arithmetic: agreement ≪ tolerance
HIDDEN = 16


def _x(n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 2))


# ---- the modules and their explicit twins --------------------------------------------------
def torch_module(seed=0, dtype="float64"):
    """A time-concatenating tanh MLP ``(t, x) ↦ v`` with a buffer scaling the output."""
    import torch

    class ConcatMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(3, HIDDEN), torch.nn.Tanh(),
                torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                torch.nn.Linear(HIDDEN, 2),
            )
            self.register_buffer("out_scale", torch.tensor(0.7))

        def forward(self, t, x):
            tt = t.expand(x.shape[0], 1)
            return self.layers(torch.cat([tt, x], dim=1)) * self.out_scale

    torch.manual_seed(seed)
    return ConcatMLP().to(getattr(torch, dtype))


def torch_twin(module):
    """The same field written out as ``apply(params, t, x)`` on copies of the module's weights."""
    import torch

    linears = [m for m in module.layers if isinstance(m, torch.nn.Linear)]
    params = [(lin.weight.detach().clone().requires_grad_(), lin.bias.detach().clone().requires_grad_())
              for lin in linears]
    scale = float(module.out_scale)

    def apply(p, t, x):
        h = torch.cat([t.expand(x.shape[0], 1), x], dim=1)
        for i, (w, b) in enumerate(p):
            h = h @ w.T + b
            if i < len(p) - 1:
                h = torch.tanh(h)
        return h * scale

    return apply, params


def eqx_module(seed=0):
    """An Equinox module written for a batch: it maps its per-sample MLP over the rows itself."""
    eqx = pytest.importorskip("equinox")
    import jax
    import jax.numpy as jnp

    class ConcatMLP(eqx.Module):
        mlp: eqx.nn.MLP
        out_scale: float = 0.7

        def __call__(self, t, x):
            assert x.ndim == 2, "otflow calls the module with the whole batch"
            tt = jnp.broadcast_to(t, (x.shape[0], 1))
            return jax.vmap(self.mlp)(jnp.concatenate([tt, x], axis=1)) * self.out_scale

    mlp = eqx.nn.MLP(3, 2, HIDDEN, 2, activation=jnp.tanh, key=jax.random.key(seed), dtype=jnp.float64)
    return ConcatMLP(mlp)


def eqx_twin(model):
    import jax.numpy as jnp

    params = [(lin.weight, lin.bias) for lin in model.mlp.layers]

    def apply(p, t, x):
        h = jnp.concatenate([jnp.broadcast_to(t, (x.shape[0], 1)), x], axis=1)
        for i, (w, b) in enumerate(p):
            h = h @ w.T + b
            if i < len(p) - 1:
                h = jnp.tanh(h)
        return h * 0.7

    return apply, params


def native_module(backend):
    """``(module, twin_apply, twin_params)`` for the backend (skips without equinox on JAX)."""
    if backend.name == "torch":
        m = torch_module()
        return (m, *torch_twin(m))
    m = eqx_module()
    return (m, *eqx_twin(m))


def other_framework_modules(backend):
    """Native modules of the frameworks other than ``backend``'s that are installed."""
    out = []
    if backend.name != "torch" and framework_installed("torch"):
        out.append(torch_module())
    if backend.name != "jax" and framework_installed("jax") and framework_installed("equinox"):
        out.append(eqx_module())
    return out


# ---- both backends ----------------------------------------------------------------------------
def test_module_flow_matches_explicit_function_field(autodiff_backend):
    b = autodiff_backend
    module, apply, params = native_module(b)
    flow = Flow.from_velocity(module, event_shape=(2,), backend=b, dtype="float64").with_eval_solver(**TIGHT)
    field = flow.fields[0]
    assert isinstance(field, FunctionField) and field.name == "ConcatMLP" and field.event_shape == (2,)
    twin = Flow([FunctionField(apply, params, (2,))], [params], backend=b, dtype="float64").with_eval_solver(**TIGHT)
    x = _x()
    logp = flow.log_prob(x)
    assert np.all(np.isfinite(logp)) and np.ptp(logp) > 0.1
    np.testing.assert_allclose(logp, twin.log_prob(x), rtol=0, atol=1e-8)
    if b.name == "torch":  # JAX would compile two more solves for the same check
        np.testing.assert_allclose(flow.transform(x), twin.transform(x), rtol=0, atol=1e-8)


def test_native_field_ignores_what_is_not_a_native_module(autodiff_backend):
    b = autodiff_backend
    for obj in (lambda t, x: x, MLP((2,)), np.eye(2), 3, None, *other_framework_modules(b)):
        assert native_field(obj, event_shape=(2,), backend=b) is None, type(obj).__name__
        assert native_field(obj, event_shape=(2,), backend=b.name) is None, type(obj).__name__


def test_plain_function_still_handled_by_the_core(autodiff_backend):
    flow = Flow.from_velocity(lambda t, x: -x, event_shape=(2,), backend=autodiff_backend, dtype="float64")
    flow = flow.with_eval_solver(**TIGHT)
    x = _x(4)
    np.testing.assert_allclose(flow.transform(x), x * np.exp(-1.0), atol=1e-6)


def test_params_with_a_module_are_refused(autodiff_backend):
    b = autodiff_backend
    module, _, params = native_module(b)
    with pytest.raises(ValueError, match="ambiguous"):
        Flow.from_velocity(module, params, event_shape=(2,), backend=b, dtype="float64")


def test_event_shape_is_required_unless_the_module_has_one(autodiff_backend):
    b = autodiff_backend
    module, _, _ = native_module(b)
    with pytest.raises(ValueError, match=r"event_shape= is needed .*ConcatMLP.*event_shape=\(2,\)"):
        Flow.from_velocity(module, backend=b, dtype="float64")
    for bad in ((), (0,), (2.0,), "2"):
        with pytest.raises(ValueError, match="positive ints"):
            native_field(module, event_shape=bad, backend=b)
    assert native_field(module, event_shape=2, backend=b).event_shape == (2,)


# ---- torch ------------------------------------------------------------------------------------
@pytest.fixture
def torch_b():
    pytest.importorskip("torch")
    return otflow.get_backend("torch")


def test_torch_params_are_the_modules_own(torch_b):
    module = torch_module()
    field = native_field(module, event_shape=(2,), backend=torch_b)
    named = dict(module.named_parameters())
    assert list(field.initial_params) == list(named)
    assert all(field.initial_params[k] is p for k, p in named.items())
    assert "out_scale" not in field.initial_params  # buffers stay on the module


def test_torch_gradients_of_field_apply_reach_the_module(torch_b):
    import torch

    module = torch_module()
    apply, twin_params = torch_twin(module)
    field = native_field(module, event_shape=(2,), backend=torch_b)
    t = torch.tensor(0.3, dtype=torch.float64)
    x = torch.tensor(_x(8), dtype=torch.float64)

    loss = (field.apply(field.initial_params, t, x) ** 2).sum()
    loss.backward()
    twin_loss = (apply(twin_params, t, x) ** 2).sum()
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-12, atol=0)
    linears = [m for m in module.layers if isinstance(m, torch.nn.Linear)]
    for lin, (w, b) in zip(linears, twin_params):
        for p, ref in ((lin.weight, w), (lin.bias, b)):
            assert p.grad is not None and torch.all(torch.isfinite(p.grad)) and p.grad.abs().min() > 0
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-10, atol=1e-12)


def test_torch_training_gradients_reach_the_module_and_an_optimizer_moves_the_flow(torch_b):
    """The training objective differentiates through the module's own parameters; evaluation
    does not (it keeps no graph), and reads the parameters the optimizer moved."""
    import torch

    module = torch_module(seed=1)
    apply, twin_params = torch_twin(module)
    flow = Flow.from_velocity(module, event_shape=(2,), backend="torch", dtype="float64").with_eval_solver(**TIGHT)
    twin_leaves = [p for pair in twin_params for p in pair]
    twin_field = FunctionField(apply, twin_params, (2,))
    x = torch.tensor(_x(16, 2), dtype=torch.float64)
    eps = torch.tensor(np.random.default_rng(3).normal(size=(16, 2)))
    solver = dict(rtol=1e-9, atol=1e-9)

    loss = rnode_loss(flow.fields, flow.params, x, eps, T=flow.T, solver_kwargs=solver).loss
    loss.backward()
    rnode_loss([twin_field], [twin_params], x, eps, T=flow.T, solver_kwargs=solver).loss.backward()
    module_leaves = [p for m in module.layers if isinstance(m, torch.nn.Linear) for p in (m.weight, m.bias)]
    for p, ref in zip(module_leaves, twin_leaves):
        assert p.grad is not None and bool(torch.any(p.grad != 0))
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-8)

    before = flow.with_output("native").log_prob(x)
    assert not before.requires_grad and before.grad_fn is None
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    opt.step()
    after = flow.log_prob(x.numpy())
    assert np.max(np.abs(after - before.numpy())) > 1e-3
    rebuilt = Flow.from_velocity(module, event_shape=(2,), backend="torch", dtype="float64")
    np.testing.assert_allclose(after, rebuilt.with_eval_solver(**TIGHT).log_prob(x.numpy()), rtol=0, atol=1e-12)


def test_torch_buffers_are_the_modules(torch_b):
    import torch

    module = torch_module()
    field = native_field(module, event_shape=(2,), backend=torch_b)
    t, x = torch.tensor(0.0, dtype=torch.float64), torch.tensor(_x(4), dtype=torch.float64)
    v = field.apply(field.initial_params, t, x)
    with torch.no_grad():
        module.out_scale.mul_(2.0)
    torch.testing.assert_close(field.apply(field.initial_params, t, x), 2.0 * v)


def test_torch_event_shape_read_from_module(torch_b):
    module = torch_module()
    module.event_shape = (2,)
    assert native_field(module, backend=torch_b).event_shape == (2,)
    with pytest.raises(ValueError, match=r"differs"):
        native_field(module, event_shape=(3,), backend=torch_b)


def test_torch_dtype_mismatch_is_explained(torch_b):
    module = torch_module(dtype="float32")
    flow = Flow.from_velocity(module, event_shape=(2,), backend="torch", dtype="float64")
    with pytest.raises(TypeError, match=r"float32 but the flow computes in torch.float64.*module.to"):
        flow.log_prob(_x(4))


# ---- equinox ----------------------------------------------------------------------------------
@pytest.fixture
def jax_b():
    pytest.importorskip("jax")
    return otflow.get_backend("jax")


def test_equinox_params_are_the_array_part_and_differentiate(jax_b):
    import jax
    import jax.numpy as jnp

    eqx = pytest.importorskip("equinox")
    model = eqx_module()
    field = native_field(model, event_shape=(2,), backend=jax_b)
    params = field.initial_params
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert len(leaves) == len(jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_array)))

    apply, twin_params = eqx_twin(model)
    t, x = jnp.asarray(0.3), jnp.asarray(_x(8))
    g = jax.grad(lambda p: jnp.sum(field.apply(p, t, x) ** 2))(params)
    g_twin = jax.grad(lambda p: jnp.sum(apply(p, t, x) ** 2))(twin_params)
    assert type(g) is type(model)  # gradients come back shaped like the module
    for lin, (gw, gb) in zip(g.mlp.layers, g_twin):
        np.testing.assert_allclose(lin.weight, gw, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lin.bias, gb, rtol=1e-10, atol=1e-12)
        assert np.all(np.asarray(lin.weight) != 0)


# ---- the model layer owns native modules --------------------------------------------------------
def test_backends_no_longer_adapt_modules(autodiff_backend):
    b = autodiff_backend
    assert not hasattr(b, "as_field")
    with pytest.raises(AttributeError, match=r"otflow\.cnf\.native_field\(module, event_shape=\.\.\., backend="):
        b.as_field(lambda t, x: x)


def test_a_third_party_backend_registers_its_adapter():
    """``register_native_field`` makes ``native_field`` (and ``Flow.from_velocity``) recognize
    another backend's modules; here a toy "module" class on the reference backend."""
    from otflow.cnf import fields as fields_module

    class Toy:
        def __init__(self, rate):
            self.rate = rate

    def adapter(obj, params=None, *, event_shape=None):
        if not isinstance(obj, Toy):
            return None
        return FunctionField(lambda p, t, x: -p * x, np.asarray(obj.rate), tuple(event_shape), name="Toy")

    saved = dict(fields_module._native_adapters)
    try:
        assert native_field(Toy(2.0), event_shape=(2,), backend="numpy") is None
        register_native_field("numpy", adapter)
        field = native_field(Toy(2.0), event_shape=(2,), backend="numpy")
        assert field.name == "Toy" and float(field.initial_params) == 2.0
        assert native_field(3, event_shape=(2,), backend="numpy") is None
        flow = Flow.from_velocity(Toy(0.5), event_shape=(2,), backend="numpy", dtype="float64")
        np.testing.assert_allclose(flow.with_eval_solver(**TIGHT).transform(_x(4)), _x(4) * np.exp(-0.5), atol=1e-6)
        with pytest.raises(TypeError, match="must be callable"):
            register_native_field("numpy", None)
    finally:
        fields_module._native_adapters.clear()
        fields_module._native_adapters.update(saved)
