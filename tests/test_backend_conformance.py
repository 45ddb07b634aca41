"""Backend conformance: the one suite every otflow backend must pass.

Only the public :class:`otflow.Backend` methods are used, so this file *is* the
executable form of the contract written in ``otflow/backend/_base.py``. Each test runs
once per backend entry (see ``conftest.py``); a test about a capability a backend does
not declare is skipped with the reason, and the backend is checked to refuse it with
:class:`otflow.CapabilityError`.

Inputs are small but realistic: trees of (batch, dim) arrays, an MLP's parameter dict,
loops of 1 000 steps, the Hutchinson divergence of an MLP. Everything is float64 except
where dtype preservation is the point. Shapes come from a small fixed set so JAX compiles
each function once.
"""
from __future__ import annotations

import collections
import math

import array_api_compat
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import otflow
from otflow.base import tree as core_tree
from otflow.backend import LOOP_KINDS

from _helpers import assert_close, gpu_present

Pair = collections.namedtuple("Pair", ["first", "second"])

BATCH, DIM, HIDDEN = 8, 2, 16
EXACT = dict(rtol=0.0, atol=0.0)
F64 = dict(rtol=1e-10, atol=1e-12)  # same arithmetic, possibly reordered
FD = dict(rtol=1e-6, atol=1e-8)  # against central finite differences


# ---- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def arr(backend, device):
    """``arr(x, dtype=np.float64)``: a numpy-convertible value as an array of the backend."""

    def make(x, dtype=np.float64):
        return backend.asarray(np.asarray(x, dtype=dtype), device=device)

    return make


def _np(backend, tree):
    return core_tree.tree_map(backend.to_numpy, tree)


def _mlp(xp, p, x):
    """A one-hidden-layer tanh MLP; ``xp`` is numpy or a backend namespace."""
    h = xp.tanh(x @ p["W1"] + p["b1"])
    return h @ p["W2"] + p["b2"]


def _mlp_vjp(xp, p, x, v):
    """Analytic vector-Jacobian product of ``_mlp`` for a batch ``x`` (B, D): (dparams, dx)."""
    h = xp.tanh(x @ p["W1"] + p["b1"])
    d = (v @ p["W2"].T) * (1.0 - h * h)
    dp = {"W1": x.T @ d, "b1": xp.sum(d, axis=0), "W2": h.T @ v, "b2": xp.sum(v, axis=0)}
    return dp, d @ p["W1"].T


def _mlp_jvp(p, x, tp, tx):
    """Analytic Jacobian-vector product of ``_mlp`` in numpy, tangents for params and x."""
    pre = x @ p["W1"] + p["b1"]
    h = np.tanh(pre)
    dpre = tx @ p["W1"] + x @ tp["W1"] + tp["b1"]
    return (dpre * (1.0 - h * h)) @ p["W2"] + h @ tp["W2"] + tp["b2"]


def _mlp_jacobian(p, x):
    """Per-sample Jacobians d mlp(x_b) / d x_b, shape (B, D, D), rows = outputs."""
    h = np.tanh(x @ p["W1"] + p["b1"])  # (B, H)
    return np.einsum("mk,bm,jm->bkj", p["W2"], 1.0 - h * h, p["W1"])


def _hutchinson_np(p, x, eps):
    """sum_b eps_b^T J_b eps_b, with J_b the Jacobian of the MLP at sample b (numpy)."""
    _, g = _mlp_vjp(np, p, x, eps)
    return float(np.sum(g * eps))


def _params_np(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "W1": rng.normal(size=(DIM, HIDDEN)) / math.sqrt(DIM),
        "b1": 0.1 * rng.normal(size=HIDDEN),
        "W2": rng.normal(size=(HIDDEN, DIM)) / math.sqrt(HIDDEN),
        "b2": 0.1 * rng.normal(size=DIM),
    }


def _finite_difference_grad(fun, p, h=1e-6):
    """Central differences of a scalar numpy function of a dict of arrays."""
    grads = {}
    for k, v in p.items():
        g = np.zeros_like(v)
        for idx in np.ndindex(v.shape):
            plus = {kk: vv.copy() for kk, vv in p.items()}
            minus = {kk: vv.copy() for kk, vv in p.items()}
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (fun(plus) - fun(minus)) / (2 * h)
        grads[k] = g
    return grads


def _needs_autodiff(backend):
    if not backend.has_autodiff:
        pytest.skip(f"the {backend.name!r} backend has no autodiff (has_autodiff=False)")


def _int0(arr, value=0):
    return arr(value, dtype=np.int64)


# =============================================================================================
# namespace, arrays, devices
# =============================================================================================
def test_namespace_ops_match_numpy(backend, arr):
    xp = backend.namespace()
    rng = np.random.default_rng(1)
    xn, yn = rng.normal(size=(4, 3)), rng.normal(size=(3, 5))
    x, y = arr(xn), arr(yn)
    cases = {
        "matmul": (x @ y, xn @ yn),
        "exp": (xp.exp(x), np.exp(xn)),
        "tanh": (xp.tanh(x), np.tanh(xn)),
        "sum_axis0": (xp.sum(x, axis=0), xn.sum(axis=0)),
        "mean": (xp.mean(x), xn.mean()),
        "max_axis1": (xp.max(x, axis=1), xn.max(axis=1)),
        "where": (xp.where(x > 0, x, -2.0 * x), np.where(xn > 0, xn, -2.0 * xn)),
        "stack": (xp.stack([x, 2.0 * x]), np.stack([xn, 2.0 * xn])),
        "concat": (xp.concat([x, x], axis=1), np.concatenate([xn, xn], axis=1)),
        "reshape": (xp.reshape(x, (3, 4)), xn.reshape(3, 4)),
        "sqrt_abs": (xp.sqrt(xp.abs(x)), np.sqrt(np.abs(xn))),
        "vector_norm": (xp.linalg.vector_norm(x, axis=1), np.linalg.norm(xn, axis=1)),
        "zeros_like": (xp.zeros_like(x), np.zeros_like(xn)),
    }
    for name, (got, want) in cases.items():
        assert backend.owns(got), f"{name}: result is not an array of {backend!r}"
        assert_close(got, want, backend=backend, check_dtype=True, err_msg=name, **F64)


