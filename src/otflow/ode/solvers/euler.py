"""The explicit (forward) Euler method, order 1.

L. Euler, *Institutionum calculi integralis*, 1768; see Hairer, Nørsett & Wanner,
*Solving Ordinary Differential Equations I*, 2nd ed., Springer 1993, §I.7.
"""
from .runge_kutta import AbstractRungeKutta
from .tableau import ButcherTableau

__all__ = ["Euler"]


class Euler(AbstractRungeKutta):
    """Forward Euler: ``y₁ = y₀ + h f(t₀, y₀)``. Fixed step only."""

    name = "euler"
    tableau = ButcherTableau.from_fractions(c=[0], a=[[]], b=[1], order=1)
