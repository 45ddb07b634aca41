"""``Backend.conv2d``: the 2-D convolution that convolutional velocity fields need.

FFJORD's multiscale image flows (Grathwohl et al., ICLR 2019; trained with RNODE by
Finlay et al., ICML 2020) use small conv nets as velocity fields, and the array API
has no convolution, so the backend protocol supplies one. Every backend declaring
``has_conv`` must agree with :func:`conv2d_numpy` below (cross-correlation written
out tap by tap, independent of any framework), differentiate it exactly (a convolution
is linear in the image and in the kernel, so its VJP is its transpose) and compile it;
the reference backends must refuse it with :class:`otflow.CapabilityError`. Backends
are parametrized as in ``test_backend_conformance.py``; shapes are tiny.
"""
from __future__ import annotations

import numpy as np
import pytest

import otflow

from _helpers import assert_close, framework_installed

N, C_IN, H, W, C_OUT = 2, 4, 7, 5, 6  # a non-square image; 4 and 6 channels allow groups=2
F64 = dict(rtol=1e-12, atol=1e-12)


# ---- the numpy reference --------------------------------------------------------------------
def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _padding_pairs(padding, kernel_hw, dilation_hw):
    """``((top, bottom), (left, right))``; "same" splits ``d * (k - 1)`` with the odd zero last."""
    if padding == "valid":
        return (0, 0), (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel_hw, dilation_hw)]
        return tuple((t // 2, t - t // 2) for t in totals)
    pad_h, pad_w = _pair(padding)
    return (pad_h, pad_h), (pad_w, pad_w)


def conv2d_numpy(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1):
    """Cross-correlation in float64: for each group and kernel tap, the strided window of the
    padded image times that tap's (C_out_group, C_in_group) matrix; cast back to x's dtype."""
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    c_out, c_group, kh, kw = weight.shape
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), *_padding_pairs(padding, (kh, kw), (dh, dw))))
    h_out = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], c_out, h_out, w_out))
    o_group = c_out // groups
    for g in range(groups):
        x_g = padded[:, g * c_group:(g + 1) * c_group]
        w_g = weight[g * o_group:(g + 1) * o_group].astype(np.float64)
        for p in range(kh):
            for q in range(kw):
                window = x_g[:, :, p * dh:p * dh + sh * (h_out - 1) + 1:sh, q * dw:q * dw + sw * (w_out - 1) + 1:sw]
                out[:, g * o_group:(g + 1) * o_group] += np.einsum("nchw,oc->nohw", window, w_g[:, :, p, q])
    if bias is not None:
        out += bias.astype(np.float64)[None, :, None, None]
    return out.astype(x.dtype)


# ---- helpers --------------------------------------------------------------------------------
def _needs_conv(backend):
    if not backend.has_conv:
        pytest.skip(f"the {backend.name!r} backend has no conv2d (has_conv=False)")


def _tolerance(dtype, backend_id, *, float32_cpu=1e-5):
    if dtype == "float64":
        return F64
    # float32: on GPUs torch's cuDNN and XLA may compute convolutions in TF32 by default
    return dict(rtol=5e-3, atol=5e-3) if backend_id.on_gpu else dict(rtol=float32_cpu, atol=float32_cpu)


