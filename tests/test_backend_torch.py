"""The PyTorch backend: autodiff composition, custom_vjp, keys, devices, conversions."""
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import otflow  # noqa: E402
from otflow import BackendUnavailable  # noqa: E402
from otflow_torch import TorchBackend  # noqa: E402

F64 = torch.float64


@pytest.fixture(params=["func", "autograd"])
def bk(request):
    """Both VJP implementations; everything else is shared."""
    return TorchBackend(vjp_impl=request.param)


@pytest.fixture
def tb():
    return TorchBackend()


def make_mlp(d=3, h=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(d + 1, h), (h,), (h, h), (h,), (h, d), (d,)]
    params = [(0.5 * torch.randn(s, generator=g, dtype=F64)).requires_grad_() for s in shapes]

    def field(z):  # a CNF-like velocity field v(t, z), closing over params
        return apply_mlp(params, z)

    return field, params


def apply_mlp(params, z, t=0.3):
    w1, b1, w2, b2, w3, b3 = params
    tz = torch.cat([z, torch.full_like(z[..., :1], t)], -1)
    a = torch.tanh(tz @ w1 + b1)
    a = torch.tanh(a @ w2 + b2)
    return a @ w3 + b3


# ---- vjp ---------------------------------------------------------------------------------
def hutchinson_loss(v, g, eps):
    div = (g * eps).sum(-1)
    return (div ** 2).mean() + 0.5 * (v ** 2).mean() + div.mean()


def test_vjp_second_order_matches_create_graph(bk):
    field, params = make_mlp()
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(8, 3, generator=g, dtype=F64).requires_grad_()
    eps = torch.randn(8, 3, generator=g, dtype=F64)

    v, vjp_fn = bk.vjp(field, z0 * 1.5)
    (gz,) = vjp_fn(eps)
    got = torch.autograd.grad(hutchinson_loss(v, gz, eps), [*params, z0])

    z = z0 * 1.5
    v_ref = field(z)
    (gz_ref,) = torch.autograd.grad(v_ref, z, eps, create_graph=True)
    ref = torch.autograd.grad(hutchinson_loss(v_ref, gz_ref, eps), [*params, z0])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)

    # the same through loss.backward(), accumulated into .grad
    v, vjp_fn = bk.vjp(field, z0)
    hutchinson_loss(v, vjp_fn(eps)[0], eps).backward()
    v_ref = field(z0)
    gz_ref = torch.autograd.grad(v_ref, z0, eps, create_graph=True)[0]
    ref = torch.autograd.grad(hutchinson_loss(v_ref, gz_ref, eps), params)
    for p, b in zip(params, ref):
        torch.testing.assert_close(p.grad, b, atol=1e-12, rtol=0)


def test_vjp_fn_reusable_has_aux_and_trees(bk):
    field, _ = make_mlp()
    z = torch.randn(4, 3, dtype=F64)
    w = torch.tensor(2.0, dtype=F64)

    def f(tree):
        out = {"v": field(tree["z"]) * tree["w"], "s": (tree["z"] ** 2).sum()}
        return out, {"n": torch.tensor(3)}

    out, vjp_fn, aux = bk.vjp(f, {"z": z, "w": w}, has_aux=True)
    assert aux["n"].item() == 3
    ct = {"s": torch.tensor(1.0, dtype=F64), "v": torch.ones_like(out["v"])}  # other key order: same tree
    (g1,), (g2,) = vjp_fn(ct), vjp_fn(ct)
    assert set(g1) == {"w", "z"}
    torch.testing.assert_close(g1["z"], g2["z"])
    ref_w = field(z).sum()
    torch.testing.assert_close(g1["w"], ref_w.detach())
    # a primal that does not influence the output gets a zero cotangent
    _, vjp_fn = bk.vjp(lambda a, b: a * 2, z, w)
    assert torch.equal(vjp_fn(torch.ones_like(z))[1], torch.zeros((), dtype=F64))


