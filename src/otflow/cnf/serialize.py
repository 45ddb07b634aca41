"""Saving and loading flows and checkpoints: safetensors arrays plus a JSON header, no pickle.

One file holds everything: the arrays (parameters, optimizer state, ...) under
dotted names, and in the safetensors metadata a JSON document with the format
version, the fields' configurations, T, the standardization and anything the
caller adds. Files are written atomically (temporary file in the same folder,
fsync, rename), so an interrupted write never leaves a half-written file.
"""
from __future__ import annotations

import glob
import json
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from ..base.errors import OtflowError

__all__ = ["FORMAT_VERSION", "named_arrays", "fill_tree", "write_file", "read_file", "ModelFileError",
           "remove_stale_temporaries"]

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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temporaries(path) -> list[Path]:
    """Delete the hidden temporary files (``.NAME.<pid>.<random>.tmp``) that processes killed in
    the middle of writing ``path`` left behind (SIGKILL allows no cleanup). A temporary file
    whose writer is still running (on this machine) is kept. Returns the removed files."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    prefix = _temporary_prefix(path)
    for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and _process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill would terminate it; keep the file
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def write_file(path, arrays: dict[str, np.ndarray], header: dict) -> Path:
    """Write ``arrays`` and the JSON ``header`` atomically to ``path``.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and only
    then renamed over ``path`` (``os.replace``, atomic on POSIX and Windows): a crash or kill
    at any moment leaves either the old file or the new one, never a mixture. On an
    exception the temporary file is removed; after SIGKILL it may remain as ``.NAME.*.tmp``
    (harmless; the next successful write of ``path`` deletes it).
    """
    from safetensors.numpy import save

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder; give a file name such as model.safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": _MAGIC, "format_version": str(FORMAT_VERSION), "header": json.dumps(header)}
    # np.ascontiguousarray makes 0-d arrays 1-d; keep every array's own shape
    payload = save({k: np.ascontiguousarray(v).reshape(np.shape(v)) for k, v in arrays.items()}, metadata=meta)
    # O_EXCL with a random name, as mkstemp, but with the umask's permissions (mkstemp's 0600
    # would make every saved model private)
    tmp = str(path.parent / f"{_temporary_prefix(path)}{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
    remove_stale_temporaries(path)
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
        raise ModelFileError(f"no model file at {str(path)!r} (expected a .safetensors file written by "
                             "Flow.save, otflow fit --out, or fit(checkpoint=...))")
    if not path.is_file():
        raise ModelFileError(f"{str(path)!r} is not a file; give the path of a saved model or checkpoint")
    data = path.read_bytes()
    if len(data) < 8:
        raise ModelFileError(f"{str(path)!r} is truncated ({len(data)} bytes); it is not a complete otflow file. "
                             "Use an earlier checkpoint or save the model again.")
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) > 8 and data[8:9] != b"{":
            raise ModelFileError(f"{str(path)!r} is corrupted or not an otflow model: it does not start like a "
                                 "safetensors file (otflow writes models with Flow.save / otflow fit --out)")
        if header_len > len(data) - 8:
            raise ModelFileError(f"{str(path)!r} is truncated: its header announces {header_len} bytes, "
                                 f"only {len(data) - 8} follow. Use an earlier checkpoint.")
        raw = json.loads(data[8:8 + header_len])
        if not isinstance(raw, dict):
            raise ValueError("the safetensors header is not a JSON object")
        meta = raw.get("__metadata__") or {}
        ends = [v["data_offsets"][1] for k, v in raw.items() if k != "__metadata__" and isinstance(v, dict)
                and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
        available = len(data) - 8 - header_len
        if ends and max(ends) > available:
            raise ModelFileError(f"{str(path)!r} is truncated: its arrays need {max(ends)} bytes, only {available} "
                                 "are there. Use an earlier checkpoint.")
        arrays = load(data)
    except ModelFileError:
        raise
    except (SafetensorError, ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{str(path)!r} is corrupted or not an otflow file ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != _MAGIC:
        raise ModelFileError(f"{str(path)!r} is a safetensors file but not an otflow model")
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ModelFileError(f"{str(path)!r} has otflow format version {version}; this otflow reads version "
                             f"{FORMAT_VERSION}. Load it with the otflow version that wrote it.")
    try:
        header = json.loads(meta["header"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{str(path)!r} has a damaged header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{str(path)!r} has a damaged header (not a JSON object)")
    return arrays, header
