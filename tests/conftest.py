"""Test configuration: hypothesis profiles, float64 for JAX, and the backend fixtures.

Backends
--------
Tests ask for a backend by fixture name; ``pytest_generate_tests`` parametrizes them
over the entries of :class:`BackendId` (the array-api-extra / scikit-learn pattern):

``backend``           every entry: numpy, array_api_strict, torch, torch:gpu, jax, jax:gpu
``autodiff_backend``  the entries whose framework differentiates: torch, torch:gpu, jax, jax:gpu
``device``            the device the current entry computes on (``backend.device("cpu")``,
                      or ``backend.device("gpu")`` for a ``:gpu`` entry); create arrays there
``backend_id``        the :class:`BackendId` itself

``backend`` and ``autodiff_backend`` yield the object ``otflow.get_backend(name)``
returns (the CPU and GPU entries share it; only ``device`` differs). An entry is
skipped, with the reason, when its framework is not installed, or for a ``:gpu``
entry when the framework sees no GPU. When the framework *is* installed, a backend
that fails to load is an error, not a skip.

Select entries with the environment variable ``OTFLOW_TEST_BACKENDS``, a comma-separated
list of entry names, e.g. ``OTFLOW_TEST_BACKENDS=numpy,torch pytest``. Unset means every
CPU entry, plus the ``:gpu`` entries when the machine has a GPU device node (a probe that
imports nothing; on a CPU-only machine they would only add one skip per test). A ``:gpu``
entry named explicitly is always collected, and skipped if its framework sees no GPU.

Hypothesis
----------
Profiles ``ci`` (derandomized, 25 examples, no deadline) and ``dev`` (300 examples, no
deadline). ``HYPOTHESIS_PROFILE`` names the profile explicitly; otherwise ``ci`` is loaded
(whether or not ``CI`` is set), so a plain local run is as reproducible as CI.
"""
from __future__ import annotations

import difflib
import enum
import glob
import os

import pytest
from hypothesis import settings

from _helpers import framework_installed, gpu_present

# ---- hypothesis ---------------------------------------------------------------------------
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=300, print_blob=True)
_HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE") or "ci"
settings.load_profile(_HYPOTHESIS_PROFILE)

# ---- JAX computes in float64 in the tests (only if JAX is installed; never import it otherwise)
if framework_installed("jax"):
    import jax

    jax.config.update("jax_enable_x64", True)

# ---- torch on one intra-op thread: the tests' matrices are small, and on 2 shared cores torch's
# default of one thread per core loses 5-50x to contention with XLA's threads (measured: a fit
# iteration took 0.023 s on one thread and 0.1-1.3 s on two under load)
if framework_installed("torch"):
    import torch

    torch.set_num_threads(int(os.environ.get("OTFLOW_TEST_TORCH_THREADS", "1")))


# ---- backend entries -----------------------------------------------------------------------
class BackendId(enum.Enum):
    """A backend entry of the test matrix: a registry name plus, optionally, ``:gpu``."""

    NUMPY = "numpy"
    ARRAY_API_STRICT = "array_api_strict"
    TORCH = "torch"
    TORCH_GPU = "torch:gpu"
    JAX = "jax"
    JAX_GPU = "jax:gpu"

    @property
    def backend_name(self) -> str:
        """The name given to ``otflow.get_backend``."""
        return self.value.split(":")[0]

    @property
    def framework(self) -> str:
        """The module that must be installed for this entry to run."""
        return self.backend_name

    @property
    def on_gpu(self) -> bool:
        return self.value.endswith(":gpu")

    @property
    def differentiates(self) -> bool:
        """Whether the entry belongs to ``autodiff_backend``'s parametrization."""
        return self.backend_name in ("torch", "jax")

    def __str__(self) -> str:
        return self.value


_ENV_VAR = "OTFLOW_TEST_BACKENDS"


def _gpu_device_nodes() -> bool:
    """A cheap probe, importing nothing: does this machine expose a GPU device node?"""
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))


