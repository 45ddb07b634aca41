"""Reading a user's own data set from a file."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ...base.options import unknown_option_message

__all__ = ["load_array"]

_FORMATS = (".npy", ".npz", ".csv")


def _numeric(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{where}: expected a numeric array, got dtype {a.dtype}")
    return a


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _load_csv(path: Path) -> np.ndarray:
    first, index = None, 0
    with open(path, encoding="utf-8") as f:
        for index, line in enumerate(f):
            if line.strip() and not line.lstrip().startswith("#"):
                first = line
                break
    if first is None:
        raise ValueError(f"{path}: no data rows in the CSV file")
    header = not all(_is_number(field) for field in first.strip().split(","))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "loadtxt: input contained no data", UserWarning)
            data = np.loadtxt(path, delimiter=",", comments="#", dtype=np.float64, ndmin=2,
                              skiprows=index + 1 if header else 0)
    except ValueError as e:
        raise ValueError(f"{path}: non-numeric or ragged CSV content ({e})") from e
    if data.size == 0:
        raise ValueError(f"{path}: no data rows in the CSV file")
    return data


def load_array(path, *, key: str | None = None) -> np.ndarray:
    """A numeric array from a ``.npy``, ``.npz`` or ``.csv`` file.

    ``.npy``: the stored array (no pickles). ``.npz``: the array named ``key``, else the one
    named ``train``, else the only array in the file. ``.csv``: comma-separated numbers,
    one row per line, read as float64 of shape ``(rows, columns)``; a first line that is
    not all numbers is taken as a header and skipped, and lines starting with ``#`` are
    comments.

    :param path: the file (``~`` is expanded).
    :param key: the array to read from a ``.npz`` file.
    :returns: the array.
    :raises FileNotFoundError: no such file.
    :raises ValueError: an unknown extension, non-numeric content, or an ambiguous ``.npz``.
    """
    path = Path(os.fspath(path)).expanduser()
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported format {path.suffix or '(no extension)'!r}; "
                         f"use one of {', '.join(_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if key is not None and suffix != ".npz":
        raise ValueError(f"key= only applies to .npz files, not {suffix}")
    if suffix == ".csv":
        return _load_csv(path)
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:  # object arrays need pickles
        raise ValueError(f"{path}: not a numeric array file ({e})") from e
    if suffix == ".npy":
        return _numeric(loaded, str(path))
    with loaded as f:
        names = list(f.files)
        if key is not None:
            if key not in names:
                raise ValueError(f"{path}: " + unknown_option_message("array", key, names))
            chosen = key
        elif "train" in names:
            chosen = "train"
        elif len(names) == 1:
            chosen = names[0]
        else:
            raise ValueError(f"{path}: holds {names} and none is named 'train'; pass key= to choose one")
        try:
            return _numeric(f[chosen], f"{path}[{chosen!r}]")
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(f"{path}[{chosen!r}]: not a numeric array ({e})") from e
            raise
