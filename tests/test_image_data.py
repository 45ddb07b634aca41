"""otflow.datasets.load_images / is_image_source: IDX, CIFAR-10 binary, .npy/.npz, digits.

Every test writes its own small files; the real Fashion-MNIST files are read only when
Debian's ``dataset-fashion-mnist`` package is installed.
"""
from __future__ import annotations

import gzip
import importlib.util
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from otflow import OtflowError
from otflow import datasets as D
from otflow.training.datasets import _images

RNG = np.random.default_rng(0)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _idx_bytes(values: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in values.shape)
    return header + values.astype(np.uint8).tobytes()


def _write(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _write_idx_pair(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool):
    gz = ".gz" if compress else ""
    _write(directory / f"{prefix}-images-idx3-ubyte{gz}", _idx_bytes(images, D.IDX_IMAGES_MAGIC), compress)
    _write(directory / f"{prefix}-labels-idx1-ubyte{gz}", _idx_bytes(labels, D.IDX_LABELS_MAGIC), compress)


def _pixels(*shape) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def _cifar_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    records = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    return records.tobytes()


def _error(match_path: Path, *fragments: str):
    """pytest.raises for an ImageFileError whose message names the file and each fragment."""
    pattern = re.escape(str(match_path)) + ".*" + ".*".join(re.escape(f) for f in fragments)
    return pytest.raises(D.ImageFileError, match=re.compile(pattern, re.DOTALL))


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_idx_directory_round_trip(tmp_path, compress):
    train, train_labels = _pixels(5, 28, 28), np.array([0, 9, 3, 3, 7])
    test, test_labels = _pixels(2, 28, 28), np.array([1, 2])
    _write_idx_pair(tmp_path, "train", train, train_labels, compress)
    _write_idx_pair(tmp_path, "t10k", test, test_labels, compress)
    data = D.load_images(tmp_path)
    assert data.train.dtype == np.uint8 and data.train.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(data.train[:, 0], train)
    np.testing.assert_array_equal(data.test[:, 0], test)
    assert data.train_labels.dtype == np.int64
    np.testing.assert_array_equal(data.train_labels, train_labels)
    np.testing.assert_array_equal(data.test_labels, test_labels)
    assert (data.n_levels, data.format, data.source) == (256, "idx", str(tmp_path.resolve()))
    assert data.image_shape == (1, 28, 28) and data.dim == 784
    assert D.is_image_source(tmp_path) and D.is_image_source(str(tmp_path))

    only_test = D.load_images(tmp_path, split="test")
    assert only_test.train is None and only_test.train_labels is None
    np.testing.assert_array_equal(only_test.test[:, 0], test)


def test_idx_single_file_takes_the_labels_beside_it(tmp_path):
    images, labels = _pixels(3, 4, 5), np.array([4, 0, 2])
    _write_idx_pair(tmp_path, "train", images, labels, compress=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = D.load_images(path)
    assert data.train.shape == (3, 1, 4, 5) and data.test is None
    np.testing.assert_array_equal(data.train[:, 0], images)
    np.testing.assert_array_equal(data.train_labels, labels)
    as_test = D.load_images(path, split="test")
    assert as_test.train is None
    np.testing.assert_array_equal(as_test.test[:, 0], images)
    assert D.is_image_source(path)
    assert not D.is_image_source(tmp_path / "train-labels-idx1-ubyte.gz")  # labels are not images

    alone = _write(tmp_path / "mine-idx3-ubyte", _idx_bytes(images, D.IDX_IMAGES_MAGIC))
    no_labels = D.load_images(alone)
    assert no_labels.train_labels is None
    np.testing.assert_array_equal(no_labels.train[:, 0], images)


def test_idx_directory_without_test_part(tmp_path):
    _write_idx_pair(tmp_path, "train", _pixels(2, 3, 3), np.array([1, 2]), compress=False)
    data = D.load_images(tmp_path)
    assert data.train.shape == (2, 1, 3, 3) and data.test is None and data.test_labels is None
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        D.load_images(tmp_path, split="test")


def test_idx_bad_magic(tmp_path):
    labels = _write(tmp_path / "x-labels-idx1-ubyte", _idx_bytes(np.array([1, 2]), D.IDX_LABELS_MAGIC))
    with _error(labels, "not an IDX image file", "0x00000801", "0x00000803", "this is an IDX label file"):
        D.load_images(labels)
    junk = _write(tmp_path / "junk-idx3-ubyte", b"\x00\x00\x0d\x03" + bytes(12))
    with _error(junk, "0x00000d03", "element type 0x0d"):
        D.load_images(junk)
    hidden_gzip = _write(tmp_path / "train-images-idx3-ubyte",
                         _idx_bytes(_pixels(1, 2, 2), D.IDX_IMAGES_MAGIC), compress=True)
    with _error(hidden_gzip, "0x1f8b", "gzip-compressed"):
        D.load_images(hidden_gzip)


def test_idx_length_disagrees_with_header(tmp_path):
    full = _idx_bytes(_pixels(3, 4, 4), D.IDX_IMAGES_MAGIC)
    short = _write(tmp_path / "short-idx3-ubyte", full[:-5])
    with _error(short, "truncated", "(3, 4, 4)", f"{len(full)} bytes", f"it has {len(full) - 5}"):
        D.load_images(short)
    long = _write(tmp_path / "long-idx3-ubyte", full + b"\x00\x00")
    with _error(long, "2 bytes too long"):
        D.load_images(long)
    header_only = _write(tmp_path / "head-idx3-ubyte", full[:9])
    with _error(header_only, "truncated", "16-byte header", "9 bytes"):
        D.load_images(header_only)
    packed = _write(tmp_path / "short-idx3-ubyte.gz", full[:-1], compress=True)
    with _error(packed, "truncated", "(uncompressed)"):
        D.load_images(packed)


def test_idx_label_count_mismatch(tmp_path):
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(_pixels(3, 2, 2), D.IDX_IMAGES_MAGIC))
    labels = _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.array([1, 2]), D.IDX_LABELS_MAGIC))
    with _error(labels, "2 labels", "3 images"):
        D.load_images(tmp_path)