def _selected_backends() -> list[BackendId]:
    raw = os.environ.get(_ENV_VAR, "").strip()
    if not raw:
        # every CPU entry; the :gpu entries only where a GPU device exists (they are then
        # skipped if the framework cannot use it). Name them in OTFLOW_TEST_BACKENDS to force them.
        gpu = _gpu_device_nodes()
        return [b for b in BackendId if gpu or not b.on_gpu]
    by_name = {b.value: b for b in BackendId}
    chosen: list[BackendId] = []
    for name in (s.strip() for s in raw.split(",")):
        if not name:
            continue
        if name not in by_name:
            close = difflib.get_close_matches(name, list(by_name), n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise pytest.UsageError(
                f"{_ENV_VAR}: unknown backend {name!r}.{hint} Valid: {', '.join(by_name)}."
            )
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    return chosen


SELECTED_BACKENDS: list[BackendId] = list(BackendId)


def pytest_configure(config):
    global SELECTED_BACKENDS
    SELECTED_BACKENDS = _selected_backends()


def pytest_report_header(config):
    if os.environ.get(_ENV_VAR):
        how = f"from {_ENV_VAR}"
    elif _gpu_device_nodes():
        how = f"default; select with {_ENV_VAR}=name,..."
    else:
        how = f"default, no GPU device found so no :gpu entries; select with {_ENV_VAR}=name,..."
    return [
        f"otflow backends: {', '.join(map(str, SELECTED_BACKENDS)) or '(none)'} ({how})",
        f"hypothesis profile: {_HYPOTHESIS_PROFILE}",
    ]


def _explicitly_parametrized(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if name in argnames:
            return True
    return False


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "backend_id" not in names or _explicitly_parametrized(metafunc, "backend_id"):
        return
    if "autodiff_backend" in names:
        entries = [b for b in SELECTED_BACKENDS if b.differentiates]
    else:
        entries = list(SELECTED_BACKENDS)
    metafunc.parametrize(
        "backend_id", [pytest.param(b, id=b.value) for b in entries], indirect=True, scope="session"
    )


def _load_backend(backend_id: BackendId):
    import otflow

    if not framework_installed(backend_id.framework):
        pytest.skip(f"{backend_id.framework} is not installed")
    if backend_id.on_gpu and not gpu_present(backend_id.framework):
        pytest.skip(f"{backend_id}: {backend_id.framework} sees no GPU")
    try:
        return otflow.get_backend(backend_id.backend_name)
    except Exception as e:  # the framework is installed: a backend that cannot load is a bug
        raise RuntimeError(
            f"backend {backend_id.backend_name!r} failed to load although {backend_id.framework} is "
            f"installed: {type(e).__name__}: {e}"
        ) from e


@pytest.fixture(scope="session")
def backend_id(request) -> BackendId:
    """The backend entry under test (parametrized by ``pytest_generate_tests``)."""
    return request.param


@pytest.fixture(scope="session")
def backend(backend_id):
    """The ``otflow.Backend`` of the current entry (every backend)."""
    return _load_backend(backend_id)


@pytest.fixture(scope="session")
def autodiff_backend(backend_id):
    """The ``otflow.Backend`` of the current entry, restricted to torch and jax."""
    b = _load_backend(backend_id)
    assert b.has_autodiff, f"{b!r} is parametrized as an autodiff backend but has_autodiff is False"
    return b


@pytest.fixture(scope="session")
def device(backend_id, backend):
    """The device the current entry computes on: pass it to ``asarray`` and the draws."""
    return backend.device("gpu" if backend_id.on_gpu else "cpu")


@pytest.fixture
def wrap_trainer():
    """``wrap_trainer(name, wrap)``: otflow.fit's trainers on backend ``name`` become ``wrap(trainer)``
    for this test (through ``otflow.training.register_trainer``)."""
    saved = {}

    def install(name, wrap):
        from otflow.training import register_trainer, trainer_factory

        original = saved.setdefault(name, trainer_factory(name))
        register_trainer(name, lambda *args: wrap(original(*args)))

    yield install
    from otflow.training import register_trainer

    for name, factory in saved.items():
        register_trainer(name, factory)
