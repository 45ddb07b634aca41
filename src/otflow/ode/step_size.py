"""Adaptive step-size control: error norms, the PI controller, Hairer's initial step.

Step-size decisions are not differentiated: every quantity that feeds them
passes through ``stop_gradient`` first, and divisions and powers are guarded so
that a zero error (a zero-initialized velocity field gives exactly that) yields
finite values and finite gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..base.options import unknown_option_message

__all__ = ["ErrorNorm", "PIController", "check_tolerance", "initial_step_size", "resolve_norm"]

NORM_KINDS = ("rms", "max", "leaf_rms_max")


@dataclass(frozen=True)
class ErrorNorm:
    """The norm of the scaled error ``e / (atol + rtol·max(|y₀|, |y₁|))`` (Hairer, Nørsett &
    Wanner, *Solving ODEs I*, §II.4).

    :param kind: ``"rms"`` — root mean square over every element of the selected leaves
        (scipy's and torchdiffeq's default); ``"max"`` — largest absolute element;
        ``"leaf_rms_max"`` — largest of the per-leaf RMS values (what the FFJORD/RNODE
        code does with its tuple states).
    :param mask: one bool per leaf of the state (in tree-flattening order); leaves marked
        ``False`` are left out of error control. The CNF's regularizer integrals are
        masked out this way (RNODE, Finlay et al., ICML 2020): they are integrated, but
        they never shrink the step.
    :raises ValueError: an unknown kind (the nearest is suggested), or a mask leaving
        every leaf out.
    """

    kind: str = "rms"
    mask: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(unknown_option_message("norm kind", self.kind, NORM_KINDS))
        if self.mask is not None:
            object.__setattr__(self, "mask", tuple(bool(m) for m in self.mask))
            if not any(self.mask):
                raise ValueError("ErrorNorm: the mask leaves every state component out of error control")

    def on_leaves(self, leaves: Sequence, xp):
        """The norm of the scaled-error leaves (a 0-d array of namespace ``xp``).

        :raises ValueError: the mask's length differs from the number of leaves.
        """
        if self.mask is not None:
            if len(self.mask) != len(leaves):
                raise ValueError(f"ErrorNorm: mask has {len(self.mask)} entries but the state has {len(leaves)} leaves")
            leaves = [x for x, m in zip(leaves, self.mask) if m]
        if self.kind == "max":
            return _reduce(xp.maximum, [xp.max(xp.abs(x)) for x in leaves])
        if self.kind == "leaf_rms_max":
            return _reduce(xp.maximum, [xp.sqrt(xp.mean(x * x)) for x in leaves])
        total = _reduce(lambda a, b: a + b, [xp.sum(x * x) for x in leaves])
        count = sum(_size(x) for x in leaves)
        return xp.sqrt(total / count)


def check_tolerance(name: str, value) -> float:
    """``value`` as a float, refused unless finite and non-negative (``name`` names it in the error).

    :raises TypeError: ``value`` is not a number.
    :raises ValueError: ``value`` is negative, NaN or infinite.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a non-negative float, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a non-negative float, got {value!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return v


def _reduce(op, values):
    out = values[0]
    for v in values[1:]:
        out = op(out, v)
    return out


def _size(x) -> int:
    n = 1
    for s in x.shape:
        n *= int(s)
    return n


def resolve_norm(norm, treedef, unflatten):
    """The error norm as a function of a list of leaves and ``xp``.

    :param norm: ``odeint``'s ``norm=``: None, a kind name, an :class:`ErrorNorm`, or a
        callable of the scaled-error tree returning a 0-d array.
    :param treedef: the state's tree structure (a callable receives the tree).
    :param unflatten: the backend's ``tree_unflatten``.
    :raises ValueError: an unknown kind name.
    :raises TypeError: anything else.
    """
    if norm is None:
        norm = ErrorNorm()
    elif isinstance(norm, str):
        norm = ErrorNorm(norm)
    if isinstance(norm, ErrorNorm):
        return norm.on_leaves
    if callable(norm):
        return lambda leaves, xp: norm(unflatten(treedef, list(leaves)))
    raise TypeError(f"norm must be None, one of {NORM_KINDS}, an ErrorNorm or a callable; got {type(norm).__name__}")


@dataclass(frozen=True)
class PIController:
    """Proportional–integral step-size controller (Gustafsson 1991; Hairer & Wanner, *Solving
    ODEs II*, §IV.2; Söderlind 2002).

    The next step is ``h · clip(safety · ε⁻ᵅ · ε_prev^β, min_factor, max_factor)`` with
    ``α = (i_coeff + p_coeff)/k`` and ``β = p_coeff/k``, ``k`` = error-estimator order + 1.
    The defaults (``i_coeff = 1``, ``p_coeff = 0``) are the integral controller of
    scipy's ``solve_ivp``; Hairer's PI choice is ``p_coeff ≈ 0.4``, ``i_coeff ≈ 0.3``.
    After a rejected step the next accepted step may not grow (``factor ≤ 1``), as in
    scipy. A non-finite error estimate rejects the step and shrinks it by ``min_factor``.

    :param safety: the safety factor, in (0, 1].
    :param min_factor: the smallest step multiplier, in (0, 1).
    :param max_factor: the largest step multiplier, above 1.
    :param i_coeff: the integral gain.
    :param p_coeff: the proportional gain.
    :raises ValueError: a value outside its range.
    """

    safety: float = 0.9
    min_factor: float = 0.2
    max_factor: float = 10.0
    i_coeff: float = 1.0
    p_coeff: float = 0.0

    def __post_init__(self):
        if not 0 < self.safety <= 1:
            raise ValueError(f"PIController: safety must be in (0, 1], got {self.safety}")
        if not 0 < self.min_factor < 1 < self.max_factor:
            raise ValueError(
                f"PIController: need 0 < min_factor < 1 < max_factor, got {self.min_factor}, {self.max_factor}")
        if self.i_coeff + self.p_coeff <= 0:
            raise ValueError("PIController: i_coeff + p_coeff must be positive")

    def factor(self, xp, err, err_prev, accepted, rejected_before, error_order: int):
        """The step multiplier for the next step (all inputs already gradient-stopped).

        :param xp: the array namespace.
        :param err: the scaled error norm of this step.
        :param err_prev: that of the last accepted step (floored at 1e-4).
        :param accepted: whether this step is accepted.
        :param rejected_before: whether the previous attempt was rejected.
        :param error_order: the order of the embedded solution.
        :returns: a 0-d array.
        """
        k = error_order + 1
        alpha = (self.i_coeff + self.p_coeff) / k
        beta = self.p_coeff / k
        finite = xp.isfinite(err)
        positive = finite & (err > 0)
        safe = xp.where(positive, err, xp.ones_like(err))
        f = self.safety * safe ** (-alpha)
        if beta:
            f = f * err_prev ** beta
        f = xp.where(positive, f, xp.where(finite, xp.full_like(err, self.max_factor),
                                           xp.full_like(err, self.min_factor)))
        f = xp.minimum(xp.maximum(f, xp.full_like(err, self.min_factor)), xp.full_like(err, self.max_factor))
        # no growth right after a rejection; a rejected step always shrinks
        cap = xp.where(accepted & ~rejected_before, xp.full_like(err, self.max_factor), xp.ones_like(err))
        cap = xp.where(accepted, cap, xp.full_like(err, self.safety))
        return xp.minimum(f, cap)


def initial_step_size(xp, f, t0, y0, f0, args, direction, span, rtol, atol, norm_leaves, order):
    """The first step of an adaptive solve: Hairer, Nørsett & Wanner, *Solving ODEs I*,
    §II.4 (the "starting step size" algorithm, as in scipy's ``select_initial_step``); one
    extra evaluation of ``f``. All inputs are gradient-stopped by the caller.

    :param f: the flat right-hand side; ``f0 = f(t0, y0, args)``.
    :param direction: +1 or −1 (a 0-d array), the direction of integration.
    :param span: the length of the first output interval, the largest step returned.
    :param norm_leaves: the error norm (from :func:`resolve_norm`).
    :param order: the order of the embedded solution.
    :returns: a positive 0-d array no larger than ``span``.
    """
    scale = [atol + xp.abs(y) * rtol for y in y0]
    d0 = norm_leaves([y / s for y, s in zip(y0, scale)], xp)
    d1 = norm_leaves([g / s for g, s in zip(f0, scale)], xp)
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = xp.where(tiny, xp.full_like(d0, 1e-6), 0.01 * d0 / xp.where(tiny, xp.ones_like(d1), d1))
    h0 = xp.minimum(h0, span)
    y1 = tuple(y + (h0 * direction) * g for y, g in zip(y0, f0))
    f1 = f(t0 + h0 * direction, y1, args)
    d2 = norm_leaves([(b - a) / s for a, b, s in zip(f0, f1, scale)], xp) / h0
    dmax = xp.maximum(d1, d2)
    small = dmax <= 1e-15
    h1 = xp.where(small, xp.maximum(xp.full_like(h0, 1e-6), h0 * 1e-3),
                  (0.01 / xp.where(small, xp.ones_like(dmax), dmax)) ** (1.0 / (order + 1)))
    return xp.minimum(xp.minimum(100 * h0, h1), span)
