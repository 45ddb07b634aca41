"""The model a run trains: its fields and initial parameters, the training loss, and the
:class:`~otflow.Flow` built from the current parameters.

The parameter tree the trainer optimizes is ``{"fields": (block parameters, ...)}`` plus
``"log_T"`` (one per block) with ``learn_T``. The loss is RNODE's (Finlay et al., ICML
2020, eq. 8) with one Hutchinson probe per iteration drawn from the iteration's key.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from ..cnf import MLP, Flow, SolverOptions, rnode_loss
from ..ode import resolve_solver
from .data import sample_batch, split_context
from .flow_matching import FlowMatchingBatches, FlowMatchingLoss
from .image_model import build_image_model
from .warm_start import check_init_flow, params_from_flow

__all__ = ["TrainingModel", "build_model", "build_fields", "initial_params", "RNODETrainingLoss", "FlowBuilder"]


class TrainingModel(NamedTuple):
    """What a run trains: the fields, their initial parameter tree, the loss the trainer
    minimizes (``loss(params, x, key) -> (loss, aux)``) and the builder of the
    :class:`~otflow.Flow` a parameter tree stands for."""

    fields: list
    params: dict
    loss: Any
    flows: Any
    batches: Any = sample_batch
    """``batches(data, rng, batch_size, backend, dtype, device)``: one training batch."""


def build_model(opts, data, backend, dtype, device, *, init=None, row_draw=None) -> TrainingModel:
    """The model, loss and flow builder of a run: the one place ``fit`` asks for them, so
    another kind of model or objective plugs in here.

    :param opts: the run's :class:`~otflow.FitOptions` (``objective`` picks the loss:
        RNODE's, or conditional flow matching with its paired batches).
    :param data: the run's :class:`~otflow.training.data.TrainingData` (image data get
        FFJORD's multiscale model, :mod:`.image_model`).
    :param backend: the training backend.
    :param dtype: the parameters' dtype (the backend's).
    :param device: their device.
    :param init: a :class:`~otflow.Flow` whose parameters the run starts from (checked
        against the options' architecture), or None for a fresh initialization.
    :param row_draw: wraps the losses' per-row draws (probes, noise, path times) so that a
        data-parallel process draws its rows of the global batch's
        (:meth:`~otflow.training.distributed.Replicas.row_draw`); None: as they are.
    :returns: a :class:`TrainingModel`.
    """
    if data.is_images:
        return build_image_model(opts, data, backend, dtype, device, init=init, row_draw=row_draw)
    fields = build_fields(opts, data.dim, data.context_dim)
    if init is not None:
        check_init_flow(init, fields, opts)
        params = params_from_flow(init, opts, backend, dtype, device)
    else:
        params = initial_params(fields, opts, backend, dtype, device)
    flows = FlowBuilder(fields, params, opts, data, backend, device)
    if opts.objective == "flow-matching":
        loss = FlowMatchingLoss(fields, opts.T, backend, row_draw=row_draw, time_power=opts.flow_matching_time_power)
        return TrainingModel(fields, params, loss, flows,
                             FlowMatchingBatches(opts.coupling, conditional=data.context_dim > 0))
    return TrainingModel(fields, params, RNODETrainingLoss(fields, opts, backend, row_draw=row_draw), flows)


def build_fields(opts, dim: int, context_dim: int = 0) -> list:
    """One ConcatSquash :class:`~otflow.MLP` per block, as the options describe.

    :param opts: the run's :class:`~otflow.FitOptions`.
    :param dim: the data's dimension.
    :param context_dim: the length of a context vector (0: unconditional fields).
    :returns: the fields.
    """
    return [MLP((dim,), hidden=opts.hidden, activation=opts.activation, conditioning=opts.conditioning,
                zero_last=opts.zero_last, context_dim=context_dim) for _ in range(opts.n_blocks)]


def initial_params(fields, opts, backend, dtype, device) -> dict:
    """The initial parameter tree, from the run's seed.

    :param fields: the blocks' fields.
    :param opts: the run's :class:`~otflow.FitOptions`.
    :param backend: the backend of the parameters.
    :param dtype: their dtype (the backend's).
    :param device: their device.
    :returns: ``{"fields": (...)}``, with ``"log_T"`` when T is learned.
    """
    keys = backend.split(backend.key(opts.seed), opts.n_blocks)
    params: dict = {"fields": tuple(f.init(backend, k, dtype=dtype, device=device) for f, k in zip(fields, keys))}
    if opts.learn_T:
        params["log_T"] = backend.asarray(np.full(opts.n_blocks, math.log(opts.T)), dtype=dtype, device=device)
    return params


class RNODETrainingLoss:
    """``loss(params, x, key) -> (loss, aux)``: the RNODE objective of a batch, with a
    Gaussian or Rademacher probe drawn from ``key``; what :func:`~otflow.training.make_trainer`
    optimizes. ``aux`` holds ``nll``, ``kinetic``, ``jacobian``, ``nfe`` and ``status``.
    For conditional fields the batch carries the contexts as its last ``context_dim``
    columns (:func:`~otflow.training.data.sample_batch`): the loss of ``p(x | c)``.

    :param fields: the blocks' fields.
    :param opts: the run's :class:`~otflow.FitOptions` (λ's, probe, T, training solver).
    :param backend: the backend the loss runs on.
    :param row_draw: wraps the probe draw (see :func:`build_model`); None: as it is.
    """

    def __init__(self, fields, opts, backend, *, row_draw=None):
        self.fields = fields
        self.backend = backend
        self.lambda_kinetic = opts.lambda_kinetic
        self.lambda_jacobian = opts.lambda_jacobian
        draw = backend.normal if opts.probe == "gaussian" else backend.rademacher
        self.draw_probe = row_draw(draw) if row_draw is not None else draw
        self.fixed_T = None if opts.learn_T else [opts.T] * opts.n_blocks
        self.solver_kwargs = opts.train_solver_kwargs()
        if not backend.eager and resolve_solver(opts.method).adaptive and opts.gradient == "direct":
            # reverse mode through a compiled adaptive loop: bounded memory by recomputation
            self.solver_kwargs["loop_kind"] = "checkpointed"

    def __call__(self, params, x, key):
        b = self.backend
        context = None
        if self.fields[0].context_dim:
            x, context = split_context(x, self.fields[0].dim)
        eps = self.draw_probe(key, tuple(x.shape), dtype=x.dtype, device=b.device_of(x))
        T = self.fixed_T if self.fixed_T is not None else self._learned_T(params["log_T"])
        out = rnode_loss(self.fields, params["fields"], x, eps, T=T, backend=b, lambda_kinetic=self.lambda_kinetic,
                         lambda_jacobian=self.lambda_jacobian, solver_kwargs=self.solver_kwargs, context=context)
        aux = {"nll": out.nll, "kinetic": out.kinetic, "jacobian": out.jacobian, "nfe": out.nfe,
               "status": out.status}
        return out.loss, aux

    def _learned_T(self, log_T) -> list:
        xp = self.backend.namespace()
        return [xp.exp(log_T[i]) for i in range(len(self.fields))]


class FlowBuilder:
    """The :class:`~otflow.Flow` of a parameter tree, for validation during training and
    for the result: copies of one flow (:meth:`~otflow.Flow.with_parameters`), which share
    its compiled evaluation, so neither new parameters nor a new learned T recompile.

    :param fields: the blocks' fields.
    :param params: the initial parameter tree.
    :param opts: the run's :class:`~otflow.FitOptions` (dtype, T, evaluation tolerances).
    :param data: the run's :class:`~otflow.training.data.TrainingData` (its standardization).
    :param backend: the backend of the flow.
    :param device: its device.
    """

    def __init__(self, fields, params, opts, data, backend, device):
        self.backend = backend
        self.device = device
        self.dtype = getattr(backend.namespace(), opts.dtype)
        eval_solver = SolverOptions(rtol=opts.eval_rtol, atol=opts.eval_atol)
        self.template = Flow(fields, params["fields"], backend=backend, device=device, dtype=opts.dtype, T=opts.T,
                             shift=data.shift, scale=data.scale, eval_solver=eval_solver,
                             context_shift=data.context_shift, context_scale=data.context_scale)

    def block_times(self, params):
        """Each block's T for ``params``: None (the options' T) unless T is learned, then
        ``exp(log_T)`` computed in the training dtype."""
        if "log_T" not in params:
            return None
        b = self.backend
        log_T = b.asarray(params["log_T"], dtype=self.dtype, device=self.device)
        return b.to_numpy(b.namespace().exp(log_T))

    def flow(self, params, *, history: list | None = None, fit_info: dict | None = None) -> Flow:
        """The flow of ``params``.

        :param params: a training tree ``{"fields": ..., "log_T": ...}`` of backend or numpy arrays.
        :param history: the run's records, for the flow ``fit`` returns.
        :param fit_info: the run's summary, likewise.
        :returns: a copy of the template flow with these parameters.
        """
        b = self.backend
        fields = b.tree_map(lambda a: b.asarray(a, dtype=self.dtype, device=self.device), tuple(params["fields"]))
        return self.template.with_parameters(fields, T=self.block_times(params), history=history,
                                             fit_info=fit_info)
