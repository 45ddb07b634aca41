"""The backend interface, the registry and the reference (array-API, no autodiff) backend."""
from ._base import LOOP_KINDS, Backend
from ._registry import available_backends, default_backend, get_backend, infer_backend, register_backend
from .reference import ReferenceBackend

__all__ = ["Backend", "LOOP_KINDS", "ReferenceBackend", "available_backends", "default_backend", "get_backend", "infer_backend",
           "register_backend"]
