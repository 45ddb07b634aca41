"""Data-parallel JAX training: a ``jax.sharding.Mesh`` of devices, the batch sharded.

``fit(..., devices=...)`` lays a one-axis mesh (axis ``"data"``) over the devices; the
batch is placed with ``NamedSharding(mesh, P("data"))``, parameters and optimizer state
are replicated (``P()``), and the trainer's one jitted step runs on all of them: XLA
partitions it and inserts the gradient all-reduce. Across hosts, call
``jax.distributed.initialize()`` before ``fit``; ``devices="all"`` then spans every
host's devices, each process draws the rows of its own devices, and process 0 writes.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from otflow.training.distributed import Replicas

__all__ = ["MeshReplicas", "mesh_replicas", "resolve_devices"]

#: the mesh axis the batch is split along
AXIS = "data"


def resolve_devices(backend, devices, device) -> list:
    """The devices ``devices=`` names.

    :param backend: the JAX backend.
    :param devices: an int (the first N devices of ``device``'s platform), ``"all"`` (all of
        that platform's devices, on every host), or a list of device names (``"cpu:1"``,
        ``"gpu:0"``), ``jax.Device`` objects or device ids.
    :param device: ``fit``'s ``device=`` (its platform; the default device's when None).
    :returns: the devices, in mesh order.
    :raises ValueError: more devices than exist, a device that does not exist, or a repeated one.
    :raises TypeError: a ``devices`` value of another kind.
    """
    platform = backend.device(device).platform
    available = jax.devices(platform)
    if isinstance(devices, str):
        if devices != "all":
            raise ValueError(f"devices={devices!r}: pass 'all', a number of devices or a list of devices")
        return available
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)"
                    if platform == "cpu" else "")
            raise ValueError(f"devices={devices}: {len(available)} {platform} device(s) are available{hint}")
        return available[:int(devices)]
    if isinstance(devices, (list, tuple)) and devices:
        by_id = {d.id: d for d in jax.devices()}
        found = []
        for spec in devices:
            if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
                if int(spec) not in by_id:
                    raise ValueError(f"devices: no device with id {spec}; the devices are "
                                     f"{[str(d) for d in jax.devices()]}")
                found.append(by_id[int(spec)])
            else:
                try:
                    found.append(backend.device(spec))
                except Exception as e:
                    raise ValueError(f"devices: {spec!r} is not a device of this machine ({e})") from None
        if len(set(found)) != len(found):
            raise ValueError(f"devices={devices!r} names a device twice; each device holds one shard")
        return found
    raise TypeError(f"devices must be None, an int, 'all' or a list of devices (e.g. ['cpu:0', 'cpu:1']), "
                    f"got {devices!r}")


def mesh_replicas(backend, devices, device) -> "MeshReplicas | None":
    """The mesh of ``devices=``, or None when it is None (one device).

    :param backend: the JAX backend.
    :param devices: the ``devices`` option.
    :param device: ``fit``'s ``device=``.
    """
    if devices is None:
        return None
    return MeshReplicas(resolve_devices(backend, devices, device))


class MeshReplicas(Replicas):
    """A one-axis mesh of devices; this process is one of ``jax.process_count()``.

    :param devices: the mesh's devices.
    :ivar mesh: the ``jax.sharding.Mesh`` (axis ``"data"``).
    :ivar batch_sharding: ``NamedSharding(mesh, P("data"))``: rows split over the devices.
    :ivar replicated: ``NamedSharding(mesh, P())``: parameters and optimizer state.
    """

    def __init__(self, devices: list):
        super().__init__()
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.rank = jax.process_index()
        self.processes = jax.process_count()
        self.shards = len(devices)

    def place_batch(self, x):
        if self.processes == 1:
            return jax.device_put(x, self.batch_sharding)
        local = np.asarray(x)
        return jax.make_array_from_process_local_data(self.batch_sharding, local,
                                                      (local.shape[0] * self.processes, *local.shape[1:]))

    def device(self, backend, spec):
        """This process's first device of the mesh (validation and the result's flow live there)."""
        if spec is not None:
            return backend.device(spec)
        return next(d for d in self.mesh.devices.flat if d.process_index == jax.process_index())

    def on_device(self, tree, device):
        return jax.device_put(tree, device)

    def replicate(self, tree):
        """``tree`` with every leaf replicated over the mesh."""
        return jax.device_put(tree, self.replicated)

    def agree_any(self, flag: bool) -> bool:
        if self.processes == 1:
            return bool(flag)
        return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))

    def stop_requested(self, local: bool) -> bool:
        return self.agree_any(local)

    def same_everywhere(self, digest: str, what: str) -> None:
        if self.processes == 1:
            return
        codes = np.frombuffer(bytes.fromhex(digest), dtype=np.uint8)
        seen = np.asarray(multihost_utils.process_allgather(codes)).reshape(self.processes, -1)
        if not (seen == seen[0]).all():
            raise ValueError(f"the processes of this JAX run have different {what}; start every process with the "
                             "same options, data and seed")

    def describe(self) -> dict:
        return {"kind": "jax.sharding", "devices": [str(d) for d in self.mesh.devices.flat], "rank": self.rank,
                "processes": self.processes, "shards": self.shards}
