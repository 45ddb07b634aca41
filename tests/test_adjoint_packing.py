"""The adjoint's packed backward state and its skipped output-time cotangents.

The backward solve integrates ``(y, a, g)`` packed into one flat array; these tests check
the packing itself, that gradients through mixed-shape trees (0-d, vector and matrix leaves,
dict arguments, every error-norm kind, with and without the seminorm) are the direct-mode
ones, and that constant output times cost no evaluations of ``func`` in the backward pass.
"""
import numpy as np
import pytest

import otflow
from otflow.ode.adjoint import _FlatLayout

torch = pytest.importorskip("torch")

F64 = torch.float64


def test_flat_layout_round_trip_with_offset():
    xp = otflow.get_backend("numpy").namespace()
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s) for s in [(3, 2), (), (4,), (1, 1, 2)]]
    layout = _FlatLayout([a.shape for a in arrays])
    flat = layout.pack(xp, arrays)
    assert flat.shape == (6 + 1 + 4 + 2,) and layout.size == 13
    assert np.array_equal(flat, np.concatenate([a.reshape(-1) for a in arrays]))
    for got, want in zip(layout.unpack(xp, flat), arrays):
        assert got.shape == want.shape and np.array_equal(got, want)
    longer = np.concatenate([np.full(5, np.nan), flat, np.full(2, np.nan)])
    for got, want in zip(layout.unpack(xp, longer, 5), arrays):
        assert np.array_equal(got, want)


def _tree_problem():
    gen = torch.Generator().manual_seed(4)
    y0 = {"m": torch.randn(3, 2, generator=gen, dtype=F64), "s": torch.tensor(0.7, dtype=F64),
          "v": torch.randn(4, generator=gen, dtype=F64)}
    args = {"w": (0.4 * torch.randn(2, 2, generator=gen, dtype=F64)).requires_grad_(),
            "c": torch.tensor(-0.3, dtype=F64, requires_grad=True), "k": 2}

    def f(t, y, a):
        m = torch.tanh(y["m"] @ a["w"]) * a["c"] + torch.sin(t) * y["s"]
        return {"m": m, "s": -a["c"] * y["s"] + y["v"].sum() * 0.1,
                "v": torch.cos(y["v"] * a["k"]) * a["c"] + y["m"].mean()}

    def loss(sol):
        return sum((leaf[-1] ** 2).sum() + leaf[1].sum() for leaf in sol.ys.values())

    return y0, args, f, loss


@pytest.mark.parametrize("kind,seminorm", [("rms", True), ("rms", False), ("max", False), ("leaf_rms_max", False)])
def test_packed_backward_matches_direct_mode(kind, seminorm):
    y0, args, f, loss = _tree_problem()
    ts = [0.0, 0.4, 1.0]
    grads = {}
    for mode in ("direct", otflow.Adjoint(seminorm=seminorm, rtol=1e-10, atol=1e-10)):
        y = {k: v.clone().requires_grad_() for k, v in y0.items()}
        sol = otflow.odeint(f, y, ts, args=args, method="dopri5", rtol=1e-10, atol=1e-10, norm=kind,
                            gradient=mode)
        grads[str(mode)] = torch.autograd.grad(loss(sol), [*y.values(), args["w"], args["c"]])
    direct, adjoint = grads.values()
    for d, a in zip(direct, adjoint):
        assert a.shape == d.shape
        torch.testing.assert_close(a, d, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_constant_times_cost_no_backward_evaluations(method):
    """Output times that need no gradient (a list, or a tensor without requires_grad) skip
    the N + 1 evaluations of func that their cotangents take; other gradients are unchanged."""
    y0, args, f, loss = _tree_problem()
    calls = []

    def counted(t, y, a):
        calls.append(1)
        return f(t, y, a)

    kw = dict(n_steps=3) if method == "rk4" else dict(rtol=1e-8, atol=1e-8)
    results = {}
    for times in ("list", "constant", "differentiable"):
        ts = [0.0, 0.4, 1.0] if times == "list" else torch.tensor([0.0, 0.4, 1.0], dtype=F64,
                                                                   requires_grad=times == "differentiable")
        counter = otflow.adjoint_counter(backend="torch", dtype=F64)
        y = {k: v.clone().requires_grad_() for k, v in y0.items()}
        sol = otflow.odeint(counted, y, ts, args=args, method=method, **kw,
                            gradient=otflow.Adjoint(counter=counter))
        calls.clear()
        wanted = [*y.values(), args["w"], args["c"]] + ([ts] if times == "differentiable" else [])
        grads = torch.autograd.grad(loss(sol), wanted + [counter])
        results[times] = (len(calls), otflow.adjoint_stats(grads[-1]).nfe, grads[:5])
    n_list, nfe_list, g_list = results["list"]
    n_const, nfe_const, g_const = results["constant"]
    n_diff, nfe_diff, g_diff = results["differentiable"]
    assert n_list == nfe_list and n_const == nfe_const  # only the augmented dynamics ran
    assert n_diff == nfe_diff + 3  # one evaluation per output time
    assert nfe_list == nfe_const == nfe_diff
    for a, b, c in zip(g_list, g_const, g_diff):
        assert torch.equal(a, b) and torch.equal(a, c)
