"""The data of a training run: reading and validating it, the validation split, the
standardization, and the batches.

Image data (uint8 arrays of rank 3 or 4, an :class:`~otflow.datasets.ImageData`, image
files and directories, the name ``"digits"``) keep their integer pixel levels ``(N, C, H,
W)``: no standardization; the number of levels (256, or 17 for the digits) is recorded
for dequantization and bits per dimension.

Everything here is numpy on the host; only a batch becomes a backend array, one per
iteration. The order in which the run's random generator is used (sampling a toy data
set, the split permutation, then one index draw per batch) is part of what a checkpoint
reproduces, so it never changes.

A conditional run (``fit(x, context=c)``) keeps the contexts beside the rows: split with
the same permutation, standardized with their own mean and deviation, and drawn with the
same row indices, so batch row ``i`` is ``[x_i, c_i]`` (the contexts as the last columns).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..base import infer_backend
from ..base.options import unknown_option_message
from . import datasets
from .datasets import ImageData, is_image_source, load_images

__all__ = ["DataSource", "TrainingData", "ImageLevels", "read_data", "validate_data", "validate_images",
           "prepare_data", "sample_batch", "IMAGE_ONLY_OPTIONS", "validate_context", "split_context"]

#: options of the image model, refused (when changed from their defaults) for vector data
IMAGE_ONLY_OPTIONS = ("n_scales", "blocks_per_scale", "logit_alpha", "eval_estimator")


@dataclass(frozen=True)
class DataSource:
    """What ``fit`` was given, read: exactly one of ``array``, ``dataset`` and ``images`` is set.

    ``array`` is the validated float64 array; ``dataset`` an embedded data set's name
    (sampled once the run's seed is known); ``images`` image data (uint8 pixel levels);
    ``native`` the backend owning the array the user passed (a torch tensor, a jax array),
    which ``fit`` trains on by default.
    """

    array: np.ndarray | None = None
    dataset: str | None = None
    native: Any = None
    images: ImageData | None = None


@dataclass(frozen=True)
class ImageLevels:
    """Validation images: uint8 pixel levels ``(N, C, H, W)``, how many levels a pixel has,
    and the divergence estimator of their evaluation.

    :ivar levels: the pixels.
    :ivar n_levels: the number of levels (256 for 8-bit images, 17 for the digits).
    :ivar estimator: ``"exact"`` or ``"hutchinson"`` (:func:`image_eval_estimator`).
    """

    levels: np.ndarray
    n_levels: int
    estimator: str = "exact"

    def __len__(self) -> int:
        return self.levels.shape[0]


@dataclass(frozen=True)
class TrainingData:
    """The rows a run trains and validates on.

    :ivar train: the training rows, standardized when ``standardize`` is on (float64).
    :ivar val: the validation rows as given (the flow standardizes them), or None.
    :ivar shift: the per-column mean of the training rows (None without standardization).
    :ivar scale: the per-column standard deviation of the training rows (likewise).
    :ivar digest: a hash of all rows, stored in checkpoints to notice other data on resume.
    :ivar n_levels: for image data, the pixel levels (then ``train`` holds uint8 images
        ``(N, C, H, W)`` and ``val`` is an :class:`ImageLevels`); None for vector data.
    :ivar context: a conditional run's training contexts, one row per training row,
        standardized like the rows (None for an unconditional run).
    :ivar val_context: the validation rows' contexts as given (the flow standardizes them).
    :ivar context_shift: the per-column mean of the training contexts (None without
        standardization or context).
    :ivar context_scale: their per-column standard deviation (likewise).
    """

    train: np.ndarray
    val: np.ndarray | ImageLevels | None
    shift: np.ndarray | None
    scale: np.ndarray | None
    digest: str
    n_levels: int | None = None
    context: np.ndarray | None = None
    val_context: np.ndarray | None = None
    context_shift: np.ndarray | None = None
    context_scale: np.ndarray | None = None

    @property
    def context_dim(self) -> int:
        """The length of a context vector (0 for an unconditional run)."""
        return 0 if self.context is None else int(self.context.shape[1])

    @property
    def dim(self) -> int:
        """Values per row (``C·H·W`` for images)."""
        return int(np.prod(self.train.shape[1:]))

    @property
    def is_images(self) -> bool:
        """Whether these are image data (the multiscale image model trains on them)."""
        return self.n_levels is not None

    @property
    def image_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of one image (image data only)."""
        return tuple(int(n) for n in self.train.shape[1:])

    @property
    def n_train(self) -> int:
        return self.train.shape[0]


def read_data(data) -> DataSource:
    """Read what was passed as ``fit``'s data (before any backend is chosen).

    :param data: a 2-D numpy array, torch tensor or jax array; a uint8 array of images
        ``(N, H, W)`` or ``(N, C, H, W)``; an :class:`~otflow.datasets.ImageData`; a path to a
        ``.npy``, ``.npz`` or ``.csv`` file or to image files (:func:`~otflow.datasets.load_images`);
        ``"digits"`` (scikit-learn's digits as 8×8 images); or an embedded data set's name.
    :returns: the data, validated, or the data set's name.
    :raises ValueError: a name that is neither a file nor a data set, or invalid values.
    :raises TypeError: data that cannot be read as a real array.
    """
    if isinstance(data, ImageData):
        return DataSource(images=_checked_image_data(data))
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
    if array.dtype == np.uint8 and array.ndim in (3, 4):
        images = ImageData(train=validate_images(array), test=None, train_labels=None, test_labels=None,
                           n_levels=datasets.PIXEL_LEVELS, source="array", format="array")
        return DataSource(images=images, native=native)
    return DataSource(array=validate_data(array), native=native)


def validate_images(x: np.ndarray) -> np.ndarray:
    """Check uint8 images and return them as ``(N, C, H, W)``.

    :param x: uint8 pixels ``(N, H, W)`` (one channel) or ``(N, C, H, W)``.
    :returns: the pixels, ``(N, C, H, W)``.
    :raises ValueError: another rank, fewer than 2 images, or an empty image.
    """
    if x.ndim == 3:
        x = x[:, None, :, :]
    if x.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"the images hold {x.shape[0]} image(s); fitting a density needs at least 2")
    if 0 in x.shape[1:]:
        raise ValueError(f"the images have shape {x.shape[1:]}: an empty image; pass (N, C, H, W) pixels")
    return x


