"""The image model a run trains on image data: FFJORD's multiscale CNF with RNODE's loss.

What :func:`~otflow.training.model.build_model` returns for image data (uint8 pixel
levels): one :class:`~otflow.cnf.ConvField` per block of a :class:`~otflow.cnf.MultiscaleSpec`
built from the options, the loss :class:`ImageTrainingLoss` (uniform dequantization and one
Hutchinson probe per block drawn from the iteration's key, then
:func:`~otflow.cnf.multiscale_objective.multiscale_rnode_loss`) and
:class:`ImageFlowBuilder`, whose flows are :class:`~otflow.cnf.MultiscaleFlow`.

The options default to RNODE's MNIST recipe (Finlay, Jacobsen, Nurbekyan & Oberman, ICML
2020, after FFJORD's multiscale model, Grathwohl et al., ICLR 2019) for every option the
user did not set (:data:`IMAGE_DEFAULTS`); :func:`resolve_image_options` applies them.
"""
from __future__ import annotations

import math

import numpy as np

from ..cnf import MultiscaleSpec, SolverOptions
from ..cnf.multiscale_objective import multiscale_rnode_loss
from ..ode import resolve_solver
from .data import image_eval_estimator

__all__ = ["IMAGE_DEFAULTS", "resolve_image_options", "with_eval_estimator", "build_image_model", "image_spec", "ImageTrainingLoss",
           "ImageFlowBuilder"]

#: RNODE's MNIST recipe: what image data use for every option not set explicitly (widths
#: 64, 64, 64 with softplus and the time as an input channel, two blocks per scale,
#: batches of 200, fixed-step RK4 with step 0.25 over T = 1, λ_K = λ_J = 0.01)
IMAGE_DEFAULTS = {"hidden": (64, 64, 64), "activation": "softplus", "conditioning": "concat",
                  "blocks_per_scale": 2, "batch_size": 200, "method": "rk4", "steps": 4, "T": 1.0,
                  "lambda_kinetic": 0.01, "lambda_jacobian": 0.01, "standardize": False}


def resolve_image_options(opts):
    """The options of a run on image data: :data:`IMAGE_DEFAULTS` for every option not set
    explicitly (:attr:`~otflow.FitOptions.given`), after refusing those that make no sense
    for images.

    :param opts: the run's :class:`~otflow.FitOptions` (``objective="auto"`` is ``"rnode"``).
    :returns: the resolved options (what the checkpoint header records).
    :raises ValueError: an objective other than RNODE's, ``standardize=True`` (pixels are dequantized and logit-transformed,
        never standardized) or ``n_blocks`` other than 1 (image models count
        ``blocks_per_scale``).
    """
    given = opts.given
    if opts.objective not in ("rnode", "auto"):
        raise ValueError(f"objective={opts.objective!r} is not available for image data; image models train "
                         "with the RNODE objective (objective='rnode')")
    if opts.standardize is True and "standardize" in given:
        raise ValueError("standardize=True does not apply to image data: the pixels are dequantized and "
                         "logit-transformed (logit_alpha), never standardized; drop standardize")
    if opts.n_blocks != 1:
        raise ValueError(f"n_blocks={opts.n_blocks} does not apply to image data: the multiscale model has "
                         "blocks_per_scale CNF blocks before and after each squeeze (n_scales scales); "
                         "set blocks_per_scale instead")
    return opts.resolved(objective="rnode", **{k: v for k, v in IMAGE_DEFAULTS.items() if k not in given})


def with_eval_estimator(opts, data):
    """``opts`` with ``eval_estimator`` resolved for the run's images (what the checkpoint
    header and ``fit_info`` record): as given, else :func:`~otflow.training.data.image_eval_estimator`.

    :param opts: the resolved options (:func:`resolve_image_options`).
    :param data: the run's :class:`~otflow.training.data.TrainingData` (images).
    :returns: the options.
    """
    if opts.eval_estimator is not None:
        return opts
    return opts.resolved(eval_estimator=image_eval_estimator(opts, data.dim))


