"""Saving and loading flows and checkpoints: safetensors arrays plus a JSON header, no pickle.

One file holds everything: the arrays (parameters, optimizer state, ...) under
dotted names, and in the safetensors metadata a JSON document with the format
version, the fields' configurations, T, the standardization and anything the
caller adds. Files are written atomically (temporary file in the same folder,
fsync, rename), so an interrupted write never leaves a half-written file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ._errors import OtflowError

__all__ = ["FORMAT_VERSION", "named_arrays", "fill_tree", "write_file", "read_file", "ModelFileError"]

#: the file format written by this version; files from other versions are refused
FORMAT_VERSION = 1
_MAGIC = "otflow"


class ModelFileError(OtflowError, ValueError):
    """A model or checkpoint file is missing, truncated, corrupted or of another format version."""


def named_arrays(tree, prefix: str) -> dict[str, Any]:
    """Leaves of a tree of tuples/lists/dicts under dotted names (``prefix.0.weight``)."""
    out: dict[str, Any] = {}

    def rec(node, name):
        if node is None:
            return
        if isinstance(node, (tuple, list)):
            for i, child in enumerate(node):
                rec(child, f"{name}.{i}")
        elif isinstance(node, dict):
            for k in sorted(node):
                rec(node[k], f"{name}.{k}")
        else:
            out[name] = node

    rec(tree, prefix)
    return out


def fill_tree(template, arrays: dict[str, np.ndarray], prefix: str, convert):
    """A tree shaped like ``template`` whose leaves are ``convert(arrays[name])``."""

    def rec(node, name):
        if node is None:
            return None
        if isinstance(node, tuple):
            return tuple(rec(c, f"{name}.{i}") for i, c in enumerate(node))
        if isinstance(node, list):
            return [rec(c, f"{name}.{i}") for i, c in enumerate(node)]
        if isinstance(node, dict):
            return {k: rec(node[k], f"{name}.{k}") for k in node}
        if name not in arrays:
            raise ModelFileError(f"the file lacks the array {name!r}; it was written for another model")
        value = arrays[name]
        if tuple(value.shape) != tuple(node.shape):
            raise ModelFileError(f"array {name!r} has shape {value.shape}, the model expects {tuple(node.shape)}")
        return convert(value)

    return rec(template, prefix)


def write_file(path, arrays: dict[str, np.ndarray], header: dict) -> Path:
    """Write ``arrays`` and the JSON ``header`` atomically to ``path``."""
    from safetensors.numpy import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _MAGIC, "format_version": str(FORMAT_VERSION), "header": json.dumps(header)}
    payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=meta)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename durable too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def read_file(path) -> tuple[dict[str, np.ndarray], dict]:
    """``(arrays, header)`` from a file written by :func:`write_file`, or a clear error."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"no model file at {str(path)!r}")
    data = path.read_bytes()
    if len(data) < 8:
        raise ModelFileError(f"{str(path)!r} is truncated ({len(data)} bytes); it is not a complete otflow file")
    try:
        header_len = int.from_bytes(data[:8], "little")
        if header_len > len(data) - 8:
            raise ModelFileError(f"{str(path)!r} is truncated: its header announces {header_len} bytes, "
                                 f"only {len(data) - 8} follow. Use an earlier checkpoint.")
        raw = json.loads(data[8:8 + header_len])
        meta = raw.get("__metadata__", {})
        arrays = load(data)
    except ModelFileError:
        raise
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{str(path)!r} is corrupted or not an otflow file ({e})") from None
    if meta.get("format") != _MAGIC:
        raise ModelFileError(f"{str(path)!r} is a safetensors file but not an otflow model")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(f"{str(path)!r} has otflow format version {version}; this otflow reads version "
                             f"{FORMAT_VERSION}. Load it with the otflow version that wrote it.")
    try:
        header = json.loads(meta["header"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{str(path)!r} has a damaged header ({e})") from None
    return arrays, header
