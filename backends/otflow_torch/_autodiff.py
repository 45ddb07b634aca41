"""Autodiff pieces of the torch backend: the two VJP implementations, value_and_grad,
and the ``torch.autograd.Function`` behind ``custom_vjp``."""
from __future__ import annotations

import functools
import threading

import torch

from otflow.base import tree_flatten, tree_map, tree_unflatten


def is_none(x) -> bool:
    return x is None


_SCOPE = threading.local()


def untracked_scope() -> bool:
    """Whether the caller runs directly inside a first-order ``custom_vjp`` backward, whose
    results are detached: nothing computed there can reach an enclosing graph."""
    return getattr(_SCOPE, "untracked", False)


class set_untracked:
    """Context manager marking (``True``) or unmarking the current thread as inside
    :func:`untracked_scope` (a class: it runs once per right-hand-side evaluation)."""

    __slots__ = ("value", "before")

    def __init__(self, value: bool):
        self.value = value

    def __enter__(self):
        self.before = getattr(_SCOPE, "untracked", False)
        _SCOPE.untracked = self.value

    def __exit__(self, *exc):
        _SCOPE.untracked = self.before
        return False


def under_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, vjp, jvp) is active, where
    ``torch.autograd.grad`` cannot be used. Unknown (private API gone) counts as yes."""
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return True if peek is None else peek() is not None


def is_wrapped(x) -> bool:
    """Whether ``x`` is a ``torch.func`` wrapper (GradTrackingTensor, BatchedTensor)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return under_transform() if check is None else check(x)


def detach(tree):
    return tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, tree)


def grad_leaf(x):
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=torch.get_default_dtype())
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"value_and_grad: cannot differentiate with respect to a {x.dtype} leaf; "
                        "pass floating-point tensors (or move the leaf to a non-differentiated argument)")
    return x.detach().requires_grad_()


def func_vjp(f, primals, has_aux):
    """``torch.func.vjp`` on flattened trees: torch's pytrees keep dict insertion order,
    otflow's sort the keys, so a cotangent built in another key order still matches."""
    leaves, treedef = tree_flatten(primals)
    box = {}

    def flat_f(*xs):
        res = f(*tree_unflatten(treedef, xs))
        out, aux = res if has_aux else (res, None)
        out_leaves, box["out_def"] = tree_flatten(out)
        return (out_leaves, aux) if has_aux else out_leaves

    res = torch.func.vjp(flat_f, *leaves, has_aux=has_aux)
    out_def, flat_vjp = box["out_def"], res[1]

    def vjp_fn(cotangent):
        ct_leaves, ct_def = tree_flatten(cotangent)
        if ct_def != out_def:
            raise ValueError(f"vjp_fn: the cotangent's tree {ct_def} differs from the output's {out_def}")
        return tree_unflatten(treedef, list(flat_vjp(ct_leaves)))

    out = tree_unflatten(out_def, res[0])
    return (out, vjp_fn, res[2]) if has_aux else (out, vjp_fn)


def func_jvp(f, primals, tangents):
    """``torch.func.jvp`` on flattened trees (dict key order does not matter)."""
    leaves, treedef = tree_flatten(tuple(primals))
    t_leaves, t_def = tree_flatten(tuple(tangents))
    if t_def != treedef:
        raise ValueError(f"jvp: the tangents' tree {t_def} differs from the primals' {treedef}")
    box = {}

    def flat_f(*xs):
        out_leaves, box["out_def"] = tree_flatten(f(*tree_unflatten(treedef, xs)))
        return out_leaves

    out, tangent_out = torch.func.jvp(flat_f, tuple(leaves), tuple(t_leaves))
    return tree_unflatten(box["out_def"], out), tree_unflatten(box["out_def"], tangent_out)


