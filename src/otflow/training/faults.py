"""The failure policy of a run: skip a failed iteration, back the learning rate off, stop
after ``max_failures`` in a row (see :class:`~otflow.FitOptions` and ``docs/troubleshooting.md``).

An iteration *fails* when its loss or gradient is not finite or its training solve does
not finish; the trainer then leaves parameters and optimizer state as they were
(``metrics["applied"]`` is False). This module keeps the counters of
:class:`~otflow.training.checkpoint.TrainingState` that the policy needs.
"""
from __future__ import annotations

from typing import Any

from ..base.errors import OtflowError, Status

__all__ = ["TrainingFailed", "backoff_factor", "count_outcome", "failure_reason", "skip_message", "training_failed"]


class TrainingFailed(OtflowError, RuntimeError):
    """Training stopped after ``max_failures`` consecutive non-finite losses or failed solves.

    The last good checkpoint (if any) is intact and named in the message.

    :ivar checkpoint: the checkpoint's path, or None when none was written.
    :ivar checkpoint_iteration: the iteration the checkpoint holds, or None.
    :ivar iteration: the last failed iteration.
    :ivar flow: the last good parameters as a :class:`~otflow.Flow` (the best validated
        ones if any).
    """

    checkpoint: str | None = None
    checkpoint_iteration: int | None = None
    iteration: int | None = None
    flow: Any = None


def backoff_factor(opts, state) -> float:
    """The factor on the schedule's learning rate: ``lr_backoff ** (lr_debt / lr_recovery)``.

    Each skipped iteration adds ``lr_recovery`` to the debt (one factor of ``lr_backoff``),
    each applied one pays 1 back; exactly 1 once paid.

    :param opts: the run's options.
    :param state: the run's state.
    :returns: the factor, in (0, 1].
    """
    return 1.0 if state.lr_debt == 0 else opts.lr_backoff ** (state.lr_debt / opts.lr_recovery)


def count_outcome(opts, state, applied: bool) -> None:
    """Update the failure counters after an iteration.

    :param opts: the run's options.
    :param state: the run's state (``consecutive_failures``, ``skipped``, ``lr_debt``).
    :param applied: whether the iteration's update was applied.
    """
    if applied:
        state.consecutive_failures = 0
        state.lr_debt = max(0, state.lr_debt - 1)
        return
    state.consecutive_failures += 1
    state.skipped += 1
    if opts.lr_backoff < 1:
        state.lr_debt += opts.lr_recovery


def failure_reason(status: int) -> str:
    """Why an iteration failed, from its solve's status (0: the loss or gradient was not finite)."""
    if status:
        return (f"the training solve failed ({Status(status).name}: max_steps reached or step-size "
                "underflow)")
    return "a non-finite loss or gradient"


def skip_message(opts, state, iteration: int, why: str) -> str:
    """The warning for a skipped iteration (after :func:`count_outcome`)."""
    backoff = f"; learning rate now ×{backoff_factor(opts, state):.3g}" if opts.lr_backoff < 1 else ""
    return (f"iteration {iteration}: skipped ({why}); parameters kept at the last good state "
            f"({state.consecutive_failures} in a row, {opts.max_failures} stop training{backoff})")


def training_failed(opts, checkpoint_iteration: int, iteration: int, why: str, flow) -> TrainingFailed:
    """The exception ending a run after ``max_failures`` failures in a row.

    :param opts: the run's options.
    :param checkpoint_iteration: the iteration the checkpoint file holds (-1: none).
    :param iteration: the last failed iteration.
    :param why: the reason of the last failure.
    :param flow: the last good flow.
    :returns: the exception, naming the checkpoint and the remedies.
    """
    saved = checkpoint_iteration >= 0
    if opts.checkpoint and saved:
        where = (f" The last good checkpoint is {opts.checkpoint!r} (iteration {checkpoint_iteration}); it is "
                 f"intact: otflow.load({opts.checkpoint!r}) gives its flow, and fit(..., resume={opts.checkpoint!r}, "
                 "lr=<smaller>) continues from it.")
    elif opts.checkpoint:
        where = f" No checkpoint was written to {opts.checkpoint!r} before the failure."
    else:
        where = " No checkpoint was configured (checkpoint='run.safetensors' keeps the last good state on disk)."
    err = TrainingFailed(
        f"{opts.max_failures} consecutive iterations failed ({why}), the last at iteration {iteration}.{where} "
        "The exception's .flow holds the last good parameters. Remedies: lower lr, set clip_norm, raise "
        "lambda_kinetic/lambda_jacobian, raise max_steps, or train with method='rk4'.")
    err.checkpoint = opts.checkpoint if saved else None
    err.checkpoint_iteration = checkpoint_iteration if saved else None
    err.iteration = iteration
    err.flow = flow
    return err
