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
    assert lines[1].endswith("holds here") and ": holds here" in lines[2] and lines[3].endswith("holds here")


def test_claim_b_needs_a_degradation_beyond_two_standard_errors():
    """Equal NLLs within the noise and no failures: (b) does not hold, whatever the NFE."""
    row = dict(curve=[(10, 1.0, 2.0)], test_nll=2.0, test_se=0.01, eval_nfe=50, skipped=0)
    rows = {"vanilla": row, "rnode": row, "rnode-rk4": row, "vanilla-rk4": dict(row, test_nll=2.02, eval_nfe=90)}
    assert ": does not hold here" in rnode_study.verdicts(rows)[2]
    rows["vanilla-rk4"] = dict(row, test_nll=2.03)  # 2·hypot(0.01, 0.01) = 0.028 < 0.03
    assert ": holds here" in rnode_study.verdicts(rows)[2]
    rows["vanilla-rk4"] = dict(row, skipped=3)
    assert ": holds here" in rnode_study.verdicts(rows)[2]


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    assert rnode_study.main(["--quick", "--data", "8gaussians", "--backend", "torch", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "rnode_study.json").read_text())
    rows = report["results"]["8gaussians"]
    assert set(rows) == set(rnode_study.RECIPES)
    assert all(r["iterations"] >= 1 and r["eval_nfe"] > 0 for r in rows.values())
    assert (tmp_path / "rnode_study.png").stat().st_size > 0


def test_verdicts_fall_back_to_the_test_nll_of_a_run_never_validated():
    """A run stopped by ``max_time`` before its first validation has an empty curve: its
    test NLL stands in for the target, and it never reaches it on the curve."""
    row = dict(curve=[], test_nll=2.0, eval_nfe=50, skipped=0)
    rows = {"vanilla": dict(row, curve=[(10, 1.0, 3.0), (20, 2.0, 1.5)]), "rnode": row, "rnode-rk4": row,
            "vanilla-rk4": row}
    assert rnode_study._best_nll(rows["rnode"]) == 2.0 and rnode_study._best_nll(rows["vanilla"]) == 1.5
    lines = rnode_study.verdicts(rows)
    assert "target NLL 2.0000: vanilla reaches it after 2 s, RNODE after never" in lines[0]
    assert lines[1].endswith("does not hold here")


def test_fine_tuned_recipes_start_from_a_listed_recipe():
    assert set(rnode_study.FINE_TUNE) <= set(rnode_study.RECIPES)
    assert all(rnode_study.RECIPES[name]["objective"] == "flow-matching" for name in rnode_study.FINE_TUNE)


def test_markdown_tables_hold_every_recipe_and_verdict():
    row = dict(iterations=10, step_seconds=4.2, test_nll=2.5, test_se=0.01, kl_gap=0.25, train_nfe=20.0,
               eval_nfe=40, skipped=1, straightness=0.9, map_cost=1.5, ot_cost=1.25, curve=[])
    text = rnode_study.markdown_tables({"toy": {"vanilla": row, "rnode": dict(row, kl_gap=None)}},
                                       {"toy": ["(a) holds here"]})
    lines = text.splitlines()
    assert lines[0] == "### toy" and "* (a) holds here" in lines
    assert "| vanilla | 10 | 4 | 2.5000 ± 0.0100 | 0.2500 | 20 | 40 | 1 | 0.900 | 1.500 | 1.250 |" in lines
    assert "| rnode | 10 | 4 | 2.5000 ± 0.0100 | – | 20 | 40 | 1 | 0.900 | 1.500 | 1.250 |" in lines


def test_claim_a_calls_times_within_ten_percent_a_tie():
    row = dict(curve=[(10, 80.0, 2.0)], test_nll=2.0, test_se=0.01, eval_nfe=50, skipped=0)
    rows = {"vanilla": row, "rnode": dict(row, curve=[(10, 78.0, 2.0)]), "rnode-rk4": row, "vanilla-rk4": row}
    assert rnode_study.verdicts(rows)[1].endswith("no difference here (within 10 % of the time)")
    rows["rnode"] = dict(row, curve=[(10, 60.0, 2.0)])
    assert rnode_study.verdicts(rows)[1].endswith(": holds here")
