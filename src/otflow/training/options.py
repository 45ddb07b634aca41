"""The options of :func:`otflow.fit`: :class:`FitOptions`, validated, and config files.

Every choice an option accepts comes from the layer that owns it: solver names from
:data:`otflow.ode.SOLVERS`, gradient modes from :data:`otflow.ode.GRADIENTS`, probes,
activations and conditionings from the CNF layer, optimizers and schedules from
:mod:`otflow.training.optim`. Every check names the option, the value and what is
accepted, and runs before any framework is imported.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..base.options import unknown_option_message
from ..cnf.divergence import PROBES
from ..cnf.fields import ACTIVATIONS, CONDITIONINGS
from ..ode import GRADIENTS, SOLVERS, resolve_solver
from .flow_matching import COUPLINGS, check_coupling_available
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec

__all__ = ["FitOptions", "load_config", "refuse_unused_options", "OBJECTIVES", "METHODS", "STRUCTURAL_OPTIONS", "DTYPES"]

#: training solvers, as the ODE layer names them
METHODS = tuple(SOLVERS)
#: training objectives: RNODE's maximum likelihood with its penalties, conditional flow matching,
#: the two in sequence, or ``"auto"`` (the two stages for vector data, RNODE for images and warm
#: starts: :func:`otflow.training.stages.resolve_objective`)
OBJECTIVES = ("auto", "rnode", "flow-matching", "flow-matching+rnode")
#: floating dtypes a run can train in
DTYPES = ("float32", "float64")
#: options that fix the layout of the parameters and the optimizer state: a resumed run keeps them
STRUCTURAL_OPTIONS = ("hidden", "activation", "conditioning", "n_blocks", "learn_T", "optimizer", "dtype",
                      "n_scales", "blocks_per_scale")


@dataclass(frozen=True)
class FitOptions:
    """Every option of :func:`otflow.fit`, validated. The RNODE objective's defaults follow
    the recipe of Finlay et al., "How to train your neural ODE" (ICML 2020): λ_K = λ_J =
    0.01, T = 1, a Gaussian Hutchinson probe (see the user guide for why Dormand–Prince
    trains RNODE alone by default); the default objective on vector data trains flow
    matching first, then fine-tunes with RNODE (below).

    Failure policy (``docs/troubleshooting.md``): an iteration whose loss or gradient is
    not finite, or whose training solve fails (``max_steps`` reached, step-size
    underflow), is skipped with a warning; parameters and optimizer state stay at the
    last good state. The learning rate is then multiplied by ``lr_backoff`` (default
    0.5; 1 disables the back-off) for the following iterations, and recovers
    geometrically: each applied iteration multiplies it by ``(1/lr_backoff)**(1/lr_recovery)``
    until the schedule's rate is reached again, so one back-off is undone over
    ``lr_recovery`` (default 10) good iterations. After ``max_failures`` consecutive
    skipped iterations :class:`~otflow.TrainingFailed` is raised, naming the last checkpoint.

    Objective: ``"auto"`` (default) is ``"flow-matching+rnode"`` for vector data and
    ``"rnode"`` for image data, for ``init=`` warm starts and with ``learn_T=True``
    (:func:`~otflow.training.stages.resolve_objective`). ``"rnode"`` maximizes the
    likelihood with the kinetic and Jacobian penalties; ``"flow-matching"`` trains the
    same fields simulation-free with the conditional flow-matching loss
    (:mod:`otflow.training.flow_matching`), ``coupling`` ``"independent"`` (its default) or
    ``"ot"`` (exact mini-batch optimal transport); the training solver, probe and λ's then
    play no part (validation still computes the exact likelihood with the evaluation
    solver). ``"flow-matching+rnode"`` runs both in one call (:mod:`otflow.training.stages`):
    ``flow_matching_iters`` iterations of flow matching (batches of
    ``flow_matching_batch_size``, learning rate ``flow_matching_lr`` with cosine decay), then ``max_iters`` RNODE iterations from its
    solution; every option not given then follows the measured two-stage recipe
    (:data:`~otflow.training.stages.TWO_STAGE_DEFAULTS`: widths 128, 128, 128, swish, time
    concatenated, flow-matching path times ``s = u²`` (``flow_matching_time_power``), then
    RK4 × 8, lr 1e-3 with cosine decay, 600 RNODE iterations), which the checkpoint header
    and ``fit_info["options"]`` record.

    Image data (uint8 arrays ``(N, H, W)``/``(N, C, H, W)``, image files, ``"digits"``) train
    FFJORD's multiscale model (``n_scales``: None is ODENVP's count; ``blocks_per_scale``
    CNF blocks before and after each squeeze; ``logit_alpha``, the logit margin α; ``hidden``
    the conv widths) with RNODE's MNIST recipe for every option not set explicitly:
    softplus, time as an input channel (``conditioning="concat"``), widths (64, 64, 64), two
    blocks per scale, batches of 200, fixed-step RK4 with step 0.25 over T = 1
    (``method="rk4", steps=4``), λ_K = λ_J = 0.01, no standardization; the resolved options
    are what the checkpoint and ``fit_info["options"]`` record. Validation reports bits per
    dimension with ``eval_estimator``: None is the exact trace for images of at most 256
    values (``C·H·W``) and Hutchinson (Rademacher probes of a fixed seed) above, where the
    exact trace's ``D`` vector–Jacobian products per evaluation are too slow.

    Numpy scalars become Python numbers and paths become strings, so the options always
    serialize into a checkpoint header.

    :raises TypeError: an option of the wrong type.
    :raises ValueError: an option out of range, or not among its choices (naming the nearest).
    """

    # model
    hidden: tuple[int, ...] = (64, 64, 64)
    activation: str = "tanh"
    conditioning: str = "concatsquash"
    zero_last: bool = True
    n_blocks: int = 1
    # image models (uint8 image data): FFJORD's multiscale architecture; ``hidden`` are the conv widths
    n_scales: int | None = None
    blocks_per_scale: int = 2
    logit_alpha: float = 1e-6
    eval_estimator: str | None = None
    T: float = 1.0
    learn_T: bool = False
    # objective
    objective: str = "auto"
    coupling: str | None = None
    flow_matching_iters: int = 45_000
    flow_matching_lr: float = 4e-3
    flow_matching_batch_size: int = 2048
    flow_matching_time_power: float = 1.0
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
    standardize: bool | str = "auto"
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
    # data-parallel JAX (torch: launch with torchrun instead): None one device, an int N the first N
    # devices, "all", or a list of device names/ids; the batch is sharded over a mesh of them
    devices: int | str | tuple | None = None
    history: str | None = None
    quiet: bool = False

    def __post_init__(self):
        _check_hidden(self)
        for name, choices in (("activation", ACTIVATIONS), ("conditioning", CONDITIONINGS), ("probe", PROBES),
                              ("method", METHODS), ("gradient", GRADIENTS), ("optimizer", OPTIMIZERS),
                              ("schedule", SCHEDULES), ("dtype", DTYPES)):
            _check_choice(self, name, choices)
        for name in ("zero_last", "learn_T", "quiet"):
            _check_flag(self, name)
        if self.standardize != "auto":
            _check_flag(self, "standardize", or_auto=True)
        for name in ("n_blocks", "steps", "max_steps", "batch_size", "max_iters", "n_train", "val_points",
                     "eval_every", "checkpoint_every", "max_failures", "lr_recovery", "flow_matching_iters",
                     "flow_matching_batch_size"):
            _check_int(self, name)
        _check_int(self, "warmup", minimum=0)
        _check_int(self, "seed", minimum=0, below=2 ** 63)
        _check_int(self, "patience", optional=True)
        _check_int(self, "n_scales", optional=True)
        _check_int(self, "blocks_per_scale")
        _check_real(self, "logit_alpha", low_open=False, high=0.5)
        if self.eval_estimator is not None:
            _check_choice(self, "eval_estimator", ("exact", "hutchinson"))
        for name in ("T", "rtol", "atol", "eval_rtol", "eval_atol", "lr", "flow_matching_lr",
                     "flow_matching_time_power"):
            _check_real(self, name)
        for name in ("lambda_kinetic", "lambda_jacobian", "weight_decay"):
            _check_real(self, name, low_open=False)
        for name in ("clip_norm", "epochs", "max_time"):
            _check_real(self, name, optional=True)
        _check_real(self, "val_fraction", low_open=False, high=1.0)
        _check_real(self, "lr_backoff", high=1.0, high_open=False)
        _check_path(self, "checkpoint")
        _check_path(self, "history")
        _check_devices(self)
        _check_objective(self)
        self.optimizer_spec()  # the optimizer's own checks

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer and learning-rate schedule these options describe.

        :returns: an :class:`~otflow.OptimizerSpec` whose cosine schedule spans ``max_iters``.
        """
        return OptimizerSpec(name=self.optimizer, lr=self.lr, weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                             warmup=self.warmup, schedule=self.schedule, total_iters=self.max_iters)

    def train_solver_kwargs(self) -> dict:
        """Keyword arguments of :func:`otflow.odeint` for the training solves.

        :returns: the method with its tolerances and ``max_steps`` (adaptive) or ``n_steps``
            (fixed-step), and the gradient mode.
        """
        if resolve_solver(self.method).adaptive:
            kwargs = dict(method=self.method, rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        else:
            kwargs = dict(method=self.method, n_steps=self.steps)
        kwargs["gradient"] = self.gradient
        return kwargs

    def to_header(self) -> dict:
        """The options as JSON-ready values (``hidden`` a list), for a checkpoint header."""
        header = dataclasses.asdict(self)
        header["hidden"] = list(self.hidden)
        return header

    @classmethod
    def from_mapping(cls, options: dict) -> "FitOptions":
        """Options from a mapping of names to values.

        :param options: option names (the fields of this class) and values.
        :returns: the validated options.
        :raises TypeError: a name that is not an option (naming the nearest one).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        for key in options:
            if not isinstance(key, str):
                raise TypeError(f"fit(): option names must be strings, got {key!r}")
            if key not in names:
                raise TypeError("fit(): " + unknown_option_message("option", key, names))
        opts = cls(**options)
        object.__setattr__(opts, "_given", frozenset(options))  # what image data must not override
        return opts

    def resolved(self, **values) -> "FitOptions":
        """These options with ``values`` filled in by otflow (not by the user): validated
        again, and :attr:`given` stays what the user set.

        :param values: option names and values.
        :returns: the new options.
        """
        opts = dataclasses.replace(self, **values)
        object.__setattr__(opts, "_given", self.given)
        return opts

    @property
    def given(self) -> frozenset:
        """The names of the options set explicitly (the keys given to :meth:`from_mapping`,
        a config file's and a checkpoint's included); for options made by calling the class,
        those whose value differs from the default. Image data replace the defaults of the
        others by RNODE's image recipe (:data:`otflow.training.image_model.IMAGE_DEFAULTS`)."""
        given = getattr(self, "_given", None)
        if given is None:
            given = frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)
        return given

    @classmethod
    def from_header(cls, header: dict) -> "FitOptions":
        """The options saved by :meth:`to_header`; names this otflow does not know are dropped.

        :param header: the ``options`` entry of a checkpoint header.
        :returns: the validated options.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        saved = {k: v for k, v in dict(header).items() if k in known}
        saved["hidden"] = tuple(saved["hidden"])
        return cls.from_mapping(saved)


# ------------------------------------------------------------------------------------------
# the checks, one per kind of option; each stores the normalized value


def _store(opts: FitOptions, name: str, value) -> None:
    object.__setattr__(opts, name, value)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_int(opts: FitOptions, name: str, *, minimum: int = 1, below: int | None = None,
               optional: bool = False) -> None:
    v = getattr(opts, name)
    if v is None and optional:
        return
    wanted = f"an int ≥ {minimum}{' or None' if optional else ''}"
    if not _is_int(v):
        raise TypeError(f"{name} must be {wanted}, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be {wanted}, got {v!r}")
    if below is not None and v >= below:
        raise ValueError(f"{name} must be below {below}, got {v}")
    _store(opts, name, int(v))


def _check_real(opts: FitOptions, name: str, *, low: float = 0.0, low_open: bool = True, high: float = math.inf,
                high_open: bool = True, optional: bool = False) -> None:
    v = getattr(opts, name)
    if v is None and optional:
        return
    where = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    none = " or None" if optional else ""
    if not _is_real(v):
        raise TypeError(f"{name} must be a number in {where}{none}, got {v!r}")
    v = float(v)
    above_low = v > low if low_open else v >= low
    below_high = v < high if high_open else v <= high
    if not (math.isfinite(v) and above_low and below_high):
        raise ValueError(f"{name} must be a finite number in {where}{none}, got {v!r}")
    _store(opts, name, v)


def _check_choice(opts: FitOptions, name: str, choices) -> None:
    v = getattr(opts, name)
    if not isinstance(v, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    if v not in choices:
        raise ValueError(unknown_option_message(name, v, choices))


def _check_flag(opts: FitOptions, name: str, or_auto: bool = False) -> None:
    v = getattr(opts, name)
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name} must be True{', False or ' + repr('auto') if or_auto else ' or False'}, got {v!r}")
    _store(opts, name, bool(v))


def _check_path(opts: FitOptions, name: str) -> None:
    v = getattr(opts, name)
    if v is None:
        return
    if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
        raise TypeError(f"{name} must be a file path (str or pathlib.Path) or None, got {v!r}")
    _store(opts, name, os.fspath(v))


#: options that play no part in flow-matching training (no solve, no probe, no penalty)
UNUSED_BY_FLOW_MATCHING = ("lambda_kinetic", "lambda_jacobian", "probe", "method", "rtol", "atol", "steps",
                           "gradient", "max_steps")


#: options only the two-stage objective uses (its flow-matching stage)
FLOW_MATCHING_STAGE_OPTIONS = ("flow_matching_iters", "flow_matching_lr", "flow_matching_batch_size")
#: options of the flow-matching loss (objective "flow-matching" and the two-stage objective's first stage)
FLOW_MATCHING_LOSS_OPTIONS = ("flow_matching_time_power",)


def refuse_unused_options(opts: FitOptions, given) -> None:
    """Refuse options given explicitly to a new run that its objective would ignore.

    :param opts: the run's options, with ``objective="auto"`` resolved.
    :param given: the names given (keywords and config file).
    :raises ValueError: naming the options and why they do not apply.
    """
    loss_options = [name for name in FLOW_MATCHING_LOSS_OPTIONS if name in given]
    if loss_options and opts.objective == "rnode":
        raise ValueError(f"{', '.join(loss_options)} describe(s) the flow-matching loss; this run trains with "
                         "objective='rnode' (image data, init= and learn_T=True train with RNODE alone). Drop them, "
                         "or pass objective='flow-matching' or 'flow-matching+rnode'")
    stage_options = [name for name in FLOW_MATCHING_STAGE_OPTIONS if name in given]
    if stage_options and opts.objective != "flow-matching+rnode":
        raise ValueError(f"{', '.join(stage_options)} describe(s) the flow-matching stage of "
                         f"objective='flow-matching+rnode'; this run trains with objective={opts.objective!r} "
                         "(image data, init= and learn_T=True train with RNODE alone). Drop them, or (vector data) "
                         "pass objective='flow-matching+rnode'; a flow-matching run takes lr, batch_size and max_iters")
    if opts.objective != "flow-matching":
        return
    unused = [name for name in UNUSED_BY_FLOW_MATCHING if name in given]
    if unused:
        raise ValueError(f"{', '.join(unused)} do(es) not apply to objective='flow-matching': its loss regresses the "
                         "velocity on straight paths with no ODE solve, probe or penalty. Drop them (the "
                         "evaluation solver is eval_rtol/eval_atol), or set them when fine-tuning with "
                         "fit(..., init=flow)")


def _check_objective(opts: FitOptions) -> None:
    _check_choice(opts, "objective", OBJECTIVES)
    if opts.objective == "rnode":
        if opts.coupling is not None:
            raise ValueError(f"coupling={opts.coupling!r} pairs data and noise for flow matching; the 'rnode' "
                             "objective has no coupling: drop it, or pass objective='flow-matching' (or "
                             "'flow-matching+rnode')")
        return
    if opts.coupling is not None or opts.objective in ("flow-matching", "flow-matching+rnode"):
        if opts.coupling is None:
            _store(opts, "coupling", "independent")
        _check_choice(opts, "coupling", COUPLINGS)
        check_coupling_available(opts.coupling)
    if opts.learn_T and opts.objective == "flow-matching":
        raise ValueError("learn_T=True does not apply to objective='flow-matching' (its loss does not depend on "
                         "T); learn T when fine-tuning with the RNODE objective (fit(..., init=flow, learn_T=True))")
    if opts.learn_T and opts.objective == "flow-matching+rnode":
        raise ValueError("learn_T=True does not apply to objective='flow-matching+rnode': its flow-matching stage "
                         "cannot learn T (its loss does not depend on T) and the stages share one parameter "
                         "layout; train with objective='flow-matching', then fine-tune with "
                         "fit(..., init=flow, learn_T=True)")


def _check_devices(opts: FitOptions) -> None:
    v = opts.devices
    if v is None or v == "all":
        return
    if _is_int(v):
        if v < 1:
            raise ValueError(f"devices must be ≥ 1 (a number of devices), got {v}")
        _store(opts, "devices", int(v))
        return
    if isinstance(v, (list, tuple)) and v and all(isinstance(d, str) or _is_int(d) for d in v):
        _store(opts, "devices", tuple(d if isinstance(d, str) else int(d) for d in v))
        return
    raise TypeError(f"devices must be None (one device), an int N (the first N devices), 'all', or a non-empty list "
                    f"of device names or ids such as ['cpu:0', 'cpu:1'], got {v!r}")


def _check_hidden(opts: FitOptions) -> None:
    hidden = opts.hidden
    if _is_int(hidden):
        hidden = (hidden,)
    if isinstance(hidden, (str, bytes)) or not hasattr(hidden, "__iter__"):
        raise TypeError(f"hidden must be a sequence of positive ints (layer widths), e.g. (64, 64), "
                        f"got {opts.hidden!r}")
    hidden = tuple(hidden)
    if not hidden or not all(_is_int(h) and h > 0 for h in hidden):
        raise ValueError(f"hidden must be a non-empty sequence of positive ints (layer widths), e.g. (64, 64), "
                         f"got {opts.hidden!r}")
    _store(opts, "hidden", tuple(int(h) for h in hidden))


# ------------------------------------------------------------------------------------------
# config files


def load_config(path) -> dict:
    """Options from a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file.

    The file holds the options at its top level or under a ``[fit]`` table; the keys are
    validated by :func:`otflow.fit`.

    :param path: the file.
    :returns: the options as a dict (``hidden`` as a tuple).
    :raises FileNotFoundError: no such file.
    :raises ValueError: another suffix, or a file that does not hold a table.
    :raises ImportError: a YAML file without PyYAML installed.
    """
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
    data = dict(data.get("fit", data))
    if isinstance(data.get("hidden"), list):
        data["hidden"] = tuple(data["hidden"])
    return data
