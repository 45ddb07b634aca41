"""``otflow.CNFDensity``: an RNODE flow as a scikit-learn density estimator.

The contract is scikit-learn's for density estimators (``KernelDensity``,
``GaussianMixture``): :meth:`CNFDensity.fit` trains with :func:`otflow.fit`,
:meth:`~CNFDensity.score_samples` gives the log-density of each row,
:meth:`~CNFDensity.score` their mean, :meth:`~CNFDensity.sample` draws new rows. Every
constructor argument is a plain option stored unmodified, so ``get_params``,
``set_params``, ``clone``, ``Pipeline``, ``GridSearchCV`` and ``cross_val_score`` work
as for any scikit-learn estimator.

scikit-learn is an optional dependency (``pip install otflow[sklearn]``) imported only
by this module; ``import otflow`` does not import it (``otflow.CNFDensity`` is
resolved on first use).
"""
from __future__ import annotations

import numbers

import numpy as np

try:
    from sklearn.base import BaseEstimator, DensityMixin
    from sklearn.utils import check_random_state
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("otflow.CNFDensity needs scikit-learn >= 1.6: pip install otflow[sklearn] "
                      f"(importing it failed: {e})") from e

from ..cnf.flow import flow_from_header
from ..cnf.serialize import named_arrays
from .loop import fit as _fit_flow

__all__ = ["CNFDensity", "NOT_APPLICABLE_CHECKS"]

#: scikit-learn's estimator checks that do not hold for a CNF density, and why
NOT_APPLICABLE_CHECKS = {
    "check_methods_subset_invariance": (
        "score_samples solves the ODE of a whole batch at once: in float32 (the default dtype) a row's "
        "log-density changes with its batch-mates by rounding (about one unit in the last place, ~5e-7 at "
        "log p = -3.7), and with an adaptive solver the rows share steps, so by up to the evaluation tolerance; "
        "the check asks for 1e-7. With fit_options={'dtype': 'float64'} it passes for a tiny fit"),
}

#: the options of :func:`otflow.fit` that are constructor arguments (not ``fit_options`` keys)
_OWN_OPTIONS = ("hidden", "lambda_kinetic", "lambda_jacobian", "method", "max_iters", "max_time", "batch_size",
                "lr", "seed", "quiet")


