"""A gradient checker: the gradient modes of a loss against each other and against
central finite differences.

``check_gradients(loss_fn, args)`` computes ``∇ loss_fn(args, mode)`` for every
gradient mode (``"direct"``, ``"adjoint"``: passed on to :func:`otflow.odeint` by the
user's function) and compares

* each mode with finite differences along a few random unit directions ``v`` in
  parameter space (the directional derivative ``⟨∇L, v⟩`` against the fourth-order
  central difference ``[8(L(θ+hv) − L(θ−hv)) − (L(θ+2hv) − L(θ−2hv))] / 12h``), which
  costs ``4 × n_directions`` loss evaluations however many parameters there are;
* every pair of modes, on the whole gradient.

Finite differences need float64: in float32 the rounding error of the loss divided by
``h`` swamps the comparison (a warning says so).
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..base import Backend, get_backend
from ..base.options import reject_unknown_keywords, unknown_option_message
from ..base.tree import tree_leaves
from .adjoint import GRADIENTS

__all__ = ["GradientCheck", "check_gradients"]

#: compiled functions per loss function, so that checking the same ``loss_fn`` again (other
#: parameter values of the same shapes) reuses JAX's compilations
_COMPILED: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class GradientCheck:
    """What :func:`check_gradients` measured. ``print(report)`` shows a table.

    Relative errors against finite differences are ``max_k |⟨g, v_k⟩ − FD_k| / s`` with
    ``s`` the root mean square of the finite differences ``FD_k`` over the directions
    (so a direction nearly orthogonal to the gradient does not inflate the error).
    Errors between two modes are ``‖g₁ − g₂‖ / max(‖g₁‖, ‖g₂‖)`` over all parameters.

    :param loss: the loss value (of the first mode).
    :param modes: the gradient modes compared.
    :param fd_errors: each mode's relative error against the finite differences.
    :param pair_errors: the relative error between each pair of modes.
    :param fd_noise: the same measure between the second- and fourth-order differences,
        an upper estimate of the finite differences' own error.
    :param directional: each mode's directional derivatives ``⟨g, v_k⟩``.
    :param finite_differences: the fourth-order central differences ``FD_k``.
    :param step: the finite-difference step along a unit direction.
    :param dtype: the dtypes of the arguments.
    :param gradients: each mode's gradient, a tree like the arguments.
    """

    loss: float
    modes: tuple[str, ...]
    fd_errors: dict[str, float]
    pair_errors: dict[tuple[str, str], float]
    fd_noise: float
    directional: dict[str, np.ndarray]
    finite_differences: np.ndarray
    step: float
    dtype: str
    gradients: dict[str, Any] = field(repr=False)

    @property
    def max_error(self) -> float:
        """The largest relative error of the report (modes vs FD and between modes)."""
        values = list(self.fd_errors.values()) + list(self.pair_errors.values())
        return max(values) if values else 0.0

    def ok(self, rtol: float) -> bool:
        """Whether every relative error is at most ``rtol`` (NaN fails)."""
        return all(v <= rtol for v in list(self.fd_errors.values()) + list(self.pair_errors.values()))

    def assert_ok(self, rtol: float) -> None:
        """Raise ``AssertionError`` with the table when some relative error exceeds ``rtol``."""
        if not self.ok(rtol):
            raise AssertionError(f"gradient check failed (rtol={rtol:g}):\n{self}")

    def __str__(self) -> str:
        n = len(self.finite_differences)
        head = f"gradient check: loss = {self.loss:.6e}, {self.dtype}"
        if n:
            head += f", {n} random direction{'s' * (n != 1)}, FD step {self.step:.1e} (4th-order central)"
        rows = [(f"{m} vs FD", self.fd_errors[m]) for m in self.modes if m in self.fd_errors]
        rows += [(f"{a} vs {b}", v) for (a, b), v in self.pair_errors.items()]
        if n:
            rows.append(("FD: 2nd vs 4th order", self.fd_noise))
        width = max(len("comparison"), *(len(r[0]) for r in rows))
        lines = [head, f"  {'comparison':<{width}}  relative error"]
        lines += [f"  {label:<{width}}  {value:.2e}" for label, value in rows]
        return "\n".join(lines)


def _flat64(backend, tree) -> np.ndarray:
    leaves = backend.tree_leaves(tree)
    if not leaves:
        return np.zeros(0)
    return np.concatenate([np.asarray(backend.to_numpy(x), dtype=np.float64).reshape(-1) for x in leaves])


@reject_unknown_keywords
def check_gradients(loss_fn: Callable, args, *, backend: str | Backend | None = None,
                    modes: Sequence[str] = GRADIENTS, n_directions: int = 4, eps: float | None = None,
                    fd: bool = True, fd_mode: str | None = None, seed: int = 0, jit: bool = True) -> GradientCheck:
    """Compare the gradient modes of ``loss_fn`` with each other and with finite differences.

    :param loss_fn: ``loss_fn(args, mode) -> 0-d array``; ``mode`` is one of ``modes``,
        to be passed on as ``odeint(..., gradient=mode)``. Everything to be checked is
        in ``args``; close over the rest (data, probes). For a CNF::

            report = otflow.check_gradients(
                lambda p, mode: otflow.rnode_loss([field], [p], x, eps, T=[1.0],
                    solver_kwargs=dict(gradient=mode, rtol=1e-9, atol=1e-9)).loss, params)

    :param args: a tree of floating arrays of one backend (e.g. a parameter tree;
        torch tensors that require grad, such as a module's parameters, are fine).
    :param backend: a backend name or object; inferred from ``args`` when None.
    :param modes: the gradient modes to compute (default ``("direct", "adjoint")``).
    :param n_directions: random unit directions for the finite differences.
    :param eps: the finite-difference step along a unit direction (default ``1e-3`` in
        float64, ``3e-2`` in lower precision).
    :param fd: compute finite differences (False: only compare the modes).
    :param fd_mode: the mode passed to ``loss_fn`` for the finite-difference evaluations
        (only the forward value is used; default ``"adjoint"`` when among ``modes``, else
        ``modes[0]``). When ``fd_mode`` is among ``modes`` the values come from its
        compiled value-and-gradient function: no further compilation (JAX compiles
        dominate the cost on small problems), at the price of a backward pass per
        evaluation.
    :param seed: seeds the random directions.
    :param jit: compile the gradient and loss functions with ``backend.jit`` (JAX).
        Compiled functions are kept per ``loss_fn`` (weakly), so a second check of the
        same function with arguments of the same shapes compiles nothing.
    :returns: a :class:`GradientCheck`; ``print`` it for a table, ``assert_ok(rtol)`` in tests.
    """
    modes = tuple(modes)
    for m in modes:
        if m not in GRADIENTS:
            raise ValueError(unknown_option_message("gradient mode", str(m), GRADIENTS))
    if not modes and not fd:
        raise ValueError("check_gradients: nothing to compare (no modes and fd=False)")
    if isinstance(n_directions, bool) or not isinstance(n_directions, int) or n_directions < 1:
        raise ValueError(f"n_directions must be a positive int, got {n_directions!r}")
    if fd_mode is None:
        fd_mode = "adjoint" if "adjoint" in modes else (modes[0] if modes else "direct")
    elif fd_mode not in GRADIENTS:
        raise ValueError(unknown_option_message("fd_mode", str(fd_mode), GRADIENTS))
    b, args = _checked_args(args, backend)
    leaves, treedef = b.tree_flatten(args)
    dtypes = sorted({str(x.dtype) for x in leaves})
    low = [d for d in dtypes if "64" not in d]
    if low and fd:
        warnings.warn(f"check_gradients: args hold {', '.join(low)}; finite differences in less than float64 "
                      "are dominated by rounding (expect relative errors of 1e-3 or worse). Cast to float64"
                      + (" (with jax_enable_x64 on)" if b.name == "jax" else "") + ".", UserWarning, stacklevel=3)
    if eps is None:
        eps = 1e-3 if not low else 3e-2
    eps = float(eps)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be positive, got {eps!r}")

    compiled = _CompiledLoss(loss_fn, b, jit)
    gradients, values = {}, {}
    for m in modes:
        value, gradients[m] = compiled.value_and_grad(m)(args)
        values[m] = float(b.to_numpy(value))
    flat = {m: _flat64(b, g) for m, g in gradients.items()}

    fd_errors, fd_noise = {}, float("nan")
    directional = {m: np.zeros(0) for m in modes}
    fds = np.zeros(0)
    value_fn = compiled.value(fd_mode, from_gradient=fd_mode in modes) if (fd or not modes) else None
    if fd:
        directions = _random_directions(leaves, n_directions, seed)
        fds, fd2s = _central_differences(b, value_fn, leaves, treedef, directions, eps)
        directional = {m: np.array([float(flat[m] @ v) for v in directions]) for m in modes}
        scale = max(float(np.sqrt(np.mean(fds ** 2))), np.finfo(np.float64).tiny)
        fd_noise = float(np.max(np.abs(fds - fd2s)) / scale)
        fd_errors = {m: float(np.max(np.abs(directional[m] - fds)) / scale) for m in modes}
    loss_value = values[modes[0]] if modes else float(b.to_numpy(value_fn(args)))
    return GradientCheck(loss=loss_value, modes=modes, fd_errors=fd_errors, pair_errors=_pair_errors(modes, flat),
                         fd_noise=fd_noise, directional=directional, finite_differences=fds, step=eps,
                         dtype="/".join(dtypes), gradients=gradients)


def _checked_args(args, backend):
    """``(backend, args)``: the backend (inferred from the leaves when None) and ``args``
    without gradient history; every leaf must be a floating array of that backend."""
    leaves = tree_leaves(args)  # the core's tree rules, to infer the backend
    b = get_backend(backend, like=leaves[0] if leaves else None)
    xp = b.namespace()
    leaves = b.tree_leaves(args)
    if not leaves:
        raise ValueError("check_gradients: args holds no arrays")
    for x in leaves:
        if not (b.owns(x) and xp.isdtype(x.dtype, "real floating")):
            raise TypeError(f"check_gradients: every leaf of args must be a floating array of the {b.name!r} "
                            f"backend, got {type(x).__name__} {getattr(x, 'dtype', '')}; close over the others")
    return b, b.stop_gradient(args)


class _CompiledLoss:
    """``loss_fn``'s value-and-gradient and value functions per mode, built (and compiled)
    once and kept per ``loss_fn`` (weakly), so a second check compiles nothing."""

    def __init__(self, loss_fn: Callable, backend: Backend, jit: bool):
        self.loss_fn, self.backend, self.jit = loss_fn, backend, jit
        try:
            self.cache = _COMPILED.setdefault(loss_fn, {})
        except TypeError:  # not weak-referenceable: no reuse
            self.cache = {}

    def _cached(self, key, build: Callable):
        key = (self.backend.name, id(self.backend), self.jit) + key
        if key not in self.cache:
            fn = build()
            self.cache[key] = self.backend.jit(fn) if self.jit else fn
        return self.cache[key]

    def value_and_grad(self, mode: str) -> Callable:
        return self._cached((mode,), lambda: self.backend.value_and_grad(_LossInMode(self.loss_fn, mode)))

    def value(self, mode: str, *, from_gradient: bool) -> Callable:
        """The loss in ``mode``; ``from_gradient``: the value of the compiled value-and-gradient
        function (no second compilation, a backward pass per evaluation)."""
        if from_gradient:
            return _ValueOf(self.value_and_grad(mode))
        return self._cached((mode, "value"), lambda: _LossInMode(self.loss_fn, mode))


class _LossInMode:
    """``loss_fn(args, mode)`` as a function of ``args``."""

    def __init__(self, loss_fn: Callable, mode: str):
        self.loss_fn, self.mode = loss_fn, mode

    def __call__(self, args):
        return self.loss_fn(args, self.mode)


class _ValueOf:
    """The value part of a value-and-gradient function."""

    def __init__(self, value_and_grad: Callable):
        self.value_and_grad = value_and_grad

    def __call__(self, args):
        return self.value_and_grad(args)[0]


def _pair_errors(modes, flat) -> dict:
    """``‖g₁ − g₂‖ / max(‖g₁‖, ‖g₂‖)`` for every pair of modes."""
    out = {}
    for i, m1 in enumerate(modes):
        for m2 in modes[i + 1:]:
            g1, g2 = flat[m1], flat[m2]
            denom = max(np.linalg.norm(g1), np.linalg.norm(g2), np.finfo(np.float64).tiny)
            out[(m1, m2)] = float(np.linalg.norm(g1 - g2) / denom)
    return out


def _random_directions(leaves, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random unit vectors in the flattened parameter space."""
    rng = np.random.default_rng(seed)
    size = sum(math.prod(tuple(x.shape)) for x in leaves)
    out = []
    for _ in range(n):
        v = rng.standard_normal(size)
        out.append(v / np.linalg.norm(v))
    return out


def _central_differences(b, value_fn, leaves, treedef, directions, eps: float):
    """Fourth- and second-order central differences of ``value_fn`` along each direction."""
    shapes = [tuple(x.shape) for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    fds, fd2s = np.zeros(len(directions)), np.zeros(len(directions))
    for k, v in enumerate(directions):
        parts = np.split(v, np.cumsum(sizes)[:-1])
        v_leaves = [b.asarray(p.reshape(s), dtype=x.dtype, device=b.device_of(x))
                    for p, s, x in zip(parts, shapes, leaves)]
        lp1, lm1, lp2, lm2 = (_value_at(b, value_fn, leaves, treedef, v_leaves, step)
                              for step in (eps, -eps, 2 * eps, -2 * eps))
        fd2s[k] = (lp1 - lm1) / (2 * eps)
        fds[k] = (8 * (lp1 - lm1) - (lp2 - lm2)) / (12 * eps)
    return fds, fd2s


def _value_at(b, value_fn, leaves, treedef, v_leaves, step: float) -> float:
    moved = [x + step * w for x, w in zip(leaves, v_leaves)]
    return float(b.to_numpy(value_fn(b.tree_unflatten(treedef, moved))))
