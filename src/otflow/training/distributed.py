"""Data-parallel training: this process's place among the replicas of a run.

:func:`otflow.fit` trains data-parallel on the engines' own collectives: ranks of a
``torch.distributed`` process group (launched by ``torchrun``), or a
``jax.sharding.Mesh`` of devices (``devices=``). The core never imports a framework, so it
sees both through :class:`Replicas`: how many parts every global batch splits into, which
rows of it this process draws, where only the main process writes, and how the processes
agree on a decision. The backend's trainer factory supplies the framework's kind through
its ``data_parallel(backend, devices, device)`` class method (see
:func:`resolve_replicas`); the trainer then reduces gradients and metrics (torch) or lets
XLA insert the all-reduce (JAX).

Every process draws the whole global batch's row indices from the run's shared random
generator and keeps its own part (:meth:`Replicas.rows`), so the union over processes is
the single-process batch of the same seed, and the generator's state — what a checkpoint
stores — is the same everywhere.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

from .trainer import trainer_factory

__all__ = ["Replicas", "SingleProcess", "resolve_replicas", "check_batch_split", "options_digest", "RowDraw"]


class Replicas:
    """Where this process stands among the replicas of a data-parallel run; the base class
    is one process on one device.

    :ivar rank: this process's index (0 is the main process, the only one writing files).
    :ivar processes: the number of processes.
    :ivar shards: the number of equal parts every global batch splits into (processes for
        torch; devices for a JAX mesh).
    :ivar stop_vote: this process's wish to stop, carried by the next step's reduction (torch).
    :ivar stop_agreed: whether any process voted to stop at the last step (torch).
    """

    rank: int = 0
    processes: int = 1
    shards: int = 1
    #: whether each process's loss sees only its part of the batch (torch), rather than the
    #: global batch laid out over devices (JAX)
    loss_sees_part: bool = False

    def __init__(self):
        self.stop_vote = False
        self.stop_agreed = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes the checkpoints, the history and the progress bar."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice | None:
        """The part of every global batch this process draws (None: all of it).

        :param batch_size: the global batch size.
        :returns: a slice of the batch's rows, or None.
        """
        if self.processes == 1:
            return None
        part = batch_size // self.processes
        return slice(self.rank * part, (self.rank + 1) * part)

    def row_draw(self, draw):
        """``draw`` as this process must call it for per-row noise of its part of the batch
        (probes, dequantization noise, path times): :class:`RowDraw` when each process's loss
        sees only its part (torch), else ``draw`` itself.

        :param draw: a backend draw, ``draw(key, shape, dtype=..., device=...)``.
        """
        return RowDraw(draw, self) if self.loss_sees_part else draw

    def place_batch(self, x):
        """Lay this process's batch out for the step (a JAX mesh shards it); as it is here."""
        return x

    def on_device(self, tree, device):
        """``tree`` (the trainer's parameters) on the single device ``device``, for the
        flow that validation and the result use; as it is here."""
        return tree

    def device(self, backend, spec):
        """The device this process trains on, from ``fit``'s ``device=``.

        :param backend: the training backend.
        :param spec: ``device=`` as given.
        """
        return backend.device(spec)

    def agree_any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (a collective: every process must call it).

        :param flag: this process's value.
        """
        return bool(flag)

    def stop_requested(self, local: bool) -> bool:
        """Whether the run stops now, given this process's wish (a signal, ``max_time``);
        every process must get the same answer. One process: ``local``.

        :param local: whether this process was asked to stop.
        """
        return bool(local)

    def same_everywhere(self, digest: str, what: str) -> None:
        """Raise ValueError unless every process passes the same ``digest`` (a collective).

        :param digest: a hash of what must agree.
        :param what: its name, for the message.
        """

    def describe(self) -> dict:
        """What ``fit_info["data_parallel"]`` reports."""
        return {"kind": "single", "rank": self.rank, "processes": self.processes, "shards": self.shards}


class SingleProcess(Replicas):
    """One process on one device: no collective, nothing to agree on."""


def resolve_replicas(backend, devices, device) -> Replicas:
    """The replicas of a run on ``backend``: a torch process group when ``torchrun`` (or the
    user) started one, a JAX mesh when ``devices=`` names several devices, else one process.

    :param backend: the training backend.
    :param devices: the ``devices`` option.
    :param device: ``fit``'s ``device=``.
    :returns: the :class:`Replicas`.
    :raises ValueError: ``devices=`` on a backend that has no multi-device trainer, or
        devices that do not exist.
    """
    hook = getattr(trainer_factory(backend.name), "data_parallel", None)
    found = hook(backend, devices, device) if hook is not None else None
    if found is None and devices is not None:
        raise ValueError(f"devices={devices!r}: the {backend.name} trainer does not train on several devices; "
                         "drop devices= (or train with backend='jax')")
    return found if found is not None else SingleProcess()


def check_batch_split(replicas: Replicas, batch_size: int) -> None:
    """Raise unless the global batch splits into equal parts, one per shard.

    :param replicas: the run's replicas.
    :param batch_size: the global batch size (``batch_size=``).
    :raises ValueError: a batch size not divisible by the number of shards.
    """
    if batch_size % replicas.shards:
        lower = batch_size - batch_size % replicas.shards
        raise ValueError(f"batch_size={batch_size} (the global batch) does not split evenly over "
                         f"{replicas.shards} {'processes' if replicas.processes > 1 else 'devices'}; use a multiple "
                         f"of {replicas.shards}, e.g. batch_size={max(lower, replicas.shards)}")


def options_digest(opts, data_digest: str, resumed_at: int | None = None) -> str:
    """A hash of a run's resolved options, data and resume point, which every process must share.

    :param opts: the run's :class:`~otflow.FitOptions`.
    :param data_digest: the training data's digest.
    :param resumed_at: the iteration of the checkpoint the run resumes from (None: a new run).
    :returns: a hex digest.
    """
    text = json.dumps({"options": dataclasses.asdict(opts), "data": data_digest, "resumed_at": resumed_at},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RowDraw:
    """A per-row draw for this process's part of the global batch: the draw for the whole
    global batch from the iteration's key, cut to this process's rows, so that N processes
    use together exactly the noise one process would — the Hutchinson probe (Finlay et al.,
    ICML 2020, train with one probe per sample and iteration), the dequantization noise of
    images, the path times of flow matching.

    :param draw: the backend's draw, ``draw(key, shape, dtype=..., device=...)``.
    :param replicas: the run's replicas (its rank and number of processes).
    """

    def __init__(self, draw, replicas: Replicas):
        self.draw = draw
        self.rank = replicas.rank
        self.processes = replicas.processes

    def __call__(self, key, shape, *, dtype, device=None):
        shape = tuple(shape)
        n = shape[0]
        whole = self.draw(key, (n * self.processes, *shape[1:]), dtype=dtype, device=device)
        return whole[self.rank * n:(self.rank + 1) * n]
