"""Data-parallel JAX training: a mesh of two host devices against one device.

JAX fixes its device count at import, so the two-device checks run in one subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``; it prints one JSON line of
results that the tests below read. The bad-configuration errors that need no second
device run here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

import otflow  # noqa: E402

SCRIPT = textwrap.dedent('''
    import json, os, sys, tempfile, time
    T = time.perf_counter()
    SLOW = sys.argv[1] == "slow"
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    import otflow
    from otflow.training import make_trainer
    from otflow.training.distributed import resolve_replicas
    from otflow.training.model import build_model
    from otflow.training.data import prepare_data, read_data

    DATA = np.random.default_rng(0).normal(size=(96, 2)) * np.array([1.0, 0.5])
    BASE = dict(objective="rnode", backend="jax", hidden=(8,), batch_size=8, max_iters=3, quiet=True, val_fraction=0.0, dtype="float64",
                seed=3, method="euler", steps=2)  # the cheapest program to compile

    def leaves(flow):
        return [np.asarray(a) for a in jax.tree_util.tree_leaves(flow.params)]

    def gap(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))

    out = {"device_count": jax.device_count(), "times": {}}
    cases = {"fixed": {}}
    if SLOW:  # an adaptive training solver, and validation on the mesh's parameters
        cases["dopri5"] = dict(method="dopri5", rtol=1e-6, atol=1e-6, zero_last=False, val_fraction=0.1, eval_every=2)
    for name, kw in cases.items():
        one = otflow.fit(DATA, **{**BASE, **kw})
        two = otflow.fit(DATA, **{**BASE, **kw}, devices=2)
        out[name] = {"gap": gap(leaves(one), leaves(two)),
                     "loss_one": [h["loss"] for h in one.history], "loss_two": [h["loss"] for h in two.history],
                     "val_one": one.fit_info["best_val_nll"], "val_two": two.fit_info["best_val_nll"],
                     "data_parallel": two.fit_info["data_parallel"]}
        out["times"][name] = time.perf_counter() - T

    # the step itself: shardings of its inputs and outputs, and XLA's all-reduce
    opts = otflow.FitOptions(**{k: v for k, v in BASE.items() if k != "backend"}, devices="all")
    b = otflow.get_backend("jax")
    replicas = resolve_replicas(b, opts.devices, None)
    data = prepare_data(read_data(DATA), opts, np.random.default_rng(0))
    model = build_model(opts, data, b, b.namespace().float64, b.device(None))
    trainer = make_trainer(model.loss, model.params, opts.optimizer_spec(), backend=b, data_parallel=replicas)
    x = replicas.place_batch(b.asarray(data.train[:8]))
    key, lr = b.key(0), 1e-3
    compiled = trainer._step.lower(trainer.params, trainer.opt_state, x, key, np.float64(lr)).compile()
    hlo = compiled.as_text()
    params, opt_state, _ = compiled(trainer.params, trainer.opt_state, x, key, np.float64(lr))
    leaf = jax.tree_util.tree_leaves(params)[0]
    out["step"] = {
        "batch_spec": list(x.sharding.spec), "batch_devices": len(x.sharding.device_set),
        "batch_shards": sorted(s.data.shape[0] for s in x.addressable_shards),
        "params_replicated": all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == 2
                                 for a in jax.tree_util.tree_leaves((params, opt_state))),
        "param_devices": len(leaf.sharding.device_set),
        "all_reduce": "all-reduce" in hlo}

    out["times"]["step"] = time.perf_counter() - T
    if SLOW:  # checkpoint and resume on the mesh equal an uninterrupted run
        with tempfile.TemporaryDirectory() as tmp:
            ck = os.path.join(tmp, "ck.safetensors")
            full = otflow.fit(DATA, **{**BASE, "max_iters": 4}, devices=2)
            otflow.fit(DATA, **{**BASE, "max_iters": 2}, devices=2, checkpoint=ck)
            resumed = otflow.fit(DATA, resume=ck, max_iters=4, backend="jax")
            out["resume_gap"] = gap(leaves(full), leaves(resumed))

    errors = {}
    for name, kw in (("batch", dict(batch_size=7, devices=2)), ("repeated", dict(devices=["cpu:0", "cpu:0"])),
                     ("missing", dict(devices=["cpu:0", "cpu:5"])), ("count", dict(devices=3))):
        try:
            otflow.fit(DATA, **{**BASE, "max_iters": 1, **kw})
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    out["times"]["end"] = time.perf_counter() - T
    print("RESULT " + json.dumps(out))
''')


def run_two_devices(mode: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def two_devices():
    return run_two_devices("fast")


@pytest.fixture(scope="module")
def two_devices_slow():
    return run_two_devices("slow")


def _check_equal(r: dict) -> None:
    assert r["data_parallel"]["shards"] == 2 and r["data_parallel"]["kind"] == "jax.sharding"
    assert r["gap"] < 1e-12
    np.testing.assert_allclose(r["loss_two"], r["loss_one"], rtol=1e-12)


def test_sharded_fit_equals_one_device(two_devices):
    """The same seed gives the same model on one device and on a mesh of two (same global
    batches), with the same logged losses."""
    assert two_devices["device_count"] == 2
    _check_equal(two_devices["fixed"])


@pytest.mark.slow
def test_sharded_adaptive_fit_and_resume_equal_one_device(two_devices_slow):
    """An adaptive training solver (the sharded solve's error norm spans the whole global
    batch, as on one device) and validation on the mesh's parameters give the one-device
    results; a run checkpointed and resumed on the mesh equals an uninterrupted one."""
    r = two_devices_slow["dopri5"]
    _check_equal(r)
    np.testing.assert_allclose(r["val_two"], r["val_one"], rtol=1e-10)
    assert two_devices_slow["resume_gap"] == 0.0


def test_batch_is_sharded_and_parameters_replicated(two_devices):
    """The batch is split row-wise over both devices (P("data"), 4 rows each); parameters
    and optimizer state stay replicated on both after the step; the compiled step holds
    XLA's all-reduce."""
    s = two_devices["step"]
    assert s["batch_spec"] == ["data"]
    assert s["batch_devices"] == 2 and s["batch_shards"] == [4, 4]
    assert s["params_replicated"] and s["param_devices"] == 2
    assert s["all_reduce"]


