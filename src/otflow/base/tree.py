"""Trees of arrays: nested tuples, lists, dicts and namedtuples (None is an empty subtree).

The core's own tree utilities, used by backends without a native pytree library.
Dict keys are visited in sorted order, as ``jax.tree_util`` does, so both give
the same leaf order for the same tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["TreeDef", "tree_flatten", "tree_unflatten", "tree_map", "tree_leaves"]


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


@dataclass(frozen=True)
class TreeDef:
    """The structure of a tree: a node kind, its keys/type, and children."""

    kind: str  # "leaf", "none", "tuple", "list", "dict", "namedtuple"
    meta: Any = None
    children: tuple = ()

    @property
    def num_leaves(self) -> int:
        if self.kind == "leaf":
            return 1
        return sum(c.num_leaves for c in self.children)


_LEAF = TreeDef("leaf")
_NONE = TreeDef("none")


def _flatten_into(node, leaves: list, is_leaf) -> TreeDef:
    if is_leaf is not None and is_leaf(node):
        leaves.append(node)
        return _LEAF
    if node is None:
        return _NONE
    if _is_namedtuple(node):
        return TreeDef("namedtuple", type(node), tuple(_flatten_into(c, leaves, is_leaf) for c in node))
    if isinstance(node, tuple):
        return TreeDef("tuple", None, tuple(_flatten_into(c, leaves, is_leaf) for c in node))
    if isinstance(node, list):
        return TreeDef("list", None, tuple(_flatten_into(c, leaves, is_leaf) for c in node))
    if isinstance(node, dict):
        keys = tuple(sorted(node))
        return TreeDef("dict", keys, tuple(_flatten_into(node[k], leaves, is_leaf) for k in keys))
    leaves.append(node)
    return _LEAF


def tree_flatten(tree, is_leaf: Callable[[Any], bool] | None = None):
    """``(leaves, treedef)``; a module-level recursion, so no reference cycle keeps leaves alive."""
    leaves: list = []
    treedef = _flatten_into(tree, leaves, is_leaf)
    return leaves, treedef


def tree_unflatten(treedef: TreeDef, leaves):
    it = iter(leaves)

    def rec(td: TreeDef):
        if td.kind == "leaf":
            return next(it)
        if td.kind == "none":
            return None
        kids = [rec(c) for c in td.children]
        if td.kind == "tuple":
            return tuple(kids)
        if td.kind == "list":
            return kids
        if td.kind == "namedtuple":
            return td.meta(*kids)
        return dict(zip(td.meta, kids))

    out = rec(treedef)
    rest = list(it)
    if rest:
        raise ValueError(f"tree_unflatten: {len(rest)} leaves left over for a tree of {treedef.num_leaves}")
    return out


def tree_leaves(tree) -> list:
    return tree_flatten(tree)[0]


def tree_map(f: Callable, tree, *rest):
    leaves, treedef = tree_flatten(tree)
    others = []
    for r in rest:
        rl, rd = tree_flatten(r)
        if rd != treedef:
            raise ValueError(f"tree_map: trees differ in structure: {treedef} vs {rd}")
        others.append(rl)
    return tree_unflatten(treedef, [f(*xs) for xs in zip(leaves, *others)])
