"""The base layer: what every other layer may use.

Errors and the solver status enum (:mod:`.errors`), keyword and option checking
(:mod:`.options`), trees of arrays (:mod:`.tree`), the :class:`Backend` protocol
(:mod:`.backend`), the registry that finds backends by name or from arrays
(:mod:`.registry`), the fused elementwise functions backends may register for the core
(:mod:`.native`), the reference backend for numpy / array-api-strict
(:mod:`.reference`) and integer random keys for backends without a functional RNG
(:mod:`.keys`). It imports nothing from the other layers.
"""
from .backend import LOOP_KINDS, Backend, Conv2dGeometry, check_loop_kind, conv2d_geometry
from .errors import (BackendUnavailable, CapabilityError, MaxStepsReached, NonFiniteState, OtflowError, SolverError,
                     Status, StepSizeUnderflow)
from .keys import make_key, split_key
from .native import NATIVE_FUNCTIONS, native, register_native
from .options import nearest, reject_unknown_keywords, unknown_option_message
from .reference import ReferenceBackend
from .registry import available_backends, default_backend, get_backend, infer_backend, register_backend
from .tree import TreeDef, tree_flatten, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "Backend", "LOOP_KINDS", "check_loop_kind", "Conv2dGeometry", "conv2d_geometry", "ReferenceBackend",
    "available_backends", "default_backend", "get_backend", "infer_backend", "register_backend",
    "make_key", "split_key", "NATIVE_FUNCTIONS", "native", "register_native",
    "BackendUnavailable", "CapabilityError", "MaxStepsReached", "NonFiniteState", "OtflowError", "SolverError",
    "Status", "StepSizeUnderflow",
    "nearest", "reject_unknown_keywords", "unknown_option_message",
    "TreeDef", "tree_flatten", "tree_leaves", "tree_map", "tree_unflatten",
]