def test_vjp_under_no_grad_builds_no_graph(bk):
    field, params = make_mlp()
    z = torch.randn(4, 3, dtype=F64)
    eps = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        v, vjp_fn = bk.vjp(field, z)
        (gz,) = vjp_fn(eps)
    assert not v.requires_grad and not gz.requires_grad
    zr = z.clone().requires_grad_()
    torch.testing.assert_close(gz, torch.autograd.grad(field(zr), zr, eps)[0])


def test_vjp_under_vmap_gives_jacobian_and_exact_trace_gradient(bk):
    field, params = make_mlp()
    x = torch.randn(3, dtype=F64)
    v, vjp_fn = bk.vjp(field, x)
    (jac,) = bk.vmap(vjp_fn)(torch.eye(3, dtype=F64))
    ref = torch.autograd.functional.jacobian(field, x)
    torch.testing.assert_close(jac, ref, atol=1e-12, rtol=0)

    # exact divergence (trace) trained through an outer backward
    tr = torch.diagonal(jac).sum()
    got = torch.autograd.grad(tr, params, allow_unused=True, materialize_grads=True)
    ref_tr = torch.diagonal(torch.autograd.functional.jacobian(field, x, create_graph=True)).sum()
    for a, b in zip(got, torch.autograd.grad(ref_tr, params, allow_unused=True, materialize_grads=True)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's own
def test_jvp(tb):
    field, _ = make_mlp()
    x = torch.randn(3, dtype=F64)
    t = torch.randn(3, dtype=F64)
    out, tan = tb.jvp(field, [x], [t])
    torch.testing.assert_close(out, field(x))
    torch.testing.assert_close(tan, torch.autograd.functional.jacobian(field, x) @ t)
    out, tan = tb.jvp(lambda d: {"y": d["b"] * d["a"]}, ({"a": x, "b": t},), ({"b": x, "a": t},))
    torch.testing.assert_close(tan["y"], x * x + t * t)


def test_autodiff_inside_vmap(bk):
    """Under a torch.func transform both vjp implementations and value_and_grad use torch.func."""
    field, _ = make_mlp()
    xs = torch.randn(4, 3, dtype=F64)
    ct = torch.randn(3, dtype=F64)
    got = bk.vmap(lambda x: bk.vjp(field, x)[1](ct)[0])(xs)
    ref = torch.stack([torch.autograd.functional.vjp(field, x, ct)[1] for x in xs])
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    vals, grads = bk.vmap(bk.value_and_grad(lambda x: (x ** 3).sum()))(xs)
    torch.testing.assert_close(vals, (xs ** 3).sum(1))
    torch.testing.assert_close(grads, 3 * xs ** 2)


def test_vmap_in_axes_none_and_lists(tb):
    x = torch.randn(5, 3)
    w = torch.randn(3)
    out = tb.vmap(lambda a, b: (a * b).sum(), in_axes=[0, None])(x, w)
    torch.testing.assert_close(out, x @ w)
    out = tb.vmap(lambda a: a * 2, in_axes=1, out_axes=1)(x)
    torch.testing.assert_close(out, x * 2)


# ---- value_and_grad --------------------------------------------------------------------------
def test_value_and_grad_trees_argnums_aux_and_unused_leaves(tb):
    a = torch.randn(3, dtype=F64)
    params = {"w": torch.randn(3, dtype=F64), "unused": torch.randn(2, dtype=F64)}
    pair = (torch.tensor(2.0, dtype=F64), torch.tensor(5.0, dtype=F64))

    def f(params, pair, a):
        s = (params["w"] * a).sum() * pair[0]
        if s > 0:  # Python control flow on values is fine
            s = s * 1.0
        return s, {"n": 3, "s2": s * 2}

    (val, aux), grads = tb.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, pair, a)
    assert not val.requires_grad and aux["n"] == 3 and not aux["s2"].requires_grad
    torch.testing.assert_close(val, (params["w"] * a).sum() * 2)
    gp, gpair = grads
    assert set(gp) == {"w", "unused"} and isinstance(gpair, tuple)
    torch.testing.assert_close(gp["w"], a * 2)
    assert torch.equal(gp["unused"], torch.zeros(2, dtype=F64))
    torch.testing.assert_close(gpair[0], (params["w"] * a).sum())
    assert torch.equal(gpair[1], torch.zeros((), dtype=F64))

    val, g = tb.value_and_grad(lambda x: (x ** 2).sum())(a)
    torch.testing.assert_close(g, 2 * a)
    _, g = tb.value_and_grad(lambda x, y: (y ** 2).sum(), argnums=0)(a, a)  # value independent of x
    assert torch.equal(g, torch.zeros_like(a))
    with pytest.raises(TypeError, match="scalar"):
        tb.value_and_grad(lambda x: x * 2)(a)


