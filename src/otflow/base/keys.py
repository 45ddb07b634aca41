"""Integer random keys for backends without a functional RNG (numpy, torch).

A key is a Python ``int`` in [0, 2**63). ``split`` derives children through
numpy's ``SeedSequence`` (hash-based, so children are independent of each
other and of the parent), which makes draws a pure function of the key.
"""
from __future__ import annotations

import numpy as np

_MASK = (1 << 63) - 1


def make_key(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"a random seed must be an int, got {type(seed).__name__}")
    return int(np.random.SeedSequence(int(seed) & ((1 << 128) - 1)).generate_state(2, np.uint32).view(np.uint64)[0]) & _MASK


def split_key(key: int, num: int = 2) -> list[int]:
    if not isinstance(key, (int, np.integer)):
        raise TypeError(f"expected an integer key (from backend.key(seed)), got {type(key).__name__}")
    seq = np.random.SeedSequence(int(key))
    return [int(c.generate_state(2, np.uint32).view(np.uint64)[0]) & _MASK for c in seq.spawn(num)]
