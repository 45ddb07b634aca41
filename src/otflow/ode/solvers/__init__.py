"""Explicit Runge–Kutta solvers from self-checking Butcher tableaux."""
from .runge_kutta import AbstractRungeKutta
from .tableau import ButcherTableau
from .dopri5 import Dopri5
from .euler import Euler
from .midpoint import Midpoint
from .rk4 import RK4

#: solver names accepted by ``odeint(method=...)``
SOLVERS = {cls.name: cls for cls in (Euler, Midpoint, RK4, Dopri5)}

__all__ = ["AbstractRungeKutta", "ButcherTableau", "Dopri5", "Euler", "Midpoint", "RK4", "SOLVERS"]
