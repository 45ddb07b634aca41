"""otflow: RNODE-regularized continuous normalizing flows on PyTorch and JAX.

The core (this package) is written against the Python array API and never
imports a framework; backends (``otflow_torch``, ``otflow_jax``, and the
built-in reference backend for numpy / array-api-strict) supply autodiff,
compilation, loops, random keys and devices.
"""
from . import datasets
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
from ._adjoint import AdjointStats, adjoint_counter, adjoint_stats
from ._divergence import (DivergenceEstimate, estimate_divergence, exact_divergence, hutchinson_divergence,
                          hutchplusplus_divergence, probe_vjp)
from ._fields import MLP, FunctionField, VelocityField
from ._flow import Flow, SolverOptions, load
from ._optim import OptimizerSpec
from ._train import FitOptions, TrainingFailed, fit
from ._gradcheck import GradientCheck, check_gradients
from ._integrate import Solution, Stats, odeint
from ._objective import RNODELoss, bits_per_dim, dequantize, logit_transform, rnode_loss
from ._step_size import ErrorNorm, PIController
from .backend import Backend, available_backends, get_backend, infer_backend
from .solvers import RK4, ButcherTableau, Dopri5, Euler, Midpoint

__version__ = "0.1.0"

__all__ = [
    "AdjointStats",
    "adjoint_counter",
    "adjoint_stats",
    "GradientCheck",
    "check_gradients",
    "DivergenceEstimate",
    "estimate_divergence",
    "exact_divergence",
    "hutchinson_divergence",
    "hutchplusplus_divergence",
    "probe_vjp",
    "datasets",
    "fit",
    "load",
    "FitOptions",
    "OptimizerSpec",
    "TrainingFailed",
    "RNODELoss",
    "rnode_loss",
    "bits_per_dim",
    "dequantize",
    "logit_transform",
    "Flow",
    "SolverOptions",
    "MLP",
    "FunctionField",
    "VelocityField",
    "odeint",
    "Solution",
    "Stats",
    "ErrorNorm",
    "PIController",
    "ButcherTableau",
    "Dopri5",
    "Euler",
    "Midpoint",
    "RK4",
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
