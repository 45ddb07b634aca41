"""Loaders for the MAF tabular benchmarks, with the MAF repository's preprocessing.

Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
Estimation", NeurIPS 2017 (code: github.com/gpapamak/maf, ``datasets/*.py``).
The files are the ones the MAF authors published on Zenodo (record 1161203,
``data.tar.gz``), unpacked under a root directory:

    root/power/data.npy
    root/gas/ethylene_CO.pickle
    root/hepmass/1000_train.csv, root/hepmass/1000_test.csv
    root/miniboone/data.npy
    root/BSDS300/BSDS300.hdf5

Nothing is downloaded at run time. The preprocessing is computed in float64 in the
MAF code's order; the arrays are then cast to ``dtype`` (float32 by default, as MAF
hands them to its models).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ...base.options import unknown_option_message
from ._split import Split

__all__ = ["MAF_DIMS", "MAF_FILES", "MAF_ZENODO_URL", "load_maf", "load_power", "load_gas", "load_hepmass",
           "load_miniboone", "load_bsds300"]

MAF_ZENODO_URL = "https://zenodo.org/record/1161203"
#: the files each loader reads, relative to the root directory
MAF_FILES = {
    "power": ("power/data.npy",),
    "gas": ("gas/ethylene_CO.pickle",),
    "hepmass": ("hepmass/1000_train.csv", "hepmass/1000_test.csv"),
    "miniboone": ("miniboone/data.npy",),
    "bsds300": ("BSDS300/BSDS300.hdf5",),
}
#: the dimension of each set after preprocessing (of the published files)
MAF_DIMS = {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


def _path(root, name: str, index: int = 0) -> Path:
    path = Path(os.fspath(root)).expanduser() / MAF_FILES[name][index]
    if not path.is_file():
        raise FileNotFoundError(
            f"{name.upper()}: expected the file {path} (the MAF data layout under root {root!s}). "
            f"Get the MAF data from Zenodo ({MAF_ZENODO_URL}, data.tar.gz) and unpack it so that "
            f"root/{MAF_FILES[name][index]} exists; otflow downloads nothing at run time."
        )
    return path


def _need(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = {"pandas": "pandas", "h5py": "h5py"}[module]
        raise ImportError(f"{what} needs {package}: pip install {package}, or pip install 'otflow[data]'") from e


def _cast(split: Split, dtype) -> Split:
    return Split(*(np.ascontiguousarray(a, dtype=dtype) for a in split))


def _split_tail(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAF's split: the last 10 % is test, the last 10 % of the rest is validation."""
    n_test = int(0.1 * data.shape[0])
    test = data[-n_test:] if n_test else data[:0]
    data = data[:-n_test] if n_test else data
    n_val = int(0.1 * data.shape[0])
    val = data[-n_val:] if n_val else data[:0]
    train = data[:-n_val] if n_val else data
    return train, val, test


def _standardize_train_val(train, val, test) -> Split:
    """Standardize all three with the mean and (population) std of train and val together."""
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return Split((train - mu) / s, (val - mu) / s, (test - mu) / s)


def _smallest_value_repeats(data: np.ndarray, limit: int = 5) -> np.ndarray:
    """Columns whose smallest value occurs more than ``limit`` times (MAF's "too many re-occurring values")."""
    return np.array([np.count_nonzero(col == col.min()) > limit for col in data.T], dtype=bool)


def load_power(root, *, dtype=np.float32) -> Split:
    """POWER (UCI household electric power consumption), 6-D after preprocessing.

    ``root/power/data.npy`` (N × 8): rows shuffled with ``numpy.random.RandomState(42)``;
    columns 3 and 1 deleted; uniform noise added from the same generator, in MAF's order
    (``0.01·U`` to the voltage column, then ``0.001·U`` to the first column, then ``U`` to
    the three sub-metering columns, none to the time column); the last 10 % is test, the
    last 10 % of the rest validation; all standardized by the mean and std of train+val.

    :param root: the folder holding MAF's data sets (Papamakarios et al. 2017; the files of
        ``MAF_ZENODO_URL``).
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays.
    :raises FileNotFoundError: a missing file.
    :raises ValueError: a file whose contents do not have MAF's layout.
    """
    data = np.load(_path(root, "power")).astype(np.float64)
    if data.ndim != 2 or data.shape[1] != 8:
        raise ValueError(f"POWER: expected an N × 8 array in data.npy, got shape {data.shape}")
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    return _cast(_standardize_train_val(*_split_tail(data)), dtype)


def load_gas(root, *, dtype=np.float32) -> Split:
    """GAS (UCI gas sensor array, ethylene and CO), 8-D after preprocessing (needs pandas).

    ``root/gas/ethylene_CO.pickle``, a pandas DataFrame: the columns ``Meth``, ``Eth`` and
    ``Time`` are dropped; then, while some column has a Pearson correlation above 0.98
    with another, the first such column is dropped (and the correlations recomputed);
    everything is standardized with the mean and sample std (ddof = 1) of the whole set;
    the last 10 % is test, the last 10 % of the rest validation (no shuffling).

    :param root: the folder holding MAF's data sets (Papamakarios et al. 2017; the files of
        ``MAF_ZENODO_URL``).
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays.
    :raises FileNotFoundError: a missing file.
    :raises ValueError: a file whose contents do not have MAF's layout.
    """
    pd = _need("pandas", "GAS (reading root/gas/ethylene_CO.pickle)")
    data = pd.read_pickle(_path(root, "gas"))
    data = data.drop(columns=["Meth", "Eth", "Time"])

    def counts():
        return (data.corr() > 0.98).to_numpy().sum(axis=1)

    b = counts()
    while np.any(b > 1):
        data = data.drop(columns=data.columns[np.where(b > 1)[0][0]])
        b = counts()
    data = (data - data.mean()) / data.std()
    return _cast(Split(*_split_tail(data.to_numpy(dtype=np.float64))), dtype)