def test_value_and_grad_leaves_inputs_untouched(tb):
    w = torch.randn(3, requires_grad=True)
    _, g = tb.value_and_grad(lambda w: (w ** 2).sum())(w)
    assert w.grad is None
    torch.testing.assert_close(g, 2 * w.detach())


# ---- custom_vjp ---------------------------------------------------------------------------
def _sin_scale(scale=1.0, calls=None):
    """fun(x, w) = w·sin(x) with a hand-written backward scaled by ``scale``."""

    def fun(x, w):
        calls is not None and calls.append("fun")
        return w * torch.sin(x)

    def fwd(x, w):
        calls is not None and calls.append(("fwd", torch.is_grad_enabled()))
        return w * torch.sin(x), (x, w)

    def bwd(res, ct):
        calls is not None and calls.append(("bwd", torch.is_grad_enabled()))
        x, w = res
        return scale * ct * w * torch.cos(x), scale * (ct * torch.sin(x)).sum()

    return fun, fwd, bwd


def test_custom_vjp_uses_bwd_exactly(tb):
    x = torch.randn(5, dtype=F64, requires_grad=True)
    w = torch.tensor(1.7, dtype=F64, requires_grad=True)
    calls = []
    g = tb.custom_vjp(*_sin_scale(1.0, calls))
    out = g(x, w)
    torch.testing.assert_close(out, w * torch.sin(x))
    out.sum().backward()
    assert calls == [("fwd", False), ("bwd", True)]
    torch.testing.assert_close(x.grad, w.detach() * torch.cos(x.detach()))
    torch.testing.assert_close(w.grad, torch.sin(x.detach()).sum())

    # a deliberately wrong (scaled) backward is what autograd and value_and_grad see
    x.grad = w.grad = None
    g3 = tb.custom_vjp(*_sin_scale(3.0))
    g3(x, w).sum().backward()
    assert torch.equal(x.grad, 3.0 * w.detach() * torch.cos(x.detach()))
    _, (gx, gw) = tb.value_and_grad(lambda x, w: g3(x, w).sum(), argnums=(0, 1))(x, w)
    assert torch.equal(gx, x.grad) and torch.equal(gw, w.grad)

    # no gradient needed: fun runs, not fwd
    calls.clear()
    with torch.no_grad():
        g(x, w)
    g(x.detach(), w.detach())
    assert calls == ["fun", "fun"]


