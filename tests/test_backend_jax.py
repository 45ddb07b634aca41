"""The JAX backend: trees, loop kinds and their gradients and memory, autodiff,
custom VJPs, keys, devices and the float64 policy."""
from __future__ import annotations

import collections
import subprocess
import sys
import time

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import array_api_compat  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import otflow  # noqa: E402
from otflow.base import tree as _tree  # noqa: E402
from otflow_jax import JaxBackend  # noqa: E402
from otflow_jax._loops import level_lengths  # noqa: E402

B = JaxBackend()
Pair = collections.namedtuple("Pair", ["b", "a"])


# ---- registration, arrays, devices ----------------------------------------------------------
def test_registry_flags_and_namespace():
    assert otflow.get_backend("jax").name == "jax"
    assert otflow.infer_backend({"x": jnp.ones(2)}).name == "jax"
    assert (B.has_autodiff, B.has_jit, B.has_vmap, B.eager) == (True, True, True, False)
    assert B.reverse_loop_kinds == ("bounded", "checkpointed") and B.extra == "jax"
    assert B.namespace() is jnp
    assert array_api_compat.array_namespace(jnp.zeros(1)) is jnp


def test_owns_concrete_and_device_under_jit():
    x = jnp.ones(3)
    assert B.owns(x) and not B.owns(np.ones(3)) and B.is_concrete(x)
    assert B.device_of(x) == jax.devices()[0]

    seen = {}

    @jax.jit
    def f(y):
        seen.update(owns=B.owns(y), concrete=B.is_concrete(y), device=B.device_of(y))
        return y

    f(x)
    assert seen == {"owns": True, "concrete": False, "device": None}
    assert B.to_numpy(x).tolist() == [1.0, 1.0, 1.0]
    assert B.asarray(x) is x
    assert B.asarray(np.arange(3.0), device="cpu").device == B.device("cpu")


def test_devices():
    assert B.device() == jax.devices()[0]
    assert B.device("cpu") == jax.devices("cpu")[0]
    with pytest.raises(ValueError, match="Did you mean 'cuda'"):
        B.device("cdua")
    with pytest.raises(otflow.BackendUnavailable, match="does not exist"):
        B.device(f"cpu:{len(jax.devices('cpu'))}")
    try:
        jax.devices("gpu")
    except RuntimeError:
        for spec in ("gpu", "cuda", "cuda:1"):
            with pytest.raises(otflow.BackendUnavailable, match="no GPU support") as info:
                B.device(spec)
            assert 'pip install -U "jax[cuda12]"' in str(info.value) and "device='cpu'" in str(info.value)
        with pytest.raises(otflow.BackendUnavailable):
            B.asarray(np.ones(2), device="cuda")
    else:  # pragma: no cover - only with a GPU
        assert B.device("cuda:0").platform == "gpu"


def test_float64_refused_without_x64():
    jax.config.update("jax_enable_x64", False)
    try:
        for call in (lambda: B.asarray(np.ones(2)), lambda: B.asarray([1.0], dtype=np.float64),
                     lambda: B.check_dtype("float64"), lambda: B.normal(B.key(0), (2,), dtype=jnp.float64)):
            with pytest.raises(TypeError) as info:
                call()
            msg = str(info.value)
            assert "jax.config.update('jax_enable_x64', True)" in msg and "JAX_ENABLE_X64=1" in msg
            assert "float32" in msg
        assert B.asarray(np.ones(2), dtype=np.float32).dtype == jnp.float32
        assert B.asarray(1.5).dtype == jnp.float32
        B.check_dtype(jnp.float32)
    finally:
        jax.config.update("jax_enable_x64", True)
    assert B.asarray(np.ones(2)).dtype == jnp.float64


