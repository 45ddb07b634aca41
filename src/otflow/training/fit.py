"""``otflow.fit``: train an RNODE flow end to end.

The loop is written once here; each backend supplies only its training step
(``backend.make_trainer``: torch.optim + autograd on torch, one jitted optax
update on JAX). Everything else — data, standardization, probes, schedules,
validation with the exact trace, early stopping, history, checkpoints, resume,
failure policy — is the same on every backend.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..base.errors import OtflowError, Status
from ..cnf.fields import ACTIVATIONS, CONDITIONINGS, MLP
from ..cnf.flow import Flow, SolverOptions, flow_from_header
from ..cnf.objective import rnode_loss
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec
from ..base.options import unknown_option_message
from ..base import default_backend, get_backend

__all__ = ["FitOptions", "fit", "TrainingFailed", "load_config"]

GRADIENT_MODES = ("direct", "adjoint")
METHODS = ("dopri5", "rk4", "midpoint", "euler")
PROBES = ("gaussian", "rademacher")


class TrainingFailed(OtflowError, RuntimeError):
    """Training stopped after ``max_failures`` consecutive non-finite losses or failed solves.

    The last good checkpoint (if any) is intact and named in the message. Attributes:
    ``checkpoint`` (its path or None), ``checkpoint_iteration``, ``iteration`` (the last
    failed one) and ``flow`` (the last good parameters: the best validated ones if any).
    """

    checkpoint: str | None = None
    checkpoint_iteration: int | None = None
    iteration: int | None = None
    flow: Any = None


@dataclass(frozen=True)
class FitOptions:
    """Every option of :func:`fit`, validated. Defaults follow the RNODE recipe (see the user guide).

    Failure policy (``docs/troubleshooting.md``): an iteration whose loss or gradient is
    not finite, or whose training solve fails (``max_steps`` reached, step-size
    underflow), is skipped with a warning; parameters and optimizer state stay at the
    last good state. The learning rate is then multiplied by ``lr_backoff`` (default
    0.5; 1 disables the back-off) for the following iterations, and recovers
    geometrically: each applied iteration multiplies it by ``(1/lr_backoff)**(1/lr_recovery)``
    until the schedule's rate is reached again, so one back-off is undone over
    ``lr_recovery`` (default 10) good iterations. After ``max_failures`` consecutive
    skipped iterations :class:`TrainingFailed` is raised, naming the last checkpoint.
    """

    # model
    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    conditioning: str = "concatsquash"
    zero_last: bool = True
    n_blocks: int = 1
    T: float = 1.0
    learn_T: bool = False
    # objective
    lambda_kinetic: float = 0.01
    lambda_jacobian: float = 0.01
    probe: str = "gaussian"
    # training solver
    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int = 8
    gradient: str = "direct"
    max_steps: int = 1000
    # evaluation solver (exact trace)
    eval_rtol: float = 1e-5
    eval_atol: float = 1e-5
    # optimization
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "constant"
    clip_norm: float | None = None
    batch_size: int = 512
    max_iters: int = 1000
    epochs: float | None = None
    max_time: float | None = None
    # data
    n_train: int = 50_000
    standardize: bool = True
    val_fraction: float = 0.1
    val_points: int = 2000
    eval_every: int = 100
    patience: int | None = None
    # numerics and bookkeeping
    dtype: str = "float32"
    seed: int = 0
    max_failures: int = 10
    lr_backoff: float = 0.5
    lr_recovery: int = 10
    checkpoint: str | None = None
    checkpoint_every: int = 100
    history: str | None = None
    quiet: bool = False

    def __post_init__(self):
        # Every check names the option, the value and what is accepted, and runs before any
        # framework is touched. Numpy scalars become Python numbers and paths become strings,
        # so the options always serialize into a checkpoint header.
        def fail(msg, exc=ValueError):
            raise exc(msg)

        def put(name, value):
            object.__setattr__(self, name, value)

        def integer(name, minimum=1, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
                fail(f"{name} must be an int ≥ {minimum}{' or None' if optional else ''}, got {v!r}", TypeError)
            if v < minimum:
                fail(f"{name} must be an int ≥ {minimum}{' or None' if optional else ''}, got {v!r}")
            put(name, int(v))

        def real(name, *, low=0.0, low_open=True, high=math.inf, high_open=True, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            where = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            if not _is_real(v):
                fail(f"{name} must be a number in {where}{' or None' if optional else ''}, got {v!r}", TypeError)
            v = float(v)
            ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
            if not ok:
                fail(f"{name} must be a finite number in {where}{' or None' if optional else ''}, got {v!r}")
            put(name, v)

        def choice(name, choices):
            v = getattr(self, name)
            if not isinstance(v, str):
                fail(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}", TypeError)
            if v not in choices:
                fail(unknown_option_message(name, v, choices))

        def flag(name):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                fail(f"{name} must be True or False, got {v!r}", TypeError)
            put(name, bool(v))

        def path(name):
            v = getattr(self, name)
            if v is None:
                return
            if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
                fail(f"{name} must be a file path (str or pathlib.Path) or None, got {v!r}", TypeError)
            put(name, os.fspath(v))

        hidden = self.hidden
        if isinstance(hidden, (int, np.integer)) and not isinstance(hidden, (bool, np.bool_)):
            hidden = (hidden,)
        if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
            fail(f"hidden must be a sequence of positive ints (layer widths), e.g. (64, 64), got {self.hidden!r}",
                 TypeError)
        hidden = tuple(hidden)
        if not hidden or not all(isinstance(h, (int, np.integer)) and not isinstance(h, (bool, np.bool_)) and h > 0
                                 for h in hidden):
            fail(f"hidden must be a non-empty sequence of positive ints (layer widths), e.g. (64, 64), "
                 f"got {self.hidden!r}")
        put("hidden", tuple(int(h) for h in hidden))
        choice("activation", ACTIVATIONS)
        choice("conditioning", CONDITIONINGS)
        for name in ("zero_last", "learn_T", "standardize", "quiet"):
            flag(name)
        integer("n_blocks")
        real("T")
        real("lambda_kinetic", low_open=False)
        real("lambda_jacobian", low_open=False)
        choice("probe", PROBES)
        choice("method", METHODS)
        choice("gradient", GRADIENT_MODES)
        for name in ("rtol", "atol", "eval_rtol", "eval_atol"):
            real(name)
        for name in ("steps", "max_steps", "batch_size", "max_iters", "n_train", "val_points", "eval_every",
                     "checkpoint_every", "max_failures", "lr_recovery"):
            integer(name)
        integer("warmup", minimum=0)
        integer("seed", minimum=0)
        if self.seed >= 2 ** 63:
            fail(f"seed must be below 2**63, got {self.seed}")
        integer("patience", optional=True)
        choice("optimizer", OPTIMIZERS)
        choice("schedule", SCHEDULES)
        real("lr")
        real("weight_decay", low_open=False)
        real("clip_norm", optional=True)
        real("epochs", optional=True)
        real("max_time", optional=True)
        real("val_fraction", low_open=False, high=1.0)
        real("lr_backoff", high=1.0, high_open=False)
        choice("dtype", ("float32", "float64"))
        path("checkpoint")
        path("history")
        self.optimizer_spec()  # the optimizer's own checks

    def optimizer_spec(self) -> OptimizerSpec:
        return OptimizerSpec(name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                             warmup=self.warmup, schedule=self.schedule, total_iters=self.max_iters)

    def train_solver_kwargs(self) -> dict:
        if self.method == "dopri5":
            kw = dict(method="dopri5", rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        else:
            kw = dict(method=self.method, n_steps=self.steps)
        if self.gradient == "adjoint":
            kw["gradient"] = "adjoint"
        return kw

    @classmethod
    def from_mapping(cls, options: dict) -> "FitOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if not isinstance(key, str):
                raise TypeError(f"fit(): option names must be strings, got {key!r}")
            if key not in names:
                raise TypeError("fit(): " + unknown_option_message("option", key, names))
        return cls(**options)


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def load_config(path) -> dict:
    """Options from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file; keys are validated by :func:`fit`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ImportError("reading a YAML config needs PyYAML: pip install pyyaml (or use TOML)") from None
        data = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"config {str(path)!r}: use a .toml or .yaml file")
    if not isinstance(data, dict):
        raise ValueError(f"config {str(path)!r} must hold a table of options")
    data = data.get("fit", data)
    if "hidden" in data and isinstance(data["hidden"], list):
        data["hidden"] = tuple(data["hidden"])
    return data


