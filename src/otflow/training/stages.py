"""The stages of a run: which objective trains which iterations.

A run trains with one objective (``"rnode"``, ``"flow-matching"``), or in two stages
(``"flow-matching+rnode"``): ``flow_matching_iters`` iterations of simulation-free flow
matching (Lipman et al., ICLR 2023), then ``max_iters`` iterations of RNODE's maximum
likelihood with its kinetic and Jacobian penalties (Finlay et al., ICML 2020) from the
flow-matching solution. Flow matching gets the field near a good transport cheaply (no
ODE solve per iteration); RNODE then trains what flow matching does not see: the exact
likelihood. The default ``objective="auto"`` picks the two stages for vector data (the
measured faster road, ``docs/flow_matching.md``) and RNODE for images and warm starts.

Iterations are counted over the whole run (the history, checkpoints and resume see one
sequence): stage 1 is iterations ``[0, F)``, stage 2 ``[F, F + M)``. Each stage has its own
optimizer state and learning-rate schedule. The flow-matching stage is validated and
checkpointed ten times, the last at its end (its iterations are ~100× cheaper than
RNODE's, so validating every ``eval_every`` would cost more than training); the RNODE
stage validates every ``eval_every`` and checkpoints every ``checkpoint_every``
iterations, and ``patience`` counts its evaluations only.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Stage", "plan_stages", "resolve_objective", "TWO_STAGE_DEFAULTS", "stage_of"]

#: what ``objective="flow-matching+rnode"`` (and ``"auto"`` on vector data) uses for every
#: option not set explicitly: the recipe measured best on the 2-D toys and the digits
#: (``docs/rnode_study.md``, ``benchmarks/results-2026-11-29-recipe.txt``). The
#: flow-matching stage's own options are ``flow_matching_iters``, ``flow_matching_lr``
#: (cosine decay over the stage) and ``flow_matching_batch_size`` (their ``FitOptions``
#: defaults are the recipe's); these are the architecture both stages share, the path-time
#: weighting of the flow-matching loss (``s = u²``: more of each batch near the data) and
#: the RNODE stage's options (a short, fixed-step fine-tune with cosine decay).
TWO_STAGE_DEFAULTS = {"hidden": (128, 128, 128), "activation": "swish", "conditioning": "concat",
                      "flow_matching_time_power": 2.0,
                      "method": "rk4", "steps": 8, "lr": 1e-3, "schedule": "cosine", "max_iters": 600}

#: how many times the flow-matching stage is validated and checkpointed (its last tenth ends it)
FLOW_MATCHING_EVALUATIONS = 10


@dataclass(frozen=True)
class Stage:
    """One stage of a run.

    :ivar objective: ``"rnode"`` or ``"flow-matching"``.
    :ivar start: the run's iteration count when the stage begins.
    :ivar end: the run's iteration count when it is done.
    :ivar options: the stage's :class:`~otflow.FitOptions`: the run's, with the stage's
        objective (and for the flow-matching stage its learning rate, a cosine schedule and
        ``max_iters``, the stage's length, which the schedule spans).
    :ivar eval_every: the validation cadence, counted from ``start``.
    :ivar checkpoint_every: the checkpoint cadence, counted from ``start``.
    :ivar schedule: the stage's optimizer and learning-rate schedule (``options.optimizer_spec()``,
        made once: the training loop asks for a rate every iteration).
    """

    objective: str
    start: int
    end: int
    options: object
    eval_every: int
    checkpoint_every: int
    schedule: object = None

    def __post_init__(self):
        if self.schedule is None:
            object.__setattr__(self, "schedule", self.options.optimizer_spec())

    def learning_rate(self, iteration: int) -> float:
        """The schedule's learning rate at the run's ``iteration`` (before any back-off)."""
        return self.schedule.learning_rate(iteration - self.start)

    def is_due(self, iteration: int, every: int) -> bool:
        """Whether ``iteration`` (the count after an iteration of this stage) is on a cadence of
        ``every`` counted from the stage's start; the stage's end always is."""
        return iteration == self.end or (iteration - self.start) % every == 0


def resolve_objective(opts, *, images: bool, warm_start: bool):
    """The run's options with ``objective="auto"`` resolved, and the two-stage recipe
    (:data:`TWO_STAGE_DEFAULTS`) filled in for every option not given when the run trains
    in two stages.

    ``"auto"`` is ``"rnode"`` for image data (FFJORD's multiscale model trains with
    RNODE's image recipe), for a warm start (``init=``: fine-tuning) and with
    ``learn_T=True`` (flow matching's loss does not depend on T); else
    ``"flow-matching+rnode"``.

    :param opts: the run's :class:`~otflow.FitOptions` (not resumed).
    :param images: whether the data are images.
    :param warm_start: whether ``init=`` was given.
    :returns: the resolved options (what the checkpoint header and ``fit_info`` record).
    :raises ValueError: ``coupling`` given where ``"auto"`` resolves to ``"rnode"``.
    """
    objective = opts.objective
    if objective == "auto":
        objective = "rnode" if (images or warm_start or opts.learn_T) else "flow-matching+rnode"
        if objective == "rnode" and opts.coupling is not None:
            why = "image data" if images else "init= (a warm start)" if warm_start else "learn_T=True"
            raise ValueError(f"coupling={opts.coupling!r} pairs data and noise for flow matching, but with {why} "
                             "objective='auto' trains with RNODE alone; drop coupling, or pass "
                             "objective='flow-matching+rnode'")
    if objective != "flow-matching+rnode":
        return opts.resolved(objective=objective) if objective != opts.objective else opts
    given = opts.given
    recipe = {k: v for k, v in TWO_STAGE_DEFAULTS.items() if k not in given}
    return opts.resolved(objective=objective, coupling=opts.coupling or "independent", **recipe)


def plan_stages(opts, rnode_iters: int) -> list[Stage]:
    """The stages of a run with resolved options.

    :param opts: the run's resolved :class:`~otflow.FitOptions`.
    :param rnode_iters: the iterations of the RNODE (or only) stage: ``max_iters``, or
        fewer when ``epochs`` comes first.
    :returns: one :class:`Stage` per objective, in order.
    """
    if opts.objective != "flow-matching+rnode":
        return [Stage(opts.objective, 0, rnode_iters, opts, opts.eval_every, opts.checkpoint_every)]
    first = opts.flow_matching_iters
    fm = opts.resolved(objective="flow-matching", lr=opts.flow_matching_lr, schedule="cosine", max_iters=first,
                       batch_size=opts.flow_matching_batch_size)
    rnode = opts.resolved(objective="rnode", coupling=None)
    tenth = max(1, -(-first // FLOW_MATCHING_EVALUATIONS))
    return [Stage("flow-matching", 0, first, fm, tenth, tenth),
            Stage("rnode", first, first + rnode_iters, rnode, opts.eval_every, opts.checkpoint_every)]


def stage_of(stages: list[Stage], iteration: int) -> int:
    """The index of the stage a run resumed after ``iteration`` iterations continues in
    (the last stage once every stage is done)."""
    for k, stage in enumerate(stages):
        if iteration < stage.end:
            return k
    return len(stages) - 1
