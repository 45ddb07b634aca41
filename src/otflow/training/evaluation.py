"""Validation during training: the validation NLL with the evaluation solver and the exact
trace (never the training discretization), the best parameters so far, early stopping.

Evaluations run on a fixed cadence (every ``eval_every`` iterations), so a run resumed
from any checkpoint evaluates at the same iterations as an uninterrupted one. A run that
ends at ``max_iters`` off the cadence evaluates once more for its result
(:meth:`Validation.final`), after its final checkpoint: a run resumed from that
checkpoint with a larger ``max_iters`` continues exactly as if it had never stopped.

Image data are validated in **bits per dimension**, the standard number (uniform
dequantization, :meth:`~otflow.cnf.MultiscaleFlow.bits_per_dim`) with the dequantization
noise (and, for large images, the Hutchinson probes) of a fixed seed
(:data:`VALIDATION_NOISE_SEED`), so every evaluation of a run sees
the same noisy validation images and evaluations are comparable; the record gets
``val_bpd`` and ``val_bpd_se`` beside ``val_nll`` (nats per image of the dequantized pixels
in ``[0, 1)^D``, logit log-determinant included), which ranks the parameters.
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ..base import SolverError
from ..cnf import Flow

__all__ = ["validation_nll", "validation_bits_per_dim", "Validation", "VALIDATION_NOISE_SEED"]

#: the seed of the dequantization noise of the validation images (fixed for a whole run)
VALIDATION_NOISE_SEED = 0


def validation_nll(flow: Flow, x: np.ndarray) -> tuple[float, float]:
    """The mean negative log-likelihood of ``x`` under ``flow`` and its standard error.

    Rows whose evaluation solve fails are left out (``on_failure="nan"``).

    :param flow: the flow (its evaluation solver, exact trace).
    :param x: the validation rows.
    :returns: ``(mean NLL, standard error)``; ``(inf, inf)`` when no row could be evaluated,
        a NaN standard error for a single row.
    """
    logp = np.asarray(flow.log_prob(x, on_failure="nan"), dtype=np.float64)
    logp = logp[np.isfinite(logp)]
    if logp.size == 0:
        return math.inf, math.inf
    se = float(logp.std(ddof=1) / math.sqrt(logp.size)) if logp.size > 1 else math.nan
    return float(-logp.mean()), se


def validation_bits_per_dim(flow, images) -> dict:
    """The standard bits per dimension of validation images, and the matching NLL.

    Images whose evaluation gives a non-finite value are left out.

    :param flow: the :class:`~otflow.cnf.MultiscaleFlow` (its evaluation solver).
    :param images: an :class:`~otflow.training.data.ImageLevels` (uint8 levels, their count,
        and the divergence estimator: the exact trace, or Hutchinson with probes of a fixed
        seed for large images).
    :returns: ``val_bpd``, ``val_bpd_se``, ``val_nll`` and ``val_nll_se`` (inf when no image
        could be evaluated; NaN standard errors for a single image). ``val_nll`` is
        ``−log p(y)`` in nats per image, ``y ∈ [0, 1)^D`` the dequantized pixels, so
        ``bpd = (nll + D·log n_levels)/(D·log 2)``.
    """
    try:
        result = flow.bits_per_dim(images.levels, seed=VALIDATION_NOISE_SEED, n_bins=images.n_levels,
                                   estimator=images.estimator)
    except SolverError as e:
        warnings.warn(f"validation: the evaluation solve failed ({type(e).__name__}: {e}); the validation "
                      "bits/dim of this evaluation is inf", RuntimeWarning, stacklevel=2)
        return {"val_nll": math.inf, "val_nll_se": math.inf, "val_bpd": math.inf, "val_bpd_se": math.inf}
    bpd = np.asarray(result.per_image, dtype=np.float64)
    bpd = bpd[np.isfinite(bpd)]
    if bpd.size == 0:
        return {"val_nll": math.inf, "val_nll_se": math.inf, "val_bpd": math.inf, "val_bpd_se": math.inf}
    dim = math.prod(images.levels.shape[1:])
    nats_per_bit = dim * math.log(2.0)  # d nll = D·log 2 · d bpd
    nll = bpd * nats_per_bit - dim * math.log(images.n_levels)
    se = float(bpd.std(ddof=1) / math.sqrt(bpd.size)) if bpd.size > 1 else math.nan
    return {"val_nll": float(nll.mean()), "val_nll_se": se * nats_per_bit, "val_bpd": float(bpd.mean()),
            "val_bpd_se": se}


def _validate(flow, rows) -> dict:
    """The validation record entries of ``rows`` (vectors: NLL; images: also bits/dim)."""
    if hasattr(rows, "n_levels"):
        return validation_bits_per_dim(flow, rows)
    nll, se = validation_nll(flow, rows)
    return {"val_nll": nll, "val_nll_se": se}


class Validation:
    """The validation rows of a run and when to evaluate them.

    :param rows: the validation rows, an :class:`~otflow.training.data.ImageLevels` for
        images, or None (``val_fraction=0``: nothing is evaluated).
    :param eval_every: the cadence, in iterations.
    :param patience: evaluations without improvement before stopping, or None.
    :param start: the iteration the cadence counts from (a run's later stage starts there).
    :param end: an iteration evaluated off the cadence too (the end of a run's earlier
        stage), or None.
    """

    def __init__(self, rows: np.ndarray | None, eval_every: int, patience: int | None, *, start: int = 0,
                 end: int | None = None):
        self.rows = rows
        self.eval_every = eval_every
        self.patience = patience
        self.start = start
        self.end = end

    def is_due(self, iteration: int) -> bool:
        """Whether the run evaluates after ``iteration`` iterations."""
        return self.rows is not None and (iteration == self.end or (iteration - self.start) % self.eval_every == 0)

    def evaluate(self, state, flow: Flow, params_on_host, record: dict) -> None:
        """Validate the current parameters; keep them in ``state`` when they are the best yet.

        :param state: the run's :class:`~otflow.training.checkpoint.TrainingState` (best
            NLL, best iteration and parameters, evaluations without improvement).
        :param flow: the flow of the current parameters.
        :param params_on_host: a function returning the current parameters as numpy arrays
            (called only on an improvement).
        :param record: the iteration's history record; gets ``val_nll`` and ``val_nll_se``
            (images: also ``val_bpd`` and ``val_bpd_se``).
        """
        record.update(_validate(flow, self.rows))
        if record["val_nll"] < state.best_val:
            state.best_val, state.best_iteration = record["val_nll"], state.iteration
            state.best_params = params_on_host()
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1

    def out_of_patience(self, state) -> bool:
        """Whether ``patience`` evaluations in a row brought no improvement."""
        return self.patience is not None and state.evals_without_improvement >= self.patience

    def final(self, state, flow: Flow, params_on_host, record: dict):
        """The end-of-run evaluation of a run that stopped at ``max_iters`` off the cadence.

        :param state: the run's state (not changed: a resumed run must not see this evaluation).
        :param flow: the flow of the last parameters.
        :param params_on_host: a function returning the last parameters as numpy arrays.
        :param record: the last history record; gets ``val_nll`` and ``val_nll_se`` (images:
            also ``val_bpd`` and ``val_bpd_se``).
        :returns: ``(best NLL, best iteration, best parameters)`` counting this evaluation.
        """
        record.update(_validate(flow, self.rows))
        if record["val_nll"] < state.best_val:
            return record["val_nll"], state.iteration, params_on_host()
        return state.best_val, state.best_iteration, state.best_params
