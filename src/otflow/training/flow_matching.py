"""Simulation-free training of otflow's velocity fields: conditional flow matching.

Flow matching (Lipman, Chen, Ben-Hamu, Nickel & Le, "Flow matching for generative
modeling", ICLR 2023; Liu, Gong & Liu, "Flow straight and fast", ICLR 2023) regresses the
velocity field onto the velocity of straight paths between data and noise, with no ODE
solve and no divergence during training. Its result is an ordinary :class:`~otflow.Flow`,
whose exact likelihood otflow computes as for any other flow; fine-tuning it with the
RNODE objective (``fit(..., init=flow)``) is the documented road to a model that is fast to
train and has a good likelihood.

**Direction.** otflow's flows carry data at ``t = 0`` to the standard normal at ``t = T``
(:meth:`~otflow.Flow.log_prob` integrates data → noise, :meth:`~otflow.Flow.sample` the
way back). For a pair ``(x, z)`` of a (standardized) data row and a normal draw, the
conditional path is the straight line ``ψ(s) = (1 − s)·x + s·z`` at ``s = t/T ∈ [0, 1]``,
whose velocity is ``u = (z − x)/T``; the loss is ``E ‖v(t, ψ) − u‖² / D``. With ``n``
blocks, block ``k`` covers ``s ∈ [k/n, (k+1)/n)`` over its own ``[0, T]`` (velocity
``(z − x)/(n·T)``), so the composed flow follows the same path.

**Conditional flows.** With contexts (``fit(x, context=c)``) every pair carries its data
row's context and the field regresses ``v(t, ψ | c)`` onto the same straight-path
velocity: conditional flow matching, whose minimizer transports ``p(x | c)`` to the normal
for every ``c``. Only the independent coupling applies: the OT coupling pairs rows across
contexts, so its paths would not transport each conditional to the normal.

**Couplings.** ``"independent"``: ``x`` and ``z`` drawn independently (I-CFM of Tong et
al.). ``"ot"``: within each batch the normal draws are permuted to the exact optimal
assignment for the squared Euclidean cost (scipy's ``linear_sum_assignment``), the
mini-batch optimal-transport coupling of Tong, Malkin, Huguet, Zhang, Rector-Brooks,
Fatras, Wolf & Bengio ("Improving and generalizing flow-based generative models with
minibatch optimal transport", TMLR 2024) and Pooladian et al. (ICML 2023): straighter
paths, cheaper solves at evaluation.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..cnf import MLP
from .data import split_context

__all__ = ["COUPLINGS", "FlowMatchingLoss", "FlowMatchingBatches", "ot_coupling", "check_coupling_available"]

#: how a batch's data rows and normal draws are paired
COUPLINGS = ("independent", "ot")


def check_coupling_available(coupling: str) -> None:
    """Refuse the OT coupling early when scipy is missing.

    :param coupling: one of :data:`COUPLINGS`.
    :raises ImportError: ``"ot"`` without scipy, naming the install command.
    """
    if coupling != "ot":
        return
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        raise ImportError("coupling='ot' solves an assignment problem per batch with scipy; "
                          "install it (pip install scipy) or use coupling='independent'") from None


def ot_coupling(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The rows of ``z`` reordered to the optimal assignment to the rows of ``x``.

    Minimizes ``Σ_i ‖x_i − z_{π(i)}‖²`` over permutations ``π`` exactly (the
    Jonker–Volgenant algorithm of ``scipy.optimize.linear_sum_assignment``).

    :param x: data rows, ``(batch, dim)``.
    :param z: normal draws, ``(batch, dim)``.
    :returns: ``z[π]``.
    """
    from scipy.optimize import linear_sum_assignment

    cost = np.sum(x * x, axis=1)[:, None] + np.sum(z * z, axis=1)[None, :] - 2.0 * (x @ z.T)
    rows, cols = linear_sum_assignment(cost)
    return z[cols[np.argsort(rows)]]


class FlowMatchingBatches:
    """Training batches for flow matching: ``(batch, 2, dim)`` arrays of pairs, data rows at
    ``[:, 0]`` and their coupled normal draws at ``[:, 1]``, drawn on the host from the run's
    random generator (so a resumed run draws the same pairs).

    With contexts (a conditional run) the pairs are ``(batch, 2, dim + context_dim)``: both
    the data row and its normal draw followed by the row's context.

    :param coupling: one of :data:`COUPLINGS`.
    :param conditional: whether the run's data carry contexts.
    :raises ValueError: an unknown coupling, or ``"ot"`` for a conditional run.
    """

    def __init__(self, coupling: str, *, conditional: bool = False):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if conditional and coupling == "ot":
            raise ValueError("coupling='ot' pairs data and noise across the whole batch, ignoring the contexts, so "
                             "it cannot train a conditional flow; use coupling='independent' with context=")
        self.coupling = coupling
        self.conditional = conditional

    def __call__(self, data, rng: np.random.Generator, batch_size: int, backend, dtype, device,
                 part: slice | None = None):
        """One batch of pairs (the signature of :func:`~otflow.training.data.sample_batch`).

        :param data: the run's :class:`~otflow.training.data.TrainingData`.
        :param rng: the run's random generator.
        :param batch_size: the number of pairs (the global batch).
        :param backend: the backend of the batch.
        :param dtype: its dtype.
        :param device: its device.
        :param part: the pairs to keep (data-parallel: this process's share of the global
            batch, which every process draws and couples whole); None keeps all.
        :returns: the pairs, ``(batch_size, 2, dim)`` (or the part's rows).
        """
        rows = rng.integers(0, data.n_train, batch_size)
        x = data.train[rows]
        z = rng.standard_normal(x.shape)
        if self.coupling == "ot":
            z = ot_coupling(x, z)
        if self.conditional:
            c = data.context[rows]
            x, z = np.concatenate([x, c], axis=1), np.concatenate([z, c], axis=1)
        pairs = np.stack([x, z], axis=1)
        return backend.asarray(pairs if part is None else pairs[part], dtype=dtype, device=device)


