"""The training layer: :func:`fit` and everything around it.

One module per concern: the options (:mod:`.options`), the data and its batches
(:mod:`.data`), the model and its loss (:mod:`.model`), the framework's training step
behind the :class:`Trainer` protocol (:mod:`.trainer`), optimizer settings and schedules
(:mod:`.optim`), validation (:mod:`.evaluation`), the failure policy (:mod:`.faults`),
checkpoints and resume (:mod:`.checkpoint`), the stop signals (:mod:`.signals`), the
history and progress bar (:mod:`.progress`), and the loop over them (:mod:`.loop`); plus
data sets (:mod:`.datasets`), the command line (:mod:`.cli`) and plots (:mod:`.plotting`).
Built on the CNF, ODE and base layers.
"""
from . import cli, datasets, plotting
from .faults import TrainingFailed
from .loop import fit
from .optim import OPTIMIZERS, SCHEDULES, OptimizerSpec
from .options import FitOptions, load_config
from .trainer import TRAINER_GROUP, Trainer, make_trainer, register_trainer, trainer_factory

__all__ = ["cli", "datasets", "plotting", "fit", "FitOptions", "TrainingFailed", "load_config", "OptimizerSpec",
           "OPTIMIZERS", "SCHEDULES", "Trainer", "make_trainer", "register_trainer", "trainer_factory",
           "TRAINER_GROUP"]
