"""otflow: RNODE-regularized continuous normalizing flows on PyTorch and JAX.

The core (this package) is written against the Python array API and never
imports a framework; backends (``otflow_torch``, ``otflow_jax``, and the
built-in reference backend for numpy / array-api-strict) supply autodiff,
compilation, loops, random keys and devices.
"""
import sys as _sys

from . import base, cnf, ode, training
from .base import (Backend, BackendUnavailable, CapabilityError, MaxStepsReached, NonFiniteState, OtflowError,
                   SolverError, Status, StepSizeUnderflow, available_backends, get_backend, infer_backend)
from .cnf import (MLP, DivergenceEstimate, Flow, FunctionField, RNODELoss, SolverOptions, VelocityField, bits_per_dim,
                  dequantize, estimate_divergence, exact_divergence, hutchinson_divergence, hutchplusplus_divergence,
                  load, logit_transform, native_field, probe_vjp, register_native_field, rnode_loss)
from .cnf import BitsPerDim, MultiscaleFlow
from .ode import (RK4, Adjoint, AdjointStats, ButcherTableau, Dopri5, ErrorNorm, Euler, GradientCheck, Midpoint,
                  PIController, Solution, Stats, adjoint_counter, adjoint_stats, check_gradients, odeint)
from .training import FitOptions, OptimizerSpec, Trainer, TrainingFailed, datasets, fit, make_trainer, register_trainer

# module paths of the first release, kept as aliases of their homes in the layers
for _old, _new in (("backend", base), ("solvers", ode.solvers), ("datasets", training.datasets),
                   ("plotting", training.plotting), ("cli", training.cli)):
    _sys.modules[f"{__name__}.{_old}"] = globals()[_old] = _new
del _old, _new

__version__ = "0.1.0"


def __getattr__(name):
    """Names resolved on first use: ``CNFDensity`` imports scikit-learn, which ``import otflow`` must not."""
    if name == "CNFDensity":
        from .training.estimator import CNFDensity

        return CNFDensity
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Adjoint",
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
    "make_trainer",
    "register_trainer",
    "Trainer",
    "native_field",
    "register_native_field",
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
    "MultiscaleFlow",
    "BitsPerDim",
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