def test_custom_vjp_trees_none_args_and_parameter_hooks(tb):
    x = {"a": torch.randn(3, dtype=F64, requires_grad=True), "b": torch.randn(3, dtype=F64, requires_grad=True)}
    params = (torch.randn(3, dtype=F64, requires_grad=True), torch.randn((), dtype=F64, requires_grad=True))
    hooked = []
    params[0].register_hook(lambda grad: hooked.append(grad.clone()))

    def fun(x, params, nothing, n):
        assert nothing is None and n == 2
        return {"y": x["a"] * params[0] + x["b"] * params[1] * n}

    def fwd(x, params, nothing, n):
        return fun(x, params, nothing, n), (x, params, n)

    def bwd(res, ct):
        x, params, n = res
        cy = ct["y"]
        return ({"a": cy * params[0], "b": None}, (cy * x["a"], (cy * x["b"] * n).sum()), None, None)

    g = tb.custom_vjp(fun, fwd, bwd)
    out = g(x, params, None, 2)
    assert set(out) == {"y"}
    out["y"].sum().backward()
    torch.testing.assert_close(x["a"].grad, params[0].detach())
    assert x["b"].grad is None  # None cotangent: no gradient
    torch.testing.assert_close(params[0].grad, x["a"].detach())
    torch.testing.assert_close(params[1].grad, (x["b"].detach() * 2).sum())
    assert len(hooked) == 1  # parameters are direct inputs: autograd's hooks see them


def test_custom_vjp_dummy_argument_carries_backward_info(tb):
    """The auxiliary-output trick: bwd returns a count as the cotangent of a dummy zero scalar."""

    def fun(x, dummy):
        return x ** 3

    def fwd(x, dummy):
        return x ** 3, x

    def bwd(x, ct):
        nfe = torch.tensor(7.0, dtype=x.dtype)  # e.g. the backward solve's function evaluations
        return 3 * x ** 2 * ct, nfe

    g = tb.custom_vjp(fun, fwd, bwd)
    x = torch.randn(4, dtype=F64, requires_grad=True)
    dummy = torch.zeros((), dtype=F64, requires_grad=True)
    g(x, dummy).sum().backward()
    assert dummy.grad.item() == 7.0
    torch.testing.assert_close(x.grad, 3 * x.detach() ** 2)
    _, (gx, gd) = tb.value_and_grad(lambda x, d: g(x, d).sum(), argnums=(0, 1))(x, torch.zeros((), dtype=F64))
    assert gd.item() == 7.0
    torch.testing.assert_close(gx, x.grad)


def test_custom_vjp_bwd_may_differentiate_and_returns_detached(bk):
    """An adjoint-style bwd computes vjps (grad mode on) and its results reach autograd detached."""
    field, params = make_mlp()

    def fun(z, params):
        return field(z)

    def bwd(res, ct):
        z, ps = res
        assert torch.is_grad_enabled()
        _, vjp_fn = bk.vjp(apply_mlp, ps, z)
        gp, gz = vjp_fn(ct)
        return gz, gp

    def fwd(z, ps):
        return apply_mlp(ps, z), (z, ps)

    g = bk.custom_vjp(fun, fwd, bwd)
    z = torch.randn(4, 3, dtype=F64, requires_grad=True)
    ct = torch.randn(4, 3, dtype=F64)
    (g(z, tuple(params)) * ct).sum().backward()
    ref = torch.autograd.grad((field(z) * ct).sum(), [z, *params])
    torch.testing.assert_close(z.grad, ref[0])
    for p, r in zip(params, ref[1:]):
        torch.testing.assert_close(p.grad, r)
        assert not p.grad.requires_grad


def test_custom_vjp_under_backend_vjp_with_residual_outputs(bk):
    """custom_vjp inside this backend's vjp (torch.func for vjp_impl='func'); residuals that
    are an output, an input, an intermediate and a Python value."""

    def fwd(x):
        y = torch.sin(x)
        return y, (y, torch.cos(x), x, 2.0)

    def bwd(res, ct):
        y, cos_x, x, two = res
        assert torch.equal(y, torch.sin(x)) and two == 2.0
        return (two * ct * cos_x,)

    g = bk.custom_vjp(lambda x: torch.sin(x), fwd, bwd)
    x = torch.linspace(-1, 1, 5, dtype=F64)
    out, vjp_fn = bk.vjp(g, x)
    torch.testing.assert_close(out, torch.sin(x))
    torch.testing.assert_close(vjp_fn(torch.ones_like(x))[0], 2 * torch.cos(x))
    _, vjp_fn = bk.vjp(lambda x: g(x * x), x)  # composed inside a larger function
    torch.testing.assert_close(vjp_fn(torch.ones_like(x))[0], 2 * torch.cos(x * x) * 2 * x)


