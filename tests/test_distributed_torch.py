"""Data-parallel torch training: two gloo processes on localhost against one process.

One launch of two ranks (``tests/distributed_torch_worker.py``, with torchrun's
environment variables, so ``fit`` initializes the process group itself) runs every
scenario; the tests compare its results with single-process runs made here. The
slow-marked test kills both ranks with SIGKILL mid-run and resumes them.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import otflow  # noqa: E402
from otflow.training.model import build_fields, initial_params  # noqa: E402

WORKER = Path(__file__).with_name("distributed_torch_worker.py")
DATA = np.random.default_rng(0).normal(size=(64, 2)) * np.array([1.0, 0.5])
BASE = dict(objective="rnode", backend="torch", hidden=(8,), batch_size=8, max_iters=3, quiet=True, val_fraction=0.0, dtype="float64",
            seed=3, method="rk4", steps=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, script: Path = WORKER, args=(), world: int = 2) -> list[subprocess.Popen]:
    """``world`` ranks of ``script`` with torchrun's environment on a free localhost port."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), str(out), *map(str, args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs, timeout: float = float(os.environ.get('OTFLOW_TEST_DDP_TIMEOUT', 240))) -> None:
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:  # a deadlock would end here
            for q in procs:
                q.kill()
            texts = [q.communicate()[0][-3000:] for q in procs]
            pytest.fail("a rank did not finish (deadlock?):\n" + "\n----\n".join(texts))
    for rank, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    wait_all(launch(out))
    return out, [(json.loads((out / f"rank{r}.json").read_text()), dict(np.load(out / f"rank{r}.npz")))
                 for r in range(2)]


def _params(flow) -> list[np.ndarray]:
    return [a.detach().numpy() for a in flow.backend.tree_leaves(flow.params)]


def _stored(arrays: dict, name: str) -> list[np.ndarray]:
    n = len([k for k in arrays if k.startswith(name + ".")])
    return [arrays[f"{name}.{i}"] for i in range(n)]


@pytest.mark.parametrize("gradient", ["direct", "adjoint"])
def test_two_ranks_equal_one_process(ranks, gradient):
    """Parameters after 3 steps on 2 ranks (4 rows each) equal one process on the same
    8-row global batches, for backpropagation and for the adjoint; so do the logged
    (reduced) losses and the norms of the averaged gradients."""
    _, results = ranks
    single = otflow.fit(DATA, **BASE, gradient=gradient)
    expected = _params(single)
    for info, arrays in results:
        got = _stored(arrays, gradient)
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(info[gradient]["loss"], [h["loss"] for h in single.history], rtol=1e-10)
        np.testing.assert_allclose(info[gradient]["grad_norm"], [h["grad_norm"] for h in single.history], rtol=1e-8)
        assert info[gradient]["data_parallel"]["processes"] == 2


def test_adjoint_gradients_are_not_zero(ranks):
    """torchdiffeq #119: adjoint gradients were zero under DataParallel. Here the averaged
    adjoint gradient has the single-process norm (> 0) and the parameters moved."""
    _, results = ranks
    info, arrays = results[0]
    assert min(info["adjoint"]["grad_norm"]) > 0.1
    opts = otflow.FitOptions(**{k: v for k, v in BASE.items() if k != "backend"})
    b = otflow.get_backend("torch")
    initial = initial_params(build_fields(opts, DATA.shape[1]), opts, b, torch.float64, "cpu")
    moved = [np.max(np.abs(a - b.to_numpy(p))) for a, p in zip(_stored(arrays, "adjoint"),
                                                                b.tree_leaves(initial["fields"]))]
    assert max(moved) > 1e-4


def test_ranks_with_different_adaptive_step_counts_finish(ranks):
    """dopri5 on each rank's own rows takes different numbers of steps; no collective is
    inside the solve, so both ranks finish all iterations; the logged NFE is the rounded
    mean over the ranks."""
    _, results = ranks
    local = [info["adaptive"]["local_nfe"] for info, _ in results]
    assert local[0] != local[1]
    for info, _ in results:
        assert info["adaptive"]["iterations"] == 4
        assert info["adaptive"]["nfe"] == [round((a + b) / 2) for a, b in zip(*local)]


def test_nan_on_one_rank_makes_both_skip(ranks):
    """A NaN loss on rank 1 at iteration 1: both ranks skip it (the decision is on the
    reduced value) and keep identical parameters."""
    _, results = ranks
    for info, _ in results:
        assert info["nan"]["applied"] == [True, False, True]
        assert info["nan"]["skipped"] == 1
        assert any("skipped" in w for w in info["nan"]["warnings"])
    for a, b in zip(_stored(results[0][1], "nan"), _stored(results[1][1], "nan")):
        np.testing.assert_array_equal(a, b)