def autograd_vjp(f, primals, has_aux):
    """``vjp`` through ``torch.autograd.grad``: the primals enter ``f`` as fresh graph
    nodes (views of primals that require grad, so an enclosing backward still reaches
    them; detached copies otherwise), so closed-over tensors are constants for ``vjp_fn``
    exactly as with ``torch.func.vjp``."""
    # directly in a first-order custom_vjp backward (the adjoint's backward solve) the results
    # are detached anyway: act as under no_grad, so no graph walk and no graph kept
    grad_on = torch.is_grad_enabled() and not untracked_scope()
    leaves, treedef = tree_flatten(primals)
    with torch.enable_grad(), set_untracked(False):  # vjps inside f are ours to differentiate
        inner = [x.view_as(x) if grad_on and x.requires_grad else x.detach().requires_grad_() for x in leaves]
        res = f(*tree_unflatten(treedef, inner))
    out, aux = res if has_aux else (res, None)
    out_leaves, out_def = tree_flatten(out)
    # does anything outside this vjp need the graph? (a primal or a closed-over tensor that
    # requires grad); if not, behave as torch.func.vjp: plain tensors out, no graph kept
    tracked = grad_on and (any(x.requires_grad for x in leaves) or _reaches_other_leaves(out_leaves, inner))

    def vjp_fn(cotangent):
        if under_transform():  # e.g. vmap(vjp_fn): autograd.grad cannot be vmapped; redo with torch.func
            return func_vjp(f, primals, has_aux)[1](cotangent)
        ct_leaves, ct_def = tree_flatten(cotangent)
        if ct_def != out_def:
            raise ValueError(f"vjp_fn: the cotangent's tree {ct_def} differs from the output's {out_def}")
        pairs = [(o, c) for o, c in zip(out_leaves, ct_leaves) if o.requires_grad]
        if pairs and inner:
            grads = torch.autograd.grad([o for o, _ in pairs], inner, [c for _, c in pairs], retain_graph=True,
                                        create_graph=tracked and torch.is_grad_enabled(), allow_unused=True,
                                        materialize_grads=True)
        else:
            grads = [torch.zeros_like(x) for x in inner]
        return tree_unflatten(treedef, list(grads))

    if not tracked:  # as torch.func.vjp: nothing reaches an enclosing graph
        out, aux = detach(out), detach(aux)
    return (out, vjp_fn, aux) if has_aux else (out, vjp_fn)


