"""Butcher tableaux as host constants that check themselves."""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["ButcherTableau"]

_TOL = 1e-14


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta tableau (Butcher 1963; Hairer, Nørsett & Wanner, *Solving ODEs I*, §II.1).

    Checked on construction: ``c[0] == 0``, each row of ``a`` sums to its node,
    ``sum(b) == 1``, ``sum(b_error) == 0``. ``fsal`` (first same as last) is derived:
    the last stage is evaluated at ``(t + h, y₁)``, so it is the next step's first stage.
    Build one from exact rationals with :meth:`from_fractions`.

    :param c: the nodes.
    :param a: the strictly lower-triangular rows: ``a[i]`` has ``i`` entries, the weights
        of stages ``0..i-1`` in stage ``i``.
    :param b: the weights of the propagated solution.
    :param order: the order of the propagated solution.
    :param b_error: the weights of the error estimate (propagated minus embedded
        solution), or ``None`` for a fixed-step method.
    :param error_order: the order of the embedded solution (required with ``b_error``).
    :raises ValueError: the tableau is inconsistent (the message names the row or weights).
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
        """The number of stages."""
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the tableau has error weights (an embedded pair for step-size control)."""
        return self.b_error is not None

    @classmethod
    def from_fractions(cls, c, a, b, order, b_error=None, error_order=None) -> "ButcherTableau":
        """Build from exact rationals (strings such as ``"1/3"``, ints or Fractions), checked
        exactly, stored as floats. The parameters are those of the class.

        :raises ValueError: a row of ``a`` does not sum to its node, ``b`` not to 1, or
            ``b_error`` not to 0 (exactly).
        """
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
