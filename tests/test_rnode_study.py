"""The RNODE study (validation/rnode_study.py): its path measures against closed forms,
and (slow) a quick run end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from otflow.cnf import Flow, FunctionField
from validation import rnode_study


def _rotation_flow(T: float) -> Flow:
    """v(t, x) = Ω x with Ω the rotation generator: paths are circle arcs at constant speed ‖x‖."""

    def apply(params, t, x):
        return x[:, ::-1] * np.array([-1.0, 1.0])

    field = FunctionField(apply, initial_params=None, event_shape=(2,))
    from otflow.cnf import SolverOptions

    return Flow([field], [None], backend="numpy", dtype="float64", T=T,
                eval_solver=SolverOptions(rtol=1e-10, atol=1e-10))


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
def test_straightness_of_circle_arcs(T):
    """An arc of angle T: chord² = 2(1 − cos T)‖x‖², energy ∫‖v‖² dt = T‖x‖², so the ratio is
    2(1 − cos T)/T² for every point (1 only in the limit of a straight path)."""
    x = np.random.default_rng(0).normal(size=(20, 2))
    ratio, cost = rnode_study.path_straightness(_rotation_flow(T), x, n_times=257)
    assert ratio == pytest.approx(2 * (1 - math.cos(T)) / T ** 2, rel=1e-4)
    assert cost == pytest.approx(np.mean(2 * (1 - math.cos(T)) * np.sum(x * x, axis=1)), rel=1e-8)


def test_straight_paths_have_ratio_one():
    def apply(params, t, x):
        return x * 0.0 + np.array([1.0, -2.0])

    flow = Flow([FunctionField(apply, initial_params=None, event_shape=(2,))], [None], backend="numpy",
                dtype="float64")
    ratio, cost = rnode_study.path_straightness(flow, np.zeros((3, 2)))
    assert ratio == pytest.approx(1.0, rel=1e-10) and cost == pytest.approx(5.0, rel=1e-10)


def test_discrete_ot_cost_is_below_any_other_pairing():
    x = np.random.default_rng(1).normal(size=(200, 2)) + 1.0
    z = np.random.default_rng(7).standard_normal(x.shape)
    identity = float(np.mean(np.sum((x - z) ** 2, axis=1)))
    assert rnode_study.discrete_ot_cost(x, 7) < 0.5 * identity


def test_time_to_reach_and_verdicts_read_the_curves():
    curve = [(10, 1.0, 3.0), (20, 2.0, 2.5), (30, 3.0, 2.0)]
    assert rnode_study.time_to_reach(curve, 2.5) == 2.0 and rnode_study.time_to_reach(curve, 1.0) is None
    row = dict(curve=curve, test_nll=2.0, eval_nfe=50, skipped=0)
    rows = {"vanilla": dict(row, eval_nfe=80), "rnode": dict(row, curve=[(10, 0.5, 2.0)]),
            "rnode-rk4": row, "vanilla-rk4": dict(row, test_nll=2.4)}
    lines = rnode_study.verdicts(rows)
    assert "vanilla reaches it after 3 s, RNODE after 0 s" in lines[0]
    assert lines[1].endswith("holds here") and "regularization helps" in lines[2] and lines[3].endswith("holds here")


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    assert rnode_study.main(["--quick", "--data", "8gaussians", "--backend", "torch", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "rnode_study.json").read_text())
    rows = report["results"]["8gaussians"]
    assert set(rows) == set(rnode_study.RECIPES)
    assert all(r["iterations"] >= 1 and r["eval_nfe"] > 0 for r in rows.values())
    assert (tmp_path / "rnode_study.png").stat().st_size > 0