def test_a_signal_on_one_rank_stops_both_after_the_same_iteration(ranks):
    """SIGTERM reaches rank 1 alone during iteration 1; its wish to stop travels with the
    next step's all-reduce, and both ranks stop after iteration 2 (no rank is left
    waiting in a collective)."""
    _, results = ranks
    (r0, _), (r1, _) = results
    assert r0["sigterm"]["iterations"] == r1["sigterm"]["iterations"] == 3
    assert r1["sigterm"]["interrupted"] and not r0["sigterm"]["interrupted"]
    assert any(w.startswith("SIGTERM received: stopping at iteration 3") for w in r1["sigterm"]["warnings"])
    assert any(w.startswith("a stop request from another process received") for w in r0["sigterm"]["warnings"])


def test_only_rank_zero_writes(ranks):
    """Checkpoints and the history file are written by rank 0 only; rank 1 shows no bar."""
    out, results = ranks
    (r0, _), (r1, _) = results
    assert len(r0["files"]["writes"]) == 3 and r1["files"]["writes"] == []
    assert r0["files"]["history_files"][0] == [str(out / "files" / "h.jsonl"), False]
    assert r1["files"]["history_files"][0] == [None, True]
    lines = (out / "files" / "h.jsonl").read_text().splitlines()
    assert [json.loads(line)["it"] for line in lines] == [0, 1, 2]


def test_stopped_then_resumed_equals_uninterrupted(ranks):
    """Both ranks stop before step 5 (the checkpoint holds iteration 4); resuming every
    rank from it gives the parameters of the uninterrupted 6-iteration run."""
    _, results = ranks
    for info, arrays in results:
        assert info["killed"] and info["resumed"]["iterations"] == 6
        for a, b in zip(_stored(arrays, "resumed"), _stored(arrays, "uninterrupted")):
            np.testing.assert_array_equal(a, b)


def test_bad_configurations(ranks):
    """A global batch not divisible by the ranks, and options that differ between ranks,
    are refused on every rank with a message naming the fix."""
    _, results = ranks
    for info, _ in results:
        assert "does not split evenly over 2 processes" in info["errors"]["batch"]
        assert "batch_size=6" in info["errors"]["batch"]
        assert "different options, data or resume point" in info["errors"]["options"]


def test_devices_option_is_refused_on_torch():
    """torch runs one process per device: ``devices=`` points to torchrun."""
    with pytest.raises(ValueError, match="torchrun"):
        otflow.fit(DATA, **{**BASE, "max_iters": 1}, devices=2)


KILL_WORKER = """
import os, sys, numpy as np, otflow
out, mode = sys.argv[1], sys.argv[2]
DATA = np.random.default_rng(0).normal(size=(64, 2))
kw = dict(backend="torch", hidden=(8,), batch_size=8, max_iters=40, quiet=True, val_fraction=0.0, dtype="float64",
          seed=5, method="rk4", steps=2, checkpoint_every=5, history=os.path.join(out, mode + ".jsonl"))
ck = os.path.join(out, mode + ".safetensors")
if mode == "resume":
    flow = otflow.fit(DATA, resume=os.path.join(out, "killed.safetensors"), backend="torch")
else:
    flow = otflow.fit(DATA, checkpoint=ck, **kw)
if int(os.environ["RANK"]) == 0:
    np.savez(os.path.join(out, mode + ".npz"), *[a.detach().numpy() for a in flow.backend.tree_leaves(flow.params)])
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """Both ranks are killed (SIGKILL) mid-run; every rank resumes from rank 0's last
    checkpoint and ends with the parameters of an uninterrupted run."""
    script = tmp_path / "kill_worker.py"
    script.write_text(KILL_WORKER)
    wait_all(launch(tmp_path, script, ["full"]))
    procs = launch(tmp_path, script, ["killed"])
    history = tmp_path / "killed.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 12):
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(history.read_text().splitlines()) < 40, "the run ended before it was killed"
    wait_all(launch(tmp_path, script, ["resume"]))
    full, resumed = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resume.npz")
    for k in full.files:
        np.testing.assert_array_equal(resumed[k], full[k])


def test_the_command_line_trains_data_parallel_under_torchrun(tmp_path):
    """``torchrun --nproc_per_node 2 -m otflow fit ...``: both ranks train, only rank 0
    saves the model and prints; the saved model records the two processes."""
    data = tmp_path / "data.npy"
    np.save(data, DATA)
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "otflow", "fit", str(data), "--backend", "torch", "--objective", "rnode", "--max-iters", "2",
               "--batch-size", "8", "--method", "rk4", "--steps", "2", "--set", "hidden=[8]", "--quiet",
               "-o", str(tmp_path / "model.safetensors")]
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "saved" in outputs[0] and "saved" not in outputs[1], outputs
    flow = otflow.load(tmp_path / "model.safetensors")
    from otflow.cnf.serialize import read_file

    meta = read_file(tmp_path / "model.safetensors")[1]["metadata"]
    assert meta["fit"]["data_parallel"]["processes"] == 2
    assert np.all(np.isfinite(flow.log_prob(DATA[:4])))
