"""The JAX ``"checkpointed"`` loop kind: online checkpointing around ``lax.while_loop``.

Direct-mode adaptive solves on JAX differentiate through this loop (``odeint``'s default
``loop_kind`` with ``gradient="direct"``, and the training losses). It replaced nested
scans of ``max_steps`` iterations that cost 3 forward passes + 1 backward pass whatever
the number of steps run (issue #14); it must give the same gradients as the ``"bounded"``
kind (those nested scans, with every state stored), run the body 2× per iteration while
every state fits in its slots and at most 3× beyond, and never run the iterations that
the loop skips.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import otflow  # noqa: E402
from otflow_jax._loops import checkpoint_layout  # noqa: E402

B = otflow.get_backend("jax")


# ---- the layout -----------------------------------------------------------------------------
def test_checkpoint_layout_on_both_sides_of_the_base():
    # up to 64 iterations every state is stored: no recomputation
    assert checkpoint_layout(1) == (1, 1) and checkpoint_layout(64) == (64, 1)
    # one step more: 64 slots, the stride may double once
    assert checkpoint_layout(65) == (64, 2)
    assert checkpoint_layout(1000) == (64, 16) and checkpoint_layout(4096) == (64, 64)
    # past 64²: more slots, so memory stays ~ 2·sqrt(max_steps) states
    assert checkpoint_layout(4097) == (128, 64)
    for n in [2, 63, 65, 100, 1000, 4095, 4096, 4097, 10_000, 100_000]:
        slots, stride = checkpoint_layout(n)
        assert slots * stride >= n  # every iteration has a checkpoint at the largest stride
        assert stride == 1 or (slots * stride // 2 < n and slots % 2 == 0)  # the smallest stride that covers n
        assert slots + stride <= 64 + 4 * int(np.ceil(np.sqrt(n)))  # memory ~ 2·sqrt(n) states beyond 64


# ---- gradients against a scan of the same steps -------------------------------
def _body(theta):
    def body(state):
        t, x, k = state
        h = 0.01 / (1.0 + 0.1 * jnp.sum(x ** 2))
        return t + h, x + h * jnp.tanh(theta[0] * x + theta[1]), k + 1

    return body


def _loop_loss(kind, t_end, max_steps):
    def loss(theta, x0):
        t, x, k = B.while_loop(lambda s: s[0] < t_end, _body(theta), (0.0, x0, 0), max_steps=max_steps, kind=kind)
        return jnp.sum(x ** 2) + t, k

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _fixed_count_loss(theta, x0, n):
    """The same loss with the trip count known: a scan, differentiated by JAX itself."""
    s = jax.lax.fori_loop(0, n, lambda i, s: _body(theta)(s), (jnp.asarray(0.0), x0, 0))
    return jnp.sum(s[1] ** 2) + s[0]


@pytest.mark.parametrize("t_end,max_steps,want_n", [
    (0.26, 64, 32),      # all states stored (stride 1)
    (0.72, 100, 96),     # thinned once: stride 2, segments recomputed from their checkpoint
    (3.0, 300, 300),     # stride 8 of (64, 8), the bound reached mid-segment
], ids=["stored", "thinned", "bound-reached"])
def test_checkpointed_gradient_matches_a_fixed_count_scan(t_end, max_steps, want_n):
    theta, x0 = jnp.asarray([1.3, -0.2]), jnp.asarray([0.5, -1.0, 0.7])
    (val, n), grads = _loop_loss("checkpointed", t_end, max_steps)(theta, x0)
    assert int(n) == want_n
    want_val, want_grads = jax.jit(jax.value_and_grad(_fixed_count_loss, argnums=(0, 1)), static_argnums=2)(
        theta, x0, want_n)
    np.testing.assert_allclose(val, want_val, rtol=1e-13, atol=0)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_body_runs_twice_per_iteration_when_stored_and_at_most_three_times_beyond():
    calls = []

    def counted(theta):
        inner = _body(theta)

        def body(state):
            jax.debug.callback(lambda: calls.append(1))
            return inner(state)

        return body

    def grad_calls(t_end, max_steps):
        def loss(theta):
            s = B.while_loop(lambda s: s[0] < t_end, counted(theta), (0.0, jnp.ones(3), 0), max_steps=max_steps,
                             kind="checkpointed")
            return jnp.sum(s[1]), s[2]

        f = jax.jit(jax.grad(loss, has_aux=True))
        jax.block_until_ready(f(jnp.asarray([1.0, 0.1])))
        jax.effects_barrier()
        calls.clear()
        _, n = f(jnp.asarray([1.0, 0.1]))
        jax.effects_barrier()
        return len(calls), int(n)

    # 42 iterations of a 4096 bound: forward + the vjp's forward, nothing for the 4054 never run
    count, n = grad_calls(0.3, 4096)
    assert n == 42 and count == 2 * n
    # 115 iterations of a 300 bound, (64, 8): the stride doubled once, and each segment of 2
    # states is recomputed from its checkpoint (one evaluation) before its vjps
    count, n = grad_calls(0.75, 300)
    segments = -(-n // 2)
    assert n == 115 and count == 2 * n + (n - segments)


# ---- through odeint ---------------------------------------------------------------------------
def _mlp_solve_grad(loop_kind, **kw):
    """Value and gradient (parameters, initial state, end time) of a small MLP field's dopri5 solve."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k[0], (2, 16)), "b1": jnp.zeros(16), "w2": jax.random.normal(k[1], (16, 2)) / 4}
    y0 = jax.random.normal(k[2], (3, 2))

    def field(t, y, p):
        return jnp.tanh(y @ p["w1"] + p["b1"] + t) @ p["w2"]

    def loss(p, y0, t1):
        sol = otflow.odeint(field, y0, jnp.stack([jnp.asarray(0.0), t1]), args=p, method="dopri5",
                            loop_kind=loop_kind, check_inputs=False, throw=False, **kw)
        return jnp.sum(sol.ys[-1] ** 2), sol.stats.n_steps

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, y0, jnp.asarray(1.0))


