"""The explicit midpoint method (Runge 1895), order 2.

C. Runge, "Über die numerische Auflösung von Differentialgleichungen",
*Math. Ann.* 46 (1895); Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1.
"""
from .runge_kutta import AbstractRungeKutta
from .tableau import ButcherTableau

__all__ = ["Midpoint"]


class Midpoint(AbstractRungeKutta):
    """Explicit midpoint: ``y₁ = y₀ + h f(t₀ + h/2, y₀ + h/2 f(t₀, y₀))``. Fixed step only."""

    name = "midpoint"
    tableau = ButcherTableau.from_fractions(c=[0, "1/2"], a=[[], ["1/2"]], b=[0, 1], order=2)
