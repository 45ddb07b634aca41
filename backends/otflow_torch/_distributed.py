"""Data-parallel torch training on a ``torch.distributed`` process group (``torchrun``).

:func:`process_group_replicas` finds the process group — one the user initialized, or
the one ``torchrun``'s environment describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``...), initialized here with NCCL for CUDA and gloo for CPU tensors — and
returns :class:`ProcessGroupReplicas`. The trainer's parameters are a tree of tensors,
not an ``nn.Module``, so instead of wrapping a module in ``DistributedDataParallel`` the
trainer reduces the gradients itself after ``backward`` (direct backpropagation and the
adjoint alike: both leave plain ``.grad`` tensors): every gradient, the step's metrics,
the failure flags and the stop vote go into ONE flat buffer and ONE
``torch.distributed.all_reduce`` per step, DDP's bucketed all-reduce with a single
bucket. Nothing communicates inside the ODE solve, so ranks whose adaptive solvers take
different numbers of steps never wait on each other mid-solve.
"""
from __future__ import annotations

import atexit
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from otflow.base import Status
from otflow.training.distributed import Replicas

__all__ = ["ProcessGroupReplicas", "process_group_replicas"]

#: solve statuses, in the order of their counters in the reduced buffer
_STATUSES = tuple(int(s) for s in Status)


def process_group_replicas(backend, devices, device) -> "ProcessGroupReplicas | None":
    """The process group this run belongs to, initializing torchrun's if needed; None for
    a single process.

    :param backend: the torch backend.
    :param devices: the ``devices`` option (torch runs one process per device: must be None).
    :param device: ``fit``'s ``device=``.
    :raises ValueError: ``devices=`` given (launch with ``torchrun`` instead).
    """
    if devices is not None:
        raise ValueError(f"devices={devices!r}: torch trains on several devices with one process per device; "
                         "launch with torchrun --nproc_per_node N -m otflow fit ... (or your script under "
                         "torchrun) and drop devices=")
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
            return None
        cuda = backend.device(_local_device(device)).type == "cuda"
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(_destroy_process_group)  # the group otflow made: gloo aborts an exit that leaves it
    if dist.get_world_size() == 1:
        return None
    return ProcessGroupReplicas()


#: how long the exit-time barrier waits for the other ranks before tearing down anyway
EXIT_BARRIER_SECONDS = 60.0


def _destroy_process_group() -> None:
    """Tear down the default process group at exit if it is still up (gloo's threads
    otherwise end the process with ``terminate called without an active exception``).

    The ranks first meet at a barrier (bounded by :data:`EXIT_BARRIER_SECONDS`), so that no
    rank tears its gloo connections down while a peer may still use them: the two-rank
    test run has, rarely, ended with rank 1 aborting at exit (SIGABRT, the message above).
    A 60-launch probe of a bare two-rank exit did not reproduce it, so the barrier is the
    usual precaution, not a measured cure. A peer that is gone already (it crashed) fails
    the barrier at once or times it out; the group is then torn down all the same."""
    if not dist.is_initialized():
        return
    try:
        dist.barrier(async_op=True).wait(timeout=timedelta(seconds=EXIT_BARRIER_SECONDS))
    except Exception:  # noqa: BLE001 - a peer that died already: nothing to wait for
        pass
    dist.destroy_process_group()


def _local_device(spec):
    """``device=`` with this process's GPU when it names CUDA without an index."""
    if isinstance(spec, str) and spec.strip().lower() in ("cuda", "gpu"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return spec


class ProcessGroupReplicas(Replicas):
    """The ranks of the default ``torch.distributed`` process group, one process per device.

    :ivar reduce_seconds: wall time of the last step's all-reduce (host clock; on CUDA it
        includes waiting for the gradients to be computed).
    """

    loss_sees_part = True

    def __init__(self):
        super().__init__()
        self.rank = dist.get_rank()
        self.processes = self.shards = dist.get_world_size()
        self.group_backend = dist.get_backend()
        self.reduce_seconds = 0.0

    def device(self, backend, spec):
        dev = backend.device(_local_device(spec))
        if self.group_backend == "nccl" and dev.type != "cuda":
            raise ValueError(f"the process group uses NCCL, which reduces CUDA tensors only, but this run trains on "
                             f"{dev}; pass device='cuda' (each rank takes cuda:LOCAL_RANK) or init the group with "
                             "gloo")
        return dev

    def agree_any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self._comm_device())
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def stop_requested(self, local: bool) -> bool:
        """The vote is carried by the next step's all-reduce; the answer is the last step's
        (so every rank stops after the same iteration, at most one after the request)."""
        self.stop_vote = bool(local)
        return self.stop_agreed

    def same_everywhere(self, digest: str, what: str) -> None:
        seen = [None] * self.processes
        dist.all_gather_object(seen, digest)
        if len(set(seen)) > 1:
            ranks = [r for r, d in enumerate(seen) if d != seen[0]]
            raise ValueError(f"the ranks of this torch.distributed run have different {what}: rank(s) {ranks} differ "
                             "from rank 0; start every rank with the same options, data and seed")

    def describe(self) -> dict:
        return {"kind": "torch.distributed", "backend": self.group_backend, "rank": self.rank,
                "processes": self.processes, "shards": self.shards}

    def _comm_device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.group_backend == "nccl" else "cpu"

    def reduce_step(self, grads: list, loss, aux: dict):
        """Average the gradients, loss and metrics over the ranks in one all-reduce, and
        count the failed solves and stop votes.

        :param grads: the local gradients (one per parameter); replaced in place by their mean.
        :param loss: the local loss.
        :param aux: the local metrics; ``status`` must be among them.
        :returns: the mean loss, the mean metrics (``status``: the first failure's code
            among the ranks, 0 when every solve succeeded) and whether any rank voted to stop.
        """
        names = [k for k, v in aux.items() if k != "status" and isinstance(v, torch.Tensor) and v.numel() == 1]
        dtype, dev = grads[0].dtype, grads[0].device
        status = aux["status"]
        local = [loss.detach().reshape(1)] + [aux[k].detach().reshape(1).to(dtype) for k in names]
        flags = [(torch.as_tensor(status, device=dev).reshape(1) == s).to(dtype) for s in _STATUSES[1:]]
        flags.append(torch.full((1,), 1.0 if self.stop_vote else 0.0, dtype=dtype, device=dev))
        buffer = torch.cat([g.reshape(-1) for g in grads] + [v.to(dtype) for v in local] + flags)
        t0 = time.perf_counter()
        dist.all_reduce(buffer)
        self.reduce_seconds = time.perf_counter() - t0
        sums = buffer[-(len(local) + len(flags)):]
        offset = 0
        for g in grads:
            g.copy_(buffer[offset:offset + g.numel()].view_as(g)).div_(self.processes)
            offset += g.numel()
        mean = sums[:len(local)] / self.processes
        counts = sums[len(local):].tolist()  # the flags: one host read
        failed = [s for s, c in zip(_STATUSES[1:], counts[:-1]) if c > 0]
        reduced = {k: _like(mean[i + 1], aux[k]) for i, k in enumerate(names)}
        reduced["status"] = torch.tensor(failed[0] if failed else 0, dtype=torch.int32)
        self.stop_agreed = counts[-1] > 0
        return mean[0], {**aux, **reduced}


def _like(value, like):
    """``value`` in the dtype of ``like`` (an integer count is rounded: the mean NFE)."""
    if like.dtype.is_floating_point:
        return value.to(like.dtype)
    return torch.round(value).to(like.dtype)

