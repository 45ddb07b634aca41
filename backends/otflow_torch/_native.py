"""torch's fused elementwise functions for the core's fields (:mod:`otflow.base.native`):
``torch.sigmoid`` and ``torch.nn.functional.silu`` run as one kernel each, forward and
backward, where the array-API forms run four to five."""
from __future__ import annotations

import torch
from array_api_compat import array_namespace

from otflow.base import register_native

#: the array namespace torch tensors belong to
NAMESPACE = array_namespace(torch.zeros(())).__name__

register_native(NAMESPACE, "sigmoid", torch.sigmoid)
register_native(NAMESPACE, "silu", torch.nn.functional.silu)