def _reaches_other_leaves(outs, own) -> bool:
    """Whether the graph of ``outs`` reaches a leaf tensor requiring grad other than ``own``."""
    own_ids = {id(x) for x in own}
    stack = [o.grad_fn for o in outs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in own_ids:
            return True
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return False


def value_and_grad(f, argnums, has_aux):
    """``jax.value_and_grad`` semantics on eager torch (see ``TorchBackend.value_and_grad``)."""
    multi = isinstance(argnums, (tuple, list))
    nums = tuple(argnums) if multi else (argnums,)

    @functools.wraps(f)
    def value_and_grad_f(*args):
        if under_transform():
            grads, value = torch.func.grad_and_value(f, argnums=nums if multi else argnums,
                                                     has_aux=has_aux)(*args)
            return value, grads
        args = list(args)
        flats = [tree_flatten(args[i]) for i in nums]
        with torch.enable_grad():
            copies = []
            for i, (leaves, treedef) in zip(nums, flats):
                copies.append([grad_leaf(x) for x in leaves])
                args[i] = tree_unflatten(treedef, copies[-1])
            res = f(*args)
        value, aux = res if has_aux else (res, None)
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        if value.ndim != 0:
            raise TypeError(f"value_and_grad: f must return a scalar, got shape {tuple(value.shape)}")
        flat = [x for xs in copies for x in xs]
        if value.requires_grad and flat:
            g = torch.autograd.grad(value, flat, allow_unused=True, materialize_grads=True)
        else:
            g = [torch.zeros_like(x) for x in flat]
        grads, k = [], 0
        for leaves, treedef in flats:
            grads.append(tree_unflatten(treedef, list(g[k:k + len(leaves)])))
            k += len(leaves)
        value = value.detach()
        out = (value, detach(aux)) if has_aux else value
        return out, (tuple(grads) if multi else grads[0])

    return value_and_grad_f


def custom_vjp(fun, fwd, bwd):
    """``fun`` with the reverse-mode rule ``bwd`` (see ``TorchBackend.custom_vjp``)."""

    @functools.wraps(fun)
    def custom_vjp_fun(*args):
        flats = [tree_flatten(a, is_leaf=is_none) for a in args]
        leaves = [x for xs, _ in flats for x in xs]
        if not (torch.is_grad_enabled()
                and any(isinstance(x, torch.Tensor) and x.requires_grad for x in leaves)):
            return fun(*args)
        meta = CustomVJPMeta(fwd, bwd, [treedef for _, treedef in flats])
        outputs = CustomVJPFunction.apply(meta, *leaves)  # out leaves, then residuals
        return tree_unflatten(meta.out_def, list(outputs[:len(meta.out_meta)]))

    return custom_vjp_fun


class CustomVJPMeta:
    """Per-call data of one custom_vjp application; ``forward`` fills in the output tree,
    the output metadata and where each residual leaf lives (no tensors are kept here)."""

    __slots__ = ("fwd", "bwd", "arg_defs", "out_def", "out_meta", "res_def", "res_refs")

    def __init__(self, fwd, bwd, arg_defs):
        self.fwd, self.bwd, self.arg_defs = fwd, bwd, arg_defs

    def args(self, leaves):
        out, k = [], 0
        for treedef in self.arg_defs:
            n = treedef.num_leaves
            out.append(tree_unflatten(treedef, leaves[k:k + n]))
            k += n
        return out


class CustomVJPFunction(torch.autograd.Function):
    """One autograd node for a custom_vjp call. Inputs: the meta object, then every leaf
    of every argument. Outputs: the leaves of ``fwd``'s output, then the residual tensors
    that are neither inputs nor outputs (non-differentiable). All residual tensors go
    through ``save_for_backward`` (in-place modification is detected, outputs are saved
    without reference cycles), and the ``setup_context`` form makes the node usable
    under ``torch.func`` transforms such as this backend's ``vjp``."""

    @staticmethod
    def forward(meta, *leaves):
        out, residuals = meta.fwd(*meta.args(leaves))
        out_leaves, meta.out_def = tree_flatten(out)
        res_leaves, meta.res_def = tree_flatten(residuals)
        meta.out_meta = [(o.shape, o.dtype, o.device) for o in out_leaves]
        where = {id(x): ("in", i) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)}
        where.update({id(o): ("out", j) for j, o in enumerate(out_leaves)})
        extras, meta.res_refs = [], []
        for r in res_leaves:
            if not isinstance(r, torch.Tensor):
                meta.res_refs.append(("const", r))
            elif id(r) in where:
                meta.res_refs.append(where[id(r)])
            else:
                meta.res_refs.append(("out", len(out_leaves) + len(extras)))
                extras.append(r)
        return (*out_leaves, *extras)

    @staticmethod
    def setup_context(ctx, inputs, output):
        meta, leaves = inputs[0], inputs[1:]
        ctx.mark_non_differentiable(*output[len(meta.out_meta):])
        ctx.set_materialize_grads(False)  # no zeros for the residual outputs; see backward
        refs = [ref for ref in meta.res_refs if ref[0] != "const"]
        ctx.save_for_backward(*[(leaves if kind == "in" else output)[i] for kind, i in refs])
        ctx.meta, ctx.leaf_is_tensor = meta, [isinstance(x, torch.Tensor) for x in leaves]

    @staticmethod
    def backward(ctx, *cts):
        meta = ctx.meta
        saved = iter(ctx.saved_tensors)
        residuals = tree_unflatten(meta.res_def, [ref[1] if ref[0] == "const" else next(saved)
                                                  for ref in meta.res_refs])
        out_cts = [torch.zeros(shape, dtype=dtype, device=device) if c is None else c
                   for c, (shape, dtype, device) in zip(cts, meta.out_meta)]
        # torch runs a backward with grad mode on only for a double backward (create_graph);
        # in a first-order one nothing bwd computes can reach a graph (its cotangents are
        # detached below), so the vjps it calls directly keep none (untracked scope)
        first_order = not torch.is_grad_enabled()
        with torch.enable_grad(), set_untracked(first_order):
            arg_cts = meta.bwd(residuals, tree_unflatten(meta.out_def, out_cts))
        if not isinstance(arg_cts, (tuple, list)) or len(arg_cts) != len(meta.arg_defs):
            raise TypeError(f"custom_vjp: bwd must return a tuple of {len(meta.arg_defs)} cotangents "
                            f"(one per argument), got {type(arg_cts).__name__}"
                            + (f" of length {len(arg_cts)}" if isinstance(arg_cts, (tuple, list)) else ""))
        grads = []
        for i, (ct, treedef) in enumerate(zip(arg_cts, meta.arg_defs)):
            if ct is None:
                grads += [None] * treedef.num_leaves
                continue
            ct_leaves, ct_def = tree_flatten(ct, is_leaf=is_none)
            if ct_def != treedef:
                raise ValueError(f"custom_vjp: bwd's cotangent for argument {i} has tree {ct_def}, "
                                 f"expected one shaped like the argument, {treedef}")
            grads += [c.detach() if isinstance(c, torch.Tensor) else None for c in ct_leaves]
        return (None, *[g if is_t else None for g, is_t in zip(grads, ctx.leaf_is_tensor)])