# ------------------------------------------------------------------------------------------
# data


def _as_numpy_data(data) -> tuple[np.ndarray | None, str | None, Any]:
    """``(array, dataset_name, native_backend)`` from an array, a path or a dataset name."""
    if isinstance(data, (str, os.PathLike)):
        text = os.fspath(data)
        if not isinstance(text, str):
            text = os.fsdecode(text)
        if os.path.exists(text) or os.path.splitext(text)[1].lower() in (".npy", ".npz", ".csv"):
            from .datasets import load_array

            return load_array(text), None, None
        from . import datasets

        if text in datasets.names():
            return None, text, None
        raise ValueError(f"{text!r} is neither an existing file (.npy, .npz, .csv) nor an embedded dataset. " +
                         unknown_option_message("dataset", text, datasets.names()))
    backend = None
    if not isinstance(data, np.ndarray) and hasattr(data, "shape") and hasattr(data, "dtype"):
        from ..base import infer_backend

        try:
            backend = infer_backend(data)
        except TypeError:
            backend = None  # another array library: numpy conversion below, or a clear error
        else:
            data = backend.to_numpy(data)
    try:
        arr = np.asarray(data)
    except Exception as e:  # ragged lists, tensors numpy cannot read, ...
        raise TypeError(f"data could not be read as an array ({type(e).__name__}: {e}); pass a 2-D numpy array "
                        "of shape (n_samples, n_features), a torch tensor, a jax array, a file path or a "
                        "dataset name") from None
    return arr, None, backend