def test_vjp_in_first_order_custom_vjp_backward_keeps_no_graph(tb):
    """Directly in a first-order custom_vjp backward (the adjoint's backward solve) a vjp keeps
    no graph even when its function closes over a tensor requiring grad (its results are
    detached anyway); a vjp nested inside that function is still differentiated (second-order
    terms exact); in a double backward (create_graph) the outer vjp is tracked as usual."""
    field, params = make_mlp()
    seen = []

    def probe_term(z, eps):  # a Hutchinson-style term: a vjp inside the differentiated function
        v, inner_vjp = tb.vjp(field, z)
        return v + inner_vjp(eps)[0]

    def bwd(res, ct):
        z, eps = res
        out, vjp_fn = tb.vjp(lambda z_: probe_term(z_, eps), z)
        seen.append(out.requires_grad)
        return vjp_fn(ct)[0], None

    g = tb.custom_vjp(lambda z, eps: probe_term(z, eps),
                      lambda z, eps: (probe_term(z, eps), (z.detach(), eps)), bwd)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    eps = torch.randn(5, 3, generator=gen, dtype=F64)
    ct = torch.randn(5, 3, generator=gen, dtype=F64)
    (gz,) = torch.autograd.grad((g(z, eps) * ct).sum(), z)
    ref = torch.autograd.grad((probe_term(z, eps) * ct).sum(), z)[0]
    torch.testing.assert_close(gz, ref, rtol=1e-12, atol=1e-12)
    assert seen == [False]  # untracked: the closed-over parameters were not followed
    torch.autograd.grad((g(z, eps) * ct).sum(), z, create_graph=True)
    assert seen == [False, True]  # a double backward tracks them