def _checked_image_data(images: ImageData) -> ImageData:
    if images.train is None:
        raise ValueError("the ImageData has no training part (load_images(..., split='test')?); fit needs "
                         "training images: load_images(path) or split='train'")
    validate_images(images.train)
    return images


def _read_path_or_name(data) -> DataSource:
    text = os.fspath(data)
    if not isinstance(text, str):
        text = os.fsdecode(text)
    if is_image_source(text):
        return DataSource(images=_checked_image_data(load_images(text)))
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
    _refuse_non_finite(x, "data", "drop or impute them first")
    return x


def _refuse_non_finite(a: np.ndarray, what: str, fix: str) -> None:
    """A ValueError naming the rows of ``a`` with NaN or inf, and ``fix``."""
    bad = ~np.isfinite(a)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise ValueError(f"{what} contains NaN or inf in {len(rows)} row(s) (first: {rows[:5].tolist()}); {fix}")


def validate_context(context, source: DataSource) -> np.ndarray:
    """Check ``fit``'s ``context=`` against its data and return it as float64.

    :param context: the contexts, one row per data row: a 2-D numpy array, torch tensor or jax array.
    :param source: the data, read (:func:`read_data`).
    :returns: the contexts, ``(n, context_dim)`` float64.
    :raises ValueError: image data or an embedded data set (no rows to pair contexts with),
        a context that is not 2-D, has another number of rows than the data, or NaN/inf.
    :raises TypeError: contexts that are not real numbers.
    """
    if source.images is not None:
        raise ValueError("context= with image data is not supported yet: conditional flows are vector models; "
                         "drop context=, or fit vectors (n_samples, n_features) with their contexts")
    if source.dataset is not None:
        raise ValueError(f"context= needs the data rows it belongs to; {source.dataset!r} is an embedded data set "
                         "sampled afresh. Pass the data as an array (n_samples, n_features) with the contexts")
    if not isinstance(context, np.ndarray) and hasattr(context, "shape") and hasattr(context, "dtype"):
        try:
            context = infer_backend(context).to_numpy(context)
        except TypeError:
            pass
    try:
        c = np.asarray(context)
    except Exception as e:
        raise TypeError(f"context could not be read as an array ({type(e).__name__}: {e}); pass a 2-D array "
                        "(n_samples, context_dim)") from None
    if c.dtype.kind not in "biuf":
        raise TypeError(f"context must be real numbers, got dtype {c.dtype}; convert it with "
                        "np.asarray(context, dtype=float)")
    c = c.astype(np.float64)
    if c.ndim != 2:
        hint = " (a single context variable? use c[:, None])" if c.ndim == 1 else ""
        raise ValueError(f"context must be a 2-D array (n_samples, context_dim), got shape {c.shape}{hint}")
    if c.shape[1] == 0:
        raise ValueError(f"context has shape {c.shape}: no columns; pass (n_samples, context_dim) or drop context=")
    n = source.array.shape[0]
    if c.shape[0] != n:
        raise ValueError(f"context has {c.shape[0]} rows but the data have {n}: pass one context row per data row")
    _refuse_non_finite(c, "context", "drop or impute those rows (and their data rows) first")
    return c


