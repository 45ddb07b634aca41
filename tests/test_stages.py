"""Two-stage runs (objective="flow-matching+rnode") and the default objective="auto"
(otflow.training.stages): how "auto" resolves, the stages' schedules and cadences, that the
flow-matching stage is exactly a flow-matching run, and resume across the stage boundary."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import otflow
from otflow.cnf.serialize import named_arrays
from otflow.training.options import FitOptions
from otflow.training.stages import TWO_STAGE_DEFAULTS, plan_stages, resolve_objective, stage_of

from _helpers import framework_installed

needs_torch = pytest.mark.skipif(not framework_installed("torch"), reason="needs torch")

#: a tiny two-stage run: 12 flow-matching iterations, then 4 RNODE ones (RK4 × 2)
TWO = dict(objective="flow-matching+rnode", flow_matching_iters=12, max_iters=4, hidden=(8,), batch_size=32,
           flow_matching_batch_size=64,
           n_train=400, val_points=50, eval_every=2, dtype="float64", quiet=True, seed=5, steps=2)


def _resolved(**given):
    return resolve_objective(FitOptions.from_mapping(given), images=False, warm_start=False)


def test_auto_is_two_stages_for_vectors_and_rnode_for_images_and_warm_starts():
    two = _resolved()
    assert two.objective == "flow-matching+rnode" and two.coupling == "independent"
    assert {k: getattr(two, k) for k in TWO_STAGE_DEFAULTS} == TWO_STAGE_DEFAULTS
    opts = FitOptions.from_mapping({})
    assert resolve_objective(opts, images=True, warm_start=False).objective == "rnode"
    assert resolve_objective(opts, images=False, warm_start=True).objective == "rnode"
    assert _resolved(learn_T=True).objective == "rnode"
    # options given win over the recipe; RNODE alone keeps RNODE's own defaults
    mixed = _resolved(hidden=(16,), method="dopri5")
    assert (mixed.hidden, mixed.method, mixed.activation, mixed.lr) == ((16,), "dopri5", "swish",
                                                                        TWO_STAGE_DEFAULTS["lr"])
    alone = _resolved(objective="rnode")
    assert (alone.hidden, alone.method, alone.activation, alone.lr) == ((64, 64, 64), "dopri5", "tanh", 1e-3)
    assert _resolved(objective="flow-matching+rnode", coupling="ot").coupling == "ot"


def test_stages_split_iterations_schedules_and_cadences():
    opts = _resolved(flow_matching_iters=30, max_iters=5, eval_every=2, checkpoint_every=3)
    fm, rnode = plan_stages(opts, 5)
    assert (fm.objective, fm.start, fm.end, rnode.objective, rnode.start, rnode.end) == \
        ("flow-matching", 0, 30, "rnode", 30, 35)
    assert fm.learning_rate(0) == pytest.approx(opts.flow_matching_lr)  # cosine from flow_matching_lr
    assert fm.learning_rate(29) < 0.01 * opts.flow_matching_lr
    assert rnode.learning_rate(30) == pytest.approx(opts.lr)  # the RNODE stage's own schedule starts afresh
    # flow matching: validated and checkpointed ten times, the last at its end; RNODE on its cadences
    assert [k for k in range(1, 31) if fm.is_due(k, fm.checkpoint_every)] == list(range(3, 31, 3))
    assert [k for k in range(1, 31) if fm.is_due(k, fm.eval_every)] == list(range(3, 31, 3))
    assert [k for k in range(31, 36) if rnode.is_due(k, rnode.eval_every)] == [32, 34, 35]
    assert [stage_of([fm, rnode], k) for k in (0, 29, 30, 35, 40)] == [0, 0, 1, 1, 1]
    one = plan_stages(_resolved(objective="rnode", max_iters=7), 7)
    assert [(s.objective, s.start, s.end) for s in one] == [("rnode", 0, 7)]


@needs_torch
def test_the_flow_matching_stage_is_a_flow_matching_run_then_rnode_takes_over():
    flow = otflow.fit("moons", backend="torch", **TWO)
    records = flow.history
    assert [r["objective"] for r in records] == ["flow-matching"] * 12 + ["rnode"] * 4
    assert all(np.isnan(r["nll"]) for r in records[:12]) and all(np.isfinite(r["nll"]) for r in records[12:])
    fm_lr, lr = FitOptions().flow_matching_lr, TWO_STAGE_DEFAULTS["lr"]
    assert records[0]["lr"] == pytest.approx(fm_lr) and records[12]["lr"] == pytest.approx(lr)
    # stage 1 ten times (every ceil(12/10) = 2, and its end), then every 2
    assert [r["it"] for r in records if "val_nll" in r] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert flow.fit_info["stages"] == [{"objective": "flow-matching", "start": 0, "end": 12},
                                       {"objective": "rnode", "start": 12, "end": 16}]
    assert flow.fit_info["options"]["objective"] == "flow-matching+rnode"
    # the same data, batches and keys as a flow-matching run of 12 iterations with the recipe's architecture
    common = {k: v for k, v in TWO.items() if k not in ("objective", "flow_matching_iters", "flow_matching_batch_size",
                                                       "max_iters", "steps")}
    fm = otflow.fit("moons", backend="torch", objective="flow-matching", max_iters=12, lr=fm_lr, schedule="cosine",
                    activation="swish", conditioning="concat", flow_matching_time_power=2.0,
                    **dict(common, eval_every=2, batch_size=64))
    assert [r["loss"] for r in records[:12]] == [r["loss"] for r in fm.history]
    assert [r.get("val_nll") for r in records[:12]] == [r.get("val_nll") for r in fm.history]


class _InterruptAt:
    """Trainers that send this process one SIGINT before the run's ``at``-th step (counted
    over the stages), which stops the run after that step with a final checkpoint."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def __call__(self, trainer):
        outer = self

        class Interrupting:
            def step(self, x, key, lr):
                outer.calls += 1
                if outer.calls == outer.at:
                    os.kill(os.getpid(), signal.SIGINT)
                return trainer.step(x, key, lr)

            def __getattr__(self, name):
                return getattr(trainer, name)

        return Interrupting()


