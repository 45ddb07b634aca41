"""The ODE layer: solve ``dy/dt = f(t, y, args)`` and differentiate the solution.

Built on the base layer only, and usable alone (``otflow.odeint``): Butcher
tableaux and Runge–Kutta steps (:mod:`.solvers`, a file per method), step-size
control (:mod:`.step_size`), the integration loop shared by both gradient modes
(:mod:`.loop`), the public entry point with its validation (:mod:`.integrate`), the
adjoint method (:mod:`.adjoint`) and the gradient checker (:mod:`.gradcheck`).
"""
from .adjoint import COUNTER_FIELDS, GRADIENTS, Adjoint, AdjointStats, adjoint_counter, adjoint_stats
from .gradcheck import GradientCheck, check_gradients
from .loop import Stats
from .integrate import DEFAULT_ATOL, DEFAULT_MAX_STEPS, DEFAULT_RTOL, Solution, odeint, raise_for_status, resolve_solver
from .solvers import RK4, SOLVERS, AbstractRungeKutta, ButcherTableau, Dopri5, Euler, Midpoint
from .step_size import ErrorNorm, PIController

__all__ = [
    "odeint", "Solution", "Stats", "raise_for_status", "resolve_solver",
    "DEFAULT_RTOL", "DEFAULT_ATOL", "DEFAULT_MAX_STEPS",
    "GRADIENTS", "Adjoint", "AdjointStats", "adjoint_counter", "adjoint_stats", "COUNTER_FIELDS",
    "GradientCheck", "check_gradients",
    "AbstractRungeKutta", "ButcherTableau", "SOLVERS", "Dopri5", "Euler", "Midpoint", "RK4",
    "ErrorNorm", "PIController",
]
