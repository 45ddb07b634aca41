"""``otflow.CNFDensity``: the scikit-learn density-estimator contract.

scikit-learn's own estimator checks (all that apply; the ones that do not are
``NOT_APPLICABLE_CHECKS``, each with its reason), the score convention against the
flow's log-density and a closed form, Pipeline / GridSearchCV / cross_val_score with
warnings as errors, pickling, clone, input errors, and the optional import.
Every fit is tiny (2-D data, one hidden layer of 8, a few iterations) and on torch.
"""
from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
pytest.importorskip("torch")

from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import check_methods_subset_invariance, parametrize_with_checks  # noqa: E402

import otflow  # noqa: E402
from otflow.training.estimator import NOT_APPLICABLE_CHECKS, CNFDensity  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(backend="torch", hidden=(8,), max_iters=2, batch_size=16, random_state=0)


_MIX = np.array([[1.0, 0.0], [0.8, 0.5]])


def _data(n=60, seed=0):
    """Correlated Gaussian rows ``z A + b``: mean (2, −1), covariance AᵀA."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)) @ _MIX + np.array([2.0, -1.0])


@pytest.fixture(scope="module")
def fitted():
    return CNFDensity(**dict(TINY, max_iters=5)).fit(_data())


# ---- scikit-learn's checks ------------------------------------------------------------------
@parametrize_with_checks([CNFDensity(**TINY)], expected_failed_checks=lambda est: NOT_APPLICABLE_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_subset_invariance_holds_in_float64():
    """The one check listed as not applicable fails for float32 rounding only: in float64 it passes."""
    check_methods_subset_invariance("CNFDensity", CNFDensity(**TINY, fit_options={"dtype": "float64"}))


def test_tags_say_unsupervised_density_estimator():
    tags = CNFDensity().__sklearn_tags__()
    assert tags.estimator_type == "density_estimator"
    assert not tags.target_tags.required and not tags.input_tags.allow_nan and not tags.non_deterministic
    assert CNFDensity(max_time=1.0).__sklearn_tags__().non_deterministic


# ---- the contract's values ------------------------------------------------------------------
def test_score_samples_is_the_flows_log_density_and_score_its_mean(fitted):
    x = _data(25, seed=1)
    logp = fitted.score_samples(x)
    assert logp.shape == (25,) and logp.dtype == np.float64
    np.testing.assert_array_equal(logp, np.asarray(fitted.flow_.log_prob(x), dtype=np.float64))
    assert fitted.score(x) == pytest.approx(np.mean(logp), rel=1e-12)


def test_an_untrained_flow_scores_the_standardizing_gaussian():
    """With a negligible learning rate the zero-initialized field stays ~0, so the flow is the
    standardization alone: log p(x) = Σ_j log N(x_j; mean_j, std_j²) (closed form)."""
    x = _data(40)
    est = CNFDensity(**dict(TINY, max_iters=1, lr=1e-12), fit_options={"val_fraction": 0.0, "standardize": True}).fit(x)
    y = _data(10, seed=2)
    mu, sd = x.mean(axis=0), x.std(axis=0)
    expected = np.sum(-0.5 * ((y - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi), axis=1)
    np.testing.assert_allclose(est.score_samples(y), expected, rtol=1e-5, atol=1e-5)


def test_training_approaches_the_true_log_likelihood():
    """The rows ``z A + b`` (z standard normal) are Gaussian with covariance AᵀA, so the true mean
    log-likelihood of held-out rows is a closed form. The near-initial flow (the diagonal
    standardization only) misses the correlation by ~0.25 nats; 60 iterations come within 0.05."""
    from scipy.stats import multivariate_normal

    x, x_test = _data(400), _data(400, seed=3)
    truth = multivariate_normal(mean=[2.0, -1.0], cov=_MIX.T @ _MIX).logpdf(x_test).mean()
    std = {"standardize": True}  # the premise: the near-initial flow is the diagonal standardization
    few = CNFDensity(**dict(TINY, max_iters=1, hidden=(16,), batch_size=128, lr=1e-2), fit_options=std).fit(x)
    many = CNFDensity(**dict(TINY, max_iters=60, hidden=(16,), batch_size=128, lr=1e-2), fit_options=std).fit(x)
    assert truth - few.score(x_test) > 0.15
    assert abs(truth - many.score(x_test)) < 0.05


def test_sample_shape_and_seeding(fitted):
    a = fitted.sample(7, random_state=3)
    assert a.shape == (7, 2) and a.dtype == np.float64 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, fitted.sample(7, random_state=3))
    assert not np.array_equal(a, fitted.sample(7, random_state=4))
    np.testing.assert_array_equal(a, np.asarray(fitted.flow_.sample(7, seed=3), dtype=np.float64))
    assert fitted.sample().shape == (1, 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n_samples must be a positive int"):
            fitted.sample(bad)


def test_fitted_attributes(fitted):
    assert fitted.n_features_in_ == 2
    assert isinstance(fitted.flow_, otflow.Flow)
    assert len(fitted.history_) == 5 and fitted.fit_info_["iterations"] == 5
    assert fitted.fit_info_["options"]["seed"] == 0 and fitted.fit_info_["options"]["quiet"] is True


def test_params_are_stored_unmodified_and_fit_options_pass_through():
    opts = {"n_blocks": 2, "val_fraction": 0.2}
    est = CNFDensity(hidden=[8], lambda_kinetic=0.5, fit_options=opts)
    params = est.get_params()
    assert params["hidden"] == [8] and params["fit_options"] is opts and params["lambda_kinetic"] == 0.5
    assert est.set_params(method="rk4", max_iters=3).get_params()["method"] == "rk4"
    est.set_params(backend="torch", batch_size=16, random_state=0).fit(_data())
    assert len(est.flow_.fields) == 2 and est.fit_info_["options"]["lambda_kinetic"] == 0.5
    assert est.fit_info_["options"]["method"] == "rk4" and opts == {"n_blocks": 2, "val_fraction": 0.2}


# ---- scikit-learn tools ---------------------------------------------------------------------
def test_pipeline_grid_search_and_cross_val_score_without_warnings():
    x = _data(80)
    pipe = make_pipeline(StandardScaler(), CNFDensity(**TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        search = GridSearchCV(pipe, {"cnfdensity__lambda_kinetic": [0.0, 0.1]}, cv=2).fit(x)
        scores = cross_val_score(pipe, x, cv=KFold(2))
    assert search.best_params_["cnfdensity__lambda_kinetic"] in (0.0, 0.1)
    # cross_val_score is exactly the mean log-likelihood of each held-out fold
    manual = [clone(pipe).fit(x[train]).score(x[test]) for train, test in KFold(2).split(x)]
    np.testing.assert_allclose(scores, manual, rtol=1e-12)
    results = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(results)) and search.best_score_ == pytest.approx(np.max(results))


def test_pickle_round_trip_and_clone(fitted):
    x = _data(20, seed=5)
    again = pickle.loads(pickle.dumps(fitted))
    np.testing.assert_array_equal(again.score_samples(x), fitted.score_samples(x))
    np.testing.assert_array_equal(again.sample(4, random_state=1), fitted.sample(4, random_state=1))
    assert again.history_ == fitted.history_ and again.flow_.history == fitted.history_
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params() and not hasattr(twin, "flow_")


@pytest.mark.slow  # ~10 s of JAX compilation; the pickling code is the torch test's
def test_a_flow_pickled_from_jax_loads_on_jax():
    pytest.importorskip("jax")
    est = CNFDensity(**dict(TINY, backend="jax", max_iters=1, method="euler"),
                     fit_options={"steps": 2, "val_fraction": 0.0}).fit(_data())
    x = _data(8, seed=6)
    again = pickle.loads(pickle.dumps(est))
    assert again.flow_.backend.name == "jax"
    np.testing.assert_allclose(again.score_samples(x), est.score_samples(x), rtol=1e-6)


# ---- errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("x", "message"), [
    (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 1.0]]), "NaN"),
    (np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 1.0]]), "infinity"),
    (np.arange(5.0), "Expected 2D array"),
    (np.empty((0, 2)), "0 sample"),
    (np.ones((1, 2)), "1 sample"),
])
def test_bad_data_gets_sklearns_errors(x, message):
    with pytest.raises(ValueError, match=message):
        CNFDensity(**TINY).fit(x)


def test_scoring_needs_a_fit_and_the_fitted_width(fitted):
    with pytest.raises(NotFittedError):
        CNFDensity().score_samples(_data(3))
    with pytest.raises(ValueError, match="features"):
        fitted.score_samples(np.ones((3, 3)))


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"hidden": (4,)}, TypeError, r"CNFDensity\(hidden=...\)"),
    ({"seed": 1}, TypeError, r"CNFDensity\(random_state=...\)"),
    ({"quiet": False}, TypeError, r"CNFDensity\(verbose=...\)"),
    ({"n_block": 2}, TypeError, "n_blocks"),
    ([("n_blocks", 2)], TypeError, "fit_options must be a dict"),
])
def test_bad_fit_options_are_named(options, error, message):
    with pytest.raises(error, match=message):
        CNFDensity(**TINY, fit_options=options).fit(_data())


def test_bad_random_state_is_named():
    with pytest.raises(ValueError, match="random_state must be an int in"):
        CNFDensity(**dict(TINY, random_state=-1)).fit(_data())


# ---- the optional dependency ----------------------------------------------------------------
def _python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_otflow_does_not_import_sklearn_until_asked():
    out = _python("import json, sys, otflow\n"
                  "before = 'sklearn' in sys.modules\n"
                  "est = otflow.CNFDensity\n"
                  "print(json.dumps({'before': before, 'after': 'sklearn' in sys.modules, 'name': est.__name__}))")
    assert out == {"before": False, "after": True, "name": "CNFDensity"}


def test_missing_sklearn_names_the_extra():
    out = _python("import json, sys\n"
                  "sys.modules['sklearn'] = None\n"
                  "import otflow\n"
                  "try:\n"
                  "    otflow.CNFDensity\n"
                  "except ImportError as e:\n"
                  "    print(json.dumps({'message': str(e)}))\n")
    assert "pip install otflow[sklearn]" in out["message"]
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        otflow.NoSuchName