def test_gz_that_is_not_gzip(tmp_path):
    fake = _write(tmp_path / "train-images-idx3-ubyte.gz", _idx_bytes(_pixels(1, 2, 2), D.IDX_IMAGES_MAGIC))
    with _error(fake, "not gzip-compressed", "0x00000803", "1f8b"):
        D.load_images(fake)
    cut = _write(tmp_path / "cut-idx3-ubyte.gz", gzip.compress(_idx_bytes(_pixels(4, 8, 8), 0x803))[:-12])
    with _error(cut, "corrupt or truncated gzip"):
        D.load_images(cut)
    assert not D.is_image_source(fake)  # is_image_source reads the magic number only: `cut` passes it


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary


def _write_cifar_directory(directory: Path, records: int = 2) -> dict:
    directory.mkdir()
    written = {}
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        images, labels = _pixels(records, 3, 32, 32), RNG.integers(0, 10, size=records)
        _write(directory / name, _cifar_bytes(images, labels))
        written[name] = (images, labels)
    return written


def test_cifar10_directory_round_trip(tmp_path):
    written = _write_cifar_directory(tmp_path / "cifar-10-batches-bin")
    train_names = [f"data_batch_{i}.bin" for i in range(1, 6)]
    for source in (tmp_path / "cifar-10-batches-bin", tmp_path):  # the directory or the one above it
        data = D.load_images(source)
        assert data.format == "cifar10-bin" and data.n_levels == 256
        assert data.train.shape == (10, 3, 32, 32) and data.train.dtype == np.uint8
        np.testing.assert_array_equal(data.train, np.concatenate([written[n][0] for n in train_names]))
        np.testing.assert_array_equal(data.train_labels, np.concatenate([written[n][1] for n in train_names]))
        np.testing.assert_array_equal(data.test, written["test_batch.bin"][0])
        np.testing.assert_array_equal(data.test_labels, written["test_batch.bin"][1])
        assert D.is_image_source(source)


def test_cifar10_channel_order(tmp_path):
    """A record is label, 1024 red, 1024 green, 1024 blue bytes, each plane row-major."""
    record = np.concatenate([[7], np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256])
    path = _write(tmp_path / "one.bin", record.astype(np.uint8).tobytes())
    data = D.load_images(path)
    assert data.train_labels.tolist() == [7]
    assert (data.train[0, 0] == 10).all() and (data.train[0, 1] == 20).all()
    np.testing.assert_array_equal(data.train[0, 2].reshape(-1), np.arange(1024) % 256)