def test_array_namespace_is_compatible(backend, arr):
    xp = backend.namespace()
    x = arr(np.linspace(-1.0, 1.0, 6).reshape(2, 3))
    ns = array_api_compat.array_namespace(x)
    assert array_api_compat.is_array_api_obj(x)
    for dt in ("float32", "float64", "int64", "bool"):
        assert getattr(ns, dt) == getattr(xp, dt), f"array_namespace(x).{dt} differs from backend.namespace().{dt}"
    assert x.dtype == ns.float64
    ops = {"exp": lambda m: m.exp(x), "sin": lambda m: m.sin(x),
           "cumulative_sum": lambda m: m.cumulative_sum(x, axis=1),
           "matmul": lambda m: m.matmul(x, m.matrix_transpose(x))}
    for name, op in ops.items():
        a = op(ns)
        assert backend.owns(a), f"array_namespace(x).{name} left the backend"
        assert_close(a, backend.to_numpy(op(xp)), backend=backend, err_msg=name, **EXACT)
    # results of namespace ops stay in a namespace array_namespace understands
    ns2 = array_api_compat.array_namespace(xp.exp(x), x)
    assert ns2.float64 == xp.float64


@pytest.mark.parametrize("shape", [(), (5,), (3, 4)], ids=["0d", "1d", "2d"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_asarray_to_numpy_round_trip(backend, device, dtype, shape):
    xp = backend.namespace()
    rng = np.random.default_rng(2)
    xn = np.asarray(rng.normal(size=shape), dtype=dtype)
    x = backend.asarray(xn, device=device)
    assert tuple(x.shape) == shape
    assert x.dtype == getattr(xp, dtype), f"asarray changed dtype {dtype} into {x.dtype}"
    back = backend.to_numpy(x)
    assert isinstance(back, np.ndarray), f"to_numpy gave {type(back).__name__}"
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, xn)
    # a copy: writing into it leaves the array alone
    back[...] = 123.0
    np.testing.assert_array_equal(backend.to_numpy(x), xn)
    # asarray of a backend array keeps its dtype; an explicit dtype converts
    assert backend.asarray(x).dtype == getattr(xp, dtype)
    other = "float64" if dtype == "float32" else "float32"
    y = backend.asarray(xn, dtype=getattr(xp, other), device=device)
    assert y.dtype == getattr(xp, other)
    assert backend.to_numpy(y).dtype == np.dtype(other)
    assert_close(y, xn.astype(other), backend=backend, check_dtype=True, **EXACT)


def test_asarray_python_values(backend, device):
    xp = backend.namespace()
    x = backend.asarray([[1.0, 2.0], [3.0, 4.0]], dtype=xp.float64, device=device)
    assert_close(x, np.array([[1.0, 2.0], [3.0, 4.0]]), backend=backend, check_dtype=True, **EXACT)
    s = backend.asarray(2.5, dtype=xp.float64, device=device)
    assert tuple(s.shape) == ()
    assert_close(s, np.float64(2.5), backend=backend, check_dtype=True, **EXACT)


def test_device_resolution(backend, device):
    backend.device(None)
    cpu = backend.device("cpu")
    x = backend.asarray(np.ones(3), device=cpu)
    assert backend.device_of(x) == cpu
    # an array created without a device lives on the default device
    assert backend.device_of(backend.asarray(np.ones(2))) == backend.device(None)
    # the entry's device (cpu, or the GPU for a :gpu entry)
    y = backend.asarray(np.ones((2, 2)), device=device)
    assert backend.device_of(y) == device
    # device_of gives something asarray accepts back
    z = backend.asarray(np.zeros(4), device=backend.device_of(y))
    assert backend.device_of(z) == backend.device_of(y)


@pytest.mark.parametrize("spec", ["warp-drive:7", "cpu:cpu:9", "tpu-nonexistent"])
def test_unknown_device_raises(backend, spec):
    with pytest.raises((otflow.BackendUnavailable, ValueError)):
        backend.device(spec)


def test_missing_gpu_raises_backend_unavailable(backend, backend_id):
    if gpu_present(backend_id.framework):
        pytest.skip(f"{backend_id.framework} sees a GPU")
    with pytest.raises(otflow.BackendUnavailable):
        backend.device("gpu")


def test_owns(backend, arr):
    x = arr([1.0, 2.0])
    assert backend.owns(x)
    assert not backend.owns(1.0)
    assert not backend.owns([1.0, 2.0])
    if backend.name != "numpy":
        assert not backend.owns(np.ones(2)), "numpy arrays belong to the numpy reference backend"


# =============================================================================================
# trees
# =============================================================================================
def _example_tree(arr):
    rng = np.random.default_rng(3)
    # dict keys inserted out of order: flattening must sort them
    params = {"W2": arr(rng.normal(size=(HIDDEN, DIM))), "b2": arr(rng.normal(size=DIM)),
              "W1": arr(rng.normal(size=(DIM, HIDDEN))), "b1": arr(rng.normal(size=HIDDEN))}
    state = (arr(rng.normal(size=(BATCH, DIM))), arr(rng.normal(size=BATCH)))
    return {
        "state": state,
        "params": params,
        "history": [Pair(arr(rng.normal(size=(BATCH, DIM))), None), None, Pair(arr(1.0), arr([2.0, 3.0]))],
        "empty": (),
    }


def _treedef(tree):
    return core_tree.tree_flatten(tree)[1]


def test_tree_flatten_unflatten_round_trip(backend, arr):
    tree = _example_tree(arr)
    leaves, treedef = backend.tree_flatten(tree)
    ref = core_tree.tree_leaves(tree)
    assert len(leaves) == len(ref) == 9
    assert all(a is b for a, b in zip(leaves, ref)), "leaf order differs from the core tree order"
    rebuilt = backend.tree_unflatten(treedef, leaves)
    assert _treedef(rebuilt) == _treedef(tree)
    assert all(a is b for a, b in zip(core_tree.tree_leaves(rebuilt), ref))
    assert type(rebuilt["history"]) is list and type(rebuilt["history"][0]) is Pair
    assert rebuilt["history"][1] is None and rebuilt["history"][0].second is None
    tl = backend.tree_leaves(tree)
    assert len(tl) == len(leaves) and all(a is b for a, b in zip(tl, leaves))
    # unflatten with new leaves
    new = backend.tree_unflatten(treedef, [leaf * 2.0 for leaf in leaves])
    assert_close(new, core_tree.tree_map(lambda x: 2.0 * backend.to_numpy(x), tree), backend=backend, **EXACT)


def test_tree_map(backend, arr):
    tree = _example_tree(arr)
    doubled = backend.tree_map(lambda x: x * 2.0, tree)
    assert _treedef(doubled) == _treedef(tree)
    expected = core_tree.tree_map(lambda x: 2.0 * backend.to_numpy(x), tree)
    assert_close(doubled, expected, backend=backend, **EXACT)
    summed = backend.tree_map(lambda a, b: a + b, tree, doubled)
    assert_close(summed, core_tree.tree_map(lambda x: 3.0 * backend.to_numpy(x), tree), backend=backend, **EXACT)
    assert backend.tree_map(lambda x: x, None) is None
    assert backend.tree_leaves(None) == []


# hypothesis: nested structures of tuple / list / dict / namedtuple / None with array leaves
_LEAF_SHAPES = [(), (3,), (2, 4)]


class _Leaf:
    def __init__(self, shape_index):
        self.shape = _LEAF_SHAPES[shape_index]

    def __repr__(self):
        return f"Leaf{self.shape}"


_skeletons = st.recursive(
    st.one_of(st.integers(0, len(_LEAF_SHAPES) - 1).map(_Leaf), st.none()),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["z", "a", "m", "b2", "b10"]), children, max_size=3),
        st.tuples(children, children).map(lambda t: Pair(*t)),
    ),
    max_leaves=8,
)


