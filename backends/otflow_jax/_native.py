"""JAX's elementwise functions for the core's fields (:mod:`otflow.base.native`):
``jax.nn.sigmoid`` (``lax.logistic``) and ``jax.nn.silu``, whose values and gradients
stay finite for any input. XLA fuses the written-out forms too, so this is for the
numerics and for one definition shared with the other backends, not for speed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from array_api_compat import array_namespace

from otflow.base import register_native

#: the array namespace JAX arrays belong to
NAMESPACE = array_namespace(jnp.zeros(())).__name__

register_native(NAMESPACE, "sigmoid", jax.nn.sigmoid)
register_native(NAMESPACE, "silu", jax.nn.silu)
