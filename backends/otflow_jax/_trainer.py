"""The JAX training step: one jitted function of (params, optimizer state, batch, key, lr).

Registered in the ``otflow.trainers`` entry-point group; made by
:func:`otflow.training.make_trainer`. optax supplies the optimizer (``scale_by_adam``, decayed weights, global-norm
clipping); the learning rate enters as a traced value, so the step compiles
once for the whole run (``compilations`` counts them). A non-finite loss or
gradient, or a failed solve, selects the old parameters and optimizer state
inside the compiled step. Buffers of the parameters and optimizer state are
donated. With ``fit(..., devices=...)`` the parameters and optimizer state are
replicated over a mesh and the batch arrives sharded (:mod:`otflow_jax._distributed`):
the same jitted step, partitioned by XLA, which inserts the gradient all-reduce.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from otflow.training import OptimizerSpec

from ._distributed import mesh_replicas

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
    """An :class:`otflow.training.Trainer` on JAX: ``step(x, key, lr) -> metrics`` around
    one compiled, buffer-donating update.

    :param backend: the JAX backend.
    :param loss_fn: ``loss_fn(params, x, key) -> (loss, aux)``, traced once.
    :param params: the initial parameter tree.
    :param optimizer: the optimizer settings (an optax chain: clipping, decay, Adam).
    :param data_parallel: the run's :class:`~otflow_jax._distributed.MeshReplicas`
        (parameters and optimizer state replicated over its mesh, outputs too), or None.
    :ivar compilations: how many times the step was traced (1 for a whole run, resumed or not).
    """

    #: builds the mesh of ``devices=`` (see :func:`otflow.training.distributed.resolve_replicas`)
    data_parallel = staticmethod(mesh_replicas)

    def __init__(self, backend, loss_fn, params, optimizer: OptimizerSpec, *, data_parallel=None):
        self.backend = backend
        self.spec = optimizer
        self.replicas = data_parallel if getattr(data_parallel, "replicate", None) is not None else None
        params = jax.tree_util.tree_map(jnp.asarray, params)
        self._sharding = jax.tree_util.tree_leaves(params)[0].sharding  # where the parameters live
        self.params = self._place(params)
        self._tx = _transform(optimizer)
        self.opt_state = self._place(self._tx.init(self.params))
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

        out = {} if self.replicas is None else {"out_shardings": self.replicas.replicated}
        self._step = jax.jit(step, donate_argnums=(0, 1), **out)

    def _place(self, tree):
        """``tree`` replicated over the mesh (data-parallel), else committed to the parameters'
        device: the step's outputs are committed arrays, and an uncommitted input (optax's
        fresh step count, a parameter made without a device) would make the second call
        compile the whole step again for the other argument placement."""
        if self.replicas is not None:
            return self.replicas.replicate(tree)
        return jax.device_put(tree, self._sharding)

    def step(self, x, key, lr: float) -> dict:
        """One step (see :meth:`otflow.training.Trainer.step`)."""
        # a numpy scalar: jit moves it with the call (jnp.asarray would be an eager dispatch of
        # its own, ~0.25 ms a step on CPU, as much as a 2-D flow-matching step's compute)
        lr = np.asarray(lr, dtype=jax.tree_util.tree_leaves(self.params)[0].dtype)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, x, key, lr)
        metrics = dict(metrics)
        metrics["applied"] = bool(metrics["applied"])
        return metrics

    # ---- state for checkpoints -----------------------------------------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optax state's leaves (Adam's step count, moments) as numpy arrays named by position."""
        leaves = jax.tree_util.tree_leaves(self.opt_state)
        return {f"{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)}

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Install a state from :meth:`optimizer_state`, each leaf in the dtype and shape of
        this optimizer's own (a file may hold Adam's 0-d step count as shape (1,); a leaf of
        another shape would be a different program to compile, with other rounding).

        :raises ValueError: another number of arrays, or an array whose size does not fit its leaf.
        """
        leaves, treedef = jax.tree_util.tree_flatten(self.opt_state)
        if len(arrays) != len(leaves):
            raise ValueError(f"checkpoint has {len(arrays)} optimizer arrays, this optimizer {len(leaves)}")
        new = [_restored(f"{i}", arrays[f"{i}"], leaf) for i, leaf in enumerate(leaves)]
        self.opt_state = self._place(jax.tree_util.tree_unflatten(treedef, new))

    def set_params(self, params) -> None:
        """Install parameter values (numpy or jax arrays), in the dtypes and shapes of the current ones."""
        leaves, treedef = jax.tree_util.tree_flatten(self.params)
        new = [_restored(f"parameter {i}", v, leaf)
               for i, (v, leaf) in enumerate(zip(jax.tree_util.tree_leaves(params), leaves))]
        self.params = self._place(jax.tree_util.tree_unflatten(treedef, new))


def _restored(name: str, value, like) -> jax.Array:
    value = np.asarray(value)
    if value.size != like.size:
        raise ValueError(f"array {name} has shape {value.shape}, expected {like.shape}")
    return jnp.asarray(value.reshape(like.shape), dtype=like.dtype)