@needs_torch
@pytest.mark.parametrize("stop_after", [6, 12, 14])  # mid flow matching, at the boundary, mid RNODE
def test_resume_across_the_stage_boundary_equals_an_uninterrupted_run(tmp_path, wrap_trainer, stop_after):
    whole = otflow.fit("moons", backend="torch", **TWO)
    ck = str(tmp_path / "ck.safetensors")
    wrap_trainer("torch", _InterruptAt(stop_after))
    with pytest.warns(RuntimeWarning, match="SIGINT"):
        stopped = otflow.fit("moons", backend="torch", checkpoint=ck, **TWO)
    assert stopped.fit_info["interrupted"] and stopped.fit_info["iterations"] == stop_after
    resumed = otflow.fit("moons", backend="torch", resume=ck)
    assert resumed.fit_info["iterations"] == 16
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history]
    mine, theirs = named_arrays(tuple(resumed.params), "p"), named_arrays(tuple(whole.params), "p")
    assert mine.keys() == theirs.keys()
    for name in mine:
        np.testing.assert_array_equal(np.asarray(mine[name]), np.asarray(theirs[name]))


@pytest.mark.parametrize("options, match", [
    ({"objective": "rnode", "flow_matching_iters": 10}, "flow_matching_iters describe.*objective='rnode'"),
    ({"objective": "flow-matching", "flow_matching_lr": 1e-3}, "flow_matching_lr describe.*objective='flow-matching'"),
    ({"objective": "rnode", "flow_matching_time_power": 2.0}, "flow_matching_time_power describe.*flow-matching loss"),
    ({"learn_T": True, "flow_matching_batch_size": 64}, "flow_matching_batch_size.*objective='rnode'"),
    ({"flow_matching_time_power": 0.0}, "flow_matching_time_power must be"),
    ({"flow_matching_iters": 0}, "flow_matching_iters must be"),
])
def test_options_of_a_stage_the_run_does_not_have_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        otflow.fit(np.random.default_rng(0).normal(size=(50, 2)), backend="numpy", max_iters=1, quiet=True, **options)
