"""otflow.datasets: the 2-D toys and their true densities, digits, the MAF loaders, load_array."""
from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter

import numpy as np
import pytest

from otflow import datasets as D

TOYS = ("8gaussians", "checkerboard", "pinwheel", "2spirals", "swissroll", "circles", "moons", "rings")

#: (std x, std y, mean radius, mean x, mean y) of FFJORD's own lib/toy_data.py generators,
#: measured on 2 000 000 points: the scale every toy must reproduce
FFJORD_MOMENTS = {
    "8gaussians": (2.0316, 2.0310, 2.8511, 0.0002, -0.0010),
    "checkerboard": (2.3097, 2.3100, 3.0615, 0.0021, 0.0028),
    "pinwheel": (1.4844, 1.4834, 2.0122, 0.0006, 0.0002),
    "2spirals": (1.6114, 1.5832, 2.1219, 0.0002, -0.0000),
    "swissroll": (1.3402, 1.4044, 1.8972, 0.4007, 0.0437),
    "circles": (1.6937, 1.6940, 2.2641, -0.0000, 0.0001),
    "moons": (1.7436, 1.0086, 1.8756, -0.0000, 0.3000),
    "rings": (1.4546, 1.4545, 1.8772, 0.0000, -0.0001),
}

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None


# ---------------------------------------------------------------------------------------------
# toys


def test_names_and_info():
    assert D.names() == TOYS
    for name in TOYS:
        i = D.info(name)
        assert i.name == name and i.dim == 2 and i.description
        assert i.density_known == (name in ("checkerboard", "8gaussians"))
        assert (i.entropy is not None) == i.density_known
        assert i.entropy == D.true_entropy(name)
    assert D.true_entropy("checkerboard") == pytest.approx(math.log(32))
    assert D.true_entropy("8gaussians") == pytest.approx(2.8318804061, abs=1e-9)


@pytest.mark.parametrize("name", TOYS)
def test_sample_shapes_and_seeding(name):
    x = D.sample(name, 101, seed=1)
    assert x.shape == (101, 2) and x.dtype == np.float64 and np.all(np.isfinite(x))
    assert D.sample(name, 0).shape == (0, 2)
    np.testing.assert_array_equal(x, D.sample(name, 101, seed=1))
    assert not np.array_equal(x, D.sample(name, 101, seed=2))
    np.testing.assert_array_equal(D.sample(name, 5), D.sample(name, 5, seed=0))  # seed 0 by default
    rng = np.random.default_rng(7)
    a, b = D.sample(name, 50, rng=rng), D.sample(name, 50, rng=rng)  # the generator advances
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, D.sample(name, 50, rng=np.random.default_rng(7)))
    with pytest.raises(TypeError, match="not both"):
        D.sample(name, 5, seed=1, rng=np.random.default_rng(1))


@pytest.mark.parametrize("name", TOYS)
def test_scale_matches_ffjord(name):
    x = D.sample(name, 100_000, seed=11)
    sx, sy, r, mx, my = FFJORD_MOMENTS[name]
    np.testing.assert_allclose(x.std(axis=0), [sx, sy], rtol=0.015)
    assert np.hypot(*x.T).mean() == pytest.approx(r, rel=0.015)
    np.testing.assert_allclose(x.mean(axis=0), [mx, my], atol=0.03)


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(ValueError, match="Did you mean '8gaussians'"):
        D.sample("8gausians", 10)
    with pytest.raises(ValueError, match="Did you mean 'checkerboard'"):
        D.info("checkerbord")
    with pytest.raises(ValueError, match="Did you mean 'moons'"):
        D.true_entropy("moon")
    with pytest.raises(ValueError, match="no closed form"):
        D.true_log_prob("moons", np.zeros((3, 2)))
    assert D.true_entropy("moons") is None
    with pytest.raises(ValueError, match="non-negative"):
        D.sample("moons", -1)
    with pytest.raises(TypeError, match="integer"):
        D.sample("moons", 2.5)
    assert D.sample("moons", np.int64(3)).shape == (3, 2)