def test_cifar10_missing_batch(tmp_path):
    directory = tmp_path / "cifar-10-batches-bin"
    _write_cifar_directory(directory)
    (directory / "data_batch_4.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_4.bin.*cifar-10-binary.tar.gz"):
        D.load_images(directory)
    assert D.load_images(directory, split="test").test.shape == (2, 3, 32, 32)


def test_cifar10_size_not_a_multiple_of_the_record(tmp_path):
    data = _cifar_bytes(_pixels(2, 3, 32, 32), np.array([1, 2]))
    cut = _write(tmp_path / "data_batch_1.bin", data[:-1])
    with _error(cut, f"{len(data) - 1} bytes", "3073 bytes each", f"1·3073 + 3072", "truncated"):
        D.load_images(cut)
    empty = _write(tmp_path / "empty.bin", b"")
    with _error(empty, "0 bytes is not a positive whole number"):
        D.load_images(empty)
    cifar100 = _write(tmp_path / "train.bin", bytes(3 * 3074))
    with _error(cifar100, "CIFAR-100"):
        D.load_images(cifar100)
    assert not D.is_image_source(cut) and not D.is_image_source(empty)


def test_cifar10_label_out_of_range(tmp_path):
    path = _write(tmp_path / "data_batch_1.bin", _cifar_bytes(_pixels(3, 3, 32, 32), np.array([1, 2, 12])))
    with _error(path, "record 2", "label byte 12", "0–9"):
        D.load_images(path)


def test_cifar10_python_version_is_refused_unread(tmp_path):
    directory = tmp_path / "cifar-10-batches-py"
    directory.mkdir()
    canary = tmp_path / "unpickled"

    class Canary:
        def __reduce__(self):
            return (canary.touch, ())

    (directory / "data_batch_1").write_bytes(pickle.dumps(Canary()))
    for source in (directory, tmp_path, directory / "data_batch_1"):
        with _error(source, "python version", "never unpickles", "cifar-10-binary.tar.gz"):
            D.load_images(source)
    assert not canary.exists()
    archive = _write(tmp_path / "cifar-10-python.tar.gz", b"x")
    with _error(archive, "python version"):
        D.load_images(archive)
    binary_archive = _write(tmp_path / "cifar-10-binary.tar.gz", b"x")
    with _error(binary_archive, "an archive", "tar xzf"):
        D.load_images(binary_archive)


# ---------------------------------------------------------------------------------------------
# numpy arrays


def test_npy_shapes_and_layouts(tmp_path):
    grey = _pixels(4, 5, 6)
    np.save(tmp_path / "grey.npy", grey)
    data = D.load_images(tmp_path / "grey.npy")
    assert data.train.shape == (4, 1, 5, 6) and data.format == "npy" and data.train_labels is None
    np.testing.assert_array_equal(data.train[:, 0], grey)

    nchw = _pixels(2, 3, 4, 5)
    np.save(tmp_path / "nchw.npy", nchw)
    np.testing.assert_array_equal(D.load_images(tmp_path / "nchw.npy").train, nchw)

    nhwc = _pixels(2, 4, 5, 3)
    np.save(tmp_path / "nhwc.npy", nhwc)
    with _error(tmp_path / "nhwc.npy", "(2, 4, 5, 3)", "channel axis", "layout='NHWC'"):
        D.load_images(tmp_path / "nhwc.npy")
    converted = D.load_images(tmp_path / "nhwc.npy", layout="NHWC").train
    assert converted.shape == (2, 3, 4, 5) and converted.flags.c_contiguous
    np.testing.assert_array_equal(converted, nhwc.transpose(0, 3, 1, 2))
    assert D.is_image_source(tmp_path / "nhwc.npy")

    four = _pixels(2, 4, 5, 6)
    np.save(tmp_path / "four.npy", four)
    with _error(tmp_path / "four.npy", "layout='NCHW'"):
        D.load_images(tmp_path / "four.npy")
    np.testing.assert_array_equal(D.load_images(tmp_path / "four.npy", layout="NCHW").train, four)


