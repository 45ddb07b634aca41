"""Explicit Runge–Kutta steps from a Butcher tableau, on flat tuples of arrays.

A method is a subclass of :class:`AbstractRungeKutta` that sets ``tableau`` (and
optionally ``name``); the step is written once here, for fixed-step and embedded
pairs, with or without FSAL. States are tuples of leaves
(the solver core flattens trees once per solve), so stage arithmetic is a loop
over leaves with Python-float coefficients and zero entries skipped.
"""
from __future__ import annotations

from typing import Callable, ClassVar

from .tableau import ButcherTableau

__all__ = ["AbstractRungeKutta"]


def _combine(y, h, coeffs, ks):
    """``y + h * Σ coeffs[i] * ks[i]`` leafwise, skipping zero coefficients."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c != 0]
    if not terms:
        return y
    out = []
    for j, yj in enumerate(y):
        acc = None
        for c, k in terms:
            term = k[j] * c
            acc = term if acc is None else acc + term
        out.append(yj + h * acc)
    return tuple(out)


def _weighted_sum(h, coeffs, ks):
    """``h * Σ coeffs[i] * ks[i]`` leafwise (the error estimate)."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c != 0]
    out = []
    for j in range(len(ks[0])):
        acc = None
        for c, k in terms:
            term = k[j] * c
            acc = term if acc is None else acc + term
        out.append(h * acc)
    return tuple(out)


class AbstractRungeKutta:
    """An explicit Runge–Kutta method defined by its :class:`ButcherTableau`
    (Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1).

    A method is a subclass that sets ``tableau`` (and ``name``, which defaults to the
    class name in lower case) and nothing else; the step is this class's. A tableau with
    error weights makes the method adaptive; FSAL is derived from the tableau. A user's
    method is used like otflow's own: ``odeint(..., method=MyMethod())``.

    :raises TypeError: a subclass without a :class:`ButcherTableau` ``tableau``.
    """

    name: ClassVar[str]
    tableau: ClassVar[ButcherTableau]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not isinstance(getattr(cls, "tableau", None), ButcherTableau):
            raise TypeError(f"{cls.__name__}: a Runge–Kutta method needs a class attribute tableau = "
                            f"ButcherTableau(...) (e.g. ButcherTableau.from_fractions(c=..., a=..., b=..., order=...))")
        if "name" not in cls.__dict__:
            cls.name = cls.__name__.lower()

    @property
    def order(self) -> int:
        """The order of the propagated solution."""
        return self.tableau.order

    @property
    def adaptive(self) -> bool:
        """Whether the tableau has an embedded error estimate (every layer asks this, never the name)."""
        return self.tableau.adaptive

    @property
    def error_order(self) -> int | None:
        """The order of the embedded solution (``None`` for fixed-step methods)."""
        return self.tableau.error_order

    @property
    def fsal(self) -> bool:
        """Whether the last stage is ``f(t + h, y₁)``, reused as the next step's first stage."""
        return self.tableau.fsal

    @property
    def evals_per_step(self) -> int:
        """New right-hand-side evaluations per step (one fewer for FSAL methods)."""
        return self.tableau.n_stages - (1 if self.fsal else 0)

    def step(self, f: Callable, t, y: tuple, h, args, f0: tuple | None = None):
        """One step from ``(t, y)`` of size ``h``.

        :param f: ``f(t, y, args) -> tuple`` of leaves.
        :param t: the time (a 0-d array).
        :param y: the state, a tuple of leaves.
        :param h: the step (a 0-d array; negative integrates backward).
        :param args: passed to ``f``.
        :param f0: ``f(t, y, args)`` when known (FSAL methods carry it from the last step);
            evaluated here when ``None``.
        :returns: ``(y1, y_error, f1)``: ``y_error`` (the propagated minus the embedded
            solution) is ``None`` for fixed-step methods; ``f1 = f(t + h, y1)`` for FSAL
            methods and ``None`` otherwise.
        """
        tab = self.tableau
        k0 = f0 if f0 is not None else f(t, y, args)
        ks = [k0]
        for i in range(1, tab.n_stages):
            if tab.fsal and i == tab.n_stages - 1:
                break
            yi = _combine(y, h, tab.a[i], ks)
            ks.append(f(t + h * tab.c[i], yi, args))
        y1 = _combine(y, h, tab.b, ks)
        f1 = None
        if tab.fsal:
            f1 = f(t + h, y1, args)
            ks.append(f1)
        y_error = _weighted_sum(h, tab.b_error, ks) if tab.b_error is not None else None
        return y1, y_error, f1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