def test_checkerboard_support_and_histogram():
    n = 80_000
    x = D.sample("checkerboard", n, seed=3)
    assert np.all((x >= -4) & (x < 4))
    i, j = np.floor(x[:, 0] / 2).astype(int), np.floor(x[:, 1] / 2).astype(int)
    assert np.all((i + j) % 2 == 0)
    # the 8 cells are equally likely, and uniform within: halves of each cell too
    counts = Counter(zip(i, j))
    assert len(counts) == 8
    expected = n / 8
    assert max(abs(c - expected) for c in counts.values()) < 5 * math.sqrt(expected)
    half = Counter(zip(i, j, (x[:, 0] - 2 * i) < 1, (x[:, 1] - 2 * j) < 1))
    assert len(half) == 32 and max(abs(c - n / 32) for c in half.values()) < 5 * math.sqrt(n / 32)
    lp = D.true_log_prob("checkerboard", x)
    np.testing.assert_array_equal(lp, -math.log(32))
    # −log p averages to the entropy (exactly: the density is constant on its support)
    assert -lp.mean() == pytest.approx(D.true_entropy("checkerboard"), abs=1e-12)
    # off the support: the odd cells and outside [−4, 4)²
    off = np.array([[1.0, -1.0], [-3.0, 3.0], [4.0, 0.5], [0.5, 4.0], [-4.5, -3.5]])
    assert np.all(D.true_log_prob("checkerboard", off) == -np.inf)
    assert np.isfinite(D.true_log_prob("checkerboard", np.array([-4.0, -4.0])))


@pytest.mark.parametrize("name", ["checkerboard", "8gaussians"])
def test_true_density_integrates_to_one(name):
    h = 0.02
    g = np.arange(-7, 7, h) + h / 2  # cell midpoints
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1)
    lp = D.true_log_prob(name, grid)
    assert lp.shape == grid.shape[:2]
    assert np.exp(lp).sum() * h * h == pytest.approx(1.0, abs=1e-6)


def test_8gaussians_entropy_by_monte_carlo():
    """The sample mean of −log p over fresh draws matches the quadrature entropy within 3 SE."""
    n = 200_000
    x = D.sample("8gaussians", n, seed=5)
    nlp = -D.true_log_prob("8gaussians", x)
    se = nlp.std(ddof=1) / math.sqrt(n)
    assert abs(nlp.mean() - D.true_entropy("8gaussians")) < 3 * se
    # and the density is the stated mixture: centres (4/1.414)·unit vectors, σ = 0.5/1.414
    sigma = 0.5 / 1.414
    peak = np.array([4 / 1.414, 0.0])
    assert D.true_log_prob("8gaussians", peak) == pytest.approx(
        -math.log(8) - math.log(2 * math.pi * sigma ** 2), abs=1e-6)


def test_true_log_prob_shapes():
    x = np.zeros((3, 4, 2))
    assert D.true_log_prob("8gaussians", x).shape == (3, 4)
    assert D.true_log_prob("checkerboard", [0.5, 0.5]).shape == ()
    with pytest.raises(ValueError, match=r"\(\.\.\., 2\)"):
        D.true_log_prob("8gaussians", np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------
# digits

needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN, reason="scikit-learn not installed: pip install 'otflow[data]'")


def _rows_sorted(a):
    a = a.reshape(a.shape[0], -1)
    return a[np.lexsort(a.T[::-1])]


