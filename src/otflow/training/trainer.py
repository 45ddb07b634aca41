"""The training step of each framework, behind one protocol.

A trainer runs one optimization step of ``loss_fn(params, x, key) -> (loss, aux)`` with
the framework's own optimizer (``torch.optim`` with autograd on torch; one jitted optax
update on JAX). It is the only part of :func:`otflow.fit` that differs per backend, so it
belongs to the training layer, not to the :class:`~otflow.Backend` protocol: each backend
package names its trainer in the ``otflow.trainers`` entry-point group
(``torch = "otflow_torch._trainer:TorchTrainer"``), and a third-party backend registers
one with :func:`register_trainer`. :func:`make_trainer` is what a benchmark or a custom
training loop calls.

A factory that trains data-parallel also has ``factory.data_parallel(backend, devices,
device)``, returning the run's :class:`~otflow.training.distributed.Replicas` (or None
for one process on one device); :func:`make_trainer` then passes them to the factory as
``data_parallel=`` (see ``docs/distributed.md``).
"""
from __future__ import annotations

from importlib import metadata
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from ..base import Backend, BackendUnavailable, CapabilityError, get_backend
from .optim import OptimizerSpec

__all__ = ["Trainer", "make_trainer", "register_trainer", "trainer_factory", "TRAINER_GROUP"]

#: the entry-point group naming, per backend, the factory of its trainer
TRAINER_GROUP = "otflow.trainers"

_registered: dict[str, Callable] = {}


@runtime_checkable
class Trainer(Protocol):
    """One optimization step at a time, with the state a checkpoint needs.

    A step whose loss or gradient is not finite, or whose ``aux["status"]`` is not 0 (a
    failed training solve), leaves the parameters and the optimizer state exactly as they
    were (``metrics["applied"]`` is False). Restoring ``params`` and the optimizer state
    saved after step *k* and running step *k + 1* gives bit-for-bit the parameters of an
    uninterrupted run.
    """

    #: the current parameter tree (the backend's arrays)
    params: Any

    def step(self, x, key, lr: float) -> dict:
        """One optimization step.

        :param x: the batch (the backend's array).
        :param key: the random key of this step (passed to ``loss_fn``).
        :param lr: the learning rate of this step (a host float; changing it never recompiles).
        :returns: the metrics: ``loss``, ``grad_norm`` (backend scalars), ``applied`` (a bool)
            and every entry of ``aux``.
        """

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer state as named numpy arrays (what a checkpoint stores)."""

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Install an optimizer state returned by :meth:`optimizer_state`.

        :param arrays: the named arrays.
        :raises ValueError: arrays that do not fit this optimizer.
        """

    def set_params(self, params) -> None:
        """Install parameter values (a tree shaped like :attr:`params`; numpy or backend arrays)."""


def register_trainer(name: str, factory: Callable | None) -> None:
    """Register the trainer of a backend (third-party backends; torch and JAX register
    theirs through the ``otflow.trainers`` entry-point group). A registered factory takes
    precedence over the entry point of the same name.

    :param name: the backend's registry name.
    :param factory: ``factory(backend, loss_fn, params, optimizer)`` returning a
        :class:`Trainer`; None removes the registration (the entry point, if any, applies again).
    :raises TypeError: when ``factory`` is neither callable nor None.
    """
    if factory is None:
        _registered.pop(name, None)
        return
    if not callable(factory):
        raise TypeError(f"register_trainer: the factory must be callable, got {type(factory).__name__}")
    _registered[name] = factory


def trainer_factory(name: str) -> Callable:
    """The trainer factory of the backend called ``name``: registered, else from the entry points.

    :param name: the backend's registry name.
    :returns: ``factory(backend, loss_fn, params, optimizer)``.
    :raises CapabilityError: when no trainer is known for the backend.
    :raises BackendUnavailable: when the trainer's framework (e.g. optax) fails to import.
    """
    if name not in _registered:
        found = [ep for ep in metadata.entry_points(group=TRAINER_GROUP) if ep.name == name]
        if not found:
            known = sorted({*_registered, *(ep.name for ep in metadata.entry_points(group=TRAINER_GROUP))})
            raise CapabilityError(
                f"backend {name!r} has no trainer (trainers: {', '.join(map(repr, known)) or 'none'}); train with "
                f"backend='torch' or 'jax', or register one with otflow.training.register_trainer({name!r}, factory)")
        try:
            _registered[name] = found[0].load()
        except ImportError as e:
            raise BackendUnavailable(f"the {name} trainer needs a package that failed to import ({e}). Install it "
                                     f"with: pip install 'otflow[{name}]'") from e
    return _registered[name]


def make_trainer(loss_fn: Callable, params, optimizer: OptimizerSpec, *, backend: str | Backend,
                 data_parallel=None) -> Trainer:
    """The training step of ``backend`` for ``loss_fn``.

    :param loss_fn: ``loss_fn(params, x, key) -> (loss, aux)``; ``aux`` is a dict of backend
        scalars and must hold ``status`` (0 when the training solve succeeded, e.g.
        :attr:`otflow.RNODELoss.status`).
    :param params: the initial parameter tree (the backend's arrays).
    :param optimizer: the optimizer, an :class:`~otflow.OptimizerSpec`.
    :param backend: the backend (name or object) whose framework runs the step.
    :param data_parallel: the run's :class:`~otflow.training.distributed.Replicas` from
        :func:`~otflow.training.distributed.resolve_replicas` (passed on to the factory as
        ``data_parallel=``), or None for one process on one device.
    :returns: a :class:`Trainer`.
    :raises TypeError: when ``loss_fn`` is not callable or ``optimizer`` is not an OptimizerSpec.
    :raises CapabilityError: when the backend has no trainer (e.g. the numpy reference backend).
    """
    if not callable(loss_fn):
        raise TypeError(f"make_trainer: loss_fn must be a function (params, x, key) -> (loss, aux), "
                        f"got {type(loss_fn).__name__}")
    if not isinstance(optimizer, OptimizerSpec):
        raise TypeError(f"make_trainer: optimizer must be an otflow.OptimizerSpec (e.g. OptimizerSpec(lr=1e-3)), "
                        f"got {type(optimizer).__name__}")
    b = get_backend(backend)
    factory = trainer_factory(b.name)
    if data_parallel is None or getattr(factory, "data_parallel", None) is None:
        return factory(b, loss_fn, params, optimizer)
    return factory(b, loss_fn, params, optimizer, data_parallel=data_parallel)