class CNFDensity(DensityMixin, BaseEstimator):
    """An RNODE continuous normalizing flow (FFJORD, Grathwohl et al. 2019, with the
    kinetic-energy and Jacobian penalties of Finlay et al., "How to train your neural ODE",
    ICML 2020) as a scikit-learn density estimator, like ``KernelDensity`` or
    ``GaussianMixture``.

    Every argument is stored unmodified and validated when :meth:`fit` runs (scikit-learn's
    convention); the defaults are :class:`~otflow.FitOptions`' for ``objective="rnode"``, the
    objective the estimator trains unless ``fit_options`` names another. :func:`otflow.fit` standardizes
    data far from unit scale itself (``standardize="auto"``), so the density is always that of
    the rows as given.

    :param backend: ``"torch"`` or ``"jax"``; None: torch if installed, else jax.
    :param device: ``"cpu"``, ``"cuda"``, ``"gpu"``...; None: the backend's default.
    :param hidden: the widths of the velocity field's hidden layers.
    :param lambda_kinetic: λ_K, the weight of the kinetic-energy penalty.
    :param lambda_jacobian: λ_J, the weight of the Jacobian Frobenius penalty.
    :param method: the training solver (``"dopri5"``, ``"rk4"``, ``"midpoint"``, ``"euler"``).
    :param max_iters: training iterations.
    :param max_time: a time budget in seconds (None: none); with one, fitting is not reproducible.
    :param batch_size: rows per training batch.
    :param lr: the learning rate.
    :param random_state: an int (the run's seed, in ``[0, 2**32)``), a ``numpy.random.RandomState``
        or None (a seed drawn from numpy's global generator), as in scikit-learn.
    :param verbose: show :func:`otflow.fit`'s progress bar (off by default, e.g. inside
        ``GridSearchCV``).
    :param fit_options: any other option of :func:`otflow.fit` (the fields of
        :class:`~otflow.FitOptions`, e.g. ``{"n_blocks": 2, "val_fraction": 0.2}``), as a dict
        kept as given; it may not repeat an option that is an argument here.

    :ivar flow_: the trained :class:`~otflow.Flow` (``flow_.save(path)`` writes it as safetensors).
    :ivar n_features_in_: the number of columns seen by :meth:`fit`.
    :ivar feature_names_in_: the column names, when :meth:`fit` got a DataFrame with string names.
    :ivar history_: the training record, one dict per iteration (:attr:`otflow.Flow.history`).
    :ivar fit_info_: the run's summary (:attr:`otflow.Flow.fit_info`).
    """

    def __init__(self, *, backend=None, device=None, hidden=(64, 64, 64), lambda_kinetic=0.01,
                 lambda_jacobian=0.01, method="dopri5", max_iters=1000, max_time=None, batch_size=512, lr=1e-3,
                 random_state=None, verbose=False, fit_options=None):
        self.backend = backend
        self.device = device
        self.hidden = hidden
        self.lambda_kinetic = lambda_kinetic
        self.lambda_jacobian = lambda_jacobian
        self.method = method
        self.max_iters = max_iters
        self.max_time = max_time
        self.batch_size = batch_size
        self.lr = lr
        self.random_state = random_state
        self.verbose = verbose
        self.fit_options = fit_options

    # ---- scikit-learn's protocol ----------------------------------------------------------
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.target_tags.required = False  # unsupervised: fit ignores y
        tags.non_deterministic = self.max_time is not None  # a time budget stops at a machine-dependent iteration
        return tags

    def fit(self, X, y=None):
        """Train the flow on the rows of ``X`` with :func:`otflow.fit`.

        :param X: array-like of shape ``(n_samples, n_features)``, at least 2 rows, finite.
        :param y: ignored (unsupervised).
        :returns: self, fitted.
        :raises ValueError: NaN/inf, a 1-D or empty ``X``, or an option out of range.
        :raises TypeError: an unknown ``fit_options`` key (naming the nearest), or one that
            repeats a constructor argument.
        :raises TrainingFailed: when training fails repeatedly (:class:`~otflow.FitOptions`' policy).
        """
        X = validate_data(self, X, dtype=np.float64, ensure_min_samples=2)
        # an RNODE estimator: its arguments are the RNODE objective's; fit_options={"objective": ...}
        # picks another (e.g. "flow-matching+rnode", whose RNODE stage they then describe)
        options = dict({"objective": "rnode"}, **self._extra_options(), hidden=self.hidden, lambda_kinetic=self.lambda_kinetic,
                       lambda_jacobian=self.lambda_jacobian, method=self.method, max_iters=self.max_iters,
                       max_time=self.max_time, batch_size=self.batch_size, lr=self.lr, seed=self._seed(),
                       quiet=not self.verbose)
        flow = _fit_flow(X, backend=self.backend, device=self.device, **options)
        self.flow_ = flow
        self.history_ = flow.history
        self.fit_info_ = flow.fit_info
        return self

    def score_samples(self, X):
        """The log-density of each row under the fitted flow (exact trace, adaptive solver).

        :param X: array-like of shape ``(n_samples, n_features)``.
        :returns: ``log p(x)`` per row, a float64 array of shape ``(n_samples,)``.
        :raises NotFittedError: before :meth:`fit`.
        :raises ValueError: NaN/inf, or another number of columns than :meth:`fit` saw.
        """
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        return np.asarray(self.flow_.log_prob(X), dtype=np.float64)

    def score(self, X, y=None):
        """The mean log-likelihood per row of ``X`` — ``GaussianMixture.score``'s convention
        (``KernelDensity.score`` returns the sum instead). The mean is comparable across
        cross-validation folds of different sizes; higher is better, as ``GridSearchCV``
        expects.

        :param X: array-like of shape ``(n_samples, n_features)``.
        :param y: ignored.
        :returns: ``mean(score_samples(X))``, a float.
        """
        return float(np.mean(self.score_samples(X)))

    def sample(self, n_samples=1, random_state=None):
        """Draw rows from the fitted flow (standard normal draws pushed through its inverse).

        Returns only the samples, as ``KernelDensity.sample`` does (``GaussianMixture.sample``
        also returns component labels, which a flow does not have).

        :param n_samples: the number of rows, a positive int.
        :param random_state: an int, a ``numpy.random.RandomState`` or None (numpy's global
            generator) seeding the base draws; the same int gives the same rows.
        :returns: a float64 array of shape ``(n_samples, n_features_in_)``.
        :raises ValueError: ``n_samples`` not a positive int.
        """
        check_is_fitted(self)
        if isinstance(n_samples, (bool, np.bool_)) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}")
        seed = _seed_from(random_state, "random_state")
        return np.asarray(self.flow_.sample(int(n_samples), seed=seed), dtype=np.float64)

    # ---- pickling: the flow travels as its safetensors arrays and JSON header -------------
    def __getstate__(self):
        state = dict(super().__getstate__())
        flow = state.pop("flow_", None)
        if flow is not None:
            arrays = {k: np.array(flow.backend.to_numpy(v)) for k, v in named_arrays(flow.params, "params").items()}
            state["_flow_file"] = {"header": flow.header(), "arrays": arrays, "backend": flow.backend.name}
        return state

    def __setstate__(self, state):
        state = dict(state)
        saved = state.pop("_flow_file", None)
        super().__setstate__(state)
        if saved is not None:
            flow = flow_from_header(saved["header"], saved["arrays"], backend=saved["backend"], device=self.device)
            flow.history, flow.fit_info = self.history_, self.fit_info_
            self.flow_ = flow

    # ---- helpers ------------------------------------------------------------------------
    def _extra_options(self) -> dict:
        extra = {} if self.fit_options is None else self.fit_options
        if not hasattr(extra, "keys"):
            raise TypeError(f"fit_options must be a dict of otflow.fit options or None, got {extra!r}")
        for key in ("backend", "device") + _OWN_OPTIONS:
            if key in extra:
                own = {"seed": "random_state", "quiet": "verbose"}.get(key, key)
                raise TypeError(f"fit_options[{key!r}]: set it as CNFDensity({own}=...), not in fit_options")
        return dict(extra)

    def _seed(self) -> int:
        return _seed_from(self.random_state, "random_state")


def _seed_from(random_state, name: str) -> int:
    """An int seed in ``[0, 2**32)`` from scikit-learn's ``random_state`` conventions."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, (bool, np.bool_)):
        if not 0 <= random_state < 2 ** 32:
            raise ValueError(f"{name} must be an int in [0, 2**32), a numpy.random.RandomState or None, "
                             f"got {random_state!r}")
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