def test_import_error_names_the_extra():
    code = ("import sys; sys.modules['jax'] = None\n"
            "import otflow\n"
            "try:\n    import otflow_jax\nexcept ImportError as e:\n    print('direct:', e)\n"
            "try:\n    otflow.get_backend('jax')\nexcept otflow.BackendUnavailable as e:\n    print('registry:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["direct", "registry"], out
    assert all("pip install 'otflow[jax]'" in line for line in lines), out


# ---- trees ----------------------------------------------------------------------------------
TREES = [
    (1, [2, 3], None),
    {"b": (4, None), "a": [5, {"d": 6, "c": 7}]},
    Pair(b=[8, None], a={"z": 9, "y": Pair(10, 11)}),
    [None, (), {}, (12,)],
]


@pytest.mark.parametrize("tree", TREES)
def test_tree_order_matches_core(tree):
    leaves, treedef = B.tree_flatten(tree)
    assert leaves == _tree.tree_leaves(tree) == B.tree_leaves(tree)
    assert B.tree_unflatten(treedef, leaves) == tree
    assert B.tree_map(lambda a, b: a + b, tree, tree) == _tree.tree_map(lambda a, b: a + b, tree, tree)


# ---- loops ----------------------------------------------------------------------------------
def test_level_lengths_cover_max_steps():
    for n in (1, 2, 16, 17, 100, 1000, 4097):
        lengths = level_lengths(n)
        assert np.prod(lengths) >= n and len(lengths) == max(1, int(np.ceil(np.log(n) / np.log(64) - 1e-12)))
    assert level_lengths(1000, base=16) == [10, 10, 10] and level_lengths(17, base=4) == [3, 3, 2]
    assert level_lengths(4096) == [64, 64] and level_lengths(17) == [17]


def test_loop_argument_checks():
    with pytest.raises(ValueError, match="Did you mean 'bounded'"):
        B.while_loop(lambda s: s < 1, lambda s: s + 1, 0.0, max_steps=3, kind="bouned")
    with pytest.raises(ValueError, match="needs max_steps"):
        B.while_loop(lambda s: s < 1, lambda s: s + 1, 0.0, kind="checkpointed")
    with pytest.raises(TypeError, match="Python int"):
        jax.jit(lambda n: B.while_loop(lambda s: s < 1, lambda s: s + 1, 0.0, max_steps=n, kind="bounded"))(3)
    with pytest.raises(TypeError, match="must keep shapes and dtypes"):
        B.while_loop(lambda s: s < 1, lambda s: s.astype(jnp.float32), jnp.zeros(()), max_steps=3, kind="bounded")


def test_forward_while_loop_and_small_loops():
    init = (jnp.asarray(0), jnp.asarray(1.0))
    run = jax.jit(lambda m: B.while_loop(lambda s: s[0] < 10, lambda s: (s[0] + 1, s[1] * m), init)[1])
    assert run(2.0) == 1024.0
    capped = B.while_loop(lambda s: s[0] < 10, lambda s: (s[0] + 1, s[1] * 2), init, max_steps=4)
    assert int(capped[0]) == 4
    for kind in ("bounded", "checkpointed"):
        assert B.while_loop(lambda s: s[0] < 10, lambda s: (s[0] + 1, s[1] * 2), init, max_steps=0, kind=kind) is init
    # fori_loop and scan are reverse-differentiable
    g = jax.grad(lambda a: B.fori_loop(0, 5, lambda i, x: x * a + i, 1.0))(2.0)
    assert g == 5 * 2.0 ** 4 + sum(i * (4 - i) * 2.0 ** (3 - i) for i in range(4))  # d/da of a^5 + Σ i a^(4-i)
    carry, ys = B.scan(lambda c, x: (c + x, c * x), 0.0, jnp.arange(4.0))
    assert carry == 6.0 and ys.tolist() == [0.0, 0.0, 2.0, 9.0]


def _adaptive_body(theta):
    """x ← x + h·f(x), t ← t + h with a state-dependent h: the step count depends on the data."""

    def body(state):
        t, x = state
        h = 0.2 / (1.0 + jnp.sum(x ** 2))
        return t + h, x + h * jnp.tanh(theta[0] * x + theta[1])

    return body


def _not_done(state):
    return state[0] < 1.0


def _unrolled(theta, x0, max_steps):
    """The loss of a plain Python loop running as many steps as the loop would, and that count."""
    state, n = (0.0, np.asarray(x0)), 0
    while n < max_steps and bool(_not_done(state)):  # count on concrete values
        state, n = _adaptive_body(np.asarray(theta))(state), n + 1

    def loss(theta, x0):
        s = (jnp.asarray(0.0), x0)
        for _ in range(n):
            s = _adaptive_body(theta)(s)
        return jnp.sum(s[1] ** 2) + s[0]

    return loss, n


@pytest.mark.parametrize("max_steps", [100, 17], ids=["stops-early", "max-steps-reached"])
def test_reverse_loop_gradients_match_unrolled(max_steps):
    """Both levels of nesting are used (100 → [10, 10], 17 → [5, 4], which overshoots 17)."""
    theta, x0 = jnp.asarray([1.3, -0.2]), jnp.asarray([0.5, -1.0, 0.7])
    unrolled, n = _unrolled(theta, x0, max_steps)
    assert n == {100: 25, 17: 17}[max_steps]  # the loop needs 25 steps
    want_val, want_grads = jax.value_and_grad(unrolled, argnums=(0, 1))(theta, x0)  # eager
    for kind in ("bounded", "checkpointed"):
        def loss(theta, x0, kind=kind):
            t, x = B.while_loop(_not_done, _adaptive_body(theta), (0.0, x0), max_steps=max_steps, kind=kind)
            return jnp.sum(x ** 2) + t

        val, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(theta, x0)
        np.testing.assert_allclose(val, want_val, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_finished_iterations_are_skipped_and_vmap():
    calls = []

    def body(s):
        jax.debug.callback(lambda: calls.append(1))
        return s[0] + 1, s[1] * 2.0

    def run(x, kind):
        return B.while_loop(lambda s: s[1] < 5.0, body, (0, x), max_steps=100_000, kind=kind)

    for kind in ("bounded", "checkpointed"):
        calls.clear()
        n, x = jax.jit(run, static_argnums=1)(jnp.asarray(0.1), kind)
        jax.effects_barrier()
        assert (int(n), float(x), len(calls)) == (6, 6.4, 6)
    calls.clear()
    batched = jax.vmap(lambda x: run(x, "checkpointed"))(jnp.asarray([1.0, 0.1, 3.0]))
    assert batched[0].tolist() == [3, 6, 1] and batched[1].tolist() == [8.0, 6.4, 6.0]


def test_long_loop_memory_and_time():
    """4096-step bound, 1000 steps run, state of 256 float64: checkpointed needs far less memory."""
    size, steps, max_steps = 256, 1000, 4096

    def make(kind):
        def loss(h, x0):
            _, x = B.while_loop(lambda s: s[0] < steps, lambda s: (s[0] + 1, s[1] + h * s[1]),
                                (jnp.asarray(0), x0), max_steps=max_steps, kind=kind)
            return jnp.sum(x)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    h, x0 = jnp.asarray(1e-3), jnp.linspace(0.5, 1.5, size)
    temp = {}
    for kind in ("bounded", "checkpointed"):
        start = time.perf_counter()
        compiled = make(kind).lower(h, x0).compile()
        temp[kind] = compiled.memory_analysis().temp_size_in_bytes
        val, (gh, gx) = compiled(h, x0)
        elapsed = time.perf_counter() - start
        print(f"\n{kind}: temp {temp[kind] / 1e6:.3f} MB, compile+run {elapsed:.2f} s")
        growth = (1 + 1e-3) ** steps
        np.testing.assert_allclose(val, growth * np.sum(x0), rtol=1e-12)
        np.testing.assert_allclose(gx, np.full(size, growth), rtol=1e-12)
        np.testing.assert_allclose(gh, steps * (1 + 1e-3) ** (steps - 1) * np.sum(x0), rtol=1e-12)
        assert elapsed < 20
    state_bytes = size * 8
    assert temp["bounded"] >= max_steps * state_bytes  # every bounded iteration keeps its state
    assert temp["checkpointed"] < temp["bounded"] / 20


# ---- autodiff ---------------------------------------------------------------------------------
def test_vjp_under_vmap_and_jvp():
    w = jnp.asarray([[1.0, 2.0], [-0.5, 0.3], [0.2, 0.1]])

    def f(x):
        return jnp.tanh(w @ x)

    xs, cts = jnp.asarray([[0.1, 0.2], [1.0, -1.0]]), jnp.asarray([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5]])
    got = B.vmap(lambda x, ct: B.vjp(f, x)[1](ct)[0])(xs, cts)
    want = np.stack([w.T @ (ct * (1 - np.tanh(w @ x) ** 2)) for x, ct in zip(xs, cts)])
    np.testing.assert_allclose(got, want, rtol=1e-12)
    out, vjp_fn, aux = B.vjp(lambda x: (f(x), x.sum()), xs[0], has_aux=True)
    assert aux == pytest.approx(0.3) and len(vjp_fn(cts[0])) == 1
    _, tangent = B.jvp(f, (xs[0],), (jnp.asarray([1.0, 0.0]),))
    np.testing.assert_allclose(tangent, w[:, 0] * (1 - np.tanh(w @ xs[0]) ** 2), rtol=1e-12)
    batched = B.vmap(lambda x, s: x * s, in_axes=[0, None])(xs, 2.0)
    np.testing.assert_allclose(batched, 2 * xs)


def test_value_and_grad_stop_gradient_checkpoint_jit():
    def f(a, b):
        return jnp.sum(a ** 2 * b), a

    (val, aux), (ga, gb) = B.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray([1.0, 2.0]), 3.0)
    assert val == 15.0 and ga.tolist() == [6.0, 12.0] and gb == 5.0 and aux.tolist() == [1.0, 2.0]
    val, g = B.value_and_grad(lambda p: B.checkpoint(lambda q: jnp.sum(q["w"] ** 3))(p))({"w": jnp.asarray([2.0])})
    assert val == 8.0 and g["w"].tolist() == [12.0]
    g = jax.grad(lambda x: jnp.sum(x * B.stop_gradient({"s": x})["s"]))(jnp.asarray([3.0]))
    assert g.tolist() == [3.0]
    scaled = B.jit(lambda x, k: x * k, static_argnums=(1,))
    assert scaled(jnp.asarray(2.0), 3) == 6.0