def _validate_data(x: np.ndarray) -> np.ndarray:
    if x.dtype.kind == "c":
        raise TypeError("data is complex; a density model needs real values (take .real/.imag or stack them)")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"data must be numeric, got dtype {x.dtype}; convert it with np.asarray(data, float)")
    x = x.astype(np.float64)
    if x.ndim != 2:
        hint = " (a single feature? use x[:, None])" if x.ndim == 1 else ""
        raise ValueError(f"data must be a 2-D array (n_samples, n_features), got shape {x.shape}{hint}")
    if x.shape[0] < 2:
        raise ValueError(f"data has {x.shape[0]} sample(s); fitting a density needs at least 2")
    if x.shape[1] == 0:
        raise ValueError(f"data has shape {x.shape}: no features (columns); pass (n_samples, n_features)")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"data contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         "drop or impute them first")
    return x


def _data_digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# the loop


#: options that fix the layout of the parameters and the optimizer state: a resumed run keeps them
_STRUCTURAL = ("hidden", "activation", "conditioning", "n_blocks", "learn_T", "optimizer", "dtype")


@dataclass
class _State:
    iteration: int = 0
    best_val: float = math.inf
    best_iteration: int = -1
    evals_without_improvement: int = 0
    consecutive_failures: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    lr_debt: int = 0  # good iterations until the learning rate is back (lr_recovery per back-off)
    last_checkpoint: int = -1
    history: list = field(default_factory=list)


def _iteration_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, 0x0F10]).generate_state(1)[0])


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current iteration and a
    final checkpoint; a second signal aborts at once with ``KeyboardInterrupt`` (an atomic
    checkpoint write in progress then leaves the previous file intact). Installed only in
    the main thread; the previous handlers come back when ``fit`` returns."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # pragma: no cover - exotic embeddings
                pass

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: training aborted")
        self.received = signum

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


def _merge_resume(resume, options: dict, merged: dict):
    """The options of a resumed run: the checkpoint's, overridden by the keyword arguments."""
    from ..cnf.serialize import ModelFileError, read_file

    arrays, header = read_file(resume)
    if header.get("kind") != "checkpoint":
        raise ValueError(f"{os.fspath(resume)!r} is a saved flow, not a training checkpoint; resume= needs the "
                         "file written by fit(checkpoint=...). To fine-tune a saved flow, start a new run.")
    try:
        saved = dict(header["options"])
        known = {f.name for f in dataclasses.fields(FitOptions)}
        saved = {k: v for k, v in saved.items() if k in known}
        saved["hidden"] = tuple(saved["hidden"])
        saved_opts = FitOptions.from_mapping(saved)
        header["state"], header["rng"]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{os.fspath(resume)!r}: the checkpoint's header is incomplete or from an "
                             f"incompatible otflow version ({e})") from None
    overrides = dict(merged)
    overrides.update(options)
    new = FitOptions.from_mapping({**saved, **overrides})
    changed = [k for k in _STRUCTURAL if getattr(new, k) != getattr(saved_opts, k)]
    if changed:
        raise ValueError(
            "resume: " + ", ".join(f"{k}={getattr(new, k)!r} (checkpoint: {getattr(saved_opts, k)!r})" for k in changed)
            + " would change the model or optimizer layout the checkpoint holds. Drop these options to continue "
            "the run, or start a new run without resume=.")
    return new, arrays, header