def image_spec(opts, image_shape) -> MultiscaleSpec:
    """The architecture the options describe for images of ``image_shape``.

    :param opts: resolved options (:func:`resolve_image_options`).
    :param image_shape: ``(C, H, W)``.
    :returns: the :class:`~otflow.cnf.MultiscaleSpec`.
    :raises ValueError: for a shape the scales cannot squeeze, naming the largest valid ``n_scales``.
    """
    try:
        return MultiscaleSpec(image_shape=tuple(image_shape), n_scales=opts.n_scales,
                              blocks_per_scale=opts.blocks_per_scale, widths=tuple(opts.hidden),
                              activation=opts.activation, conditioning=opts.conditioning, alpha=opts.logit_alpha)
    except ValueError as e:
        raise ValueError(f"image model: {e}") from None


def build_image_model(opts, data, backend, dtype, device, *, init=None, row_draw=None):
    """The :class:`~otflow.training.model.TrainingModel` of image data.

    :param opts: the run's options, resolved for images (:func:`resolve_image_options`).
    :param data: the run's :class:`~otflow.training.data.TrainingData` (images).
    :param backend: the training backend (it needs a convolution, ``has_conv``).
    :param dtype: the parameters' dtype.
    :param device: their device.
    :param init: must be None (warm starts from a flow are for vector models).
    :param row_draw: wraps the loss's per-row draws (data-parallel: this process's rows of
        the global batch's noise); None draws for the batch as given.
    :returns: the model: conv fields, parameters ``{"fields": (...), "log_T"?}``, the loss
        and the flow builder.
    :raises ValueError: as :func:`resolve_image_options` and :func:`image_spec`, or ``init``.
    """
    from .model import TrainingModel

    if init is not None:
        raise ValueError("init= (a warm start from a flow) is not available for image models; start without it")
    if not backend.has_conv:
        raise ValueError(f"image models need a 2-D convolution, which the {backend.name!r} backend lacks; "
                         "use backend='torch' or 'jax'")
    spec = image_spec(opts, data.image_shape)
    fields = spec.fields(zero_last=opts.zero_last)
    params = {"fields": spec.init(backend, backend.key(opts.seed), dtype=dtype, device=device,
                                  zero_last=opts.zero_last)}
    if opts.learn_T:
        params["log_T"] = backend.asarray(np.full(spec.n_blocks, math.log(opts.T)), dtype=dtype, device=device)
    loss = ImageTrainingLoss(spec, fields, opts, backend, data.n_levels, row_draw=row_draw)
    return TrainingModel(list(fields), params, loss, ImageFlowBuilder(spec, fields, params, opts, backend, device))