def test_custom_vjp_cotangents_trees_and_none():
    def fun(params, x, unused):
        return params["w"] * jnp.sin(x) + params["b"]

    def fwd(params, x, unused):
        return fun(params, x, unused), (params, x)

    def bwd(res, ct):
        params, x = res  # deliberately "wrong" rules: the custom cotangents must come out exactly
        return {"w": 3.0 * jnp.sum(ct * x), "b": None}, 7.0 * ct, None

    g = B.custom_vjp(fun, fwd, bwd)
    params, x = {"w": jnp.asarray(2.0), "b": jnp.asarray(0.5)}, jnp.asarray([0.1, 0.4])
    np.testing.assert_allclose(g(params, x, None), 2.0 * np.sin(x) + 0.5)
    gp, gx = jax.grad(lambda p, x: jnp.sum(g(p, x, None)), argnums=(0, 1))(params, x)
    assert gp["w"] == pytest.approx(3.0 * 0.5) and gp["b"] == 0.0 and gx.tolist() == [7.0, 7.0]
    # a None cotangent for an array argument is zeros shaped like it
    h = B.custom_vjp(lambda a, b: a * b, lambda a, b: (a * b, b), lambda b, ct: (ct * b, None))
    ga, gb = jax.grad(lambda a, b: jnp.sum(h(a, b)), argnums=(0, 1))(x, jnp.full((2,), 2.0))
    assert ga.tolist() == [2.0, 2.0] and gb.tolist() == [0.0, 0.0]
    # integer and key arguments take None cotangents
    noisy = B.custom_vjp(lambda x, n, k: x * n + jax.random.normal(k, x.shape),
                         lambda x, n, k: (x * n + jax.random.normal(k, x.shape), n), lambda n, ct: (ct * n, None, None))
    assert jax.grad(lambda x: jnp.sum(noisy(x, 3, B.key(0))))(x).tolist() == [3.0, 3.0]
    bad = B.custom_vjp(lambda x: x, lambda x: (x, None), lambda r, ct: ct)
    with pytest.raises(TypeError, match="one cotangent per argument"):
        jax.grad(lambda x: bad(x).sum())(x)
    bad = B.custom_vjp(lambda x: x, lambda x: (x, None), lambda r, ct: (ct[:1],))
    with pytest.raises(TypeError, match=r"shape \(1,\) for an argument of shape \(2,\)"):
        jax.grad(lambda x: bad(x).sum())(x)


