"""The training layer's trainers: ``otflow.training.make_trainer``, found per backend through
the ``otflow.trainers`` entry-point group or ``register_trainer``; their optimizer state
survives a checkpoint file exactly."""
from __future__ import annotations

import numpy as np
import pytest

import otflow
from _helpers import backend_available
from otflow import MLP, OptimizerSpec, rnode_loss
from otflow.cnf.serialize import read_file, write_file
from otflow.training import Trainer, make_trainer, register_trainer, trainer_factory

BACKENDS = [n for n in ("torch", "jax") if backend_available(n)]


class SmallRNODE:
    """A one-block RNODE loss on a 2-D batch (rk4, 2 steps)."""

    def __init__(self, backend):
        self.backend = backend
        self.field = MLP((2,), hidden=(8,), zero_last=False)

    def params(self):
        b = self.backend
        return {"fields": (self.field.init(b, b.key(0), dtype=b.namespace().float32),)}

    def __call__(self, params, x, key):
        b = self.backend
        eps = b.normal(key, tuple(x.shape), dtype=x.dtype)
        out = rnode_loss([self.field], params["fields"], x, eps, T=[1.0], backend=b,
                         solver_kwargs=dict(method="rk4", n_steps=2))
        return out.loss, {"nll": out.nll, "status": out.status}


def _leaves(b, tree):
    return [b.to_numpy(a) for a in b.tree_leaves(tree)]