def test_custom_vjp_bad_bwd_is_reported(tb):
    g = tb.custom_vjp(lambda x: x * 2, lambda x: (x * 2, None), lambda res, ct: ct * 2)
    with pytest.raises(TypeError, match="tuple of 1 cotangents"):
        g(torch.ones(2, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("name,weight_decay", [("adam", 0.0), ("adam", 0.1), ("adamw", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_trainer_updates_equal_torch_optim_loop_implementation(tb, name, weight_decay, dtype):
    """The trainer's foreach Adam/AdamW gives, to the last bit, the parameters of torch's
    per-parameter loop (its CPU default) over several steps."""
    from otflow.training import OptimizerSpec, make_trainer

    field, params = make_mlp()
    init = [p.detach().to(dtype) for p in params]
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(6, 3, generator=gen, dtype=dtype) for _ in range(4)]

    def loss_fn(p, x, key):
        return (apply_mlp(p, x) ** 2).mean(), {"status": torch.zeros((), dtype=torch.int32)}

    trainer = make_trainer(loss_fn, [p.clone() for p in init], OptimizerSpec(name=name, lr=0.05,
                           weight_decay=weight_decay), backend=tb)
    ref = [p.clone().requires_grad_() for p in init]
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    opt = cls(ref, lr=0.05, weight_decay=weight_decay, foreach=False)
    for x in batches:
        assert trainer.step(x, 0, 0.05)["applied"]
        opt.zero_grad()
        loss_fn(ref, x, 0)[0].backward()
        opt.step()
    for got, want in zip(trainer.params, ref):
        assert torch.equal(got.detach(), want.detach())


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4", "dopri5"])
@pytest.mark.parametrize("dtype", [torch.float32, F64, torch.float16])
def test_step_with_array_coefficients_equals_python_float_arithmetic(method, dtype):
    """Eager torch steps multiply by cached 0-d coefficient tensors (float32/float64): the same
    bits as the written-out step with Python floats, for the solution, error and FSAL stage."""
    from otflow.ode.solvers import SOLVERS
    from otflow.ode.solvers.runge_kutta import _ONE, _weights

    solver = SOLVERS[method]()
    tab = solver.tableau
    gen = torch.Generator().manual_seed(2)
    y = (torch.randn(7, 2, generator=gen).to(dtype), torch.randn(7, generator=gen).to(dtype))
    t, h = torch.tensor(0.3, dtype=dtype), torch.tensor(0.125, dtype=dtype)

    def f(t, y, args):
        return (torch.tanh(y[0]) * t, torch.sin(y[1]) + y[0][:, 0])

    def combine(coeffs, ks):  # the step written out with Python floats
        out = []
        for j in range(len(y)):
            acc = None
            for c, k in zip(coeffs, ks):
                if c != 0:
                    acc = k[j] * c if acc is None else acc + k[j] * c
            out.append(acc)
        return out

    ks = [f(t, y, None)]
    for i in range(1, tab.n_stages):
        ks.append(f(t + h * tab.c[i], tuple(a + h * s for a, s in zip(y, combine(tab.a[i], ks))), None))
    y1, err, _ = solver.step(f, t, y, h, None)
    fsal_offset = 1 if tab.fsal else 0
    want = tuple(a + h * s for a, s in zip(y, combine(tab.b, ks[:len(ks) - fsal_offset] + [ks[-1]] * fsal_offset)))
    for got, ref in zip(y1, want):
        assert torch.equal(got, ref)
    if tab.b_error is not None:
        for got, ref in zip(err, combine(tab.b_error, ks)):
            assert torch.equal(got, h * ref)
    weights = _weights(tab, h)
    multipliers = [w for w in weights.b if w is not None and w is not _ONE]  # Euler has none
    assert all(isinstance(w, torch.Tensor) == (dtype != torch.float16) for w in multipliers)


# ---- checkpoint and loops -------------------------------------------------------------------
def test_checkpoint_gives_equal_gradients(tb):
    field, params = make_mlp()
    z = torch.randn(6, 3, dtype=F64)

    def loss(step):
        s = z
        for _ in range(3):
            s = s + 0.1 * step(s)
        return (s ** 2).sum()

    ref = torch.autograd.grad(loss(field), params)
    got = torch.autograd.grad(loss(tb.checkpoint(field)), params)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-14, rtol=0)


def test_while_loop_kinds(tb):
    assert tb.reverse_loop_kinds == ("forward", "bounded", "checkpointed")
    w = torch.tensor(1.5, dtype=F64, requires_grad=True)
    init = (torch.tensor(0), torch.ones((), dtype=F64))
    out = tb.while_loop(lambda s: s[0] < 3, lambda s: (s[0] + 1, s[1] * w), init, max_steps=10, kind="bounded")
    (gw,) = torch.autograd.grad(out[1], w)
    torch.testing.assert_close(gw, 3 * w.detach() ** 2)
    with pytest.raises(ValueError, match="loop kind"):
        tb.while_loop(lambda s: s < 1, lambda s: s + 1, torch.tensor(0), kind="lax")
    with pytest.raises(ValueError, match="max_steps"):
        tb.while_loop(lambda s: s < 1, lambda s: s + 1, torch.tensor(0), kind="checkpointed")


def test_scan_and_fori_loop(tb):
    xs = {"a": torch.arange(4.0), "b": torch.ones(4)}
    carry, ys = tb.scan(lambda c, x: (c + x["a"] * x["b"], c), torch.tensor(0.0), xs)
    assert carry.item() == 6.0 and ys.tolist() == [0.0, 0.0, 1.0, 3.0]
    assert tb.fori_loop(0, 5, lambda i, s: s + i, torch.tensor(0)).item() == 10


# ---- random keys -----------------------------------------------------------------------------
@pytest.mark.parametrize("draw", ["normal", "uniform", "rademacher"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_draws_reproducible(tb, draw, dtype):
    k = tb.key(123)
    a = getattr(tb, draw)(k, (64,), dtype=dtype)
    b = getattr(tb, draw)(k, (64,), dtype=dtype, device="cpu")
    assert a.dtype == dtype and a.shape == (64,) and a.device.type == "cpu"
    assert torch.equal(a, b)
    k1, k2 = tb.split(k)
    assert k1 != k2
    assert not torch.equal(getattr(tb, draw)(k1, (64,), dtype=dtype), getattr(tb, draw)(k2, (64,), dtype=dtype))


def test_draw_values(tb):
    u = tb.uniform(tb.key(0), (1000,), dtype=F64, minval=-2.0, maxval=-1.0)
    assert (u >= -2).all() and (u < -1).all()
    r = tb.rademacher(tb.key(0), (1000,), dtype=torch.float32)
    assert set(r.tolist()) == {-1.0, 1.0}
    assert tb.key(5) == tb.key(5) and tb.split(tb.key(5), 3) == tb.split(tb.key(5), 3)
    with pytest.raises(TypeError):
        tb.normal(1.5, (2,), dtype=F64)


# ---- arrays, devices, dtypes, registry -----------------------------------------------------
def test_asarray_and_to_numpy(tb):
    x = torch.ones(3, requires_grad=True)
    assert tb.asarray(x) is x and tb.asarray(x, dtype=torch.float32, device="cpu") is x
    y = tb.asarray(x, dtype=F64)
    assert y.dtype == F64 and y.grad_fn is not None  # conversion keeps the graph
    ro = np.arange(4.0)[::-1]
    ro.flags.writeable = False
    t = tb.asarray(ro, dtype=torch.float32)
    assert t.tolist() == [3.0, 2.0, 1.0, 0.0]
    assert tb.asarray(2.5).dtype == torch.get_default_dtype()
    assert tb.asarray(np.float64(1.0)).dtype == F64
    h = tb.to_numpy(x)
    h[0] = 7.0
    assert x[0].item() == 1.0 and isinstance(h, np.ndarray)
    assert tb.to_numpy(torch.ones(2, dtype=torch.bfloat16)).dtype == np.float32
    assert tb.owns(x) and tb.owns(torch.nn.Parameter(torch.ones(1))) and not tb.owns(np.ones(1))
    assert tb.namespace().__name__ == "array_api_compat.torch"
    assert tb.is_concrete(x) and tb.device_of(x) == torch.device("cpu")


def test_devices(tb):
    cpu = torch.device("cpu")
    assert tb.device("cpu") == cpu and tb.device(cpu) == cpu and tb.device(None) == torch.get_default_device()
    with pytest.raises(ValueError, match="unknown torch device"):
        tb.device("tpu-ish")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "gpu", "GPU:0", torch.device("cuda")], ids=str)
def test_missing_cuda_is_reported(tb, spec):
    with pytest.raises(BackendUnavailable, match="CUDA") as info:
        tb.device(spec)
    msg = str(info.value)
    assert "device='cpu'" in msg
    if torch.version.cuda is None and torch.version.hip is None:
        assert torch.__version__ in msg and "CUDA build" in msg
    with pytest.raises(BackendUnavailable):
        tb.normal(tb.key(0), (2,), dtype=F64, device=spec)


def test_dtypes_and_flags(tb):
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tb.check_dtype(dt)
    with pytest.raises(TypeError):
        tb.check_dtype(np.float32)
    assert tb.has_autodiff and tb.has_vmap and not tb.has_jit and tb.eager
    f = lambda x: x  # noqa: E731
    assert tb.jit(f) is f
    with pytest.raises(ValueError, match="vjp_impl"):
        TorchBackend(vjp_impl="autograde")


def test_registry_and_inference():
    b = otflow.get_backend("torch")
    assert isinstance(b, TorchBackend) and b.name == "torch" and b.extra == "torch"
    assert otflow.infer_backend({"x": torch.ones(2)}) is b


def test_missing_torch_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "otflow_torch" or m.startswith("otflow_torch.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'otflow\[torch\]'"):
        import otflow_torch  # noqa: F401