def fit(data, *, backend=None, device=None, config=None, resume=None, **options) -> Flow:
    """Train an RNODE continuous normalizing flow on ``data`` and return the :class:`Flow`.

    ``data``: a numpy array, a torch tensor, a jax array (rows are samples), a path to
    ``.npy``/``.npz``/``.csv``, or an embedded dataset name (``otflow datasets`` lists
    them; toys are sampled afresh, ``n_train`` points). ``backend=None`` follows the array
    type; numpy arrays, paths and names use torch if installed, else jax. ``config``: a
    TOML/YAML file of options (keyword arguments override it). ``resume``: a checkpoint
    written by an earlier run (``checkpoint=``), continued exactly where it stopped (the
    options not given here are the checkpoint's; those fixing the model's layout cannot
    change). Options: the fields of :class:`FitOptions`.

    Everything given is validated before anything is computed or compiled. Numerical
    faults follow the policy of :class:`FitOptions` (skip, back off, stop with
    :class:`TrainingFailed` after ``max_failures`` in a row). Ctrl-C (SIGINT) or SIGTERM
    stops after the current iteration, writes a final checkpoint and returns the flow
    (``fit_info["interrupted"]`` is True); a second Ctrl-C aborts at once.
    """
    merged = dict(load_config(config)) if config is not None else {}
    merged.update(options)
    resume_arrays = resume_header = None
    if resume is not None:
        opts, resume_arrays, resume_header = _merge_resume(resume, options, merged)
    else:
        opts = FitOptions.from_mapping(merged)

    x, name, native = _as_numpy_data(data)
    if x is not None:
        x = _validate_data(x)  # before the backend: bad data never waits for a framework import
    b = get_backend(backend if backend is not None else (native.name if native is not None else default_backend()))
    if not b.has_autodiff:
        raise ValueError(f"backend {b.name!r} cannot train (no autodiff); use backend='torch' or 'jax'")
    dev = b.device(device)
    xp = b.namespace()
    dtype = getattr(xp, opts.dtype)
    b.check_dtype(dtype)
    rng = np.random.default_rng(opts.seed)
    if name is not None:
        from . import datasets

        x = _validate_data(datasets.sample(name, opts.n_train + max(opts.val_points, 1), rng=rng))
    digest = _data_digest(x)
    if resume_header is not None and resume_header.get("data_digest", digest) != digest:
        warnings.warn(f"resume: the data differ from those the checkpoint {os.fspath(resume)!r} was trained on; "
                      "the run continues on the new data", UserWarning, stacklevel=2)
    n_val = max(1, min(opts.val_points, int(round(opts.val_fraction * x.shape[0])))) if opts.val_fraction > 0 else 0
    perm = rng.permutation(x.shape[0])
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    if train.shape[0] < 2:
        raise ValueError(f"only {train.shape[0]} training sample(s) after the validation split; "
                         "lower val_fraction or supply more data")
    dim = x.shape[1]
    shift = scale = None
    if opts.standardize:
        with np.errstate(over="ignore", invalid="ignore"):
            shift = train.mean(axis=0)
            scale = train.std(axis=0)
        if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
            raise ValueError(f"data values are too large to standardize in float64 (max |x| = "
                             f"{np.max(np.abs(train)):.3g}); rescale the data first")
        const = np.nonzero(scale <= 1e-12 * np.maximum(1.0, np.abs(shift)))[0]
        if const.size:
            raise ValueError(f"data column(s) {const.tolist()} are constant (zero variance): a density over them "
                             "is degenerate. Drop them, or pass standardize=False and add noise.")
    train_std = (train - shift) / scale if opts.standardize else train
    limit = float(np.finfo(np.dtype(opts.dtype)).max)
    if np.max(np.abs(train_std)) >= limit:
        raise ValueError(f"data values exceed the range of {opts.dtype} (max |x| = {np.max(np.abs(train_std)):.3g}); "
                         "rescale the data, or keep standardize=True")

    fields = [MLP((dim,), hidden=opts.hidden, activation=opts.activation, conditioning=opts.conditioning,
                  zero_last=opts.zero_last) for _ in range(opts.n_blocks)]
    keys = b.split(b.key(opts.seed), opts.n_blocks)
    field_params = tuple(f.init(b, k, dtype=dtype, device=dev) for f, k in zip(fields, keys))
    params: dict = {"fields": field_params}
    if opts.learn_T:
        params["log_T"] = b.asarray(np.full(opts.n_blocks, math.log(opts.T)), dtype=dtype, device=dev)

    eval_solver = SolverOptions(rtol=opts.eval_rtol, atol=opts.eval_atol)
    flow = Flow(fields, field_params, backend=b, device=dev, dtype=opts.dtype, T=opts.T, shift=shift, scale=scale,
                eval_solver=eval_solver)
    solver_kwargs = opts.train_solver_kwargs()
    if not b.eager and opts.method == "dopri5" and opts.gradient == "direct":
        solver_kwargs["loop_kind"] = "checkpointed"

    def loss_fn(p, xb, key):
        xp_ = b.namespace()
        eps = (b.normal if opts.probe == "gaussian" else b.rademacher)(key, tuple(xb.shape), dtype=xb.dtype,
                                                                     device=b.device_of(xb))
        if opts.learn_T:
            Ts = [xp_.exp(p["log_T"][i]) for i in range(opts.n_blocks)]
        else:
            Ts = [opts.T] * opts.n_blocks
        out = rnode_loss(b, fields, p["fields"], xb, eps, T=Ts, lambda_kinetic=opts.lambda_kinetic,
                         lambda_jacobian=opts.lambda_jacobian, solver_kwargs=solver_kwargs)
        aux = {"nll": out.nll, "kinetic": out.kinetic, "jacobian": out.jacobian, "nfe": out.nfe,
               "status": out.status}
        return out.loss, aux

    spec = opts.optimizer_spec()
    trainer = b.make_trainer(loss_fn, params, spec)
    state = _State()
    best_params = None
    if resume_arrays is not None:
        state, best_params, rng = _restore(resume_arrays, resume_header, trainer, b, dtype, dev, params)

    n_train = train.shape[0]
    max_iters = opts.max_iters
    if opts.epochs is not None:
        max_iters = min(max_iters, int(math.ceil(opts.epochs * n_train / opts.batch_size)))
    val_b = val if n_val else None

    history_file = None
    if opts.history:
        # a resumed run rewrites the history up to its checkpoint: records of iterations that
        # ran after that checkpoint (then were lost to a kill) are not kept twice
        history_file = open(opts.history, "w")
        for record in state.history:
            history_file.write(json.dumps(record) + "\n")
        history_file.flush()
    progress = None
    if not opts.quiet:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=max_iters, initial=state.iteration, desc="otflow fit", unit="it", leave=True)
        except ImportError:  # pragma: no cover
            progress = None

    def current_flow(p):
        flow.params = tuple(p["fields"])
        if opts.learn_T:
            flow.T = tuple(float(v) for v in b.to_numpy(xp.exp(p["log_T"])))
        return flow

    # the iteration the file at opts.checkpoint holds (-1: none yet); a resumed run writing to
    # the file it resumed from starts with that file's iteration
    same_file = resume is not None and opts.checkpoint is not None and \
        os.path.abspath(os.fspath(resume)) == os.path.abspath(opts.checkpoint)
    on_disk = {"iteration": state.last_checkpoint if same_file else -1}

    def save_checkpoint():
        if opts.checkpoint is None or on_disk["iteration"] == state.iteration:
            return
        state.last_checkpoint = state.iteration
        _write_checkpoint(opts, trainer, b, current_flow(trainer.params), state, best_params, rng, digest)
        on_disk["iteration"] = state.iteration

    def finished_flow():
        final = b.tree_map(lambda a: b.asarray(a, dtype=dtype, device=dev), best_params) \
            if best_params is not None else trainer.params
        result = current_flow(final)
        result._compiled = {}
        result.history = state.history
        result.fit_info = {"iterations": state.iteration, "best_iteration": state.best_iteration,
                           "best_val_nll": state.best_val, "skipped_iterations": state.skipped,
                           "seconds": state.elapsed, "backend": b.name, "options": dataclasses.asdict(opts),
                           "last": last_metrics, "interrupted": stop.received is not None,
                           "checkpoint": opts.checkpoint if on_disk["iteration"] >= 0 else None}
        return result

    stop = _StopSignals()
    stop.install()
    start = time.perf_counter() - state.elapsed
    last_metrics = None
    try:
        while state.iteration < max_iters:
            if stop.received is not None:
                where = (f"writing a final checkpoint to {opts.checkpoint!r}" if opts.checkpoint else
                         "no checkpoint= was given, so nothing is written")
                warnings.warn(f"{signal.Signals(stop.received).name} received: stopping at iteration "
                              f"{state.iteration}, {where}", RuntimeWarning, stacklevel=2)
                break
            if opts.max_time is not None and time.perf_counter() - start >= opts.max_time:
                break
            it = state.iteration
            idx = rng.integers(0, n_train, opts.batch_size)
            xb = b.asarray(train_std[idx], dtype=dtype, device=dev)
            key = b.key(_iteration_seed(opts.seed, it))
            lr = spec.learning_rate(it) * _backoff_factor(opts, state)
            t0 = time.perf_counter()
            m = trainer.step(xb, key, lr)
            record = {"it": it, "loss": float(b.to_numpy(m["loss"])), "nll": float(b.to_numpy(m["nll"])),
                      "kinetic": float(b.to_numpy(m["kinetic"])), "jacobian": float(b.to_numpy(m["jacobian"])),
                      "nfe_forward": int(b.to_numpy(m["nfe"])), "nfe_backward": None, "lr": lr,
                      "grad_norm": float(b.to_numpy(m["grad_norm"])), "applied": bool(m["applied"]),
                      "sec": time.perf_counter() - t0}
            state.iteration += 1
            state.elapsed = time.perf_counter() - start
            if record["applied"]:
                state.consecutive_failures = 0
                state.lr_debt = max(0, state.lr_debt - 1)
            else:
                state.consecutive_failures += 1
                state.skipped += 1
                if opts.lr_backoff < 1:
                    state.lr_debt += opts.lr_recovery
                status = int(b.to_numpy(m["status"]))
                why = (f"the training solve failed ({Status(status).name}: max_steps reached or step-size underflow)"
                       if status else "a non-finite loss or gradient")
                if state.consecutive_failures >= opts.max_failures:
                    state.history.append(record)
                    if history_file:
                        history_file.write(json.dumps(_jsonable(record)) + "\n")
                    raise _training_failed(opts, on_disk["iteration"], it, why, finished_flow())
                backoff = f"; learning rate now ×{_backoff_factor(opts, state):.3g}" if opts.lr_backoff < 1 else ""
                warnings.warn(f"iteration {it}: skipped ({why}); parameters kept at the last good state "
                              f"({state.consecutive_failures} in a row, {opts.max_failures} stop training{backoff})",
                              RuntimeWarning, stacklevel=2)
            if state.iteration % opts.eval_every == 0 or state.iteration == max_iters:
                if val_b is not None:
                    record["val_nll"], record["val_nll_se"] = _evaluate(current_flow(trainer.params), val_b)
                    if record["val_nll"] < state.best_val:
                        state.best_val, state.best_iteration = record["val_nll"], state.iteration
                        state.evals_without_improvement = 0
                        best_params = b.tree_map(lambda a: b.to_numpy(a).copy(), trainer.params)
                    else:
                        state.evals_without_improvement += 1
            state.history.append(record)
            last_metrics = record
            if history_file:
                history_file.write(json.dumps(_jsonable(record)) + "\n")
                history_file.flush()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.3f}", nfe=record["nfe_forward"], refresh=False)
            if opts.checkpoint and state.iteration % opts.checkpoint_every == 0:
                save_checkpoint()
            if opts.patience is not None and state.evals_without_improvement >= opts.patience:
                break
        save_checkpoint()
    finally:
        stop.restore()
        if progress is not None:
            progress.close()
        if history_file:
            history_file.close()
    return finished_flow()


