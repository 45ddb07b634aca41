"""Starting a run from a trained flow: ``fit(..., init=flow)``.

The documented use is fine-tuning a flow-matching solution with the RNODE objective
(:mod:`.flow_matching`): the fields keep their parameters, and the run trains in the
flow's coordinates (its standardization ``(x − shift)/scale``), so the field sees the
inputs it was trained on.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from ..cnf import Flow, load

__all__ = ["init_flow", "check_init_flow", "params_from_flow", "in_flow_coordinates", "in_checkpoint_coordinates",
           "check_checkpoint_context"]


def init_flow(init) -> Flow:
    """The flow ``init=`` names: a :class:`~otflow.Flow`, or a file saved by
    :meth:`~otflow.Flow.save` (or a checkpoint), loaded with numpy outputs.

    :param init: the flow or the path.
    :returns: the flow.
    :raises TypeError: for anything else (an image model, a number, ...).
    """
    if isinstance(init, (str, os.PathLike)):
        init = load(init, backend="numpy")
    if not isinstance(init, Flow):
        raise TypeError(f"init must be an otflow.Flow or the path of a saved one, got {type(init).__name__}")
    return init


def check_init_flow(flow: Flow, fields, opts) -> None:
    """Refuse a flow whose architecture differs from the run's options.

    :param flow: the flow to start from.
    :param fields: the fields the run's options describe.
    :param opts: the run's :class:`~otflow.FitOptions`.
    :raises ValueError: naming the first difference and the option that fixes it.
    """
    theirs = [f.config() if hasattr(f, "config") else None for f in flow.fields]
    ours = [f.config() for f in fields]
    if len(theirs) != len(ours):
        raise ValueError(f"init: the flow has {len(theirs)} block(s), the run n_blocks={len(ours)}; "
                         f"pass n_blocks={len(theirs)}")
    theirs_context = getattr(flow, "context_dim", 0)
    ours_context = getattr(fields[0], "context_dim", 0)
    if theirs_context != ours_context:
        raise ValueError(f"init: the flow takes a context of length {theirs_context}, the run's contexts have "
                         f"{ours_context} column(s); pass context= with {theirs_context} column(s)"
                         + (" (none: drop context=)" if theirs_context == 0 else ""))
    for name in ("event_shape", "hidden", "activation", "conditioning"):
        if theirs[0] is None or theirs[0].get(name) != ours[0].get(name):
            got = None if theirs[0] is None else theirs[0].get(name)
            option = "the data's dimension" if name == "event_shape" else f"{name}={got!r}"
            raise ValueError(f"init: the flow's {name} is {got!r}, the run's {ours[0].get(name)!r}; "
                             f"train with {option}")
    if not opts.learn_T and not np.allclose(flow.T, opts.T, rtol=1e-12, atol=0.0):
        raise ValueError(f"init: the flow's T is {list(flow.T)}, the run's T={opts.T}; pass T={flow.T[0]}")


def params_from_flow(flow: Flow, opts, backend, dtype, device) -> dict:
    """The training parameter tree holding the flow's parameters.

    :param flow: the flow to start from.
    :param opts: the run's options (``learn_T`` adds ``log_T`` from the flow's T).
    :param backend: the training backend.
    :param dtype: the parameters' dtype.
    :param device: their device.
    :returns: ``{"fields": ...}`` (and ``"log_T"``), copies on the training backend.
    """
    src = flow.backend
    fields = backend.tree_map(lambda a: backend.asarray(np.array(src.to_numpy(a)), dtype=dtype, device=device),
                              tuple(flow.params))
    params: dict = {"fields": fields}
    if opts.learn_T:
        params["log_T"] = backend.asarray(np.log(np.asarray(flow.T)), dtype=dtype, device=device)
    return params


def check_checkpoint_context(start, data) -> None:
    """Refuse to resume a checkpoint with contexts of another length than it was trained on.

    :param start: the :class:`~otflow.training.checkpoint.ResumePoint`.
    :param data: the run's :class:`~otflow.training.data.TrainingData`.
    :raises ValueError: naming both lengths.
    """
    fields = (start.header.get("flow") or {}).get("fields") or [{}]
    theirs = int(fields[0].get("context_dim", 0) or 0)
    if theirs != data.context_dim:
        def what(n):
            return f"a context of length {n}" if n else "no context"
        raise ValueError(f"resume: the checkpoint was trained with {what(theirs)}, this run has "
                         f"{what(data.context_dim)}; resume with context= of the shape it was trained with")


def in_checkpoint_coordinates(data, start):
    """The run's data in the standardization of the flow a checkpoint holds, so a resumed
    run (a warm-started one included) trains in the coordinates it started in.

    :param data: the run's :class:`~otflow.training.data.TrainingData`.
    :param start: the :class:`~otflow.training.checkpoint.ResumePoint`.
    :returns: the data, re-expressed when the checkpoint's flow records a standardization.
    """
    flow = start.header.get("flow") or {}
    if data.context is not None and "context_shift" in flow:
        data = _restandardized_context(data, *(None if flow[k] is None else np.asarray(flow[k], dtype=np.float64)
                                               for k in ("context_shift", "context_scale")))
    if "shift" not in flow or "scale" not in flow:
        return data
    shift = None if flow["shift"] is None else np.asarray(flow["shift"], dtype=np.float64)
    scale = None if flow["scale"] is None else np.asarray(flow["scale"], dtype=np.float64)
    return _restandardized(data, shift, scale)


def in_flow_coordinates(data, flow: Flow):
    """The run's data re-expressed in the flow's standardization.

    :param data: the run's :class:`~otflow.training.data.TrainingData`.
    :param flow: the flow to start from.
    :returns: the data with training rows ``(x − flow.shift)/flow.scale`` and the flow's
        ``shift`` and ``scale`` (None for a flow without standardization); validation rows
        stay raw, as always.
    """
    b = flow.backend
    if data.context is not None and getattr(flow, "context_dim", 0):
        data = _restandardized_context(data, *(None if v is None else b.to_numpy(v).astype(np.float64)
                                               for v in (flow.context_shift, flow.context_scale)))
    shift = None if flow.shift is None else b.to_numpy(flow.shift).astype(np.float64)
    scale = None if flow.scale is None else b.to_numpy(flow.scale).astype(np.float64)
    return _restandardized(data, shift, scale)


def _restandardized_context(data, shift, scale):
    """``data`` with its training contexts standardized by ``(shift, scale)`` instead of their own
    (kept as they are when the two agree up to float32 rounding, as for the rows)."""
    if shift is None and data.context_shift is None:
        return data
    if shift is not None and data.context_shift is not None:
        tol = _SAME_STANDARDIZATION * data.context_scale
        if (np.all(np.abs(shift - data.context_shift) <= tol)
                and np.all(np.abs(scale - data.context_scale) <= tol)):
            return data
    raw = data.context if data.context_shift is None else data.context * data.context_scale + data.context_shift
    context = raw if shift is None else (raw - shift) / scale
    return dataclasses.replace(data, context=context, context_shift=shift, context_scale=scale)


#: standardizations that differ by less than this (relative to the scale) are the same one,
#: rounded to a float32 flow's precision
_SAME_STANDARDIZATION = 1e-6


def _restandardized(data, shift, scale):
    """``data`` with its training rows standardized by ``(shift, scale)`` instead of its own
    (kept as it is when the two agree up to float32 rounding: a flow stores its
    standardization in its own dtype)."""
    if shift is None and data.shift is None:
        return data
    if shift is not None and data.shift is not None:
        tol = _SAME_STANDARDIZATION * data.scale
        if np.all(np.abs(shift - data.shift) <= tol) and np.all(np.abs(scale - data.scale) <= tol):
            return data
    raw = data.train if data.shift is None else data.train * data.scale + data.shift
    train = raw if shift is None else (raw - shift) / scale
    return dataclasses.replace(data, train=train, shift=shift, scale=scale)
