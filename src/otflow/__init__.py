"""otflow: RNODE-regularized continuous normalizing flows on PyTorch and JAX.

The core (this package) is written against the Python array API and never
imports a framework; backends (``otflow_torch``, ``otflow_jax``, and the
built-in reference backend for numpy / array-api-strict) supply autodiff,
compilation, loops, random keys and devices.
"""
from ._errors import (
    BackendUnavailable,
    CapabilityError,
    MaxStepsReached,
    NonFiniteState,
    OtflowError,
    SolverError,
    Status,
    StepSizeUnderflow,
)
from .backend import Backend, available_backends, get_backend, infer_backend

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendUnavailable",
    "CapabilityError",
    "MaxStepsReached",
    "NonFiniteState",
    "OtflowError",
    "SolverError",
    "Status",
    "StepSizeUnderflow",
    "available_backends",
    "get_backend",
    "infer_backend",
]