def test_npy_wrong_rank_or_empty(tmp_path):
    np.save(tmp_path / "rows.npy", _pixels(5, 7))
    with _error(tmp_path / "rows.npy", "(5, 7)", "(N, H, W) or (N, C, H, W)", "load_array"):
        D.load_images(tmp_path / "rows.npy")
    assert not D.is_image_source(tmp_path / "rows.npy")
    np.save(tmp_path / "five.npy", _pixels(1, 1, 1, 2, 2))
    with _error(tmp_path / "five.npy", "not a stack of images"):
        D.load_images(tmp_path / "five.npy")
    np.save(tmp_path / "none.npy", _pixels(0, 4, 4))
    with _error(tmp_path / "none.npy", "holds no pixels"):
        D.load_images(tmp_path / "none.npy")


def test_npy_dtypes(tmp_path):
    levels = _pixels(3, 4, 4)
    for dtype in (np.float32, np.int64, np.uint16):
        np.save(tmp_path / "ok.npy", levels.astype(dtype))
        loaded = D.load_images(tmp_path / "ok.npy").train
        assert loaded.dtype == np.uint8
        np.testing.assert_array_equal(loaded[:, 0], levels)
        assert not D.is_image_source(tmp_path / "ok.npy")  # only uint8 is recognised as images
    for dtype, value, where in ((np.float64, 0.5, 5), (np.int16, -1, 7), (np.float32, 256.0, 0),
                                (np.float64, np.nan, 47)):
        bad = levels.astype(dtype)
        bad.reshape(-1)[where] = value
        np.save(tmp_path / "bad.npy", bad)
        with _error(tmp_path / "bad.npy", f"dtype {np.dtype(dtype)} holds {value} (at flat index {where})",
                    "not an integer pixel level in [0, 255]", "np.round(x * 255).astype(np.uint8)"):
            D.load_images(tmp_path / "bad.npy")
    np.save(tmp_path / "bool.npy", np.ones((2, 3, 3), bool))
    with _error(tmp_path / "bool.npy", "dtype bool", "uint8"):
        D.load_images(tmp_path / "bool.npy")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with _error(tmp_path / "obj.npy", "pickles"):
        D.load_images(tmp_path / "obj.npy")


