"""otflow.fit end to end: quality, save/load, resume, learnable T, config, CLI, bad input.

Training is slow on 2 cores (a JAX step compiles for 10–15 s), so the fits here
are small and share work through module-scoped fixtures.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import otflow
from _helpers import backend_available as _has
from otflow import datasets
from otflow.cnf.serialize import read_file
from otflow.training import OptimizerSpec, make_trainer, register_trainer
from otflow.training.checkpoint import jsonable


BACKENDS = [n for n in ("torch", "jax") if _has(n)]
FAST = dict(objective="rnode", hidden=(32, 32), batch_size=256, eval_every=100, val_points=1000, quiet=True, rtol=1e-4, atol=1e-4,
            eval_rtol=1e-5, eval_atol=1e-5, lr=3e-3)


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request, tmp_path_factory):
    """A short 8gaussians fit per backend, with a checkpoint and a history file."""
    tmp = tmp_path_factory.mktemp(f"fit-{request.param}")
    # standardize=True: the figures below were set for the standardized flow (the default before
    # "auto", which trains 8gaussians as given)
    flow = otflow.fit("8gaussians", backend=request.param, max_iters=300, seed=1, n_train=20000, standardize=True,
                      checkpoint=str(tmp / "ckpt.safetensors"), checkpoint_every=100,
                      history=str(tmp / "history.jsonl"), **FAST)
    return request.param, flow, tmp


def _kl_gap(flow, n=4000, seed=99):
    x = datasets.sample("8gaussians", n, seed=seed)
    logp = np.asarray(flow.log_prob(x), dtype=np.float64)
    nll, se = -logp.mean(), logp.std(ddof=1) / math.sqrt(n)
    return nll - datasets.true_entropy("8gaussians"), se


def test_short_fit_reaches_a_kl_gap_an_untrained_flow_misses(trained):
    name, flow, _ = trained
    gap, se = _kl_gap(flow)
    assert gap < 0.6, (name, gap, se)
    untrained = otflow.fit("8gaussians", backend=name, max_iters=1, seed=1, n_train=2000, **FAST)
    gap0, _ = _kl_gap(untrained)
    assert gap0 > 0.6, gap0
    assert gap0 - gap > 10 * se


def test_history_records_match_the_options(trained):
    name, flow, tmp = trained
    history = flow.history
    assert [h["it"] for h in history] == list(range(300))
    assert all(h["applied"] and h["lr"] == FAST["lr"] for h in history)  # constant schedule, nothing skipped
    # validated on the cadence eval_every=100 only
    assert [h["it"] for h in history if "val_nll" in h] == [99, 199, 299]
    # RNODE's objective (Finlay et al. 2020, eq. 8) with the default λ_K = λ_J = 0.01
    for h in history:
        assert h["loss"] == pytest.approx(h["nll"] + 0.01 * h["kinetic"] + 0.01 * h["jacobian"], rel=1e-5, abs=1e-6)
    # the training NLL decreased by a stated amount (the identity flow starts near log 2π + 1 = 2.84)
    first, last = np.mean([h["nll"] for h in history[:20]]), np.mean([h["nll"] for h in history[-20:]])
    assert first - last > 0.5, (first, last)
    vals = [h["val_nll"] for h in history if "val_nll" in h]
    info = flow.fit_info
    assert info["best_val_nll"] == min(vals) and info["best_iteration"] == 100 * (1 + int(np.argmin(vals)))
    assert (info["iterations"], info["skipped_iterations"], info["backend"]) == (300, 0, name)
    assert info["options"]["max_iters"] == 300 and info["checkpoint"] == str(tmp / "ckpt.safetensors")
    assert info["last"] == history[-1] and info["interrupted"] is False
    lines = [json.loads(line) for line in (tmp / "history.jsonl").read_text().splitlines()]
    assert lines == [jsonable(h) for h in history]  # the file holds the same records


def test_save_load_roundtrip_is_exact_and_crosses_backends(trained, tmp_path):
    name, flow, _ = trained
    path = flow.save(tmp_path / "flow.safetensors")
    x = datasets.sample("8gaussians", 200, seed=5)
    same = otflow.load(path, backend=name)
    np.testing.assert_array_equal(same.log_prob(x), flow.log_prob(x))
    for other in BACKENDS:
        if other != name:
            moved = otflow.load(path, backend=other)
            np.testing.assert_allclose(moved.log_prob(x), flow.log_prob(x), rtol=0, atol=1e-5)


def test_checkpoint_loads_as_the_best_flow(trained):
    name, flow, tmp = trained
    assert read_file(tmp / "ckpt.safetensors")[1]["state"]["iteration"] == 300
    best = otflow.load(tmp / "ckpt.safetensors", backend=name)
    x = datasets.sample("8gaussians", 100, seed=6)
    np.testing.assert_allclose(best.log_prob(x), flow.log_prob(x), atol=1e-6)


#: a run evaluating every 10 iterations and checkpointing every 5: interrupted at 15 or 17
#: it resumes from iteration 15, which is not a multiple of the evaluation interval
RESUME = dict(FAST, hidden=(16,), max_iters=30, eval_every=10, seed=3, n_train=2000, val_points=200,
              method="rk4", steps=2, checkpoint_every=5)


@pytest.fixture(scope="module", params=BACKENDS)
def uninterrupted(request):
    return otflow.fit("checkerboard", backend=request.param, **RESUME)


class CrashingTrainer:
    """Wraps a trainer; its step number ``crash_at`` raises, as a killed process would stop."""

    def __init__(self, trainer, crash_at: int):
        self.trainer, self.crash_at, self.calls = trainer, crash_at, 0

    def step(self, x, key, lr):
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        self.calls += 1
        return self.trainer.step(x, key, lr)

    def __getattr__(self, name):
        return getattr(self.trainer, name)


def _without_seconds(history):
    """The records without their wall times (``sec``, ``elapsed``), which no two runs share."""
    return [{k: v for k, v in h.items() if k not in ("sec", "elapsed")} for h in history]


@pytest.mark.parametrize("interruption", ["max_iters", "crash"])
def test_resume_equals_an_uninterrupted_run(uninterrupted, interruption, tmp_path, wrap_trainer):
    """Defect 7: the resumed run ends with bit-for-bit the parameters, history and best
    validation of the uninterrupted one. Stopped by ``max_iters=15``, the first run's
    end-of-run evaluation is not part of its checkpoint; a crash at iteration 17 (as
    SIGKILL) leaves the periodic checkpoint of iteration 15 and the best parameters of 10."""
    full = uninterrupted
    b = full.backend
    ck = tmp_path / "ck.safetensors"
    if interruption == "max_iters":
        otflow.fit("checkerboard", backend=b.name, checkpoint=str(ck), **dict(RESUME, max_iters=15))
    else:
        wrap_trainer(b.name, lambda trainer: CrashingTrainer(trainer, crash_at=17))
        with pytest.raises(RuntimeError, match="simulated crash"):
            otflow.fit("checkerboard", backend=b.name, checkpoint=str(ck), **RESUME)
        register_trainer(b.name, None)
    arrays, header = read_file(ck)
    assert header["state"]["iteration"] == 15 and header["state"]["best_iteration"] == 10
    assert "val_nll" not in header["history"][-1]  # the end-of-run evaluation is not resumed from
    resumed = otflow.fit("checkerboard", backend=b.name, resume=str(ck), max_iters=30)
    for a, c in zip(b.tree_leaves(full.params), b.tree_leaves(resumed.params)):
        assert np.array_equal(b.to_numpy(a), b.to_numpy(c))
    assert _without_seconds(resumed.history) == _without_seconds(full.history)
    assert (resumed.fit_info["best_iteration"], resumed.fit_info["best_val_nll"]) == \
        (full.fit_info["best_iteration"], full.fit_info["best_val_nll"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_parameters(backend):
    opts = dict(FAST, max_iters=5, seed=11, n_train=2000, eval_every=5, method="rk4", steps=2)
    a = otflow.fit("moons", backend=backend, **opts)
    c = otflow.fit("moons", backend=backend, **opts)
    for p, q in zip(a.backend.tree_leaves(a.params), c.backend.tree_leaves(c.params)):
        np.testing.assert_array_equal(a.backend.to_numpy(p), c.backend.to_numpy(q))


def test_jax_step_compiles_once():
    if "jax" not in BACKENDS:
        pytest.skip("needs jax")
    import jax.numpy as jnp

    b = otflow.get_backend("jax")

    def loss_fn(p, x, key):
        eps = b.normal(key, x.shape, dtype=x.dtype)
        loss = jnp.mean((x * p["w"] + eps * 0.0) ** 2)
        return loss, {"status": jnp.asarray(0), "nll": loss}

    trainer = make_trainer(loss_fn, {"w": jnp.ones(2)}, OptimizerSpec(lr=0.1, schedule="cosine", total_iters=5,
                                                                      warmup=2), backend="jax")
    spec = trainer.spec
    for it in range(5):
        trainer.step(jnp.ones((4, 2)), b.key(it), spec.learning_rate(it))
    assert trainer.compilations == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_learnable_T_converges_to_the_closed_form(backend):
    """Data N(0, s²), v = a·x fixed, only T trained: z(T) = x·e^{aT} is standard normal at
    T* = −log(s)/a. With a = 0.5, s = 0.5: T* = 1.3863."""
    from otflow import FunctionField
    from otflow.cnf import rnode_loss

    b = otflow.get_backend(backend)
    xp = b.namespace()
    a, s = 0.5, 0.5
    field = FunctionField(lambda p, t, x: a * x, (), (1,))
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20000, 1)) * s

    def loss_fn(p, x, key):
        eps = b.rademacher(key, tuple(x.shape), dtype=x.dtype)  # in 1-D the Rademacher trace estimate is exact
        out = rnode_loss([field], [()], x, eps, T=[xp.exp(p["log_T"])], backend=b, lambda_kinetic=0.0,
                         lambda_jacobian=0.0, solver_kwargs=dict(method="rk4", n_steps=4))
        return out.loss, {"status": out.status, "nll": out.nll}

    trainer = make_trainer(loss_fn, {"log_T": b.asarray(np.asarray(0.0))}, OptimizerSpec(lr=0.05), backend=b)
    for it in range(300):
        x = b.asarray(data[rng.integers(0, len(data), 4096)])
        trainer.step(x, b.key(it), 0.05 if it < 150 else 0.01 if it < 250 else 0.002)
    T = math.exp(float(b.to_numpy(trainer.params["log_T"])))
    assert T == pytest.approx(-math.log(s) / a, rel=0.01)


def test_options_and_config_validation(tmp_path):
    with pytest.raises(TypeError, match="Did you mean 'max_iters'"):
        otflow.fit(np.zeros((10, 2)), max_iter=3)
    with pytest.raises(ValueError, match="Did you mean 'dopri5'"):
        otflow.fit(np.zeros((10, 2)), method="dopri")
    for bad, match in [(dict(rtol=-1.0), "rtol"), (dict(lambda_kinetic=-0.1), "lambda_kinetic"),
                       (dict(T=0.0), "T must"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size")]:
        with pytest.raises(ValueError, match=match):
            otflow.fit(np.zeros((10, 2)), **bad)
    cfg = tmp_path / "fit.toml"
    cfg.write_text('objective = "rnode"\nmax_iters = 2\nhidden = [8]\nquiet = true\nmethod = "rk4"\nsteps = 2\n')
    flow = otflow.fit(np.random.default_rng(0).normal(size=(100, 2)), config=str(cfg), eval_every=1, val_points=10)
    options = flow.fit_info["options"]
    assert flow.fit_info["iterations"] == 2 and len(flow.history) == 2
    assert (tuple(options["hidden"]), options["method"], options["steps"], options["eval_every"]) == \
        ((8,), "rk4", 2, 1)  # from the file, and eval_every from the keyword
    assert [f.hidden for f in flow.fields] == [(8,)]
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("lamda_kinetic = 0.1\n")
    with pytest.raises(TypeError, match="lambda_kinetic"):
        otflow.fit(np.zeros((10, 2)), config=str(bad_cfg))
    yml = tmp_path / "fit.yaml"
    yml.write_text("objective: rnode\nmax_iters: 1\nquiet: true\nmethod: euler\nsteps: 1\n")
    assert otflow.fit(np.random.default_rng(0).normal(size=(50, 2)), config=str(yml), val_points=5,
                      eval_every=1).fit_info["iterations"] == 1


@pytest.mark.parametrize("data,exc,match", [
    (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 3.0]]), ValueError, "NaN or inf"),
    (np.zeros(10), ValueError, "2-D"),
    (np.zeros((1, 2)), ValueError, "at least 2"),
    (np.zeros((0, 2)), ValueError, "at least 2"),
    (np.ones((20, 2)), ValueError, "constant"),
    (np.ones((20, 2), dtype=complex), TypeError, "complex"),
    (np.array([["a", "b"], ["c", "d"]]), TypeError, "numeric"),
    ("no_such_file.npy", Exception, "no_such_file"),
    ("8gausians", ValueError, "Did you mean '8gaussians'"),
])
def test_bad_data_is_refused_before_training(data, exc, match):
    with pytest.raises(exc, match=match):
        otflow.fit(data, max_iters=1, quiet=True)


def test_integer_data_are_converted_exactly():
    x = np.random.default_rng(0).integers(0, 50, size=(200, 2))
    opts = dict(objective="rnode", max_iters=2, quiet=True, method="euler", steps=1, val_points=10, eval_every=1, hidden=(8,))
    as_int, as_float = otflow.fit(x, **opts), otflow.fit(x.astype(np.float64), **opts)
    b = as_int.backend
    for p, q in zip(b.tree_leaves(as_int.params), b.tree_leaves(as_float.params)):
        assert np.array_equal(b.to_numpy(p), b.to_numpy(q))
    assert _without_seconds(as_int.history) == _without_seconds(as_float.history)


def test_cli_end_to_end(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    run = lambda *a: subprocess.run([sys.executable, "-m", "otflow", *a], capture_output=True, text=True,  # noqa: E731
                                    cwd=tmp_path, env=env, timeout=600)
    out = run("datasets")
    assert out.returncode == 0 and "checkerboard" in out.stdout and "3.4657" in out.stdout
    model = tmp_path / "m.safetensors"
    out = run("fit", "2spirals", "--objective", "rnode", "--max-iters", "3", "--eval-every", "3", "--quiet", "--method", "rk4",
              "--steps", "2", "--set", "hidden=[16]", "--set", "val_points=50", "--out", str(model))
    assert out.returncode == 0, out.stderr
    assert model.exists() and "trained 3 iterations" in out.stdout
    out = run("sample", str(model), "-n", "7", "-o", "s.npy")
    assert out.returncode == 0, out.stderr
    assert np.load(tmp_path / "s.npy").shape == (7, 2)
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    out = run("log-prob", str(model), "x.npy", "-o", "lp.npy")
    assert out.returncode == 0 and "mean log p" in out.stdout, out.stderr
    assert np.load(tmp_path / "lp.npy").shape == (5,)
    out = run("plot", str(model), "-o", "m.png", "--data", "2spirals")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m.png").stat().st_size > 10_000
    out = run("fit", "2spirals", "--max-iters", "0")
    assert out.returncode == 2 and "max_iters" in out.stderr
    out = run("log-prob", "missing.safetensors", "x.npy")
    assert out.returncode == 2 and "no model file" in out.stderr


def test_corrupted_and_truncated_model_files(tmp_path):
    from otflow.cnf.serialize import ModelFileError

    flow = otflow.fit(np.random.default_rng(0).normal(size=(100, 2)), max_iters=1, quiet=True, method="euler",
                      steps=1, val_points=10, eval_every=1, objective="rnode")
    path = flow.save(tmp_path / "f.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        otflow.load(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFileError, match="corrupted"):
        otflow.load(tmp_path / "junk.safetensors")
    from otflow.cnf.serialize import read_file, write_file

    arrays, header = read_file(path)
    import otflow.cnf.serialize as ser

    old = ser.FORMAT_VERSION
    try:
        ser.FORMAT_VERSION = 99
        write_file(tmp_path / "v99.safetensors", arrays, header)
    finally:
        ser.FORMAT_VERSION = old
    with pytest.raises(ModelFileError, match="format version 99"):
        otflow.load(tmp_path / "v99.safetensors")


def test_stopping_by_epochs_time_and_patience():
    x = np.random.default_rng(0).normal(size=(300, 2))
    small = dict(objective="rnode", quiet=True, method="euler", steps=1, val_points=20, hidden=(8,))
    by_epochs = otflow.fit(x, epochs=1.0, batch_size=100, max_iters=50, eval_every=10, **small)
    n_train = 300 - 20
    assert by_epochs.fit_info["iterations"] == math.ceil(n_train / 100)
    # 3 iterations, off the cadence of 10: the end-of-run evaluation is the run's only one
    assert [h["it"] for h in by_epochs.history if "val_nll" in h] == [2]
    assert (by_epochs.fit_info["best_iteration"], by_epochs.fit_info["best_val_nll"]) == \
        (3, by_epochs.history[-1]["val_nll"])
    by_time = otflow.fit(x, max_time=1e-9, max_iters=50, eval_every=10, **small)
    assert by_time.fit_info["iterations"] == 0 and by_time.history == []
    # max_time ends a run off the cadence: its last iteration is validated (the returned
    # parameters are not up to eval_every iterations old)
    late = otflow.fit(x, max_time=0.5, max_iters=10 ** 6, eval_every=10 ** 6, **small)
    n = late.fit_info["iterations"]
    assert 0 < n < 10 ** 6
    assert [h["it"] for h in late.history if "val_nll" in h] == [n - 1]
    assert late.fit_info["best_iteration"] == n
    patient = otflow.fit(x, lr=1e-9, patience=2, max_iters=200, eval_every=2, **small)
    info = patient.fit_info
    # stopped after 2 evaluations without improvement on the best one
    assert info["iterations"] == info["best_iteration"] + 2 * 2 < 200
    vals = [h["val_nll"] for h in patient.history if "val_nll" in h]
    assert min(vals[-2:]) >= info["best_val_nll"] == min(vals)


def test_each_option_acts():
    x = np.random.default_rng(1).normal(size=(200, 2))
    base = dict(objective="rnode", quiet=True, method="rk4", steps=2, max_iters=4, eval_every=4, val_points=20, hidden=(8,))
    reference = otflow.fit(x, **base)
    b = reference.backend

    def changed(flow):
        pairs = zip(b.tree_leaves(reference.params), b.tree_leaves(flow.params))
        return any(not np.array_equal(b.to_numpy(p), b.to_numpy(q)) for p, q in pairs)

    for opts in (dict(optimizer="adamw", weight_decay=1e-2), dict(clip_norm=1e-3), dict(probe="rademacher")):
        flow = otflow.fit(x, **base, **opts)
        assert all(h["applied"] for h in flow.history) and changed(flow), opts
    vanilla = otflow.fit(x, **base, lambda_kinetic=0.0, lambda_jacobian=0.0)  # FFJORD: no regularizers
    assert all(h["loss"] == h["nll"] and h["kinetic"] == h["jacobian"] == 0.0 for h in vanilla.history)
    two = otflow.fit(x, **base, n_blocks=2, T=0.5)
    assert two.T == (0.5, 0.5) and len(two.fields) == len(two.params) == 2
    learned = otflow.fit(x, **dict(base, max_iters=8, eval_every=8), learn_T=True, lr=0.05)
    assert learned.T[0] != 1.0 and learned.fit_info["best_iteration"] == 8
    cfg = otflow.fit(x, **base, conditioning="concat", activation="softplus").fields[0].config()
    assert (cfg["conditioning"], cfg["activation"]) == ("concat", "softplus")
    lrs = [h["lr"] for h in otflow.fit(x, **dict(base, max_iters=6, eval_every=6), schedule="cosine",
                                       warmup=2, lr=1e-2).history]
    # linear warm-up over 2 iterations, then cosine decay to 0 over the remaining 4
    expected = [5e-3, 1e-2] + [0.5e-2 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected, rel=1e-12)
