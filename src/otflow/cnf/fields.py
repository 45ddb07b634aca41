"""Velocity fields ``v(t, x)`` as pure functions of an explicit parameter tree.

A field is an object with ``init(backend, key, *, dtype, device) -> params`` and
``apply(params, t, x) -> v``, where ``x`` has shape ``(batch, *event_shape)``,
``t`` is a 0-d array, ``v`` has the shape of ``x``, and rows are independent
(row ``i`` of ``v`` depends only on row ``i`` of ``x``: the divergence
estimators rely on it). The core's :class:`MLP` is written once against the
array API; a pure function with its parameters is a :class:`FunctionField`.

Native modules of a framework (a ``torch.nn.Module`` called as ``module(t, x)``, an
Equinox module) belong to this model layer, not to the backend protocol:
:func:`native_field` wraps one into a :class:`FunctionField` through the adapter
registered for the backend — from the ``otflow.native_fields`` entry-point group
(``torch = "otflow_torch._fields:as_field"``), or by :func:`register_native_field`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

from array_api_compat import array_namespace

from ..base import Backend, get_backend
from ..base.native import native
from ..base.options import unknown_option_message

__all__ = ["MLP", "FunctionField", "VelocityField", "ACTIVATIONS", "CONDITIONINGS", "module_event_shape",
           "native_field", "register_native_field", "NATIVE_FIELD_GROUP"]

#: the entry-point group naming, per backend, the adapter of its native modules
NATIVE_FIELD_GROUP = "otflow.native_fields"

ACTIVATIONS = ("tanh", "softplus", "swish")
CONDITIONINGS = ("concatsquash", "concat", "ignore")


class VelocityField:
    """Abstract velocity field; concrete fields are final classes."""

    #: the feature shape of one sample (``(dim,)`` for tabular data)
    event_shape: tuple[int, ...]

    def init(self, backend, key, *, dtype, device=None):
        """Initial parameters.

        :param backend: the backend that creates the arrays.
        :param key: a random key of the backend.
        :param dtype: the floating dtype of the parameters.
        :param device: where they live (the backend's default when None).
        :returns: the parameter tree.
        """
        raise NotImplementedError

    #: the length of the context vector ``c`` the field is conditioned on (0: unconditional)
    context_dim: int = 0

    def apply(self, params, t, x, context=None):
        """The velocity ``v(t, x)`` (or ``v(t, x | c)`` for a conditional field).

        :param params: the parameter tree.
        :param t: the time, a 0-d array.
        :param x: the points, shape ``(batch, *event_shape)``.
        :param context: a conditional field's context, shape ``(batch, context_dim)``
            (row ``i`` conditions row ``i`` of ``x``); None for an unconditional field.
        :returns: ``v``, shaped like ``x``; row ``i`` depends only on row ``i`` of ``x``
            (and of ``context``).
        """
        raise NotImplementedError

    def config(self) -> dict:
        """A JSON-serializable description from which the field can be rebuilt."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved; rebuild it in code")


def _sigmoid(xp, x):
    fused = native(xp, "sigmoid")  # one kernel where the backend registered one (torch, JAX)
    if fused is not None:
        return fused(x)
    # exp(−|x|) never overflows: 1/(1 + exp(−x)) would give exp(−x) = inf below x ≈ −88 in
    # float32, and its gradient inf/inf = NaN (through xp.where too, whose unselected
    # branch still enters the gradient)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _activate(xp, name: str, x):
    if name == "tanh":
        return xp.tanh(x)
    if name == "softplus":
        return xp.logaddexp(x, xp.zeros_like(x))
    fused = native(xp, "silu")
    # swish with β = 1 (FFJORD's swish learns β; here it is fixed)
    return fused(x) if fused is not None else x * _sigmoid(xp, x)