def _realize(skeleton, arr):
    counter = iter(range(10**6))

    def rec(node):
        if isinstance(node, _Leaf):
            return arr(np.full(node.shape, float(next(counter))))
        if node is None:
            return None
        if isinstance(node, Pair):
            return Pair(rec(node.first), rec(node.second))
        if isinstance(node, tuple):
            return tuple(rec(c) for c in node)
        if isinstance(node, list):
            return [rec(c) for c in node]
        return {k: rec(v) for k, v in node.items()}

    return rec(skeleton)


@given(skeleton=_skeletons)
def test_tree_hypothesis_round_trip_and_order(backend, arr, skeleton):
    tree = _realize(skeleton, arr)
    leaves, treedef = backend.tree_flatten(tree)
    ref = core_tree.tree_leaves(tree)
    assert len(leaves) == len(ref)
    assert all(a is b for a, b in zip(leaves, ref)), "leaf order differs from the core tree order"
    rebuilt = backend.tree_unflatten(treedef, leaves)
    assert _treedef(rebuilt) == _treedef(tree)
    mapped = backend.tree_map(lambda x: x + 1.0, tree)
    assert _treedef(mapped) == _treedef(tree)
    for a, b in zip(core_tree.tree_leaves(mapped), ref):
        np.testing.assert_array_equal(backend.to_numpy(a), backend.to_numpy(b) + 1.0)


