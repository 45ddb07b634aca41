"""The Dormand–Prince 5(4) pair with first-same-as-last stages.

J. R. Dormand & P. J. Prince, "A family of embedded Runge–Kutta formulae",
*J. Comput. Appl. Math.* 6 (1980) 19–26; Hairer, Nørsett & Wanner, *Solving
ODEs I*, Table II.5.2. The fifth-order solution is propagated (local
extrapolation); the fourth-order embedded solution only estimates the error.
Seven stages, six new evaluations per step thanks to FSAL.
"""
from fractions import Fraction

from .runge_kutta import AbstractRungeKutta
from .tableau import ButcherTableau

__all__ = ["Dopri5"]

_B5 = [Fraction(x) for x in ("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0)]
_B4 = [Fraction(x) for x in ("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40")]


class Dopri5(AbstractRungeKutta):
    """Dormand–Prince 5(4): adaptive, FSAL, error estimate of order 4."""

    name = "dopri5"
    tableau = ButcherTableau.from_fractions(
        c=[0, "1/5", "3/10", "4/5", "8/9", 1, 1],
        a=[
            [],
            ["1/5"],
            ["3/40", "9/40"],
            ["44/45", "-56/15", "32/9"],
            ["19372/6561", "-25360/2187", "64448/6561", "-212/729"],
            ["9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"],
            _B5[:-1],
        ],
        b=_B5,
        b_error=[x - y for x, y in zip(_B5, _B4)],
        order=5,
        error_order=4,
    )
