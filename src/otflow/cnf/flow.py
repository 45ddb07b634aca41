"""The :class:`Flow`: a chain of CNF blocks, their parameters, and how to evaluate them.

Conventions (FFJORD's): data ``x`` sits at ``t = 0`` and the latent ``z`` at
``t = T``; ``dz/dt = v(t, z)`` pushes data to the standard normal base, and

    log p(x) = log N(z(T); 0, I) + ∫₀ᵀ tr(∂v/∂z) dt − Σ log scale

(the last term undoes the stored standardization ``(x − shift)/scale``).
Blocks are chained: block ``k`` starts where block ``k−1`` ended.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np

from .dynamics import DENSITY_NORM, density_rhs, flow_rhs, standard_normal_logpdf
from ..base.errors import SolverError, Status
from .fields import FunctionField, VelocityField
from ..ode.odeint import DEFAULT_MAX_STEPS, odeint, raise_for_status
from ..base.options import reject_unknown_keywords, unknown_option_message
from ..base import Backend, get_backend

__all__ = ["Flow", "SolverOptions", "load", "flow_from_header"]

ON_FAILURE = ("raise", "nan")
#: default chunking of evaluation: at most this many elements in the exact trace's basis batch
_EXACT_TRACE_BUDGET = 1 << 25


@dataclass(frozen=True)
class SolverOptions:
    """How to integrate: passed to :func:`otflow.odeint` (``norm`` is chosen by the flow)."""

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    n_steps: int | None = None
    max_steps: int = DEFAULT_MAX_STEPS

    def odeint_kwargs(self) -> dict:
        kw: dict[str, Any] = {"method": self.method, "max_steps": self.max_steps}
        if self.method == "dopri5":
            kw.update(rtol=self.rtol, atol=self.atol)
            if self.step_size is not None:
                kw["step_size"] = self.step_size
        else:
            kw.update(step_size=self.step_size, n_steps=self.n_steps)
        return kw

    def is_adaptive(self) -> bool:
        return self.method == "dopri5"


class Flow:
    """A continuous normalizing flow: ``len(fields)`` CNF blocks over ``[0, T]`` each.

    Parameters
    ----------
    fields:
        Velocity fields (:class:`~otflow.MLP` or a :class:`~otflow.FunctionField`), one per block.
    params:
        One parameter tree per block.
    backend, device, dtype:
        Where and in what precision the flow computes.
    T:
        The integration time of every block (a float or one per block).
    shift, scale:
        The data standardization ``(x − shift)/scale`` applied before the flow (and undone
        by :meth:`inverse` and :meth:`sample`); ``log_prob`` includes its log-determinant.
    eval_solver:
        The solver for evaluation (default: Dormand–Prince, rtol = atol = 1e-5). The
        divergence is the exact trace during evaluation.
    """

    def __init__(self, fields: Sequence[VelocityField], params: Sequence, *, backend: str | Backend,
                 device=None, dtype="float32", T: float | Sequence[float] = 1.0, shift=None, scale=None,
                 eval_solver: SolverOptions | None = None):
        self.backend = get_backend(backend)
        xp = self.backend.namespace()
        self.fields = tuple(fields)
        if not self.fields:
            raise ValueError("a Flow needs at least one block")
        self.params = tuple(params)
        if len(self.params) != len(self.fields):
            raise ValueError(f"{len(self.fields)} fields but {len(self.params)} parameter trees")
        shapes = {tuple(f.event_shape) for f in self.fields}
        if len(shapes) != 1:
            raise ValueError(f"all blocks must share one event shape, got {sorted(shapes)}")
        self.event_shape = shapes.pop()
        self.dtype = getattr(xp, dtype) if isinstance(dtype, str) else dtype
        self.backend.check_dtype(self.dtype)
        self.device = self.backend.device(device) if (device is None or isinstance(device, str)) else device
        Ts = (T,) * len(self.fields) if isinstance(T, (int, float)) else tuple(T)
        if len(Ts) != len(self.fields) or not all(isinstance(t, (int, float)) and t > 0 and math.isfinite(t)
                                                   for t in Ts):
            raise ValueError(f"T must be a positive finite float (or one per block), got {T!r}")
        self.T = tuple(float(t) for t in Ts)
        self.shift = None if shift is None else self._const(shift)
        self.scale = None if scale is None else self._const(scale)
        if self.scale is not None and not bool(xp.all(self.scale > 0)):
            raise ValueError("scale must be positive")
        self.eval_solver = eval_solver or SolverOptions()
        self._compiled: dict = {}

    # ---------------------------------------------------------------------------------------
    @classmethod
    @reject_unknown_keywords
    def from_velocity(cls, field, params=None, *, event_shape=None, backend=None, seed: int = 0, **options) -> "Flow":
        """A one-block flow from given dynamics, with no training.

        ``field`` is a :class:`~otflow.VelocityField` (``params`` given, or initialized from
        ``seed``), a pure function ``apply(params, t, x)`` with ``params``, a function
        ``v(t, x)`` (``params=None``), or a native module of the backend (a
        ``torch.nn.Module`` called as ``module(t, x)``, an Equinox module).
        Other keyword arguments go to :class:`Flow`.
        """
        if backend is None:
            raise ValueError("Flow.from_velocity needs backend= (e.g. 'torch', 'jax' or 'numpy')")
        b = get_backend(backend)
        if not isinstance(field, VelocityField):
            native = b.as_field(field, params, event_shape=event_shape)
            if native is not None:
                field, params = native, native.initial_params
            elif callable(field):
                if event_shape is None:
                    raise ValueError("event_shape= is needed for a plain function field, e.g. event_shape=(2,)")
                shape = (event_shape,) if isinstance(event_shape, int) else tuple(event_shape)
                if params is None:
                    fn = field
                    field = FunctionField(lambda p, t, x: fn(t, x), (), shape)
                    params = ()
                else:
                    field = FunctionField(field, params, shape)
            else:
                raise TypeError(f"cannot use a {type(field).__name__} as a velocity field")
        if params is None:
            dtype = options.get("dtype", "float32")
            dt = getattr(b.namespace(), dtype) if isinstance(dtype, str) else dtype
            params = field.init(b, b.key(seed), dtype=dt, device=b.device(options.get("device")))
        return cls([field], [params], backend=b, **options)

    def _const(self, value):
        arr = np.asarray(self.backend.to_numpy(value) if self.backend.owns(value) else value, dtype=np.float64)
        arr = np.broadcast_to(arr, self.event_shape).copy()
        if not np.all(np.isfinite(arr)):
            raise ValueError("shift and scale must be finite")
        return self.backend.asarray(arr, dtype=self.dtype, device=self.device)

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def log_scale_sum(self) -> float:
        if self.scale is None:
            return 0.0
        return float(np.sum(np.log(self.backend.to_numpy(self.scale).astype(np.float64))))

    def with_eval_solver(self, **changes) -> "Flow":
        """A copy of this flow evaluating with other solver settings (e.g. ``rtol=1e-7``)."""
        clone = self._clone()
        clone.eval_solver = replace(self.eval_solver, **changes)
        return clone

    def _clone(self) -> "Flow":
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._compiled = {}
        return clone

    # ---------------------------------------------------------------------------------------
    # inputs and outputs in the user's array type

    def _input(self, x, name: str = "x"):
        b = self.backend
        native = b.owns(x)
        host = isinstance(x, np.ndarray) or not native
        if host:
            try:
                x = np.asarray(x)
            except Exception as e:  # ragged lists, tensors that need .detach(), ...
                raise TypeError(f"{name} could not be read as an array ({type(e).__name__}: {e}); pass a numpy "
                                f"array or a {b.name} array of shape (n, {', '.join(map(str, self.event_shape))})"
                                ) from None
            if x.dtype.kind == "c":
                raise TypeError(f"{name} is complex ({x.dtype}); a flow needs real numbers (take .real)")
            if x.dtype.kind not in "biuf":
                raise TypeError(f"{name} must be real numbers, got dtype {x.dtype}; convert it with "
                                f"np.asarray({name}, dtype=float)")
        shape = tuple(x.shape)
        if shape == self.event_shape:
            raise ValueError(f"{name} has shape {shape}: a single point; pass a batch of shape "
                             f"(n, {', '.join(map(str, self.event_shape))}), e.g. {name}[None]")
        if len(shape) != 1 + len(self.event_shape) or shape[1:] != self.event_shape:
            raise ValueError(f"{name} must have shape (n, {', '.join(map(str, self.event_shape))}), got {shape}"
                             f" (the flow was built for {self.dim}-dimensional points)")
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
        else:
            if not np.all(np.isfinite(x)):
                raise ValueError(f"{name} contains NaN or inf")
            xb = b.asarray(np.asarray(x, dtype=np.float64), dtype=self.dtype, device=self.device)
            if not bool(xp.all(xp.isfinite(xb))):
                raise ValueError(f"{name} has values beyond the range of the flow's dtype {self.dtype} "
                                 f"(max |{name}| = {np.max(np.abs(x.astype(np.float64))):.3g}); rescale them")
        return xb, native

    def _output(self, y, native: bool):
        return y if native else self.backend.to_numpy(y)

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

    # ---------------------------------------------------------------------------------------
    # the solves (one chunk; jitted per kind on compiling backends)

    def _solve_kwargs(self) -> dict:
        return dict(backend=self.backend, throw=False, check_inputs=False, **self.eval_solver.odeint_kwargs())

    def _logp_chunk(self, params, x):
        xp = self.backend.namespace()
        kw = self._solve_kwargs()
        if self.eval_solver.is_adaptive():
            kw["norm"] = DENSITY_NORM
        z = x
        total = xp.zeros((x.shape[0],), dtype=x.dtype, device=self.backend.device_of(x))
        status, nfe = None, 0
        for field, p, T in zip(self.fields, params, self.T):
            sol = odeint(density_rhs(self.backend, field, "exact"), (z, total), [0.0, T], args=p, **kw)
            z, total = sol.ys[0][-1, ...], sol.ys[1][-1, ...]
            status = sol.status if status is None else xp.maximum(status, sol.status)
            nfe = nfe + sol.stats.nfe
        return standard_normal_logpdf(xp, z) - total, status, nfe

    def _transport_chunk(self, params, x, reverse: bool):
        xp = self.backend.namespace()
        status, nfe = None, 0
        blocks = list(zip(self.fields, params, self.T))
        for field, p, T in (reversed(blocks) if reverse else blocks):
            sol = odeint(flow_rhs(field), x, [T, 0.0] if reverse else [0.0, T], args=p, **self._solve_kwargs())
            x = sol.ys[-1, ...]
            status = sol.status if status is None else xp.maximum(status, sol.status)
            nfe = nfe + sol.stats.nfe
        return x, status, nfe

    def _compiled_fn(self, kind: str):
        if kind not in self._compiled:
            if kind == "log_prob":
                fn = self._logp_chunk
            elif kind == "transform":
                fn = lambda params, x: self._transport_chunk(params, x, False)  # noqa: E731
            else:
                fn = lambda params, x: self._transport_chunk(params, x, True)  # noqa: E731
            self._compiled[kind] = self.backend.jit(fn)
        return self._compiled[kind]

    def _run_chunked(self, kind: str, x, batch_size: int | None, on_failure: str):
        """Evaluate ``kind`` over ``x`` in chunks; pad the last chunk on compiling backends so
        that one compiled function serves every chunk."""
        if not isinstance(on_failure, str):
            raise TypeError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, got {on_failure!r}")
        if on_failure not in ON_FAILURE:
            raise ValueError(unknown_option_message("on_failure", on_failure, ON_FAILURE))
        b, xp = self.backend, self.backend.namespace()
        n = x.shape[0]
        if batch_size is None:
            # the exact trace vectorizes d VJPs over the chunk: bound d·rows·d elements
            batch_size = min(n, max(256, _EXACT_TRACE_BUDGET // (self.dim * self.dim)))
        if (isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer))
                or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        batch_size = int(batch_size)
        fn = self._compiled_fn(kind)
        outs, self.last_nfe = [], 0
        for start in range(0, n, batch_size):
            chunk = x[start:start + batch_size, ...]
            m = chunk.shape[0]
            if b.has_jit and m < batch_size and n > batch_size:
                pad = xp.zeros((batch_size - m, *chunk.shape[1:]), dtype=chunk.dtype, device=b.device_of(chunk))
                chunk = xp.concat([chunk, pad], axis=0)
            out, status, nfe = fn(self.params, chunk)
            self.last_nfe += int(b.to_numpy(nfe))
            if int(b.to_numpy(status)) != Status.SUCCESS:
                out = self._on_chunk_failure(kind, chunk[:m, ...], status, on_failure)
            outs.append(out[:m, ...])
        return xp.concat(outs, axis=0) if len(outs) > 1 else outs[0]

    def _on_chunk_failure(self, kind, chunk, status, on_failure):
        b, xp = self.backend, self.backend.namespace()
        if on_failure == "raise":
            raise SolverError(
                f"{kind}: the evaluation solve failed ({Status(int(b.to_numpy(status))).name}) on a batch of "
                f"{chunk.shape[0]} points. An outlier far from the data often causes it. Remedies: "
                f"on_failure='nan' (NaN for the failing points, with a warning), a looser eval tolerance "
                f"(flow.with_eval_solver(rtol=..., atol=...)), or more max_steps.")
        # one point at a time: the failing ones get NaN
        fn = self._compiled_fn(kind)
        rows, failed = [], 0
        for i in range(chunk.shape[0]):
            out, st, _ = fn(self.params, chunk[i:i + 1, ...])
            if int(b.to_numpy(st)) != Status.SUCCESS:
                out = xp.full(out.shape, float("nan"), dtype=out.dtype, device=b.device_of(out))
                failed += 1
            rows.append(out)
        warnings.warn(f"{kind}: {failed} of {chunk.shape[0]} points failed to solve and are NaN", RuntimeWarning,
                      stacklevel=4)
        return xp.concat(rows, axis=0)

    # ---------------------------------------------------------------------------------------
    # public evaluation

    @reject_unknown_keywords
    def log_prob(self, x, *, batch_size: int | None = None, on_failure: str = "raise"):
        """``log p(x)`` per row, with the exact divergence and the evaluation solver.

        Rows share adaptive steps within a chunk, so a point's value depends on its
        batch-mates only through the solver's error (bounded by the evaluation
        tolerance; tighten it with :meth:`with_eval_solver` for reproducible
        per-point values). ``on_failure="nan"`` returns NaN (with a warning) for points
        whose solve fails instead of raising.
        """
        xb, native = self._input(x)
        out = self._run_chunked("log_prob", self._standardize(xb), batch_size, on_failure)
        return self._output(out - self.log_scale_sum, native)

    @reject_unknown_keywords
    def transform(self, x, *, batch_size: int | None = None, on_failure: str = "raise"):
        """Data → latent: ``z = φ_T(standardize(x))``."""
        xb, native = self._input(x)
        return self._output(self._run_chunked("transform", self._standardize(xb), batch_size, on_failure), native)

    @reject_unknown_keywords
    def inverse(self, z, *, batch_size: int | None = None, on_failure: str = "raise"):
        """Latent → data: integrate backwards from ``T`` to 0 and undo the standardization."""
        zb, native = self._input(z, "z")
        return self._output(self._unstandardize(self._run_chunked("inverse", zb, batch_size, on_failure)), native)

    @reject_unknown_keywords
    def sample(self, n: int, *, seed: int = 0, batch_size: int | None = None, numpy: bool = True):
        """``n`` samples: base draws pushed through the inverse flow (numpy unless ``numpy=False``)."""
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"n must be a positive int, got {n!r}")
        n = int(n)
        b = self.backend
        z = b.normal(b.key(seed), (n, *self.event_shape), dtype=self.dtype, device=self.device)
        x = self._unstandardize(self._run_chunked("inverse", z, batch_size, "raise"))
        return b.to_numpy(x) if numpy else x

    @reject_unknown_keywords
    def trajectory(self, x, times: Sequence[float]):
        """States at ``times`` (in ``[0, ΣT]``, increasing) starting from data ``x``, in the
        flow's standardized coordinates; shape ``(len(times), n, *event_shape)``."""
        xb, native = self._input(x)
        times = np.asarray(times, dtype=np.float64)
        total = sum(self.T)
        if times.ndim != 1 or times.size == 0 or np.any(np.diff(times) <= 0) or times[0] < 0 or times[-1] > total:
            raise ValueError(f"times must increase within [0, {total:g}], got {times}")
        xp, z, offset, found = self.backend.namespace(), self._standardize(xb), 0.0, {}
        for field, p, T in zip(self.fields, self.params, self.T):
            local = [float(t - offset) for t in times if offset - 1e-12 <= t <= offset + T + 1e-12]
            grid = sorted(set([0.0, *[min(max(t, 0.0), T) for t in local], T]))
            sol = odeint(flow_rhs(field), z, grid, args=p, **self._solve_kwargs())
            raise_for_status(sol, self.backend)
            for t in local:
                found.setdefault(round(t + offset, 12), sol.ys[grid.index(min(max(t, 0.0), T)), ...])
            z = sol.ys[-1, ...]
            offset += T
        return self._output(xp.stack([found[round(float(t), 12)] for t in times]), native)

    # ---------------------------------------------------------------------------------------
    # saving

    def header(self) -> dict:
        """The JSON description saved with the parameters."""
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
            "eval_solver": asdict(self.eval_solver),
        }

    def save(self, path, *, metadata: dict | None = None):
        """Write the flow to ``path``: parameters in safetensors, a JSON header, no pickle;
        atomic (a crash mid-write leaves any previous file intact). Returns the path."""
        from .serialize import named_arrays, write_file

        header = self.header()
        if metadata:
            header["metadata"] = metadata
        arrays = {k: self.backend.to_numpy(v) for k, v in named_arrays(self.params, "params").items()}
        return write_file(path, arrays, header)

    def __repr__(self) -> str:
        return (f"Flow(blocks={len(self.fields)}, event_shape={self.event_shape}, T={self.T}, "
                f"backend={self.backend.name!r}, dtype={self.dtype})")


