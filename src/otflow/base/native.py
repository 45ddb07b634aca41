"""Fused elementwise functions a backend may supply for the array namespace it runs on.

The array API standard has no sigmoid or SiLU, so the core writes them from ``exp``:
``1 / (1 + exp(-x))`` and ``x · sigmoid(x)``. A compiling framework (XLA) fuses those into
one kernel; an eager one (PyTorch) runs each operation, and its backward, as a kernel of
its own: on a 2048 × 128 activation on one CPU core that is about 8 ms per layer for the
forward and backward of SiLU written out, against 1.1 ms for ``torch.nn.functional.silu``,
most of a 2-D flow-matching iteration. A backend registers its framework's fused
functions here (:func:`register_native`, at import), keyed by the name of the array
namespace (``array_api_compat.array_namespace(x).__name__``); the core's fields ask for
them with :func:`native` and use the written-out form when none is registered (numpy,
array-api-strict). JAX registers ``jax.nn``'s functions too, for one definition across
backends (XLA fuses the written-out forms anyway). The written-out sigmoid is the
overflow-free ``where(x ≥ 0, 1/(1 + e), e/(1 + e))`` with ``e = exp(−|x|)``, whose
gradient stays finite for any input.

A registered function must compute the same mathematical function as the written-out form
(to rounding): the fields' results do not depend on which one runs beyond the last few
ulps.
"""
from __future__ import annotations

from typing import Callable

__all__ = ["NATIVE_FUNCTIONS", "register_native", "native"]

#: the functions a backend may supply: ``sigmoid(x) = 1 / (1 + exp(-x))`` and
#: ``silu(x) = x · sigmoid(x)`` (swish with β = 1)
NATIVE_FUNCTIONS = ("sigmoid", "silu")

_registered: dict[tuple[str, str], Callable] = {}


def register_native(namespace: str, name: str, fn: Callable | None) -> None:
    """Register a fused elementwise function for arrays of one namespace.

    :param namespace: the array namespace's module name, e.g. ``"array_api_compat.torch"``.
    :param name: one of :data:`NATIVE_FUNCTIONS`.
    :param fn: ``fn(x) -> array``; None removes the registration.
    :raises ValueError: an unknown function name.
    :raises TypeError: ``fn`` neither callable nor None.
    """
    if name not in NATIVE_FUNCTIONS:
        raise ValueError(f"register_native: unknown function {name!r}; known: {', '.join(NATIVE_FUNCTIONS)}")
    if fn is None:
        _registered.pop((namespace, name), None)
        return
    if not callable(fn):
        raise TypeError(f"register_native: fn must be callable or None, got {type(fn).__name__}")
    _registered[(namespace, name)] = fn


def native(xp, name: str) -> Callable | None:
    """The fused function ``name`` registered for the namespace ``xp``, or None.

    :param xp: an array namespace.
    :param name: one of :data:`NATIVE_FUNCTIONS`.
    """
    return _registered.get((getattr(xp, "__name__", ""), name))