class FlowMatchingLoss:
    """``loss(params, pairs, key) -> (loss, aux)``: the conditional flow-matching loss of a
    batch of pairs (:class:`FlowMatchingBatches`), the path time drawn from ``key`` (uniformly
    unless ``time_power`` says otherwise).

    ``aux`` has the keys the training loop records: ``nll`` is NaN (no likelihood is computed
    in simulation-free training; validation computes the exact one), ``kinetic`` is
    ``n·T·½·mean_d v²`` averaged over the sampled path points: a one-sample Monte-Carlo
    estimate of RNODE's kinetic term ``Σ_blocks ∫ ½·mean_d ‖v‖² dt`` along the path, on the
    same scale as :func:`~otflow.rnode_loss`'s; ``jacobian`` is NaN, ``nfe`` is the number of field evaluations
    per row (one per block), ``status`` is 0 (no solve can fail).

    :param fields: the blocks' fields (one :class:`~otflow.MLP` per block).
    :param T: the blocks' common integration time.
    :param backend: the backend the loss runs on.
    :param row_draw: wraps the path-time draw (data-parallel runs: this process's rows of the
        global batch's draw); None: as it is.
    :param time_power: the path time is ``s = u**time_power`` with ``u ~ U[0, 1]``: 1 (the
        default) samples ``s`` uniformly; a power above 1 puts more of the batch near the data
        end ``s = 0``, where a density's sharp edges are resolved (density
        ``s**(1/p − 1)/p``; half the rows fall below ``s = 0.5**p``). Every time keeps a
        positive density, so the loss's minimizer, the marginal velocity field, is the same;
        only the share of the training effort per time changes. On the 2-D checkerboard
        (128×3 swish field, 30 000 iterations of batch 512, two seeds) ``time_power=2``
        lowered the KL gap from 0.132 / 0.127 to 0.115 / 0.118 nats; ``3`` gained nothing
        (log in ``benchmarks/results-2026-11-29-recipe.txt``).
    :raises ValueError: a ``time_power`` that is not a finite positive number.
    """

    def __init__(self, fields, T: float, backend, *, row_draw=None, time_power: float = 1.0):
        self.fields = list(fields)
        self.T = float(T)
        self.backend = backend
        self.draw_times = row_draw(backend.uniform) if row_draw is not None else backend.uniform
        if isinstance(time_power, bool) or not isinstance(time_power, numbers.Real) or \
                not math.isfinite(time_power) or time_power <= 0:
            raise ValueError(f"time_power must be a finite positive number (1 samples the path time uniformly, "
                             f"2 weights it toward the data), got {time_power!r}")
        self.time_power = float(time_power)

    def __call__(self, params, pairs, key):
        b = self.backend
        xp = b.namespace()
        x, z = pairs[:, 0, ...], pairs[:, 1, ...]
        context = None
        if self.fields[0].context_dim:
            (x, context), (z, _) = split_context(x, self.fields[0].dim), split_context(z, self.fields[0].dim)
        batch, n = x.shape[0], len(self.fields)
        row_shape = (batch,) + (1,) * (x.ndim - 1)
        s = xp.reshape(self.draw_times(key, (batch,), dtype=x.dtype, device=b.device_of(x)), row_shape)
        if self.time_power != 1.0:
            s = s ** self.time_power
        point = (1.0 - s) * x + s * z
        target = (z - x) / (n * self.T)
        block = xp.clip(xp.floor(s * n), 0.0, float(n - 1))
        t = (s * n - block) * self.T
        velocity = xp.zeros_like(x)
        for k, field in enumerate(self.fields):
            v = _velocity_at_row_times(field, params["fields"][k], t, point, b, context)
            velocity = v if n == 1 else xp.where(block == float(k), v, velocity)
        dim = math.prod(x.shape[1:])
        loss = xp.sum((velocity - target) ** 2) / (batch * dim)
        nan = xp.asarray(float("nan"), dtype=x.dtype, device=b.device_of(x))
        kinetic = (n * self.T) * 0.5 * xp.sum(velocity * velocity) / (batch * dim)
        aux = {"nll": nan, "kinetic": kinetic, "jacobian": nan,
               "nfe": xp.asarray(n, device=b.device_of(x)), "status": xp.asarray(0, device=b.device_of(x))}
        return loss, aux


def _velocity_at_row_times(field, params, t, x, backend, context=None):
    """``v(t_i, x_i)`` (``v(t_i, x_i | c_i)`` with ``context``) for every row ``i`` (``t``
    shaped ``(batch, 1, ...)``).

    An :class:`~otflow.MLP` broadcasts a column of times through every layer; other fields
    are called row by row through the backend's ``vmap``.
    """
    if isinstance(field, MLP):
        return field.apply(params, t, x) if context is None else field.apply(params, t, x, context)

    def one_row(t_row, x_row):
        return field.apply(params, t_row[0], x_row[None, ...])[0]

    return backend.vmap(one_row)(backend.namespace().reshape(t, (t.shape[0], 1)), x)
