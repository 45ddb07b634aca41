"""Exceptions and the solver status enum.

Inside a solve (possibly compiled) a failure is a value of :class:`Status`
carried in the loop state; it becomes an exception only at the public
boundary, where the status is concrete (the diffrax convention).
"""
from __future__ import annotations

import enum

__all__ = [
    "Status",
    "OtflowError",
    "SolverError",
    "MaxStepsReached",
    "StepSizeUnderflow",
    "NonFiniteState",
    "CapabilityError",
    "BackendUnavailable",
]


class Status(enum.IntEnum):
    """Outcome of a solve, stored as an int32 array inside the loop."""

    SUCCESS = 0
    MAX_STEPS = 1
    DT_UNDERFLOW = 2
    NONFINITE = 3

    @property
    def ok(self) -> bool:
        return self is Status.SUCCESS


class OtflowError(Exception):
    """Base class of every error otflow raises on purpose."""


class SolverError(OtflowError, RuntimeError):
    """An ODE solve did not reach its end time. ``solution`` holds what was computed."""

    status: Status = Status.SUCCESS

    def __init__(self, message: str, solution=None):
        super().__init__(message)
        self.solution = solution


class MaxStepsReached(SolverError):
    status = Status.MAX_STEPS


class StepSizeUnderflow(SolverError):
    status = Status.DT_UNDERFLOW


class NonFiniteState(SolverError):
    status = Status.NONFINITE


class CapabilityError(OtflowError, NotImplementedError):
    """The chosen backend lacks a capability (e.g. autodiff on the reference backend)."""


class BackendUnavailable(OtflowError, ImportError):
    """A backend's framework is not installed, or a device is not present."""
