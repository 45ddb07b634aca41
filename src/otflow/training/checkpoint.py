"""Training checkpoints: what a run's state is, writing it, and resuming from it.

A checkpoint is one safetensors file (written atomically by
:func:`otflow.cnf.serialize.write_file`): the current parameters (``train.*``), the best
validated ones (``best.*``, ``best_log_T``), the optimizer state (``opt.*``), and a JSON
header with the flow's description, the options, the counters of
:class:`TrainingState`, the history, the state of the random generator and a digest of
the data. Resuming restores all of it, so the resumed run ends with bit-for-bit the
parameters of an uninterrupted one. ``otflow.load`` reads a checkpoint as its best flow.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..cnf.serialize import ModelFileError, fill_tree, named_arrays, read_file, write_file
from .options import STRUCTURAL_OPTIONS, FitOptions

__all__ = ["TrainingState", "ResumePoint", "CheckpointWriter", "read_resume", "restore", "jsonable"]


@dataclass
class TrainingState:
    """Everything about a run that is not an array of the trainer, as a checkpoint keeps it.

    :ivar iteration: iterations done.
    :ivar best_val: the best validation NLL so far (inf before the first evaluation).
    :ivar best_iteration: the iteration it was reached at (-1: none yet).
    :ivar evals_without_improvement: evaluations since the best one (for ``patience``).
    :ivar consecutive_failures: skipped iterations in a row (for ``max_failures``).
    :ivar skipped: skipped iterations in all.
    :ivar elapsed: seconds of training so far.
    :ivar lr_debt: good iterations until the learning rate is back (``lr_recovery`` per back-off).
    :ivar last_checkpoint: the iteration of the last checkpoint written (-1: none).
    :ivar history: one record per iteration.
    :ivar best_params: the best validated parameter tree as numpy arrays, or None.
    """

    iteration: int = 0
    best_val: float = math.inf
    best_iteration: int = -1
    evals_without_improvement: int = 0
    consecutive_failures: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    lr_debt: int = 0
    last_checkpoint: int = -1
    history: list = field(default_factory=list)
    best_params: dict | None = None

    @classmethod
    def counter_names(cls) -> list[str]:
        """The fields stored as the header's ``state`` (history and best parameters have their own entries)."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("history", "best_params")]

    def counters(self) -> dict:
        """The counters, for the header."""
        return {name: getattr(self, name) for name in self.counter_names()}


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint read for resuming: its path, arrays and header."""

    path: str
    arrays: dict
    header: dict


def read_resume(path, given: dict) -> tuple[FitOptions, ResumePoint]:
    """Read a checkpoint to resume from, and the options of the resumed run.

    :param path: the checkpoint (written by ``fit(checkpoint=...)``).
    :param given: the options given for the resumed run (config file and keywords); they
        override the checkpoint's.
    :returns: the options and the checkpoint.
    :raises ValueError: a saved flow rather than a checkpoint, or options that would change
        the layout of the parameters or of the optimizer state.
    :raises ModelFileError: a missing, damaged or incompatible file.
    """
    arrays, header = read_file(path)
    path = os.fspath(path)
    if header.get("kind") != "checkpoint":
        raise ValueError(f"{path!r} is a saved flow, not a training checkpoint; resume= needs the "
                         "file written by fit(checkpoint=...). To fine-tune a saved flow, start a new run.")
    try:
        # a checkpoint from before objective= existed trained RNODE
        saved = FitOptions.from_header({"objective": "rnode", **header["options"]})
        header["state"], header["rng"]  # noqa: B018 - presence check
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{path!r}: the checkpoint's header is incomplete or from an "
                             f"incompatible otflow version ({e})") from None
    opts = FitOptions.from_mapping({**dataclasses.asdict(saved), **given})
    changed = [name for name in STRUCTURAL_OPTIONS if getattr(opts, name) != getattr(saved, name)]
    if changed:
        raise ValueError(
            "resume: " + ", ".join(f"{k}={getattr(opts, k)!r} (checkpoint: {getattr(saved, k)!r})" for k in changed)
            + " would change the model or optimizer layout the checkpoint holds. Drop these options to continue "
            "the run, or start a new run without resume=.")
    return opts, ResumePoint(path, arrays, header)


def restore(point: ResumePoint, trainer, template: dict, *, optimizer: bool = True
            ) -> tuple[TrainingState, np.random.Generator]:
    """Install a checkpoint's parameters and optimizer state in ``trainer``.

    :param point: the checkpoint.
    :param trainer: the run's :class:`~otflow.training.Trainer`, freshly made.
    :param template: the initial parameter tree (the layout to fill).
    :param optimizer: whether to install the optimizer state too (False: the checkpoint
        ends an earlier stage of the run, whose optimizer the next stage does not continue).
    :returns: the run's state and its random generator, as they were when the checkpoint was written.
    :raises ModelFileError: arrays that do not fit the model or the optimizer.
    """
    arrays = point.arrays
    trainer.set_params(fill_tree(template, arrays, "train", np.asarray))
    if optimizer:
        try:
            trainer.load_optimizer_state({k[len("opt."):]: v for k, v in arrays.items() if k.startswith("opt.")})
        except (KeyError, IndexError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"the checkpoint's optimizer state does not fit this optimizer ({e}); it was "
                                 "written by another otflow version or for other options") from None
    known = set(TrainingState.counter_names())
    counters = {k: (float(v) if isinstance(v, str) else v) for k, v in point.header["state"].items() if k in known}
    state = TrainingState(**counters, history=list(point.header.get("history", [])))
    if any(k.startswith("best.") for k in arrays):
        state.best_params = {"fields": fill_tree(template["fields"], arrays, "best", np.asarray)}
        if "best_log_T" in arrays:
            state.best_params["log_T"] = arrays["best_log_T"]
    rng = np.random.default_rng()
    rng.bit_generator.state = point.header["rng"]
    return state, rng


class CheckpointWriter:
    """Writes a run's checkpoints to ``opts.checkpoint`` and knows which iteration the file holds
    (when to write is the stage's cadence: :meth:`otflow.training.stages.Stage.is_due`).

    :param opts: the run's :class:`~otflow.FitOptions` (``checkpoint``).
    :param backend: the run's backend (to copy arrays to the host).
    :param digest: the data's digest.
    :param resumed_from: the checkpoint the run resumed from, if any: when it is the same
        file, that file already holds the starting iteration.
    :param start: the starting iteration.
    :param writes: whether this process writes the file (in a data-parallel run only the
        main process does; the others keep the same bookkeeping, so their state matches).
    """

    def __init__(self, opts: FitOptions, backend, digest: str, resumed_from: ResumePoint | None, start: int,
                 *, writes: bool = True):
        self.path = opts.checkpoint
        self.writes = writes
        self.options = opts.to_header()
        self.backend = backend
        self.digest = digest
        same_file = (resumed_from is not None and self.path is not None
                     and os.path.abspath(resumed_from.path) == os.path.abspath(self.path))
        #: the iteration the file holds (-1: none written by this run, nor resumed from)
        self.iteration_on_disk = start if same_file else -1

    def write(self, state: TrainingState, trainer, flow_header: dict, rng: np.random.Generator, *,
              stage: str | None = None) -> None:
        """Write the run's state unless the file already holds this iteration (or no path is set).

        :param state: the run's state.
        :param trainer: the run's trainer (current parameters, optimizer state).
        :param flow_header: the description of the current flow (``Flow.header()``).
        :param rng: the run's random generator.
        :param stage: the objective of the stage whose optimizer state the trainer holds
            (recorded, so a resumed run knows whether to continue that optimizer).
        """
        if self.path is None or self.iteration_on_disk == state.iteration:
            return
        state.last_checkpoint = state.iteration
        if not self.writes:
            self.iteration_on_disk = state.iteration
            return
        arrays = {k: self.backend.to_numpy(v) for k, v in named_arrays(trainer.params, "train").items()}
        if state.best_params is not None:
            arrays.update({k: np.asarray(v) for k, v in named_arrays(tuple(state.best_params["fields"]),
                                                                     "best").items()})
            if "log_T" in state.best_params:
                arrays["best_log_T"] = np.asarray(state.best_params["log_T"])
        arrays.update({f"opt.{k}": v for k, v in trainer.optimizer_state().items()})
        header = {"kind": "checkpoint", "flow": flow_header, "options": self.options, "state": state.counters(),
                  "history": state.history, "rng": rng.bit_generator.state, "data_digest": self.digest}
        if stage is not None:
            header["stage"] = stage
        write_file(self.path, arrays, jsonable(header))
        self.iteration_on_disk = state.iteration


def jsonable(obj):
    """``obj`` with numpy scalars as Python numbers and non-finite floats as strings (``"inf"``),
    so that it is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        obj = float(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
