"""A fast subset of ``python -m validation.solver_convergence`` (numpy backend, float64).

The full study (every backend, every tolerance from 1e-3 to 1e-10) is run by hand; its
numbers are in docs/solvers.md. Here: the observed orders within the issue's bounds,
otflow's dopri5 within 10 % of scipy RK45's evaluations at equal achieved error, and the
script end to end with ``--quick``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `validation` is a top-level folder of the repository, not installed
    sys.path.insert(0, str(REPO))

from validation import solver_convergence as sc  # noqa: E402

#: the issue's bounds on the observed orders (the script checks midpoint 2 ± 0.15 too)
ISSUE_BOUNDS = {"euler": (1, 0.1), "rk4": (4, 0.2), "dopri5": (5, 0.3), "dopri5_embedded": (4, 0.3),
                "midpoint": (2, 0.15)}


@pytest.fixture(scope="module")
def quick_orders():
    return sc.observed_orders("numpy", quick=True)


@pytest.mark.parametrize("solver", sorted(ISSUE_BOUNDS))
def test_observed_order_within_issue_bounds(quick_orders, solver):
    expected, tol = ISSUE_BOUNDS[solver]
    assert sc.ORDER_BOUNDS[solver] == (expected, tol)
    assert set(quick_orders) == {p.name for p in sc.LINEAR_PROBLEMS}
    for problem, by_solver in quick_orders.items():
        assert abs(by_solver[solver] - expected) <= tol, (problem, solver, by_solver[solver])


def test_fit_order_drops_roundoff_and_uses_smallest_steps():
    hs = [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    errors = [1e-1, 3e-3, 1e-4, 3.1e-6, 9.8e-8, 5e-15]  # slope ≈ 5, then roundoff
    slope, used = sc.fit_order(hs, errors, n_fit=3)
    assert used == [False, False, True, True, True, False]
    assert slope == pytest.approx(5.0, abs=0.05)


def test_work_precision_nfe_within_10_percent_of_scipy():
    rows = sc.work_precision("numpy", problems=["vanderpol"], tols=[1e-4, 1e-7])
    assert len(rows) == 2
    for r in rows:
        assert r["otflow_rejected"] > 0  # the nonlinear problem exercises rejections
        assert abs(r["nfe_ratio_same_tol"] - 1) <= sc.NFE_TARGET, r
        assert r["otflow_error"] < 100 * r["tol"], r
    summary = sc.nfe_ratio_at_equal_error(rows, "vanderpol")
    assert summary["grid"], summary
    assert summary["holds"], summary
    assert 1 - sc.NFE_TARGET <= summary["min"] <= summary["max"] <= 1 + sc.NFE_TARGET


def test_nfe_ratio_interpolates_at_equal_error():
    # otflow needs 1.2× the evaluations for the same error: the ratio is 1.2 everywhere
    rows = [dict(problem="p", otflow_error=e, otflow_nfe=1.2 * n, scipy_error=e, scipy_nfe=n)
            for e, n in [(1e-3, 100), (1e-6, 400), (1e-9, 1600)]]
    s = sc.nfe_ratio_at_equal_error(rows)
    assert s["min"] == pytest.approx(1.2) and s["max"] == pytest.approx(1.2)
    assert not s["holds"]


def test_script_quick_end_to_end(tmp_path, capsys):
    rc = sc.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    png = tmp_path / "solver_convergence.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    data = json.loads((tmp_path / "solver_convergence.json").read_text(encoding="utf-8"))
    assert data["orders_ok"] and data["nfe_target_holds"]
    assert "## Observed orders" in out and "RESULT: orders within bounds; NFE target holds" in out
