"""Explicit Runge–Kutta steps from a Butcher tableau, on flat tuples of arrays.

A method is a subclass of :class:`AbstractRungeKutta` that sets ``tableau`` (and
optionally ``name``); the step is written once here, for fixed-step and embedded
pairs, with or without FSAL. States are tuples of leaves
(the solver core flattens trees once per solve), so stage arithmetic is a loop
over leaves with zero coefficients skipped and unit coefficients not multiplied.

On eager backends the coefficients are 0-d arrays of the state's dtype, made once per
(tableau, dtype, device) and reused by every step: PyTorch converts a Python-float operand
into a tensor inside every multiplication (about 12 µs on a CPU, more than the
multiplication of a 512-row leaf itself), and the stages of a solve take tens of them per
step. Compiling backends (JAX) fold Python floats into the program, so they keep them. The
numbers are the same: a float32 or float64 array holds the coefficient as the operation
would have rounded it (other dtypes keep Python floats, which torch applies in float32).
"""
from __future__ import annotations

from typing import Callable, ClassVar

from ...base import get_backend
from .tableau import ButcherTableau

__all__ = ["AbstractRungeKutta"]


def _combine(y, h, coeffs, ks):
    """``y + h * Σ coeffs[i] * ks[i]`` leafwise, skipping zero coefficients (and the
    multiplication by a coefficient of exactly 1)."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c is not None]
    if not terms:
        return y
    return tuple(yj + h * _sum_terms(terms, j) for j, yj in enumerate(y))


def _weighted_sum(h, coeffs, ks):
    """``h * Σ coeffs[i] * ks[i]`` leafwise (the error estimate)."""
    terms = [(c, k) for c, k in zip(coeffs, ks) if c is not None]
    return tuple(h * _sum_terms(terms, j) for j in range(len(ks[0])))


def _sum_terms(terms, j):
    acc = None
    for c, k in terms:
        term = k[j] if c is _ONE else k[j] * c
        acc = term if acc is None else acc + term
    return acc


#: marks a coefficient of exactly 1 (``k * 1`` is ``k``: not multiplied)
_ONE = object()


class _Weights:
    """A tableau's coefficients as the stage arithmetic uses them: ``None`` for 0 (the term is
    skipped), ``_ONE`` for 1 (not multiplied), otherwise a Python float or a 0-d array.

    :param tableau: the Butcher tableau.
    :param const: makes a coefficient's multiplier from its float (``float`` for Python floats).
    """

    def __init__(self, tableau: ButcherTableau, const: Callable):
        def weight(x):
            if x == 0:
                return None
            return _ONE if x == 1 else const(x)

        self.tableau = tableau
        self.a = tuple(tuple(weight(x) for x in row) for row in tableau.a)
        self.b = tuple(weight(x) for x in tableau.b)
        self.b_error = None if tableau.b_error is None else tuple(weight(x) for x in tableau.b_error)
        # the nodes multiply h once per stage (node 0 is never used)
        self.c = tuple(_ONE if x == 1 else const(x) for x in tableau.c)


#: array type -> its backend when that backend runs eagerly (arrays as coefficients), else None
_EAGER_BACKENDS: dict = {}
#: (id(tableau), dtype, device) -> _Weights of 0-d arrays (eager backends)
_ARRAY_WEIGHTS: dict = {}
#: id(tableau) -> _Weights of Python floats
_FLOAT_WEIGHTS: dict = {}


def _eager_backend(h):
    """The backend of ``h`` if it runs eagerly, else None (found once per array type)."""
    kind = type(h)
    if kind not in _EAGER_BACKENDS:
        try:
            backend = get_backend(None, like=h)
        except (TypeError, ValueError):  # not an array of any backend (a Python float)
            backend = None
        _EAGER_BACKENDS[kind] = backend if backend is not None and backend.eager else None
    return _EAGER_BACKENDS[kind]


def _weights(tableau: ButcherTableau, h) -> _Weights:
    """The coefficients for a step of size ``h``: 0-d arrays of ``h``'s dtype and device on
    eager backends in float32 / float64, Python floats otherwise."""
    backend = _eager_backend(h)
    if backend is not None:
        xp = backend.namespace()
        dtype = h.dtype
        if dtype == xp.float32 or dtype == xp.float64:
            device = backend.device_of(h)
            key = (id(tableau), dtype, device)
            found = _ARRAY_WEIGHTS.get(key)
            if found is None or found.tableau is not tableau:
                found = _ARRAY_WEIGHTS[key] = _Weights(tableau, lambda x: xp.asarray(x, dtype=dtype, device=device))
            return found
    found = _FLOAT_WEIGHTS.get(id(tableau))
    if found is None or found.tableau is not tableau:
        found = _FLOAT_WEIGHTS[id(tableau)] = _Weights(tableau, float)
    return found


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
        w = _weights(tab, h)
        k0 = f0 if f0 is not None else f(t, y, args)
        ks = [k0]
        for i in range(1, tab.n_stages):
            if tab.fsal and i == tab.n_stages - 1:
                break
            yi = _combine(y, h, w.a[i], ks)
            c = w.c[i]
            ks.append(f(t + (h if c is _ONE else h * c), yi, args))
        y1 = _combine(y, h, w.b, ks)
        f1 = None
        if tab.fsal:
            f1 = f(t + h, y1, args)
            ks.append(f1)
        y_error = _weighted_sum(h, w.b_error, ks) if w.b_error is not None else None
        return y1, y_error, f1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
