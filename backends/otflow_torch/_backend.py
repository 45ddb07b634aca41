"""``TorchBackend``; the package docstring explains where torch differs from JAX."""
from __future__ import annotations

import functools
from typing import Callable, Sequence, final

import array_api_compat.torch as _xp
import numpy as np
import torch
import torch.nn.functional
import torch.utils.checkpoint

from otflow.base import Backend, BackendUnavailable, conv2d_geometry, make_key, split_key, unknown_option_message

from ._autodiff import (autograd_vjp, custom_vjp, detach, func_jvp, func_vjp, is_wrapped, under_transform,
                        value_and_grad)

__all__ = ["TorchBackend"]

_VJP_IMPLS = ("func", "autograd")


@final
class TorchBackend(Backend):
    """The PyTorch backend (``backend="torch"``).

    ``vjp_impl="autograd"`` (default) computes VJPs with ``torch.autograd.grad(create_graph=True)``,
    faster in eager code (RNODE reference step, 1 thread: 0.027 s against 0.030 s on RK4×4,
    0.037 s against 0.044 s on Dormand–Prince), falling back to ``torch.func`` under
    ``torch.func`` transforms; ``vjp_impl="func"`` always uses ``torch.func.vjp``.
    """

    name = "torch"
    extra = "torch"
    has_autodiff = True
    has_jit = False
    has_vmap = True
    reverse_loop_kinds = ("forward", "bounded", "checkpointed")
    eager = True
    has_conv = True

    def __init__(self, *, vjp_impl: str = "autograd"):
        if vjp_impl not in _VJP_IMPLS:
            raise ValueError(unknown_option_message("vjp_impl", vjp_impl, _VJP_IMPLS))
        self.vjp_impl = vjp_impl

    # ---- arrays and devices ---------------------------------------------------------------
    def namespace(self):
        """``array_api_compat.torch``."""
        return _xp

    def owns(self, x) -> bool:
        """Whether ``x`` is a ``torch.Tensor`` (parameters included)."""
        return isinstance(x, torch.Tensor)

    def asarray(self, x, *, dtype=None, device=None):
        """A tensor from numpy, Python scalars/sequences or a tensor. A tensor already of the
        requested dtype and device is returned as it is (same object, graph kept)."""
        dev = None if device is None else self.device(device)
        if isinstance(x, torch.Tensor):
            return x.to(device=dev, dtype=dtype)  # returns x itself when nothing changes
        if isinstance(x, np.ndarray):
            if not x.flags.writeable or any(s < 0 for s in x.strides):
                x = np.array(x, order="C")  # torch cannot wrap read-only or negatively strided memory
        elif not isinstance(x, (bool, int, float, complex, list, tuple, np.generic)) and hasattr(x, "__array__"):
            x = np.asarray(x)  # other array libraries, through numpy
        return torch.as_tensor(x, dtype=dtype, device=dev)

    def to_numpy(self, x) -> np.ndarray:
        """A host copy, detached from the graph (bfloat16 comes back as float32)."""
        if not isinstance(x, torch.Tensor):
            return np.array(x)
        if x.dtype == torch.bfloat16:
            x = x.float()
        return np.array(x.numpy(force=True), copy=True)

    def device(self, spec=None):
        """A ``torch.device`` from None (torch's default device), "cpu", "cuda", "cuda:N",
        "gpu" / "gpu:N" (aliases of cuda) or a ``torch.device``. A missing GPU raises
        :class:`~otflow.BackendUnavailable`."""
        if spec is None:
            return torch.get_default_device()
        name = spec
        if isinstance(spec, str):
            name = spec.strip().lower()
            if name == "gpu" or name.startswith("gpu:"):
                name = "cuda" + name[3:]
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"unknown torch device {spec!r}; use 'cpu', 'cuda', 'cuda:N', 'gpu' "
                             "or a torch.device") from e
        if dev.type == "cuda":
            _check_cuda(dev, spec)
        elif dev.type == "mps" and not torch.backends.mps.is_available():
            raise BackendUnavailable(f"device {str(dev)!r}: MPS is not available in torch {torch.__version__} "
                                     "on this machine. Use device='cpu'.")
        return dev

    def device_of(self, x):
        """``x.device``."""
        return x.device

    def is_concrete(self, x) -> bool:
        """False for the wrapped tensors ``torch.func`` transforms pass around (their value
        cannot be copied to the host); True otherwise."""
        return not (isinstance(x, torch.Tensor) and is_wrapped(x))

    def check_dtype(self, dtype) -> None:
        """Accept any torch dtype: float16, bfloat16, float32 and float64 all compute
        (the core refuses integer or complex ODE states itself)."""
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"the torch backend expects a torch dtype such as torch.float32, got {dtype!r}")

    # ---- autodiff ------------------------------------------------------------------------
    def stop_gradient(self, x):
        """Detach every tensor leaf of the tree ``x``; other leaves pass through."""
        return detach(x)

    def vjp(self, f: Callable, *primals, has_aux: bool = False):
        """See :meth:`Backend.vjp`. ``vjp_fn`` may be called several times, under
        :meth:`vmap`, and its result differentiated again by an enclosing backward pass
        (with respect to the primals and to tensors ``f`` closes over)."""
        if self.vjp_impl == "autograd" and not under_transform():
            return autograd_vjp(f, primals, has_aux)
        return func_vjp(f, primals, has_aux)

    def jvp(self, f: Callable, primals: Sequence, tangents: Sequence):
        """See :meth:`Backend.jvp` (``torch.func.jvp`` on flattened trees, so dict key
        order does not matter)."""
        return func_jvp(f, primals, tangents)

    def value_and_grad(self, f: Callable, argnums: int | tuple[int, ...] = 0, has_aux: bool = False):
        """See :meth:`Backend.value_and_grad`. Runs ``f`` eagerly (Python control flow is
        fine) on detached copies of the chosen arguments' leaves and returns detached
        values; a leaf that does not influence the value gets a zero gradient.
        Under a ``torch.func`` transform it is ``torch.func.grad_and_value``."""
        return value_and_grad(f, argnums, has_aux)

    def custom_vjp(self, fun: Callable, fwd: Callable, bwd: Callable) -> Callable:
        """See :meth:`Backend.custom_vjp`.

        Without a gradient to compute (grad mode off, or no tensor leaf requiring grad)
        the returned function calls ``fun``. Otherwise it runs one ``torch.autograd.Function``
        whose direct inputs are all tensor leaves of all arguments: its forward calls
        ``fwd`` (grad mode off) and its backward calls ``bwd`` with grad mode on, detaching
        the cotangents ``bwd`` returns. ``None`` as a cotangent (for a whole argument or a
        leaf) means no gradient.

        Only the arguments are differentiated: tensors ``fun`` closes over get no
        gradient through it (pass parameters as an argument). The backward is
        first-order: a double backward sees no second-order term from this function.
        Since ``bwd``'s cotangents are detached, in a first-order backward the :meth:`vjp`
        calls ``bwd`` makes directly keep no graph beyond their own (as under ``no_grad``;
        VJPs nested in the functions they differentiate are tracked as usual): the adjoint's
        backward solve neither builds nor searches graphs it cannot use.

        Auxiliary backward outputs: pass a dummy ``torch.zeros((), requires_grad=True)``
        argument and return the information (e.g. the backward NFE) as its cotangent;
        it arrives in ``dummy.grad`` (or as that argument's ``value_and_grad`` gradient).
        """
        return custom_vjp(fun, fwd, bwd)

    def vmap(self, f: Callable, in_axes=0, out_axes=0) -> Callable:
        """``torch.func.vmap`` with JAX's argument names (``None`` entries: not mapped).
        Random draws inside are refused by torch (draw outside and map over the result)."""
        in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
        out_axes = tuple(out_axes) if isinstance(out_axes, list) else out_axes
        return torch.func.vmap(f, in_dims=in_axes, out_dims=out_axes)

    def jit(self, f: Callable, *, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
        """Returns ``f`` unchanged (``has_jit`` is False)."""
        return f

    def checkpoint(self, f: Callable) -> Callable:
        """``torch.utils.checkpoint.checkpoint(f, ..., use_reentrant=False)``."""

        @functools.wraps(f)
        def checkpointed(*args, **kwargs):
            return torch.utils.checkpoint.checkpoint(f, *args, use_reentrant=False, **kwargs)

        return checkpointed

    # ---- convolution -------------------------------------------------------------------
    def conv2d(self, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
        """``torch.nn.functional.conv2d`` on arguments checked by
        :func:`~otflow.base.conv2d_geometry`; see :meth:`Backend.conv2d`. For an
        even kernel, ``"same"`` puts the odd zero at the bottom and right, as torch does."""
        geometry = conv2d_geometry(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                   groups=groups)
        (top, bottom), (left, right) = geometry.padding
        if top != bottom or left != right:
            x = torch.nn.functional.pad(x, (left, right, top, bottom))
            top = left = 0
        return torch.nn.functional.conv2d(x, weight, bias, stride=geometry.stride, padding=(top, left),
                                          dilation=geometry.dilation, groups=geometry.groups)

    # ---- random keys ---------------------------------------------------------------------
    def key(self, seed: int) -> int:
        """An integer key (see ``otflow.base.keys``)."""
        return make_key(seed)

    def split(self, key, num: int = 2) -> list[int]:
        """``num`` independent integer keys derived from ``key``."""
        return split_key(key, num)

    def _generator(self, key, device):
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"expected an integer key (from backend.key(seed)), got {type(key).__name__}")
        dev = self.device(device)
        return torch.Generator(device=dev).manual_seed(int(key)), dev

    def normal(self, key, shape, *, dtype, device=None):
        """Standard normal draws, a pure function of (key, shape, dtype, device)."""
        gen, dev = self._generator(key, device)
        return torch.randn(tuple(shape), generator=gen, dtype=dtype, device=dev)

    def uniform(self, key, shape, *, dtype, device=None, minval=0.0, maxval=1.0):
        """Uniform draws on [minval, maxval)."""
        gen, dev = self._generator(key, device)
        return torch.empty(tuple(shape), dtype=dtype, device=dev).uniform_(minval, maxval, generator=gen)

    def rademacher(self, key, shape, *, dtype, device=None):
        """±1 with equal probability."""
        gen, dev = self._generator(key, device)
        return torch.randint(0, 2, tuple(shape), generator=gen, dtype=dtype, device=dev).mul_(2).sub_(1)

    def __repr__(self) -> str:
        impl = "" if self.vjp_impl == "autograd" else f" (vjp_impl={self.vjp_impl!r})"
        return f"<otflow backend 'torch'{impl}>"


def _check_cuda(dev, spec) -> None:
    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            raise BackendUnavailable(
                f"device {spec!r}: CUDA is not available in this torch build (torch {torch.__version__} "
                "was built without CUDA). Use device='cpu', or install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/).")
        raise BackendUnavailable(
            f"device {spec!r}: torch {torch.__version__} has CUDA support but finds no GPU "
            "(check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES). Use device='cpu'.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BackendUnavailable(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
