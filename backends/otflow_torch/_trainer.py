"""The torch training step: autograd backward and a ``torch.optim`` optimizer.

Registered in the ``otflow.trainers`` entry-point group; made by
:func:`otflow.training.make_trainer`. Parameters are leaf tensors updated in place by
the optimizer (a user module's own ``nn.Parameter`` objects stay its parameters, so its
hooks see every gradient). One host read per step: the finiteness check that decides
whether the update is applied. Under ``torchrun`` (a process group of several ranks) the
gradients, metrics and failure flags are averaged over the ranks in one all-reduce after
``backward`` (:mod:`otflow_torch._distributed`), so every rank applies, or skips, the same
update.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from otflow.training import OptimizerSpec

from ._distributed import process_group_replicas

__all__ = ["TorchTrainer"]


class TorchTrainer:
    """An :class:`otflow.training.Trainer` on torch: ``step(x, key, lr) -> metrics``.

    A non-finite loss or gradient, or a failed solve, leaves parameters and optimizer
    state untouched (``metrics["applied"]`` is False).

    :param backend: the torch backend.
    :param loss_fn: ``loss_fn(params, x, key) -> (loss, aux)``.
    :param params: the initial parameter tree (tensors; leaves requiring grad are used as they are).
    :param optimizer: the optimizer settings (Adam is ``torch.optim.Adam``, AdamW ``torch.optim.AdamW``).
    :param data_parallel: the run's :class:`~otflow_torch._distributed.ProcessGroupReplicas`
        (gradients and metrics averaged over the ranks), or None for one process.
    """

    #: finds the run's process group (see :func:`otflow.training.distributed.resolve_replicas`)
    data_parallel = staticmethod(process_group_replicas)

    def __init__(self, backend, loss_fn, params, optimizer: OptimizerSpec, *, data_parallel=None):
        self.backend = backend
        self.replicas = data_parallel if getattr(data_parallel, "reduce_step", None) is not None else None
        self.loss_fn = loss_fn
        self.spec = optimizer
        self.params = backend.tree_map(_as_leaf, params)
        self._leaves = backend.tree_leaves(self.params)
        cls = torch.optim.Adam if optimizer.name == "adam" else torch.optim.AdamW
        # foreach: one dispatch per operation for all parameters (torch's default on the CPU is a
        # Python loop over them); the same arithmetic in the same order, so the same numbers.
        # 2-D RNODE model (20 parameter tensors), Adam step 0.56 -> 0.40 ms on one CPU thread
        self.optimizer = cls(self._leaves, lr=optimizer.lr, betas=optimizer.betas, eps=optimizer.eps,
                             weight_decay=optimizer.weight_decay, foreach=True)

    def step(self, x, key, lr: float) -> dict:
        """One step (see :meth:`otflow.training.Trainer.step`)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, aux = self.loss_fn(self.params, x, key)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._leaves]
        if self.replicas is not None:  # the mean over the ranks, written into the .grad tensors
            for p, g in zip(self._leaves, grads):
                p.grad = g
            loss, aux = self.replicas.reduce_step(grads, loss, aux)
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm) & (aux["status"] == 0)
        applied = bool(ok)  # the step's one host read
        if applied:
            if self.spec.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._leaves, self.spec.clip_norm)
            self.optimizer.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "applied": applied,
                **{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in aux.items()}}

    # ---- state for checkpoints (numpy arrays, named "<leaf index>.<state name>") ----------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's per-parameter state (step, moments) as named numpy arrays."""
        out = {}
        for idx, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                out[f"{idx}.{name}"] = np.asarray(value.detach().cpu().numpy() if torch.is_tensor(value) else value)
        return out

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Install a state from :meth:`optimizer_state`, each array in the shape the optimizer
        keeps it in (``step`` 0-d on the CPU, the moments shaped like their parameter).

        :raises ValueError: an array whose size does not fit its parameter, or an unknown leaf.
        """
        sd = self.optimizer.state_dict()
        state: dict = {}
        for key, value in arrays.items():
            idx, name = key.split(".", 1)
            if not idx.isdigit() or int(idx) >= len(self._leaves):
                raise ValueError(f"optimizer array {key!r} names no parameter (the model has {len(self._leaves)})")
            leaf = self._leaves[int(idx)]
            if name == "step":
                shape, dtype, device = (), torch.float32, "cpu"
            else:
                shape, dtype, device = tuple(leaf.shape), leaf.dtype, leaf.device
            state.setdefault(int(idx), {})[name] = _restored(key, value, shape, dtype, device)
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    def set_params(self, params) -> None:
        """Copy parameter values (tensors or numpy arrays) into the parameters, in place."""
        with torch.no_grad():
            for leaf, value in zip(self._leaves, self.backend.tree_leaves(params)):
                leaf.copy_(torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value,
                                           dtype=leaf.dtype, device=leaf.device))


def _as_leaf(p):
    if p.is_leaf and p.requires_grad:
        return p
    return p.detach().clone().requires_grad_(True)


def _restored(key: str, value, shape: tuple, dtype, device) -> torch.Tensor:
    value = np.asarray(value)
    if value.size != math.prod(shape):
        raise ValueError(f"optimizer array {key!r} has shape {value.shape}, this optimizer keeps {shape}")
    return torch.as_tensor(value.reshape(shape), dtype=dtype, device=device)
