"""The :class:`MultiscaleFlow`: FFJORD's multiscale image model as a flow object.

FFJORD (Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, ICLR 2019) and RNODE (Finlay,
Jacobsen, Nurbekyan & Oberman, ICML 2020) model images with the logit transform, CNF
blocks on ``(C, H, W)`` states, squeezes and factor-outs (:mod:`.multiscale`). A
:class:`MultiscaleFlow` holds such a model — its :class:`~otflow.cnf.MultiscaleSpec`, one
velocity field and one parameter tree per block, the end times — and evaluates it like a
:class:`~otflow.Flow`: chunked, compiled once per kind with the parameters and end times as
arguments (so :meth:`~MultiscaleFlow.with_parameters` never recompiles), the same
``on_failure`` and ``output`` conventions, the same file format and :func:`otflow.load`.
It adds what images need: bits per dimension (:meth:`~MultiscaleFlow.bits_per_dim`, the
standard number, and :meth:`~MultiscaleFlow.midpoint_bits_per_dim`, RNODE's own) and
integer samples (:meth:`~MultiscaleFlow.sample_levels`).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Sequence

import numpy as np

from ..base import Backend, CapabilityError, default_backend, get_backend
from ..base.options import reject_unknown_keywords, unknown_option_message
from ..ode.integrate import odeint, raise_for_status
from .conv_field import ConvField
from .divergence import PROBES
from .dynamics import flow_rhs
from .fields import field_from_config
from .flow import _EXACT_TRACE_BUDGET, SolverOptions, _check_output, _EvaluatedBlocks
from .image import dequantized_bits_per_dim, logit_inverse, midpoint_bits_per_dim
from .multiscale import (FACTOR_OUT, SQUEEZE, MultiscaleSpec, _check_model, run_inverse, run_log_prob, run_transform,
                         split_channels, squeeze, to_image_layout)
from .objective import logit_transform
from .serialize import ModelFileError, fill_tree

__all__ = ["MultiscaleFlow", "BitsPerDim", "multiscale_flow_from_header", "EVAL_ESTIMATORS", "TRAJECTORY_SPACES"]

#: how :meth:`MultiscaleFlow.log_prob` takes the divergence: the exact trace, or one
#: Hutchinson probe per image and block (for images too big for the exact trace)
EVAL_ESTIMATORS = ("exact", "hutchinson")
#: the coordinates :meth:`MultiscaleFlow.trajectory` returns
TRAJECTORY_SPACES = ("pixels", "logit")


class BitsPerDim(NamedTuple):
    """Bits per dimension of a set of images (a named tuple)."""

    mean: float
    """The mean over the images."""
    standard_error: float
    """The standard error of ``mean`` over the images (sample standard deviation with
    ``ddof=1`` over ``√N``; NaN for a single image). With the exact trace it is the spread
    of the data and the dequantization noise; with the Hutchinson estimator it also holds
    the estimator's error (each image has its own probes)."""
    per_image: np.ndarray
    """The number of every image, a numpy array ``(N,)``."""


