"""``otflow.fit``: train an RNODE flow end to end.

The loop is written once, here, over the parts of the training layer: the options
(:mod:`.options`), the data (:mod:`.data`), the model and its loss (:mod:`.model`), the
backend's training step (:func:`~otflow.training.make_trainer`: torch.optim + autograd
on torch, one jitted optax update on JAX), validation (:mod:`.evaluation`), the failure
policy (:mod:`.faults`), checkpoints and resume (:mod:`.checkpoint`), the stop signals
(:mod:`.signals`) and the history and progress bar (:mod:`.progress`). Everything but
the training step is the same on every backend.

Data-parallel runs (:mod:`.distributed`: ranks of a ``torchrun`` process group, or a JAX
mesh of ``devices=``) go through the same loop: each process draws its part of every
global batch, the trainer reduces, only the main process writes, and decisions that
end the run (a stop signal, ``max_time``, ``patience``) are agreed by all processes.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np

from ..base import default_backend, get_backend
from ..cnf import Flow
from .checkpoint import CheckpointWriter, ResumePoint, TrainingState, read_resume, restore
from .data import TrainingData, prepare_data, read_data, sample_batch, validate_context
from .distributed import Replicas, check_batch_split, options_digest, resolve_replicas
from .evaluation import Validation
from .faults import TrainingFailed, backoff_factor, count_outcome, failure_reason, skip_message, training_failed
from .image_model import resolve_image_options, with_eval_estimator
from .model import FlowBuilder, build_model
from .options import FitOptions, load_config, refuse_unused_options
from .progress import RunLog
from .signals import StopSignals
from .stages import Stage, plan_stages, resolve_objective, stage_of
from .trainer import make_trainer
from .warm_start import check_checkpoint_context, in_checkpoint_coordinates, in_flow_coordinates, init_flow

__all__ = ["FitOptions", "fit", "TrainingFailed", "load_config"]


def fit(data, *, context=None, backend=None, device=None, config=None, resume=None, init=None, **options) -> Flow:
    """Train an RNODE continuous normalizing flow (Finlay et al., ICML 2020) on ``data``.

    Everything given is validated before anything is computed or compiled: the options,
    then the data, then the backend. Numerical faults follow the policy of
    :class:`~otflow.FitOptions` (skip, back off, stop with :class:`~otflow.TrainingFailed`
    after ``max_failures`` in a row). Ctrl-C (SIGINT) or SIGTERM stops after the current
    iteration, writes a final checkpoint and returns the flow (``fit_info["interrupted"]``
    is True); a second Ctrl-C aborts at once.

    :param data: a numpy array, a torch tensor or a jax array (rows are samples), a path to
        a ``.npy``/``.npz``/``.csv`` file, or an embedded data set's name (``otflow
        datasets`` lists them; toys are sampled afresh, ``n_train`` points). Image data —
        uint8 arrays ``(N, H, W)`` or ``(N, C, H, W)``, an :class:`~otflow.datasets.ImageData`,
        MNIST-style IDX files, CIFAR-10's binary batches, ``.npy``/``.npz`` image arrays, or
        ``"digits-images"`` — train FFJORD's multiscale model (a
        :class:`~otflow.MultiscaleFlow`) with RNODE's image recipe for every option not
        given (``docs/images.md``).
    :param context: for a conditional flow ``p(x | c)``: one context row per data row, a 2-D
        array ``(n_samples, context_dim)`` (numpy, torch or jax). Batches draw matching rows,
        the contexts are standardized like the data (the flow stores their mean and scale,
        so its methods take raw contexts), validation uses the held-out rows' contexts. The
        result's evaluation methods then take ``context=`` (``docs/conditional.md``). Vector
        data given as an array or file only (not an embedded data set, not images).
    :param backend: ``"torch"`` or ``"jax"``; None follows the array type, and numpy
        arrays, paths and names use torch if installed, else jax.
    :param device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"``; the backend's default when None.
        Under ``torchrun``, ``"cuda"`` is each rank's ``cuda:LOCAL_RANK``; with ``devices=``
        (JAX) it names the devices' platform.
    :param config: a TOML or YAML file of options (keyword arguments override it).
    :param resume: a checkpoint written by an earlier run (``checkpoint=``), continued
        exactly where it stopped: the options not given here are the checkpoint's; those
        fixing the model's layout cannot change.
    :param init: a :class:`~otflow.Flow` (or the path of a saved one) to start from instead
        of a fresh initialization — e.g. a flow-matching solution fine-tuned with the RNODE
        objective. Its architecture must match the options; the run trains in its
        standardization (a resumed run takes it from the checkpoint). Vector data only.
    :param options: the fields of :class:`~otflow.FitOptions`. Data-parallel training: on
        torch, run ``fit`` in every process of a ``torchrun`` launch (or of a process group
        you initialized); on JAX, pass ``devices=`` (see ``docs/distributed.md``).
    :returns: the trained :class:`~otflow.Flow` (the best validated parameters, or the last
        ones without a validation split), with ``history`` (one record per iteration) and
        ``fit_info`` (the run's summary).
    :raises TypeError: an unknown option (naming the nearest) or a value of the wrong type.
    :raises ValueError: an option out of range, data that cannot be fitted, a context that
        does not match the data (rows, rank, NaN) or a resumed checkpoint's, a global
        ``batch_size`` that does not split evenly over the processes or devices, devices that
        do not exist, or processes started with different options or data.
    :raises TrainingFailed: after ``max_failures`` consecutive failed iterations.
    :raises ModelFileError: a ``resume`` file that is missing, damaged or incompatible.
    """
    opts, start = _resolve_options(options, config, resume)
    if init is not None and start is not None:
        raise ValueError("init= starts a new run from a flow; resume= continues a run from its checkpoint (whose "
                         "parameters already hold the warm start): pass one of them")
    source = read_data(data)  # before the backend: bad data never waits for a framework import
    contexts = validate_context(context, source) if context is not None else None
    if start is None:
        opts = resolve_objective(opts, images=source.images is not None, warm_start=init is not None)
        refuse_unused_options(opts, opts.given)
    if source.images is not None:
        opts = resolve_image_options(opts)  # RNODE's image recipe for every option not given
    warm = init_flow(init) if init is not None else None
    b = _training_backend(backend, source)
    replicas = resolve_replicas(b, opts.devices, device)
    check_batch_split(replicas, opts.batch_size)
    if opts.objective == "flow-matching+rnode":
        check_batch_split(replicas, opts.flow_matching_batch_size)
    dev = replicas.device(b, device)
    dtype = getattr(b.namespace(), opts.dtype)
    b.check_dtype(dtype)
    rng = np.random.default_rng(opts.seed)
    train_data = prepare_data(source, opts, rng, contexts)
    if train_data.is_images:
        opts = with_eval_estimator(opts, train_data)
    elif warm is not None:
        train_data = in_flow_coordinates(train_data, warm)
    elif start is not None:
        check_checkpoint_context(start, train_data)
        train_data = in_checkpoint_coordinates(train_data, start)
    if opts.standardize == "auto":  # resolved by the data (or the warm start's or checkpoint's flow)
        opts = opts.resolved(standardize=train_data.shift is not None)
    if start is not None and start.header.get("data_digest", train_data.digest) != train_data.digest:
        warnings.warn(f"resume: the data differ from those the checkpoint {start.path!r} was trained on; "
                      "the run continues on the new data", UserWarning, stacklevel=2)

    resumed_at = None if start is None else start.header["state"].get("iteration")
    replicas.same_everywhere(options_digest(opts, train_data.digest, resumed_at), "options, data or resume point")

    stages = plan_stages(opts, _planned_iterations(opts, train_data.n_train))
    first = stage_of(stages, resumed_at or 0)
    state = TrainingState()
    checkpoints = CheckpointWriter(opts, b, train_data.digest, start, resumed_at or 0, writes=replicas.is_main)
    carried = None  # the parameters one stage hands to the next (numpy arrays)
    for k in range(first, len(stages)):
        stage = stages[k]
        model = build_model(stage.options, train_data, b, dtype, dev, init=warm if k == first else None,
                            row_draw=replicas.row_draw)
        trainer = make_trainer(model.loss, model.params, stage.schedule, backend=b,
                               data_parallel=replicas)
        if carried is not None:
            trainer.set_params(carried)
        elif start is not None:
            # a checkpoint written at the end of an earlier stage holds that stage's optimizer
            # state: the next stage starts its own, as an uninterrupted run does
            state, rng = restore(start, trainer, model.params,
                                 optimizer=start.header.get("stage", stage.objective) == stage.objective)
        if k > 0 and state.iteration == stage.start:
            state.evals_without_improvement = 0  # patience counts the last stage's evaluations only
        run = _Run(opts, b, dtype, dev, train_data, rng, trainer, model.flows, state, checkpoints, replicas,
                   batches=model.batches, stages=stages, stage_index=k)
        flow = run.train(stage.end)
        if state.iteration < stage.end or run.interrupted:  # a stop signal, max_time (or patience) ended the run
            break
        carried = run.params_on_host()
    return flow


def _resolve_options(options: dict, config, resume) -> tuple[FitOptions, ResumePoint | None]:
    """The run's options (the checkpoint's, then the config file's, then the keywords) and
    the checkpoint to resume from."""
    given = dict(load_config(config)) if config is not None else {}
    given.update(options)
    if resume is not None:
        return read_resume(resume, given)
    opts = FitOptions.from_mapping(given)
    if opts.objective != "auto":  # before the data are read; "auto" is checked once resolved
        refuse_unused_options(opts, given)
    return opts, None


def _training_backend(backend, source):
    """The backend asked for; else the one of the arrays given; else torch if installed, else jax."""
    if backend is None:
        backend = source.native.name if source.native is not None else default_backend()
    b = get_backend(backend)
    if not b.has_autodiff:
        raise ValueError(f"backend {b.name!r} cannot train (no autodiff); use backend='torch' or 'jax'")
    return b


def _planned_iterations(opts: FitOptions, n_train: int) -> int:
    """``max_iters``, or fewer when ``epochs`` passes over the training rows come first."""
    if opts.epochs is None:
        return opts.max_iters
    return min(opts.max_iters, int(math.ceil(opts.epochs * n_train / opts.batch_size)))


class _Run:
    """One run of the training loop: the parts ``fit`` assembled, and the loop over them.

    The state that a checkpoint restores is ``state`` (counters, history, best parameters),
    ``rng`` (the batches) and the trainer (parameters, optimizer state); the rest is
    derived from the options and the data. ``replicas`` is this process's place in a
    data-parallel run (one process by default): every process keeps the same state.
    """

    def __init__(self, opts: FitOptions, backend, dtype, device, data: TrainingData, rng: np.random.Generator,
                 trainer, flows: FlowBuilder, state: TrainingState, checkpoints: CheckpointWriter,
                 replicas: Replicas | None = None, *, stages: list[Stage], stage_index: int, batches=sample_batch):
        self.opts, self.backend, self.dtype, self.device = opts, backend, dtype, device
        # the stage this loop trains (one objective, its schedule and cadences) among the
        # run's; a one-objective run is one stage
        self.stages = stages
        self.stage = stages[stage_index]
        self.replicas = replicas if replicas is not None else Replicas()
        self.batches = batches  # (data, rng, batch_size, backend, dtype, device[, part=]) -> batch
        self.data, self.rng, self.trainer, self.flows = data, rng, trainer, flows
        self.state, self.checkpoints = state, checkpoints
        last = stage_index == len(self.stages) - 1
        # an earlier stage is validated at its end as on its cadence (the next stage starts
        # from it); the last one ends as a one-stage run does (Validation.final)
        self.validation = Validation(data.val, self.stage.eval_every, opts.patience if last else None,
                                     start=self.stage.start, end=None if last else self.stage.end)
        self.conditional = data.context_dim > 0
        self.stop = StopSignals()
        self.last_record: dict | None = None
        self.best = None  # (NLL, iteration, parameters) counting an end-of-run evaluation

    def train(self, max_iters: int) -> Flow:
        """Run until ``max_iters``, a stop condition or a failure; return the flow."""
        state = self.state
        started = time.perf_counter() - state.elapsed
        main = self.replicas.is_main  # only the main process writes the history and shows the bar
        with self.stop, RunLog(self.opts.history if main else None, self.opts.quiet or not main,
                               list(state.history), max_iters, what=self.stage.objective) as log:
            stopping = state.iteration >= max_iters or self._asked_to_stop(started)
            while not stopping:
                record, status = self._step()
                state.iteration += 1
                state.elapsed = time.perf_counter() - started
                state.history.append(record)
                self.last_record = record
                self._apply_failure_policy(record, status, log)
                # decided before validating: a run that max_time ends is validated at its
                # last iteration, as one that max_iters ends (else fit would return
                # parameters up to eval_every iterations old); a stop signal is not
                # (the user asked to stop now)
                # the signals first: one received during a stage's last iteration ends the run too
                stopping = self._asked_to_stop(started) or state.iteration >= max_iters
                self._validate(record, final=stopping and self.stop.received is None)
                record["elapsed"] = time.perf_counter() - started  # the run's wall time, validation included
                log.write(record)
                if self.checkpoints.path is not None and self.stage.is_due(state.iteration,
                                                                           self.stage.checkpoint_every):
                    self._write_checkpoint()
                if self._out_of_patience():
                    break
            self._write_checkpoint()
        return self._result()

    # ---- the parts of one iteration ------------------------------------------------------
    def _asked_to_stop(self, started: float) -> bool:
        """A stop signal or ``max_time``, agreed by every process of a data-parallel run."""
        out_of_time = self.opts.max_time is not None and time.perf_counter() - started >= self.opts.max_time
        if not self.replicas.stop_requested(self.stop.received is not None or out_of_time):
            return False
        if self.stop.received is not None or self.replicas.processes > 1:
            who = (self.stop.name if self.stop.received is not None else "max_time" if out_of_time else
                   "a stop request from another process")
            where = (f"writing a final checkpoint to {self.opts.checkpoint!r}" if self.opts.checkpoint else
                     "no checkpoint= was given, so nothing is written")
            warnings.warn(f"{who} received: stopping at iteration {self.state.iteration}, {where}",
                          RuntimeWarning, stacklevel=4)
        return True

    def _out_of_patience(self) -> bool:
        """``patience`` ran out; in a data-parallel run, decided together at evaluations."""
        if self.replicas.processes == 1:
            return self.validation.out_of_patience(self.state)
        if not self.validation.is_due(self.state.iteration):
            return False
        return self.replicas.agree_any(self.validation.out_of_patience(self.state))

    def _step(self) -> tuple[dict, object]:
        """One training step on a fresh batch: its history record and its solve's status
        (a backend scalar, read only when the step failed)."""
        b, it = self.backend, self.state.iteration
        t0 = time.perf_counter()  # the iteration's time includes drawing (and coupling) its batch
        batch_size = self.stage.options.batch_size
        part = self.replicas.rows(batch_size)
        if part is None:
            x = self.batches(self.data, self.rng, batch_size, b, self.dtype, self.device)
        else:
            x = self.batches(self.data, self.rng, batch_size, b, self.dtype, self.device, part=part)
        x = self.replicas.place_batch(x)
        key = b.key(_iteration_seed(self.opts.seed, it))
        lr = self.stage.learning_rate(it) * backoff_factor(self.opts, self.state)
        m = self.trainer.step(x, key, lr)
        return {"it": it, "loss": float(b.to_numpy(m["loss"])), "nll": float(b.to_numpy(m["nll"])),
                "kinetic": float(b.to_numpy(m["kinetic"])), "jacobian": float(b.to_numpy(m["jacobian"])),
                "nfe_forward": int(b.to_numpy(m["nfe"])), "nfe_backward": None, "lr": lr,
                "grad_norm": float(b.to_numpy(m["grad_norm"])), "applied": bool(m["applied"]),
                "objective": self.stage.objective, "sec": time.perf_counter() - t0}, m["status"]

    def _apply_failure_policy(self, record: dict, status, log: RunLog) -> None:
        count_outcome(self.opts, self.state, record["applied"])
        if record["applied"]:
            return
        why = failure_reason(int(self.backend.to_numpy(status)))
        if self.state.consecutive_failures >= self.opts.max_failures:
            log.write(record)
            raise training_failed(self.opts, self.checkpoints.iteration_on_disk, record["it"], why, self._result())
        warnings.warn(skip_message(self.opts, self.state, record["it"], why), RuntimeWarning, stacklevel=4)

    def _validate(self, record: dict, *, final: bool) -> None:
        if self.validation.is_due(self.state.iteration):
            flow = self._validated(self.flows.flow(self._params()))
            self.validation.evaluate(self.state, flow, self.params_on_host, record)
        elif final and self.validation.rows is not None:
            self._write_checkpoint()  # before the end-of-run evaluation, which a resumed run must not see
            flow = self._validated(self.flows.flow(self._params()))
            self.best = self.validation.final(self.state, flow, self.params_on_host, record)

    def _validated(self, flow):
        """What validation evaluates: the flow, or a conditional flow bound to the held-out
        rows' contexts."""
        return _WithValidationContext(flow, self.data.val_context) if self.conditional else flow

    def _params(self):
        """The trainer's parameters on the run's device (a mesh's replicated arrays, gathered)."""
        return self.replicas.on_device(self.trainer.params, self.device)

    @property
    def interrupted(self) -> bool:
        """Whether a stop signal (SIGINT, SIGTERM) ended the loop."""
        return self.stop.received is not None

    def params_on_host(self) -> dict:
        """The trainer's current parameters as numpy arrays (what a validation keeps as the best,
        and what the next stage starts from)."""
        b = self.backend
        return b.tree_map(lambda a: b.to_numpy(a).copy(), self.trainer.params)

    def _write_checkpoint(self) -> None:
        if self.checkpoints.path is not None:
            self.checkpoints.write(self.state, self.trainer, self.flows.flow(self._params()).header(),
                                   self.rng, stage=self.stage.objective)

    # ---- the result ----------------------------------------------------------------------
    def _result(self) -> Flow:
        state = self.state
        best_val, best_iteration, best_params = self.best or (state.best_val, state.best_iteration,
                                                             state.best_params)
        info = {"iterations": state.iteration, "best_iteration": best_iteration, "best_val_nll": best_val,
                "skipped_iterations": state.skipped, "seconds": state.elapsed, "backend": self.backend.name,
                "options": dataclasses.asdict(self.opts), "last": self.last_record,
                "interrupted": self.stop.received is not None, "data_parallel": self.replicas.describe(),
                "stages": [{"objective": s.objective, "start": s.start, "end": s.end} for s in self.stages],
                "checkpoint": self.opts.checkpoint if self.checkpoints.iteration_on_disk >= 0 else None}
        params = best_params if best_params is not None else self._params()
        return self.flows.flow(params, history=state.history, fit_info=info)


class _WithValidationContext:
    """A conditional flow as validation calls it, ``log_prob(val_rows, on_failure=...)``,
    evaluated with the validation rows' contexts (validation always passes the same rows)."""

    def __init__(self, flow: Flow, contexts: np.ndarray):
        self.flow = flow
        self.contexts = contexts

    def log_prob(self, x, **kwargs):
        return self.flow.log_prob(x, context=self.contexts, **kwargs)


def _iteration_seed(seed: int, iteration: int) -> int:
    """The seed of iteration ``iteration``'s key (its Hutchinson probe): a function of the
    run's seed and the iteration only, so a resumed run draws the same probes."""
    return int(np.random.SeedSequence([seed, iteration, 0x0F10]).generate_state(1)[0])
