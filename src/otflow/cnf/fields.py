"""Velocity fields ``v(t, x)`` as pure functions of an explicit parameter tree.

A field is an object with ``init(backend, key, *, dtype, device) -> params`` and
``apply(params, t, x) -> v``, where ``x`` has shape ``(batch, *event_shape)``,
``t`` is a 0-d array, ``v`` has the shape of ``x``, and rows are independent
(row ``i`` of ``v`` depends only on row ``i`` of ``x``: the divergence
estimators rely on it). The core's :class:`MLP` is written once against the
array API; a native module of a backend (a ``torch.nn.Module`` called as
``f(t, x)``, an Equinox module, or a pure function with its parameters) is
wrapped by the backend into a :class:`FunctionField`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from array_api_compat import array_namespace

from ..base.options import unknown_option_message

__all__ = ["MLP", "FunctionField", "VelocityField", "ACTIVATIONS", "CONDITIONINGS"]

ACTIVATIONS = ("tanh", "softplus", "swish")
CONDITIONINGS = ("concatsquash", "concat", "ignore")


class VelocityField:
    """Abstract velocity field; concrete fields are final classes."""

    #: the feature shape of one sample (``(dim,)`` for tabular data)
    event_shape: tuple[int, ...]

    def init(self, backend, key, *, dtype, device=None):
        raise NotImplementedError

    def apply(self, params, t, x):
        raise NotImplementedError

    def config(self) -> dict:
        """A JSON-serializable description from which the field can be rebuilt."""
        raise NotImplementedError(f"{type(self).__name__} cannot be saved; rebuild it in code")


def _sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def _activate(xp, name: str, x):
    if name == "tanh":
        return xp.tanh(x)
    if name == "softplus":
        return xp.logaddexp(x, xp.zeros_like(x))
    return x * _sigmoid(xp, x)  # swish with β = 1 (FFJORD's swish learns β; here it is fixed)


@dataclass(frozen=True)
class MLP(VelocityField):
    """The FFJORD/RNODE fully connected velocity field.

    ``dim → hidden[0] → … → hidden[-1] → dim`` with ``activation`` between layers and
    time entering every layer through ``conditioning``:

    * ``"concatsquash"`` (FFJORD's ConcatSquashLinear): ``(W x + b) · σ(a t + c) + d t``;
    * ``"concat"`` (ConcatLinear): ``W [t, x] + b``;
    * ``"ignore"``: ``W x + b`` (autonomous field).

    Weights are initialized like ``torch.nn.Linear`` (uniform on ±1/√fan_in, fan_in of
    the time gate = 1). With ``zero_last=True`` (RNODE's default) the last layer starts
    at zero, so the initial flow is the identity and the first solver steps are cheap.
    Inputs of shape ``(batch, *event_shape)`` are flattened to ``(batch, dim)``.
    """

    event_shape: tuple[int, ...]
    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    conditioning: str = "concatsquash"
    zero_last: bool = True
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
        object.__setattr__(self, "dim", math.prod(shape))

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.dim, *self.hidden, self.dim)

    def init(self, backend, key, *, dtype, device=None):
        xp = backend.namespace()
        widths = self.widths
        n_layers = len(widths) - 1
        keys = backend.split(key, 5 * n_layers)
        layers = []
        for i, (din, dout) in enumerate(zip(widths[:-1], widths[1:])):
            k = keys[5 * i: 5 * i + 5]
            fan_in = din + (1 if self.conditioning == "concat" else 0)
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
            layers.append(layer)
        return tuple(layers)

    def apply(self, params, t, x):
        xp = array_namespace(x)
        batch = x.shape[0]
        h = xp.reshape(x, (batch, self.dim)) if len(self.event_shape) > 1 else x
        n = len(params)
        for i, layer in enumerate(params):
            if self.conditioning == "concat":
                tt = xp.zeros((batch, 1), dtype=h.dtype, device=_device(h)) + t
                h = xp.concat([tt, h], axis=1) @ layer["weight"] + layer["bias"]
            else:
                h = h @ layer["weight"] + layer["bias"]
                if self.conditioning == "concatsquash":
                    h = h * _sigmoid(xp, layer["gate_weight"] * t + layer["gate_bias"]) + layer["time_bias"] * t
            if i < n - 1:
                h = _activate(xp, self.activation, h)
        return xp.reshape(h, x.shape) if len(self.event_shape) > 1 else h

    def config(self) -> dict:
        return {"type": "MLP", "event_shape": list(self.event_shape), "hidden": list(self.hidden),
                "activation": self.activation, "conditioning": self.conditioning, "zero_last": self.zero_last}


def _device(x):
    from array_api_compat import device

    return device(x)


@dataclass(frozen=True, eq=False)
class FunctionField(VelocityField):
    """A user's field: ``apply(params, t, x)`` with the given initial ``params`` tree.

    Backends build these from native modules (``backend.as_field(module)``): torch
    modules are called functionally on their own parameters, Equinox modules are
    split into arrays and static parts.
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
    """The event shape of a native module used as a field: ``event_shape`` as given, or else the
    module's own ``event_shape`` attribute; a clear error when neither is there or they differ.
    ``example`` shows the call to make (it names the backend)."""
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
    """Rebuild a field saved with :meth:`VelocityField.config`."""
    cfg = dict(cfg)
    kind = cfg.pop("type", None)
    if kind == "MLP":
        cfg["event_shape"] = tuple(cfg["event_shape"])
        cfg["hidden"] = tuple(cfg["hidden"])
        return MLP(**cfg)
    raise ValueError(f"cannot rebuild a velocity field of type {kind!r}")
