"""The :class:`Flow`: a chain of CNF blocks, their parameters, and how to evaluate them.

Conventions (FFJORD's, Grathwohl et al. 2019): data ``x`` sits at ``t = 0`` and the
latent ``z`` at ``t = T``; ``dz/dt = v(t, z)`` pushes data to the standard normal base, and

    log p(x) = log N(z(T); 0, I) + ∫₀ᵀ tr(∂v/∂z) dt − Σ log scale

(the last term undoes the stored standardization ``(x − shift)/scale``).
Blocks are chained: block ``k`` starts where block ``k−1`` ended.

A conditional flow ``p(x | c)`` (fields with ``context_dim > 0``) takes a context with
every evaluation (``context=``: one vector for all rows, or one per row); the context is
standardized by the flow's stored ``(c − context_shift)/context_scale`` (no Jacobian term:
the density is over ``x`` only) and passed to the fields through the solves' ``args``.

Evaluation is never differentiated: parameters, end times and inputs enter it with
their gradients stopped, and adaptive solves use the forward-only loop (on JAX the
cheapest; on torch no autograd graph is kept). On compiling backends every evaluation
is compiled once per kind and takes the parameters and the end times as arguments, so
new parameters or a new ``T`` reuse it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from ..base import Backend, default_backend, get_backend
from ..base.errors import SolverError, Status
from ..base.options import reject_unknown_keywords, unknown_option_message
from ..ode.integrate import DEFAULT_MAX_STEPS, fixed_step_count, odeint, raise_for_status, resolve_solver
from ..ode.solvers import SOLVERS
from .dynamics import DENSITY_NORM, density_rhs, flow_rhs, standard_normal_logpdf, time_span
from .fields import FunctionField, VelocityField, _as_event_shape, field_from_config, native_field
from .serialize import ModelFileError, fill_tree, named_arrays, read_file, write_file

__all__ = ["Flow", "SolverOptions", "load", "flow_from_header", "ON_FAILURE", "OUTPUTS"]

#: what an evaluation does when a chunk's solve fails
ON_FAILURE = ("raise", "nan")
#: the array type evaluation methods return: numpy arrays, or the backend's own
OUTPUTS = ("numpy", "native")
#: default chunking of evaluation: at most this many elements in the exact trace's basis batch
_EXACT_TRACE_BUDGET = 1 << 25


def _check_output(output) -> str:
    if not isinstance(output, str):
        raise TypeError(f"output must be one of {', '.join(map(repr, OUTPUTS))}, got {output!r}")
    if output not in OUTPUTS:
        raise ValueError(unknown_option_message("output", output, OUTPUTS))
    return output


#: ``sample(numpy=...)`` of earlier versions and what replaced it
_SAMPLE_REPLACED = {"numpy": "the flow's output setting, which decides the array type of every evaluation "
                             "method: flow.with_output('native').sample(n) (or build the flow with output='native')"}


@dataclass(frozen=True)
class SolverOptions:
    """How a :class:`Flow` integrates when it evaluates; passed to :func:`otflow.odeint`
    (the flow chooses the error norm and the loop kind).

    :param method: a built-in method's name (``"dopri5"``, ``"rk4"``, ``"midpoint"``,
        ``"euler"``, in any case) or a solver object (:class:`~otflow.Dopri5`, a user's
        :class:`~otflow.ode.AbstractRungeKutta` subclass). Whether it is adaptive is asked
        of the solver object. A flow evaluating with a user's method cannot be saved.
    :param rtol: relative tolerance of an adaptive method; None: :func:`otflow.odeint`'s
        default (1e-5, the FFJORD/RNODE setting). Refused for fixed-step methods.
    :param atol: absolute tolerance of an adaptive method, likewise.
    :param step_size: adaptive methods: the first step; fixed-step methods: the largest
        step (each block's ``[0, T]`` is cut into ``ceil(T / step_size)`` equal steps).
    :param n_steps: fixed-step methods: equal steps per block.
    :param max_steps: bound on the steps of an adaptive solve.
    :raises ValueError: for an unknown method, tolerances with a fixed-step method, a
        fixed-step method without exactly one of ``step_size``/``n_steps``, or ``n_steps``
        with an adaptive method.
    """

    method: Any = "dopri5"
    rtol: float | None = None
    atol: float | None = None
    step_size: float | None = None
    n_steps: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS

    def __post_init__(self):
        solver = self.solver
        if solver.adaptive:
            if self.n_steps is not None:
                raise ValueError(f"n_steps applies to fixed-step methods; {solver.name!r} is adaptive "
                                 "(step_size= sets its first step)")
            return
        given = [name for name in ("rtol", "atol") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"{solver.name!r} is a fixed-step method: {' and '.join(given)} do not apply; pass "
                             f"{', '.join(f'{name}=None' for name in given)} with it (e.g. "
                             f"flow.with_eval_solver(method={solver.name!r}, n_steps=16, rtol=None, atol=None))")
        if (self.step_size is None) == (self.n_steps is None):
            raise ValueError(f"the fixed-step method {solver.name!r} needs exactly one of step_size= or n_steps= "
                             "(e.g. n_steps=16)")

    @property
    def solver(self):
        """The solver object, :func:`otflow.ode.resolve_solver` of ``method``."""
        return resolve_solver(self.method)

    def is_adaptive(self) -> bool:
        """Whether the method controls its step size (asked of the solver object)."""
        return self.solver.adaptive

    def odeint_kwargs(self) -> dict:
        """The keywords for :func:`otflow.odeint`; options left at None are not passed."""
        kw: dict[str, Any] = {"method": self.method, "max_steps": self.max_steps}
        for name in ("rtol", "atol", "step_size", "n_steps"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    def config(self) -> dict:
        """The JSON description saved with a flow.

        :raises ValueError: for a user's method, which a file cannot describe.
        """
        solver = self.solver
        if type(solver) is not SOLVERS.get(solver.name):
            raise ValueError(
                f"this flow evaluates with the user-defined method {type(solver).__name__} ({solver.name!r}), which "
                f"a saved file cannot describe. Save flow.with_eval_solver(method='dopri5') (or another built-in "
                f"method: {', '.join(SOLVERS)}) and set the method again after loading.")
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        cfg["method"] = solver.name
        return cfg

    @classmethod
    def from_config(cls, cfg: dict) -> "SolverOptions":
        """Rebuild the options saved with :meth:`config`.

        Files written before the tolerances were optional store 1e-5 for every method;
        fixed-step methods never used them, so they are dropped here.
        """
        cfg = dict(cfg)
        if not resolve_solver(cfg.get("method", "dopri5")).adaptive:
            cfg["rtol"] = cfg["atol"] = None
        return cls(**cfg)


class _EvaluatedBlocks:
    """What :class:`Flow` and :class:`~otflow.cnf.multiscale_flow.MultiscaleFlow` share: CNF
    blocks with their parameters and end times, the evaluation settings, the copies
    (:meth:`with_parameters`, :meth:`with_eval_solver`, :meth:`with_output`), input checks,
    and the chunked evaluation compiled once per kind.

    A subclass sets ``backend``, ``fields``, ``params``, ``event_shape`` and calls
    :meth:`_set_evaluation`; it provides ``_chunk_function(kind, block_kwargs)``, the
    uncompiled ``fn(params, T, x, *extra) -> (out, status, nfe)`` of each evaluation kind,
    and may override ``_default_batch_size``.
    """

    def _set_evaluation(self, dtype, device, T, eval_solver, output) -> None:
        """Set the dtype, device, end times, evaluation solver and output type; no training record."""
        xp = self.backend.namespace()
        self.dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
        self.backend.check_dtype(self.dtype)
        self.device = self.backend.device(device) if (device is None or isinstance(device, str)) else device
        self.T = self._block_times(T)
        if eval_solver is not None and not isinstance(eval_solver, SolverOptions):
            raise TypeError(f"eval_solver must be an otflow.SolverOptions (e.g. SolverOptions(rtol=1e-6, atol=1e-6)), "
                            f"got {type(eval_solver).__name__}")
        self.eval_solver = eval_solver or SolverOptions()
        self.output = _check_output(output)
        self.history = None
        self.fit_info = None
        self.last_nfe = None
        self._compiled: dict = {}
        self._times_array = None

    @property
    def dim(self) -> int:
        """The number of features of one sample."""
        return math.prod(self.event_shape)

    def _block_params(self, params) -> tuple:
        params = tuple(params)
        if len(params) != len(self.fields):
            raise ValueError(f"{len(self.fields)} fields but {len(params)} parameter trees")
        return params

    def _block_times(self, T) -> tuple[float, ...]:
        """``T`` (a number, one per block, a numpy or backend array) as one float per block."""
        n = len(self.fields)
        message = f"T must be a positive finite float (or {n} of them, one per block), got {T!r}"
        if self.backend.owns(T):
            T = self.backend.to_numpy(T)
        if isinstance(T, (bool, np.bool_, str, bytes)):
            raise ValueError(message)
        try:
            times = np.asarray(T, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(message) from None
        if times.ndim == 0:
            times = np.full(n, float(times))
        if times.shape != (n,) or not np.all(np.isfinite(times) & (times > 0)):
            raise ValueError(message)
        return tuple(float(t) for t in times)

    # ---------------------------------------------------------------------------------------
    # copies

    def with_parameters(self, params: Sequence, *, T: float | Sequence[float] | None = None,
                        history: list[dict] | None = None, fit_info: dict | None = None):
        """A copy of this flow with other parameters (what :func:`otflow.fit` installs).

        The copy shares the compiled evaluations of this flow: new parameters and a new
        ``T`` need no recompilation.

        :param params: one parameter tree per block.
        :param T: the new integration times (a float, one per block, or a 1-d numpy or
            backend array); None keeps this flow's.
        :param history: the copy's :attr:`history` (None: no training record).
        :param fit_info: the copy's :attr:`fit_info` (None: no training record).
        :returns: the new flow.
        :raises ValueError: for the wrong number of parameter trees or a bad ``T``.
        """
        clone = self._copy(share_compiled=True)
        clone.params = self._block_params(params)
        if T is not None:
            clone.T = self._block_times(T)
        clone.history, clone.fit_info, clone.last_nfe = history, fit_info, None
        return clone

    def with_eval_solver(self, **changes):
        """A copy of this flow evaluating with other solver settings.

        :param changes: fields of :class:`SolverOptions` to change (e.g. ``rtol=1e-7``,
            or ``method="rk4", n_steps=16, rtol=None, atol=None``).
        :returns: the new flow (its training record is kept).
        """
        clone = self._copy(share_compiled=False)
        clone.eval_solver = replace(self.eval_solver, **changes)
        return clone

    def with_output(self, output: str):
        """A copy of this flow whose evaluation methods return ``output`` arrays.

        :param output: ``"numpy"`` or ``"native"`` (the backend's arrays).
        :returns: the new flow (sharing the compiled evaluations and the training record).
        """
        clone = self._copy(share_compiled=True)
        clone.output = _check_output(output)
        return clone

    def _copy(self, *, share_compiled: bool):
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        if not share_compiled:
            clone._compiled = {}
        return clone

    def save(self, path, *, metadata: dict | None = None):
        """Write the flow to ``path``: parameters in safetensors, a JSON header, no pickle;
        atomic (a crash mid-write leaves any previous file intact).

        :param path: the file to write.
        :param metadata: JSON-serializable information stored in the header.
        :returns: the path.
        :raises ValueError: for a flow that a file cannot describe (a user's field or
            evaluation method).
        """
        header = self.header()
        if metadata:
            header["metadata"] = metadata
        arrays = {k: self.backend.to_numpy(v) for k, v in named_arrays(self.params, "params").items()}
        return write_file(path, arrays, header)

    # ---------------------------------------------------------------------------------------
    # inputs and outputs

    def _input(self, x, name: str = "x", event_shape: tuple | None = None):
        """``x`` validated and converted to the flow's backend, dtype and device.

        :param x: a batch of points (numpy, a list, or the backend's array).
        :param name: its name in error messages.
        :param event_shape: the shape of one point (default: :attr:`event_shape`).
        """
        b = self.backend
        event_shape = self.event_shape if event_shape is None else tuple(event_shape)
        host = isinstance(x, np.ndarray) or not b.owns(x)
        if host:
            try:
                x = np.asarray(x)
            except Exception as e:  # ragged lists, tensors that need .detach(), ...
                raise TypeError(f"{name} could not be read as an array ({type(e).__name__}: {e}); pass a numpy "
                                f"array or a {b.name} array of shape (n, {', '.join(map(str, event_shape))})"
                                ) from None
            if x.dtype.kind == "c":
                raise TypeError(f"{name} is complex ({x.dtype}); a flow needs real numbers (take .real)")
            if x.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be real numbers, got dtype {x.dtype}; convert it with "
                                f"np.asarray({name}, dtype=float)")
        shape = tuple(x.shape)
        if shape == event_shape:
            raise ValueError(f"{name} has shape {shape}: a single point; pass a batch of shape "
                             f"(n, {', '.join(map(str, event_shape))}), e.g. {name}[None]")
        if len(shape) != 1 + len(event_shape) or shape[1:] != event_shape:
            raise ValueError(f"{name} must have shape (n, {', '.join(map(str, event_shape))}), got {shape}"
                             f" (the flow was built for {math.prod(event_shape)}-dimensional points)")
        if shape[0] == 0:
            raise ValueError(f"{name} is empty")
        xp = b.namespace()
        if not host:
            if xp.isdtype(x.dtype, "complex floating"):
                raise TypeError(f"{name} is complex ({x.dtype}); a flow needs real numbers (take .real)")
            if not xp.isdtype(x.dtype, "real floating"):
                x = xp.astype(x, self.dtype)  # booleans and integers are converted
            xb = b.asarray(x, dtype=self.dtype, device=self.device)
            if b.is_concrete(xb) and not bool(xp.all(xp.isfinite(xb))):
                raise ValueError(f"{name} contains NaN or inf (or values beyond the range of {self.dtype})")
            return xb
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} contains NaN or inf")
        xb = b.asarray(np.asarray(x, dtype=np.float64), dtype=self.dtype, device=self.device)
        if not bool(xp.all(xp.isfinite(xb))):
            raise ValueError(f"{name} has values beyond the range of the flow's dtype {self.dtype} "
                             f"(max |{name}| = {np.max(np.abs(x.astype(np.float64))):.3g}); rescale them")
        return xb

    def _output(self, y):
        return self.backend.to_numpy(y) if self.output == "numpy" else y

    # ---------------------------------------------------------------------------------------
    # the solves (one chunk; compiled per kind on compiling backends)

    def _block_solve_kwargs(self) -> tuple[dict, ...]:
        """:func:`otflow.odeint` keywords per block. A fixed-step method given ``step_size``
        gets its step count per block here, from the host ``T``, since compiled code sees
        ``T`` only as a traced array."""
        options = self.eval_solver
        kw = dict(options.odeint_kwargs(), backend=self.backend, throw=False, check_inputs=False,
                  loop_kind="forward")
        if options.is_adaptive() or options.step_size is None:
            return (kw,) * len(self.fields)
        del kw["step_size"]
        return tuple(dict(kw, n_steps=fixed_step_count(t, options.step_size)) for t in self.T)

    def _compiled_fn(self, kind: str):
        """The chunk function of ``kind``: ``fn(params, T, x, *extra) -> (out, status, nfe)``,
        compiled once (per fixed-step count) and shared with :meth:`with_parameters` copies."""
        block_kwargs = self._block_solve_kwargs()
        key = (kind, tuple(kw.get("n_steps") for kw in block_kwargs))
        if key not in self._compiled:
            self._compiled[key] = self.backend.jit(self._chunk_function(kind, block_kwargs))
        return self._compiled[key]

    def _default_batch_size(self, kind: str, n: int) -> int:
        """Rows per chunk when the caller gives none: as many as keep the exact trace's
        ``d × rows × d`` basis batch under 2²⁵ elements (at least 256)."""
        return min(n, max(256, _EXACT_TRACE_BUDGET // (self.dim * self.dim)))

    def _times_argument(self):
        """``T`` as the chunk functions take it: a backend array on compiling backends (one
        compiled function serves every ``T``), the Python floats elsewhere (which odeint
        reads without a device round trip)."""
        if not self.backend.has_jit:
            return self.T
        if self._times_array is None or self._times_array[0] != self.T:
            array = self.backend.asarray(np.asarray(self.T), dtype=self.dtype, device=self.device)
            self._times_array = (self.T, array)
        return self._times_array[1]

    def _run_chunked(self, kind: str, x, batch_size: int | None, on_failure: str, extra=None, context=None):
        """Evaluate ``kind`` over ``x`` in chunks; pad the last chunk on compiling backends so
        that one compiled function serves every chunk.

        :param extra: None, or ``extra(index, rows)``: a tuple of further arguments of the
            chunk function for chunk number ``index`` of ``rows`` rows (padding included),
            each array with ``rows`` leading entries (per-row probes).
        :param context: None, or a conditional flow's standardized contexts, one row per row
            of ``x``: chunked (and padded) with ``x`` and passed right after it.
        """
        if not isinstance(on_failure, str):
            raise TypeError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, got {on_failure!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(unknown_option_message("on_failure", on_failure, ON_FAILURE))
        b, xp = self.backend, self.backend.namespace()
        n = x.shape[0]
        if batch_size is None:
            batch_size = self._default_batch_size(kind, n)
        if (isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer))
                or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        fn, times = self._compiled_fn(kind), self._times_argument()
        outs, total_nfe = [], 0
        for index, start in enumerate(range(0, n, batch_size)):
            chunk = x[start:start + batch_size, ...]
            m = chunk.shape[0]
            if b.has_jit and m < batch_size and n > batch_size:
                pad = xp.zeros((batch_size - m, *chunk.shape[1:]), dtype=chunk.dtype, device=b.device_of(chunk))
                chunk = xp.concat([chunk, pad], axis=0)
            args = () if extra is None else tuple(extra(index, chunk.shape[0]))
            if context is not None:
                args = (_rows_padded(xp, context[start:start + batch_size, ...], chunk.shape[0]), *args)
            out, status, nfe = fn(self.params, times, chunk, *args)
            total_nfe += int(b.to_numpy(nfe))
            if int(b.to_numpy(status)) != Status.SUCCESS:
                out = self._on_chunk_failure(kind, fn, times, chunk[:m, ...], args, status, on_failure)
            outs.append(out[:m, ...])
        self.last_nfe = total_nfe
        return xp.concat(outs, axis=0) if len(outs) > 1 else outs[0]

    def _on_chunk_failure(self, kind, fn, times, chunk, args, status, on_failure):
        b, xp = self.backend, self.backend.namespace()
        if on_failure == "raise":
            raise SolverError(
                f"{kind}: the evaluation solve failed ({Status(int(b.to_numpy(status))).name}) on a batch of "
                f"{chunk.shape[0]} points. An outlier far from the data often causes it. Remedies: "
                f"on_failure='nan' (NaN for the failing points, with a warning), a looser eval tolerance "
                f"(flow.with_eval_solver(rtol=..., atol=...)), or more max_steps.")
        # one point at a time: the failing ones get NaN
        rows, failed = [], 0
        for i in range(chunk.shape[0]):
            row_args = self.backend.tree_map(lambda a, i=i: a[i:i + 1, ...], args)
            out, st, _ = fn(self.params, times, chunk[i:i + 1, ...], *row_args)
            if int(b.to_numpy(st)) != Status.SUCCESS:
                out = xp.full(out.shape, float("nan"), dtype=out.dtype, device=b.device_of(out))
                failed += 1
            rows.append(out)
        warnings.warn(f"{kind}: {failed} of {chunk.shape[0]} points failed to solve and are NaN", RuntimeWarning,
                      stacklevel=4)
        return xp.concat(rows, axis=0)


class Flow(_EvaluatedBlocks):
    """A continuous normalizing flow (FFJORD, Grathwohl et al. 2019; trained with RNODE,
    Finlay et al. 2020): ``len(fields)`` CNF blocks over ``[0, T]`` each.

    Evaluation (:meth:`log_prob`, :meth:`transform`, :meth:`inverse`, :meth:`sample`,
    :meth:`trajectory`) uses the evaluation solver and, for densities, the exact trace.
    It is not differentiable: parameters and inputs enter with their gradients stopped
    (a torch module's parameters keep no graph). For a differentiable objective use
    :func:`otflow.rnode_loss`.

    :param fields: velocity fields (:class:`~otflow.MLP` or a :class:`~otflow.FunctionField`),
        one per block.
    :param params: one parameter tree per block.
    :param backend: the backend (name or object) the flow computes with.
    :param device: where it computes (the backend's default when None).
    :param dtype: the floating dtype of the computation (a name or the backend's dtype).
    :param T: the integration time of every block (a float or one per block).
    :param shift: with ``scale``, the data standardization ``(x − shift)/scale`` applied
        before the flow (and undone by :meth:`inverse` and :meth:`sample`); ``log_prob``
        includes its log-determinant.
    :param scale: see ``shift``; positive.
    :param eval_solver: the solver for evaluation (default: Dormand–Prince, rtol = atol = 1e-5).
    :param output: ``"numpy"`` (default): every evaluation method returns numpy arrays,
        whatever the input type; ``"native"``: the backend's arrays (torch tensors, JAX arrays).
    :param context_shift: for a conditional flow (fields built with ``context_dim > 0``),
        with ``context_scale`` the standardization ``(c − context_shift)/context_scale`` the
        flow applies to every context it is given, so callers pass raw contexts; None: the
        context is passed to the fields as it is.
    :param context_scale: see ``context_shift``; positive.
    :raises ValueError: for inconsistent fields and parameters, a bad ``T``, ``scale`` or ``output``,
        blocks with different ``context_dim``, or a context standardization on an
        unconditional flow.
    :raises TypeError: for an ``eval_solver`` that is not a :class:`SolverOptions`.
    """

    history: list[dict] | None
    """The training record :func:`otflow.fit` attaches: one dict per iteration (loss, NLL,
    kinetic and Jacobian terms, NFE, learning rate, gradient norm, and ``val_nll`` /
    ``val_nll_se`` where validated); None for a flow not made by ``fit``."""

    fit_info: dict | None
    """What :func:`otflow.fit` reports about the run (iterations, best iteration and
    validation NLL, skipped iterations, seconds, backend, options, whether interrupted,
    checkpoint); None for a flow not made by ``fit``."""

    last_nfe: int | None
    """Right-hand-side evaluations of the last evaluation call (all chunks and blocks);
    None before the first."""

    context_dim: int
    """The length of the context vector of a conditional flow ``p(x | c)`` (its fields'
    ``context_dim``); 0 for an unconditional flow."""

    def __init__(self, fields: Sequence[VelocityField], params: Sequence, *, backend: str | Backend,
                 device=None, dtype="float32", T: float | Sequence[float] = 1.0, shift=None, scale=None,
                 eval_solver: SolverOptions | None = None, output: str = "numpy", context_shift=None,
                 context_scale=None):
        self.backend = get_backend(backend)
        xp = self.backend.namespace()
        self.fields = tuple(fields)
        if not self.fields:
            raise ValueError("a Flow needs at least one block")
        self.params = self._block_params(params)
        shapes = {tuple(f.event_shape) for f in self.fields}
        if len(shapes) != 1:
            raise ValueError(f"all blocks must share one event shape, got {sorted(shapes)}")
        self.event_shape = shapes.pop()
        self._set_evaluation(dtype, device, T, eval_solver, output)
        self.shift = None if shift is None else self._const(shift)
        self.scale = None if scale is None else self._const(scale)
        if self.scale is not None and not bool(xp.all(self.scale > 0)):
            raise ValueError("scale must be positive")
        dims = {getattr(f, "context_dim", 0) for f in self.fields}
        if len(dims) != 1:
            raise ValueError(f"all blocks must share one context_dim, got {sorted(dims)}")
        self.context_dim = dims.pop()
        if self.context_dim == 0 and (context_shift is not None or context_scale is not None):
            raise ValueError("context_shift/context_scale standardize the context of a conditional flow; these "
                             "fields take no context (context_dim=0): drop them")
        cshape = (self.context_dim,)
        self.context_shift = None if context_shift is None else self._const(context_shift, cshape)
        self.context_scale = None if context_scale is None else self._const(context_scale, cshape)
        if self.context_scale is not None and not bool(xp.all(self.context_scale > 0)):
            raise ValueError("context_scale must be positive")

    # ---------------------------------------------------------------------------------------
    @classmethod
    @reject_unknown_keywords
    def from_velocity(cls, field, params=None, *, backend: str | Backend | None = None, event_shape=None,
                      seed: int = 0, device=None, dtype="float32", T: float | Sequence[float] = 1.0, shift=None,
                      scale=None, eval_solver: SolverOptions | None = None, output: str = "numpy") -> "Flow":
        """A one-block flow from given dynamics, with no training.

        :param field: a :class:`~otflow.VelocityField` (``params`` given, or initialized
            from ``seed``); a pure function ``apply(params, t, x)`` with ``params``; a
            function ``v(t, x)`` (``params=None``); or a native module of the backend (a
            ``torch.nn.Module`` called as ``module(t, x)``, an Equinox module; see
            :func:`otflow.cnf.native_field`).
        :param params: the parameters, as described for ``field``.
        :param backend: the backend (name or object); required.
        :param event_shape: the shape of one sample, e.g. ``(2,)``; required for functions
            and for modules without an ``event_shape`` attribute.
        :param seed: seeds the initialization of a field given without parameters.
        :param device: see :class:`Flow`.
        :param dtype: see :class:`Flow`.
        :param T: see :class:`Flow`.
        :param shift: see :class:`Flow`.
        :param scale: see :class:`Flow`.
        :param eval_solver: see :class:`Flow`.
        :param output: see :class:`Flow`.
        :returns: the flow.
        :raises ValueError: without ``backend``, or without ``event_shape`` where it is needed.
        :raises TypeError: for an object that is no velocity field.
        """
        if backend is None:
            raise ValueError("Flow.from_velocity needs backend= (e.g. 'torch', 'jax' or 'numpy')")
        b = get_backend(backend)
        field, params = _velocity_field(field, params, event_shape, b)
        if params is None:
            dt = getattr(b.namespace(), dtype) if isinstance(dtype, str) else dtype
            params = field.init(b, b.key(seed), dtype=dt, device=b.device(device) if device is None or
                                isinstance(device, str) else device)
        return cls([field], [params], backend=b, device=device, dtype=dtype, T=T, shift=shift, scale=scale,
                   eval_solver=eval_solver, output=output)

    def _const(self, value, shape=None):
        arr = np.asarray(self.backend.to_numpy(value) if self.backend.owns(value) else value, dtype=np.float64)
        arr = np.broadcast_to(arr, self.event_shape if shape is None else shape).copy()
        if not np.all(np.isfinite(arr)):
            raise ValueError("shift and scale must be finite")
        return self.backend.asarray(arr, dtype=self.dtype, device=self.device)

    @property
    def log_scale_sum(self) -> float:
        """``Σ log scale``, the log-determinant of the standardization (0 without one)."""
        if self.scale is None:
            return 0.0
        return float(np.sum(np.log(self.backend.to_numpy(self.scale).astype(np.float64))))

    def _standardize(self, x):
        if self.shift is not None:
            x = x - self.shift
        if self.scale is not None:
            x = x / self.scale
        return x

    def _unstandardize(self, x):
        if self.scale is not None:
            x = x * self.scale
        if self.shift is not None:
            x = x + self.shift
        return x

    def _context(self, context, n: int):
        """The standardized contexts of ``n`` rows: ``context`` of shape ``(context_dim,)``
        (one for every row) or ``(n, context_dim)``; None for an unconditional flow.

        :raises ValueError: a context missing for a conditional flow, given to an
            unconditional one, or of the wrong shape or with NaN.
        """
        if self.context_dim == 0:
            if context is not None:
                raise ValueError("this flow is unconditional (it was built without a context), so context= does not "
                                 "apply; drop it, or fit a conditional flow with otflow.fit(x, context=c)")
            return None
        if context is None:
            raise ValueError(f"this flow is conditional, p(x | c) with a {self.context_dim}-dimensional context; pass "
                             f"context= of shape ({self.context_dim},) (one for all rows) or (n, {self.context_dim})")
        shape = tuple(getattr(context, "shape", np.shape(context)))
        if shape == (self.context_dim,):
            one = context[None, ...] if self.backend.owns(context) else np.asarray(context)[None]
            c = self.backend.namespace().broadcast_to(self._input(one, "context", shape), (n, self.context_dim))
        else:
            c = self._input(context, "context", (self.context_dim,))
            if c.shape[0] != n:
                raise ValueError(f"context has {c.shape[0]} rows but there are {n} points; pass one context per "
                                 f"point, shape ({n}, {self.context_dim}), or one for all, shape ({self.context_dim},)")
        if self.context_shift is not None:
            c = c - self.context_shift
        if self.context_scale is not None:
            c = c / self.context_scale
        return c

    def _chunk_function(self, kind: str, block_kwargs):
        """The uncompiled chunk function of ``kind`` (``"log_prob"``, ``"transform"``, ``"inverse"``)."""
        if kind == "log_prob":
            if self.eval_solver.is_adaptive():
                block_kwargs = tuple(dict(kw, norm=DENSITY_NORM) for kw in block_kwargs)
            return functools.partial(_log_prob_chunk, self.fields, self.backend, block_kwargs)
        return functools.partial(_transport_chunk, self.fields, self.backend, block_kwargs, kind == "inverse")

    # ---------------------------------------------------------------------------------------
    # public evaluation

    @reject_unknown_keywords
    def log_prob(self, x, *, context=None, batch_size: int | None = None, on_failure: str = "raise"):
        """``log p(x)`` per row, with the exact divergence and the evaluation solver.

        Rows share adaptive steps within a chunk, so a point's value depends on its
        batch-mates only through the solver's error (bounded by the evaluation
        tolerance; tighten it with :meth:`with_eval_solver` for reproducible
        per-point values).

        :param x: points, shape ``(n, *event_shape)``: a numpy array, a list, or an array
            of the backend.
        :param context: a conditional flow's context (raw; the flow standardizes it): shape
            ``(context_dim,)`` for every row, or ``(n, context_dim)`` one per row. None for
            an unconditional flow.
        :param batch_size: rows per chunk (default: as many as keep the exact trace's
            ``d × rows × d`` basis batch under 2²⁵ elements).
        :param on_failure: ``"raise"`` (a :class:`~otflow.SolverError` naming remedies), or
            ``"nan"``: NaN, with a warning, for the points whose solve fails.
        :returns: shape ``(n,)``, in the flow's :attr:`output` type.
        :raises CapabilityError: on a backend without autodiff (the trace needs it).
        :raises ValueError: for bad points, or a context missing (conditional flow),
            unexpected (unconditional flow) or wrong-shaped.
        """
        xb = self._input(x)
        c = self._context(context, xb.shape[0])
        out = self._run_chunked("log_prob", self._standardize(xb), batch_size, on_failure, context=c)
        return self._output(out - self.log_scale_sum)

    @reject_unknown_keywords
    def transform(self, x, *, context=None, batch_size: int | None = None, on_failure: str = "raise"):
        """Data → latent: ``z = φ_T(standardize(x))``.

        :param x: points, shape ``(n, *event_shape)``.
        :param context: a conditional flow's context, as for :meth:`log_prob`.
        :param batch_size: rows per chunk, as for :meth:`log_prob`.
        :param on_failure: as for :meth:`log_prob`.
        :returns: ``z``, shaped like ``x``, in the flow's :attr:`output` type.
        """
        xb = self._input(x)
        c = self._context(context, xb.shape[0])
        return self._output(self._run_chunked("transform", self._standardize(xb), batch_size, on_failure,
                                              context=c))

    @reject_unknown_keywords
    def inverse(self, z, *, context=None, batch_size: int | None = None, on_failure: str = "raise"):
        """Latent → data: integrate backwards from ``T`` to 0 and undo the standardization.

        :param z: latent points, shape ``(n, *event_shape)``.
        :param context: a conditional flow's context, as for :meth:`log_prob`.
        :param batch_size: rows per chunk, as for :meth:`log_prob`.
        :param on_failure: as for :meth:`log_prob`.
        :returns: ``x``, shaped like ``z``, in the flow's :attr:`output` type.
        """
        zb = self._input(z, "z")
        c = self._context(context, zb.shape[0])
        return self._output(self._unstandardize(self._run_chunked("inverse", zb, batch_size, on_failure,
                                                                  context=c)))

    @reject_unknown_keywords(replaced=_SAMPLE_REPLACED)
    def sample(self, n: int, *, context=None, seed: int = 0, batch_size: int | None = None):
        """``n`` samples: standard normal draws pushed through the inverse flow.

        :param n: the number of samples.
        :param context: a conditional flow's context: shape ``(context_dim,)`` (every sample
            from ``p(x | c)`` of that one ``c``) or ``(n, context_dim)`` (sample ``i`` from
            ``p(x | c_i)``); raw, the flow standardizes it. None for an unconditional flow.
        :param seed: seeds the base draws (the same seed gives the same samples).
        :param batch_size: rows per chunk, as for :meth:`log_prob`.
        :returns: shape ``(n, *event_shape)``, in the flow's :attr:`output` type.
        :raises ValueError: for ``n`` not a positive int, or a context missing, unexpected
            or wrong-shaped.
        """
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        c = self._context(context, int(n))
        b = self.backend
        z = b.normal(b.key(seed), (int(n), *self.event_shape), dtype=self.dtype, device=self.device)
        return self._output(self._unstandardize(self._run_chunked("inverse", z, batch_size, "raise", context=c)))

    @reject_unknown_keywords
    def trajectory(self, x, times: Sequence[float], *, context=None):
        """States along the flow from data ``x``, in the flow's standardized coordinates.

        :param x: points, shape ``(n, *event_shape)``.
        :param times: increasing times in ``[0, ΣT]`` (the blocks run one after the other).
        :param context: a conditional flow's context, as for :meth:`log_prob`.
        :returns: shape ``(len(times), n, *event_shape)``, in the flow's :attr:`output` type.
        :raises ValueError: for times that do not increase within ``[0, ΣT]``.
        :raises SolverError: when a solve fails.
        """
        xb = self._input(x)
        times = np.asarray(times, dtype=np.float64)
        total = sum(self.T)
        if times.ndim != 1 or times.size == 0 or np.any(np.diff(times) <= 0) or times[0] < 0 or times[-1] > total:
            raise ValueError(f"times must increase within [0, {total:g}], got {times}")
        b = self.backend
        kw = dict(self.eval_solver.odeint_kwargs(), backend=b, throw=False, check_inputs=False, loop_kind="forward")
        c = self._context(context, xb.shape[0])
        params, z = b.stop_gradient((self.params, self._standardize(xb)))
        offset, found = 0.0, {}
        for field, p, T in zip(self.fields, params, self.T):
            local = [float(t - offset) for t in times if offset - 1e-12 <= t <= offset + T + 1e-12]
            grid = sorted(set([0.0, *[min(max(t, 0.0), T) for t in local], T]))
            sol = odeint(flow_rhs(field), z, grid, args=p if c is None else (p, c), **kw)
            raise_for_status(sol, b, max_steps=self.eval_solver.max_steps)
            for t in local:
                found.setdefault(round(t + offset, 12), sol.ys[grid.index(min(max(t, 0.0), T)), ...])
            z = sol.ys[-1, ...]
            offset += T
        return self._output(b.namespace().stack([found[round(float(t), 12)] for t in times]))

    # ---------------------------------------------------------------------------------------
    # saving

    def header(self) -> dict:
        """The JSON description saved with the parameters.

        :raises ValueError: when the evaluation solver is a user-defined method.
        """
        b = self.backend
        dtype_name = np.dtype(b.to_numpy(b.namespace().zeros((), dtype=self.dtype)).dtype).name
        return {
            "kind": "flow",
            "fields": [f.config() for f in self.fields],
            "T": list(self.T),
            "event_shape": list(self.event_shape),
            "dtype": dtype_name,
            "shift": None if self.shift is None else b.to_numpy(self.shift).astype(np.float64).tolist(),
            "scale": None if self.scale is None else b.to_numpy(self.scale).astype(np.float64).tolist(),
            "eval_solver": self.eval_solver.config(),
            **self._context_header(),
        }

    def _context_header(self) -> dict:
        """A conditional flow's context standardization (nothing for an unconditional flow,
        whose header stays the one earlier versions wrote)."""
        if self.context_dim == 0:
            return {}
        b = self.backend
        return {name: None if value is None else b.to_numpy(value).astype(np.float64).tolist()
                for name, value in (("context_shift", self.context_shift), ("context_scale", self.context_scale))}

    def __repr__(self) -> str:
        context = f", context_dim={self.context_dim}" if self.context_dim else ""
        return (f"Flow(blocks={len(self.fields)}, event_shape={self.event_shape}{context}, T={self.T}, "
                f"backend={self.backend.name!r}, dtype={self.dtype}, output={self.output!r})")


# ------------------------------------------------------------------------------------------
# helpers of Flow


def _velocity_field(field, params, event_shape, backend: Backend) -> tuple[VelocityField, Any]:
    """``(field, params)`` for :meth:`Flow.from_velocity`; ``params`` None asks for an
    initialization."""
    if isinstance(field, VelocityField):
        return field, params
    native = native_field(field, params, event_shape=event_shape, backend=backend)
    if native is not None:
        return native, native.initial_params
    if not callable(field):
        raise TypeError(f"cannot use a {type(field).__name__} as a velocity field: pass an otflow.MLP or "
                        "FunctionField, a function v(t, x), a function apply(params, t, x) with params=, or a "
                        f"native module of the {backend.name} backend")
    if event_shape is None:
        raise ValueError("event_shape= is needed for a plain function field, e.g. event_shape=(2,)")
    shape = _as_event_shape(event_shape, "the field")
    if params is None:
        return FunctionField(_ignore_params(field), (), shape), ()
    return FunctionField(field, params, shape), params


def _ignore_params(velocity):
    """``apply(params, t, x)`` for a field ``v(t, x)`` without parameters."""

    def apply(params, t, x):
        return velocity(t, x)

    return apply


def _rows_padded(xp, rows, n: int):
    """``rows`` with zero rows appended up to ``n`` (the padding of a compiled chunk)."""
    m = rows.shape[0]
    if m == n:
        return rows
    pad = xp.zeros((n - m, *rows.shape[1:]), dtype=rows.dtype, device=_device_of(rows))
    return xp.concat([rows, pad], axis=0)


def _device_of(x):
    from array_api_compat import device

    return device(x)


def _log_prob_chunk(fields, backend: Backend, block_kwargs, params, T, x, context=None):
    """``(log N(z(T)) − Δlogp, status, nfe)`` of standardized points (the standardization's
    log-determinant is the caller's); a conditional flow's blocks get ``context``."""
    xp = backend.namespace()
    params, T, x, context = backend.stop_gradient((params, T, x, context))
    total = xp.zeros((x.shape[0],), dtype=x.dtype, device=backend.device_of(x))
    z, status, nfe = x, None, 0
    for i, (field, p, kw) in enumerate(zip(fields, params, block_kwargs)):
        args = p if context is None else (p, context)
        sol = odeint(density_rhs(field, backend=backend), (z, total), time_span(xp, T[i]), args=args, **kw)
        z, total = sol.ys[0][-1, ...], sol.ys[1][-1, ...]
        status = sol.status if status is None else xp.maximum(status, sol.status)
        nfe = nfe + sol.stats.nfe
    return standard_normal_logpdf(xp, z) - total, status, nfe


def _transport_chunk(fields, backend: Backend, block_kwargs, reverse: bool, params, T, x, context=None):
    """``(x after the blocks, status, nfe)``: forward from 0 to ``T``, or with ``reverse``
    from ``T`` to 0 through the blocks in reverse order (with ``context`` for a conditional flow)."""
    xp = backend.namespace()
    params, T, x, context = backend.stop_gradient((params, T, x, context))
    status, nfe = None, 0
    for i in (reversed(range(len(fields))) if reverse else range(len(fields))):
        args = params[i] if context is None else (params[i], context)
        sol = odeint(flow_rhs(fields[i]), x, time_span(xp, T[i], reverse=reverse), args=args,
                     **block_kwargs[i])
        x = sol.ys[-1, ...]
        status = sol.status if status is None else xp.maximum(status, sol.status)
        nfe = nfe + sol.stats.nfe
    return x, status, nfe


# ------------------------------------------------------------------------------------------
# loading


def flow_from_header(header: dict, arrays: dict, *, backend=None, device=None, prefix: str = "params",
                     output: str = "numpy"):
    """Rebuild a :class:`Flow` (or, for a header of kind ``"multiscale"``, a
    :class:`~otflow.MultiscaleFlow`) from a saved header and its arrays on any backend.

    :param header: the flow's header (:meth:`Flow.header`).
    :param arrays: the arrays read from the file.
    :param backend: the backend to load on (the default backend when None).
    :param device: the device to load on.
    :param prefix: the name under which the parameters are stored.
    :param output: the new flow's :attr:`Flow.output`.
    :returns: the flow.
    :raises ModelFileError: for an incomplete or incompatible header or missing arrays.
    """
    kind = header.get("kind", "flow")
    if kind == "multiscale":
        from .multiscale_flow import multiscale_flow_from_header

        return multiscale_flow_from_header(header, arrays, backend=backend, device=device, prefix=prefix,
                                           output=output)
    if kind != "flow":
        raise ModelFileError(f"the file holds a model of kind {kind!r}, which this otflow version cannot read "
                             "(it reads 'flow' and 'multiscale'); load it with the otflow version that wrote it")
    b = get_backend(backend if backend is not None else default_backend())
    dev = b.device(device)
    try:
        fields = [field_from_config(c) for c in header["fields"]]
        dtype = header["dtype"]
        dt = getattr(b.namespace(), dtype)
        ref = get_backend("numpy")
        templates = tuple(f.init(ref, ref.key(0), dtype=np.float64) for f in fields)
        params = fill_tree(templates, arrays, prefix, lambda v: b.asarray(np.asarray(v), dtype=dt, device=dev))
        return Flow(fields, params, backend=b, device=dev, dtype=dtype, T=header["T"], shift=header["shift"],
                    scale=header["scale"], eval_solver=SolverOptions.from_config(header["eval_solver"]),
                    output=output, context_shift=header.get("context_shift"),
                    context_scale=header.get("context_scale"))
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"the model header is incomplete or from an incompatible version ({e!r})") from None


@reject_unknown_keywords
def load(path, *, backend: str | Backend | None = None, device=None, output: str = "numpy"):
    """Load a flow saved with :meth:`Flow.save` or :meth:`~otflow.MultiscaleFlow.save` (or
    the best model in a training checkpoint) on any backend: a flow trained on torch loads
    on jax and back.

    :param path: the file.
    :param backend: the backend to load on (the default backend when None).
    :param device: the device to load on.
    :param output: the flow's :attr:`Flow.output`, ``"numpy"`` or ``"native"``.
    :returns: the flow: a :class:`Flow`, or a :class:`~otflow.MultiscaleFlow` for an image model.
    :raises ModelFileError: for a missing, truncated, corrupted or incompatible file.
    """
    _check_output(output)
    arrays, header = read_file(path)
    prefix = "params"
    if header.get("kind") == "checkpoint":  # its best parameters, else the current training ones
        prefix = "best" if any(k.startswith("best.") for k in arrays) else "train.fields"
    flow_header = header.get("flow") if header.get("kind") == "checkpoint" else header
    if not isinstance(flow_header, dict):
        raise ModelFileError(f"{str(path)!r}: the checkpoint's header lacks its flow description; it was written by "
                             "an incompatible otflow version")
    return flow_from_header(flow_header, arrays, backend=backend, device=device, prefix=prefix, output=output)
