"""One rank of the two-process torch runs of ``tests/test_distributed_torch.py``.

Started with torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``), so ``otflow.fit`` finds and initializes the gloo
process group itself. Runs every scenario of the tests in one process group (one launch:
the default test run stays short) and writes this rank's results to
``OUT/rank<r>.npz`` (arrays) and ``OUT/rank<r>.json`` (the rest).

``reduce_step`` (the one all-reduce of a step) is wrapped to record each rank's own NFE,
to inject a NaN loss on one rank, and to stop a run ("kill") just before a step.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import warnings

import numpy as np
import torch

import otflow
import otflow.training.checkpoint as checkpoint_module
import otflow.training.loop as loop_module
from otflow_torch._distributed import ProcessGroupReplicas

OUT = sys.argv[1]
RANK = int(os.environ["RANK"])
DATA = np.random.default_rng(0).normal(size=(64, 2)) * np.array([1.0, 0.5])
BASE = dict(objective="rnode", backend="torch", hidden=(8,), batch_size=8, max_iters=3, quiet=True, val_fraction=0.0, dtype="float64",
            seed=3, method="rk4", steps=2)

inject: dict = {}
calls: list = []
_original = ProcessGroupReplicas.reduce_step


class Killed(Exception):
    """A run stopped on purpose before a step (both ranks at the same step)."""


def _reduce_step(self, grads, loss, aux):
    calls.append(int(aux["nfe"]))
    if inject.get("nan_at") == len(calls) and self.rank == 1:
        loss = loss * float("nan")
    if inject.get("kill_at") == len(calls):
        raise Killed
    if inject.get("sigterm_at") == len(calls) and self.rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return _original(self, grads, loss, aux)


ProcessGroupReplicas.reduce_step = _reduce_step

writes: list = []
_write_file = checkpoint_module.write_file


def _counting_write_file(path, *args, **kwargs):
    writes.append(os.fspath(path))
    return _write_file(path, *args, **kwargs)


checkpoint_module.write_file = _counting_write_file

history_files: list = []
_RunLog = loop_module.RunLog


class _RecordingRunLog(_RunLog):
    def __init__(self, history_path, quiet, earlier, total, **kwargs):
        history_files.append((history_path, quiet))
        super().__init__(history_path, quiet, earlier, total, **kwargs)


loop_module.RunLog = _RecordingRunLog


def params_of(flow) -> list:
    return [np.asarray(a.detach().numpy()) for a in flow.backend.tree_leaves(flow.params)]


def run(name: str, **kw):
    inject.clear()
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flow = otflow.fit(DATA, **{**BASE, **kw})
    return flow, [str(w.message) for w in caught]


def main() -> None:
    arrays, info = {}, {}
    for gradient in ("direct", "adjoint"):
        flow, _ = run(gradient, gradient=gradient)
        arrays.update({f"{gradient}.{i}": p for i, p in enumerate(params_of(flow))})
        info[gradient] = {"grad_norm": [h["grad_norm"] for h in flow.history],
                          "loss": [h["loss"] for h in flow.history], "data_parallel": flow.fit_info["data_parallel"]}

    flow, _ = run("adaptive", method="dopri5", rtol=1e-8, atol=1e-8, batch_size=4, max_iters=4, zero_last=False,
                  hidden=(16,))
    info["adaptive"] = {"local_nfe": list(calls), "iterations": flow.fit_info["iterations"],
                        "nfe": [h["nfe_forward"] for h in flow.history]}

    inject.clear()
    calls.clear()
    inject["nan_at"] = 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flow = otflow.fit(DATA, **BASE)
    arrays.update({f"nan.{i}": p for i, p in enumerate(params_of(flow))})
    info["nan"] = {"applied": [h["applied"] for h in flow.history], "skipped": flow.fit_info["skipped_iterations"],
                   "warnings": [str(w.message) for w in caught]}

    inject.clear()
    calls.clear()
    inject["sigterm_at"] = 2  # rank 1 alone receives SIGTERM during its 2nd step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        flow = otflow.fit(DATA, **{**BASE, "max_iters": 6})
    info["sigterm"] = {"iterations": flow.fit_info["iterations"], "interrupted": flow.fit_info["interrupted"],
                       "warnings": [str(w.message) for w in caught]}

    files = os.path.join(OUT, "files")
    os.makedirs(files, exist_ok=True)
    writes.clear()
    history_files.clear()
    flow, _ = run("files", checkpoint=os.path.join(files, "ck.safetensors"), history=os.path.join(files, "h.jsonl"),
                  checkpoint_every=1, quiet=False)
    info["files"] = {"writes": list(writes), "history_files": [list(h) for h in history_files]}

    # a run stopped before its 5th step (after the checkpoint of iteration 4), then resumed
    long = dict(max_iters=6, checkpoint_every=2)
    flow, _ = run("uninterrupted", **long)
    arrays.update({f"uninterrupted.{i}": p for i, p in enumerate(params_of(flow))})
    ck = os.path.join(OUT, "resume.safetensors")
    inject.clear()
    calls.clear()
    inject["kill_at"] = 5
    try:
        otflow.fit(DATA, **{**BASE, **long, "checkpoint": ck})
        info["killed"] = False
    except Killed:
        info["killed"] = True
    torch.distributed.barrier()  # a relaunch starts after every rank died (and rank 0 wrote its checkpoint)
    flow = otflow.fit(DATA, resume=ck, backend="torch")
    arrays.update({f"resumed.{i}": p for i, p in enumerate(params_of(flow))})
    info["resumed"] = {"iterations": flow.fit_info["iterations"]}

    errors = {}
    for name, kw in (("batch", dict(batch_size=7)), ("options", dict(lr=1e-3 * (1 + RANK)))):
        try:
            otflow.fit(DATA, **{**BASE, **kw})
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    info["errors"] = errors

    np.savez(os.path.join(OUT, f"rank{RANK}.npz"), **arrays)
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