# =============================================================================================
# loops
# =============================================================================================
def _linear_map_np():
    theta, r = 0.01, 0.9995
    a = r * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    b = np.array([0.01, -0.02])
    x0 = np.random.default_rng(4).normal(size=(64, 2))
    return a, b, x0


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_while_loop_1000_steps_tree_state(backend, arr, kind):
    xp = backend.namespace()
    a_np, b_np, x0_np = _linear_map_np()
    a, b = arr(a_np), arr(b_np)
    n = 1000

    def cond(s):
        return s["i"] < n

    def body(s):
        x, logp = s["z"]
        x_new = x @ a + b
        return {"i": s["i"] + 1, "z": Pair(x_new, logp + 1e-3 * xp.sum(x_new, axis=1))}

    init = {"i": _int0(arr), "z": Pair(arr(x0_np), arr(np.zeros(64)))}
    max_steps = None if kind == "forward" else 1024
    out = backend.while_loop(cond, body, init, max_steps=max_steps, kind=kind)

    x, logp = x0_np, np.zeros(64)
    for _ in range(n):
        x = x @ a_np + b_np
        logp = logp + 1e-3 * x.sum(axis=1)
    assert _treedef(out) == _treedef(init)
    assert int(backend.to_numpy(out["i"])) == n
    assert out["i"].dtype == xp.int64 and out["z"].first.dtype == xp.float64
    assert_close(out["z"], Pair(x, logp), backend=backend, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_while_loop_early_exit_by_condition(backend, arr, kind):
    xp = backend.namespace()
    x0 = np.random.default_rng(5).uniform(-1.0, 1.0, size=(64, 2))
    x0[3, 1] = 1.0  # max |x0| == 1, so 2**k >= 1000 first at k = 10

    def cond(s):
        return xp.max(xp.abs(s[1])) < 1000.0

    out = backend.while_loop(cond, lambda s: (s[0] + 1, 2.0 * s[1]), (_int0(arr), arr(x0)),
                             max_steps=64, kind=kind)
    assert int(backend.to_numpy(out[0])) == 10
    assert_close(out[1], 1024.0 * x0, backend=backend, **EXACT)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_while_loop_max_steps_caps(backend, arr, kind):
    out = backend.while_loop(lambda s: s[0] >= 0, lambda s: (s[0] + 1, 0.5 * s[1]),
                             (_int0(arr), arr(np.ones((64, 2)))), max_steps=7, kind=kind)
    assert int(backend.to_numpy(out[0])) == 7
    assert_close(out[1], np.full((64, 2), 0.5**7), backend=backend, **EXACT)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_while_loop_zero_iterations(backend, arr, kind):
    x0 = np.arange(6.0).reshape(3, 2)
    out = backend.while_loop(lambda s: s[0] < 0, lambda s: (s[0] + 1, s[1] + 1.0), (_int0(arr), arr(x0)),
                             max_steps=None if kind == "forward" else 5, kind=kind)
    assert int(backend.to_numpy(out[0])) == 0
    assert_close(out[1], x0, backend=backend, **EXACT)


def test_while_loop_kind_validation(backend, arr):
    init = (_int0(arr), arr(np.ones(3)))
    cond, body = (lambda s: s[0] < 3), (lambda s: (s[0] + 1, s[1]))
    with pytest.raises(ValueError, match="bounded"):  # the message suggests the nearest kind
        backend.while_loop(cond, body, init, max_steps=5, kind="bounde")
    with pytest.raises(ValueError):
        backend.while_loop(cond, body, init, max_steps=5, kind="reverse")
    for kind in ("bounded", "checkpointed"):
        with pytest.raises(ValueError, match="max_steps"):
            backend.while_loop(cond, body, init, kind=kind)


def test_fori_loop_static_bounds(backend, arr):
    x0 = np.random.default_rng(6).normal(size=(64, 2))

    def body(i, s):
        x, total = s
        return (0.9 * x + i, total + i)

    out = backend.fori_loop(3, 10, body, (arr(x0), _int0(arr)))
    x = x0
    for i in range(3, 10):
        x = 0.9 * x + i
    assert int(backend.to_numpy(out[1])) == sum(range(3, 10))
    assert_close(out[0], x, backend=backend, **F64)
    same = backend.fori_loop(4, 4, body, (arr(x0), _int0(arr)))
    assert_close(same[0], x0, backend=backend, **EXACT)


def test_scan_stacks_tree_outputs(backend, arr):
    xp = backend.namespace()
    rng = np.random.default_rng(7)
    dt_np, v_np, x0_np = rng.uniform(0.1, 0.2, size=5), rng.normal(size=(5, 64, 2)), rng.normal(size=(64, 2))

    def f(carry, inp):
        x, t = carry
        x = x + inp["dt"] * inp["v"]
        t = t + inp["dt"]
        return (x, t), {"x": x, "stats": Pair(xp.sum(x * x), t)}

    carry, ys = backend.scan(f, (arr(x0_np), arr(0.0)), {"v": arr(v_np), "dt": arr(dt_np)})
    x, t, xs, sq, ts = x0_np, 0.0, [], [], []
    for k in range(5):
        x = x + dt_np[k] * v_np[k]
        t = t + dt_np[k]
        xs.append(x), sq.append(np.sum(x * x)), ts.append(t)
    assert_close(carry, (x, np.float64(t)), backend=backend, **F64)
    assert_close(ys, {"x": np.stack(xs), "stats": Pair(np.array(sq), np.array(ts))}, backend=backend, **F64)


def test_scan_without_xs(backend, arr):
    carry, ys = backend.scan(lambda c, _: (2.0 * c, (c, c + 1.0)), arr(np.ones(3)), None, length=4)
    assert_close(carry, np.full(3, 16.0), backend=backend, **EXACT)
    powers = np.array([1.0, 2.0, 4.0, 8.0])[:, None] * np.ones(3)
    assert_close(ys, (powers, powers + 1.0), backend=backend, **EXACT)


def _loss_through_loop(backend, arr, loop, n, max_steps, kind):
    """sum(x_n**2) for x_{k+1} = tanh(x_k @ A) * 0.99 + b, via the backend loop or unrolled."""
    xp = backend.namespace()

    def step(p, x):
        return 0.99 * xp.tanh(x @ p["A"]) + p["b"]

    def loss(p, x0):
        if loop:
            _, x = backend.while_loop(lambda s: s[0] < n, lambda s: (s[0] + 1, step(p, s[1])),
                                      (_int0(arr), x0), max_steps=max_steps, kind=kind)
        else:
            x = x0
            for _ in range(n):
                x = step(p, x)
        return xp.sum(x * x)

    return loss


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_while_loop_reverse_gradient_equals_unrolled(backend, arr, kind):
    _needs_autodiff(backend)
    if kind not in backend.reverse_loop_kinds:
        pytest.skip(f"{backend.name!r} declares {kind!r} loops not reverse-differentiable")
    a_np, b_np, x0_np = _linear_map_np()
    p = {"A": arr(a_np), "b": arr(b_np)}
    x0 = arr(x0_np[:16])
    n, max_steps = 60, 64  # the condition stops the loop before max_steps: masking must not leak
    v_loop, g_loop = backend.value_and_grad(_loss_through_loop(backend, arr, True, n, max_steps, kind),
                                            argnums=(0, 1))(p, x0)
    v_ref, g_ref = backend.value_and_grad(_loss_through_loop(backend, arr, False, n, max_steps, kind),
                                          argnums=(0, 1))(p, x0)
    assert_close(v_loop, backend.to_numpy(v_ref), backend=backend, **F64)
    assert_close(g_loop, _np(backend, g_ref), backend=backend, **F64)


def test_fori_loop_and_scan_reverse_gradients_equal_unrolled(backend, arr):
    """``fori_loop`` is always reverse-differentiable; so is ``scan``."""
    _needs_autodiff(backend)
    xp = backend.namespace()
    a_np, b_np, x0_np = _linear_map_np()
    p = {"A": arr(a_np), "b": arr(b_np)}
    x0 = arr(x0_np[:16])
    ts = arr(0.04 * np.arange(25))

    def step(params, x, t):
        return 0.99 * xp.tanh(x @ params["A"]) + params["b"] * t

    def fori_loss(params, x):
        x = backend.fori_loop(0, 25, lambda i, xx: step(params, xx, 0.04 * i), x)
        return xp.sum(x * x)

    def scan_loss(params, x):
        x, ys = backend.scan(lambda xx, t: (step(params, xx, t), xp.sum(xx)), x, ts)
        return xp.sum(x * x) + xp.sum(ys * ys)

    def unrolled_loss(params, x, with_ys):
        total = 0.0
        for i in range(25):
            total = total + xp.sum(x) ** 2
            x = step(params, x, 0.04 * i)
        return xp.sum(x * x) + (total if with_ys else 0.0)

    for loss, with_ys in ((fori_loss, False), (scan_loss, True)):
        v1, g1 = backend.value_and_grad(loss, argnums=(0, 1))(p, x0)
        v2, g2 = backend.value_and_grad(lambda q, x: unrolled_loss(q, x, with_ys), argnums=(0, 1))(p, x0)
        assert_close(v1, backend.to_numpy(v2), backend=backend, err_msg=loss.__name__, **F64)
        assert_close(g1, _np(backend, g2), backend=backend, err_msg=loss.__name__, **F64)


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_reverse_gradient_through_loop_with_vjp_in_body(backend, arr, kind):
    """The CNF pattern: Euler steps of (z, logp) with a Hutchinson divergence from vjp."""
    _needs_autodiff(backend)
    if kind not in backend.reverse_loop_kinds:
        pytest.skip(f"{backend.name!r} declares {kind!r} loops not reverse-differentiable")
    xp = backend.namespace()
    rng = np.random.default_rng(8)
    p = backend.tree_map(arr, _params_np(8))
    z0, eps = arr(rng.normal(size=(BATCH, DIM))), arr(rng.choice([-1.0, 1.0], size=(BATCH, DIM)))
    n, dt = 20, 0.05

    def step(params, z, logp):
        out, vjp_fn = backend.vjp(lambda zz: _mlp(xp, params, zz), z)
        (g,) = vjp_fn(eps)
        return z + dt * out, logp - dt * xp.sum(g * eps, axis=1)

    def make_loss(loop):
        def loss(params, z):
            logp = xp.zeros_like(z[:, 0])
            if loop:
                def body(s):
                    z1, l1 = step(params, s[1], s[2])
                    return (s[0] + 1, z1, l1)

                _, z, logp = backend.while_loop(lambda s: s[0] < n, body, (_int0(arr), z, logp),
                                                max_steps=32, kind=kind)
            else:
                for _ in range(n):
                    z, logp = step(params, z, logp)
            return 0.5 * xp.sum(z * z) - xp.sum(logp)

        return loss

    # compiled where the backend compiles, as a training step would be
    v1, g1 = backend.jit(backend.value_and_grad(make_loss(True), argnums=(0, 1)))(p, z0)
    v2, g2 = backend.jit(backend.value_and_grad(make_loss(False), argnums=(0, 1)))(p, z0)
    assert_close(v1, backend.to_numpy(v2), backend=backend, **F64)
    assert_close(g1, _np(backend, g2), backend=backend, **F64)


# =============================================================================================
# autodiff
# =============================================================================================
def _fwd_sin(xp):
    return lambda x: (xp.sin(x), xp.cos(x))


@pytest.mark.parametrize("method", ["vjp", "jvp", "value_and_grad", "custom_vjp"])
def test_without_autodiff_raises_capability_error(backend, arr, method):
    if backend.has_autodiff:
        pytest.skip(f"the {backend.name!r} backend has autodiff")
    xp = backend.namespace()
    x = arr([0.5, 1.5])
    calls = {
        "vjp": lambda: backend.vjp(xp.sin, x),
        "jvp": lambda: backend.jvp(xp.sin, (x,), (x,)),
        "value_and_grad": lambda: backend.value_and_grad(lambda y: xp.sum(y))(x),
        "custom_vjp": lambda: backend.custom_vjp(xp.sin, _fwd_sin(xp), lambda r, g: (g * r,))(x),
    }
    with pytest.raises(otflow.CapabilityError, match=r"(?s)torch.*jax|jax.*torch"):
        calls[method]()


def test_autodiff_backends_declare_autodiff(autodiff_backend):
    assert autodiff_backend.has_autodiff is True
    assert len(autodiff_backend.reverse_loop_kinds) > 0, "an autodiff backend needs a reverse-differentiable loop"


def _mlp_inputs(arr, seed=9):
    rng = np.random.default_rng(seed)
    p_np = _params_np(seed)
    x_np = rng.normal(size=(BATCH, DIM))
    return p_np, x_np, {k: arr(v) for k, v in p_np.items()}, arr(x_np)


def test_vjp_mlp_matches_analytic(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr)
    v_np = np.random.default_rng(10).normal(size=(BATCH, DIM))
    out, vjp_fn = backend.vjp(lambda pp, xx: _mlp(xp, pp, xx), p, x)
    assert_close(out, _mlp(np, p_np, x_np), backend=backend, **F64)
    cts = vjp_fn(arr(v_np))
    assert isinstance(cts, tuple) and len(cts) == 2, "vjp_fn returns a tuple, one cotangent per primal"
    dp_np, dx_np = _mlp_vjp(np, p_np, x_np, v_np)
    assert_close(cts, (dp_np, dx_np), backend=backend, **F64)
    # a single primal still gives a 1-tuple; the function can be pulled back twice
    _, vjp_x = backend.vjp(lambda xx: _mlp(xp, p, xx), x)
    for scale in (1.0, -3.0):
        (dx,) = vjp_x(arr(scale * v_np))
        assert_close(dx, scale * dx_np, backend=backend, **F64)
    # a dict output; the cotangent is the same tree even if its keys were inserted in another order
    out, vjp_d = backend.vjp(lambda xx: {"z": _mlp(xp, p, xx), "a": xp.sum(xx * xx, axis=1)}, x)
    ct = backend.tree_map(arr, {"a": np.ones(BATCH), "z": v_np})
    (dx,) = vjp_d(ct)
    assert_close(dx, dx_np + 2.0 * x_np, backend=backend, **F64)


def test_vjp_matches_finite_differences(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=11)
    v_np = np.random.default_rng(12).normal(size=(BATCH, DIM))
    _, vjp_fn = backend.vjp(lambda pp: _mlp(xp, pp, x), p)
    (dp,) = vjp_fn(arr(v_np))
    fd = _finite_difference_grad(lambda q: float(np.sum(_mlp(np, q, x_np) * v_np)), p_np)
    assert_close(dp, fd, backend=backend, **FD)


def test_vjp_has_aux_and_host_reads(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr)
    seen = []

    def f(xx):
        y = _mlp(xp, p, xx)
        if backend.is_concrete(y):  # then its value can be read on the host, graph or not
            seen.append(backend.to_numpy(y))
        if backend.eager:  # Python control flow on array values is allowed
            assert bool(xp.sum(y * y) >= 0.0)
        return y, {"sq": xp.sum(xx * xx)}

    out, vjp_fn, aux = backend.vjp(f, x, has_aux=True)
    assert_close(aux, {"sq": np.sum(x_np**2)}, backend=backend, **F64)
    (dx,) = vjp_fn(arr(np.ones((BATCH, DIM))))
    assert_close(dx, _mlp_vjp(np, p_np, x_np, np.ones((BATCH, DIM)))[1], backend=backend, **F64)
    for host in seen:
        np.testing.assert_allclose(host, _mlp(np, p_np, x_np), rtol=1e-12)


def test_second_order_hutchinson_gradient(backend, arr):
    """grad over the MLP weights of eps^T J eps, J from vjp, against finite differences."""
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=13)
    eps_np = np.random.default_rng(14).choice([-1.0, 1.0], size=(BATCH, DIM))
    eps = arr(eps_np)

    def hutchinson(params):
        _, vjp_fn = backend.vjp(lambda xx: _mlp(xp, params, xx), x)
        (g,) = vjp_fn(eps)
        return xp.sum(g * eps)

    value, grads = backend.value_and_grad(hutchinson)(p)
    assert_close(value, np.float64(_hutchinson_np(p_np, x_np, eps_np)), backend=backend, **F64)
    fd = _finite_difference_grad(lambda q: _hutchinson_np(q, x_np, eps_np), p_np)
    assert_close(grads, fd, backend=backend, **FD)
    assert float(np.max(np.abs(backend.to_numpy(grads["W1"])))) > 1e-3  # the check is not vacuous


