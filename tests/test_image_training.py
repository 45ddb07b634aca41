"""Training image flows: the multiscale RNODE loss against per-block and density computations,
``fit`` on image data (defaults, validation bits/dim, resume, errors), the CLI on an IDX file,
and the sample grid. Tiny images (4×4), conv widths (8,), one block per scale, few iterations."""
from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

import otflow
from otflow.cnf import (MultiscaleSpec, flow_rhs, multiscale_log_prob, rnode_loss, split_channels,
                        squeeze)
from otflow.cnf.multiscale import FACTOR_OUT, SQUEEZE
from otflow.cnf.multiscale_objective import multiscale_rnode_loss

#: fixed-step RK4, the RNODE image recipe's solver (and identical states for every computation)
RK4 = dict(method="rk4", n_steps=2)
SPEC = MultiscaleSpec(image_shape=(1, 4, 4), n_scales=2, blocks_per_scale=1, widths=(8,))
#: the options of the tiny fits
TINY = dict(hidden=(8,), blocks_per_scale=1, n_scales=2, batch_size=8, steps=2, eval_every=2, quiet=True,
            dtype="float64")


#: the identity tests run eagerly: on JAX every operation compiles (~18 s each), so JAX runs them
#: under the slow mark and the torch = JAX test below covers JAX in the default run (compiled)
EAGER_BACKENDS = ["torch", pytest.param("jax", marks=pytest.mark.slow)]


def _np(b, x):
    return np.asarray(b.to_numpy(x), dtype=np.float64)


def _model(b, device, seed=0):
    """The tiny spec's fields and random non-zero float64 parameters (``zero_last=False``)."""
    fields = SPEC.fields(zero_last=False)
    params = SPEC.init(b, b.key(seed), dtype=b.namespace().float64, device=device, zero_last=False)
    return fields, params


