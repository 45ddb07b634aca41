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
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

import numpy as np

from . import tree as _tree
from .errors import CapabilityError

__all__ = ["Backend", "LOOP_KINDS", "check_loop_kind", "Conv2dGeometry", "conv2d_geometry"]

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
    #: ``conv2d`` works, so convolutional velocity fields can run
    has_conv: ClassVar[bool] = False

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

    # ---- convolution (the array API has none) ---------------------------------------------
    def conv2d(self, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
        """2-D cross-correlation of a batch of images, the layer of convolutional velocity fields.

        FFJORD's multiscale image flows (Grathwohl et al., ICLR 2019), which RNODE trains
        (Finlay et al., ICML 2020), use small convolutional networks as velocity fields; the
        array API has no convolution, so the backend supplies it. It is cross-correlation
        (the kernel is not flipped), as ``torch.nn.functional.conv2d`` and
        ``jax.lax.conv_general_dilated`` compute it: for output channel ``o`` of group ``g``,
        ``out[n, o, i, j] = bias[o] + sum over c, p, q of weight[o, c, p, q] *
        x_padded[n, g * C_in // groups + c, i * stride_h + p * dilation_h, j * stride_w + q * dilation_w]``.
        Backends with ``has_conv`` differentiate it (``vjp``, ``jvp``, ``vmap``) and compile it
        (``jit``). On GPUs, float32 follows the framework's default precision (torch's cuDNN and
        XLA may use TF32).

        :param x: images of shape ``(N, C_in, H, W)``.
        :param weight: kernels of shape ``(C_out, C_in // groups, kH, kW)``, of ``x``'s dtype.
        :param bias: ``(C_out,)`` added to every output pixel, of ``x``'s dtype, or None.
        :param stride: the step between windows, an int or a ``(height, width)`` pair, at least 1.
        :param padding: zeros added around ``x``: an int or a ``(height, width)`` pair (on both
            sides), ``"valid"`` (none) or ``"same"`` (stride 1 only; the output has the input's
            size: ``dilation * (k - 1)`` zeros per axis, split evenly, the odd one at the bottom
            or right for an even kernel, as torch and XLA do).
        :param dilation: the spacing of kernel taps, an int or a ``(height, width)`` pair, at least 1.
        :param groups: the channels are split into this many groups convolved separately; it
            divides ``C_in`` and ``C_out``.
        :returns: an array of shape ``(N, C_out, H_out, W_out)`` in ``x``'s dtype, with
            ``H_out = (H + pad_top + pad_bottom - dilation_h * (kH - 1) - 1) // stride_h + 1``
            (likewise ``W_out``).
        :raises CapabilityError: on a backend without convolution (``has_conv`` is False: the
            numpy and array-api-strict reference backends); use ``backend="torch"`` or ``"jax"``.
        :raises ValueError: wrong ranks, channel counts, groups, bias shape, stride, padding or
            dilation, or a kernel larger than the padded image (see :func:`conv2d_geometry`).
        :raises TypeError: ``weight`` or ``bias`` has a dtype other than ``x``'s.
        """
        raise CapabilityError(
            f"the {self.name!r} backend has no 2-D convolution (has_conv is False), so it cannot run "
            "convolutional velocity fields; use backend='torch' or backend='jax' "
            "(pip install 'otflow[torch]' or 'otflow[jax]')."
        )

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


class Conv2dGeometry(NamedTuple):
    """A checked :meth:`Backend.conv2d` call, every spatial setting resolved to pairs."""

    #: ``(height, width)`` steps between windows
    stride: tuple[int, int]
    #: ``((top, bottom), (left, right))`` zeros added around the image
    padding: tuple[tuple[int, int], tuple[int, int]]
    #: ``(height, width)`` spacing of the kernel taps
    dilation: tuple[int, int]
    #: number of channel groups
    groups: int
    #: ``(N, C_out, H_out, W_out)``
    out_shape: tuple[int, int, int, int]


def conv2d_geometry(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1) -> Conv2dGeometry:
    """Check the arguments of :meth:`Backend.conv2d` and resolve them to pairs.

    Backends implementing ``conv2d`` call it first, so every backend refuses the same
    input with the same message. It reads only shapes and dtypes (never values), so it
    works on tracers and costs no device work.

    :param x: images ``(N, C_in, H, W)``.
    :param weight: kernels ``(C_out, C_in // groups, kH, kW)``.
    :param bias: ``(C_out,)`` or None.
    :param stride: as in :meth:`Backend.conv2d`.
    :param padding: as in :meth:`Backend.conv2d`.
    :param dilation: as in :meth:`Backend.conv2d`.
    :param groups: as in :meth:`Backend.conv2d`.
    :returns: the resolved :class:`Conv2dGeometry`.
    :raises ValueError: a wrong rank, channel count, groups, bias shape, stride, padding or
        dilation, or a kernel that does not fit in the padded image.
    :raises TypeError: ``weight`` or ``bias`` has a dtype other than ``x``'s, or a setting is
        not an int.
    """
    _check_conv2d_shapes(tuple(x.shape), tuple(weight.shape), None if bias is None else tuple(bias.shape), groups)
    _check_conv2d_dtypes(x, weight, bias)
    stride_hw = _conv2d_pair("stride", stride, minimum=1)
    dilation_hw = _conv2d_pair("dilation", dilation, minimum=1)
    kernel_hw = tuple(weight.shape[2:])
    padding_hw = _conv2d_padding(padding, kernel_hw, dilation_hw, stride_hw)
    out_hw = tuple(_conv2d_out_size(axis, x.shape[2 + i], padding_hw[i], kernel_hw[i], stride_hw[i], dilation_hw[i])
                   for i, axis in enumerate(("height", "width")))
    return Conv2dGeometry(stride_hw, padding_hw, dilation_hw, groups, (x.shape[0], weight.shape[0], *out_hw))


def _check_conv2d_shapes(x_shape, weight_shape, bias_shape, groups) -> None:
    if len(x_shape) != 4:
        raise ValueError(f"conv2d: x must have shape (N, C_in, H, W), got shape {x_shape}; give a single image "
                         "a batch axis of length 1")
    if len(weight_shape) != 4 or min(weight_shape[2:]) < 1:
        raise ValueError(f"conv2d: weight must have shape (C_out, C_in // groups, kH, kW) with kH, kW >= 1, "
                         f"got shape {weight_shape}")
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"conv2d: groups must be an int, got {groups!r}")
    c_in, (c_out, c_per_group) = x_shape[1], weight_shape[:2]
    if groups < 1 or c_in % groups or c_out % groups:
        raise ValueError(f"conv2d: groups={groups} must be at least 1 and divide both the input channels "
                         f"({c_in}) and the output channels ({c_out})")
    if c_per_group * groups != c_in:
        raise ValueError(f"conv2d: x has {c_in} channels but weight of shape {weight_shape} with groups={groups} "
                         f"expects {c_per_group * groups}; weight's second axis must be C_in // groups = "
                         f"{c_in // groups}")
    if bias_shape is not None and bias_shape != (c_out,):
        raise ValueError(f"conv2d: bias must have shape (C_out,) = ({c_out},), got shape {bias_shape}")


