"""Equinox modules as otflow velocity fields (the ``otflow.native_fields`` entry point
``jax``; see :func:`otflow.cnf.native_field`)."""
from __future__ import annotations

import sys

from otflow.cnf import FunctionField, module_event_shape

__all__ = ["as_field"]


def as_field(obj, params=None, *, event_shape=None):
    """A :class:`~otflow.FunctionField` from an Equinox module called as ``model(t, x)``;
    ``None`` for anything else (plain functions are wrapped by the core).

    The module is split with ``eqx.partition(model, eqx.is_array)``: the array part is
    the parameter tree (an Equinox module with ``None`` in the static places, a JAX
    pytree that optimizers and ``jax.grad`` handle), the rest is closed over, and
    ``apply(params, t, x)`` calls ``eqx.combine(params, static)(t, x)``.

    The model is called with the whole batch: ``t`` is a 0-d array and ``x`` has shape
    ``(batch, *event_shape)``; no ``vmap`` is added, so a model written for one sample
    must map itself over the batch (e.g. ``jax.vmap(self.mlp)`` inside ``__call__``).
    Row ``i`` of the output must depend only on row ``i`` of ``x``. Equinox is imported
    only by the user: a module can only exist once it is.

    :param obj: the module (anything else gives None).
    :param params: must be None (the module carries its own parameters).
    :param event_shape: e.g. ``(2,)``; required unless the module has an ``event_shape`` attribute.
    :returns: the field, or None.
    :raises ValueError: for ``params`` given, or a missing or bad event shape.
    """
    eqx = sys.modules.get("equinox")
    if eqx is None or not isinstance(obj, eqx.Module):
        return None
    name = type(obj).__name__
    if params is not None:
        raise ValueError(
            f"got params= together with the Equinox module {name}: a module carries its own "
            "parameters, so which to use would be ambiguous. Drop params=, or put the values into the "
            "module first (eqx.tree_at / eqx.combine).")
    shape = module_event_shape(obj, event_shape, name,
                               "Flow.from_velocity(model, event_shape=(2,), backend='jax')")
    arrays, static = eqx.partition(obj, eqx.is_array)

    def apply_fn(p, t, x):
        return eqx.combine(p, static)(t, x)

    return FunctionField(apply_fn, arrays, shape, name=name)