def _backoff_factor(opts, state) -> float:
    """``lr_backoff ** (lr_debt / lr_recovery)``: each skipped iteration adds ``lr_recovery`` to
    the debt (one factor of ``lr_backoff``), each applied one pays 1 back; exactly 1 when paid."""
    return 1.0 if state.lr_debt == 0 else opts.lr_backoff ** (state.lr_debt / opts.lr_recovery)


def _training_failed(opts, saved: int, it, why, flow) -> "TrainingFailed":
    if opts.checkpoint and saved >= 0:
        where = (f" The last good checkpoint is {opts.checkpoint!r} (iteration {saved}); it is "
                 f"intact: otflow.load({opts.checkpoint!r}) gives its flow, and fit(..., resume={opts.checkpoint!r}, "
                 "lr=<smaller>) continues from it.")
    elif opts.checkpoint:
        where = f" No checkpoint was written to {opts.checkpoint!r} before the failure."
    else:
        where = " No checkpoint was configured (checkpoint='run.safetensors' keeps the last good state on disk)."
    err = TrainingFailed(
        f"{opts.max_failures} consecutive iterations failed ({why}), the last at iteration {it}.{where} "
        "The exception's .flow holds the last good parameters. Remedies: lower lr, set clip_norm, raise "
        "lambda_kinetic/lambda_jacobian, raise max_steps, or train with method='rk4'.")
    err.checkpoint = opts.checkpoint if saved >= 0 else None
    err.checkpoint_iteration = saved if saved >= 0 else None
    err.iteration = it
    err.flow = flow
    return err