def test_vjp_under_vmap_gives_full_jacobian(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=15)
    eye = arr(np.eye(DIM))

    def jacobian(xb):  # one sample (DIM,) -> (DIM, DIM), rows = outputs
        _, vjp_fn = backend.vjp(lambda v: _mlp(xp, p, v), xb)
        return backend.vmap(lambda ct: vjp_fn(ct)[0])(eye)

    expected = _mlp_jacobian(p_np, x_np)
    assert_close(jacobian(x[0, :]), expected[0], backend=backend, **F64)
    jac = backend.vmap(jacobian)(x)
    assert_close(jac, expected, backend=backend, **F64)
    # the exact divergence (trace) a CNF needs
    trace = backend.vmap(lambda xb: xp.sum(xp.linalg.diagonal(jacobian(xb))))(x)
    assert_close(trace, np.trace(expected, axis1=1, axis2=2), backend=backend, **F64)


def test_jvp_matches_analytic(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=16)
    rng = np.random.default_rng(17)
    tp_np = {k: rng.normal(size=v.shape) for k, v in p_np.items()}
    tx_np = rng.normal(size=x_np.shape)
    out, tangent = backend.jvp(lambda pp, xx: _mlp(xp, pp, xx), (p, x), (backend.tree_map(arr, tp_np), arr(tx_np)))
    assert_close(out, _mlp(np, p_np, x_np), backend=backend, **F64)
    assert_close(tangent, _mlp_jvp(p_np, x_np, tp_np, tx_np), backend=backend, **F64)
    zero_tp = {k: np.zeros_like(v) for k, v in p_np.items()}
    _, t_x = backend.jvp(lambda xx: _mlp(xp, p, xx), (x,), (arr(tx_np),))
    assert_close(t_x, _mlp_jvp(p_np, x_np, zero_tp, tx_np), backend=backend, **F64)