def _check_conv2d_dtypes(x, weight, bias) -> None:
    for name, array in (("weight", weight), ("bias", bias)):
        if array is not None and array.dtype != x.dtype:
            raise TypeError(f"conv2d: {name} has dtype {array.dtype} but x has {x.dtype}; cast one of them "
                            "(backend.asarray(array, dtype=...)) so that all three agree")


def _conv2d_pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a ``(height, width)`` pair."""
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    wanted = f"conv2d: {name} must be an int >= {minimum} or a (height, width) pair of them, got {value!r}"
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
        raise TypeError(wanted)
    if min(pair) < minimum:
        raise ValueError(wanted)
    return int(pair[0]), int(pair[1])


_PADDING_MODES = ("same", "valid")


def _conv2d_padding(padding, kernel_hw, dilation_hw, stride_hw) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` zeros for a padding spec."""
    if not isinstance(padding, str):
        pad_h, pad_w = _conv2d_pair("padding", padding, minimum=0)
        return (pad_h, pad_h), (pad_w, pad_w)
    if padding not in _PADDING_MODES:
        from .options import unknown_option_message

        raise ValueError("conv2d: " + unknown_option_message("padding", padding, _PADDING_MODES)
                         + " Or give an int or a (height, width) pair.")
    if padding == "valid":
        return (0, 0), (0, 0)
    if stride_hw != (1, 1):
        raise ValueError(f"conv2d: padding='same' needs stride 1 (got stride={stride_hw}): only then does the "
                         "output keep the input's size; give the padding as numbers instead, e.g. padding=k // 2")
    totals = [d * (k - 1) for k, d in zip(kernel_hw, dilation_hw)]
    (top, left) = (t // 2 for t in totals)
    return (top, totals[0] - top), (left, totals[1] - left)


def _conv2d_out_size(axis: str, size: int, pads: tuple[int, int], kernel: int, stride: int, dilation: int) -> int:
    span = dilation * (kernel - 1) + 1
    padded = size + pads[0] + pads[1]
    if padded < span:
        raise ValueError(f"conv2d: along the {axis} the kernel spans {span} pixels (size {kernel}, dilation "
                         f"{dilation}) but the padded image has only {padded}; pad more or use a smaller kernel")
    return (padded - span) // stride + 1
