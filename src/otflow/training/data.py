"""The data of a training run: reading and validating it, the validation split, the
standardization, and the batches.

Everything here is numpy on the host; only a batch becomes a backend array, one per
iteration. The order in which the run's random generator is used (sampling a toy data
set, the split permutation, then one index draw per batch) is part of what a checkpoint
reproduces, so it never changes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import infer_backend
from ..base.options import unknown_option_message
from . import datasets

__all__ = ["DataSource", "TrainingData", "read_data", "validate_data", "prepare_data", "sample_batch"]


@dataclass(frozen=True)
class DataSource:
    """What ``fit`` was given, read: exactly one of ``array`` and ``dataset`` is set.

    ``array`` is the validated float64 array; ``dataset`` an embedded data set's name
    (sampled once the run's seed is known); ``native`` the backend owning the array the
    user passed (a torch tensor, a jax array), which ``fit`` trains on by default.
    """

    array: np.ndarray | None = None
    dataset: str | None = None
    native: Any = None


@dataclass(frozen=True)
class TrainingData:
    """The rows a run trains and validates on.

    :ivar train: the training rows, standardized when ``standardize`` is on (float64).
    :ivar val: the validation rows as given (the flow standardizes them), or None.
    :ivar shift: the per-column mean of the training rows (None without standardization).
    :ivar scale: the per-column standard deviation of the training rows (likewise).
    :ivar digest: a hash of all rows, stored in checkpoints to notice other data on resume.
    """

    train: np.ndarray
    val: np.ndarray | None
    shift: np.ndarray | None
    scale: np.ndarray | None
    digest: str

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    @property
    def n_train(self) -> int:
        return self.train.shape[0]


def read_data(data) -> DataSource:
    """Read what was passed as ``fit``'s data (before any backend is chosen).

    :param data: a 2-D numpy array, torch tensor or jax array; a path to a ``.npy``,
        ``.npz`` or ``.csv`` file; or an embedded data set's name.
    :returns: the data, validated, or the data set's name.
    :raises ValueError: a name that is neither a file nor a data set, or invalid values.
    :raises TypeError: data that cannot be read as a real array.
    """
    if isinstance(data, (str, os.PathLike)):
        return _read_path_or_name(data)
    native = None
    if not isinstance(data, np.ndarray) and hasattr(data, "shape") and hasattr(data, "dtype"):
        try:
            native = infer_backend(data)
        except TypeError:
            native = None  # another array library: numpy conversion below, or a clear error
        else:
            data = native.to_numpy(data)
    try:
        array = np.asarray(data)
    except Exception as e:  # ragged lists, tensors numpy cannot read, ...
        raise TypeError(f"data could not be read as an array ({type(e).__name__}: {e}); pass a 2-D numpy array "
                        "of shape (n_samples, n_features), a torch tensor, a jax array, a file path or a "
                        "dataset name") from None
    return DataSource(array=validate_data(array), native=native)


def _read_path_or_name(data) -> DataSource:
    text = os.fspath(data)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if os.path.exists(text) or os.path.splitext(text)[1].lower() in (".npy", ".npz", ".csv"):
        return DataSource(array=validate_data(datasets.load_array(text)))
    if text in datasets.names():
        return DataSource(dataset=text)
    raise ValueError(f"{text!r} is neither an existing file (.npy, .npz, .csv) nor an embedded dataset. " +
                     unknown_option_message("dataset", text, datasets.names()))


def validate_data(x: np.ndarray) -> np.ndarray:
    """Check that ``x`` can be fitted and return it as float64.

    :param x: the data.
    :returns: ``x`` as a float64 array (integers and booleans are converted).
    :raises TypeError: complex or non-numeric data.
    :raises ValueError: not 2-D, fewer than 2 rows, no columns, or NaN/inf values.
    """
    if x.dtype.kind == "c":
        raise TypeError("data is complex; a density model needs real values (take .real/.imag or stack them)")
    if x.dtype.kind not in "biuf":
        raise TypeError(f"data must be numeric, got dtype {x.dtype}; convert it with np.asarray(data, float)")
    x = x.astype(np.float64)
    if x.ndim != 2:
        hint = " (a single feature? use x[:, None])" if x.ndim == 1 else ""
        raise ValueError(f"data must be a 2-D array (n_samples, n_features), got shape {x.shape}{hint}")
    if x.shape[0] < 2:
        raise ValueError(f"data has {x.shape[0]} sample(s); fitting a density needs at least 2")
    if x.shape[1] == 0:
        raise ValueError(f"data has shape {x.shape}: no features (columns); pass (n_samples, n_features)")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"data contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); "
                         "drop or impute them first")
    return x


def prepare_data(source: DataSource, opts, rng: np.random.Generator) -> TrainingData:
    """The validation split and the standardization of a run's data.

    :param source: what :func:`read_data` returned.
    :param opts: the run's :class:`~otflow.FitOptions`.
    :param rng: the run's random generator (a toy data set is sampled from it, then the split drawn).
    :returns: the training and validation rows.
    :raises ValueError: too few training rows, constant columns, or values too large for the dtype.
    """
    x = source.array
    if source.dataset is not None:
        x = validate_data(datasets.sample(source.dataset, opts.n_train + max(opts.val_points, 1), rng=rng))
    digest = hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:16]
    n_val = 0
    if opts.val_fraction > 0:
        n_val = max(1, min(opts.val_points, int(round(opts.val_fraction * x.shape[0]))))
    perm = rng.permutation(x.shape[0])
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    if train.shape[0] < 2:
        raise ValueError(f"only {train.shape[0]} training sample(s) after the validation split; "
                         "lower val_fraction or supply more data")
    shift = scale = None
    if opts.standardize:
        shift, scale = _standardization(train)
        train = (train - shift) / scale
    _check_range(train, opts.dtype)
    return TrainingData(train=train, val=val if n_val else None, shift=shift, scale=scale, digest=digest)


def _standardization(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(over="ignore", invalid="ignore"):
        shift = train.mean(axis=0)
        scale = train.std(axis=0)
    if not (np.all(np.isfinite(shift)) and np.all(np.isfinite(scale))):
        raise ValueError(f"data values are too large to standardize in float64 (max |x| = "
                         f"{np.max(np.abs(train)):.3g}); rescale the data first")
    constant = np.nonzero(scale <= 1e-12 * np.maximum(1.0, np.abs(shift)))[0]
    if constant.size:
        raise ValueError(f"data column(s) {constant.tolist()} are constant (zero variance): a density over them "
                         "is degenerate. Drop them, or pass standardize=False and add noise.")
    return shift, scale


def _check_range(train: np.ndarray, dtype: str) -> None:
    largest = np.max(np.abs(train))
    if largest >= float(np.finfo(np.dtype(dtype)).max):
        raise ValueError(f"data values exceed the range of {dtype} (max |x| = {largest:.3g}); "
                         "rescale the data, or keep standardize=True")


def sample_batch(data: TrainingData, rng: np.random.Generator, batch_size: int, backend, dtype, device):
    """One training batch: ``batch_size`` rows drawn with replacement, as a backend array.

    :param data: the run's data.
    :param rng: the run's random generator (one draw per batch).
    :param batch_size: the number of rows.
    :param backend: the backend of the batch.
    :param dtype: its dtype (the backend's).
    :param device: its device.
    :returns: the batch.
    """
    rows = rng.integers(0, data.n_train, batch_size)
    return backend.asarray(data.train[rows], dtype=dtype, device=device)