def test_value_and_grad_has_aux_tuple_argnums_dict_trees(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=18)
    target_np = np.random.default_rng(19).normal(size=(BATCH, DIM))
    target = arr(target_np)

    def loss(params, xx, tgt):
        r = _mlp(xp, params, xx) - tgt
        return 0.5 * xp.sum(r * r), {"rss": xp.sum(r * r), "r": r}

    (value, aux), grads = backend.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x, target)
    r_np = _mlp(np, p_np, x_np) - target_np
    dp_np, dx_np = _mlp_vjp(np, p_np, x_np, r_np)
    assert_close(value, np.float64(0.5 * np.sum(r_np**2)), backend=backend, **F64)
    assert_close(aux, {"rss": np.sum(r_np**2), "r": r_np}, backend=backend, **F64)
    assert isinstance(grads, tuple) and len(grads) == 2
    assert_close(grads, (dp_np, dx_np), backend=backend, **F64)

    # an int argnum gives the tree itself, not a 1-tuple
    value, gp = backend.value_and_grad(lambda *a: loss(*a)[0])(p, x, target)
    assert isinstance(gp, dict) and sorted(gp) == sorted(p_np)
    assert_close(gp, dp_np, backend=backend, **F64)
    _, gx = backend.value_and_grad(lambda *a: loss(*a)[0], argnums=1)(p, x, target)
    assert_close(gx, dx_np, backend=backend, **F64)


def test_stop_gradient_values_and_trees(backend, arr):
    tree = {"a": arr([1.0, 2.0]), "b": (arr(np.ones((2, 2))), None)}
    out = backend.stop_gradient(tree)
    assert _treedef(out) == _treedef(tree)
    assert_close(out, _np(backend, tree), backend=backend, **EXACT)


def test_stop_gradient_blocks_gradient(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    x_np = np.array([0.5, -1.0, 2.0])

    def f(x):
        return xp.sum(x * backend.stop_gradient(x))

    _, g = backend.value_and_grad(f)(arr(x_np))
    assert_close(g, x_np, backend=backend, **F64)  # not 2x

    def f_tree(p):
        sg = backend.stop_gradient(p)
        return xp.sum(p["a"] * sg["a"]) + xp.sum(sg["b"][0] * p["b"][0] ** 2)

    p = {"a": arr(x_np), "b": (arr(np.ones((2, 2)) * 3.0),)}
    _, g = backend.value_and_grad(f_tree)(p)
    assert_close(g, {"a": x_np, "b": (np.full((2, 2), 18.0),)}, backend=backend, **F64)


def test_checkpoint_preserves_values_and_gradients(backend, arr):
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=20)

    def block(params, xx):
        return xx + 0.1 * _mlp(xp, params, xx)

    ckpt = backend.checkpoint(block)
    assert_close(ckpt(p, x), x_np + 0.1 * _mlp(np, p_np, x_np), backend=backend, **F64)
    if not backend.has_autodiff:
        return

    def loss(fn):
        return lambda params, xx: xp.sum(fn(params, fn(params, xx)) ** 2)

    v1, g1 = backend.value_and_grad(loss(ckpt), argnums=(0, 1))(p, x)
    v2, g2 = backend.value_and_grad(loss(block), argnums=(0, 1))(p, x)
    assert_close(v1, backend.to_numpy(v2), backend=backend, **F64)
    assert_close(g1, _np(backend, g2), backend=backend, **F64)