def test_npz_parts_and_labels(tmp_path):
    train, test = _pixels(4, 1, 3, 3), _pixels(2, 1, 3, 3)
    train_labels, test_labels = np.array([0, 1, 2, 3]), np.array([5, 6], dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", train=train, test=test, train_labels=train_labels, test_labels=test_labels)
    data = D.load_images(tmp_path / "mine.npz")
    np.testing.assert_array_equal(data.train, train)
    np.testing.assert_array_equal(data.test, test)
    np.testing.assert_array_equal(data.train_labels, train_labels)
    assert data.test_labels.dtype == np.int64 and data.test_labels.tolist() == [5, 6]
    assert data.format == "npz" and D.is_image_source(tmp_path / "mine.npz")

    keras = tmp_path / "mnist.npz"  # the layout of ~/.keras/datasets/mnist.npz
    np.savez(keras, x_train=train[:, 0], y_train=train_labels, x_test=test[:, 0], y_test=test_labels)
    data = D.load_images(keras, split="test")
    assert data.train is None
    np.testing.assert_array_equal(data.test, test)
    np.testing.assert_array_equal(data.test_labels, test_labels)

    np.savez(tmp_path / "single.npz", images=train)
    np.testing.assert_array_equal(D.load_images(tmp_path / "single.npz").train, train)
    np.testing.assert_array_equal(D.load_images(tmp_path / "single.npz", split="test").test, train)
    assert D.is_image_source(tmp_path / "single.npz")


def test_npz_malformed(tmp_path):
    train = _pixels(4, 3, 3)
    np.savez(tmp_path / "two.npz", a=train, b=train)
    with _error(tmp_path / "two.npz", "no train images among the arrays ['a', 'b']", "'train'", "x_train"):
        D.load_images(tmp_path / "two.npz")
    assert not D.is_image_source(tmp_path / "two.npz")
    np.savez(tmp_path / "trainonly.npz", train=train, other=train)
    with _error(tmp_path / "trainonly.npz", "no test images"):
        D.load_images(tmp_path / "trainonly.npz", split="test")
    np.savez(tmp_path / "count.npz", train=train, train_labels=np.arange(3))
    with _error(tmp_path / "count.npz", "['train_labels']", "3 labels for 4 images"):
        D.load_images(tmp_path / "count.npz")
    np.savez(tmp_path / "float_labels.npz", train=train, train_labels=np.zeros(4))
    with _error(tmp_path / "float_labels.npz", "labels must be non-negative integers", "float64"):
        D.load_images(tmp_path / "float_labels.npz")
    np.savez(tmp_path / "shapes.npz", train=train, test=_pixels(2, 3, 5, 5))
    with _error(tmp_path / "shapes.npz", "(1, 3, 3)", "(3, 5, 5)", "one image shape"):
        D.load_images(tmp_path / "shapes.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with _error(tmp_path / "broken.npz", "not a readable numpy .npz"):
        D.load_images(tmp_path / "broken.npz")
    assert not D.is_image_source(tmp_path / "broken.npz")


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_as_images_have_17_levels(monkeypatch):
    pixels = np.arange(3 * 64).reshape(3, 8, 8).astype(np.float64) % 17  # sklearn's digits are floats 0–16
    monkeypatch.setattr(_images, "_sklearn_digits", lambda: (pixels, np.array([3, 1, 4])))
    data = D.load_images("digits")
    assert (data.n_levels, data.source, data.format) == (17, "digits", "digits")
    assert data.train.dtype == np.uint8 and data.train.shape == (3, 1, 8, 8) and data.test is None
    np.testing.assert_array_equal(data.train[:, 0], pixels)
    assert data.train_labels.tolist() == [3, 1, 4] and data.dim == 64
    assert D.is_image_source("digits") and D.is_image_source("digits-images")
    np.testing.assert_array_equal(D.load_images("digits-images").train, data.train)  # the CLI's name
    with pytest.raises(ValueError, match="layout= applies to .npy/.npz"):
        D.load_images("digits", layout="NHWC")


@pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")
def test_digits_from_scikit_learn():
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    data = D.load_images("digits")
    assert data.train.shape == (1797, 1, 8, 8) and data.n_levels == 17
    np.testing.assert_array_equal(data.train.reshape(1797, 64), bunch.data.astype(np.uint8))
    np.testing.assert_array_equal(data.train_labels, bunch.target)
    assert data.train.max() == 16


# ---------------------------------------------------------------------------------------------
# the front door


def test_options_and_missing_paths(tmp_path):
    np.save(tmp_path / "a.npy", _pixels(2, 3, 3))
    with pytest.raises(ValueError, match="unknown split 'tets'. Did you mean 'test'"):
        D.load_images(tmp_path / "a.npy", split="tets")
    with pytest.raises(ValueError, match="unknown layout 'nhwc'"):
        D.load_images(tmp_path / "a.npy", layout="nhwc")
    _write_idx_pair(tmp_path, "train", _pixels(1, 2, 2), np.array([1]), compress=False)
    with pytest.raises(ValueError, match="layout= applies to .npy/.npz.*is idx"):
        D.load_images(tmp_path, layout="NHWC")
    with pytest.raises(FileNotFoundError, match="no such file or directory.*nothing is downloaded"):
        D.load_images(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no image files recognised"):
        D.load_images(empty)
    (tmp_path / "table.csv").write_text("1,2\n")
    with _error(tmp_path / "table.csv", "not an image format", "load_array"):
        D.load_images(tmp_path / "table.csv")
    (tmp_path / "data.pkl").write_bytes(pickle.dumps([1]))
    with _error(tmp_path / "data.pkl", "never unpickles"):
        D.load_images(tmp_path / "data.pkl")


def test_is_image_source_says_no_without_raising(tmp_path):
    (tmp_path / "table.csv").write_text("1,2\n")
    (tmp_path / "garbage.npy").write_bytes(b"not numpy")
    for source in (tmp_path / "nowhere", tmp_path / "table.csv", tmp_path / "garbage.npy", tmp_path,
                   "8gaussians", np.zeros((2, 1, 2, 2), np.uint8), None, 3):
        assert D.is_image_source(source) is False


def test_image_file_error_is_an_otflow_value_error():
    assert issubclass(D.ImageFileError, OtflowError) and issubclass(D.ImageFileError, ValueError)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian():
    data = D.load_images(FASHION_MNIST)
    assert data.train.shape == (60000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10
    assert np.bincount(data.test_labels).tolist() == [1000] * 10
