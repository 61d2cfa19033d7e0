"""Flash attention with its forward-mode tangent (mfkernels.attention): the Triton kernels, run through the
interpreter on CPU, against float64 references (torch.func.jvp over SDPA's MATH backend; autograd for gradients)."""

import importlib
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfkernels
from mfkernels.attention import (
    _attention_jvp_lse,
    attention_jvp_torch,
    attention_reference,
)

attn_mod = importlib.import_module("mfkernels.attention")  # the package re-exports a function of the same name

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
# bf16 / fp16: within 2x torch's own same-dtype error instead. On CUDA (the CUDA tier) the kernels' fp32 dots are TF32
# (10-bit mantissa, unit roundoff 2^-11 = 4.9e-4): a few roundings of P and v, and of dS, bound fp32 there; fp64 cases
# are interpreter-only (skipped by conftest on CUDA).
REL_TOL = {F64: 1e-10, F32: 4e-3 if torch.cuda.is_available() else 1e-5}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------

def _randn(B, H, N, D, dtype, layout="bhnd"):
    if layout == "bnhd":  # how DiT produces q, k, v: a (B, N, H, D) buffer viewed as (B, H, N, D)
        return torch.randn(B, N, H, D, dtype=F64).to(dtype).transpose(1, 2)
    return torch.randn(B, H, N, D, dtype=F64).to(dtype)


def _problem(B, H, Nq, Nkv, D, dtype, layout="bhnd"):
    """q, k, v, dq, dk, dv and the weight w of the scalar loss (o * w).sum(); fresh random values each call.
    layout "mixed": primals (B, H, N, D) contiguous, tangents strided (B, N, H, D) views."""
    primal, tangent = ("bhnd", "bnhd") if layout == "mixed" else (layout, layout)
    q, k, v = (_randn(B, H, n, D, dtype, primal) for n in (Nq, Nkv, Nkv))
    dq, dk, dv = (_randn(B, H, n, D, dtype, tangent) for n in (Nq, Nkv, Nkv))
    w = torch.randn(B, H, Nq, D, dtype=F64).to(dtype)
    return (q, k, v, dq, dk, dv), w


def _math_attention(q, k, v, scale):
    with sdpa_kernel([SDPBackend.MATH]):
        return attention_reference(q, k, v, scale)