def _bits_summary(per_image) -> BitsPerDim:
    per_image = np.asarray(per_image, dtype=np.float64)
    n = per_image.shape[0]
    se = float(np.std(per_image, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return BitsPerDim(float(np.mean(per_image)), se, per_image)


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class MultiscaleFlow(_EvaluatedBlocks):
    """FFJORD's multiscale image flow (Grathwohl et al. 2019), as RNODE trains it (Finlay
    et al. 2020): the logit transform, then the blocks, squeezes and factor-outs of ``spec``.

    Pixels ``y`` are floats in ``[0, 1]`` (dequantized ``(x + u)/256``); :meth:`log_prob`
    is their density with every log-determinant, the logit transform's included. The
    latent (:meth:`transform`, :meth:`inverse`) is ODENVP's: the factored-out parts
    flattened and concatenated, ``(N, D)``, standard normal under the model.

    Evaluation uses the evaluation solver and, by default, the exact trace (no estimator
    error). It is not differentiable; for training use the RNODE objective. On compiling
    backends every evaluation kind is compiled once and takes the parameters and the end
    times as arguments, so :meth:`with_parameters` copies reuse it.

    :param spec: the architecture (:class:`~otflow.cnf.MultiscaleSpec`).
    :param params: one parameter tree per block (``spec.init(...)``).
    :param backend: the backend (name or object); it needs a convolution (torch or JAX)
        for the default conv fields.
    :param device: where it computes (the backend's default when None).
    :param dtype: the floating dtype of the computation.
    :param T: the integration time of every block: a float, or one per block (``spec.n_blocks``).
    :param eval_solver: the solver for evaluation (default: Dormand–Prince, rtol = atol = 1e-5).
    :param output: ``"numpy"`` (default) or ``"native"`` (the backend's arrays), as for
        :class:`~otflow.Flow`.
    :param fields: one velocity field per block whose ``event_shape`` is the block's
        (default: ``spec.fields()``, FFJORD's conv fields).
    :raises TypeError: for a ``spec`` that is no :class:`~otflow.cnf.MultiscaleSpec`, or a bad ``eval_solver``.
    :raises ValueError: for fields or parameters that do not fit the spec, a bad ``T`` or ``output``.
    :raises CapabilityError: for conv fields on a backend without a convolution.
    """

    history: list[dict] | None
    """The training record :func:`otflow.fit` attaches (one dict per iteration); None
    for a flow not made by ``fit``."""

    fit_info: dict | None
    """What :func:`otflow.fit` reports about the run; None for a flow not made by ``fit``."""

    last_nfe: int | None
    """Right-hand-side evaluations of the last evaluation call (all chunks and blocks);
    None before the first."""

    def __init__(self, spec: MultiscaleSpec, params: Sequence, *, backend: str | Backend, device=None,
                 dtype="float32", T: float | Sequence[float] = 1.0, eval_solver: SolverOptions | None = None,
                 output: str = "numpy", fields: Sequence | None = None):
        if not isinstance(spec, MultiscaleSpec):
            raise TypeError(f"spec must be an otflow.cnf.MultiscaleSpec, got {type(spec).__name__}")
        self.spec = spec
        self.backend = get_backend(backend)
        self.fields = tuple(spec.fields() if fields is None else fields)
        if not self.backend.has_conv and any(isinstance(f, ConvField) for f in self.fields):
            raise CapabilityError(f"a MultiscaleFlow with conv fields needs a 2-D convolution, which the "
                                  f"{self.backend.name!r} backend does not provide; use backend='torch' or "
                                  "backend='jax' (pip install 'otflow[torch]' or 'otflow[jax]')")
        self.params = self._block_params(params)
        _check_model(spec, self.fields, self.params)
        self.event_shape = spec.image_shape
        self._set_evaluation(dtype, device, T, eval_solver, output)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return self.spec.image_shape

    @property
    def n_blocks(self) -> int:
        """The number of CNF blocks."""
        return self.spec.n_blocks

    def __repr__(self) -> str:
        return (f"MultiscaleFlow(image_shape={self.image_shape}, n_scales={self.spec.n_scales}, "
                f"blocks={self.n_blocks}, T={self.T}, backend={self.backend.name!r}, dtype={self.dtype}, "
                f"output={self.output!r})")

    # ---------------------------------------------------------------------------------------
    # the chunk functions

    def _chunk_function(self, kind: str, block_kwargs):
        block_kwargs = tuple({k: v for k, v in kw.items() if k != "backend"} for kw in block_kwargs)
        return functools.partial(_CHUNKS[kind], self.spec, self.fields, self.backend, block_kwargs)

    def _default_batch_size(self, kind: str, n: int) -> int:
        """Rows per chunk: the exact trace runs ``D`` VJPs of every row at once through fields
        ``w`` channels wide, so ``D·rows·D·w`` is kept under 2²⁵; other kinds ``D·rows·w``."""
        width = max((*getattr(self.spec, "widths", ()), self.image_shape[0]))
        per_row = self.dim * width * (self.dim if kind == "log_prob" else 1)
        return max(1, min(n, _EXACT_TRACE_BUDGET // per_row))

    # ---------------------------------------------------------------------------------------
    # inputs

    def _pixels(self, y, name: str = "y"):
        """Float pixels in ``[0, 1]``, shape ``(N, C, H, W)``, on the flow's backend."""
        b = self.backend
        dtype = getattr(y, "dtype", None)
        integer = (isinstance(y, np.ndarray) and y.dtype.kind in "biu") or (
            b.owns(y) and not b.namespace().isdtype(dtype, ("real floating", "complex floating")))
        if integer:
            raise TypeError(f"{name} must be float pixels in [0, 1] (dequantized levels, (x + u)/256), got integer "
                            f"dtype {dtype}; for integer levels use flow.bits_per_dim(levels) or dequantize them "
                            "first (otflow.dequantize)")
        yb = self._input(y, name)
        xp = b.namespace()
        if b.is_concrete(yb) and not bool(xp.all((yb >= 0) & (yb <= 1))):
            raise ValueError(f"{name} must be pixels in [0, 1] (dequantized levels (x + u)/256), got values in "
                             f"[{float(xp.min(yb)):.4g}, {float(xp.max(yb)):.4g}]; divide 8-bit images by 256 "
                             "after adding the noise, or pass the integer levels to flow.bits_per_dim")
        return yb

    def _levels(self, levels, n_bins: int):
        """Integer levels ``(N, C, H, W)`` (or ``(N, H, W)`` for one channel) as a floating
        array of the flow's backend."""
        n_bins = _positive_int(n_bins, "n_bins")
        b = self.backend
        host = b.to_numpy(levels) if b.owns(levels) else levels
        try:
            host = np.asarray(host)
        except Exception as e:
            raise TypeError(f"levels could not be read as an array ({type(e).__name__}: {e})") from None
        if host.dtype.kind not in "biuf":
            raise TypeError(f"levels must be integer pixel levels (uint8 images), got dtype {host.dtype}")
        if host.ndim == 3 and self.image_shape[0] == 1:
            host = host[:, None, :, :]
        if host.ndim != 4 or tuple(host.shape[1:]) != self.image_shape:
            raise ValueError(f"levels must have shape (N, {', '.join(map(str, self.image_shape))})"
                             f"{' or (N, H, W)' if self.image_shape[0] == 1 else ''}, got {tuple(np.shape(levels))}")
        if host.shape[0] == 0:
            raise ValueError("levels is empty")
        values = host.astype(np.float64)
        if not np.all(np.isfinite(values)) or np.any(values != np.floor(values)):
            raise ValueError("levels must be whole numbers (integer pixel levels 0 … n_bins−1); for float pixels in "
                             "[0, 1] use flow.log_prob")
        if values.min() < 0 or values.max() > n_bins - 1:
            raise ValueError(f"levels must lie in 0 … {n_bins - 1} (n_bins={n_bins}), got values in "
                             f"[{values.min():g}, {values.max():g}]")
        return b.asarray(values, dtype=self.dtype, device=self.device)

    def _probe_source(self, estimator: str, probe: str, seed: int):
        """``extra`` for :meth:`_run_chunked`: one probe per block for each chunk (Hutchinson)."""
        if not isinstance(estimator, str) or estimator not in EVAL_ESTIMATORS:
            raise ValueError(unknown_option_message("estimator", str(estimator), EVAL_ESTIMATORS))
        if not isinstance(probe, str) or probe not in PROBES:
            raise ValueError(unknown_option_message("probe", str(probe), PROBES))
        if estimator == "exact":
            return None
        b = self.backend
        draw = b.rademacher if probe == "rademacher" else b.normal

        def probes(index, rows):
            chunk_key = b.split(b.key(int(seed)), index + 1)[index]
            return (tuple(draw(k, (rows, *shape), dtype=self.dtype, device=self.device)
                          for k, shape in zip(b.split(chunk_key, self.n_blocks), self.spec.block_shapes())),)

        return probes

    def _log_prob_of_pixels(self, yb, batch_size, on_failure, estimator, probe, seed):
        extra = self._probe_source(estimator, probe, seed)
        kind = "log_prob" if extra is None else "log_prob_hutchinson"
        return self._run_chunked(kind, yb, batch_size, on_failure, extra)

    # ---------------------------------------------------------------------------------------
    # densities

    @reject_unknown_keywords
    def log_prob(self, y, *, batch_size: int | None = None, on_failure: str = "raise", estimator: str = "exact",
                 probe: str = "rademacher", seed: int = 0):
        """``log p(y)`` per image, in nats: logit transform (its log-determinant included),
        the blocks with the evaluation solver, squeezes, factor-outs, and the standard normal
        density of every factored-out part.

        :param y: pixels in ``[0, 1]``, shape ``(N, C, H, W)``: a numpy array or an array of
            the backend (dequantized levels ``(x + u)/256``; for integer levels use
            :meth:`bits_per_dim`).
        :param batch_size: images per chunk (default: as many as keep the exact trace's
            vectorized VJPs under 2²⁵ elements of the widest layer).
        :param on_failure: ``"raise"`` (a :class:`~otflow.SolverError` naming remedies) or
            ``"nan"`` (NaN, with a warning, for the images whose solve fails).
        :param estimator: ``"exact"`` (default): the trace of the Jacobian, no estimator
            error; ``"hutchinson"``: one probe per image and block, fixed over the solve
            (FFJORD's estimate), an unbiased estimate of ``log p(y)`` for images too large
            for the exact trace.
        :param probe: the Hutchinson probe, ``"rademacher"`` or ``"gaussian"``.
        :param seed: seeds the Hutchinson probes (they depend on ``seed`` and the chunking).
        :returns: shape ``(N,)``, in the flow's :attr:`output` type.
        :raises TypeError: for integer pixels.
        :raises ValueError: for pixels outside ``[0, 1]`` or of the wrong shape, an unknown
            estimator or probe.
        """
        yb = self._pixels(y)
        return self._output(self._log_prob_of_pixels(yb, batch_size, on_failure, estimator, probe, seed))

    @reject_unknown_keywords
    def bits_per_dim(self, levels, *, seed: int = 0, n_bins: int = 256, batch_size: int | None = None,
                     estimator: str = "exact", probe: str = "rademacher") -> BitsPerDim:
        """The standard bits per dimension (FFJORD's and RNODE's tables):
        ``−(log p(y) − D·log n_bins)/(D·log 2)`` at uniformly dequantized pixels
        ``y = (x + u)/n_bins``, ``u ~ U[0, 1)^D``
        (:func:`~otflow.cnf.image.dequantized_bits_per_dim`).

        The noise is ``otflow.dequantize(backend.key(seed), x, n_bins=n_bins)``: the same
        seed gives the same number. With the default exact trace no estimator error
        enters; the standard error is the one over images (data and dequantization noise).
        RNODE's own evaluation is :meth:`midpoint_bits_per_dim`, a different number.

        :param levels: integer levels ``0 … n_bins−1``, shape ``(N, C, H, W)`` (or
            ``(N, H, W)`` for one channel): uint8 images, any integer or whole-valued array.
        :param seed: seeds the dequantization noise (and, with ``"hutchinson"``, the probes
            from ``seed + 1``).
        :param n_bins: the number of levels (256 for 8-bit images).
        :param batch_size: images per chunk, as for :meth:`log_prob`.
        :param estimator: ``"exact"`` or ``"hutchinson"``, as for :meth:`log_prob`; with
            ``"hutchinson"`` the standard error includes the estimator's error.
        :param probe: the Hutchinson probe.
        :returns: a :class:`BitsPerDim` ``(mean, standard_error, per_image)``.
        :raises ValueError: for levels that are not whole numbers in ``0 … n_bins−1`` or of
            the wrong shape.
        """
        xb = self._levels(levels, n_bins)
        b = self.backend

        def log_prob(y):
            return self._log_prob_of_pixels(y, batch_size, "raise", estimator, probe, seed + 1)

        per_image = dequantized_bits_per_dim(log_prob, b.key(int(seed)), xb, n_bins=n_bins, backend=b)
        return _bits_summary(b.to_numpy(per_image))

    @reject_unknown_keywords
    def midpoint_bits_per_dim(self, levels, *, n_bins: int = 256, batch_size: int | None = None) -> BitsPerDim:
        """RNODE's evaluation number (Finlay et al. 2020): the bits-per-dimension formula at the
        bin midpoints ``y = (x + ½)/n_bins``, no noise, exact trace
        (:func:`~otflow.cnf.image.midpoint_bits_per_dim`). Deterministic but not a bound on
        the discrete model's bits per dimension, so it is not comparable with
        :meth:`bits_per_dim`; report it under its own name.

        :param levels: integer levels, as for :meth:`bits_per_dim`.
        :param n_bins: the number of levels.
        :param batch_size: images per chunk.
        :returns: a :class:`BitsPerDim` (its standard error is over images only).
        """
        xb = self._levels(levels, n_bins)

        def log_prob(y):
            return self._log_prob_of_pixels(y, batch_size, "raise", "exact", "rademacher", 0)

        return _bits_summary(self.backend.to_numpy(midpoint_bits_per_dim(log_prob, xb, n_bins=n_bins)))

    # ---------------------------------------------------------------------------------------
    # transport

    @reject_unknown_keywords
    def transform(self, y, *, batch_size: int | None = None, on_failure: str = "raise"):
        """Pixels → latent: the logit transform, the blocks, and the factored-out parts
        flattened and concatenated (ODENVP's layout).

        :param y: pixels in ``[0, 1]``, shape ``(N, C, H, W)``.
        :param batch_size: images per chunk.
        :param on_failure: as for :meth:`log_prob`.
        :returns: ``z``, shape ``(N, D)``, in the flow's :attr:`output` type.
        """
        return self._output(self._run_chunked("transform", self._pixels(y), batch_size, on_failure))

    @reject_unknown_keywords
    def inverse(self, z, *, batch_size: int | None = None, on_failure: str = "raise"):
        """Latent → pixels, the inverse of :meth:`transform`: the blocks integrated from their
        ``T`` back to 0 in reverse order, unsqueezes and merges, then the inverse logit.

        :param z: latents, shape ``(N, D)``.
        :param batch_size: images per chunk.
        :param on_failure: as for :meth:`log_prob`.
        :returns: pixels ``(N, C, H, W)`` in the flow's :attr:`output` type; inside
            ``(−α/(1−2α), (1−α)/(1−2α))``, which is ``(0, 1)`` widened by the logit margin α.
        """
        zb = self._input(z, "z", (self.dim,))
        return self._output(self._run_chunked("inverse", zb, batch_size, on_failure))

    def _sample_pixels(self, n, seed, batch_size):
        n = _positive_int(n, "n")
        b = self.backend
        z = b.normal(b.key(int(seed)), (n, self.dim), dtype=self.dtype, device=self.device)
        y = self._run_chunked("inverse", z, batch_size, "raise")
        return b.namespace().clip(y, 0.0, 1.0)

    @reject_unknown_keywords
    def sample(self, n: int, *, seed: int = 0, batch_size: int | None = None):
        """``n`` images: standard normal latents through :meth:`inverse`, clipped to
        ``[0, 1]`` (the logit margin α lets the inverse logit overshoot by at most
        ``α/(1−2α)``).

        :param n: the number of images.
        :param seed: seeds the latents (the same seed gives the same images).
        :param batch_size: images per chunk.
        :returns: float pixels, shape ``(n, C, H, W)``, in the flow's :attr:`output` type.
        :raises ValueError: for ``n`` not a positive int.
        """
        return self._output(self._sample_pixels(n, seed, batch_size))

    @reject_unknown_keywords
    def sample_levels(self, n: int, *, seed: int = 0, n_bins: int = 256, batch_size: int | None = None):
        """``n`` images as integer levels: ``floor(y·n_bins)`` of :meth:`sample`'s pixels,
        clipped to ``0 … n_bins−1`` (the same seed gives the images of :meth:`sample`).

        :param n: the number of images.
        :param seed: seeds the latents.
        :param n_bins: the number of levels; at most 256 (the levels are uint8).
        :param batch_size: images per chunk.
        :returns: uint8 levels ``(n, C, H, W)``: a numpy array, or with ``output="native"``
            the backend's array.
        :raises ValueError: for ``n`` or ``n_bins`` out of range.
        """
        n_bins = _positive_int(n_bins, "n_bins")
        if n_bins > 256:
            raise ValueError(f"sample_levels returns uint8 levels, so n_bins must be at most 256, got {n_bins}")
        y = self.backend.to_numpy(self._sample_pixels(n, seed, batch_size)).astype(np.float64)
        levels = np.clip(np.floor(y * n_bins), 0, n_bins - 1).astype(np.uint8)
        if self.output == "numpy":
            return levels
        return self.backend.namespace().asarray(levels, device=self.device)

    @reject_unknown_keywords
    def trajectory(self, y, times: Sequence[float], *, space: str = "pixels"):
        """The images along the flow from pixels ``y``.

        The blocks run one after the other, so time runs over ``[0, ΣT]``: block ``k`` covers
        ``[T₀ + … + T_{k−1}, T₀ + … + T_k]``. At every time the state is put back in the
        image's ``(C, H, W)`` layout: the squeezes before it are undone and the parts
        factored out so far (which stay where they left) are merged back in. Time 0 is the
        logit of ``y``; time ``ΣT`` is the latent of :meth:`transform` in image layout.

        :param y: pixels in ``[0, 1]``, shape ``(N, C, H, W)``.
        :param times: increasing times in ``[0, ΣT]``.
        :param space: ``"pixels"`` (default): the states through the inverse logit, so
            time 0 returns ``y`` and every frame can be shown as an image; ``"logit"``: the
            flow's own coordinates.
        :returns: shape ``(len(times), N, C, H, W)``, in the flow's :attr:`output` type.
        :raises ValueError: for times that do not increase within ``[0, ΣT]``, or an unknown space.
        :raises SolverError: when a solve fails.
        """
        if not isinstance(space, str) or space not in TRAJECTORY_SPACES:
            raise ValueError(unknown_option_message("space", str(space), TRAJECTORY_SPACES))
        yb = self._pixels(y)
        times = np.asarray(times, dtype=np.float64)
        total = sum(self.T)
        if times.ndim != 1 or times.size == 0 or np.any(np.diff(times) <= 0) or times[0] < 0 or times[-1] > total:
            raise ValueError(f"times must increase within [0, {total:g}], got {times}")
        b, xp = self.backend, self.backend.namespace()
        kws = tuple({k: v for k, v in kw.items() if k != "backend"} for kw in self._block_solve_kwargs())
        params, yb = b.stop_gradient((self.params, yb))
        z, factored, offset, found = logit_transform(yb, alpha=self.spec.alpha)[0], [], 0.0, {}
        for position, step in enumerate(self.spec.steps()):
            if step == SQUEEZE:
                z = squeeze(z)
                continue
            if step == FACTOR_OUT:
                z, part = split_channels(z)
                factored.append(part)
                continue
            T = self.T[step]
            local = [float(t - offset) for t in times if offset - 1e-12 <= t <= offset + T + 1e-12]
            grid = sorted(set([0.0, *[min(max(t, 0.0), T) for t in local], T]))
            sol = odeint(flow_rhs(self.fields[step]), z, grid, args=params[step], backend=b, **kws[step])
            raise_for_status(sol, b, max_steps=self.eval_solver.max_steps)
            for t in local:
                state = sol.ys[grid.index(min(max(t, 0.0), T)), ...]
                found.setdefault(round(t + offset, 12), to_image_layout(self.spec, state, factored, position))
            z = sol.ys[-1, ...]
            offset += T
        frames = xp.stack([found[round(float(t), 12)] for t in times])
        if space == "pixels":
            frames = logit_inverse(frames, alpha=self.spec.alpha)
        return self._output(frames)

    # ---------------------------------------------------------------------------------------
    # saving

    def header(self) -> dict:
        """The JSON description saved with the parameters: kind ``"multiscale"``, the spec's
        configuration, the fields, ``T``, the dtype and the evaluation solver.

        :raises ValueError: when a field or the evaluation solver is user-defined.
        """
        b = self.backend
        dtype_name = np.dtype(b.to_numpy(b.namespace().zeros((), dtype=self.dtype)).dtype).name
        return {
            "kind": "multiscale",
            "spec": self.spec.config(),
            "fields": [f.config() for f in self.fields],
            "T": list(self.T),
            "dtype": dtype_name,
            "eval_solver": self.eval_solver.config(),
        }


# ------------------------------------------------------------------------------------------
# the chunk functions: fn(params, T, x, *extra) -> (out, status, nfe), compiled by the flow


def _log_prob_chunk(spec, fields, backend, block_kwargs, params, T, y):
    params, T, y = backend.stop_gradient((params, T, y))
    return tuple(run_log_prob(spec, fields, params, y, T=T, backend=backend, solver_kwargs=block_kwargs))


def _hutchinson_log_prob_chunk(spec, fields, backend, block_kwargs, params, T, y, probes):
    params, T, y, probes = backend.stop_gradient((params, T, y, probes))
    return tuple(run_log_prob(spec, fields, params, y, T=T, backend=backend, estimator="hutchinson", probes=probes,
                              solver_kwargs=block_kwargs))


def _transform_chunk(spec, fields, backend, block_kwargs, params, T, y):
    params, T, y = backend.stop_gradient((params, T, y))
    return tuple(run_transform(spec, fields, params, y, T=T, backend=backend, solver_kwargs=block_kwargs))


def _inverse_chunk(spec, fields, backend, block_kwargs, params, T, z):
    params, T, z = backend.stop_gradient((params, T, z))
    return tuple(run_inverse(spec, fields, params, z, T=T, backend=backend, solver_kwargs=block_kwargs))


_CHUNKS = {"log_prob": _log_prob_chunk, "log_prob_hutchinson": _hutchinson_log_prob_chunk,
           "transform": _transform_chunk, "inverse": _inverse_chunk}


# ------------------------------------------------------------------------------------------
# loading


def multiscale_flow_from_header(header: dict, arrays: dict, *, backend=None, device=None, prefix: str = "params",
                                output: str = "numpy") -> MultiscaleFlow:
    """Rebuild a :class:`MultiscaleFlow` from a saved header (kind ``"multiscale"``) and its
    arrays on any backend with a convolution (:func:`otflow.load` calls it).

    :param header: the flow's header (:meth:`MultiscaleFlow.header`).
    :param arrays: the arrays read from the file.
    :param backend: the backend to load on (the default backend when None).
    :param device: the device to load on.
    :param prefix: the name under which the parameters are stored.
    :param output: the new flow's :attr:`~MultiscaleFlow.output`.
    :returns: the flow.
    :raises ModelFileError: for an incomplete or incompatible header or missing arrays.
    """
    _check_output(output)
    b = get_backend(backend if backend is not None else default_backend())
    dev = b.device(device)
    try:
        spec = MultiscaleSpec.from_config(header["spec"])
        fields = tuple(field_from_config(c) for c in header["fields"])
        dtype = header["dtype"]
        dt = getattr(b.namespace(), dtype)
        ref = get_backend("numpy")
        templates = tuple(f.init(ref, ref.key(0), dtype=np.float64) for f in fields)
        params = fill_tree(templates, arrays, prefix, lambda v: b.asarray(np.asarray(v), dtype=dt, device=dev))
        return MultiscaleFlow(spec, params, backend=b, device=dev, dtype=dtype, T=header["T"],
                              eval_solver=SolverOptions.from_config(header["eval_solver"]), output=output,
                              fields=fields)
    except (ModelFileError, CapabilityError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"the image model's header is incomplete or from an incompatible version ({e!r})"
                             ) from None