class ImageTrainingLoss:
    """``loss(params, x, key) -> (loss, aux)`` for a batch of pixel levels ``x`` (floats
    ``0 … n_levels−1``, ``(batch, C, H, W)``): from ``key`` it draws the dequantization noise
    ``u`` and one probe per block, runs
    :func:`~otflow.cnf.multiscale_objective.multiscale_rnode_loss` on ``y = (x + u)/n_levels``
    and returns RNODE's image objective (Finlay et al. 2020, as their code trains MNIST and
    CIFAR10): the batch's **bits per dimension** plus ``λ_K·kinetic + λ_J·jacobian`` — so λ
    weighs the penalties against a per-dimension likelihood whatever the image size (in
    nats per image the same λ would be ``D·log 2`` times weaker). ``aux`` holds ``nll``
    (the batch's standard bits/dim), ``kinetic``, ``jacobian``, ``nfe``, ``status``.

    :param spec: the architecture.
    :param fields: its fields.
    :param opts: resolved options (λ's, probe, T, training solver).
    :param backend: the backend the loss runs on.
    :param n_levels: pixel levels (256, 17 for the digits).
    :param row_draw: wraps the per-row draws (noise and probes; see
        :meth:`~otflow.training.distributed.Replicas.row_draw`); None: as they are.
    """

    def __init__(self, spec: MultiscaleSpec, fields, opts, backend, n_levels: int, *, row_draw=None):
        self.spec, self.fields, self.backend, self.n_levels = spec, tuple(fields), backend, n_levels
        self.lambda_kinetic = opts.lambda_kinetic
        self.lambda_jacobian = opts.lambda_jacobian
        rows = row_draw if row_draw is not None else (lambda draw: draw)
        self.draw_probe = rows(backend.normal if opts.probe == "gaussian" else backend.rademacher)
        self.draw_noise = rows(backend.uniform)
        self.fixed_T = None if opts.learn_T else opts.T
        self.solver_kwargs = opts.train_solver_kwargs()
        if not backend.eager and resolve_solver(opts.method).adaptive and opts.gradient == "direct":
            self.solver_kwargs["loop_kind"] = "checkpointed"  # as the vector loss: bounded memory

    def probes(self, key, batch: int, dtype, device) -> list:
        """One probe per block, shaped like the block's states, from ``key``."""
        keys = self.backend.split(key, self.spec.n_blocks)
        return [self.draw_probe(k, (batch, *shape), dtype=dtype, device=device)
                for k, shape in zip(keys, self.spec.block_shapes())]

    def __call__(self, params, x, key):
        b = self.backend
        noise_key, probe_key = b.split(key, 2)
        # uniform dequantization (x + u)/n_levels, u ~ U[0, 1) (otflow.dequantize, drawn per row here)
        y = (x + self.draw_noise(noise_key, tuple(x.shape), dtype=x.dtype, device=b.device_of(x))) / self.n_levels
        probes = self.probes(probe_key, x.shape[0], x.dtype, b.device_of(x))
        if self.fixed_T is not None:
            T = self.fixed_T
        else:
            xp = b.namespace()
            T = tuple(xp.exp(params["log_T"][i]) for i in range(self.spec.n_blocks))
        out = multiscale_rnode_loss(self.spec, self.fields, params["fields"], y, probes, T=T, backend=b,
                                    lambda_kinetic=self.lambda_kinetic, lambda_jacobian=self.lambda_jacobian,
                                    solver_kwargs=self.solver_kwargs)
        bpd = self.bits_per_dim(out.nll)
        loss = bpd + self.lambda_kinetic * out.kinetic + self.lambda_jacobian * out.jacobian
        aux = {"nll": bpd, "kinetic": out.kinetic, "jacobian": out.jacobian, "nfe": out.nfe, "status": out.status}
        return loss, aux

    def bits_per_dim(self, nll):
        """The batch's standard bits/dim from its mean NLL of dequantized pixels (nats per
        image): ``(nll/D + log n_levels)/log 2``."""
        dim = math.prod(self.spec.image_shape)
        return (nll / dim + math.log(self.n_levels)) / math.log(2.0)


class ImageFlowBuilder:
    """The :class:`~otflow.cnf.MultiscaleFlow` of a parameter tree (validation, checkpoints,
    the result): copies of one template flow (``with_parameters``), so new parameters never
    recompile its evaluation.

    :param spec: the architecture.
    :param fields: its fields.
    :param params: the initial parameter tree.
    :param opts: resolved options (dtype, T, evaluation tolerances).
    :param backend: the backend of the flow.
    :param device: its device.
    """

    def __init__(self, spec, fields, params, opts, backend, device):
        from ..cnf import MultiscaleFlow

        self.backend, self.device = backend, device
        self.dtype = getattr(backend.namespace(), opts.dtype)
        eval_solver = SolverOptions(rtol=opts.eval_rtol, atol=opts.eval_atol)
        self.template = MultiscaleFlow(spec, params["fields"], backend=backend, device=device, dtype=opts.dtype,
                                       T=opts.T, eval_solver=eval_solver, fields=tuple(fields))

    def block_times(self, params):
        """Each block's T for ``params``: None (the options' T) unless T is learned."""
        if "log_T" not in params:
            return None
        b = self.backend
        log_T = b.asarray(params["log_T"], dtype=self.dtype, device=self.device)
        return tuple(float(t) for t in b.to_numpy(b.namespace().exp(log_T)))

    def flow(self, params, *, history: list | None = None, fit_info: dict | None = None):
        """The flow of ``params`` (a training tree of backend or numpy arrays).

        :param params: ``{"fields": ..., "log_T"?: ...}``.
        :param history: the run's records, for the flow ``fit`` returns.
        :param fit_info: the run's summary, likewise.
        :returns: a :class:`~otflow.cnf.MultiscaleFlow`.
        """
        b = self.backend
        fields = b.tree_map(lambda a: b.asarray(a, dtype=self.dtype, device=self.device), tuple(params["fields"]))
        return self.template.with_parameters(fields, T=self.block_times(params), history=history,
                                             fit_info=fit_info)
