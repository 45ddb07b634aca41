"""Reverse-mode memory of the integration loop, read from XLA's compiled buffer analysis.

``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes`` is the scratch
memory XLA assigns to one gradient evaluation; it is deterministic (no timing, no load
dependence). The adjoint method's backward solve must not keep per-step buffers (Chen et
al., NeurIPS 2018: memory independent of the number of steps); the checkpointed fixed-step
loop must store far less than direct backpropagation through every stage.

Before the fix, the adjoint's backward solve ran in an unrolled loop whose buffers XLA kept
alive: on a 64-wide MLP its temporaries grew from 0.45 MB at 4 RK4 steps to 1.6 MB at 16,
and on the multiscale image model at batch 200 it asked for more than direct mode did.
Before, ``loop_kind="checkpointed"`` was ignored by fixed-step solves.
"""
from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import otflow  # noqa: E402
from otflow.cnf import ConvField, rnode_rhs  # noqa: E402

TIMES = (0.0, 1.0)


def _mlp_problem(batch=32, dim=8, width=32):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    f32 = jnp.float32
    params = {"w1": jax.random.normal(k[0], (dim, width), f32) / 3, "b1": jnp.zeros(width, f32),
              "w2": jax.random.normal(k[1], (width, width), f32) / 6,
              "w3": jax.random.normal(k[2], (width, dim), f32) / 6}

    def field(t, y, p):
        h = jnp.tanh(y @ p["w1"] + p["b1"])
        h = jnp.tanh(h @ p["w2"])
        return h @ p["w3"]

    return field, params, jax.random.normal(k[3], (batch, dim), f32)


def _mlp_gradient(n_steps, gradient="direct", **kwargs):
    field, params, y0 = _mlp_problem()

    def loss(p, y0):
        sol = otflow.odeint(field, y0, jnp.asarray(TIMES, dtype=jnp.float32), args=p, method="rk4", n_steps=n_steps,
                            gradient=gradient, check_inputs=False, throw=False, **kwargs)
        return jnp.sum(sol.ys[-1] ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, y0)


def _temp_bytes(fn, args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def test_adjoint_memory_is_flat_in_the_steps_and_direct_grows():
    adjoint = [_temp_bytes(*_mlp_gradient(n, "adjoint")) for n in (2, 8)]
    direct = [_temp_bytes(*_mlp_gradient(n, "direct")) for n in (2, 8)]
    # 2 and 8 steps are unrolled loops on JAX: still no per-step buffers
    assert max(adjoint) <= 1.1 * min(adjoint), adjoint
    # direct backpropagation keeps every stage: 4× the steps, well over 2.5× the memory
    assert direct[1] > 2.5 * direct[0], direct
    assert adjoint[1] < direct[1] / 3, (adjoint, direct)


def test_checkpointed_fixed_step_loop_stores_less_and_gives_the_same_gradient():
    plain_fn, args = _mlp_gradient(64, "direct")
    ckpt_fn, _ = _mlp_gradient(64, "direct", loop_kind="checkpointed")
    plain, ckpt = _temp_bytes(plain_fn, args), _temp_bytes(ckpt_fn, args)
    # the plain rolled loop stores every stage's residuals; the checkpointed one the states
    assert ckpt < plain / 4, (ckpt, plain)
    g_plain, g_ckpt = _flat(plain_fn(*args)), _flat(ckpt_fn(*args))
    # the same operations recomputed: equal up to float32 rounding
    np.testing.assert_allclose(g_ckpt, g_plain, rtol=1e-5, atol=1e-5 * np.max(np.abs(g_plain)))


def test_checkpointed_fixed_step_loop_over_several_output_intervals():
    field, params, y0 = _mlp_problem(batch=4, dim=3, width=8)
    ts = jnp.asarray([0.0, 0.3, 1.0], dtype=jnp.float32)

    def loss(p, y0, kind):
        sol = otflow.odeint(field, y0, ts, args=p, method="rk4", n_steps=3, loop_kind=kind, check_inputs=False)
        return jnp.sum(sol.ys[1] ** 3) + jnp.sum(sol.ys[2] ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    plain, ckpt = grad(params, y0, "forward"), grad(params, y0, "checkpointed")
    np.testing.assert_allclose(_flat(ckpt), _flat(plain), rtol=1e-5, atol=1e-6)


def _conv_rnode_gradient(n_steps, gradient):
    """The RNODE objective's gradient through one ConvField block on 2×8×8 states."""
    backend = otflow.get_backend("jax")
    field = ConvField((2, 8, 8), widths=(4, 4), zero_last=False)
    params = field.init(backend, backend.key(0), dtype=jnp.float32)
    rhs = rnode_rhs(field, backend=backend)
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (3, 2, 8, 8), dtype=jnp.float32)
    eps = jax.random.normal(k2, (3, 2, 8, 8), dtype=jnp.float32)

    def loss(p, x):
        zero = jnp.zeros((x.shape[0],), dtype=jnp.float32)
        sol = otflow.odeint(rhs, (x, zero, zero, zero), jnp.asarray(TIMES, dtype=jnp.float32), args=(p, eps),
                            method="rk4", n_steps=n_steps, gradient=gradient, check_inputs=False, throw=False)
        z, dlogp, kin, jac = (leaf[-1] for leaf in sol.ys)
        return jnp.mean(jnp.sum(z ** 2, axis=(1, 2, 3)) - dlogp + 0.01 * kin + 0.01 * jac)

    return jax.jit(jax.grad(loss, argnums=(0, 1))), (params, x)


def test_adjoint_memory_on_a_convolutional_rnode_block_is_flat_in_the_steps():
    # (a one-step solve has no loop at all, so both counts have several steps)
    adjoint = [_temp_bytes(*_conv_rnode_gradient(n, "adjoint")) for n in (2, 6)]
    direct = [_temp_bytes(*_conv_rnode_gradient(n, "direct")) for n in (2, 6)]
    assert adjoint[1] <= 1.1 * adjoint[0], adjoint
    assert direct[1] > 2.5 * direct[0], direct
    assert adjoint[1] < direct[1] / 3, (adjoint, direct)
