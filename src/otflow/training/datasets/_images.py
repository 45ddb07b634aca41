"""Image data sets read from files you already have: MNIST-style IDX files, CIFAR-10's
binary version, ``.npy``/``.npz`` arrays of images, and scikit-learn's 8×8 digits.

Every loader returns uint8 pixels of shape ``(N, C, H, W)`` and, where the format has
them, int64 class labels. Nothing is downloaded and nothing is unpickled. The formats:

* **IDX** (LeCun, Cortes & Burges, "The MNIST database of handwritten digits",
  yann.lecun.com/exdb/mnist; Fashion-MNIST, Xiao, Rasul & Vollgraf 2017, ships the same
  files): a big-endian header, the magic number ``0x00000803`` for an image file
  (unsigned bytes, three dimensions) or ``0x00000801`` for a label file (unsigned bytes,
  one dimension), then each dimension as a 32-bit integer; then the values, row-major.
  Plain or gzip-compressed (``.gz``).
* **CIFAR-10, binary version** (Krizhevsky, "Learning Multiple Layers of Features from
  Tiny Images", 2009; www.cs.toronto.edu/~kriz/cifar.html): records of one label byte
  (0–9) and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, each 32×32 row-major),
  10000 records in each of ``data_batch_1.bin`` … ``data_batch_5.bin`` and
  ``test_batch.bin``. The python version of CIFAR-10 is pickled and is refused.
* **numpy arrays**: ``(N, H, W)`` or ``(N, C, H, W)`` pixel levels 0–255; channels-last
  ``(N, H, W, C)`` only with ``layout="NHWC"``.
* **digits**: scikit-learn's 1797 8×8 digits, 17 levels (0–16).
"""
from __future__ import annotations

import gzip
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...base import OtflowError
from ...base.options import unknown_option_message
from ._digits import DIGITS_LEVELS, _sklearn_digits

__all__ = ["ImageData", "ImageFileError", "load_images", "is_image_source", "IDX_IMAGES_MAGIC",
           "IDX_LABELS_MAGIC", "CIFAR10_RECORD_BYTES", "PIXEL_LEVELS"]

#: the magic number an IDX image file starts with: unsigned bytes (0x08), three dimensions
IDX_IMAGES_MAGIC = 0x00000803
#: the magic number an IDX label file starts with: unsigned bytes (0x08), one dimension
IDX_LABELS_MAGIC = 0x00000801
#: bytes of one CIFAR-10 binary record: one label byte and 3 × 32 × 32 pixel bytes
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
#: intensity levels of an 8-bit pixel (0–255)
PIXEL_LEVELS = 256

_SPLITS = ("train", "test")
_LAYOUTS = ("NCHW", "NHWC")
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_KINDS = {IDX_IMAGES_MAGIC: ("image", 3), IDX_LABELS_MAGIC: ("label", 1)}
#: the file-name prefix of each part of an MNIST-style directory
_IDX_PREFIXES = {"train": "train", "test": "t10k"}
_CIFAR10_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}
_CIFAR10_DIR = "cifar-10-batches-bin"
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
_CIFAR10_PICKLE_NAMES = frozenset({*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
                                   "cifar-10-batches-py"})
#: the (images, labels) array names of each part in an .npz: otflow's, then Keras's
_NPZ_KEYS = {"train": (("train", "train_labels"), ("x_train", "y_train")),
             "test": (("test", "test_labels"), ("x_test", "y_test"))}
_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip", ".tar.bz2", ".tar.xz")


class ImageFileError(OtflowError, ValueError):
    """An image file is malformed or of a refused kind; the message names the file, what is
    wrong and what was expected."""