def test_jit_same_values(backend, arr):
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=21)

    def f(params, xx):
        return _mlp(xp, params, xx)

    jf = backend.jit(f)
    if not backend.has_jit:
        assert jf is f, "without has_jit, jit returns the function unchanged"
    assert_close(jf(p, x), _mlp(np, p_np, x_np), backend=backend, **F64)
    assert_close(jf(p, 2.0 * x), _mlp(np, p_np, 2.0 * x_np), backend=backend, **F64)

    def repeat(xx, n):  # n must be static: Python control flow on it
        for _ in range(n):
            xx = 0.5 * xx + 1.0
        return xx

    jr = backend.jit(repeat, static_argnums=(1,))
    for n in (2, 5):
        expected = x_np
        for _ in range(n):
            expected = 0.5 * expected + 1.0
        assert_close(jr(x, n), expected, backend=backend, **F64)

    def looped(x0):
        return backend.while_loop(lambda s: s[0] < 100, lambda s: (s[0] + 1, 0.99 * s[1] + 0.01),
                                  (_int0(arr), x0))[1]

    expected = x_np
    for _ in range(100):
        expected = 0.99 * expected + 0.01
    assert_close(backend.jit(looped)(x), expected, backend=backend, **F64)

    # a draw depends only on key, shape, dtype and device: the same inside compiled code
    key = backend.key(5)
    draw = backend.jit(lambda k: backend.normal(k, (BATCH, DIM), dtype=xp.float64, device=backend.device_of(x)))
    np.testing.assert_array_equal(backend.to_numpy(draw(key)),
                                  backend.to_numpy(backend.normal(key, (BATCH, DIM), dtype=xp.float64,
                                                                  device=backend.device_of(x))))


def test_vmap_values(backend, arr):
    xp = backend.namespace()
    rng = np.random.default_rng(22)
    x_np, w_np = rng.normal(size=(BATCH, DIM)), rng.normal(size=(DIM, 3))
    x, w = arr(x_np), arr(w_np)

    def f(xb, ww):  # one sample
        y = xp.tanh(xb @ ww)
        return y, xp.sum(y * y)

    ys, sq = backend.vmap(f, in_axes=(0, None))(x, w)
    y_np = np.tanh(x_np @ w_np)
    assert_close((ys, sq), (y_np, np.sum(y_np**2, axis=1)), backend=backend, **F64)
    ys_t = backend.vmap(lambda xb, ww: xp.tanh(xb @ ww), in_axes=(1, None), out_axes=1)(arr(x_np.T), w)
    assert_close(ys_t, y_np.T, backend=backend, **F64)


