"""The backend interface: what the array API lacks, supplied per framework.

The core computes with the array-API namespace a backend returns from
:meth:`Backend.namespace` and asks the backend for everything else: autodiff,
compilation, loops that can be differentiated, custom VJPs, random keys,
devices and trees. A backend is chosen per call (``backend="torch"``) or
inferred from the input arrays; there is no global switch.

Conventions every backend follows (the conformance suite in
``tests/test_backend_conformance.py`` checks them):

* Trees are nested tuples, lists, dicts (sorted keys) and namedtuples of
  arrays; ``None`` is an empty subtree. Backends with a native pytree library
  may accept more node types but must flatten these the same way.
* Loops take and return trees of arrays; the condition returns a 0-d boolean
  array. Loop bodies never change shapes or dtypes.
* Random keys are explicit values: ``key(seed)`` makes one, ``split`` derives
  independent ones, and a draw depends only on its key, shape, dtype and device.
* ``custom_vjp(fun, fwd, bwd)``: ``fwd(*args) -> (out, residuals)`` and
  ``bwd(residuals, out_cotangent) -> tuple of cotangents, one per argument``
  (a tree shaped like that argument; ``None`` for a non-differentiable one).
  Auxiliary backward outputs (the backward NFE) are returned as the cotangent
  of a dummy zero argument, which keeps the trick inside compiled code.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from . import tree as _tree
from .errors import CapabilityError

__all__ = ["Backend", "LOOP_KINDS", "check_loop_kind"]

#: Kinds of ``while_loop``:
#: ``"forward"`` — may only be forward-differentiated (JAX's lax.while_loop);
#: ``"bounded"`` — reverse-differentiable, at most ``max_steps`` iterations, memory
#: proportional to ``max_steps`` times the loop state (bodies are rematerialized);
#: ``"checkpointed"`` — reverse-differentiable with checkpoints, memory sublinear in steps.
LOOP_KINDS = ("forward", "bounded", "checkpointed")


class Backend(abc.ABC):
    """Abstract backend. Concrete backends are final classes registered by name."""

    #: registry name ("torch", "jax", "numpy", "array_api_strict")
    name: ClassVar[str]
    #: the pip extra that installs the framework (for error messages)
    extra: ClassVar[str | None] = None

    # ---- capability flags -------------------------------------------------------------
    #: vjp / jvp / value_and_grad / custom_vjp work
    has_autodiff: ClassVar[bool] = False
    #: ``jit`` compiles (otherwise it returns the function unchanged)
    has_jit: ClassVar[bool] = False
    #: ``vmap`` is a true vectorizing map (otherwise a Python loop over the axis)
    has_vmap: ClassVar[bool] = False
    #: loop kinds that can be reverse-differentiated
    reverse_loop_kinds: ClassVar[tuple[str, ...]] = ()
    #: eager execution: Python control flow on array values is allowed
    eager: ClassVar[bool] = True

    # ---- arrays and devices -------------------------------------------------------------
    @abc.abstractmethod
    def namespace(self) -> Any:
        """The array-API namespace the core computes with."""

    @abc.abstractmethod
    def owns(self, x) -> bool:
        """Whether ``x`` is an array of this backend (must not import a framework)."""

    @abc.abstractmethod
    def asarray(self, x, *, dtype=None, device=None):
        """Convert ``x`` (numpy, Python scalars, this backend's arrays) to this backend."""

    @abc.abstractmethod
    def to_numpy(self, x) -> np.ndarray:
        """A host numpy copy of ``x`` (detached from any graph)."""

    @abc.abstractmethod
    def device(self, spec=None):
        """Resolve a device spec ("cpu", "cuda", "cuda:1", "gpu", None → default) or raise
        :class:`~otflow.BackendUnavailable` naming what is missing."""

    @abc.abstractmethod
    def device_of(self, x):
        """The device an array lives on."""

    def check_dtype(self, dtype) -> None:
        """Raise if this backend cannot compute in ``dtype`` as configured."""

    def is_concrete(self, x) -> bool:
        """Whether the value of ``x`` can be read on the host now (not a tracer)."""
        return True

    # ---- trees (core implementation; JAX uses its own pytrees) --------------------------
    def tree_flatten(self, tree):
        return _tree.tree_flatten(tree)

    def tree_unflatten(self, treedef, leaves):
        return _tree.tree_unflatten(treedef, leaves)

    def tree_map(self, f: Callable, tree, *rest):
        return _tree.tree_map(f, tree, *rest)

    def tree_leaves(self, tree) -> list:
        return self.tree_flatten(tree)[0]

    # ---- loops --------------------------------------------------------------------------
    def while_loop(self, cond_fun, body_fun, init_val, *, max_steps: int | None = None,
                   kind: str = "forward"):
        """Run ``body_fun`` while ``cond_fun(state)`` is true; return the final state.

        ``max_steps`` bounds the iterations (required by the ``"bounded"`` and
        ``"checkpointed"`` kinds). The eager default is a Python loop, reverse
        differentiable by the framework's tape.
        """
        check_loop_kind(kind, max_steps)
        state = init_val
        n = 0
        while bool(cond_fun(state)):
            if max_steps is not None and n >= max_steps:
                break
            state = body_fun(state)
            n += 1
        return state

    def fori_loop(self, lower: int, upper: int, body_fun, init_val):
        """``for i in range(lower, upper): state = body_fun(i, state)`` with static bounds;
        always reverse-differentiable."""
        state = init_val
        for i in range(int(lower), int(upper)):
            state = body_fun(i, state)
        return state

    def scan(self, f, init, xs, length: int | None = None):
        """``carry, y = f(carry, x)`` over the leading axis of ``xs`` (a tree or None);
        returns ``(carry, ys)`` with the ``y`` trees stacked along a new leading axis."""
        xp = self.namespace()
        if xs is None:
            if length is None:
                raise ValueError("scan: give xs or length")
            items = [None] * length
        else:
            leaves, treedef = self.tree_flatten(xs)
            n = leaves[0].shape[0]
            items = [self.tree_unflatten(treedef, [leaf[i, ...] for leaf in leaves]) for i in range(n)]
        carry, ys = init, []
        for x in items:
            carry, y = f(carry, x)
            ys.append(y)
        if not ys:
            raise ValueError("scan over zero items")
        stacked = self.tree_map(lambda *ls: xp.stack(ls), *ys)
        return carry, stacked

    # ---- autodiff (the reference backend has none) ---------------------------------------
    def _no_autodiff(self, what: str):
        raise CapabilityError(
            f"the {self.name!r} backend has no automatic differentiation, so {what} is unavailable; "
            f"use backend='torch' or backend='jax' (pip install 'otflow[torch]' or 'otflow[jax]')."
        )

    def vjp(self, f: Callable, *primals, has_aux: bool = False):
        """``out, vjp_fn = vjp(f, *primals)``; ``vjp_fn(cotangent) -> tuple`` of cotangents,
        one per primal. With ``has_aux``, ``f`` returns ``(out, aux)`` and the result is
        ``(out, vjp_fn, aux)``. Composes with an enclosing reverse-mode pass."""
        self._no_autodiff("vjp")

    def jvp(self, f: Callable, primals: Sequence, tangents: Sequence):
        """``(out, tangent_out)``: a forward-mode Jacobian-vector product."""
        self._no_autodiff("jvp")

    def value_and_grad(self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
        """Like ``jax.value_and_grad``: returns a function giving ``(value, grads)`` or
        ``((value, aux), grads)``; grads are trees shaped like the chosen arguments."""
        self._no_autodiff("value_and_grad")

    def custom_vjp(self, fun: Callable, fwd: Callable, bwd: Callable) -> Callable:
        """A function computing ``fun(*args)`` whose reverse-mode derivative is ``bwd``."""
        self._no_autodiff("custom_vjp")

    def stop_gradient(self, x):
        """``x`` with no gradient flowing through it (a tree in, a tree out)."""
        return x

    def vmap(self, f: Callable, in_axes=0, out_axes=0) -> Callable:
        """Vectorize ``f`` over an axis of its (array) arguments. Default: a Python loop."""
        xp = self.namespace()

        def mapped(*args):
            axes = in_axes if isinstance(in_axes, (tuple, list)) else (in_axes,) * len(args)
            sizes = {a.shape[ax] for a, ax in zip(args, axes) if ax is not None}
            if len(sizes) != 1:
                raise ValueError(f"vmap: mapped axes have different sizes {sizes}")
            (n,) = sizes
            outs = []
            for i in range(n):
                sl = [a if ax is None else xp.take(a, xp.asarray([i]), axis=ax)[(slice(None),) * ax + (0, ...)]
                      for a, ax in zip(args, axes)]
                outs.append(f(*sl))
            return self.tree_map(lambda *ls: xp.stack(ls, axis=out_axes), *outs)

        return mapped

    def jit(self, f: Callable, *, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
        """Compile ``f`` where the backend can; otherwise return it unchanged."""
        return f

    def checkpoint(self, f: Callable) -> Callable:
        """Rematerialize ``f``'s intermediates in the backward pass instead of storing them."""
        return f

    # ---- native models ------------------------------------------------------------------
    def __getattr__(self, name: str):
        # native modules moved to the model layer; the old method name points there
        if name == "as_field":
            raise AttributeError(
                "Backend.as_field was removed: native modules are wrapped by the model layer, "
                "otflow.cnf.native_field(module, event_shape=..., backend=...)", name=name, obj=self)
        if name == "make_trainer":  # trainers moved to the training layer
            raise AttributeError(
                "Backend.make_trainer was removed: trainers belong to the training layer, "
                "otflow.training.make_trainer(loss_fn, params, optimizer, backend=...)", name=name, obj=self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}", name=name, obj=self)

    # ---- random keys ----------------------------------------------------------------------
    @abc.abstractmethod
    def key(self, seed: int):
        """A random key from an integer seed."""

    @abc.abstractmethod
    def split(self, key, num: int = 2) -> list:
        """``num`` independent keys derived from ``key``."""

    @abc.abstractmethod
    def normal(self, key, shape: tuple[int, ...], *, dtype, device=None):
        """Standard normal draws."""

    def rademacher(self, key, shape: tuple[int, ...], *, dtype, device=None):
        """±1 with equal probability."""
        xp = self.namespace()
        u = self.uniform(key, shape, dtype=dtype, device=device)
        return xp.where(u < 0.5, xp.asarray(-1.0, dtype=dtype), xp.asarray(1.0, dtype=dtype))

    @abc.abstractmethod
    def uniform(self, key, shape: tuple[int, ...], *, dtype, device=None, minval=0.0, maxval=1.0):
        """Uniform draws on [minval, maxval)."""

    def __repr__(self) -> str:
        return f"<otflow backend {self.name!r}>"


def check_loop_kind(kind: str, max_steps: int | None) -> None:
    """Validate a while-loop ``kind`` (for backends implementing ``while_loop``)."""
    if kind not in LOOP_KINDS:
        from .options import unknown_option_message

        raise ValueError(unknown_option_message("loop kind", kind, LOOP_KINDS))
    if kind != "forward" and max_steps is None:
        raise ValueError(f"a {kind!r} while_loop needs max_steps")

