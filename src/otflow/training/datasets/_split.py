"""The train / validation / test triple every loader returns."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Split"]


@dataclass(frozen=True)
class Split:
    """Three arrays with one row per example; unpacks as ``train, val, test = split``.

    :ivar train: the training rows.
    :ivar val: the validation rows.
    :ivar test: the test rows.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __iter__(self):
        return iter((self.train, self.val, self.test))

    @property
    def dim(self) -> int:
        """The number of features per row (the product of the trailing dimensions)."""
        return int(np.prod(self.train.shape[1:], dtype=np.int64))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={getattr(self, k).shape} {getattr(self, k).dtype}" for k in ("train", "val", "test"))
        return f"Split({shapes})"
