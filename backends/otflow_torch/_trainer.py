"""The torch training step: autograd backward and a ``torch.optim`` optimizer.

Parameters are leaf tensors updated in place by the optimizer (a user module's
own ``nn.Parameter`` objects stay its parameters, so its hooks — and later
DistributedDataParallel's — see every gradient). One host read per step: the
finiteness check that decides whether the update is applied.
"""
from __future__ import annotations

import numpy as np
import torch

from otflow.training import OptimizerSpec

__all__ = ["TorchTrainer"]


class TorchTrainer:
    """``step(x, key, lr) -> metrics``; a non-finite loss or gradient, or a failed solve,
    leaves parameters and optimizer state untouched (``metrics["applied"]`` is False)."""

    def __init__(self, backend, loss_fn, params, spec: OptimizerSpec):
        self.backend = backend
        self.loss_fn = loss_fn
        self.spec = spec

        def as_leaf(p):
            if p.is_leaf and p.requires_grad:
                return p
            return p.detach().clone().requires_grad_(True)

        self.params = backend.tree_map(as_leaf, params)
        self._leaves = backend.tree_leaves(self.params)
        cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
        self.optimizer = cls(self._leaves, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                             weight_decay=spec.weight_decay)

    def step(self, x, key, lr: float) -> dict:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, aux = self.loss_fn(self.params, x, key)
        loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._leaves]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm) & (aux["status"] == 0)
        applied = bool(ok)  # the step's one host read
        if applied:
            if self.spec.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self._leaves, self.spec.clip_norm)
            self.optimizer.step()
        return {"loss": loss.detach(), "grad_norm": grad_norm.detach(), "applied": applied,
                **{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in aux.items()}}

    # ---- state for checkpoints (numpy arrays, named) -------------------------------------
    def optimizer_state(self) -> dict[str, np.ndarray]:
        out = {}
        for idx, state in self.optimizer.state_dict()["state"].items():
            for name, value in state.items():
                out[f"{idx}.{name}"] = np.asarray(value.detach().cpu().numpy() if torch.is_tensor(value) else value)
        return out

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        sd = self.optimizer.state_dict()
        state: dict = {}
        for key, value in arrays.items():
            idx, name = key.split(".", 1)
            leaf = self._leaves[int(idx)]
            device = leaf.device if name != "step" else "cpu"
            dtype = leaf.dtype if name != "step" else torch.float32
            state.setdefault(int(idx), {})[name] = torch.as_tensor(value, dtype=dtype, device=device)
        sd["state"] = state
        self.optimizer.load_state_dict(sd)

    def set_params(self, params) -> None:
        with torch.no_grad():
            for leaf, value in zip(self._leaves, self.backend.tree_leaves(params)):
                leaf.copy_(torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value,
                                           dtype=leaf.dtype, device=leaf.device))