@dataclass(frozen=True)
class MLP(VelocityField):
    """The FFJORD/RNODE fully connected velocity field.

    ``dim → hidden[0] → … → hidden[-1] → dim`` with ``activation`` between layers and
    time entering every layer through ``conditioning``:

    * ``"concatsquash"`` (FFJORD's ConcatSquashLinear): ``(W x + b) · σ(a t + c) + d t``;
    * ``"concat"`` (ConcatLinear): ``W [t, x] + b``;
    * ``"ignore"``: ``W x + b`` (autonomous field).

    With ``context_dim > 0`` the field is conditional, ``v(t, x | c)`` (the context
    conditioning of FFJORD's conditional models and of zuko's ``context``): every layer
    also sees the context ``c``, shape ``(batch, context_dim)``. ConcatSquash layers take
    it in their gate and their shift, ``(W x + b)·σ(a t + G c + g) + d t + H c``; ``"concat"``
    and ``"ignore"`` layers take it concatenated to their input, ``W [t, c, x] + b`` and
    ``W [c, x] + b``. Row ``i`` of ``v`` depends on row ``i`` of ``x`` and ``c`` only, so
    the divergence (taken with respect to ``x``, ``c`` held fixed) is estimated as for an
    unconditional field. With ``context_dim = 0`` (the default) the parameters and the
    numbers are those of the unconditional field exactly.

    Weights are initialized like ``torch.nn.Linear`` (uniform on ±1/√fan_in, fan_in of
    the time gate = 1). With ``zero_last=True`` (RNODE's default) the last layer starts
    at zero, so the initial flow is the identity and the first solver steps are cheap.
    Inputs of shape ``(batch, *event_shape)`` are flattened to ``(batch, dim)``.

    :param event_shape: the shape of one sample (an int for vectors).
    :param hidden: the hidden widths.
    :param activation: one of :data:`ACTIVATIONS`.
    :param conditioning: one of :data:`CONDITIONINGS`.
    :param zero_last: start the last layer at zero.
    :param context_dim: the length of the context vector (0: an unconditional field).
    """

    event_shape: tuple[int, ...]
    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    conditioning: str = "concatsquash"
    zero_last: bool = True
    context_dim: int = 0
    dim: int = field(init=False)

    def __post_init__(self):
        shape = (self.event_shape,) if isinstance(self.event_shape, int) else tuple(self.event_shape)
        if not shape or any((not isinstance(s, int)) or s <= 0 for s in shape):
            raise ValueError(f"MLP: event_shape must be positive ints, got {self.event_shape!r}")
        object.__setattr__(self, "event_shape", shape)
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        if any((not isinstance(h, int)) or h <= 0 for h in hidden):
            raise ValueError(f"MLP: hidden widths must be positive ints, got {self.hidden!r}")
        object.__setattr__(self, "hidden", hidden)
        if self.activation not in ACTIVATIONS:
            raise ValueError(unknown_option_message("activation", self.activation, ACTIVATIONS))
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(unknown_option_message("conditioning", self.conditioning, CONDITIONINGS))
        if isinstance(self.context_dim, bool) or not isinstance(self.context_dim, int) or self.context_dim < 0:
            raise ValueError(f"MLP: context_dim must be an int >= 0 (0: no context), got {self.context_dim!r}")
        object.__setattr__(self, "dim", math.prod(shape))

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.dim, *self.hidden, self.dim)

    def init(self, backend, key, *, dtype, device=None):
        xp = backend.namespace()
        widths = self.widths
        n_layers = len(widths) - 1
        cdim = self.context_dim
        per_layer = 7 if cdim else 5  # unconditional fields draw exactly as before
        keys = backend.split(key, per_layer * n_layers)
        layers = []
        for i, (din, dout) in enumerate(zip(widths[:-1], widths[1:])):
            k = keys[per_layer * i: per_layer * i + per_layer]
            fan_in = din + (1 if self.conditioning == "concat" else 0)
            if cdim and self.conditioning != "concatsquash":
                fan_in += cdim
            bound = 1.0 / math.sqrt(fan_in)
            last_zero = self.zero_last and i == n_layers - 1

            def u(key, shape, b, zero=False):
                if zero:
                    return xp.zeros(shape, dtype=dtype, device=device)
                return backend.uniform(key, shape, dtype=dtype, device=device, minval=-b, maxval=b)

            layer = {"weight": u(k[0], (fan_in, dout), bound, last_zero), "bias": u(k[1], (dout,), bound, last_zero)}
            if self.conditioning == "concatsquash":
                layer["gate_weight"] = u(k[2], (dout,), 1.0)
                layer["gate_bias"] = u(k[3], (dout,), 1.0)
                layer["time_bias"] = u(k[4], (dout,), 1.0, last_zero)
                if cdim:
                    c_bound = 1.0 / math.sqrt(cdim)
                    layer["context_gate"] = u(k[5], (cdim, dout), c_bound)
                    layer["context_bias"] = u(k[6], (cdim, dout), c_bound, last_zero)
            layers.append(layer)
        return tuple(layers)

    def apply(self, params, t, x, context=None):
        xp = array_namespace(x)
        batch = x.shape[0]
        c = self._checked_context(xp, context, batch)
        h = xp.reshape(x, (batch, self.dim)) if len(self.event_shape) > 1 else x
        n = len(params)
        for i, layer in enumerate(params):
            if self.conditioning == "concat":
                tt = xp.zeros((batch, 1), dtype=h.dtype, device=_device(h)) + t
                h = xp.concat([tt, h] if c is None else [tt, c, h], axis=1) @ layer["weight"] + layer["bias"]
            elif self.conditioning == "ignore":
                h = (h if c is None else xp.concat([c, h], axis=1)) @ layer["weight"] + layer["bias"]
            else:
                gate = layer["gate_weight"] * t + layer["gate_bias"]
                if c is None:
                    h = (h @ layer["weight"] + layer["bias"]) * _sigmoid(xp, gate) + layer["time_bias"] * t
                else:
                    h = ((h @ layer["weight"] + layer["bias"]) * _sigmoid(xp, gate + c @ layer["context_gate"])
                         + layer["time_bias"] * t + c @ layer["context_bias"])
            if i < n - 1:
                h = _activate(xp, self.activation, h)
        return xp.reshape(h, x.shape) if len(self.event_shape) > 1 else h

    def _checked_context(self, xp, context, batch: int):
        """The context as the layers use it, or None; a clear error for a missing, unexpected
        or wrong-shaped one (shapes are static, so this runs under tracing too)."""
        if not self.context_dim:
            if context is not None:
                raise ValueError("this MLP is unconditional (context_dim=0) but was given a context; build it "
                                 "with MLP(..., context_dim=<length of c>) to condition on one, or pass no context")
            return None
        if context is None:
            raise ValueError(f"this MLP is conditional (context_dim={self.context_dim}) and needs a context: "
                             f"apply(params, t, x, context=c) with c of shape (batch, {self.context_dim})")
        if tuple(context.shape) != (batch, self.context_dim):
            raise ValueError(f"context must have shape (batch, context_dim) = ({batch}, {self.context_dim}), "
                             f"got {tuple(context.shape)}")
        return context

    def config(self) -> dict:
        cfg = {"type": "MLP", "event_shape": list(self.event_shape), "hidden": list(self.hidden),
               "activation": self.activation, "conditioning": self.conditioning, "zero_last": self.zero_last}
        if self.context_dim:  # unconditional fields keep the description earlier versions wrote
            cfg["context_dim"] = self.context_dim
        return cfg