def split_context(batch, data_dim: int):
    """``(x, c)``: a conditional batch's rows and contexts (its first ``data_dim`` columns
    and the rest, as :func:`sample_batch` lays them out).

    :param batch: the batch, ``(batch, data_dim + context_dim)``.
    :param data_dim: the data's dimension.
    """
    return batch[:, :data_dim], batch[:, data_dim:]


def prepare_data(source: DataSource, opts, rng: np.random.Generator, context: np.ndarray | None = None
                 ) -> TrainingData:
    """The validation split and the standardization of a run's data.

    :param source: what :func:`read_data` returned.
    :param opts: the run's :class:`~otflow.FitOptions`.
    :param rng: the run's random generator (a toy data set is sampled from it, then the split drawn).
    :param context: a conditional run's contexts (:func:`validate_context`), or None.
    :returns: the training and validation rows.
    :raises ValueError: too few training rows, constant columns, or values too large for the dtype.
    """
    if source.images is not None:
        return _prepare_images(source.images, opts, rng)
    _refuse_image_options(opts)
    x = source.array
    if source.dataset is not None:
        x = validate_data(datasets.sample(source.dataset, opts.n_train + max(opts.val_points, 1), rng=rng))
    hashed = x if context is None else np.concatenate([x, context], axis=1)
    digest = hashlib.sha256(np.ascontiguousarray(hashed, dtype=np.float64).tobytes()).hexdigest()[:16]
    train, val, perm = _validation_split(x, opts, rng, "sample(s)")
    standardize = opts.standardize
    if standardize == "auto":  # data and contexts are standardized together, or neither
        rows = [train] if context is None else [train, context[perm[len(x) - len(train):]]]
        standardize = not all(on_unit_scale(r) for r in rows)
    shift = scale = None
    if standardize:
        shift, scale = _standardization(train)
        train = (train - shift) / scale
    _check_range(train, opts.dtype)
    data = TrainingData(train=train, val=val, shift=shift, scale=scale, digest=digest)
    return data if context is None else _with_context(data, context, perm, standardize, opts)


#: ``standardize="auto"`` leaves vector data as they are when every column's mean lies within
#: ``UNIT_SCALE_MEAN`` of 0 and its deviation within ``UNIT_SCALE_DEVIATION``: data already on
#: the scale of the flow's standard normal base. Standardizing such data cost likelihood at
#: the default's budget (the 2-D checkerboard, deviation 2.3: KL gap 0.059 against 0.055 nats
#: after the flow-matching stage, 0.061–0.063 against 0.043–0.044 after both stages;
#: ``docs/guide.md``); data far from it (pixel intensities 0–16, physical units) are standardized.
UNIT_SCALE_MEAN = 2.0
UNIT_SCALE_DEVIATION = (0.25, 4.0)


