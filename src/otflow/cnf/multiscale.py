"""FFJORD's multiscale architecture: CNF blocks on image states, squeezes and factor-outs.

FFJORD (Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, ICLR 2019, after RealNVP's
multiscale design, Dinh, Sohl-Dickstein & Bengio, ICLR 2017) and RNODE (Finlay, Jacobsen,
Nurbekyan & Oberman, ICML 2020) model images ``(C, H, W)`` as follows (their ``ODENVP``):

1. the logit transform of the dequantized pixels (:mod:`.image`), its log-determinant kept;
2. per scale but the last: ``blocks_per_scale`` CNF blocks on the ``(C, H, W)`` state, a
   :func:`squeeze` to ``(4C, H/2, W/2)``, ``blocks_per_scale`` blocks on that, then
   :func:`split_channels`: the last ``2C`` channels are *factored out* to the base density
   and the first ``2C`` go on to the next scale, ``(2C, H/2, W/2)``;
3. the last scale: ``blocks_per_scale`` blocks, and its whole state goes to the base density.

The base density of every factored-out part is the standard normal, so

    log p(y) = Σ_parts log N(part; 0, I) − Σ_blocks Δlogp_block + log|det ∂s/∂y|

(squeezes and splits are permutations: log-determinant 0). :class:`MultiscaleSpec`
describes the shapes; :func:`multiscale_log_prob`, :func:`multiscale_transform` and
:func:`multiscale_inverse` run a model given one field and one parameter tree per block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

from array_api_compat import array_namespace

from ..base import Backend, get_backend
from ..ode.integrate import odeint, resolve_solver
from .conv_field import ConvField
from .dynamics import DENSITY_ESTIMATORS, DENSITY_NORM, density_rhs, flow_rhs, standard_normal_logpdf, time_span
from .image import logit_inverse
from .objective import logit_transform
from .signature import backend_keyword

__all__ = ["SQUEEZE", "FACTOR_OUT", "squeeze", "unsqueeze", "split_channels", "merge_channels",
           "factored_log_density", "ScaleShapes", "MultiscaleSpec", "multiscale_log_prob", "multiscale_transform",
           "multiscale_inverse", "SolveResult", "run_log_prob", "run_transform", "run_inverse", "flatten_latents",
           "split_latent", "to_image_layout"]

#: a step of :meth:`MultiscaleSpec.steps`: space-to-depth by 2
SQUEEZE = "squeeze"
#: a step of :meth:`MultiscaleSpec.steps`: half the channels leave for the base density
FACTOR_OUT = "factor_out"
#: odeint keywords the multiscale functions set themselves
_SET_HERE = ("args", "backend", "norm")


# ------------------------------------------------------------------------------------------
# squeeze and factor-out


def squeeze(x):
    """Space-to-depth by 2 (FFJORD's ``SqueezeLayer``): ``(B, C, H, W) → (B, 4C, H/2, W/2)``.

    Output channel ``4c + 2i + j`` at ``(h, w)`` is input channel ``c`` at ``(2h + i, 2w + j)``:
    a permutation of the entries, so its log-determinant is 0.

    :param x: states of shape ``(batch, C, H, W)`` (any array-API array).
    :returns: the squeezed states.
    :raises ValueError: for odd ``H`` or ``W`` (or not a 4-D array).
    """
    xp = array_namespace(x)
    if x.ndim != 4 or x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"squeeze needs states (batch, C, H, W) with even H and W, got shape {tuple(x.shape)}; "
                         "use fewer scales (MultiscaleSpec(n_scales=...)) or pad the images to an even size")
    b, c, h, w = x.shape
    y = xp.permute_dims(xp.reshape(x, (b, c, h // 2, 2, w // 2, 2)), (0, 1, 3, 5, 2, 4))
    return xp.reshape(y, (b, 4 * c, h // 2, w // 2))


def unsqueeze(x):
    """The inverse of :func:`squeeze`: ``(B, 4C, H, W) → (B, C, 2H, 2W)``.

    :param x: states of shape ``(batch, 4C, H, W)``.
    :returns: the unsqueezed states.
    :raises ValueError: when the channels are not a multiple of 4 (or not a 4-D array).
    """
    xp = array_namespace(x)
    if x.ndim != 4 or x.shape[1] % 4:
        raise ValueError(f"unsqueeze needs states (batch, 4C, H, W), channels a multiple of 4, got shape "
                         f"{tuple(x.shape)}")
    b, c4, h, w = x.shape
    y = xp.permute_dims(xp.reshape(x, (b, c4 // 4, 2, 2, h, w)), (0, 1, 4, 2, 5, 3))
    return xp.reshape(y, (b, c4 // 4, 2 * h, 2 * w))


def split_channels(z):
    """``(kept, factored)``: the first and the last half of the channels (FFJORD keeps the
    first half for the next scale and sends the second to the base density).

    :param z: states of shape ``(batch, C, H, W)`` with ``C`` even.
    :returns: two arrays of shape ``(batch, C/2, H, W)``.
    :raises ValueError: for an odd number of channels.
    """
    if z.ndim != 4 or z.shape[1] % 2:
        raise ValueError(f"split_channels needs states (batch, C, H, W) with C even, got shape {tuple(z.shape)}")
    half = z.shape[1] // 2
    return z[:, :half, ...], z[:, half:, ...]


def merge_channels(kept, factored):
    """The inverse of :func:`split_channels`: the two halves concatenated along the channels.

    :param kept: the first half, ``(batch, C/2, H, W)``.
    :param factored: the second half, same shape.
    :returns: ``(batch, C, H, W)``.
    :raises ValueError: when the halves' shapes differ.
    """
    if tuple(kept.shape) != tuple(factored.shape):
        raise ValueError(f"merge_channels: the halves must have one shape, got {tuple(kept.shape)} and "
                         f"{tuple(factored.shape)}")
    return array_namespace(kept).concat([kept, factored], axis=1)


def factored_log_density(parts):
    """The base log-density of the factored-out parts: ``Σ_parts log N(part; 0, I)`` per image.

    :param parts: arrays of shape ``(batch, ...)``, one per factor-out and the last scale's state.
    :returns: shape ``(batch,)``.
    """
    xp = array_namespace(*parts)
    return sum(standard_normal_logpdf(xp, part) for part in parts)


# ------------------------------------------------------------------------------------------
# the architecture


@dataclass(frozen=True)
class ScaleShapes:
    """The state shapes of one scale, each ``(channels, height, width)`` of one image.

    :param input: the state the scale's first blocks run on.
    :param squeezed: after the squeeze (the second half of the blocks runs on it); None
        for the last scale, which does not squeeze.
    :param kept: what goes on to the next scale; None for the last scale.
    :param factored: what goes to the base density (the whole state for the last scale).
    """

    input: tuple[int, int, int]
    squeezed: tuple[int, int, int] | None
    kept: tuple[int, int, int] | None
    factored: tuple[int, int, int]


def _default_n_scales(height: int, width: int) -> int:
    """ODENVP's count — one scale per halving while both sides are at least 4 — stopped at
    the first odd side, which cannot be squeezed."""
    n = 0
    while height >= 4 and width >= 4:
        n += 1
        if height % 2 or width % 2:
            break
        height, width = height // 2, width // 2
    return max(n, 1)


@dataclass(frozen=True)
class MultiscaleSpec:
    """A pure description of FFJORD's multiscale image model (no arrays).

    With the defaults it is the RNODE MNIST model (Finlay et al. 2020, after FFJORD's):
    images ``(1, 28, 28)``, three scales, two CNF blocks before and two after each squeeze,
    conv fields of widths ``(64, 64, 64)`` with softplus and the time as an input channel,
    α = 1e-6 (FFJORD's MNIST margin); RNODE trained it with batches of 200.

    :param image_shape: ``(C, H, W)`` of one image.
    :param n_scales: the number of scales; None: ODENVP's count (halve while height and
        width are at least 4), stopped at the first odd side. Every scale but the last
        squeezes, so each of those needs an even height and width.
    :param blocks_per_scale: CNF blocks before the squeeze and again after it (the last
        scale has only the first group).
    :param widths: hidden channels of every block's :class:`~otflow.cnf.conv_field.ConvField`.
    :param activation: the fields' activation.
    :param conditioning: how time enters the fields.
    :param alpha: the logit margin α (0.05 for CIFAR10).
    :raises ValueError: for a bad shape, count or α, or scales that would squeeze an odd side.
    """

    image_shape: tuple[int, int, int] = (1, 28, 28)
    n_scales: int | None = None
    blocks_per_scale: int = 2
    widths: tuple[int, ...] = (64, 64, 64)
    activation: str = "softplus"
    conditioning: str = "concat"
    alpha: float = 1e-6

    def __post_init__(self):
        shape = tuple(self.image_shape)
        if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in shape):
            raise ValueError(f"MultiscaleSpec: image_shape must be (channels, height, width), got {self.image_shape!r}")
        object.__setattr__(self, "image_shape", shape)
        if isinstance(self.blocks_per_scale, bool) or not isinstance(self.blocks_per_scale, int) \
                or self.blocks_per_scale < 1:
            raise ValueError(f"MultiscaleSpec: blocks_per_scale must be a positive int, got {self.blocks_per_scale!r}")
        if not 0 <= self.alpha < 0.5:
            raise ValueError(f"MultiscaleSpec: alpha must be in [0, 0.5), got {self.alpha}")
        if self.n_scales is None:
            object.__setattr__(self, "n_scales", _default_n_scales(shape[1], shape[2]))
        elif isinstance(self.n_scales, bool) or not isinstance(self.n_scales, int) or self.n_scales < 1:
            raise ValueError(f"MultiscaleSpec: n_scales must be a positive int or None, got {self.n_scales!r}")
        self._check_squeezes()
        field = ConvField(shape, self.widths, self.activation, self.conditioning)  # refuses bad field options now
        object.__setattr__(self, "widths", field.widths)

    def config(self) -> dict:
        """The JSON description of the spec (saved with a :class:`~otflow.MultiscaleFlow`)."""
        return {"image_shape": list(self.image_shape), "n_scales": self.n_scales,
                "blocks_per_scale": self.blocks_per_scale, "widths": list(self.widths), "activation": self.activation,
                "conditioning": self.conditioning, "alpha": self.alpha}

    @classmethod
    def from_config(cls, cfg: dict) -> "MultiscaleSpec":
        """The spec a :meth:`config` describes.

        :raises ValueError: for a description that is no valid spec.
        :raises TypeError: for unknown or missing entries.
        """
        cfg = dict(cfg)
        return cls(image_shape=tuple(cfg.pop("image_shape")), widths=tuple(cfg.pop("widths")), **cfg)

    def _check_squeezes(self) -> None:
        _, h, w = self.image_shape
        for i in range(self.n_scales - 1):
            if h % 2 or w % 2:
                raise ValueError(f"MultiscaleSpec: n_scales={self.n_scales} squeezes a {h}×{w} state at scale {i}, "
                                 f"but a squeeze needs an even height and width; use n_scales={i + 1} or fewer")
            h, w = h // 2, w // 2

    @property
    def dim(self) -> int:
        """``D``, the number of pixels times channels of one image."""
        return math.prod(self.image_shape)

    def scale_shapes(self) -> tuple[ScaleShapes, ...]:
        """The shapes of every scale, first to last."""
        c, h, w = self.image_shape
        scales = []
        for i in range(self.n_scales):
            if i == self.n_scales - 1:
                scales.append(ScaleShapes((c, h, w), None, None, (c, h, w)))
            else:
                half = (2 * c, h // 2, w // 2)
                scales.append(ScaleShapes((c, h, w), (4 * c, h // 2, w // 2), half, half))
                c, h, w = half
        return tuple(scales)

    def block_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The state shape of every CNF block, in the order they run."""
        shapes = []
        for scale in self.scale_shapes():
            shapes += [scale.input] * self.blocks_per_scale
            if scale.squeezed is not None:
                shapes += [scale.squeezed] * self.blocks_per_scale
        return tuple(shapes)

    @property
    def n_blocks(self) -> int:
        """The number of CNF blocks (``2·blocks_per_scale`` per scale, the last scale half)."""
        return self.blocks_per_scale * (2 * self.n_scales - 1)

    def latent_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The shapes sent to the base density, in order; flattened and concatenated they
        make the latent of :func:`multiscale_transform` (``D`` entries in all)."""
        return tuple(scale.factored for scale in self.scale_shapes())

    def steps(self) -> tuple[int | str, ...]:
        """The forward pass after the logit transform: block indices (ints), :data:`SQUEEZE`
        and :data:`FACTOR_OUT`, in order; e.g. two scales with one block each:
        ``(0, "squeeze", 1, "factor_out", 2)``."""
        steps, block = [], 0
        for scale in self.scale_shapes():
            steps += range(block, block + self.blocks_per_scale)
            block += self.blocks_per_scale
            if scale.squeezed is not None:
                steps.append(SQUEEZE)
                steps += range(block, block + self.blocks_per_scale)
                block += self.blocks_per_scale
                steps.append(FACTOR_OUT)
        return tuple(steps)

    def fields(self, *, zero_last: bool = True) -> tuple[ConvField, ...]:
        """One :class:`~otflow.cnf.conv_field.ConvField` per block.

        :param zero_last: start every field at ``v ≡ 0`` (RNODE's initialization).
        :returns: the fields, in block order.
        """
        return tuple(ConvField(shape, self.widths, self.activation, self.conditioning, zero_last)
                     for shape in self.block_shapes())

    def init(self, backend, key, *, dtype, device=None, zero_last: bool = True) -> tuple:
        """Initial parameters of :meth:`fields`, one tree per block.

        :param backend: the backend that draws them (any, the reference backend included).
        :param key: a random key of the backend.
        :param dtype: the floating dtype.
        :param device: where they live (the backend's default when None).
        :param zero_last: as for :meth:`fields`.
        :returns: the tuple of parameter trees.
        """
        keys = backend.split(key, self.n_blocks)
        return tuple(field.init(backend, k, dtype=dtype, device=device)
                     for field, k in zip(self.fields(zero_last=zero_last), keys))


# ------------------------------------------------------------------------------------------
# running a model


def _block_times(spec: MultiscaleSpec, T) -> tuple:
    if isinstance(T, (int, float)) or getattr(T, "ndim", None) == 0:
        return (T,) * spec.n_blocks
    times = tuple(T)
    if len(times) != spec.n_blocks:
        raise ValueError(f"T: give one end time for all blocks or one per block ({spec.n_blocks}), got {len(times)}")
    return times


def _check_model(spec: MultiscaleSpec, fields: Sequence, params: Sequence) -> None:
    if len(fields) != spec.n_blocks or len(params) != spec.n_blocks:
        raise ValueError(f"the spec has {spec.n_blocks} CNF blocks ({spec.blocks_per_scale} per group, "
                         f"{spec.n_scales} scales) but got {len(fields)} fields and {len(params)} parameter trees; "
                         "build them with spec.fields() and spec.init(...)")
    for k, (field, shape) in enumerate(zip(fields, spec.block_shapes())):
        own = tuple(getattr(field, "event_shape", shape))
        if own != shape:
            raise ValueError(f"block {k} runs on states {shape} but its field has event_shape {own}; "
                             "spec.block_shapes() gives every block's shape")


def _check_images(spec: MultiscaleSpec, y, name: str) -> None:
    if tuple(y.shape[1:]) != spec.image_shape:
        raise ValueError(f"{name} must have shape (batch, {', '.join(map(str, spec.image_shape))}), "
                         f"got {tuple(y.shape)}")


def _odeint_kwargs(solver_kwargs: dict | None, *, density: bool) -> dict:
    kw = dict(solver_kwargs or {})
    fixed = [k for k in _SET_HERE if k in kw]
    if fixed:
        raise ValueError(f"the multiscale functions set {', '.join(fixed)} themselves; remove "
                         f"{'it' if len(fixed) == 1 else 'them'} from solver_kwargs")
    if density and resolve_solver(kw.get("method", "dopri5")).adaptive:
        kw["norm"] = DENSITY_NORM  # the largest per-leaf RMS, as FFJORD (and otflow's Flow) control (z, Δlogp)
    return kw


def _per_block_kwargs(spec: MultiscaleSpec, solver_kwargs, *, density: bool) -> tuple[dict, ...]:
    """:func:`_odeint_kwargs` for every block: ``solver_kwargs`` is one dict for all blocks,
    or a sequence of one dict per block (fixed steps counted per block from its ``T``)."""
    if solver_kwargs is None or isinstance(solver_kwargs, dict):
        return (_odeint_kwargs(solver_kwargs, density=density),) * spec.n_blocks
    per_block = tuple(solver_kwargs)
    if len(per_block) != spec.n_blocks:
        raise ValueError(f"solver_kwargs: give one dict for all blocks or one per block ({spec.n_blocks}), "
                         f"got {len(per_block)}")
    return tuple(_odeint_kwargs(kw, density=density) for kw in per_block)


def _block_args(spec: MultiscaleSpec, params, estimator: str, probes, batch: int) -> tuple:
    """``odeint``'s ``args`` per block: the parameters, with the probe for Hutchinson."""
    if estimator not in DENSITY_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(map(repr, DENSITY_ESTIMATORS))}, got {estimator!r}")
    if estimator == "exact":
        return tuple(params)
    if probes is None or len(probes) != spec.n_blocks:
        raise ValueError(f"estimator='hutchinson' needs probes=: one array per block ({spec.n_blocks}), shaped "
                         "(batch, *shape) for each shape of spec.block_shapes()")
    for k, (eps, shape) in enumerate(zip(probes, spec.block_shapes())):
        if tuple(eps.shape) != (batch, *shape):
            raise ValueError(f"probe {k} must have shape {(batch, *shape)}, got {tuple(eps.shape)}")
    return tuple(zip(params, probes))


def _through_scales(spec: MultiscaleSpec, z, total, solve):
    """``(latents, total)`` after :meth:`MultiscaleSpec.steps` from the logit-space state
    ``z``; ``solve(k, z, total) -> (z, total)`` runs block ``k``."""
    latents = []
    for step in spec.steps():
        if step == SQUEEZE:
            z = squeeze(z)
        elif step == FACTOR_OUT:
            z, factored = split_channels(z)
            latents.append(factored)
        else:
            z, total = solve(step, z, total)
    return (*latents, z), total


@backend_keyword
def multiscale_log_prob(spec: MultiscaleSpec, fields: Sequence, params: Sequence, y, *, T,
                        backend: str | Backend | None = None, estimator: str = "exact", probes: Sequence | None = None,
                        solver_kwargs: dict | None = None):
    """``log p(y)`` per image of the multiscale model, every log-determinant included.

    Logit transform (α of ``spec``), then the spec's steps: each block integrates FFJORD's
    ``(z, Δlogp)`` with :func:`~otflow.cnf.density_rhs` and :func:`otflow.odeint` from 0 to
    its ``T``; squeezes and factor-outs as the spec says; then the standard normal density
    of every factored-out part. Equals the same model written on flattened vectors (the
    squeezes and splits are permutations).

    :param spec: the architecture.
    :param fields: one velocity field per block (:meth:`MultiscaleSpec.fields`, or any
        field whose ``event_shape`` is the block's shape).
    :param params: one parameter tree per block.
    :param y: dequantized pixels in ``[0, 1)``, shape ``(batch, *spec.image_shape)``
        (:func:`~otflow.dequantize`, or :func:`~otflow.cnf.image.bin_midpoints`).
    :param T: the end time of every block: one float (or 0-d array) for all, or one per block.
    :param backend: a backend with autodiff (name or object); inferred from ``y`` when None.
    :param estimator: ``"exact"`` (the trace, evaluation) or ``"hutchinson"`` (FFJORD's
        training estimate; needs ``probes``).
    :param probes: with ``"hutchinson"``: one probe per block, shaped ``(batch, *shape)``
        for each shape of :meth:`MultiscaleSpec.block_shapes`, fixed for the block's solve.
    :param solver_kwargs: passed to :func:`otflow.odeint` (method, tolerances, steps, ...);
        not ``args``, ``backend`` or ``norm``, which are set here (adaptive solves control
        the error of ``(z, Δlogp)`` with :data:`~otflow.cnf.DENSITY_NORM`).
    :returns: ``log p(y)``, shape ``(batch,)``.
    :raises ValueError: for fields, parameters, times, probes or images that do not fit the
        spec, an unknown estimator, or ``solver_kwargs`` setting what is set here.
    """
    return run_log_prob(spec, fields, params, y, T=T, backend=backend, estimator=estimator, probes=probes,
                        solver_kwargs=solver_kwargs).value


@backend_keyword
def multiscale_transform(spec: MultiscaleSpec, fields: Sequence, params: Sequence, y, *, T,
                         backend: str | Backend | None = None, solver_kwargs: dict | None = None):
    """The latent of pixels: logit transform, the spec's steps, and the factored-out parts
    flattened and concatenated in order (ODENVP's layout). No divergence is computed.

    :param spec: the architecture.
    :param fields: one velocity field per block.
    :param params: one parameter tree per block.
    :param y: pixels in ``[0, 1)``, shape ``(batch, *spec.image_shape)``.
    :param T: one end time for all blocks, or one per block.
    :param backend: a backend name or object; inferred from ``y`` when None.
    :param solver_kwargs: passed to :func:`otflow.odeint`; not ``args``, ``backend``, ``norm``.
    :returns: ``z``, shape ``(batch, D)``; standard normal under the model.
    :raises ValueError: as :func:`multiscale_log_prob`.
    """
    return run_transform(spec, fields, params, y, T=T, backend=backend, solver_kwargs=solver_kwargs).value


@backend_keyword
def multiscale_inverse(spec: MultiscaleSpec, fields: Sequence, params: Sequence, z, *, T,
                       backend: str | Backend | None = None, solver_kwargs: dict | None = None):
    """Pixels of latents: the inverse of :func:`multiscale_transform` (sampling, with ``z``
    standard normal). Each block is integrated from its ``T`` back to 0, the steps run in
    reverse (unsqueeze, merge the factored-out part back), then the inverse logit.

    :param spec: the architecture.
    :param fields: one velocity field per block.
    :param params: one parameter tree per block.
    :param z: latents, shape ``(batch, D)``.
    :param T: one end time for all blocks, or one per block.
    :param backend: a backend name or object; inferred from ``z`` when None.
    :param solver_kwargs: passed to :func:`otflow.odeint`; not ``args``, ``backend``, ``norm``.
    :returns: pixels ``y``, shape ``(batch, *spec.image_shape)``.
    :raises ValueError: for a latent that is not ``(batch, D)``, or as :func:`multiscale_log_prob`.
    """
    return run_inverse(spec, fields, params, z, T=T, backend=backend, solver_kwargs=solver_kwargs).value


# ------------------------------------------------------------------------------------------
# the same, with the solves' status and cost (what MultiscaleFlow compiles)


class SolveResult(NamedTuple):
    """A multiscale computation with its solves' record."""

    value: Any
    """What the computation returns."""
    status: Any
    """The worst :class:`~otflow.Status` of the blocks' solves (a 0-d int array)."""
    nfe: Any
    """The right-hand-side evaluations of all blocks (an int or 0-d array)."""


class _SolveRecord:
    """The worst status and the summed NFE of a sequence of solves."""

    def __init__(self, xp):
        self.xp, self.status, self.nfe = xp, None, 0

    def add(self, sol):
        self.status = sol.status if self.status is None else self.xp.maximum(self.status, sol.status)
        self.nfe = self.nfe + sol.stats.nfe
        return sol


def run_log_prob(spec: MultiscaleSpec, fields: Sequence, params: Sequence, y, *, T, backend=None,
                 estimator: str = "exact", probes: Sequence | None = None,
                 solver_kwargs: dict | None = None) -> SolveResult:
    """:func:`multiscale_log_prob` with the solves' status and NFE (pass ``throw=False`` in
    ``solver_kwargs`` to read a failure from the status instead of an exception).
    ``solver_kwargs`` may also be a sequence of one dict per block.

    :returns: a :class:`SolveResult` whose ``value`` is ``log p(y)``.
    """
    _check_model(spec, fields, params)
    _check_images(spec, y, "y")
    b = get_backend(backend, like=y)
    xp = b.namespace()
    times = _block_times(spec, T)
    args = _block_args(spec, params, estimator, probes, y.shape[0])
    kw = _per_block_kwargs(spec, solver_kwargs, density=True)
    rhs = [density_rhs(field, backend=b, estimator=estimator) for field in fields]
    record = _SolveRecord(xp)

    def solve(k, z, total):
        sol = record.add(odeint(rhs[k], (z, total), time_span(xp, times[k]), args=args[k], backend=b, **kw[k]))
        return sol.ys[0][-1, ...], sol.ys[1][-1, ...]

    s, log_det = logit_transform(y, alpha=spec.alpha)
    zero = xp.zeros((y.shape[0],), dtype=y.dtype, device=b.device_of(y))
    latents, total = _through_scales(spec, s, zero, solve)
    return SolveResult(factored_log_density(latents) - total + log_det, record.status, record.nfe)


def run_transform(spec: MultiscaleSpec, fields: Sequence, params: Sequence, y, *, T, backend=None,
                  solver_kwargs: dict | None = None) -> SolveResult:
    """:func:`multiscale_transform` with the solves' status and NFE.

    :returns: a :class:`SolveResult` whose ``value`` is the latent ``(batch, D)``.
    """
    _check_model(spec, fields, params)
    _check_images(spec, y, "y")
    b = get_backend(backend, like=y)
    xp = b.namespace()
    times = _block_times(spec, T)
    kw = _per_block_kwargs(spec, solver_kwargs, density=False)
    record = _SolveRecord(xp)

    def solve(k, z, total):
        sol = record.add(odeint(flow_rhs(fields[k]), z, time_span(xp, times[k]), args=params[k], backend=b,
                                **kw[k]))
        return sol.ys[-1, ...], total

    latents, _ = _through_scales(spec, logit_transform(y, alpha=spec.alpha)[0], None, solve)
    return SolveResult(flatten_latents(latents), record.status, record.nfe)


def flatten_latents(parts):
    """The factored-out parts (and the last scale's state) flattened and concatenated in
    order: ODENVP's latent layout, ``(batch, D)``.

    :param parts: arrays of shape ``(batch, *shape)`` for the shapes of
        :meth:`MultiscaleSpec.latent_shapes`.
    :returns: shape ``(batch, D)``.
    """
    xp = array_namespace(*parts)
    return xp.concat([xp.reshape(part, (part.shape[0], -1)) for part in parts], axis=1)


def split_latent(spec: MultiscaleSpec, z) -> list:
    """The inverse of :func:`flatten_latents`: the parts of a latent ``(batch, D)``, shaped
    as :meth:`MultiscaleSpec.latent_shapes` says.

    :param spec: the architecture.
    :param z: latents, shape ``(batch, D)``.
    :returns: the list of parts.
    :raises ValueError: for a latent that is not ``(batch, D)``.
    """
    if z.ndim != 2 or z.shape[1] != spec.dim:
        raise ValueError(f"z must have shape (batch, {spec.dim}), got {tuple(z.shape)}")
    xp = array_namespace(z)
    parts, start = [], 0
    for shape in spec.latent_shapes():
        size = math.prod(shape)
        parts.append(xp.reshape(z[:, start:start + size], (z.shape[0], *shape)))
        start += size
    return parts


def to_image_layout(spec: MultiscaleSpec, state, factored: Sequence, steps_done: int):
    """A state in the middle of the model mapped back to the image's ``(C, H, W)`` layout: the
    first ``steps_done`` of :meth:`MultiscaleSpec.steps` undone structurally (unsqueeze,
    merge the parts factored out so far back in); the blocks are not run backwards.

    :param spec: the architecture.
    :param state: the current state, shape ``(batch, *shape)`` of the scale reached.
    :param factored: the parts factored out so far, in order.
    :param steps_done: how many steps of ``spec.steps()`` produced ``state``.
    :returns: shape ``(batch, *spec.image_shape)`` (logit space).
    """
    parts = list(factored)
    for step in reversed(spec.steps()[:steps_done]):
        if step == SQUEEZE:
            state = unsqueeze(state)
        elif step == FACTOR_OUT:
            state = merge_channels(state, parts.pop())
    return state


def run_inverse(spec: MultiscaleSpec, fields: Sequence, params: Sequence, z, *, T, backend=None,
                solver_kwargs: dict | None = None) -> SolveResult:
    """:func:`multiscale_inverse` with the solves' status and NFE.

    :returns: a :class:`SolveResult` whose ``value`` is the pixels ``(batch, *image_shape)``.
    """
    _check_model(spec, fields, params)
    latents = split_latent(spec, z)
    b = get_backend(backend, like=z)
    xp = b.namespace()
    times = _block_times(spec, T)
    kw = _per_block_kwargs(spec, solver_kwargs, density=False)
    record = _SolveRecord(xp)
    state = latents.pop()
    for step in reversed(spec.steps()):
        if step == SQUEEZE:
            state = unsqueeze(state)
        elif step == FACTOR_OUT:
            state = merge_channels(state, latents.pop())
        else:
            sol = record.add(odeint(flow_rhs(fields[step]), state, time_span(xp, times[step], reverse=True),
                                    args=params[step], backend=b, **kw[step]))
            state = sol.ys[-1, ...]
    return SolveResult(logit_inverse(state, alpha=spec.alpha), record.status, record.nfe)
