"""The PyTorch backend of otflow: ``TorchBackend`` (registry name ``"torch"``).

Where torch differs from JAX, and what this backend does about it:

* **Eager loops.** Python loops are recorded by autograd's tape, so every loop kind
  (``"forward"``, ``"bounded"``, ``"checkpointed"``) can be reverse-differentiated; the
  inherited Python ``while_loop`` / ``fori_loop`` / ``scan`` are used as they are.
  ``jit`` returns the function unchanged.
* **Integer keys.** torch has no functional RNG, so a key is a Python ``int``
  (``otflow.base.keys``); every draw seeds a fresh ``torch.Generator`` on the
  target device, which makes a draw a pure function of (key, shape, dtype, device).
* **custom_vjp via autograd.Function.** Argument trees are flattened so that every
  tensor leaf is a direct input of one ``torch.autograd.Function``; parameter gradients
  therefore flow through autograd's engine and its hooks (DDP, ``.grad`` accumulation).
* **vjp** uses ``torch.autograd.grad(..., create_graph=True)`` by default
  (``vjp_impl="autograd"``): it composes with an enclosing ``loss.backward()``, may be
  called several times, and saves torch.func's fixed cost of about 75 µs per call (5–15 %
  of a 2-D CNF training step on CPU); under ``vmap`` or other ``torch.func`` transforms it
  falls back to ``torch.func.vjp``. ``TorchBackend(vjp_impl="func")`` always uses
  ``torch.func.vjp``.
"""
try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"otflow's torch backend needs PyTorch, which failed to import ({e}). "
        "Install it with: pip install 'otflow[torch]'"
    ) from e

from . import _native  # noqa: F401 - registers torch's fused sigmoid and SiLU with the core
from ._backend import TorchBackend

__all__ = ["TorchBackend"]
