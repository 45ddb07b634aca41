"""The calling convention of the CNF layer: the backend is a keyword (``backend=``) or
inferred from the arrays, never a leading positional argument.

Earlier versions took the backend first (``probe_vjp(backend, fn, x, eps)``);
:func:`backend_keyword` turns such a call into a :class:`TypeError` that shows the
new form instead of a confusing error further down.
"""
from __future__ import annotations

import functools
import inspect

from ..base import Backend

__all__ = ["backend_keyword", "call_form"]


def call_form(fn) -> str:
    """``name(a, b, *, backend=None, ...)``: the signature of ``fn`` without annotations."""
    params = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(fn).parameters.values()]
    return f"{fn.__name__}{inspect.Signature(params)}"


def backend_keyword(fn):
    """Decorator: a call with a :class:`~otflow.base.Backend` as the first positional
    argument (the old form) raises :class:`TypeError` naming the new form.

    A call with too many positional arguments (the old form with some other object in
    the backend's place) gets the same explanation.

    :param fn: a function whose signature takes ``backend`` as a keyword-only argument.
    :returns: ``fn`` behind two cheap checks per call.
    """
    form = call_form(fn)
    n_positional = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in inspect.signature(fn).parameters.values())

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if args and isinstance(args[0], Backend):
            raise TypeError(f"{fn.__name__}() takes the backend as a keyword (or infers it from the arrays); "
                            f"call it as {form}, e.g. {fn.__name__}(..., backend={args[0].name!r})")
        if len(args) > n_positional:
            raise TypeError(f"{fn.__name__}() takes {n_positional} positional arguments but {len(args)} were given; "
                            f"the backend is a keyword (or inferred from the arrays): call it as {form}")
        return fn(*args, **kwargs)

    return wrapper