def test_custom_vjp_dummy_aux_under_jit():
    """The backward pass reports how many steps it took through the dummy's cotangent."""

    def fun(x, dummy):
        return 2.0 * x

    def fwd(x, dummy):
        return 2.0 * x, None

    def bwd(_, ct):
        def body(s):
            return s[0] + 1, s[1] / 2.0

        steps, _ = lax.while_loop(lambda s: s[1] > 1.0, body, (jnp.asarray(0), jnp.sum(jnp.abs(ct))))
        return 2.0 * ct, steps  # an integer count: cast to the dummy's dtype

    g = B.custom_vjp(fun, fwd, bwd)

    @jax.jit
    def grads(x, scale):
        return jax.grad(lambda x, d: jnp.sum(scale * g(x, d)), argnums=(0, 1))(x, jnp.zeros(()))

    gx, nfe = grads(jnp.ones(3), 4.0)  # |ct| sums to 12: halved 4 times to reach <= 1
    assert gx.tolist() == [8.0, 8.0, 8.0] and nfe == 4.0 and nfe.dtype == jnp.float64
    _, nfe = grads(jnp.ones(3), 40.0)  # 120 → 7 halvings, same compiled function
    assert nfe == 7.0


# ---- random keys --------------------------------------------------------------------------------
def test_keys():
    k = B.key(0)
    assert jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
    assert B.normal(k, (3,), dtype=jnp.float64).tolist() == B.normal(B.key(0), (3,), dtype=jnp.float64).tolist()
    ks = B.split(k, 3)
    assert isinstance(ks, list) and len(ks) == 3
    draws = {tuple(B.uniform(kk, (4,), dtype=jnp.float64).tolist()) for kk in [k, *ks]}
    assert len(draws) == 4
    u = B.uniform(k, (1000,), dtype=jnp.float32, minval=-2.0, maxval=-1.0, device="cpu")
    assert u.dtype == jnp.float32 and float(u.min()) >= -2.0 and float(u.max()) < -1.0
    r = B.rademacher(k, (1000,), dtype=jnp.float64)
    assert set(np.unique(r).tolist()) == {-1.0, 1.0}
    with pytest.raises(TypeError):
        B.key(1.5)
    # large and negative seeds neither collide with small ones nor depend on the x64 flag
    data = {s: B.to_numpy(B.key(s)).tolist() for s in (7, 2 ** 32 + 7, -1, 2 ** 32 - 1)}
    assert len({tuple(v) for v in data.values()}) == 4
    jax.config.update("jax_enable_x64", False)
    try:
        assert {s: B.to_numpy(B.key(s)).tolist() for s in data} == data
    finally:
        jax.config.update("jax_enable_x64", True)


def test_fast_paths_of_key_and_asarray_equal_jax_own_ops():
    """B.key wraps the key data jax.random.key makes (no eager seeding op per training
    iteration) and B.asarray converts numpy batches on the host before copying: both give
    exactly what JAX's own calls give."""
    for seed in (0, 1, 7, 12345, 2 ** 31, 2 ** 32 - 1):
        key = B.key(seed)
        assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(seed))
        assert B.to_numpy(key).tolist() == jax.random.key_data(jax.random.key(seed)).tolist()
        np.testing.assert_array_equal(B.to_numpy(B.normal(key, (3,), dtype=jnp.float32)),
                                      np.asarray(jax.random.normal(jax.random.key(seed), (3,), jnp.float32)))
    x = np.random.default_rng(0).normal(size=(64, 3)) * np.array([1.0, 1e-30, 1e30])  # rounding and range
    fast = B.asarray(x, dtype=jnp.float32, device="cpu")
    assert fast.dtype == jnp.float32 and fast.committed
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(jnp.asarray(x, dtype=jnp.float32)))