def on_unit_scale(rows: np.ndarray) -> bool:
    """Whether every column of ``rows`` has a mean within :data:`UNIT_SCALE_MEAN` of 0 and a
    deviation within :data:`UNIT_SCALE_DEVIATION` (what ``standardize="auto"`` leaves as is)."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean, dev = rows.mean(axis=0), rows.std(axis=0)
    low, high = UNIT_SCALE_DEVIATION
    return bool(np.all(np.abs(mean) <= UNIT_SCALE_MEAN) and np.all((dev >= low) & (dev <= high)))


def _with_context(data: TrainingData, context: np.ndarray, perm: np.ndarray, standardize: bool, opts
                  ) -> TrainingData:
    """``data`` with its contexts split by the rows' permutation and standardized (with the data)."""
    n_val = 0 if data.val is None else data.val.shape[0]
    val_c, train_c = context[perm[:n_val]], context[perm[n_val:]]
    shift = scale = None
    if standardize:
        try:
            shift, scale = _standardization(train_c)
        except ValueError as e:
            raise ValueError(f"context: {e}".replace("data column", "context column")) from None
        train_c = (train_c - shift) / scale
    _check_range(train_c, opts.dtype)
    return dataclasses.replace(data, context=train_c, val_context=val_c if n_val else None, context_shift=shift,
                               context_scale=scale)


def _validation_split(x: np.ndarray, opts, rng: np.random.Generator, what: str):
    """``(train, val, perm)``: ``val_fraction`` of the rows (at most ``val_points``, None for
    none) drawn from ``rng`` for validation, the rest for training, and the permutation
    (validation rows first).

    :raises ValueError: fewer than 2 training rows left.
    """
    n_val = 0
    if opts.val_fraction > 0:
        n_val = max(1, min(opts.val_points, int(round(opts.val_fraction * x.shape[0]))))
    perm = rng.permutation(x.shape[0])
    val, train = x[perm[:n_val]], x[perm[n_val:]]
    if train.shape[0] < 2:
        raise ValueError(f"only {train.shape[0]} training {what} after the validation split; "
                         "lower val_fraction or supply more data")
    return train, (val if n_val else None), perm


def _prepare_images(images: ImageData, opts, rng: np.random.Generator) -> TrainingData:
    """The validation split of image data (the training part; no standardization)."""
    x = images.train
    digest = hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]
    train, val, _ = _validation_split(x, opts, rng, "image(s)")
    levels = None if val is None else ImageLevels(val, images.n_levels,
                                                  image_eval_estimator(opts, int(np.prod(x.shape[1:]))))
    return TrainingData(train=train, val=levels, shift=None, scale=None, digest=digest, n_levels=images.n_levels)


#: the largest image (values ``C·H·W``) validated with the exact trace when ``eval_estimator`` is None
EXACT_TRACE_MAX_DIM = 256


def image_eval_estimator(opts, dim: int) -> str:
    """The divergence estimator validating images of ``dim`` values: ``opts.eval_estimator``,
    or when None the exact trace up to :data:`EXACT_TRACE_MAX_DIM` values and Hutchinson above."""
    if opts.eval_estimator is not None:
        return opts.eval_estimator
    return "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"


def _refuse_image_options(opts) -> None:
    """Vector data: the image model's options must keep their defaults."""
    from .options import FitOptions

    defaults = FitOptions()
    changed = [name for name in IMAGE_ONLY_OPTIONS if getattr(opts, name) != getattr(defaults, name)]
    if changed:
        raise ValueError(f"{', '.join(changed)} only apply to image data (uint8 images (N, H, W) or (N, C, H, W), "
                         "image files, 'digits'); these data are vectors: drop "
                         f"{'it' if len(changed) == 1 else 'them'}")


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


def sample_batch(data: TrainingData, rng: np.random.Generator, batch_size: int, backend, dtype, device,
                 part: slice | None = None):
    """One training batch: ``batch_size`` rows drawn with replacement, as a backend array.

    :param data: the run's data.
    :param rng: the run's random generator (one draw per batch).
    :param batch_size: the number of rows.
    :param backend: the backend of the batch.
    :param dtype: its dtype (the backend's).
    :param device: its device.
    :param part: the rows of the drawn batch to keep (data-parallel: this process's share of
        the global batch, which every process draws whole); None keeps all.
    :returns: the batch; for a conditional run ``[x, c]``, the contexts of the drawn rows as
        the last columns (:func:`split_context`).
    """
    rows = rng.integers(0, data.n_train, batch_size)
    if part is not None:
        rows = rows[part]
    if data.context is not None:
        return backend.asarray(np.concatenate([data.train[rows], data.context[rows]], axis=1), dtype=dtype,
                               device=device)
    return backend.asarray(data.train[rows], dtype=dtype, device=device)
