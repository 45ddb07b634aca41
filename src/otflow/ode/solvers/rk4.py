"""The classical fourth-order Runge–Kutta method.

W. Kutta, "Beitrag zur näherungsweisen Integration totaler
Differentialgleichungen", *Z. Math. Phys.* 46 (1901); Hairer, Nørsett & Wanner,
*Solving ODEs I*, Table II.1.2. RNODE (Finlay et al., ICML 2020) trains its
regularized flows with it on a fixed grid (step 0.25 on [0, 1]).
"""
from .runge_kutta import AbstractRungeKutta
from .tableau import ButcherTableau

__all__ = ["RK4"]


class RK4(AbstractRungeKutta):
    """Classical RK4 (the "3/8" rule is not this one). Fixed step only."""

    name = "rk4"
    tableau = ButcherTableau.from_fractions(
        c=[0, "1/2", "1/2", 1],
        a=[[], ["1/2"], [0, "1/2"], [0, 0, 1]],
        b=["1/6", "1/3", "1/3", "1/6"],
        order=4,
    )