def _pixels(b, device, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return b.asarray((rng.integers(0, 256, (batch, *SPEC.image_shape)) + rng.uniform(size=(batch, *SPEC.image_shape)))
                     / 256, device=device)


def _probes(b, device, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    return [b.asarray(rng.normal(size=(batch, *shape)), device=device) for shape in SPEC.block_shapes()]


# ------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("name", EAGER_BACKENDS)
def test_unregularized_loss_is_the_mean_negative_multiscale_log_density(name):
    b, device = otflow.get_backend(pytest.importorskip(name).__name__), None
    fields, params = _model(b, device)
    y, probes = _pixels(b, device), _probes(b, device)
    out = multiscale_rnode_loss(SPEC, fields, params, y, probes, T=0.7, backend=b, lambda_kinetic=0.0,
                                lambda_jacobian=0.0, solver_kwargs=RK4)
    logp = multiscale_log_prob(SPEC, fields, params, y, T=0.7, backend=b, estimator="hutchinson", probes=probes,
                               solver_kwargs=RK4)
    np.testing.assert_allclose(_np(b, out.loss), -_np(b, logp).mean(), rtol=1e-12)
    np.testing.assert_allclose(_np(b, out.nll), _np(b, out.loss), rtol=0)
    assert float(_np(b, out.kinetic)) == 0.0 and float(_np(b, out.jacobian)) == 0.0
    assert int(_np(b, out.status)) == 0
    assert int(_np(b, out.nfe)) == SPEC.n_blocks * 2 * 4  # RK4: 4 evaluations per step, 2 steps per block


@pytest.mark.parametrize("name", EAGER_BACKENDS)
def test_regularizers_are_the_per_block_rnode_terms_summed(name):
    """Brute force: walk the spec's steps by hand, run the vector ``rnode_loss`` on each
    block's input states with its probe, and sum; the NLL equals the Hutchinson log-density."""
    b, device = otflow.get_backend(pytest.importorskip(name).__name__), None
    xp = b.namespace()
    fields, params = _model(b, device)
    y, probes = _pixels(b, device), _probes(b, device)
    out = multiscale_rnode_loss(SPEC, fields, params, y, probes, T=0.7, backend=b, lambda_kinetic=0.3,
                                lambda_jacobian=0.2, solver_kwargs=RK4)
    s = xp.log(1e-6 + (1 - 2e-6) * y) - xp.log1p(-(1e-6 + (1 - 2e-6) * y))
    kinetic = jacobian = 0.0
    z = s
    for step in SPEC.steps():
        if step == SQUEEZE:
            z = squeeze(z)
        elif step == FACTOR_OUT:
            z, _ = split_channels(z)
        else:
            block = rnode_loss([fields[step]], [params[step]], z, probes[step], T=[0.7], backend=b,
                               solver_kwargs=RK4)
            kinetic += float(_np(b, block.kinetic))
            jacobian += float(_np(b, block.jacobian))
            z = otflow.odeint(flow_rhs(fields[step]), z, [0.0, 0.7], args=params[step], backend=b, **RK4).ys[-1]
    assert kinetic > 0 and jacobian > 0
    np.testing.assert_allclose(_np(b, out.kinetic), kinetic, rtol=1e-10)
    np.testing.assert_allclose(_np(b, out.jacobian), jacobian, rtol=1e-10)
    logp = multiscale_log_prob(SPEC, fields, params, y, T=0.7, backend=b, estimator="hutchinson", probes=probes,
                               solver_kwargs=RK4)
    np.testing.assert_allclose(_np(b, out.nll), -_np(b, logp).mean(), rtol=1e-12)
    np.testing.assert_allclose(_np(b, out.loss), _np(b, out.nll) + 0.3 * kinetic + 0.2 * jacobian, rtol=1e-10)


def test_loss_has_gradients_and_torch_equals_jax():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    values, grads = {}, {}
    for name in ("torch", "jax"):
        b = otflow.get_backend(name)
        fields, params = _model(otflow.get_backend("numpy"), None)  # one set of numpy parameters for both
        params = b.tree_map(lambda a: b.asarray(a), params)
        y, probes = _pixels(b, None), _probes(b, None)

        def loss(p):
            # Euler: one stage per step keeps JAX's compilation short; the solver is not what is compared
            return multiscale_rnode_loss(SPEC, fields, p, y, probes, T=0.7, backend=b,
                                         solver_kwargs=dict(method="euler", n_steps=2)).loss

        value, grad = b.jit(b.value_and_grad(loss))(params)
        values[name] = float(_np(b, value))
        grads[name] = [_np(b, g) for g in b.tree_leaves(grad)]
    np.testing.assert_allclose(values["torch"], values["jax"], rtol=1e-10)
    assert any(np.abs(g).max() > 0 for g in grads["torch"])
    for gt, gj in zip(grads["torch"], grads["jax"]):
        np.testing.assert_allclose(gt, gj, rtol=1e-8, atol=1e-12)


def test_loss_refuses_what_it_sets_and_negative_lambda():
    b = otflow.get_backend("numpy")
    fields, params = _model(b, None)
    y = np.full((2, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match="sets norm itself"):
        multiscale_rnode_loss(SPEC, fields, params, y, [], T=1.0, solver_kwargs={"norm": None})
    with pytest.raises(ValueError, match="non-negative"):
        multiscale_rnode_loss(SPEC, fields, params, y, [], T=1.0, lambda_kinetic=-1.0)
    with pytest.raises(ValueError, match="probes"):
        multiscale_rnode_loss(SPEC, fields, params, y, [], T=1.0)


# ------------------------------------------------------------------------------------------
# options and data


def test_image_defaults_fill_only_the_options_not_given():
    from otflow.training.image_model import IMAGE_DEFAULTS, resolve_image_options
    from otflow.training.options import FitOptions

    resolved = resolve_image_options(FitOptions.from_mapping({"method": "dopri5", "batch_size": 32}))
    assert (resolved.method, resolved.batch_size) == ("dopri5", 32)  # given, even the vector default
    for name in ("activation", "conditioning", "steps", "blocks_per_scale", "hidden", "standardize"):
        assert getattr(resolved, name) == IMAGE_DEFAULTS[name]
    assert (IMAGE_DEFAULTS["method"], IMAGE_DEFAULTS["steps"], IMAGE_DEFAULTS["batch_size"]) == ("rk4", 4, 200)
    # a checkpoint's options are all given: resolving them again changes nothing
    again = resolve_image_options(FitOptions.from_mapping(resolved.to_header() | {"hidden": resolved.hidden}))
    assert again == resolved


def test_image_data_are_recognised(monkeypatch):
    from otflow.training import datasets
    from otflow.training.data import read_data

    three = read_data(np.zeros((4, 6, 6), np.uint8))
    assert three.images.train.shape == (4, 1, 6, 6) and three.images.n_levels == 256
    assert read_data(np.zeros((4, 3, 2, 2), np.uint8)).images.train.shape == (4, 3, 2, 2)
    assert read_data(np.zeros((4, 6), np.uint8)).images is None  # rank 2: vectors
    monkeypatch.setattr(datasets._images, "_sklearn_digits", lambda: (np.arange(3 * 64).reshape(3, 64) % 17,
                                                                     np.array([0, 1, 2])))
    digits = read_data("digits-images")
    assert digits.images.n_levels == 17 and digits.images.train.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("options, message", [
    ({"standardize": True}, "standardize"),
    ({"n_blocks": 2}, "blocks_per_scale"),
    ({"n_scales": 3}, "n_scales"),  # 4×4 images squeeze twice at most... then an odd side
])
def test_bad_image_options_are_refused(options, message):
    pytest.importorskip("torch")
    x = np.zeros((8, 1, 6, 6), np.uint8)
    with pytest.raises(ValueError, match=message):
        otflow.fit(x, backend="torch", max_iters=1, quiet=True, **options)


def test_image_options_are_refused_for_vector_data():
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="only apply to image data"):
        otflow.fit(np.random.default_rng(0).normal(size=(20, 2)), backend="torch", blocks_per_scale=3, max_iters=1)


def test_the_reference_backend_cannot_train_images():
    with pytest.raises(ValueError, match="torch"):
        otflow.fit(np.zeros((8, 4, 4), np.uint8), backend="numpy", max_iters=1, quiet=True)


# ------------------------------------------------------------------------------------------
# fit


def _images(n=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 4)).astype(np.uint8)


def test_fit_on_images_validates_in_bits_per_dim():
    pytest.importorskip("torch")
    from otflow.training.evaluation import VALIDATION_NOISE_SEED

    x = _images()
    flow = otflow.fit(x, backend="torch", max_iters=2, val_fraction=0.25, seed=3, **TINY)
    assert isinstance(flow, otflow.cnf.MultiscaleFlow)
    opts = flow.fit_info["options"]
    assert (opts["method"], opts["steps"], opts["batch_size"], opts["activation"], opts["conditioning"],
            opts["standardize"]) == ("rk4", 2, 8, "softplus", "concat", False)
    last = flow.history[-1]
    val = x[np.random.default_rng(3).permutation(len(x))[:6]][:, None]  # the split fit draws first
    again = flow.bits_per_dim(val, seed=VALIDATION_NOISE_SEED, n_bins=256)
    np.testing.assert_allclose(last["val_bpd"], again.mean, rtol=1e-10)
    np.testing.assert_allclose(last["val_bpd_se"], again.standard_error, rtol=1e-8)
    dim = 16
    np.testing.assert_allclose(last["val_nll"], again.mean * dim * math.log(2) - dim * math.log(256), rtol=1e-10)


def test_training_objective_is_bits_per_dim_plus_the_penalties():
    """RNODE trains images on bits/dim plus λ·penalties (its image code); in nats per image
    the same λ would weigh D·log 2 times less. The loss of a batch of levels equals the
    per-dimension conversion of the multiscale loss on the same noise and probes."""
    torch = pytest.importorskip("torch")
    from otflow.training.image_model import ImageTrainingLoss
    from otflow.training.options import FitOptions

    b = otflow.get_backend("torch")
    cpu = b.device("cpu")
    fields, params = _model(b, cpu)
    opts = FitOptions.from_mapping(dict(lambda_kinetic=0.3, lambda_jacobian=0.2, method="rk4", steps=2,
                                        standardize=False))
    loss_fn = ImageTrainingLoss(SPEC, fields, opts, b, n_levels=17)
    levels = b.asarray(np.random.default_rng(4).integers(0, 17, (5, *SPEC.image_shape)).astype(np.float64),
                       device=cpu)
    key = b.key(9)
    loss, aux = loss_fn({"fields": params}, levels, key)
    noise_key, probe_key = b.split(key, 2)
    y = (levels + b.uniform(noise_key, tuple(levels.shape), dtype=torch.float64, device=cpu)) / 17
    out = multiscale_rnode_loss(SPEC, fields, params, y, loss_fn.probes(probe_key, 5, torch.float64, cpu), T=1.0,
                                backend=b, solver_kwargs=dict(method="rk4", n_steps=2))
    dim = math.prod(SPEC.image_shape)
    bpd = (_np(b, out.nll) / dim + math.log(17)) / math.log(2)
    np.testing.assert_allclose(_np(b, aux["nll"]), bpd, rtol=1e-12)
    np.testing.assert_allclose(_np(b, loss), bpd + 0.3 * _np(b, out.kinetic) + 0.2 * _np(b, out.jacobian), rtol=1e-12)


def test_fit_on_images_lowers_the_loss_on_learnable_images():
    pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 2, (64, 1, 1, 1)) * 200 + 20 + rng.integers(0, 3, (64, 1, 4, 4))).astype(np.uint8)
    flow = otflow.fit(x, backend="torch", max_iters=30, lr=1e-2, val_fraction=0.0, **TINY)
    losses = [r["loss"] for r in flow.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses


def test_resumed_image_run_equals_uninterrupted(tmp_path):
    pytest.importorskip("torch")
    x = _images()
    common = dict(backend="torch", val_fraction=0.25, **TINY)
    whole = otflow.fit(x, max_iters=4, **common)
    ck = tmp_path / "ck.safetensors"
    otflow.fit(x, max_iters=2, checkpoint=ck, checkpoint_every=2, **common)
    resumed = otflow.fit(x, resume=ck, max_iters=4, **{k: v for k, v in common.items() if k != "quiet"})
    for a, b in zip(whole.backend.tree_leaves(whole.params), resumed.backend.tree_leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["loss"] for r in whole.history] == [r["loss"] for r in resumed.history]
    assert whole.history[-1]["val_bpd"] == resumed.history[-1]["val_bpd"]


@pytest.mark.slow
def test_fit_on_images_on_jax_compiles_once_and_matches_torch_at_the_start():
    pytest.importorskip("jax")
    x = _images()
    flows = {name: otflow.fit(x, backend=name, max_iters=3, val_fraction=0.25, **TINY) for name in ("torch", "jax")}
    first = [flows[name].history[0]["loss"] for name in ("torch", "jax")]
    assert all(math.isfinite(v) for v in first)
    assert max(r["sec"] for r in flows["jax"].history[2:]) < 1.0  # no compilation after the first steps
    assert math.isfinite(flows["jax"].history[-1]["val_bpd"])


# ------------------------------------------------------------------------------------------
# the command line and the picture


def _write_idx(path, images):
    header = (0x00000803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.astype(np.uint8).tobytes())


def test_cli_fits_an_idx_file_reports_bits_per_dim_and_samples_and_plots(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from otflow.training.cli import main

    data = tmp_path / "mnist"
    data.mkdir()
    _write_idx(data / "train-images-idx3-ubyte.gz", _images(24))
    _write_idx(data / "t10k-images-idx3-ubyte.gz", _images(5, seed=1))
    model = tmp_path / "model.safetensors"
    flags = ["--max-iters", "2", "--batch-size", "8", "--steps", "2", "--blocks-per-scale", "1", "--n-scales", "2",
             "--eval-every", "2", "--set", "hidden=[8]", "--quiet"]
    assert main(["fit", str(data), "-o", str(model), "--backend", "torch", *flags]) == 0
    out = capsys.readouterr().out
    assert "held-out bits/dim (standard: uniform dequantization, exact trace) on 5 test images (256 levels)" in out
    flow = otflow.load(model)
    assert isinstance(flow, otflow.cnf.MultiscaleFlow)
    printed = float(out.split("(256 levels): ")[1].split(" ±")[0])
    np.testing.assert_allclose(printed, flow.bits_per_dim(_images(5, seed=1), n_bins=256).mean, atol=1e-4)

    single = tmp_path / "train-images-idx3-ubyte.gz"  # one file: no test part, so the validation number
    _write_idx(single, _images(24))
    assert main(["fit", str(single), "-o", str(tmp_path / "m2.safetensors"), "--backend", "torch", *flags]) == 0
    assert "on the validation split" in capsys.readouterr().out

    samples = tmp_path / "samples.npy"
    assert main(["sample", str(model), "-n", "3", "-o", str(samples)]) == 0
    drawn = np.load(samples)
    assert drawn.dtype == np.uint8 and drawn.shape == (3, 1, 4, 4)
    png = tmp_path / "grid.png"
    assert main(["plot", str(model), "--data", str(data), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_image_grid_places_each_image():
    from otflow.training.plotting import image_grid

    images = np.arange(5 * 4).reshape(5, 1, 2, 2).astype(np.uint8)
    grid = image_grid(images, columns=3, n_levels=20)
    assert grid.shape == (2 * 3 + 1, 3 * 3 + 1)
    np.testing.assert_allclose(grid[4:6, 1:3], images[3, 0] / 19)  # row 1, column 0
    assert grid[0].min() == 1.0  # the padding is white


def test_digits_train_and_validate_with_17_levels(monkeypatch):
    pytest.importorskip("torch")
    from otflow.training import datasets

    pixels = np.random.default_rng(0).integers(0, 17, (20, 64)).astype(np.float64)
    monkeypatch.setattr(datasets._images, "_sklearn_digits", lambda: (pixels, np.zeros(20, np.int64)))
    flow = otflow.fit("digits-images", backend="torch", max_iters=2, val_fraction=0.25, seed=1,
                      **(TINY | {"n_scales": 1}))
    val = pixels.reshape(20, 1, 8, 8)[np.random.default_rng(1).permutation(20)[:5]].astype(np.uint8)
    again = flow.bits_per_dim(val, seed=0, n_bins=17)
    np.testing.assert_allclose(flow.history[-1]["val_bpd"], again.mean, rtol=1e-10)
    assert flow.fit_info["options"]["eval_estimator"] == "exact"  # 64 values per image


def test_large_images_are_validated_with_hutchinson_by_default():
    from otflow.training.data import EXACT_TRACE_MAX_DIM, image_eval_estimator
    from otflow.training.options import FitOptions

    assert EXACT_TRACE_MAX_DIM == 256
    assert image_eval_estimator(FitOptions(), 256) == "exact"
    assert image_eval_estimator(FitOptions(), 28 * 28) == "hutchinson"
    assert image_eval_estimator(FitOptions(eval_estimator="exact"), 28 * 28) == "exact"
    with pytest.raises(ValueError, match="eval_estimator"):
        FitOptions(eval_estimator="hutch")
