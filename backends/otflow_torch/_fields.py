"""``torch.nn.Module`` as an otflow velocity field (the ``otflow.native_fields`` entry point
``torch``; see :func:`otflow.cnf.native_field`)."""
from __future__ import annotations

import torch

from otflow.cnf import FunctionField, module_event_shape

__all__ = ["as_field"]


def as_field(obj, params=None, *, event_shape=None):
    """A :class:`~otflow.FunctionField` calling a ``torch.nn.Module`` as ``module(t, x)``;
    ``None`` when ``obj`` is not a module.

    The module receives ``t`` as a 0-d tensor and ``x`` of shape
    ``(batch, *event_shape)`` and must return a tensor shaped like ``x`` whose row ``i``
    depends only on row ``i`` of ``x``. It is called with
    ``torch.func.functional_call(module, params, (t, x))``; the initial parameters are
    ``dict(module.named_parameters())``, the module's own ``nn.Parameter`` objects, so
    gradients of a training loss fill their ``.grad`` and a ``torch.optim`` optimizer over
    ``module.parameters()`` keeps the module and the flow in sync. Buffers are the
    module's, unchanged; ``module.train()`` / ``module.eval()`` apply as usual.
    The module's parameters must have the flow's dtype and device (e.g. ``module.double()``).

    :param obj: the module (anything else gives None).
    :param params: must be None (the module carries its own parameters).
    :param event_shape: e.g. ``(2,)``; required unless the module has an ``event_shape`` attribute.
    :returns: the field, or None.
    :raises ValueError: for ``params`` given, or a missing or bad event shape.
    """
    if not isinstance(obj, torch.nn.Module):
        return None
    name = type(obj).__name__
    if params is not None:
        raise ValueError(
            f"got params= together with the torch.nn.Module {name}: a module carries its own "
            "parameters, so which to use would be ambiguous. Drop params= (the module's parameters "
            "are used and trained in place), or load the values into the module first "
            "(module.load_state_dict(...)).")
    shape = module_event_shape(obj, event_shape, name,
                               "Flow.from_velocity(module, event_shape=(2,), backend='torch')")
    module = obj

    def apply_fn(p, t, x):
        try:
            return torch.func.functional_call(module, p, (t, x))
        except RuntimeError as e:
            hint = _mismatch_hint(p, x, name)
            if hint:
                raise TypeError(hint) from e
            raise

    return FunctionField(apply_fn, dict(module.named_parameters()), shape, name=name)


def _mismatch_hint(params, x, name: str) -> str | None:
    """A message when a module call failed because its parameters' dtype or device is not x's."""
    values = params.values() if isinstance(params, dict) else ()
    leaves = [p for p in values if isinstance(p, torch.Tensor) and p.is_floating_point()]
    dtypes = {p.dtype for p in leaves}
    devices = {p.device for p in leaves}
    if dtypes and x.dtype not in dtypes:
        return (f"the parameters of {name} are {', '.join(sorted(map(str, dtypes)))} but the flow computes in "
                f"{x.dtype}: convert the module (e.g. module.to({x.dtype})) or build the flow with the module's "
                "dtype (dtype=...)")
    if devices and x.device not in devices:
        return (f"the parameters of {name} are on {', '.join(sorted(map(str, devices)))} but the flow computes "
                f"on {x.device}: move the module (module.to(device)) or build the flow with device=...")
    return None
