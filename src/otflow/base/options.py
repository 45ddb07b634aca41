"""Keyword validation: unknown options are rejected with the nearest valid name."""
from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable

__all__ = ["nearest", "unknown_option_message", "reject_unknown_keywords"]


def nearest(name, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return found[0] if found else None


def unknown_option_message(kind: str, name: str, choices: Iterable[str]) -> str:
    choices = sorted(choices)
    guess = nearest(name, choices)
    hint = f" Did you mean {guess!r}?" if guess else ""
    return f"unknown {kind} {name!r}.{hint} Valid: {', '.join(map(repr, choices))}."


def reject_unknown_keywords(fn=None, *, replaced: dict[str, str] | None = None):
    """Decorator: a misspelled keyword raises TypeError naming the nearest valid one.

    Used bare (``@reject_unknown_keywords``) or with the keywords of earlier releases and
    what replaced them (``@reject_unknown_keywords(replaced={"old": "new=..."})``): such a
    keyword raises TypeError naming its replacement. The decorated function keeps its
    signature (for docs and introspection); the check costs one set lookup per keyword.

    :param fn: the function (when used bare).
    :param replaced: old keyword → the text naming what replaced it.
    :returns: the checking wrapper, or a decorator making one.
    """
    if fn is None:
        return lambda f: reject_unknown_keywords(f, replaced=replaced)
    sig = inspect.signature(fn)
    names = {p.name for p in sig.parameters.values()
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    replaced = dict(replaced or {})

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for k in kwargs:
            if k in replaced:
                raise TypeError(f"{fn.__qualname__}(): {k}= was replaced by {replaced[k]}")
            if not has_var_kw and k not in names:
                raise TypeError(f"{fn.__qualname__}(): " + unknown_option_message("keyword argument", k, names))
        return fn(*args, **kwargs)

    return wrapper
