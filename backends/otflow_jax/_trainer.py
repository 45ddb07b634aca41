"""The JAX training step: one jitted function of (params, optimizer state, batch, key, lr).

optax supplies the optimizer (``scale_by_adam``, decayed weights, global-norm
clipping); the learning rate enters as a traced value, so the step compiles
once for the whole run (``compilations`` counts them). A non-finite loss or
gradient, or a failed solve, selects the old parameters and optimizer state
inside the compiled step. Buffers of the parameters and optimizer state are
donated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from otflow.training import OptimizerSpec

__all__ = ["JaxTrainer"]


def _global_norm(tree):
    return optax.tree.norm(tree) if hasattr(optax, "tree") and hasattr(optax.tree, "norm") else optax.global_norm(tree)


def _transform(spec: OptimizerSpec) -> optax.GradientTransformation:
    parts = []
    if spec.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(spec.clip_norm))
    if spec.name == "adam" and spec.weight_decay:
        parts.append(optax.add_decayed_weights(spec.weight_decay))  # L2 on the gradient, as torch's Adam
    parts.append(optax.scale_by_adam(b1=spec.betas[0], b2=spec.betas[1], eps=spec.eps))
    if spec.name == "adamw" and spec.weight_decay:
        parts.append(optax.add_decayed_weights(spec.weight_decay))  # decoupled
    return optax.chain(*parts)


class JaxTrainer:
    """``step(x, key, lr) -> metrics`` around one compiled, buffer-donating update."""

    def __init__(self, backend, loss_fn, params, spec: OptimizerSpec):
        self.backend = backend
        self.spec = spec
        self.params = jax.tree_util.tree_map(jnp.asarray, params)
        self._tx = _transform(spec)
        self.opt_state = self._tx.init(self.params)
        self.compilations = 0
        tx = self._tx

        def step(params, opt_state, x, key, lr):
            self.compilations += 1  # runs at trace time only
            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, key)
            grad_norm = _global_norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (aux["status"] == 0)
            updates, new_state = tx.update(grads, opt_state, params)
            new_params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
            keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
            params = jax.tree_util.tree_map(keep, new_params, params)
            opt_state = jax.tree_util.tree_map(keep, new_state, opt_state)
            return params, opt_state, {"loss": loss, "grad_norm": grad_norm, "applied": ok, **aux}

        self._step = jax.jit(step, donate_argnums=(0, 1))

    def step(self, x, key, lr: float) -> dict:
        lr = jnp.asarray(lr, dtype=jax.tree_util.tree_leaves(self.params)[0].dtype)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, x, key, lr)
        metrics = dict(metrics)
        metrics["applied"] = bool(metrics["applied"])
        return metrics

    # ---- state for checkpoints -----------------------------------------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        leaves = jax.tree_util.tree_leaves(self.opt_state)
        return {f"{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(self.opt_state)
        if len(arrays) != len(leaves):
            raise ValueError(f"checkpoint has {len(arrays)} optimizer arrays, this optimizer {len(leaves)}")
        new = [jnp.asarray(arrays[f"{i}"], dtype=leaf.dtype) for i, leaf in enumerate(leaves)]
        self.opt_state = jax.tree_util.tree_unflatten(treedef, new)

    def set_params(self, params) -> None:
        leaves, treedef = jax.tree_util.tree_flatten(self.params)
        new = [jnp.asarray(np.asarray(v), dtype=leaf.dtype) for v, leaf in zip(jax.tree_util.tree_leaves(params), leaves)]
        self.params = jax.tree_util.tree_unflatten(treedef, new)