@needs_sklearn
def test_digits_split():
    s = D.load_digits()
    assert [a.shape for a in s] == [(1437, 64), (180, 64), (180, 64)]
    assert all(a.dtype == np.int64 for a in s)
    every = np.concatenate(list(s))
    assert every.min() == 0 and every.max() == 16 and s.dim == 64
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(_rows_sorted(every), _rows_sorted(load_digits().data.astype(np.int64)))
    again = D.load_digits(seed=0)
    for a, b in zip(s, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(s.train, D.load_digits(seed=1).train)
    imgs, labels = D.load_digits(images=True, return_labels=True)
    assert imgs.train.shape == (1437, 1, 8, 8) and labels.train.shape == (1437,)
    np.testing.assert_array_equal(imgs.train.reshape(1437, 64), s.train)
    assert set(np.unique(labels.test)) <= set(range(10))
    with pytest.raises(ValueError, match="fractions"):
        D.load_digits(fractions=(0.5, 0.2, 0.2))


@needs_sklearn
def test_digits_dequantize_logit_bits():
    x = D.load_digits().train
    y = D.digits_dequantize(x, seed=0)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.all((y >= 0) & (y < 1))
    np.testing.assert_array_equal(np.floor(y * D.DIGITS_LEVELS), x)  # 17 levels, not 256
    np.testing.assert_array_equal(y, D.digits_dequantize(x, rng=np.random.default_rng(0)))
    assert not np.array_equal(y, D.digits_dequantize(x, seed=1))
    with pytest.raises(ValueError, match="0…16"):
        D.digits_dequantize(x + 1)
    s, log_det = D.digits_logit(y)
    assert s.shape == y.shape and log_det.shape == (x.shape[0],)
    # the uniform density on [0, 1)^64 costs log2(17) bits per pixel
    assert D.digits_bits_per_dim(np.zeros(3)) == pytest.approx(np.full(3, math.log2(17)))
    # a density on the logit space, mapped back: log p(y) = log p(s) + log_det
    lp_s = -0.5 * np.sum(s ** 2, axis=1) - 32 * math.log(2 * math.pi)
    np.testing.assert_allclose(D.digits_bits_per_dim(lp_s, log_det=log_det),
                               D.digits_bits_per_dim(lp_s + log_det))
    np.testing.assert_allclose(D.digits_bits_per_dim(lp_s + log_det),
                               -(lp_s + log_det - 64 * math.log(17)) / (64 * math.log(2)))


def test_digits_without_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"otflow\[data\]"):
        D.load_digits()


# ---------------------------------------------------------------------------------------------
# MAF tabular sets: tiny synthetic files in the standard layout


def _standardized(train, val, atol=1e-10):
    both = np.vstack((train, val))
    np.testing.assert_allclose(both.mean(axis=0), 0, atol=atol)
    np.testing.assert_allclose(both.std(axis=0), 1, atol=atol)


def _maf_power_reference(data):
    """gpapamak/maf datasets/power.py, transcribed."""
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((n, 1))))
    n_test = int(0.1 * data.shape[0])
    test, data = data[-n_test:], data[0:-n_test]
    n_val = int(0.1 * data.shape[0])
    val, train = data[-n_val:], data[0:-n_val]
    both = np.vstack((train, val))
    mu, s = both.mean(axis=0), both.std(axis=0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def test_power(tmp_path):
    raw = np.random.default_rng(0).normal(size=(1000, 8)) * 3 + 10
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", raw)
    s = D.load_power(tmp_path, dtype=np.float64)
    assert [a.shape for a in s] == [(810, 6), (90, 6), (100, 6)]
    _standardized(s.train, s.val)
    for got, want in zip(s, _maf_power_reference(raw.copy())):
        np.testing.assert_array_equal(got, want)
    assert D.load_power(tmp_path).train.dtype == np.float32  # MAF hands float32 to its models
    np.testing.assert_array_equal(np.load(tmp_path / "power" / "data.npy"), raw)  # the file is untouched


def _with_repeated_minimum(x, col, times):
    """Set ``times`` entries of column ``col`` to a new smallest value."""
    x[:times, col] = x[:, col].min() - 1.0
    return x


def _maf_drop_repeated(data):
    """MAF's Counter-based rule: drop features whose smallest value occurs more than 5 times."""
    remove = [i for i, f in enumerate(data.T) if [v for k, v in sorted(Counter(f).items())][0] > 5]
    return [i for i in range(data.shape[1]) if i not in remove]


def test_miniboone_drops_features_with_repeated_minimum(tmp_path):
    raw = np.random.default_rng(1).normal(size=(500, 46))
    raw = _with_repeated_minimum(raw, 4, 6)  # dropped
    raw = _with_repeated_minimum(raw, 20, 40)  # dropped
    raw = _with_repeated_minimum(raw, 9, 5)  # kept: exactly 5
    raw = np.random.default_rng(2).permutation(raw)
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", raw)
    s = D.load_miniboone(tmp_path, dtype=np.float64)
    assert [a.shape for a in s] == [(405, 44), (45, 44), (50, 44)]
    _standardized(s.train, s.val)
    keep = _maf_drop_repeated(raw)
    assert 4 not in keep and 20 not in keep and 9 in keep and len(keep) == 44
    data = raw[:, keep]
    train, val, test = data[:405], data[405:450], data[450:]
    both = np.vstack((train, val))
    mu, sd = both.mean(axis=0), both.std(axis=0)
    for got, want in zip(s, (train, val, test)):
        np.testing.assert_allclose(got, (want - mu) / sd, rtol=1e-12, atol=1e-12)


def _write_csv(path, header, rows, trailing=""):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(repr(float(v)) for v in r) + trailing + "\n")