def flow_from_header(header: dict, arrays: dict, *, backend=None, device=None, prefix: str = "params") -> Flow:
    """Rebuild a :class:`Flow` from a saved header and its arrays on any backend."""
    from .fields import field_from_config
    from .serialize import ModelFileError, fill_tree
    from ..base import default_backend

    b = get_backend(backend if backend is not None else default_backend())
    dev = b.device(device)
    try:
        fields = [field_from_config(c) for c in header["fields"]]
        dtype = header["dtype"]
        xp = b.namespace()
        dt = getattr(xp, dtype)
        ref = get_backend("numpy")
        templates = tuple(f.init(ref, ref.key(0), dtype=np.float64) for f in fields)
        params = fill_tree(templates, arrays, prefix, lambda v: b.asarray(np.asarray(v), dtype=dt, device=dev))
        return Flow(fields, params, backend=b, device=dev, dtype=dtype, T=header["T"], shift=header["shift"],
                    scale=header["scale"], eval_solver=SolverOptions(**header["eval_solver"]))
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFileError(f"the model header is incomplete or from an incompatible version ({e!r})") from None


@reject_unknown_keywords
def load(path, *, backend: str | Backend | None = None, device=None) -> Flow:
    """Load a flow saved with :meth:`Flow.save` (or the best model in a training checkpoint)
    on any backend: a flow trained on torch loads on jax and back."""
    from .serialize import ModelFileError, read_file

    arrays, header = read_file(path)
    prefix = "params"
    if header.get("kind") == "checkpoint":  # its best parameters, else the current training ones
        prefix = "best" if any(k.startswith("best.") for k in arrays) else "train.fields"
    flow_header = header.get("flow") if header.get("kind") == "checkpoint" else header
    if not isinstance(flow_header, dict):
        raise ModelFileError(f"{str(path)!r}: the checkpoint's header lacks its flow description; it was written by "
                             "an incompatible otflow version")
    return flow_from_header(flow_header, arrays, backend=backend, device=device, prefix=prefix)