def _read_csv(path: Path) -> np.ndarray:
    """A numeric CSV with one header line, read like ``pandas.read_csv(path, index_col=False)``.

    The header names the columns (it starts with "#", so it is read as a header, not a
    comment); fields beyond the header's count on a data line (a trailing delimiter) are
    ignored, as pandas does with ``index_col=False``.
    """
    with open(path, encoding="utf-8") as f:
        n_cols = len(f.readline().split(","))
    return np.loadtxt(path, delimiter=",", skiprows=1, comments=None, dtype=np.float64, ndmin=2,
                      usecols=range(n_cols))


def load_hepmass(root, *, dtype=np.float32) -> Split:
    """HEPMASS (UCI), 21-D after preprocessing.

    ``root/hepmass/1000_train.csv`` and ``1000_test.csv`` (one header line each): only
    signal rows (label, the first column, equal to 1) are kept and the label dropped; the
    test file's last column is dropped too (it has one more column than the training
    file); both are standardized with the training mean and sample std (ddof = 1);
    features whose smallest training value occurs more than 5 times are dropped; the
    last 10 % of the training rows become validation.

    :param root: the folder holding MAF's data sets (Papamakarios et al. 2017; the files of
        ``MAF_ZENODO_URL``).
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays.
    :raises FileNotFoundError: a missing file.
    :raises ValueError: a file whose contents do not have MAF's layout.
    """
    train = _read_csv(_path(root, "hepmass", 0))
    test = _read_csv(_path(root, "hepmass", 1))
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:-1]
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"HEPMASS: after dropping the label column (and the test file's last column), the training file "
            f"has {train.shape[1]} features and the test file {test.shape[1]}; MAF's layout has the test file "
            "one column wider than the training file"
        )
    if train.shape[0] < 2:
        raise ValueError("HEPMASS: fewer than 2 signal rows (label 1) in 1000_train.csv")
    mu, s = train.mean(axis=0), train.std(axis=0, ddof=1)
    if np.any(s == 0):
        raise ValueError(f"HEPMASS: training features {np.flatnonzero(s == 0).tolist()} are constant")
    train, test = (train - mu) / s, (test - mu) / s
    keep = ~_smallest_value_repeats(train)
    train, test = train[:, keep], test[:, keep]
    n_val = int(train.shape[0] * 0.1)
    val = train[-n_val:] if n_val else train[:0]
    train = train[:-n_val] if n_val else train
    return _cast(Split(train, val, test), dtype)


def load_miniboone(root, *, dtype=np.float32) -> Split:
    """MINIBOONE (UCI MiniBooNE particle identification), 43-D after preprocessing.

    ``root/miniboone/data.npy``: features whose smallest value occurs more than 5 times
    are dropped (the published file has had this done already, so it keeps its 43
    columns); the last 10 % is test, the last 10 % of the rest validation; all
    standardized by the mean and std of train+val.

    :param root: the folder holding MAF's data sets (Papamakarios et al. 2017; the files of
        ``MAF_ZENODO_URL``).
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays.
    :raises FileNotFoundError: a missing file.
    :raises ValueError: a file whose contents do not have MAF's layout.
    """
    data = np.load(_path(root, "miniboone")).astype(np.float64)
    if data.ndim != 2:
        raise ValueError(f"MINIBOONE: expected a 2-D array in data.npy, got shape {data.shape}")
    data = data[:, ~_smallest_value_repeats(data)]
    return _cast(_standardize_train_val(*_split_tail(data)), dtype)


def load_bsds300(root, *, dtype=np.float32) -> Split:
    """BSDS300 8×8 natural-image patches, 63-D (needs h5py).

    ``root/BSDS300/BSDS300.hdf5`` holds the datasets ``train``, ``validation`` and
    ``test``, already preprocessed by the MAF authors (the last pixel of each patch
    dropped); they are returned as stored.

    :param root: the folder holding MAF's data sets (Papamakarios et al. 2017; the files of
        ``MAF_ZENODO_URL``).
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays.
    :raises FileNotFoundError: a missing file.
    :raises ValueError: a file whose contents do not have MAF's layout.
    """
    h5py = _need("h5py", "BSDS300 (reading root/BSDS300/BSDS300.hdf5)")
    with h5py.File(_path(root, "bsds300"), "r") as f:
        split = Split(f["train"][:], f["validation"][:], f["test"][:])
    return _cast(split, dtype)


_LOADERS = {"power": load_power, "gas": load_gas, "hepmass": load_hepmass, "miniboone": load_miniboone,
            "bsds300": load_bsds300}


def load_maf(name: str, root, *, dtype=np.float32) -> Split:
    """One of the MAF benchmarks (Papamakarios et al. 2017) by name.

    :param name: ``power``, ``gas``, ``hepmass``, ``miniboone`` or ``bsds300`` (any case).
    :param root: the folder holding the data sets.
    :param dtype: the dtype of the returned arrays.
    :returns: the train, validation and test arrays (see each ``load_*``).
    :raises ValueError: an unknown name (naming the nearest), or a file not in MAF's layout.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _LOADERS:
        raise ValueError(unknown_option_message("MAF dataset", str(name), _LOADERS))
    return _LOADERS[key](root, dtype=dtype)
