"""Validation during training: the validation NLL with the evaluation solver and the exact
trace (never the training discretization), the best parameters so far, early stopping.

Evaluations run on a fixed cadence (every ``eval_every`` iterations), so a run resumed
from any checkpoint evaluates at the same iterations as an uninterrupted one. A run that
ends at ``max_iters`` off the cadence evaluates once more for its result
(:meth:`Validation.final`), after its final checkpoint: a run resumed from that
checkpoint with a larger ``max_iters`` continues exactly as if it had never stopped.
"""
from __future__ import annotations

import math

import numpy as np

from ..cnf import Flow

__all__ = ["validation_nll", "Validation"]


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


class Validation:
    """The validation rows of a run and when to evaluate them.

    :param rows: the validation rows, or None (``val_fraction=0``: nothing is evaluated).
    :param eval_every: the cadence, in iterations.
    :param patience: evaluations without improvement before stopping, or None.
    """

    def __init__(self, rows: np.ndarray | None, eval_every: int, patience: int | None):
        self.rows = rows
        self.eval_every = eval_every
        self.patience = patience

    def is_due(self, iteration: int) -> bool:
        """Whether the run evaluates after ``iteration`` iterations."""
        return self.rows is not None and iteration % self.eval_every == 0

    def evaluate(self, state, flow: Flow, params_on_host, record: dict) -> None:
        """Validate the current parameters; keep them in ``state`` when they are the best yet.

        :param state: the run's :class:`~otflow.training.checkpoint.TrainingState` (best
            NLL, best iteration and parameters, evaluations without improvement).
        :param flow: the flow of the current parameters.
        :param params_on_host: a function returning the current parameters as numpy arrays
            (called only on an improvement).
        :param record: the iteration's history record; gets ``val_nll`` and ``val_nll_se``.
        """
        record["val_nll"], record["val_nll_se"] = validation_nll(flow, self.rows)
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
        :param record: the last history record; gets ``val_nll`` and ``val_nll_se``.
        :returns: ``(best NLL, best iteration, best parameters)`` counting this evaluation.
        """
        record["val_nll"], record["val_nll_se"] = validation_nll(flow, self.rows)
        if record["val_nll"] < state.best_val:
            return record["val_nll"], state.iteration, params_on_host()
        return state.best_val, state.best_iteration, state.best_params