def _evaluate(flow: Flow, x: np.ndarray) -> tuple[float, float]:
    """Mean NLL and its standard error with the evaluation solver and the exact trace."""
    logp = np.asarray(flow.log_prob(x, on_failure="nan"), dtype=np.float64)
    logp = logp[np.isfinite(logp)]
    if logp.size == 0:
        return math.inf, math.inf
    return float(-logp.mean()), float(logp.std(ddof=1) / math.sqrt(max(1, logp.size)) if logp.size > 1 else math.nan)


# ------------------------------------------------------------------------------------------
# checkpoints


def _write_checkpoint(opts, trainer, b, flow, state, best_params, rng, digest):
    from ..cnf.serialize import named_arrays, write_file

    arrays = {k: b.to_numpy(v) for k, v in named_arrays(trainer.params, "train").items()}
    if best_params is not None:
        arrays.update({k: np.asarray(v) for k, v in named_arrays(tuple(best_params["fields"]), "best").items()})
        if "log_T" in best_params:
            arrays["best_log_T"] = np.asarray(best_params["log_T"])
    arrays.update({f"opt.{k}": v for k, v in trainer.optimizer_state().items()})
    header = {
        "kind": "checkpoint",
        "flow": flow.header(),
        "options": dataclasses.asdict(opts),
        "state": {k: v for k, v in dataclasses.asdict(state).items() if k != "history"},
        "history": state.history,
        "rng": rng.bit_generator.state,
        "data_digest": digest,
    }
    header["options"]["hidden"] = list(opts.hidden)
    write_file(opts.checkpoint, arrays, _jsonable(header))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        obj = float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _restore(arrays, header, trainer, b, dtype, dev, template):
    from ..cnf.serialize import fill_tree

    convert = lambda v: np.asarray(v)  # noqa: E731
    from ..cnf.serialize import ModelFileError

    params = fill_tree(template, arrays, "train", lambda v: v)
    trainer.set_params(params)
    try:
        trainer.load_optimizer_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"the checkpoint's optimizer state does not fit this optimizer ({e}); it was written "
                             "by another otflow version or for other options") from None
    known = {f.name for f in dataclasses.fields(_State)} - {"history"}
    st = {k: v for k, v in dict(header["state"]).items() if k in known}
    state = _State(**{k: (float(v) if isinstance(v, str) else v) for k, v in st.items()})
    state.history = list(header.get("history", []))
    best = None
    if any(k.startswith("best.") for k in arrays):
        best = {"fields": fill_tree(template["fields"], arrays, "best", convert)}
        if "best_log_T" in arrays:
            best["log_T"] = arrays["best_log_T"]
    rng = np.random.default_rng()
    rng.bit_generator.state = header["rng"]
    return state, best, rng