def test_hepmass(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "hepmass").mkdir()
    n_feat = 27
    train = np.column_stack([rng.integers(0, 2, 600), rng.normal(size=(600, n_feat))])
    signal = np.flatnonzero(train[:, 0] == 1)
    # repeated smallest values among the signal rows: features 3 (8×) and 12 (6×) go, 7 (5×) stays
    for col, times in ((3, 8), (12, 6), (7, 5)):
        train[signal[:times], 1 + col] = train[:, 1 + col].min() - 2.0
    train[train[:, 0] == 0, 1 + 3] = -50.0  # background rows do not count
    test = np.column_stack([rng.integers(0, 2, 300), rng.normal(size=(300, n_feat)), np.full(300, 1000.0)])
    names = [f"f{i}" for i in range(n_feat)]
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", ["# label"] + names, train)
    # a trailing delimiter on the data lines is ignored, as pandas.read_csv(index_col=False) does
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", ["# label"] + names + ["mass"], test, trailing=",")

    s = D.load_hepmass(tmp_path, dtype=np.float64)
    n_sig = len(signal)
    n_val = int(0.1 * n_sig)
    n_test = int(np.sum(test[:, 0] == 1))
    assert [a.shape for a in s] == [(n_sig - n_val, 25), (n_val, 25), (n_test, 25)]
    # the reference: MAF's steps (train statistics with ddof=1, then Counter rule)
    tr = train[train[:, 0] == 1][:, 1:]
    te = test[test[:, 0] == 1][:, 1:-1]
    mu, sd = tr.mean(axis=0), tr.std(axis=0, ddof=1)
    tr, te = (tr - mu) / sd, (te - mu) / sd
    keep = _maf_drop_repeated(tr)
    assert 3 not in keep and 12 not in keep and 7 in keep
    np.testing.assert_allclose(s.train, tr[:-n_val, keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.val, tr[-n_val:, keep], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.test, te[:, keep], rtol=1e-12, atol=1e-12)
    full = np.vstack((s.train, s.val))
    np.testing.assert_allclose(full.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(full.std(axis=0, ddof=1), 1, atol=1e-12)


def test_hepmass_layout_mismatch_is_explained(tmp_path):
    (tmp_path / "hepmass").mkdir()
    rows = np.column_stack([np.ones(20), np.random.default_rng(0).normal(size=(20, 4))])
    _write_csv(tmp_path / "hepmass" / "1000_train.csv", ["# label", "a", "b", "c", "d"], rows)
    _write_csv(tmp_path / "hepmass" / "1000_test.csv", ["# label", "a", "b", "c", "d"], rows)
    with pytest.raises(ValueError, match="one column wider"):
        D.load_hepmass(tmp_path)


def test_gas(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(4)
    n = 400
    cols = {"Time": np.arange(n, dtype=float), "Meth": rng.normal(size=n), "Eth": rng.normal(size=n)}
    base = rng.normal(size=(n, 9))
    for i in range(9):
        cols[f"s{i}"] = base[:, i] * (i + 1) + 3
    cols["s1"] = base[:, 0] * 2 + 0.01 * base[:, 1]  # correlation > 0.98 with s0: s0 goes first
    cols["s8"] = -base[:, 5] + 0.02 * base[:, 8]  # |corr| high but negative: not > 0.98, kept
    (tmp_path / "gas").mkdir()
    pd.DataFrame(cols).to_pickle(tmp_path / "gas" / "ethylene_CO.pickle")
    s = D.load_gas(tmp_path, dtype=np.float64)
    assert [a.shape for a in s] == [(324, 8), (36, 8), (40, 8)]
    full = np.vstack(list(s))  # standardized over the whole set with ddof=1
    np.testing.assert_allclose(full.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(full.std(axis=0, ddof=1), 1, atol=1e-12)
    kept = [f"s{i}" for i in range(1, 9)]  # s0 dropped
    want = np.column_stack([cols[c] for c in kept])
    want = (want - want.mean(axis=0)) / want.std(axis=0, ddof=1)
    np.testing.assert_allclose(full, want, rtol=1e-12, atol=1e-12)


def test_bsds300(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(5)
    parts = {"train": rng.normal(size=(50, 63)), "validation": rng.normal(size=(10, 63)),
             "test": rng.normal(size=(20, 63))}
    (tmp_path / "BSDS300").mkdir()
    with h5py.File(tmp_path / "BSDS300" / "BSDS300.hdf5", "w") as f:
        for k, v in parts.items():
            f[k] = v
    s = D.load_maf("BSDS300", tmp_path, dtype=np.float64)
    for got, key in zip(s, ("train", "validation", "test")):
        np.testing.assert_array_equal(got, parts[key])
    assert s.dim == 63


@pytest.mark.parametrize("name", ["power", "gas", "hepmass", "miniboone", "bsds300"])
def test_missing_maf_file_says_where_to_get_it(tmp_path, name):
    needs = {"gas": "pandas", "bsds300": "h5py"}.get(name)
    if needs:
        pytest.importorskip(needs)
    with pytest.raises(FileNotFoundError) as e:
        D.load_maf(name, tmp_path)
    msg = str(e.value)
    assert str(tmp_path / D.MAF_FILES[name][0]) in msg
    assert "1161203" in msg and "downloads nothing" in msg


@pytest.mark.parametrize(("name", "module"), [("gas", "pandas"), ("bsds300", "h5py")])
def test_maf_optional_packages_are_named(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install {module}"):
        D.load_maf(name, tmp_path)


def test_load_maf_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="Did you mean 'hepmass'"):
        D.load_maf("hepmas", tmp_path)
    assert D.MAF_DIMS == {"power": 6, "gas": 8, "hepmass": 21, "miniboone": 43, "bsds300": 63}


# ---------------------------------------------------------------------------------------------
# load_array


def test_load_array_npy_npz(tmp_path):
    a = np.arange(12.0).reshape(6, 2)
    np.save(tmp_path / "a.npy", a)
    np.testing.assert_array_equal(D.load_array(tmp_path / "a.npy"), a)
    np.savez(tmp_path / "one.npz", data=a)
    np.testing.assert_array_equal(D.load_array(tmp_path / "one.npz"), a)
    np.savez(tmp_path / "tt.npz", train=a, test=a[:2])
    np.testing.assert_array_equal(D.load_array(str(tmp_path / "tt.npz")), a)
    np.testing.assert_array_equal(D.load_array(tmp_path / "tt.npz", key="test"), a[:2])
    with pytest.raises(ValueError, match="Did you mean 'test'"):
        D.load_array(tmp_path / "tt.npz", key="tst")
    np.savez(tmp_path / "two.npz", x=a, y=a)
    with pytest.raises(ValueError, match="key="):
        D.load_array(tmp_path / "two.npz")
    np.save(tmp_path / "obj.npy", np.array(["a", "b"]))
    with pytest.raises(ValueError, match="numeric"):
        D.load_array(tmp_path / "obj.npy")
    np.save(tmp_path / "pickled.npy", np.array([{}, 1], dtype=object))
    with pytest.raises(ValueError, match="numeric"):
        D.load_array(tmp_path / "pickled.npy")


def test_load_array_csv(tmp_path):
    (tmp_path / "h.csv").write_text("x,y\n1,2\n3.5, -4e-1\n")
    np.testing.assert_array_equal(D.load_array(tmp_path / "h.csv"), [[1, 2], [3.5, -0.4]])
    (tmp_path / "n.csv").write_text("# a comment\n1,2\n3,4\n")
    np.testing.assert_array_equal(D.load_array(tmp_path / "n.csv"), [[1, 2], [3, 4]])
    (tmp_path / "col.csv").write_text("1\n2\n")
    assert D.load_array(tmp_path / "col.csv").shape == (2, 1)
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n3,abc\n")
    with pytest.raises(ValueError, match="non-numeric"):
        D.load_array(tmp_path / "bad.csv")
    (tmp_path / "empty.csv").write_text("x,y\n")
    with pytest.raises(ValueError, match="no data rows"):
        D.load_array(tmp_path / "empty.csv")


def test_load_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        D.load_array(tmp_path / "missing.npy")
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(ValueError, match=r"\.npy, \.npz, \.csv"):
        D.load_array(tmp_path / "d.parquet")