@dataclass(frozen=True)
class ImageData:
    """Images read by :func:`load_images`.

    :ivar train: uint8 pixels ``(N, C, H, W)`` of the training part, or None when only the
        test part was asked for.
    :ivar test: uint8 pixels ``(M, C, H, W)`` of the test part, or None when the source has
        none or it was not asked for.
    :ivar train_labels: int64 class of each training image ``(N,)``, or None when the source
        has no labels.
    :ivar test_labels: int64 class of each test image ``(M,)``, or None.
    :ivar n_levels: intensity levels of a pixel: 256 (values 0–255), or 17 for the digits
        (0–16); dequantization and bits per dimension use this many bins.
    :ivar source: the file or directory read (absolute), or ``"digits"``.
    :ivar format: ``"idx"``, ``"cifar10-bin"``, ``"npy"``, ``"npz"`` or ``"digits"``.
    """

    train: np.ndarray | None
    test: np.ndarray | None
    train_labels: np.ndarray | None
    test_labels: np.ndarray | None
    n_levels: int
    source: str
    format: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``, the shape of one image."""
        images = self.train if self.train is not None else self.test
        return tuple(int(n) for n in images.shape[1:])

    @property
    def dim(self) -> int:
        """Values per image, ``C·H·W`` (the dimension in bits per dimension)."""
        channels, height, width = self.image_shape
        return channels * height * width

    def __repr__(self) -> str:
        return (f"ImageData(train={_shape_of(self.train)}, test={_shape_of(self.test)}, "
                f"labels={self.train_labels is not None or self.test_labels is not None}, "
                f"n_levels={self.n_levels}, format={self.format!r}, source={self.source!r})")


def _shape_of(array: np.ndarray | None) -> tuple[int, ...] | None:
    return None if array is None else array.shape


# ---------------------------------------------------------------------------------------------
# bytes on disk


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, decompressed when its name ends in ``.gz``."""
    raw = path.read_bytes()
    if not path.name.lower().endswith(".gz"):
        return raw
    if raw[:2] != _GZIP_MAGIC:
        raise ImageFileError(
            f"{path}: the name ends in .gz but the file is not gzip-compressed (it starts with "
            f"0x{raw[:4].hex() or 'nothing'}, a gzip file with 0x1f8b); rename it without .gz if it "
            "holds the plain data, or get the file again")
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ImageFileError(f"{path}: corrupt or truncated gzip data ({e}); get the file again") from e


def _first_bytes(path: Path, n: int) -> bytes:
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read(n)
    with open(path, "rb") as f:
        return f.read(n)


# ---------------------------------------------------------------------------------------------
# IDX


def _bad_magic_message(path: Path, found: int, kind: str) -> str:
    message = (f"{path}: not an IDX {kind} file: it starts with the magic number 0x{found:08x}, where an IDX "
               f"image file starts with 0x{IDX_IMAGES_MAGIC:08x} and an IDX label file with "
               f"0x{IDX_LABELS_MAGIC:08x}")
    if found in _IDX_KINDS:
        return message + f" (this is an IDX {_IDX_KINDS[found][0]} file: pass the {kind} file)"
    if found >> 16 == 0x1F8B:
        return message + " (the file is gzip-compressed: give its name the suffix .gz)"
    if found >> 16 == 0:
        return message + (f" (an IDX file of element type 0x{(found >> 8) & 0xFF:02x} with {found & 0xFF} "
                          "dimensions; images and labels are unsigned bytes, type 0x08)")
    return message