def test_bad_device_configurations(two_devices):
    e = two_devices["errors"]
    assert "does not split evenly over 2 devices" in e["batch"] and "batch_size=6" in e["batch"]
    assert "names a device twice" in e["repeated"]
    assert "cpu:5" in e["missing"] and "not a device" in e["missing"]
    assert "2 cpu device(s) are available" in e["count"]


def test_devices_option_checks():
    """``devices`` is validated with the other options, before any framework work."""
    with pytest.raises(TypeError, match="devices must be None"):
        otflow.FitOptions(devices="many")
    with pytest.raises(ValueError, match="devices must be ≥ 1"):
        otflow.FitOptions(devices=0)
    assert otflow.FitOptions(devices=["cpu:0", 1]).devices == ("cpu:0", 1)


def test_too_many_devices_names_the_xla_flag():
    """Asking for more host devices than JAX has names the XLA flag that makes more."""
    import jax

    n = jax.device_count("cpu") + 1
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        otflow.fit(np.random.default_rng(0).normal(size=(40, 2)), backend="jax", hidden=(4,), max_iters=1,
                   batch_size=n * 2, quiet=True, devices=n, method="rk4", steps=1)


def test_the_command_line_trains_on_a_mesh(tmp_path):
    """``otflow fit ... --set devices=2`` with two host devices: the saved model records a
    two-device mesh."""
    data = tmp_path / "data.npy"
    np.save(data, np.random.default_rng(0).normal(size=(64, 2)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-m", "otflow", "fit", str(data), "--backend", "jax", "--objective", "rnode", "--max-iters", "2",
                           "--batch-size", "8", "--method", "euler", "--steps", "2", "--set", "hidden=[8]",
                           "--set", "devices=2", "--quiet", "-o", str(out)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    from otflow.cnf.serialize import read_file

    meta = read_file(out)[1]["metadata"]
    assert meta["fit"]["data_parallel"]["shards"] == 2, meta["fit"]["data_parallel"]
