"""Optimizer settings shared by the backends' trainers, and the learning-rate schedule.

The optimizers themselves come from each framework's ecosystem (``torch.optim``
on torch, optax on JAX); this module only describes them. The schedule is a
pure function of the iteration, evaluated on the host and passed to the
compiled step as a value, so changing the rate never recompiles anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..base.options import unknown_option_message

__all__ = ["OptimizerSpec", "OPTIMIZERS", "SCHEDULES"]

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimizerSpec:
    """Adam (Kingma & Ba 2015) or AdamW (Loshchilov & Hutter 2019) with linear warm-up, a
    constant or cosine decay and optional clipping; what :func:`otflow.training.make_trainer`
    builds the framework's optimizer from.

    :param name: ``"adam"`` applies ``weight_decay`` as an L2 term on the gradient (as
        ``torch.optim.Adam``); ``"adamw"`` decouples it.
    :param lr: the peak learning rate, positive.
    :param weight_decay: ≥ 0.
    :param betas: Adam's moment decays, each in [0, 1).
    :param eps: Adam's denominator offset.
    :param clip_norm: clip the global gradient norm to this before the update; None: no clipping.
    :param warmup: iterations of linear warm-up from ``lr/warmup`` to ``lr``.
    :param schedule: ``"constant"``, or ``"cosine"``: decay from ``lr`` to ``lr·min_lr_ratio``
        over ``total_iters`` after the warm-up.
    :param total_iters: the length of the cosine schedule (``fit`` sets it from ``max_iters``).
    :param min_lr_ratio: the cosine schedule's floor, as a fraction of ``lr``.
    :raises ValueError: an unknown name or schedule, or a value out of range.
    """

    name: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_norm: float | None = None
    warmup: int = 0
    schedule: str = "constant"
    total_iters: int | None = None
    min_lr_ratio: float = 0.0

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(unknown_option_message("optimizer", self.name, OPTIMIZERS))
        if self.schedule not in SCHEDULES:
            raise ValueError(unknown_option_message("schedule", self.schedule, SCHEDULES))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be positive or None, got {self.clip_norm}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative number of iterations, got {self.warmup}")
        if self.schedule == "cosine" and not self.total_iters:
            raise ValueError("the cosine schedule needs total_iters (fit sets it from max_iters)")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")

    def learning_rate(self, iteration: int) -> float:
        """The learning rate of an iteration (a host float: passed to the compiled step as a
        value, it never recompiles anything).

        :param iteration: the 0-based iteration.
        :returns: the rate.
        """
        rate = self.lr
        if self.warmup and iteration < self.warmup:
            return rate * (iteration + 1) / self.warmup
        if self.schedule == "cosine":
            span = max(1, self.total_iters - self.warmup)
            progress = min(1.0, (iteration - self.warmup) / span)
            floor = self.lr * self.min_lr_ratio
            rate = floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))
        return rate