def _idx_values(path: Path, magic: int) -> np.ndarray:
    """The values of an IDX file that must start with ``magic``, checked against its header."""
    raw = _read_bytes(path)
    kind, ndim = _IDX_KINDS[magic]
    unpacked = " (uncompressed)" if path.name.lower().endswith(".gz") else ""
    header_bytes = 4 + 4 * ndim
    found = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and found != magic:
        raise ImageFileError(_bad_magic_message(path, found, kind))
    if len(raw) < header_bytes:
        raise ImageFileError(f"{path}: truncated: an IDX {kind} file has a {header_bytes}-byte header, "
                             f"the file has {len(raw)} bytes{unpacked}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header_bytes + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else f"{len(raw) - expected} bytes too long"
        raise ImageFileError(f"{path}: {what}: its header gives the dimensions {dims}, so the file should "
                             f"have {expected} bytes{unpacked}, it has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims).copy()


def _idx_labels_beside(images: Path) -> Path | None:
    """The label file named like the image file ``images`` (``train-images-idx3-ubyte`` →
    ``train-labels-idx1-ubyte``, plain or ``.gz``), when it exists."""
    name = images.name
    for old, new in (("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")):
        if old in name:
            stem = name.replace(old, new).removesuffix(".gz")
            for candidate in (stem, stem + ".gz"):
                if (images.parent / candidate).is_file():
                    return images.parent / candidate
    return None


def _read_idx_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """``(N, 1, H, W)`` images of an IDX image file and the labels of the file beside it."""
    images = _idx_values(path, IDX_IMAGES_MAGIC)[:, None]
    labels_path = _idx_labels_beside(path)
    if labels_path is None:
        return images, None
    labels = _idx_values(labels_path, IDX_LABELS_MAGIC).astype(np.int64)
    if labels.shape[0] != images.shape[0]:
        raise ImageFileError(f"{labels_path}: holds {labels.shape[0]} labels but {path} holds "
                             f"{images.shape[0]} images; the label file must belong to the image file")
    return images, labels


def _idx_file(directory: Path, part: str) -> Path | None:
    prefix = _IDX_PREFIXES[part]
    for name in (f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"):
        for candidate in (name, name + ".gz"):
            if (directory / candidate).is_file():
                return directory / candidate
    return None


def _read_idx_directory(directory: Path, parts: tuple[str, ...], required: tuple[str, ...]) -> dict:
    found = {}
    for part in parts:
        path = _idx_file(directory, part)
        if path is None and part in required:
            prefix = _IDX_PREFIXES[part]
            raise FileNotFoundError(f"{directory}: no {prefix}-images-idx3-ubyte (or .gz) for the {part} part; "
                                    "an MNIST-style directory holds train-images-idx3-ubyte, "
                                    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                                    "t10k-labels-idx1-ubyte, each plain or .gz")
        if path is not None:
            found[part] = _read_idx_images(path)
    return found


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary version


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 3, 32, 32)`` images and labels of one CIFAR-10 binary batch."""
    raw = _read_bytes(path)
    records, rest = divmod(len(raw), CIFAR10_RECORD_BYTES)
    if rest or not records:
        other = (" Its size is a multiple of 3074 bytes, the record of CIFAR-100's binary version, which "
                 "is not read here." if raw and len(raw) % 3074 == 0 else "")
        raise ImageFileError(f"{path}: {len(raw)} bytes is not a positive whole number of CIFAR-10 records "
                             f"(1 label byte + 3072 pixel bytes = {CIFAR10_RECORD_BYTES} bytes each; "
                             f"{len(raw)} = {records}·{CIFAR10_RECORD_BYTES} + {rest}): the file is truncated "
                             f"or not a CIFAR-10 binary batch.{other}")
    table = np.frombuffer(raw, dtype=np.uint8).reshape(records, CIFAR10_RECORD_BYTES)
    labels = table[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise ImageFileError(f"{path}: record {bad[0]} has the label byte {labels[bad[0]]}, not a CIFAR-10 "
                             "class 0–9: the file is not a CIFAR-10 binary batch")
    return table[:, 1:].reshape(records, 3, 32, 32).copy(), labels


def _read_cifar10_directory(directory: Path, parts: tuple[str, ...], required: tuple[str, ...]) -> dict:
    present = [part for part in parts
               if part in required or any((directory / name).is_file() for name in _CIFAR10_FILES[part])]
    missing = [name for part in present for name in _CIFAR10_FILES[part] if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}; CIFAR-10's binary version "
                                f"(cifar-10-binary.tar.gz from {_CIFAR10_URL}) unpacks to {_CIFAR10_DIR}/ "
                                "with data_batch_1.bin … data_batch_5.bin and test_batch.bin")
    found = {}
    for part in present:
        batches = [_read_cifar10_batch(directory / name) for name in _CIFAR10_FILES[part]]
        found[part] = (np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches]))
    return found


def _is_cifar10_python(path: Path) -> bool:
    if path.name.lower() in _CIFAR10_PICKLE_NAMES or path.name.lower().startswith("cifar-10-python"):
        return True
    return path.is_dir() and ((path / "data_batch_1").is_file() or (path / "cifar-10-batches-py").is_dir())


def _refuse_cifar10_python(path: Path) -> ImageFileError:
    return ImageFileError(f"{path}: this is CIFAR-10's python version, which is pickled, and otflow never "
                          "unpickles files (unpickling can run arbitrary code). Get the binary version instead "
                          f"(cifar-10-binary.tar.gz from {_CIFAR10_URL}), unpack it and pass its "
                          f"{_CIFAR10_DIR} directory")


# ---------------------------------------------------------------------------------------------
# numpy arrays


def _uint8_pixels(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind not in "iuf":
        raise ImageFileError(f"{where}: pixels of dtype {array.dtype}; image arrays hold uint8 levels 0–255 "
                             "(or integers 0–255 in another integer or float dtype)")
    flat = array.reshape(-1)
    bad = np.flatnonzero((flat != np.round(flat)) | (flat < 0) | (flat > 255)) if flat.size else flat[:0]
    if bad.size:
        raise ImageFileError(f"{where}: dtype {array.dtype} holds {flat[bad[0]]} (at flat index {bad[0]}), not "
                             "an integer pixel level in [0, 255]; other dtypes are read only when every value is one. "
                             "Store uint8 levels, e.g. np.round(x * 255).astype(np.uint8) for x in [0, 1]")
    return array.astype(np.uint8)


def _nchw(pixels: np.ndarray, where: str, layout: str | None) -> np.ndarray:
    shape = pixels.shape
    if pixels.ndim == 3:
        return pixels[:, None]
    if pixels.ndim != 4:
        hint = " (an (N, D) table of rows is not images: read it with load_array)" if pixels.ndim == 2 else ""
        raise ImageFileError(f"{where}: shape {shape} is not a stack of images: expected (N, H, W) or "
                             f"(N, C, H, W){hint}")
    if layout == "NHWC":
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
    if layout is None and shape[1] not in (1, 3):
        hint = ("it looks channels-last (N, H, W, C): pass layout='NHWC'" if shape[3] in (1, 3) else
                "pass layout='NCHW' to read axis 1 as the channels anyway")
        raise ImageFileError(f"{where}: shape {shape} has {shape[1]} on the channel axis of (N, C, H, W), "
                             f"expected 1 (grey) or 3 (RGB); {hint}")
    return pixels


def _as_images(array: np.ndarray, where: str, layout: str | None) -> np.ndarray:
    images = _nchw(_uint8_pixels(array, where), where, layout)
    if min(images.shape) == 0:
        raise ImageFileError(f"{where}: shape {array.shape} holds no pixels")
    return images


def _as_labels(array: np.ndarray, where: str, n_images: int) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "iu" or (array.size and array.min() < 0):
        raise ImageFileError(f"{where}: labels must be non-negative integers of shape (N,), got "
                             f"{array.dtype} of shape {array.shape}")
    if array.shape[0] != n_images:
        raise ImageFileError(f"{where}: {array.shape[0]} labels for {n_images} images; they must match")
    return array.astype(np.int64)


def _np_load(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ImageFileError(f"{path}: not a readable numpy {path.suffix} file of numbers ({e}); pickles "
                             "and object arrays are refused") from e


def _read_npy(path: Path, layout: str | None) -> tuple[np.ndarray, None]:
    return _as_images(_np_load(path), str(path), layout), None


def _npz_keys(names: list[str], part: str) -> tuple[str, str | None] | None:
    for images, labels in _NPZ_KEYS[part]:
        if images in names:
            return images, labels if labels in names else None
    return None


def _read_npz(path: Path, parts: tuple[str, ...], required: tuple[str, ...], layout: str | None) -> dict:
    with _np_load(path) as arrays:
        names = list(arrays.files)
        keys = {part: _npz_keys(names, part) for part in parts}
        if not any(_npz_keys(names, part) for part in _SPLITS) and len(names) == 1:
            images = _as_images(arrays[names[0]], f"{path}[{names[0]!r}]", layout)
            return {required[0]: (images, None)}
        for part in required:
            if keys[part] is None:
                raise ImageFileError(
                    f"{path}: no {part} images among the arrays {names}; an .npz of images holds 'train' "
                    "(and optionally 'test', 'train_labels', 'test_labels'), Keras's 'x_train', 'y_train', "
                    "'x_test', 'y_test', or a single array")
        return {part: _npz_part(arrays, path, key, layout) for part, key in keys.items() if key is not None}


def _npz_part(arrays, path: Path, keys: tuple[str, str | None], layout: str | None):
    images_key, labels_key = keys
    images = _as_images(arrays[images_key], f"{path}[{images_key!r}]", layout)
    if labels_key is None:
        return images, None
    return images, _as_labels(arrays[labels_key], f"{path}[{labels_key!r}]", images.shape[0])


def _npy_header(fp) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran_order, dtype = read(fp)
    return shape, dtype


def _npz_header(path: Path) -> tuple[tuple[int, ...], np.dtype] | None:
    """Shape and dtype of the array :func:`load_images` would read as the training images."""
    with zipfile.ZipFile(path) as archive:
        names = [n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")]
        keys = _npz_keys(names, "train")
        key = keys[0] if keys else (names[0] if len(names) == 1 else None)
        if key is None:
            return None
        with archive.open(key + ".npy") as member:
            return _npy_header(member)


# ---------------------------------------------------------------------------------------------
# the front door


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        pixels, target = _sklearn_digits()
    except ImportError as e:
        raise ImportError("load_images('digits') needs scikit-learn (it ships the digits; nothing is "
                          "downloaded): pip install scikit-learn, or pip install 'otflow[data]'") from e
    images = np.rint(np.asarray(pixels)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, np.asarray(target).astype(np.int64)


def _check_options(split, layout) -> None:
    if split is not None and split not in _SPLITS:
        raise ValueError("load_images: " + unknown_option_message("split", split, _SPLITS) +
                         " Or None for both parts.")
    if layout is not None and layout not in _LAYOUTS:
        raise ValueError("load_images: " + unknown_option_message("layout", layout, _LAYOUTS) +
                         " Or None for (N, C, H, W) with 1 or 3 channels.")


#: the names of scikit-learn's digits as images (``"digits-images"`` is the one ``otflow fit`` documents)
DIGITS_IMAGE_NAMES = ("digits", "digits-images")


def _is_digits_name(path_or_name) -> bool:
    return (isinstance(path_or_name, str) and path_or_name in DIGITS_IMAGE_NAMES
            and not os.path.exists(path_or_name))


def _existing_path(path_or_name) -> Path:
    path = Path(os.fsdecode(os.fspath(path_or_name))).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}. load_images reads files you have (IDX, "
                                "CIFAR-10 binary, .npy/.npz) or the name 'digits'; nothing is downloaded")
    if (path / _CIFAR10_DIR).is_dir():
        return (path / _CIFAR10_DIR).resolve()
    return path.resolve()


def _refuse_unreadable(path: Path) -> None:
    name = path.name.lower()
    if _is_cifar10_python(path):
        raise _refuse_cifar10_python(path)
    if path.is_file() and name.endswith(_ARCHIVES):
        raise ImageFileError(f"{path}: an archive; unpack it first (e.g. tar xzf {path.name}) and pass the "
                             "directory it makes")
    if path.is_file() and name.endswith((".pkl", ".pickle")):
        raise ImageFileError(f"{path}: a pickle; otflow never unpickles files (unpickling can run arbitrary "
                             "code): save the images with numpy.save as .npy or .npz")


def _has_cifar10_batches(directory: Path) -> bool:
    return any((directory / name).is_file() for names in _CIFAR10_FILES.values() for name in names)


def _has_idx_images(directory: Path) -> bool:
    return _idx_file(directory, "train") is not None or _idx_file(directory, "test") is not None


def _starts_like_idx_images(path: Path) -> bool:
    try:
        return int.from_bytes(_first_bytes(path, 4), "big") == IDX_IMAGES_MAGIC
    except (OSError, EOFError, zlib.error):
        return False


def _directory_format(path: Path) -> str:
    if _has_cifar10_batches(path):
        return "cifar10-bin"
    if _has_idx_images(path):
        return "idx"
    raise FileNotFoundError(f"{path}: no image files recognised: expected MNIST-style IDX files "
                            "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                            "t10k-labels-idx1-ubyte, each plain or .gz) or CIFAR-10's binary batches "
                            "(data_batch_1.bin … data_batch_5.bin, test_batch.bin)")


def _file_format(path: Path) -> str:
    """The format of a file, from its name; IDX also from its magic number."""
    name = path.name.lower()
    for suffix, source_format in ((".npz", "npz"), (".npy", "npy"), (".bin", "cifar10-bin")):
        if name.endswith(suffix):
            return source_format
    stem = name.removesuffix(".gz")
    if "idx" in stem or "." not in stem or _starts_like_idx_images(path):
        return "idx"
    raise ImageFileError(f"{path}: not an image format load_images reads: IDX files "
                         "(…-images-idx3-ubyte, plain or .gz), CIFAR-10 binary batches (.bin), .npy or .npz "
                         "arrays of images, or a directory of them (for a table of rows use load_array)")


def _read_source(path: Path, source_format: str, parts, required, layout) -> dict:
    """``{part: (images, labels)}`` of the parts read; a single file fills the one required part."""
    slot = required[0]
    if path.is_dir():
        if source_format == "cifar10-bin":
            return _read_cifar10_directory(path, parts, required)
        return _read_idx_directory(path, parts, required)
    if source_format == "npz":
        return _read_npz(path, parts, required, layout)
    if source_format == "npy":
        return {slot: _read_npy(path, layout)}
    if source_format == "cifar10-bin":
        return {slot: _read_cifar10_batch(path)}
    return {slot: _read_idx_images(path)}


def _image_data(found: dict, n_levels: int, source: str, source_format: str) -> ImageData:
    shapes = {part: images.shape[1:] for part, (images, _) in found.items()}
    if len(set(shapes.values())) > 1:
        raise ImageFileError(f"{source}: the train images are {shapes['train']} and the test images "
                             f"{shapes['test']}; both parts must have one image shape (C, H, W)")
    empty = (None, None)
    (train, train_labels), (test, test_labels) = found.get("train", empty), found.get("test", empty)
    return ImageData(train=train, test=test, train_labels=train_labels, test_labels=test_labels,
                     n_levels=n_levels, source=source, format=source_format)


def load_images(path_or_name, *, split: str | None = None, layout: str | None = None) -> ImageData:
    """Read image data from files you have, or scikit-learn's digits, as uint8 ``(N, C, H, W)``.

    What ``path_or_name`` may be (the format is recognised from names and magic numbers):

    * a directory with MNIST-style IDX files (MNIST, Fashion-MNIST): ``train-images-idx3-ubyte``,
      ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
      plain or ``.gz``: ``train`` and ``test`` ``(N, 1, 28, 28)``, with labels where the label
      files are present; or one IDX image file (labels from the label file beside it);
    * CIFAR-10's binary version (Krizhevsky 2009): the ``cifar-10-batches-bin`` directory (or
      the directory holding it): ``data_batch_1.bin`` … ``data_batch_5.bin`` as ``train``
      (50000 images), ``test_batch.bin`` as ``test``, ``(N, 3, 32, 32)`` with labels; or one
      ``.bin`` batch. The pickled python version is refused;
    * a ``.npy`` of images ``(N, H, W)`` (read as one channel) or ``(N, C, H, W)`` with 1 or 3
      channels, or an ``.npz`` holding ``train`` (optional ``test``, ``train_labels``,
      ``test_labels``), Keras's ``x_train``/``y_train``/``x_test``/``y_test``, or one array.
      uint8, or another integer or float dtype whose values are all integers in [0, 255];
    * ``"digits"`` (or ``"digits-images"``): scikit-learn's 1797 8×8 digits as ``train`` ``(1797, 1, 8, 8)`` with their
      labels, in file order. Their pixels take **17 levels (0–16)**, so ``n_levels`` is 17 and
      bits per dimension must use 17 bins, not 256 (needs scikit-learn).

    Sources with two parts (a directory, an ``.npz`` with train and test) give both; a single
    file or array is one part, returned as ``train`` (as ``test`` with ``split="test"``).

    :param path_or_name: a file or directory path, or ``"digits"``.
    :param split: None for every part present (the training part is required), ``"train"``
        or ``"test"`` for that part only (the other field is None).
    :param layout: for ``.npy``/``.npz`` only: None reads 4-D arrays as ``(N, C, H, W)`` with
        1 or 3 channels, ``"NCHW"`` accepts any number of channels, ``"NHWC"`` reads
        channels-last ``(N, H, W, C)``. Channels-last is never guessed.
    :returns: an :class:`ImageData`; pixels uint8 ``(N, C, H, W)``, labels int64.
    :raises FileNotFoundError: the path does not exist, or a directory lacks the files its
        format needs (the message lists them).
    :raises ImageFileError: a malformed or refused file: bad IDX magic number, a length that
        disagrees with the header or the CIFAR-10 record size, not gzip despite ``.gz``, wrong
        shape or dtype, label and image counts that differ, a pickle or an archive.
    :raises ValueError: an unknown ``split`` or ``layout``, or ``layout`` for a format that
        has a fixed one.
    :raises ImportError: ``"digits"`` without scikit-learn.
    """
    _check_options(split, layout)
    parts = _SPLITS if split is None else (split,)
    required = ("train",) if split is None else (split,)
    if _is_digits_name(path_or_name):
        if layout is not None:
            raise ValueError("load_images: layout= applies to .npy/.npz arrays; the digits are (N, 1, 8, 8)")
        return _image_data({required[0]: _read_digits()}, DIGITS_LEVELS, "digits", "digits")
    path = _existing_path(path_or_name)
    _refuse_unreadable(path)
    source_format = _directory_format(path) if path.is_dir() else _file_format(path)
    if layout is not None and source_format not in ("npy", "npz"):
        raise ValueError(f"load_images: layout= applies to .npy/.npz arrays; {path} is {source_format}, whose "
                         "layout is fixed: leave layout=None")
    found = _read_source(path, source_format, parts, required, layout)
    return _image_data(found, PIXEL_LEVELS, str(path), source_format)


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(".npy"):
        with open(path, "rb") as f:
            header = _npy_header(f)
    elif name.endswith(".npz"):
        header = _npz_header(path)
    elif name.endswith(".bin"):
        size = path.stat().st_size
        return size > 0 and size % CIFAR10_RECORD_BYTES == 0
    else:
        return _starts_like_idx_images(path)
    return header is not None and header[1] == np.uint8 and len(header[0]) in (3, 4)


def is_image_source(path) -> bool:
    """Whether ``path`` names image data that :func:`load_images` reads (never raises).

    True for the names ``"digits"`` and ``"digits-images"``, an IDX image file (plain or ``.gz``, by its magic
    number), a directory with MNIST-style IDX image files, CIFAR-10's binary batches (a
    ``.bin`` file whose size is a multiple of 3073 bytes, or their directory, or the one
    holding ``cifar-10-batches-bin``), and a ``.npy``/``.npz`` whose (training) array is uint8
    with 3 or 4 dimensions (read from its header, not loaded). Other dtypes, which
    :func:`load_images` reads when every value is a level 0–255, are not recognised here:
    such a file is taken for tabular data. Anything else, including a path that does not
    exist or cannot be read, gives False.

    :param path: a path (``str`` or path-like), or any other object (then False).
    :returns: True when the source is image data.
    """
    if _is_digits_name(path):
        return True
    if not isinstance(path, (str, os.PathLike)):
        return False
    try:
        resolved = Path(os.fsdecode(os.fspath(path))).expanduser()
        if resolved.is_dir():
            return (_has_idx_images(resolved) or _has_cifar10_batches(resolved)
                    or (resolved / _CIFAR10_DIR).is_dir())
        return resolved.is_file() and _is_image_file(resolved)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error):
        return False
