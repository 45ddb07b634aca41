"""Helpers shared by the test modules (imported as ``from _helpers import ...``).

pytest puts ``tests/`` on ``sys.path`` (rootdir-relative "prepend" import mode, no
``tests/__init__.py``), so this module is importable from every test file and from
``conftest.py``.
"""
from __future__ import annotations

import functools
import importlib.util

import numpy as np

from otflow.base import tree as _tree

__all__ = ["assert_close", "to_numpy_tree", "framework_installed", "gpu_present"]


def framework_installed(module: str) -> bool:
    """Whether ``module`` can be imported, decided without importing it."""
    return importlib.util.find_spec(module) is not None


@functools.cache
def gpu_present(framework: str) -> bool:
    """Whether ``framework`` ("torch" or "jax") sees a GPU. Imports the framework."""
    if not framework_installed(framework):
        return False
    if framework == "torch":
        import torch

        return bool(torch.cuda.is_available())
    if framework == "jax":
        import jax

        try:
            return len(jax.devices("gpu")) > 0
        except RuntimeError:
            return False
    return False


def _leaf_to_numpy(x, backend) -> np.ndarray:
    if isinstance(x, (np.ndarray, np.generic, bool, int, float)):
        return np.asarray(x)
    if backend is None:
        import otflow

        backend = otflow.infer_backend(x)
    out = backend.to_numpy(x)
    assert isinstance(out, np.ndarray), f"{backend!r}.to_numpy returned {type(out).__name__}, not numpy.ndarray"
    return out


def to_numpy_tree(tree, backend=None):
    """A tree like ``tree`` with every array leaf converted to a host numpy array."""
    return _tree.tree_map(lambda x: _leaf_to_numpy(x, backend), tree)


def assert_close(actual, expected, *, rtol: float, atol: float, backend=None, check_dtype: bool = False,
                 err_msg: str = "") -> None:
    """Compare ``actual`` (a tree of backend arrays) with ``expected`` (a tree of numpy
    arrays or Python numbers) leaf by leaf.

    Leaves of ``actual`` go through ``backend.to_numpy`` (the backend is inferred from the
    leaf when ``backend`` is None). The tree structures (node types, dict keys, namedtuple
    types) and the leaf shapes must match exactly; no broadcasting. With ``check_dtype`` the
    numpy dtype of each actual leaf must equal that of the expected leaf.
    Tolerances are required: there is no default that silently hides an error.
    """
    a_leaves, a_def = _tree.tree_flatten(actual)
    e_leaves, e_def = _tree.tree_flatten(expected)
    assert a_def == e_def, f"{err_msg}\ntree structures differ:\n actual:   {a_def}\n expected: {e_def}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        where = f"{err_msg} (leaf {i} of {len(a_leaves)})" if len(a_leaves) > 1 else err_msg
        a_np = _leaf_to_numpy(a, backend)
        e_np = np.asarray(e)
        assert a_np.shape == e_np.shape, f"{where}: shape {a_np.shape} != expected {e_np.shape}"
        if check_dtype:
            assert a_np.dtype == e_np.dtype, f"{where}: dtype {a_np.dtype} != expected {e_np.dtype}"
        np.testing.assert_allclose(a_np, e_np, rtol=rtol, atol=atol, err_msg=where)


def backend_available(name: str) -> bool:
    """Whether ``otflow.get_backend(name)`` works here (the framework imports)."""
    import otflow

    try:
        otflow.get_backend(name)
        return True
    except Exception:
        return False