def _inputs(case, dtype, seed=0):
    """numpy image, kernel and bias (or None) for a case."""
    rng = np.random.default_rng(seed)
    kh, kw = case["kernel"]
    x = rng.normal(size=(N, C_IN, H, W)).astype(dtype)
    weight = rng.normal(size=(C_OUT, C_IN // case["groups"], kh, kw)).astype(dtype)
    bias = rng.normal(size=C_OUT).astype(dtype) if case["bias"] else None
    return x, weight, bias


def _settings(case):
    return {k: case[k] for k in ("stride", "padding", "dilation", "groups")}


def _to_backend(backend, device, *arrays):
    return tuple(None if a is None else backend.asarray(a, device=device) for a in arrays)


def _case(kernel, stride=1, padding=0, dilation=1, groups=1, bias=False):
    return dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)


CASES = {
    "3x3-pad1-bias": _case((3, 3), padding=1, bias=True),
    "3x3-stride2": _case((3, 3), stride=2),
    "3x3-same-dilation2-groups2-bias": _case((3, 3), padding="same", dilation=2, groups=2, bias=True),
    "1x1-valid": _case((1, 1), padding="valid"),
    "1x1-stride2-groups2-bias": _case((1, 1), stride=2, groups=2, bias=True),
    "3x3-valid-stride(2,1)-dilation(1,2)": _case((3, 3), stride=(2, 1), padding="valid", dilation=(1, 2)),
    "3x3-pad(1,2)-stride2-groups2": _case((3, 3), stride=2, padding=(1, 2), groups=2),
    "4x2-same-bias": _case((4, 2), padding="same", bias=True),  # even sizes: uneven padding
}


# ---- values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv2d_matches_numpy(backend, backend_id, device, name, dtype):
    _needs_conv(backend)
    case = CASES[name]
    x_np, w_np, b_np = _inputs(case, dtype)
    out = backend.conv2d(*_to_backend(backend, device, x_np, w_np, b_np), **_settings(case))
    expected = conv2d_numpy(x_np, w_np, b_np, **_settings(case))
    assert_close(out, expected, backend=backend, check_dtype=True, **_tolerance(dtype, backend_id))
    if case["padding"] == "same":
        assert expected.shape[2:] == (H, W)


def test_conv2d_is_cross_correlation_without_kernel_flip(backend, device):
    """A 2x2 kernel with a single 1 at tap (0, 0) reads pixel (i, j), not (i + 1, j + 1)."""
    _needs_conv(backend)
    x_np = np.arange(N * 1 * H * W, dtype=np.float64).reshape(N, 1, H, W)
    w_np = np.zeros((1, 1, 2, 2))
    w_np[0, 0, 0, 0] = 1.0
    x, w, b = _to_backend(backend, device, x_np, w_np, np.array([0.5]))
    assert_close(backend.conv2d(x, w, b), x_np[:, :, :-1, :-1] + 0.5, backend=backend, **F64)


@pytest.mark.skipif(not framework_installed("torch"), reason="torch is not installed")
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kernel,dilation", [((2, 2), 1), ((4, 2), 1), ((2, 3), (2, 1))])
def test_reference_same_padding_is_torchs(kernel, dilation):
    """The reference's "same" for even kernels (odd zero at the bottom/right) is torch's own."""
    import torch

    rng = np.random.default_rng(3)
    x_np, w_np = rng.normal(size=(N, C_IN, H, W)), rng.normal(size=(C_OUT, C_IN, *kernel))
    torch_same = torch.nn.functional.conv2d(torch.as_tensor(x_np), torch.as_tensor(w_np), padding="same",
                                            dilation=dilation)
    np.testing.assert_allclose(conv2d_numpy(x_np, w_np, padding="same", dilation=dilation), torch_same.numpy(),
                               **F64)


# ---- derivatives and compilation ------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["3x3-same-dilation2-groups2-bias", "3x3-pad(1,2)-stride2-groups2", "4x2-same-bias"])
def test_conv2d_vjp_is_the_transpose(backend, backend_id, device, name, dtype):
    """conv is linear in x and in weight, so <vjp_x(ct), v> = <ct, conv(v, w)>,
    <vjp_w(ct), u> = <ct, conv(x, u)>, and the bias cotangent is ct summed over N, H, W."""
    _needs_conv(backend)
    case = dict(CASES[name], bias=True)
    settings = _settings(case)
    x_np, w_np, b_np = _inputs(case, dtype, seed=1)
    rng = np.random.default_rng(2)
    ct_np = rng.normal(size=conv2d_numpy(x_np, w_np, **settings).shape).astype(dtype)
    v_np, u_np = rng.normal(size=x_np.shape), rng.normal(size=w_np.shape)

    out, vjp_fn = backend.vjp(lambda xx, ww, bb: backend.conv2d(xx, ww, bb, **settings),
                              *_to_backend(backend, device, x_np, w_np, b_np))
    gx, gw, gb = (backend.to_numpy(g).astype(np.float64) for g in vjp_fn(backend.asarray(ct_np, device=device)))
    tol = _tolerance(dtype, backend_id, float32_cpu=1e-4)  # inner products of a few hundred terms
    ct64, x64, w64 = (a.astype(np.float64) for a in (ct_np, x_np, w_np))
    np.testing.assert_allclose(np.sum(gx * v_np), np.sum(ct64 * conv2d_numpy(v_np, w64, **settings)), **tol)
    np.testing.assert_allclose(np.sum(gw * u_np), np.sum(ct64 * conv2d_numpy(x64, u_np, **settings)), **tol)
    np.testing.assert_allclose(gb, ct64.sum(axis=(0, 2, 3)), **tol)


def test_conv2d_jvp_is_the_conv_of_the_tangents(backend, device):
    """d conv(x, w, b) [v, u, c] = conv(v, w) + conv(x, u) + c (bilinear, plus the bias)."""
    _needs_conv(backend)
    settings = _settings(CASES["3x3-pad(1,2)-stride2-groups2"])
    rng = np.random.default_rng(4)
    x_np, v_np = rng.normal(size=(2, N, C_IN, H, W))
    w_np, u_np = rng.normal(size=(2, C_OUT, C_IN // 2, 3, 3))
    b_np, c_np = rng.normal(size=(2, C_OUT))
    primals = _to_backend(backend, device, x_np, w_np, b_np)
    tangents = _to_backend(backend, device, v_np, u_np, c_np)
    out, tangent_out = backend.jvp(lambda xx, ww, bb: backend.conv2d(xx, ww, bb, **settings), primals, tangents)
    expected = conv2d_numpy(v_np, w_np, **settings) + conv2d_numpy(x_np, u_np, c_np, **settings)
    assert_close((out, tangent_out), (conv2d_numpy(x_np, w_np, b_np, **settings), expected), backend=backend,
                 **F64)


def test_conv2d_under_jit(backend, device):
    """The call convolutional fields make, compiled: values and the VJP match eager ones."""
    _needs_conv(backend)
    rng = np.random.default_rng(5)
    x_np, w_np, b_np = rng.normal(size=(N, C_IN, H, W)), rng.normal(size=(C_OUT, C_IN, 3, 3)), rng.normal(size=C_OUT)
    ct_np = rng.normal(size=(N, C_OUT, H, W))
    x, w, b, ct = _to_backend(backend, device, x_np, w_np, b_np, ct_np)

    def field_layer(xx, ww, bb):
        return backend.conv2d(xx, ww, bb, stride=1, padding="same")

    def pullback(xx, ww, bb, cc):
        return backend.vjp(field_layer, xx, ww, bb)[1](cc)

    compiled = backend.jit(field_layer)
    assert_close(compiled(x, w, b), conv2d_numpy(x_np, w_np, b_np, padding="same"), backend=backend, **F64)
    eager_cts = tuple(backend.to_numpy(g) for g in pullback(x, w, b, ct))
    assert_close(tuple(backend.jit(pullback)(x, w, b, ct)), eager_cts, backend=backend, **F64)


# ---- refusals and errors --------------------------------------------------------------------
def test_has_conv_flags(backend, backend_id):
    assert type(backend.has_conv) is bool
    assert backend.has_conv is (backend_id.backend_name in ("torch", "jax"))


def test_backends_without_conv_refuse_it(backend, device):
    if backend.has_conv:
        pytest.skip(f"the {backend.name!r} backend has conv2d")
    x, w = _to_backend(backend, device, np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3)))
    with pytest.raises(otflow.CapabilityError, match=r"(?s)convolutional velocity fields.*'torch'.*'jax'"):
        backend.conv2d(x, w, None, stride=1, padding="same")


_GOOD = dict(x=(N, C_IN, H, W), weight=(C_OUT, C_IN // 2, 3, 3), bias=(C_OUT,), groups=2)

BAD_ARGUMENTS = {
    "x-rank-3": (dict(x=(C_IN, H, W)), ValueError, r"x must have shape \(N, C_in, H, W\), got shape \(4, 7, 5\)"),
    "weight-rank-3": (dict(weight=(C_OUT, 2, 3)), ValueError, r"weight must have shape \(C_out, C_in // groups"),
    "channels": (dict(weight=(C_OUT, 3, 3, 3), groups=1), ValueError, r"x has 4 channels .* expects 3"),
    "groups-not-dividing": (dict(weight=(C_OUT, 1, 3, 3), groups=3), ValueError,
                            r"groups=3 must .*divide both the input channels \(4\)"),
    "groups-zero": (dict(groups=0), ValueError, r"groups=0 must be at least 1"),
    "groups-float": (dict(groups=2.0), TypeError, r"groups must be an int"),
    "bias-shape": (dict(bias=(C_IN,)), ValueError, r"bias must have shape \(C_out,\) = \(6,\), got shape \(4,\)"),
    "padding-misspelled": (dict(padding="sam"), ValueError, r"unknown padding 'sam'. Did you mean 'same'\?"),
    "padding-negative": (dict(padding=-1), ValueError, r"padding must be an int >= 0"),
    "stride-zero": (dict(stride=0), ValueError, r"stride must be an int >= 1"),
    "stride-three-values": (dict(stride=(1, 1, 1)), TypeError, r"stride must be .* a \(height, width\) pair"),
    "dilation-zero": (dict(dilation=(1, 0)), ValueError, r"dilation must be an int >= 1"),
    "same-with-stride-2": (dict(padding="same", stride=2), ValueError, r"padding='same' needs stride 1"),
    "kernel-larger-than-image": (dict(dilation=4), ValueError,
                                 r"along the height the kernel spans 9 pixels .* padded image has only 7"),
    "weight-dtype": (dict(weight_dtype="float32"), TypeError, r"weight has dtype .*float32.* but x has .*float64"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments_raise_clear_errors(backend, device, name):
    _needs_conv(backend)
    overrides, error, message = BAD_ARGUMENTS[name]
    spec = dict(_GOOD, **overrides)
    weight = np.ones(spec.pop("weight"), dtype=spec.pop("weight_dtype", "float64"))
    x, w, b = _to_backend(backend, device, np.ones(spec.pop("x")), weight, np.ones(spec.pop("bias")))
    with pytest.raises(error, match=message):
        backend.conv2d(x, w, b, **spec)


# ---- the rest of a conv field is array API ----------------------------------------------------
def test_namespace_has_what_conv_fields_need(backend, device):
    """Squeezing (N, C, H, W) into (N, 4C, H/2, W/2) and back (reshape and permute_dims on 4-D and
    6-D arrays), concatenating time as a channel, and softplus through logaddexp: all array API."""
    xp = backend.namespace()
    x_np = np.random.default_rng(6).normal(size=(N, 3, 6, 4))
    x = backend.asarray(x_np, device=device)
    n, c, h, w = x_np.shape
    squeezed = xp.reshape(xp.permute_dims(xp.reshape(x, (n, c, h // 2, 2, w // 2, 2)), (0, 1, 3, 5, 2, 4)),
                          (n, 4 * c, h // 2, w // 2))
    squeezed_np = (x_np.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4)
                   .reshape(n, 4 * c, h // 2, w // 2))
    unsqueezed = xp.reshape(xp.permute_dims(xp.reshape(squeezed, (n, c, 2, 2, h // 2, w // 2)), (0, 1, 4, 2, 5, 3)),
                            (n, c, h, w))
    with_time = xp.concat([xp.full((n, 1, h, w), 0.25, dtype=x.dtype, device=device), x], axis=1)
    softplus = xp.logaddexp(x, xp.zeros_like(x))
    assert_close((squeezed, unsqueezed, with_time, softplus),
                 (squeezed_np, x_np, np.concatenate([np.full((n, 1, h, w), 0.25), x_np], axis=1),
                  np.logaddexp(x_np, 0.0)), backend=backend, **F64)