def _device(x):
    from array_api_compat import device

    return device(x)


@dataclass(frozen=True, eq=False)
class FunctionField(VelocityField):
    """A user's field: ``apply(params, t, x)`` with the given initial ``params`` tree.

    :func:`native_field` builds these from native modules: torch modules are called
    functionally on their own parameters, Equinox modules are split into arrays and
    static parts.

    :param apply_fn: ``apply_fn(params, t, x) -> v``.
    :param initial_params: the parameter tree :meth:`init` returns.
    :param event_shape: the shape of one sample.
    :param name: shown in messages (a module's class name).
    """

    apply_fn: Callable[[Any, Any, Any], Any]
    initial_params: Any
    event_shape: tuple[int, ...]
    name: str = "user field"

    def init(self, backend, key, *, dtype, device=None):
        return self.initial_params

    def apply(self, params, t, x):
        return self.apply_fn(params, t, x)


def module_event_shape(module, event_shape, name: str, example: str) -> tuple[int, ...]:
    """The event shape of a native module used as a field (for native-field adapters).

    :param module: the module.
    :param event_shape: the shape given by the caller, or None.
    :param name: the module's name, for messages.
    :param example: the call to show in the message (it names the backend).
    :returns: ``event_shape`` as given, or else the module's own ``event_shape`` attribute.
    :raises ValueError: when neither is there, they differ, or the shape is not positive ints.
    """
    own = getattr(module, "event_shape", None)
    if event_shape is None and own is None:
        raise ValueError(
            f"event_shape= is needed to use the module {name} as a velocity field: the shape of one sample "
            f"cannot be read off a module. Pass it, e.g. {example}, or give the module an event_shape attribute.")
    shape = _as_event_shape(event_shape if event_shape is not None else own, name)
    if event_shape is not None and own is not None and _as_event_shape(own, name) != shape:
        raise ValueError(f"event_shape={shape} differs from {name}.event_shape = {tuple(own)!r}")
    return shape


