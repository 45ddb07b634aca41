"""Butcher tableaux as host constants that check themselves."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["ButcherTableau"]

_TOL = 1e-14


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau.

    ``c`` are the nodes, ``a`` the strictly lower-triangular rows (``a[i]`` has
    ``i`` entries: the weights of stages ``0..i-1`` in stage ``i``), ``b`` the
    solution weights, ``b_error`` the weights of the error estimate (solution
    minus embedded solution) or ``None`` for fixed-step methods.

    Checked on construction: ``c[0] == 0``, each row of ``a`` sums to its node,
    ``sum(b) == 1``, ``sum(b_error) == 0``. ``fsal`` (first same as last) is
    derived: the last stage is evaluated at ``(t + h, y_{n+1})``.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_error: tuple[float, ...] | None = None
    error_order: int | None = None
    fsal: bool = field(init=False)

    def __post_init__(self):
        s = len(self.c)
        if len(self.a) != s or len(self.b) != s:
            raise ValueError(f"tableau: c, a, b must all have {s} stages")
        if self.c[0] != 0:
            raise ValueError("tableau: c[0] must be 0 for an explicit method")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"tableau: row {i} of a must have {i} entries, has {len(row)}")
            if abs(sum(row) - self.c[i]) > _TOL:
                raise ValueError(f"tableau: row {i} of a sums to {sum(row)!r}, not c[{i}] = {self.c[i]!r}")
        if abs(sum(self.b) - 1) > _TOL:
            raise ValueError(f"tableau: weights b sum to {sum(self.b)!r}, not 1")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError(f"tableau: b_error must have {s} entries")
            if abs(sum(self.b_error)) > _TOL:
                raise ValueError(f"tableau: error weights sum to {sum(self.b_error)!r}, not 0")
            if self.error_order is None:
                raise ValueError("tableau: an embedded method needs error_order")
        fsal = s > 1 and self.c[-1] == 1 and tuple(self.a[-1]) == tuple(self.b[:-1]) and self.b[-1] == 0
        object.__setattr__(self, "fsal", fsal)

    @property
    def n_stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        return self.b_error is not None

    @classmethod
    def from_fractions(cls, c, a, b, order, b_error=None, error_order=None) -> "ButcherTableau":
        """Build from exact rationals (strings or Fractions), checked exactly, stored as floats."""
        fc = [Fraction(x) for x in c]
        fa = [[Fraction(x) for x in row] for row in a]
        fb = [Fraction(x) for x in b]
        for i, row in enumerate(fa):
            if sum(row, Fraction(0)) != fc[i]:
                raise ValueError(f"tableau: row {i} of a does not sum exactly to c[{i}]")
        if sum(fb, Fraction(0)) != 1:
            raise ValueError("tableau: b does not sum exactly to 1")
        fe = None
        if b_error is not None:
            fe = [Fraction(x) for x in b_error]
            if sum(fe, Fraction(0)) != 0:
                raise ValueError("tableau: b_error does not sum exactly to 0")
        return cls(
            c=tuple(map(float, fc)),
            a=tuple(tuple(map(float, row)) for row in fa),
            b=tuple(map(float, fb)),
            order=order,
            b_error=None if fe is None else tuple(map(float, fe)),
            error_order=error_order,
        )