@pytest.mark.parametrize("name", BACKENDS)
def test_optimizer_state_survives_a_checkpoint_file_exactly(name, tmp_path):
    """Defect 7: a file stores Adam's 0-d step count as shape (1,) (``np.ascontiguousarray``);
    restored so, JAX compiled a second, differently rounded update. The restored state has
    the optimizer's own shapes, and the steps after it give bit-for-bit the parameters of
    the trainer that never stopped."""
    b = otflow.get_backend(name)
    loss = SmallRNODE(b)
    spec = OptimizerSpec(lr=1e-2)
    rng = np.random.default_rng(0)
    batches = [b.asarray(rng.normal(size=(32, 2)).astype(np.float32)) for _ in range(6)]
    continued = make_trainer(loss, loss.params(), spec, backend=b)
    for i in range(3):
        continued.step(batches[i], b.key(i), 1e-2)
    state = continued.optimizer_state()
    path = write_file(tmp_path / "ck.safetensors",
                      {**{f"opt.{k}": v for k, v in state.items()},
                       **{f"p.{i}": a for i, a in enumerate(_leaves(b, continued.params))}}, {"kind": "test"})
    arrays = read_file(path)[0]
    restored = make_trainer(loss, loss.params(), spec, backend=b)
    n_params = len(_leaves(b, continued.params))
    restored.set_params(_tree_like(b, continued.params, [arrays[f"p.{i}"] for i in range(n_params)]))
    restored.load_optimizer_state({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
    assert {k: np.shape(v) for k, v in restored.optimizer_state().items()} == {k: np.shape(v) for k, v in state.items()}
    for i in range(3, 6):
        continued.step(batches[i], b.key(i), 1e-2)
        restored.step(batches[i], b.key(i), 1e-2)
    for p, q in zip(_leaves(b, continued.params), _leaves(b, restored.params)):
        assert np.array_equal(p, q)
    if name == "jax":
        assert restored.compilations == 1


@pytest.mark.skipif(not backend_available("jax"), reason="jax is not installed")
def test_jax_step_compiles_once_for_a_whole_run(caplog):
    """The step's outputs are committed to the device; uncommitted initial parameters or
    optimizer state (optax's fresh step count) made the second step compile the whole
    update again (about 4 s on a 2-D model). XLA compiles the step once."""
    import logging

    import jax

    b = otflow.get_backend("jax")
    loss = SmallRNODE(b)
    cpu = b.device("cpu")  # parameters placed on a device, as fit places them
    params = b.tree_map(lambda a: b.asarray(a, device=cpu), loss.params())
    trainer = make_trainer(loss, params, OptimizerSpec(lr=1e-2), backend=b)
    x = b.asarray(np.random.default_rng(0).normal(size=(16, 2)).astype(np.float32), device=cpu)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            for i in range(3):
                trainer.step(x, b.key(i), 1e-2)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished XLA compilation of jit(step)")]
    assert len(compiled) == 1, compiled


def _tree_like(b, tree, leaves):
    it = iter(leaves)
    return b.tree_map(lambda _: next(it), tree)


@pytest.mark.parametrize("name", BACKENDS)
def test_make_trainer_finds_the_trainer_of_the_backend(name):
    b = otflow.get_backend(name)
    loss = SmallRNODE(b)
    trainer = make_trainer(loss, loss.params(), OptimizerSpec(), backend=name)
    assert isinstance(trainer, Trainer)
    assert type(trainer).__name__ == {"torch": "TorchTrainer", "jax": "JaxTrainer"}[name]
    x = b.asarray(np.random.default_rng(1).normal(size=(16, 2)).astype(np.float32))
    metrics = trainer.step(x, b.key(0), 1e-3)
    assert metrics["applied"] is True
    assert float(b.to_numpy(metrics["loss"])) == pytest.approx(float(b.to_numpy(loss(loss.params(), x, b.key(0))[0])),
                                                               rel=1e-6)


def test_a_third_party_trainer_is_registered_and_removed():
    calls = []

    class RecordingTrainer:
        def __init__(self, backend, loss_fn, params, optimizer):
            calls.append((backend.name, loss_fn, params, optimizer))
            self.params = params

    def loss_fn(p, x, key):
        return 0.0, {"status": 0}

    with pytest.raises(otflow.CapabilityError, match=r"backend 'numpy' has no trainer.*register_trainer\('numpy'"):
        make_trainer(loss_fn, {}, OptimizerSpec(), backend="numpy")
    register_trainer("numpy", RecordingTrainer)
    try:
        assert trainer_factory("numpy") is RecordingTrainer
        spec = OptimizerSpec(lr=0.5)
        trainer = make_trainer(loss_fn, {"w": np.ones(2)}, spec, backend="numpy")
        assert isinstance(trainer, RecordingTrainer) and len(calls) == 1
        backend_name, called_loss, params, optimizer = calls[0]
        assert (backend_name, called_loss, optimizer) == ("numpy", loss_fn, spec) and params["w"].tolist() == [1, 1]
    finally:
        register_trainer("numpy", None)
    with pytest.raises(otflow.CapabilityError, match="has no trainer"):
        make_trainer(loss_fn, {}, OptimizerSpec(), backend="numpy")


def test_bad_arguments_name_what_is_expected():
    with pytest.raises(TypeError, match="optimizer must be an otflow.OptimizerSpec"):
        make_trainer(lambda p, x, k: (0.0, {}), {}, {"lr": 1e-3}, backend="numpy")
    with pytest.raises(TypeError, match="loss_fn must be a function"):
        make_trainer("loss", {}, OptimizerSpec(), backend="numpy")
    with pytest.raises(TypeError, match="factory must be callable"):
        register_trainer("mine", "otflow_mine:Trainer")


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_make_trainer_names_its_replacement(name):
    with pytest.raises(AttributeError, match=r"otflow\.training\.make_trainer\(loss_fn, params, optimizer"):
        otflow.get_backend(name).make_trainer  # noqa: B018


@pytest.mark.parametrize("name", BACKENDS)
def test_optimizer_state_of_another_shape_is_refused(name):
    b = otflow.get_backend(name)
    loss = SmallRNODE(b)
    trainer = make_trainer(loss, loss.params(), OptimizerSpec(), backend=b)
    trainer.step(b.asarray(np.zeros((4, 2), np.float32)), b.key(0), 1e-3)
    state = trainer.optimizer_state()
    key = next(k for k, v in state.items() if np.size(v) > 1)
    state[key] = np.zeros(np.size(state[key]) + 1, dtype=state[key].dtype)
    with pytest.raises(ValueError, match="has shape"):
        trainer.load_optimizer_state(state)