@pytest.mark.parametrize("tol,max_steps", [(1e-6, 4096), (1e-12, 100)], ids=["rnode-like", "thinned"])
def test_direct_dopri5_gradient_default_kind_equals_bounded(tol, max_steps):
    """The default kind of a direct-mode adaptive JAX solve (``"checkpointed"``) gives the
    gradient of the nested-scan ``"bounded"`` kind to 1e-10 in float64 (bounded at 100
    steps, which neither solve reaches: the same steps, a cheaper compilation)."""
    (val, n), grads = _mlp_solve_grad(None, rtol=tol, atol=tol, max_steps=max_steps)
    (b_val, b_n), b_grads = _mlp_solve_grad("bounded", rtol=tol, atol=tol, max_steps=100)
    assert int(n) == int(b_n) < 100 and float(val) == float(b_val)
    if max_steps == 100:
        assert int(n) > 64  # the thinning path ran: 64 slots, stride 2
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(b_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_per_example_gradients_under_vmap():
    """vmap of the gradient: each example takes its own number of steps (115 for t_end = 0.75;
    the last one runs into the bound), so the loops run under a batched predicate."""
    def loss(theta, t_end, kind):
        t, x, _ = B.while_loop(lambda s: s[0] < t_end, _body(theta), (0.0, jnp.ones(3), 0), max_steps=200, kind=kind)
        return jnp.sum(x ** 2) + t

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, None)), static_argnums=2)
    theta, t_end = jnp.asarray([1.0, 0.1]), jnp.asarray([0.2, 0.75, 1.5])
    np.testing.assert_allclose(per_example(theta, t_end, "checkpointed"), per_example(theta, t_end, "bounded"),
                               rtol=1e-12, atol=1e-14)


def test_checkpointed_is_reverse_mode_only_and_bounded_has_forward_mode():
    def solve(x, kind):
        return B.while_loop(lambda s: s[0] < 1.0, lambda s: (s[0] + 0.25, s[1] * x), (0.0, x), max_steps=8,
                            kind=kind)[1]

    _, tangent = jax.jvp(lambda x: solve(x, "bounded"), (jnp.asarray(1.5),), (jnp.asarray(1.0),))
    assert float(tangent) == pytest.approx(5 * 1.5 ** 4)  # d/dx x^5
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: solve(x, "checkpointed"), (jnp.asarray(1.5),), (jnp.asarray(1.0),))
