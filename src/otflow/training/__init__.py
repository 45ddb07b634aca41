"""The training layer: ``fit`` and everything around it.

Options and the training loop (:mod:`.fit`), optimizer settings and schedules
(:mod:`.optim`), data sets (:mod:`.datasets`), the command line (:mod:`.cli`)
and plots (:mod:`.plotting`). Built on the CNF, ODE and base layers.
"""
from . import cli, datasets, plotting
from .fit import FitOptions, TrainingFailed, fit, load_config
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec

__all__ = ["cli", "datasets", "plotting", "fit", "FitOptions", "TrainingFailed", "load_config", "OptimizerSpec", "OPTIMIZERS",
           "SCHEDULES"]