# ---- custom_vjp -----------------------------------------------------------------------------
def test_custom_vjp_uses_bwd_exactly(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    x_np = np.linspace(-2.0, 2.0, 12).reshape(3, 4)
    x = arr(x_np)
    f = backend.custom_vjp(lambda y: xp.sin(y), _fwd_sin(xp), lambda cos_y, g: (2.0 * g * cos_y,))
    assert_close(f(x), np.sin(x_np), backend=backend, **F64)
    value, grad = backend.value_and_grad(lambda y: xp.sum(f(y)))(x)
    assert_close(value, np.float64(np.sum(np.sin(x_np))), backend=backend, **F64)
    assert_close(grad, 2.0 * np.cos(x_np), backend=backend, **F64)  # the deliberately wrong bwd, exactly
    out, vjp_fn = backend.vjp(f, x)
    (g,) = vjp_fn(arr(np.full((3, 4), 3.0)))
    assert_close(g, 6.0 * np.cos(x_np), backend=backend, **F64)
    # composed: the custom rule is used inside a larger graph
    _, grad2 = backend.value_and_grad(lambda y: xp.sum(f(y * y)))(x)
    assert_close(grad2, 2.0 * np.cos(x_np**2) * 2.0 * x_np, backend=backend, **F64)


def test_custom_vjp_tree_args_outputs_and_none_cotangent(backend, arr):
    _needs_autodiff(backend)
    xp = backend.namespace()
    p_np, x_np, p, x = _mlp_inputs(arr, seed=23)
    scale_np = 0.7

    def fun(params, xx, scale):  # out is a tree: (y, row sums), like (z, delta_logp)
        y = _mlp(xp, params, xx) * scale
        return (y, xp.sum(y, axis=1))

    def fwd(params, xx, scale):
        return fun(params, xx, scale), {"p": params, "x": xx, "scale": scale}

    def bwd(res, ct):
        gy, gs = ct
        v = (gy + gs[:, None]) * res["scale"]
        dp, dx = _mlp_vjp(xp, res["p"], res["x"], v)
        return ({k: 3.0 * g for k, g in dp.items()}, 3.0 * dx, None)  # 3x: proves bwd is used

    f = backend.custom_vjp(fun, fwd, bwd)
    y, s = f(p, x, arr(scale_np))
    y_np = _mlp(np, p_np, x_np) * scale_np
    assert_close((y, s), (y_np, y_np.sum(axis=1)), backend=backend, **F64)

    def loss(params, xx, scale):
        yy, ss = f(params, xx, scale)
        return 0.5 * xp.sum(yy * yy) + xp.sum(ss)

    value, (gp, gx) = backend.value_and_grad(loss, argnums=(0, 1))(p, x, arr(scale_np))
    v_np = (y_np + 1.0) * scale_np
    dp_np, dx_np = _mlp_vjp(np, p_np, x_np, v_np)
    assert_close(value, np.float64(0.5 * np.sum(y_np**2) + np.sum(y_np)), backend=backend, **F64)
    assert_close(gp, {k: 3.0 * g for k, g in dp_np.items()}, backend=backend, **F64)
    assert_close(gx, 3.0 * dx_np, backend=backend, **F64)


def test_custom_vjp_auxiliary_output_via_dummy_cotangent(backend, arr):
    """bwd reports a count (e.g. backward NFE) as the cotangent of a dummy zero scalar."""
    _needs_autodiff(backend)
    xp = backend.namespace()
    x_np = np.linspace(0.1, 1.2, 8).reshape(4, 2)

    def fun(x, dummy):
        return xp.sin(x)

    def fwd(x, dummy):
        return xp.sin(x), (xp.cos(x), dummy)

    def bwd(res, g):
        cos_x, dummy = res
        # a loop inside bwd counts its "function evaluations"
        nfe = backend.while_loop(lambda s: s < 7.0, lambda s: s + 1.0, xp.zeros_like(dummy))
        return (g * cos_x, nfe)

    f = backend.custom_vjp(fun, fwd, bwd)

    def loss(x, dummy):
        return xp.sum(f(x, dummy))

    vg = backend.value_and_grad(loss, argnums=(0, 1))
    runs = [vg]
    if backend.has_jit:
        runs.append(backend.jit(vg))
    for run in runs:
        for _ in range(2):  # no state leaks between calls
            value, (gx, gd) = run(arr(x_np), arr(0.0))
            assert_close(value, np.float64(np.sum(np.sin(x_np))), backend=backend, **F64)
            assert_close(gx, np.cos(x_np), backend=backend, **F64)
            assert_close(gd, np.float64(7.0), backend=backend, check_dtype=True, **EXACT)


# =============================================================================================
# random keys
# =============================================================================================
_DRAWS = ("normal", "uniform", "rademacher")


def _draw(backend, name, key, shape, dtype, device):
    return getattr(backend, name)(key, shape, dtype=dtype, device=device)


@pytest.mark.parametrize("shape", [(), (7,), (3, 4)], ids=["0d", "1d", "2d"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_draws_honour_shape_dtype_device(backend, device, dtype, shape):
    xp = backend.namespace()
    key = backend.key(0)
    for name in _DRAWS:
        x = _draw(backend, name, key, shape, getattr(xp, dtype), device)
        assert tuple(x.shape) == shape, name
        assert x.dtype == getattr(xp, dtype), f"{name}: dtype {x.dtype}"
        assert backend.to_numpy(x).dtype == np.dtype(dtype)
        assert backend.device_of(x) == device, name


@pytest.mark.parametrize("name", _DRAWS)
def test_same_key_same_draw_split_keys_differ(backend, device, name):
    xp = backend.namespace()
    shape, dt = (64, 2), xp.float64
    k = backend.key(42)
    a = backend.to_numpy(_draw(backend, name, k, shape, dt, device))
    np.testing.assert_array_equal(backend.to_numpy(_draw(backend, name, k, shape, dt, device)), a)
    np.testing.assert_array_equal(backend.to_numpy(_draw(backend, name, backend.key(42), shape, dt, device)), a)
    other_seed = backend.to_numpy(_draw(backend, name, backend.key(43), shape, dt, device))
    assert not np.array_equal(other_seed, a)
    keys = backend.split(k, 3)
    assert isinstance(keys, list) and len(keys) == 3
    draws = [backend.to_numpy(_draw(backend, name, kk, shape, dt, device)) for kk in keys]
    for i in range(3):
        assert not np.array_equal(draws[i], a), f"split key {i} repeats the parent's draw"
        for j in range(i):
            assert not np.array_equal(draws[i], draws[j]), f"split keys {j} and {i} give the same draw"
    again = [backend.to_numpy(_draw(backend, name, kk, shape, dt, device)) for kk in backend.split(k, 3)]
    for d, e in zip(draws, again):
        np.testing.assert_array_equal(d, e)
    k1, k2 = backend.split(k)  # default num=2
    assert not np.array_equal(backend.to_numpy(_draw(backend, name, k1, shape, dt, device)),
                              backend.to_numpy(_draw(backend, name, k2, shape, dt, device)))


N_DRAWS = 200_000


def test_normal_moments(backend, device):
    x = backend.to_numpy(backend.normal(backend.key(1), (N_DRAWS,), dtype=backend.namespace().float64, device=device))
    assert abs(x.mean()) < 5.0 / math.sqrt(N_DRAWS)
    assert abs(x.var() - 1.0) < 5.0 * math.sqrt(2.0 / N_DRAWS)


def test_rademacher_values(backend, device):
    x = backend.to_numpy(backend.rademacher(backend.key(2), (N_DRAWS // 2, 2), dtype=backend.namespace().float64,
                                            device=device))
    assert np.all((x == 1.0) | (x == -1.0)), "rademacher draws must be exactly +-1"
    assert abs(x.mean()) < 5.0 / math.sqrt(x.size)


def test_uniform_range_and_mean(backend, device):
    lo, hi = -2.0, 3.0
    x = backend.to_numpy(backend.uniform(backend.key(3), (N_DRAWS,), dtype=backend.namespace().float64,
                                         device=device, minval=lo, maxval=hi))
    assert x.min() >= lo and x.max() < hi
    assert abs(x.mean() - 0.5 * (lo + hi)) < 5.0 * (hi - lo) / math.sqrt(12.0 * N_DRAWS)
    assert abs(x.var() - (hi - lo) ** 2 / 12.0) < 0.05 * (hi - lo) ** 2 / 12.0
    x01 = backend.to_numpy(backend.uniform(backend.key(4), (1000,), dtype=backend.namespace().float64, device=device))
    assert x01.min() >= 0.0 and x01.max() < 1.0


# =============================================================================================
# capability flags and registry
# =============================================================================================
def test_capability_flags(backend, backend_id):
    assert isinstance(backend, otflow.Backend)
    assert backend.name == backend_id.backend_name
    for flag in ("has_autodiff", "has_jit", "has_vmap", "eager"):
        assert type(getattr(backend, flag)) is bool, f"{flag} must be a bool, got {getattr(backend, flag)!r}"
    kinds = backend.reverse_loop_kinds
    assert isinstance(kinds, tuple), f"reverse_loop_kinds must be a tuple, got {type(kinds).__name__}"
    assert set(kinds) <= set(LOOP_KINDS) and len(set(kinds)) == len(kinds), kinds
    if not backend.has_autodiff:
        assert kinds == (), "a backend without autodiff cannot reverse-differentiate a loop"
    assert backend.extra is None or isinstance(backend.extra, str)


def test_get_backend_unknown_name_suggests():
    with pytest.raises(ValueError, match="'numpy'") as info:
        otflow.get_backend("nope")
    assert "'torch'" in str(info.value) and "'jax'" in str(info.value)
    with pytest.raises(ValueError, match="Did you mean 'numpy'"):
        otflow.get_backend("nunpy")
    with pytest.raises(ValueError, match="Did you mean 'torch'"):
        otflow.get_backend("trch")


def test_get_backend_identity(backend):
    assert otflow.get_backend(backend) is backend
    assert otflow.get_backend(backend.name) is backend


def test_infer_backend(backend, arr):
    x = arr(np.ones((2, 3)))
    assert otflow.infer_backend(x) is backend
    assert otflow.infer_backend({"params": (None, [x]), "t": 0.5}) is backend
    assert otflow.get_backend(None, like=(x,)) is backend
    # numpy arrays always belong to the numpy reference backend, whatever is imported
    assert otflow.infer_backend(np.ones(2)).name == "numpy"
    with pytest.raises(TypeError):
        otflow.infer_backend({"t": 0.5, "n": None})