def _as_event_shape(value, name: str) -> tuple[int, ...]:
    import numpy as np

    shape = (value,) if isinstance(value, (int, np.integer)) else value
    try:
        shape = tuple(shape)
    except TypeError:
        shape = None
    if not shape or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
        raise ValueError(f"event_shape of {name} must be a tuple of positive ints such as (2,), got {value!r}")
    return tuple(int(s) for s in shape)


def field_from_config(cfg: dict) -> VelocityField:
    """Rebuild a field saved with :meth:`VelocityField.config`.

    :param cfg: the saved configuration.
    :returns: the field.
    :raises ValueError: for a field type that cannot be rebuilt.
    """
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "MLP":
        cfg["event_shape"] = tuple(cfg["event_shape"])
        cfg["hidden"] = tuple(cfg["hidden"])
        return MLP(**cfg)
    if kind == "ConvField":
        from .conv_field import ConvField  # conv_field imports this module

        cfg["event_shape"] = tuple(cfg["event_shape"])
        cfg["widths"] = tuple(cfg["widths"])
        return ConvField(**cfg)
    raise ValueError(f"cannot rebuild a velocity field of type {kind!r}")


# ------------------------------------------------------------------------------------------
# native modules


#: adapters by backend name: registered ones, and those looked up in the entry-point group
#: (None records that a backend has none, so the group is read once per backend)
_native_adapters: dict[str, Callable | None] = {}


def register_native_field(name: str, adapter: Callable) -> None:
    """Register the adapter of a backend's native modules (for third-party backends; torch
    and JAX register theirs through the ``otflow.native_fields`` entry-point group).

    :param name: the backend's registry name.
    :param adapter: ``adapter(obj, params=None, *, event_shape=None)`` returning a
        :class:`FunctionField` for a native module of the backend and ``None`` for any
        other object.
    :raises TypeError: when ``adapter`` is not callable.
    """
    if not callable(adapter):
        raise TypeError(f"register_native_field: the adapter must be callable, got {type(adapter).__name__}")
    _native_adapters[name] = adapter


def _native_adapter(name: str) -> Callable | None:
    if name not in _native_adapters:
        found = [ep for ep in metadata.entry_points(group=NATIVE_FIELD_GROUP) if ep.name == name]
        _native_adapters[name] = found[0].load() if found else None
    return _native_adapters[name]


def native_field(obj, params=None, *, event_shape=None, backend: str | Backend) -> FunctionField | None:
    """Wrap a native module of ``backend`` into a :class:`FunctionField` whose parameters
    are an explicit tree (what the solver, the adjoint and the optimizers need).

    torch: a ``torch.nn.Module`` called as ``module(t, x)`` through
    ``torch.func.functional_call`` on its own ``nn.Parameter`` objects (gradients reach
    their ``.grad``; buffers stay the module's). JAX: an Equinox module split with
    ``eqx.partition(model, eqx.is_array)``, called with the whole batch.

    :param obj: the module (any object: what is not a native module of the backend gives None).
    :param params: must be None for a module (it carries its own parameters).
    :param event_shape: the shape of one sample, e.g. ``(2,)``; required unless the module
        has an ``event_shape`` attribute.
    :param backend: the backend (name or object) whose modules to recognize.
    :returns: the field, or None when ``obj`` is not a native module of the backend (or the
        backend has no adapter).
    :raises ValueError: for ``params`` given with a module, or a missing or bad event shape.
    """
    adapter = _native_adapter(get_backend(backend).name)
    return None if adapter is None else adapter(obj, params, event_shape=event_shape)
