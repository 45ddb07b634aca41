"""Shared by the validation studies."""
from __future__ import annotations

from typing import Sequence

import otflow


def get_float64_backend(name: str, choices: Sequence[str]):
    """``otflow.get_backend(name)`` for a study that computes in float64 (JAX's x64 mode is
    switched on first; the studies run as their own processes)."""
    if name not in choices:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(choices)}")
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    return otflow.get_backend(name)
