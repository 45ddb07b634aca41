"""The convolutional velocity field of FFJORD's image models, on ``(C, H, W)`` states.

FFJORD (Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, ICLR 2019) and RNODE
(Finlay, Jacobsen, Nurbekyan & Oberman, ICML 2020) model images with a multiscale stack of
CNF blocks whose velocity fields are small convolutional nets (FFJORD's ``ODEnet`` with
``conv=True``): 3×3 convolutions with "same" padding, a softplus between layers, time
entering every layer. :class:`ConvField` is that net, written once against the array API;
the convolution itself comes from the backend (``backend.conv2d``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from array_api_compat import array_namespace

from ..base import Backend, CapabilityError, get_backend
from ..base.options import unknown_option_message
from .fields import ACTIVATIONS, CONDITIONINGS, VelocityField, _activate, _sigmoid

__all__ = ["ConvField", "KERNEL_SIZE"]

#: the side of every convolution kernel (FFJORD's ``stride=1`` layers: 3×3, padding 1)
KERNEL_SIZE = 3

#: the backend that computes on each array type (filled on first use): ``apply`` finds its
#: backend from ``x`` once per array type instead of asking the registry at every evaluation
_BACKEND_OF_ARRAY_TYPE: dict[type, Backend] = {}


def _conv_backend(x) -> Backend:
    """The backend owning ``x``; it must have a convolution (``has_conv``)."""
    kind = type(x)
    backend = _BACKEND_OF_ARRAY_TYPE.get(kind)
    if backend is None:
        backend = get_backend(like=x)
        if not backend.has_conv:
            raise CapabilityError(
                f"ConvField needs a 2-D convolution (backend.conv2d), which the {backend.name!r} backend does not "
                "provide; pass torch or JAX arrays (pip install 'otflow[torch]' or 'otflow[jax]').")
        _BACKEND_OF_ARRAY_TYPE[kind] = backend
    return backend


def _positive_ints(value, what: str) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"ConvField: {what} must be positive ints, got {value!r}")
    return values


@dataclass(frozen=True)
class ConvField(VelocityField):
    """FFJORD's convolutional ODE net: ``C → widths[0] → … → widths[-1] → C`` channels.

    Every layer is a 3×3 convolution with "same" padding (the spatial size is kept), with
    ``activation`` between layers and time entering every layer through ``conditioning``,
    per output channel ``o``:

    * ``"concat"`` (FFJORD's ``ConcatConv2d``, the default of its multiscale ``ODENVP``):
      ``conv([t, h]) + b``, the time a constant input channel placed first;
    * ``"concatsquash"`` (``ConcatSquashConv2d``): ``(conv(h) + b)·σ(a·t + c) + d·t``;
    * ``"ignore"``: ``conv(h) + b`` (an autonomous field).

    Weights are initialized like ``torch.nn.Conv2d`` (uniform on ±1/√fan_in with
    ``fan_in = in_channels·3·3``; the time gate and time bias like ``torch.nn.Linear(1, ·)``,
    uniform on ±1). With ``zero_last=True`` the last layer starts at zero — weight, bias and
    time bias, so ``v ≡ 0`` and the initial flow is the identity, as for :class:`~otflow.MLP`
    (FFJORD zeroes the last layer's weights and keeps its conv bias, so its initial ``v`` is a
    constant per channel). There is no normalization across the batch, so
    rows are independent and every divergence estimator applies.

    The convolution is the backend's ``conv2d(x, weight, bias, stride=1, padding="same")``
    on ``(batch, channels, H, W)`` arrays with ``(out, in, 3, 3)`` weights. :meth:`apply`
    receives no backend: it takes the one owning ``x`` (:func:`otflow.get_backend` with
    ``like=x``, which imports no framework), remembered per array type, so one field serves
    torch and JAX parameters alike.

    :param event_shape: ``(C, H, W)``, the shape of one state.
    :param widths: the hidden channel counts (FFJORD/RNODE on MNIST: ``(64, 64, 64)``).
    :param activation: one of ``"tanh"``, ``"softplus"`` (FFJORD's choice for images),
        ``"swish"``.
    :param conditioning: ``"concat"``, ``"concatsquash"`` or ``"ignore"``.
    :param zero_last: start the last layer at zero.
    :raises ValueError: for a shape that is not three positive ints, bad widths, or an
        unknown activation or conditioning.
    """

    event_shape: tuple[int, int, int]
    widths: tuple[int, ...] = (64, 64, 64)
    activation: str = "softplus"
    conditioning: str = "concat"
    zero_last: bool = True

    def __post_init__(self):
        shape = _positive_ints(self.event_shape, "event_shape")
        if len(shape) != 3:
            raise ValueError(f"ConvField: event_shape must be (channels, height, width), got {self.event_shape!r}; "
                             "for vectors use otflow.MLP")
        object.__setattr__(self, "event_shape", shape)
        object.__setattr__(self, "widths", _positive_ints(self.widths, "widths"))
        if self.activation not in ACTIVATIONS:
            raise ValueError(unknown_option_message("activation", self.activation, ACTIVATIONS))
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(unknown_option_message("conditioning", self.conditioning, CONDITIONINGS))

    @property
    def channels(self) -> tuple[int, ...]:
        """The channel counts from input to output, ``(C, *widths, C)``."""
        c = self.event_shape[0]
        return (c, *self.widths, c)

    def init(self, backend, key, *, dtype, device=None):
        """One dict per layer: ``weight`` ``(out, in, 3, 3)`` and ``bias`` ``(out,)``; with
        ``"concatsquash"`` also ``gate_weight``, ``gate_bias`` and ``time_bias`` ``(out,)``.

        :param backend: the backend that draws the arrays (any: the draws need no convolution).
        :param key: a random key of the backend.
        :param dtype: the floating dtype.
        :param device: where the arrays live (the backend's default when None).
        :returns: the tuple of layer dicts.
        """
        channels = self.channels
        n_layers = len(channels) - 1
        keys = backend.split(key, 5 * n_layers)
        return tuple(self._init_layer(backend, keys[5 * i: 5 * i + 5], c_in, c_out,
                                      zero=self.zero_last and i == n_layers - 1, dtype=dtype, device=device)
                     for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])))

    def _init_layer(self, backend, keys, c_in, c_out, *, zero, dtype, device) -> dict:
        xp = backend.namespace()

        def uniform(key, shape, bound, zeroed=False):
            if zeroed:
                return xp.zeros(shape, dtype=dtype, device=device)
            return backend.uniform(key, shape, dtype=dtype, device=device, minval=-bound, maxval=bound)

        fan_in_channels = c_in + (1 if self.conditioning == "concat" else 0)
        bound = 1.0 / math.sqrt(fan_in_channels * KERNEL_SIZE * KERNEL_SIZE)
        layer = {"weight": uniform(keys[0], (c_out, fan_in_channels, KERNEL_SIZE, KERNEL_SIZE), bound, zero),
                 "bias": uniform(keys[1], (c_out,), bound, zero)}
        if self.conditioning == "concatsquash":
            layer["gate_weight"] = uniform(keys[2], (c_out,), 1.0)
            layer["gate_bias"] = uniform(keys[3], (c_out,), 1.0)
            layer["time_bias"] = uniform(keys[4], (c_out,), 1.0, zero)
        return layer

    def apply(self, params, t, x):
        """The velocity ``v(t, x)``.

        :param params: the tree :meth:`init` returns.
        :param t: the time, a 0-d array.
        :param x: the states, shape ``(batch, C, H, W)``.
        :returns: ``v``, shaped like ``x``.
        :raises ValueError: when ``x`` is not ``(batch, *event_shape)``.
        :raises CapabilityError: when the backend of ``x`` has no convolution.
        """
        if tuple(x.shape[1:]) != self.event_shape:
            raise ValueError(f"ConvField: x must have shape (batch, {', '.join(map(str, self.event_shape))}), "
                             f"got {tuple(x.shape)}")
        backend = _conv_backend(x)
        xp = array_namespace(x)
        h = x
        last = len(params) - 1
        for i, layer in enumerate(params):
            h = self._apply_layer(backend, xp, layer, t, h)
            if i < last:
                h = _activate(xp, self.activation, h)
        return h

    def _apply_layer(self, backend, xp, layer, t, h):
        if self.conditioning == "concat":
            h = xp.concat([xp.zeros_like(h[:, :1, ...]) + t, h], axis=1)
        out = backend.conv2d(h, layer["weight"], layer["bias"], stride=1, padding="same")
        if self.conditioning == "concatsquash":
            gate = _sigmoid(xp, layer["gate_weight"] * t + layer["gate_bias"])
            out = out * xp.reshape(gate, (-1, 1, 1)) + xp.reshape(layer["time_bias"] * t, (-1, 1, 1))
        return out

    def config(self) -> dict:
        return {"type": "ConvField", "event_shape": list(self.event_shape), "widths": list(self.widths),
                "activation": self.activation, "conditioning": self.conditioning, "zero_last": self.zero_last}
