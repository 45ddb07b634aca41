"""otflow's JAX backend (``backend="jax"``).

Where it differs from the eager backends:

* Loops compile. ``while_loop`` has three kinds: ``"forward"`` is
  ``lax.while_loop`` (no reverse mode); ``"bounded"`` runs up to ``max_steps``
  iterations as nested ``lax.scan``\\ s (memory ~ ``max_steps`` × state, forward
  and reverse mode); ``"checkpointed"`` is online checkpointing around a
  ``lax.while_loop`` that runs only the iterations needed (reverse mode, memory
  ~ 2·√``max_steps`` × state; see ``_loops``).
  Python control flow on array values is not allowed (``eager = False``).
* Random keys are typed keys from ``jax.random.key``; ``split`` returns a list.
* float64 needs ``jax.config.update("jax_enable_x64", True)`` (or
  ``JAX_ENABLE_X64=1``) at program start; without it float64 inputs and dtypes
  are refused instead of silently becoming float32. The backend never sets the flag.
"""
try:
    import jax  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from otflow.base import BackendUnavailable

    raise BackendUnavailable(
        f"otflow's JAX backend needs jax, which failed to import ({e}). Install it with: pip install 'otflow[jax]'",
        name="jax",
    ) from e

from . import _native  # noqa: F401 - registers jax.nn's sigmoid and SiLU with the core
from ._backend import JaxBackend

__all__ = ["JaxBackend"]
