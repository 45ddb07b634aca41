"""``standardize="auto"`` (the default): data far from unit scale are standardized, data
already on the base distribution's scale are trained as they are (issue #13: standardizing
the checkerboard cost likelihood at the default's budget)."""
from __future__ import annotations

import numpy as np
import pytest

import otflow
from otflow import datasets
from otflow.training.data import UNIT_SCALE_DEVIATION, UNIT_SCALE_MEAN, on_unit_scale
from otflow.training.image_model import resolve_image_options
from otflow.training.options import FitOptions

pytest.importorskip("torch")

TINY = dict(backend="torch", objective="rnode", hidden=(8, 8), max_iters=2, eval_every=2, batch_size=64,
            val_points=50, quiet=True, method="rk4", steps=2)


@pytest.fixture(scope="module")
def checkerboard():
    return datasets.sample("checkerboard", 600, seed=0)


def test_unit_scale_is_the_bounds_on_every_column(checkerboard):
    assert on_unit_scale(checkerboard)  # deviation ~2.3, mean ~0
    assert on_unit_scale(datasets.sample("8gaussians", 600, seed=0))
    low, high = UNIT_SCALE_DEVIATION
    rng = np.random.default_rng(0)
    z = rng.standard_normal((4000, 3))
    assert on_unit_scale(z)
    assert not on_unit_scale(z * np.array([1.0, 1.0, 1.2 * high]))  # one column too wide
    assert not on_unit_scale(z * np.array([1.0, 0.8 * low, 1.0]))  # one column too narrow
    assert not on_unit_scale(z + np.array([0.0, 0.0, UNIT_SCALE_MEAN + 0.5]))  # one column off-centre
    assert not on_unit_scale(np.concatenate([z, np.zeros((4000, 1))], axis=1))  # a constant column


def test_auto_keeps_unit_scale_data_and_standardizes_the_rest(checkerboard):
    flow = otflow.fit(checkerboard, **TINY)
    assert flow.fit_info["options"]["standardize"] is False and flow.shift is None
    flow = otflow.fit(checkerboard * 100.0 + 3.0, **TINY)
    assert flow.fit_info["options"]["standardize"] is True
    np.testing.assert_allclose(np.asarray(flow.shift), 3.0, atol=100 * 0.3)
    # the density is always that of the rows as given: a scaled copy's log-density is shifted by
    # the log-Jacobian, whichever way each was trained
    x = checkerboard[:5]
    assert np.all(np.isfinite(np.asarray(flow.log_prob(x * 100.0 + 3.0))))


def test_explicit_values_win_and_are_recorded(checkerboard):
    assert otflow.fit(checkerboard, standardize=True, **TINY).fit_info["options"]["standardize"] is True
    flow = otflow.fit(checkerboard * 100.0, standardize=False, **TINY)
    assert flow.fit_info["options"]["standardize"] is False and flow.shift is None


def test_auto_standardizes_data_and_contexts_together(checkerboard):
    context = np.random.default_rng(1).uniform(1000.0, 2000.0, size=(len(checkerboard), 1))  # e.g. a year
    flow = otflow.fit(checkerboard, context=context, **TINY)
    assert flow.fit_info["options"]["standardize"] is True
    assert flow.shift is not None and flow.context_shift is not None


def test_bad_values_are_refused_naming_the_choices():
    with pytest.raises(TypeError, match="True, False or 'auto'"):
        FitOptions(standardize="yes")
    with pytest.raises(TypeError, match="True, False or 'auto'"):
        FitOptions(standardize=1)


def test_images_resolve_auto_to_no_standardization():
    opts = resolve_image_options(FitOptions.from_mapping({"standardize": "auto"}))  # not refused
    assert opts.standardize == "auto"  # fit resolves it with the data: images are never standardized
    with pytest.raises(ValueError, match="standardize=True does not apply to image data"):
        resolve_image_options(FitOptions.from_mapping({"standardize": True}))


def test_command_line_flag_parses_the_three_values():
    import argparse

    from otflow.training.cli import _standardize_flag

    assert _standardize_flag("auto") == "auto" and _standardize_flag("True") is True
    assert _standardize_flag("false") is False
    with pytest.raises(argparse.ArgumentTypeError, match="auto, true or false"):
        _standardize_flag("maybe")
