"""The reference backend: any array-API namespace (numpy, array-api-strict), no autodiff.

It runs the solvers and fixed velocity fields eagerly and proves the core is
portable: the core never relies on more than the array API plus this file.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from .errors import BackendUnavailable
from .backend import Backend
from .keys import make_key, split_key

__all__ = ["ReferenceBackend"]


class ReferenceBackend(Backend):
    """Eager backend over an array-API namespace; ``name`` is the namespace's name."""

    extra: ClassVar[str | None] = None
    has_autodiff = False

    def __init__(self, name: str = "numpy"):
        if name == "numpy":
            import array_api_compat.numpy as xp
        elif name == "array_api_strict":
            try:
                import array_api_strict as xp
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise BackendUnavailable(
                    "backend 'array_api_strict' needs the array-api-strict package: pip install array-api-strict"
                ) from e
        else:
            raise ValueError(f"unknown reference namespace {name!r}; use 'numpy' or 'array_api_strict'")
        self.name = name
        self._xp = xp

    def namespace(self):
        return self._xp

    def owns(self, x) -> bool:
        if self.name == "numpy":
            return isinstance(x, (np.ndarray, np.generic))
        return type(x).__module__.startswith("array_api_strict")

    def asarray(self, x, *, dtype=None, device=None):
        if self.name == "array_api_strict" and not self.owns(x) and hasattr(x, "__array__"):
            x = np.asarray(x)
        return self._xp.asarray(x, dtype=dtype, device=self.device(device) if device is not None else None)

    def to_numpy(self, x) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x.copy()
        if not hasattr(x, "__dlpack__"):  # Python scalars, numpy scalars
            return np.asarray(x)
        if self.name == "array_api_strict":
            return np.from_dlpack(x).copy()
        return np.asarray(x).copy()

    def device(self, spec=None):
        if spec is None or spec == "cpu":
            if self.name == "numpy":
                return "cpu"
            return self._xp.Device("CPU_DEVICE")
        if self.name != "numpy" and not isinstance(spec, str):
            return spec
        raise BackendUnavailable(
            f"the {self.name!r} backend computes on the CPU only; got device={spec!r}. "
            "Use backend='torch' or backend='jax' for accelerators."
        )

    def device_of(self, x):
        from array_api_compat import device

        return device(x)

    def key(self, seed: int):
        return make_key(seed)

    def split(self, key, num: int = 2):
        return split_key(key, num)

    def _draw(self, key, fn, shape, dtype, device):
        rng = np.random.default_rng(int(key))
        host = fn(rng, shape)
        return self.asarray(host, dtype=dtype, device=device)

    def normal(self, key, shape, *, dtype, device=None):
        return self._draw(key, lambda r, s: r.standard_normal(s), tuple(shape), dtype, device)

    def uniform(self, key, shape, *, dtype, device=None, minval=0.0, maxval=1.0):
        return self._draw(key, lambda r, s: r.uniform(minval, maxval, s), tuple(shape), dtype, device)

    def rademacher(self, key, shape, *, dtype, device=None):
        return self._draw(key, lambda r, s: r.integers(0, 2, s) * 2.0 - 1.0, tuple(shape), dtype, device)
