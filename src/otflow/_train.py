"""``otflow.fit``: train an RNODE flow end to end.

The loop is written once here; each backend supplies only its training step
(``backend.make_trainer``: torch.optim + autograd on torch, one jitted optax
update on JAX). Everything else — data, standardization, probes, schedules,
validation with the exact trace, early stopping, history, checkpoints, resume,
failure policy — is the same on every backend.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._errors import OtflowError
from ._fields import MLP
from ._flow import Flow, SolverOptions, flow_from_header
from ._objective import rnode_loss
from ._optim import OptimizerSpec
from ._options import unknown_option_message
from .backend import default_backend, get_backend

__all__ = ["FitOptions", "fit", "TrainingFailed", "load_config"]

GRADIENT_MODES = ("direct", "adjoint")
METHODS = ("dopri5", "rk4", "midpoint", "euler")
PROBES = ("gaussian", "rademacher")


class TrainingFailed(OtflowError, RuntimeError):
    """Training stopped after repeated non-finite losses or failed solves; the last good
    checkpoint (if any) is intact and named in the message."""


@dataclass(frozen=True)
class FitOptions:
    """Every option of :func:`fit`, validated. Defaults follow the RNODE recipe (see the user guide)."""

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
    checkpoint: str | None = None
    checkpoint_every: int = 100
    history: str | None = None
    quiet: bool = False

    def __post_init__(self):
        def check(cond, msg):
            if not cond:
                raise ValueError(msg)

        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        object.__setattr__(self, "hidden", hidden)
        check(hidden and all(isinstance(h, int) and h > 0 for h in hidden), f"hidden must be positive ints, got {self.hidden!r}")
        check(isinstance(self.n_blocks, int) and self.n_blocks >= 1, f"n_blocks must be a positive int, got {self.n_blocks!r}")
        check(_positive(self.T), f"T must be a positive finite number, got {self.T!r}")
        check(self.lambda_kinetic >= 0, f"lambda_kinetic must be ≥ 0, got {self.lambda_kinetic}")
        check(self.lambda_jacobian >= 0, f"lambda_jacobian must be ≥ 0, got {self.lambda_jacobian}")
        for name, value, choices in [("probe", self.probe, PROBES), ("method", self.method, METHODS),
                                     ("gradient", self.gradient, GRADIENT_MODES)]:
            if value not in choices:
                raise ValueError(unknown_option_message(name, value, choices))
        for name in ("rtol", "atol", "eval_rtol", "eval_atol"):
            check(_positive(getattr(self, name)), f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("steps", "max_steps", "batch_size", "max_iters", "n_train", "val_points", "eval_every",
                     "checkpoint_every", "max_failures"):
            v = getattr(self, name)
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        check(self.epochs is None or _positive(self.epochs), f"epochs must be positive or None, got {self.epochs!r}")
        check(self.max_time is None or _positive(self.max_time), f"max_time must be positive seconds or None, got {self.max_time!r}")
        check(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        check(self.patience is None or (isinstance(self.patience, int) and self.patience > 0),
              f"patience must be a positive int (evaluations) or None, got {self.patience!r}")
        check(self.dtype in ("float32", "float64"), f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        MLP((2,), hidden=hidden, activation=self.activation, conditioning=self.conditioning)  # validates names
        self.optimizer_spec()  # validates the optimizer options

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
            if key not in names:
                raise TypeError("fit(): " + unknown_option_message("option", key, names))
        return cls(**options)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)


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
        text = str(data)
        if os.path.exists(text) or os.path.splitext(text)[1] in (".npy", ".npz", ".csv"):
            from .datasets import load_array

            return load_array(text), None, None
        from . import datasets

        if text in datasets.names():
            return None, text, None
        raise ValueError(f"{text!r} is neither a file nor a dataset. " +
                         unknown_option_message("dataset", text, datasets.names()))
    backend = None
    if not isinstance(data, np.ndarray) and hasattr(data, "shape") and hasattr(data, "dtype"):
        from .backend import infer_backend

        backend = infer_backend(data)
        data = backend.to_numpy(data)
    arr = np.asarray(data)
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
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"data contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         "drop or impute them first")
    return x


# ------------------------------------------------------------------------------------------
# the loop


@dataclass
class _State:
    iteration: int = 0
    best_val: float = math.inf
    best_iteration: int = -1
    evals_without_improvement: int = 0
    consecutive_failures: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    history: list = field(default_factory=list)


def _iteration_seed(seed: int, iteration: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, 0x0F10]).generate_state(1)[0])


def fit(data, *, backend=None, device=None, config=None, resume=None, **options) -> Flow:
    """Train an RNODE continuous normalizing flow on ``data`` and return the :class:`Flow`.

    ``data``: a numpy array, a torch tensor, a jax array (rows are samples), a path to
    ``.npy``/``.npz``/``.csv``, or an embedded dataset name (``otflow datasets`` lists
    them; toys are sampled afresh, ``n_train`` points). ``backend=None`` follows the array
    type; numpy arrays, paths and names use torch if installed, else jax. ``config``: a
    TOML/YAML file of options (keyword arguments override it). ``resume``: a checkpoint
    written by an earlier run (``checkpoint=``), continued exactly where it stopped.
    Options: the fields of :class:`FitOptions`.
    """
    merged = dict(load_config(config)) if config is not None else {}
    merged.update(options)
    resume_arrays = resume_header = None
    if resume is not None:
        from ._serialize import read_file

        resume_arrays, resume_header = read_file(resume)
        if resume_header.get("kind") != "checkpoint":
            raise ValueError(f"{str(resume)!r} is a saved flow, not a training checkpoint")
        saved = dict(resume_header["options"])
        saved["hidden"] = tuple(saved["hidden"])
        saved.update({k: v for k, v in options.items()})
        merged = saved
    opts = FitOptions.from_mapping(merged)

    x, name, native = _as_numpy_data(data)
    b = get_backend(backend if backend is not None else (native.name if native is not None else default_backend()))
    dev = b.device(device)
    xp = b.namespace()
    dtype = getattr(xp, opts.dtype)
    b.check_dtype(dtype)
    if not b.has_autodiff:
        raise ValueError(f"backend {b.name!r} cannot train (no autodiff); use backend='torch' or 'jax'")
    rng = np.random.default_rng(opts.seed)
    if name is not None:
        from . import datasets

        x = datasets.sample(name, opts.n_train + max(opts.val_points, 1), rng=rng)
    x = _validate_data(x)
    n_val = max(1, min(opts.val_points, int(round(opts.val_fraction * x.shape[0])))) if opts.val_fraction > 0 else 0
    perm = rng.permutation(x.shape[0])
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    if train.shape[0] < 2:
        raise ValueError(f"only {train.shape[0]} training sample(s) after the validation split; "
                         "lower val_fraction or supply more data")
    dim = x.shape[1]
    shift = scale = None
    if opts.standardize:
        shift = train.mean(axis=0)
        scale = train.std(axis=0)
        const = np.nonzero(scale <= 1e-12 * np.maximum(1.0, np.abs(shift)))[0]
        if const.size:
            raise ValueError(f"data column(s) {const.tolist()} are constant (zero variance): a density over them "
                             "is degenerate. Drop them, or pass standardize=False and add noise.")

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
    train_std = (train - shift) / scale if opts.standardize else train
    val_b = None
    if n_val:
        val_b = val

    history_file = open(opts.history, "a" if resume is not None else "w") if opts.history else None
    progress = None
    if not opts.quiet:
        try:
            from tqdm.auto import tqdm

            progress = tqdm(total=max_iters, initial=state.iteration, desc="otflow fit", unit="it", leave=True)
        except ImportError:  # pragma: no cover
            progress = None

    interrupted = {"flag": False}
    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGINT, lambda *_: interrupted.__setitem__("flag", True))
    except ValueError:  # not the main thread
        previous_handler = None

    def current_flow(p):
        flow.params = tuple(p["fields"])
        if opts.learn_T:
            flow.T = tuple(float(v) for v in b.to_numpy(xp.exp(p["log_T"])))
        return flow

    def save_checkpoint():
        if opts.checkpoint is None:
            return
        _write_checkpoint(opts, trainer, b, current_flow(trainer.params), state, best_params, rng)

    start = time.perf_counter() - state.elapsed
    last_metrics = None
    try:
        while state.iteration < max_iters:
            if interrupted["flag"]:
                warnings.warn("interrupted: stopping after a final checkpoint", RuntimeWarning, stacklevel=2)
                break
            if opts.max_time is not None and time.perf_counter() - start >= opts.max_time:
                break
            it = state.iteration
            idx = rng.integers(0, n_train, opts.batch_size)
            xb = b.asarray(train_std[idx], dtype=dtype, device=dev)
            key = b.key(_iteration_seed(opts.seed, it))
            lr = spec.learning_rate(it)
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
            else:
                state.consecutive_failures += 1
                state.skipped += 1
                status = int(b.to_numpy(m["status"]))
                why = "the training solve failed (max steps or step underflow)" if status else "a non-finite loss or gradient"
                warnings.warn(f"iteration {it}: skipped ({why}); parameters kept at the last good state "
                              f"({state.consecutive_failures} in a row)", RuntimeWarning, stacklevel=2)
                if state.consecutive_failures >= opts.max_failures:
                    where = f" The last good checkpoint is {opts.checkpoint!r}." if opts.checkpoint else ""
                    raise TrainingFailed(
                        f"{opts.max_failures} consecutive iterations failed ({why}) at iteration {it}.{where} "
                        "Remedies: lower lr, set clip_norm, raise lambda_kinetic/lambda_jacobian, raise max_steps, "
                        "or train with method='rk4'.")
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
                history_file.write(json.dumps(record) + "\n")
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
        if progress is not None:
            progress.close()
        if history_file:
            history_file.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)

    final = b.tree_map(lambda a: b.asarray(a, dtype=dtype, device=dev), best_params) if best_params is not None \
        else trainer.params
    result = current_flow(final)
    result._compiled = {}
    result.history = state.history
    result.fit_info = {"iterations": state.iteration, "best_iteration": state.best_iteration,
                       "best_val_nll": state.best_val, "skipped_iterations": state.skipped,
                       "seconds": state.elapsed, "backend": b.name, "options": dataclasses.asdict(opts),
                       "last": last_metrics}
    return result


def _evaluate(flow: Flow, x: np.ndarray) -> tuple[float, float]:
    """Mean NLL and its standard error with the evaluation solver and the exact trace."""
    logp = np.asarray(flow.log_prob(x, on_failure="nan"), dtype=np.float64)
    logp = logp[np.isfinite(logp)]
    if logp.size == 0:
        return math.inf, math.inf
    return float(-logp.mean()), float(logp.std(ddof=1) / math.sqrt(max(1, logp.size)) if logp.size > 1 else math.nan)


# ------------------------------------------------------------------------------------------
# checkpoints


def _write_checkpoint(opts, trainer, b, flow, state, best_params, rng):
    from ._serialize import named_arrays, write_file

    arrays = {k: b.to_numpy(v) for k, v in named_arrays(trainer.params, "train").items()}
    arrays.update({k: b.to_numpy(v) for k, v in named_arrays(tuple(trainer.params["fields"]), "params").items()})
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
    }
    header["options"]["hidden"] = list(opts.hidden)
    write_file(opts.checkpoint, arrays, _jsonable(header))


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _restore(arrays, header, trainer, b, dtype, dev, template):
    from ._serialize import fill_tree

    convert = lambda v: np.asarray(v)  # noqa: E731
    params = fill_tree(template, arrays, "train", lambda v: v)
    trainer.set_params(params)
    trainer.load_optimizer_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
    st = dict(header["state"])
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
