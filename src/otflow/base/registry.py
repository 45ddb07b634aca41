"""Backend registry: names from the ``otflow.backends`` entry-point group plus the
built-in reference backends; lazy loading; inference from input arrays.

Frameworks are never imported to *infer* a backend: an array can only be a
torch tensor if ``torch`` is already in ``sys.modules`` (the einops rule).
"""
from __future__ import annotations

import sys
from importlib import metadata

from .errors import BackendUnavailable
from .options import unknown_option_message
from .backend import Backend
from .reference import ReferenceBackend

__all__ = ["get_backend", "infer_backend", "available_backends", "register_backend", "default_backend"]

_ENTRY_GROUP = "otflow.backends"
#: framework module that must be imported for an array to belong to the backend
_FRAMEWORK_MODULE = {"torch": "torch", "jax": "jax", "numpy": "numpy", "array_api_strict": "array_api_strict"}
#: pip extra per backend, for messages when the entry point is missing
_EXTRAS = {"torch": "torch", "jax": "jax"}

_instances: dict[str, Backend] = {}
_factories: dict[str, object] = {}


def _entry_points() -> dict:
    eps = metadata.entry_points()
    found = eps.select(group=_ENTRY_GROUP) if hasattr(eps, "select") else eps.get(_ENTRY_GROUP, [])
    return {ep.name: ep for ep in found}


def register_backend(name: str, factory, *, framework_module: str | None = None) -> None:
    """Register a backend factory (a class or zero-argument callable) under ``name``."""
    _factories[name] = factory
    _instances.pop(name, None)
    if framework_module:
        _FRAMEWORK_MODULE[name] = framework_module


def available_backends() -> list[str]:
    """Names that can be asked for (their frameworks may still be missing)."""
    return sorted({"numpy", "array_api_strict", *_entry_points(), *_factories})


def get_backend(name: str | Backend | None = None, *, like=None) -> Backend:
    """The backend called ``name``, or the one owning the arrays in ``like`` when None."""
    if isinstance(name, Backend):
        return name
    if name is None:
        if like is None:
            raise ValueError("get_backend(None) needs `like=` arrays to infer the backend from")
        return infer_backend(like)
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    if name in _instances:
        return _instances[name]
    if name in ("numpy", "array_api_strict"):
        backend = ReferenceBackend(name)
    elif name in _factories:
        backend = _factories[name]()
    else:
        eps = _entry_points()
        if name not in eps:
            if name in _EXTRAS:
                raise BackendUnavailable(
                    f"backend {name!r} is not installed: pip install 'otflow[{_EXTRAS[name]}]'"
                )
            raise ValueError(unknown_option_message("backend", name, available_backends()))
        try:
            factory = eps[name].load()
        except ImportError as e:
            extra = _EXTRAS.get(name, name)
            raise BackendUnavailable(
                f"backend {name!r} needs its framework, which failed to import ({e}). "
                f"Install it with: pip install 'otflow[{extra}]'"
            ) from e
        backend = factory()
    _instances[name] = backend
    return backend


def _candidate_names() -> list[str]:
    # framework backends first: numpy arrays only fall back to the reference backend
    names = [n for n in ("torch", "jax") if n in available_backends()]
    names += [n for n in available_backends() if n not in names and n not in ("numpy", "array_api_strict")]
    return names + ["array_api_strict", "numpy"]


def infer_backend(tree) -> Backend:
    """The backend owning the first array leaf found in ``tree`` (numpy → reference)."""
    from .tree import tree_leaves

    leaves = [x for x in tree_leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
    if not leaves:
        raise TypeError("cannot infer a backend: no arrays among the inputs; pass backend=")
    x = leaves[0]
    for name in _candidate_names():
        module = _FRAMEWORK_MODULE.get(name, name)
        if module not in sys.modules:
            continue
        try:
            backend = get_backend(name)
        except (BackendUnavailable, ValueError):
            continue
        if backend.owns(x):
            return backend
    raise TypeError(f"cannot infer a backend from an array of type {type(x).__module__}.{type(x).__name__}; pass backend=")


def default_backend() -> str:
    """The backend for numpy inputs, paths and dataset names: torch if it imports, else jax."""
    for name in ("torch", "jax"):
        try:
            get_backend(name)
            return name
        except (BackendUnavailable, ValueError):
            continue
    raise BackendUnavailable("otflow needs torch or jax to train: pip install 'otflow[torch]' or 'otflow[jax]'")