def _reference(tensors, w, scale=None):
    """float64 o, do, lse and the gradients of (o * w).sum() with respect to q, k, v, from the same input values."""
    q, k, v, dq, dk, dv = (t.detach().to(F64) for t in tensors)
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    o, do = torch.func.jvp(lambda q, k, v: _math_attention(q, k, v, s), (q, k, v), (dq, dk, dv))
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * s, dim=-1)
    primals = [t.clone().requires_grad_() for t in (q, k, v)]
    grads = torch.autograd.grad((_math_attention(*primals, s) * w.to(F64)).sum(), primals)
    return {"o": o, "do": do, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def _kernel_results(tensors, w, scale=None):
    q, k, v, dq, dk, dv = tensors
    o, do, lse = _attention_jvp_lse(q, k, v, dq, dk, dv, scale)
    primals = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o_attn = mfkernels.attention(*primals, scale=scale)
    grads = torch.autograd.grad((o_attn * w).sum(), primals)
    return {"o": o, "o of attention()": o_attn.detach(), "do": do, "lse": lse, "dq": grads[0], "dk": grads[1],
            "dv": grads[2]}


def _torch_results(tensors, w, scale=None):
    """torch's own path in the inputs' dtype: how far from float64 that dtype lands anyway."""
    q, k, v, dq, dk, dv = tensors
    primals = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = attention_reference(*primals, scale)
    grads = torch.autograd.grad((o * w).sum(), primals)
    _, do = attention_jvp_torch(q, k, v, dq, dk, dv, scale)
    return {"o": o.detach(), "o of attention()": o.detach(), "do": do, "dq": grads[0], "dk": grads[1], "dv": grads[2]}


def _err(actual, expected, floor=0.0, norm="max"):
    """Error relative to the reference's magnitude, in the max norm (elementwise relative error is meaningless at the
    zero crossings every output has) or the Frobenius norm. floor: only for references that are near zero
    everywhere (saturated softmax), the per-element size of the terms whose cancellation produces them."""
    diff = actual.to(F64) - expected
    if norm == "max":
        return (diff.abs().max() / max(expected.abs().max().item(), floor)).item()
    return (diff.norm() / max(expected.norm().item(), floor * expected.numel() ** 0.5)).item()


def _assert_matches(got, ref, dtype, tensors, w, scale=None, floors=None):
    floors = floors or {}
    for name, value in got.items():
        want_dtype = (F64 if dtype == F64 else F32) if name == "lse" else dtype
        assert value.dtype == want_dtype, f"{name} is {value.dtype}, expected {want_dtype}"
        assert torch.isfinite(value).all(), f"{name} has non-finite values"
    ref = {**ref, "o of attention()": ref["o"]}
    if dtype in REL_TOL:
        for name, value in got.items():
            err = _err(value, ref[name], floors.get(name, 0.0))
            assert err <= REL_TOL[dtype], f"{name}: relative error {err:.3e} > {REL_TOL[dtype]:.0e}"
        return
    # lse is an fp32 statistic of exactly representable inputs: fp32 accuracy whatever the input dtype
    err = _err(got["lse"], ref["lse"])
    assert err <= 1e-5, f"lse: relative error {err:.3e}"
    # 16-bit outputs: Frobenius norm, because a max over few elements (Nq = 1) is decided by which one element happens
    # to round badly. The bound is 2x torch's error, or 2x the error of the exact answer rounded to dtype where torch
    # beats that by luck (a saturated row makes its do exactly a row of dv).
    torch_got = _torch_results(tensors, w, scale)
    for name, value in torch_got.items():
        floor = floors.get(name, 0.0)
        err, torch_err = _err(got[name], ref[name], floor, "fro"), _err(value, ref[name], floor, "fro")
        rounding = _err(ref[name].to(dtype), ref[name], floor, "fro")
        bound = 2 * max(torch_err, rounding)
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e} (torch's {dtype} error {torch_err:.3e})"


# ----------------------------------------------------------------------------------------------------------------------
# values, tangents, lse and gradients against float64
# ----------------------------------------------------------------------------------------------------------------------

# (B, H, Nq, Nkv, D, dtype, layout, scale): every N in {1, 17, 64, 100, 257} (Nkv = 1 has its own test: its dq and dk
# are exactly zero), every D in {32, 64, 72, 128}, B*H in {1, 6}, Nq != Nkv in most rows, N = 257 with D = 72 in
# three dtypes, (B, N, H, D) strided layouts (all six tensors, or the tangents only) and a custom scale. Interpreter
# block sizes are 16 and 32, so these cover one-block, multi-block and 1-row tails.
CASES = [
    (1, 1, 1, 17, 32, F64, "bhnd", None),
    (2, 3, 17, 64, 64, F64, "bnhd", None),
    (1, 6, 100, 257, 72, F64, "bhnd", None),
    (1, 1, 257, 100, 128, F64, "bhnd", 0.3),
    (1, 1, 257, 257, 72, F32, "bhnd", None),
    (2, 3, 64, 100, 128, F32, "mixed", None),
    (1, 1, 257, 33, 32, F32, "bhnd", None),
    (1, 6, 100, 64, 72, BF16, "bhnd", None),
    (1, 1, 17, 257, 128, BF16, "bnhd", None),
    (2, 3, 64, 17, 32, F16, "bhnd", None),
    (1, 1, 257, 100, 72, F16, "bhnd", None),
    (1, 1, 1, 64, 64, F16, "bhnd", None),
]


@pytest.mark.parametrize("B, H, Nq, Nkv, D, dtype, layout, scale", CASES)
def test_matches_float64_reference(B, H, Nq, Nkv, D, dtype, layout, scale, triton_backend, seed):
    tensors, w = _problem(B, H, Nq, Nkv, D, dtype, layout)
    before = [t.clone() for t in (*tensors, w)]
    got = _kernel_results(tensors, w, scale)
    for t, b in zip((*tensors, w), before):
        assert torch.equal(t, b), "an input was written"
    _assert_matches(got, _reference(tensors, w, scale), dtype, tensors, w, scale)


# The full (Nq, Nkv, D) grid at B*H = 6, the dtype cycling through all four: minutes in the interpreter.
SLOW_CASES = [
    (2, 3, nq, nkv, d, (F64, F32, BF16, F16)[(i + i // 4) % 4], "bhnd", None)  # each (D, dtype) pair 5 times
    for i, (nq, nkv, d) in enumerate(itertools.product((1, 17, 64, 100, 257), (17, 64, 100, 257), (32, 64, 72, 128)))
]


@pytest.mark.slow
@pytest.mark.parametrize("B, H, Nq, Nkv, D, dtype, layout, scale", SLOW_CASES)
def test_matches_float64_reference_full_grid(B, H, Nq, Nkv, D, dtype, layout, scale, triton_backend, seed):
    tensors, w = _problem(B, H, Nq, Nkv, D, dtype, layout)
    _assert_matches(_kernel_results(tensors, w, scale), _reference(tensors, w, scale), dtype, tensors, w, scale)


def test_head_dim_tiles_cover_d_with_little_padding():
    """72 = 64 + 16 (not one 128 tile), so the padded work on DiT-XL/2's head dim stays within 12%; powers of two and
    sizes where a second tile would not save work keep one tile."""
    tiles = attn_mod.head_dim_tiles
    assert tiles(72) == (64, 16) and (sum(tiles(72)) - 72) / 72 <= 0.12
    assert [tiles(d) for d in (16, 32, 64, 128)] == [(16, 0), (32, 0), (64, 0), (128, 0)]
    assert tiles(40) == (32, 16) and tiles(80) == (64, 16) and tiles(96) == (64, 32)
    assert tiles(56) == (64, 0) and tiles(120) == (128, 0) and tiles(24) == (32, 0)
    for d in range(16, 129, 8):
        block_d, block_e = tiles(d)
        assert block_d + block_e >= d and (block_e == 0 or block_e >= 16)


@pytest.mark.parametrize("D", [40, 80, 96])
def test_two_tile_head_dims_match_float64(D, triton_backend, seed):
    """The second head-dim tile (scores summed over both, outputs stored from both) at the widths DiT does not use."""
    tensors, w = _problem(1, 2, 19, 37, D, F64)
    _assert_matches(_kernel_results(tensors, w), _reference(tensors, w), F64, tensors, w)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_single_key(dtype, triton_backend, seed):
    """Nkv = 1: P = 1, so o = v, do = dv, dv's gradient sums w over queries, and dq = dk = 0 (a cancellation)."""
    tensors, w = _problem(2, 3, 17, 1, 48, dtype)
    got = _kernel_results(tensors, w)
    q, k, v, dq, dk, dv = tensors
    assert torch.equal(got["o"], v.expand_as(q)) and torch.isfinite(got["lse"]).all()
    tol = dict(rtol=REL_TOL[dtype], atol=REL_TOL[dtype])
    torch.testing.assert_close(got["do"], dv.expand_as(q), **tol)
    torch.testing.assert_close(got["dv"], w.sum(2, keepdim=True), **tol)
    torch.testing.assert_close(got["dq"], torch.zeros_like(q), **tol)
    torch.testing.assert_close(got["dk"], torch.zeros_like(k), **tol)


@pytest.mark.interpreter_only
def test_attention_jvp_primal_gradients_and_tangent_detached(triton_backend, seed):
    tensors, w = _problem(1, 2, 33, 20, 40, F64)
    q, k, v = (t.clone().requires_grad_() for t in tensors[:3])
    dq, dk, dv = (t.clone().requires_grad_() for t in tensors[3:])
    o, do = mfkernels.attention_jvp(q, k, v, dq, dk, dv)
    assert o.grad_fn is not None and not do.requires_grad
    grads = torch.autograd.grad((o * w).sum(), (q, k, v, dq, dk, dv), allow_unused=True)
    assert grads[3:] == (None, None, None)
    ref = _reference(tensors, w)
    for name, value in zip(("o", "do", "dq", "dk", "dv"), (o, do, *grads[:3])):
        assert _err(value, ref[name]) <= 1e-10, name


@pytest.mark.interpreter_only
def test_expanded_grad_output_and_empty_batch(triton_backend, seed):
    (q, k, v, *_), _ = _problem(1, 2, 19, 23, 16, F64)
    primals = [t.clone().requires_grad_() for t in (q, k, v)]
    go = torch.randn((), dtype=F64).expand(1, 2, 19, 16)  # stride 0 everywhere: what o.sum() * c sends back
    grads = torch.autograd.grad(mfkernels.attention(*primals), primals, go)
    ref_primals = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(_math_attention(*ref_primals, None), ref_primals, go)
    for g, r in zip(grads, ref):
        assert _err(g, r) <= 1e-10
    empty = torch.randn(0, 2, 5, 16)
    assert mfkernels.attention(empty, empty, empty).shape == (0, 2, 5, 16)


# ----------------------------------------------------------------------------------------------------------------------
# autograd: gradcheck with forward AD, torch.func.jvp through the Function
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.interpreter_only
def test_gradcheck_with_forward_ad(triton_backend, seed):
    (q, k, v, *_), _ = _problem(1, 1, 3, 5, 16, F64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    # fast_mode (random projections of both Jacobians): the full check costs a kernel launch per input element, ~25 s
    assert torch.autograd.gradcheck(mfkernels.attention, inputs, check_forward_ad=True, fast_mode=True)


@pytest.mark.interpreter_only
def test_gradgradcheck_double_backward(triton_backend, seed):
    """Double backward differentiates the backward's result, which the Function then computes with torch."""
    (q, k, v, *_), _ = _problem(1, 1, 3, 4, 16, F64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradgradcheck(mfkernels.attention, inputs, fast_mode=True)


@pytest.mark.interpreter_only
def test_gradcheck_attention_jvp_primal(triton_backend, seed):
    (q, k, v, dq, dk, dv), _ = _problem(1, 2, 4, 6, 24, F64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    # fast_mode (random projections of the Jacobian): the full one costs a tangent-kernel launch per input element.
    fn = lambda q, k, v: mfkernels.attention_jvp(q, k, v, dq, dk, dv)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.interpreter_only
def test_func_jvp_runs_the_kernel_and_matches_reference(triton_backend, seed, monkeypatch):
    tensors, w = _problem(2, 1, 40, 25, 72, F64)
    launches = []
    forward = attn_mod._attention_forward

    def spy(q, k, v, dq, dk, dv, scale):
        launches.append(dq is not None)
        assert not torch._C._functorch.is_functorch_wrapped_tensor(q)
        return forward(q, k, v, dq, dk, dv, scale)

    monkeypatch.setattr(attn_mod, "_attention_forward", spy)
    q, k, v, dq, dk, dv = tensors
    o, do = torch.func.jvp(mfkernels.attention, (q, k, v), (dq, dk, dv))
    assert launches == [False, True], "the primal kernel, then the tangent kernel inside the Function's jvp"
    ref = _reference(tensors, w)
    assert _err(o, ref["o"]) <= 1e-10 and _err(do, ref["do"]) <= 1e-10

    # The func engine's path: torch.func.jvp, then backward through the primal output to the inputs. The inputs
    # require grad, so autograd records through the tangent: the Function computes it with torch (no kernel launch).
    primals = [t.clone().requires_grad_() for t in (q, k, v)]
    o, do = torch.func.jvp(mfkernels.attention, tuple(primals), (dq, dk, dv))
    grads = torch.autograd.grad((o * w).sum(), primals)
    assert launches == [False, True, False]
    assert _err(do, ref["do"]) <= 1e-10
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert _err(g, ref[name]) <= 1e-10, name


@pytest.mark.interpreter_only
def test_tangent_and_gradient_stay_differentiable_under_transforms(triton_backend, seed):
    """Kernel results carry no history: where a graph is recorded through them the Function switches to torch, so a
    gradient of the tangent (and a gradient under torch.func.grad) is right rather than silently cut."""
    (q, k, v, dq, dk, dv), _ = _problem(1, 2, 9, 7, 16, F64)

    def tangent_sum(fn, q):
        return torch.func.jvp(lambda q: fn(q, k, v), (q,), (dq,))[1].sum()

    got = torch.func.grad(lambda q: tangent_sum(mfkernels.attention, q))(q)
    want = torch.func.grad(lambda q: tangent_sum(lambda *a: _math_attention(*a, None), q))(q)
    assert _err(got, want) <= 1e-10
    got = torch.func.grad(lambda q: (mfkernels.attention(q, k, v) ** 2).sum())(q)
    want = torch.func.grad(lambda q: (_math_attention(q, k, v, None) ** 2).sum())(q)
    assert _err(got, want) <= 1e-10


# ----------------------------------------------------------------------------------------------------------------------
# extreme logits: the online max keeps everything finite
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
def test_extreme_logits_and_dominant_keys(dtype, triton_backend, seed):
    """Scores of order +-1e4: without the running max, exp() overflows on head 0 (mixed signs) even in float64 and
    underflows to 0 / 0 on head 1 (every score negative), and each row is dominated by one key or a near-tied pair,
    found in any key block. Integer q and k keep the scores exact in every dtype, so the reference sees the same logits
    (the tolerance then tests the kernel, not the rounding of q k^T)."""
    B, H, Nq, Nkv, D = 1, 2, 21, 100, 32
    q = torch.randint(-40, 41, (B, H, Nq, D))
    k = torch.randint(-40, 41, (B, H, Nkv, D))
    q[:, 1], k[:, 1] = q[:, 1].abs() + 1, -k[:, 1].abs() - 1
    # Near ties at that magnitude: keys 50.. repeat keys ..49 (another key block) with coordinate 0 moved by -1, 0 or
    # +1, and q's coordinate 0 is 1, so a row's top two keys may differ by 1 or 0 in a score of 1e4.
    q[..., 0] = 1
    k[:, :, 50:] = k[:, :, :50]
    k[:, :, 50:, 0] += torch.randint(-1, 2, (B, H, 50))
    q, k = q.to(dtype), k.to(dtype)
    v = torch.randn(B, H, Nkv, D, dtype=F64).to(dtype)
    # Tangents of q and k scaled by 1/40 keep dS of order one, as in the other tests: the subject here is the primal's
    # scale. (With dS ~ 1e2 the one-pass form's T~ - r O cancellation, see the module docstring, would be the subject.)
    dq = (torch.randn(B, H, Nq, D, dtype=F64) / 40).to(dtype)
    dk = (torch.randn(B, H, Nkv, D, dtype=F64) / 40).to(dtype)
    dv = torch.randn(B, H, Nkv, D, dtype=F64).to(dtype)
    w = torch.randn(B, H, Nq, D, dtype=F64).to(dtype)
    tensors = (q, k, v, dq, dk, dv)
    ref = _reference(tensors, w, scale=1.0)
    scores = q.to(F64) @ k.to(F64).transpose(-2, -1)  # (B, H, Nq, Nkv)
    assert scores[:, 0].max() > 5e3 and scores[:, 1].max() < -5e3
    top2 = scores.topk(3, dim=-1).values
    assert ((top2[..., 0] - top2[..., 2]) > 40).float().mean() > 0.5, "most rows should have one dominant key"
    assert ((top2[..., 0] - top2[..., 1]) <= 1).float().mean() > 0.5, "most rows should have a near tie"
    got = _kernel_results(tensors, w, scale=1.0)
    # Saturated rows have dq = dk = 0 up to the cancellation of terms of size |w . v| |k| (resp. |q|) in dS k.
    term = w.abs().max().item() * v.abs().max().item()
    floors = {"dq": term * k.abs().max().item(), "dk": term * q.abs().max().item()}
    _assert_matches(got, ref, dtype, tensors, w, scale=1.0, floors=floors)


# ----------------------------------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------------------------------

def _bad(kind):
    t = lambda *shape, dtype=F32: torch.randn(*shape, dtype=dtype)  # noqa: E731
    q, k, v = t(2, 3, 8, 32), t(2, 3, 9, 32), t(2, 3, 9, 32)
    return {
        "rank": ((t(3, 8, 32), k, v), "q must be"),
        "batch": ((q, t(1, 3, 9, 32), t(1, 3, 9, 32)), "agree in B, H and D"),
        "heads": ((q, t(2, 2, 9, 32), t(2, 2, 9, 32)), "agree in B, H and D"),
        "head dim": ((q, t(2, 3, 9, 64), t(2, 3, 9, 64)), "agree in B, H and D"),
        "k v": ((q, k, t(2, 3, 10, 32)), "same shape"),
        "D 256": ((t(1, 1, 4, 256), t(1, 1, 4, 256), t(1, 1, 4, 256)), "head dim D=256"),
        "D 7": ((t(1, 1, 4, 7), t(1, 1, 4, 7), t(1, 1, 4, 7)), "head dim D=7"),
        "dtype": ((q, k.half(), v.half()), "dtype"),
        "int dtype": ((q.long(), k.long(), v.long()), "fp16, bf16, fp32 or fp64"),
        "device": ((q, k.to("meta"), v.to("meta")), "is on meta"),
        "no keys": ((q, t(2, 3, 0, 32), t(2, 3, 0, 32)), "no keys"),
    }[kind]


@pytest.mark.parametrize(
    "kind", ["rank", "batch", "heads", "head dim", "k v", "D 256", "D 7", "dtype", "int dtype", "device", "no keys"]
)
def test_bad_input_raises_value_error(kind, triton_backend):
    (q, k, v), match = _bad(kind)
    with pytest.raises(ValueError, match=match):
        mfkernels.attention(q, k, v)
    with pytest.raises(ValueError, match=match):
        mfkernels.attention_jvp(q, k, v, q, k, v)


def test_bad_tangent_raises_value_error(triton_backend):
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    with pytest.raises(ValueError, match="dk must have shape"):
        mfkernels.attention_jvp(q, k, v, q, k[:, :, :4], v)
    with pytest.raises(ValueError, match="dv has dtype"):
        mfkernels.attention_jvp(q, k, v, q, k, v.double())
    with pytest.raises(ValueError, match="scale must be positive and finite"):
        mfkernels.attention(q, k, v, scale=float("nan"))


def test_imports_and_runs_the_torch_path_without_triton():
    code = (
        "import sys; sys.modules['triton'] = sys.modules['triton.language'] = None\n"
        "import torch, mfkernels\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "o, do = mfkernels.attention_jvp(q, q, q, q, q, q)\n"
        "assert torch.allclose(o, mfkernels.attention(q, q, q)) and do.shape == q.shape\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MFKERNELS_BACKEND")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("autocast", [False, True])
def test_16_bit_attention_on_the_cpu_torch_path_computes_in_fp32(autocast, seed, monkeypatch):
    # the torch path upcasts CPU bf16 (its flash backward is ~20x slower than fp32's), under autocast too: the output
    # and the gradients are the fp32 (here float64) result of the bf16 inputs, rounded once, in the inputs' dtype
    seen = []

    def reference(q, k, v, scale=None):
        seen.append(q.dtype)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)

    monkeypatch.setattr(attn_mod, "attention_reference", reference)
    q, k, v = (torch.randn(3, 2, 17, 32).bfloat16().requires_grad_() for _ in range(3))
    g = torch.randn(3, 2, 17, 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o = mfkernels.attention(q, k, v)
    assert seen == [torch.float32]
    o.backward(g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = torch.softmax(q64 @ k64.transpose(-2, -1) / math.sqrt(32), -1) @ v64
    o64.backward(g.double())
    assert o.dtype == q.grad.dtype == torch.bfloat16
    for got, want in ((o, o64), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        # one bf16 rounding of the result: half an ulp, 2^-9 relative; a bf16 computation is off by several ulps
        torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=2**-8 * want.abs().max().item())
