"""adaLN modulation and the gated residual: the Triton kernels (through the interpreter on CPU) against float64 torch
references for outputs, tangents and gradients; autograd and torch.func integration; input validation."""

import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mfkernels
from mfkernels import adaln
from mfkernels import gated as gr

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
CS = [1, 7, 64, 72, 96, 1152]
NS = [1, 3, 17, 256]
_ABS_FLOOR = 1e-12  # only matters where the reference is exactly zero (C = 1: d x and d scale vanish)


def _batch(N, C):
    return 1 if N * C >= 256 * 1152 else 2  # keeps the interpreter's grid small for the largest case


def _randn(*shape, dtype, requires_grad=False):
    """Fresh normals rounded to dtype, and their exact float64 copy (the reference sees the rounded values)."""
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.requires_grad_(requires_grad), t.double().requires_grad_(requires_grad)


def _assert_close(name, out, ref, dtype, torch_outs=()):
    """float64: 1e-10 relative; float32: 1e-5 relative (to the reference's max magnitude). fp16/bf16: within twice
    the error of torch's own computation in that dtype, plus half an ulp of the largest value (a correctly rounded
    result's own error). All errors are measured against the float64 reference."""
    scale = ref.abs().max().item()
    err = (out.detach().double() - ref).abs().max().item()
    if dtype == torch.float64:
        bound = 1e-10 * scale
    elif dtype == torch.float32:
        bound = 1e-5 * scale
    else:
        torch_err = min((t.detach().double() - ref).abs().max().item() for t in torch_outs)
        bound = 2 * torch_err + 0.5 * torch.finfo(dtype).eps * scale
    assert err <= bound + _ABS_FLOOR, f"{name}: max abs error {err:.3g} > {bound:.3g} (reference max {scale:.3g})"


def _grads(out, w, inputs):
    return torch.autograd.grad((out * w).sum(), inputs)


# ----------------------------------------------------------------------------------------------------------------------
# adaLN: values, tangents, gradients against float64
# ----------------------------------------------------------------------------------------------------------------------

def _check_adaln_case(B, N, C, dtype):
    """y, dy and the gradients of (y * w).sum() through the kernels against the float64 reference."""
    x, x64 = _randn(B, N, C, dtype=dtype, requires_grad=True)
    with torch.no_grad():  # rows with a mean far from zero, so that centering matters
        x += (torch.randn(B, N, 1, dtype=torch.float64) * 3).to(dtype)
        x64.copy_(x.double())
    shift, shift64 = _randn(B, C, dtype=dtype, requires_grad=True)
    scale, scale64 = _randn(B, C, dtype=dtype, requires_grad=True)
    dx, dx64 = _randn(B, N, C, dtype=dtype)
    dshift, dshift64 = _randn(B, C, dtype=dtype)
    dscale, dscale64 = _randn(B, C, dtype=dtype)
    w, w64 = _randn(B, N, C, dtype=dtype)  # the upstream gradient: the reference sees its rounded values too

    y = mfkernels.adaln_modulate(x, shift, scale)
    assert type(y.grad_fn).__name__.startswith("_AdaLNModulate"), "the kernels did not run"
    y2, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    assert torch.equal(y2, y)
    assert y.dtype == dy.dtype == dtype and not dy.requires_grad
    grads = _grads(y, w, (x, shift, scale))

    y_ref = adaln.adaln_modulate_reference(x64, shift64, scale64)
    dy_ref = adaln.adaln_tangent_reference(x64, shift64, scale64, dx64, dshift64, dscale64)
    grads_ref = _grads(y_ref, w64, (x64, shift64, scale64))

    y_t, dy_t, grads_t = [None], [None], [None] * 3
    if dtype in (torch.float16, torch.bfloat16):
        # torch's own computation in this dtype, the yardstick for fp16/bf16 (for dy the better of its two forms)
        y_t = [adaln.adaln_modulate_reference(x, shift, scale)]
        dy_t = [adaln.adaln_modulate_jvp_torch(x, shift, scale, dx, dshift, dscale)[1],
                adaln.adaln_tangent_reference(x, shift, scale, dx, dshift, dscale)]
        grads_t = _grads(y_t[0], w, (x, shift, scale))

    _assert_close("y", y, y_ref, dtype, y_t)
    _assert_close("dy", dy, dy_ref, dtype, dy_t)
    for name, g, g_ref, g_t in zip(("d x", "d shift", "d scale"), grads, grads_ref, grads_t):
        assert g.dtype == dtype
        _assert_close(name, g, g_ref, dtype, [g_t])


@pytest.mark.interpret
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adaln_matches_float64_reference(triton_backend, seed, dtype, N, C):
    _check_adaln_case(_batch(N, C), N, C, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [4095, 4096])
def test_adaln_wide_rows(triton_backend, seed, dtype, C):
    _check_adaln_case(2, 3, C, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# gated residual: values, tangents, gradients against float64
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.interpret
@pytest.mark.parametrize("C", CS)
@pytest.mark.parametrize("N", NS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_matches_float64_reference(triton_backend, seed, dtype, N, C):
    B = _batch(N, C)
    x, x64 = _randn(B, N, C, dtype=dtype, requires_grad=True)
    gate, gate64 = _randn(B, C, dtype=dtype, requires_grad=True)
    y, y64 = _randn(B, N, C, dtype=dtype, requires_grad=True)
    dx, dx64 = _randn(B, N, C, dtype=dtype)
    dgate, dgate64 = _randn(B, C, dtype=dtype)
    dy, dy64 = _randn(B, N, C, dtype=dtype)
    w, w64 = _randn(B, N, C, dtype=dtype)  # the upstream gradient: the reference sees its rounded values too

    out = mfkernels.gated_residual(x, gate, y)
    assert type(out.grad_fn).__name__.startswith("_GatedResidual"), "the kernels did not run"
    out2, dout = mfkernels.gated_residual_jvp(x, gate, y, dx, dgate, dy)
    assert torch.equal(out2, out)
    assert out.dtype == dout.dtype == dtype and not dout.requires_grad
    grads = _grads(out, w, (x, gate, y))

    out_ref, dout_ref = gr.gated_residual_jvp_torch(x64, gate64, y64, dx64, dgate64, dy64)
    grads_ref = _grads(out_ref, w64, (x64, gate64, y64))
    out_t, dout_t, grads_t = None, None, [None] * 3
    if dtype in (torch.float16, torch.bfloat16):  # torch's own computation in this dtype, the yardstick there
        out_t, dout_t = gr.gated_residual_jvp_torch(x, gate, y, dx, dgate, dy)
        grads_t = _grads(out_t, w, (x, gate, y))

    _assert_close("out", out, out_ref, dtype, [out_t])
    _assert_close("dout", dout, dout_ref, dtype, [dout_t])
    for name, g, g_ref, g_t in zip(("d x", "d gate", "d y"), grads, grads_ref, grads_t):
        assert g.dtype == dtype
        _assert_close(name, g, g_ref, dtype, [g_t])


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [72, 1152])
def test_low_precision_outputs_are_rounded_once(triton_backend, seed, dtype, C):
    # Stricter than the 2x-of-torch bound above: the kernels accumulate in fp32 and round once, to nearest, on the
    # store, so every element lies within half an ulp of the exact value, up to fp32 error (1e-5 of the largest).
    # (The interpreter's own fp32 -> bf16 cast truncates; this is what catches a kernel storing through it.)
    def check(name, out, ref):
        mag = ref.abs()
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(mag.clamp_min(torch.finfo(dtype).tiny))))
        excess = (out.detach().double() - ref).abs() - (0.5 * ulp + 1e-5 * mag.max())
        assert excess.max().item() <= 0, f"{name}: {(excess > 0).sum().item()} elements off by more than half an ulp"

    B, N = 2, 9
    x, x64 = _randn(B, N, C, dtype=dtype, requires_grad=True)
    shift, shift64 = _randn(B, C, dtype=dtype, requires_grad=True)
    scale, scale64 = _randn(B, C, dtype=dtype, requires_grad=True)
    dx, dx64 = _randn(B, N, C, dtype=dtype)
    dshift, dshift64 = _randn(B, C, dtype=dtype)
    dscale, dscale64 = _randn(B, C, dtype=dtype)
    gate, gate64 = _randn(B, C, dtype=dtype, requires_grad=True)
    h, h64 = _randn(B, N, C, dtype=dtype, requires_grad=True)
    dgate, dgate64 = _randn(B, C, dtype=dtype)
    dh, dh64 = _randn(B, N, C, dtype=dtype)
    w, w64 = _randn(B, N, C, dtype=dtype)

    y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    out, dout = mfkernels.gated_residual_jvp(x, gate, h, dx, dgate, dh)
    gx, g_shift, g_scale = _grads(y, w, (x, shift, scale))
    _, g_gate, g_h = _grads(out, w, (x, gate, h))

    y_ref = adaln.adaln_modulate_reference(x64, shift64, scale64)
    out_ref, dout_ref = gr.gated_residual_jvp_torch(x64, gate64, h64, dx64, dgate64, dh64)
    refs = dict(y=y_ref, dy=adaln.adaln_tangent_reference(x64, shift64, scale64, dx64, dshift64, dscale64),
                out=out_ref, dout=dout_ref)
    refs["d x"], refs["d shift"], refs["d scale"] = _grads(y_ref, w64, (x64, shift64, scale64))
    refs["d gate"], refs["d h"] = _grads(out_ref, w64, (gate64, h64))
    for name, o in dict(y=y, dy=dy, out=out, dout=dout, **{"d x": gx, "d shift": g_shift, "d scale": g_scale,
                                                           "d gate": g_gate, "d h": g_h}).items():
        check(name, o, refs[name])


# ----------------------------------------------------------------------------------------------------------------------
# autograd and torch.func integration (float64, small shapes, through the kernels)
# ----------------------------------------------------------------------------------------------------------------------

def _adaln_inputs(B=2, N=3, C=5, requires_grad=False):
    x = torch.randn(B, N, C, dtype=torch.float64) + torch.randn(B, N, 1, dtype=torch.float64)
    shift, scale = torch.randn(2, B, C, dtype=torch.float64)
    return [t.requires_grad_(requires_grad) for t in (x, shift, scale)]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the kernels (forward, tangent-only, backward) so that tests can tell which path ran."""
    calls = {"forward": 0, "tangent": 0, "backward": 0}

    def counting(fn, key):
        def wrapped(*args, **kwargs):
            calls[key(kwargs)] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(adaln, "_adaln_forward", counting(
        adaln._adaln_forward, lambda kw: "forward" if kw.get("write_y", True) else "tangent"))
    monkeypatch.setattr(adaln, "_adaln_backward", counting(adaln._adaln_backward, lambda kw: "backward"))
    monkeypatch.setattr(gr, "_gated_forward", counting(
        gr._gated_forward, lambda kw: "forward" if kw.get("write_out", True) else "tangent"))
    monkeypatch.setattr(gr, "_gated_backward", counting(gr._gated_backward, lambda kw: "backward"))
    return calls


@pytest.mark.interpret
@pytest.mark.parametrize("B, N, C, fast", [(2, 2, 3, False), (2, 5, 9, True)])
def test_adaln_gradcheck(triton_backend, seed, kernel_calls, B, N, C, fast):
    # full Jacobians on a tiny shape; random projections (fast_mode) on a larger one, and for the *_jvp op, whose
    # primal shares the kernels and differs only in its Function (interpreter launches cost ~10 ms each)
    inputs = _adaln_inputs(B, N, C, requires_grad=True)
    tangents = [torch.randn_like(t) for t in inputs]
    assert torch.autograd.gradcheck(mfkernels.adaln_modulate, inputs, check_forward_ad=True, fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda x, shift, scale: mfkernels.adaln_modulate_jvp(x, shift, scale, *tangents)[0], inputs,
        check_forward_ad=True, fast_mode=True)
    assert all(kernel_calls.values()), kernel_calls


@pytest.mark.interpret
@pytest.mark.parametrize("B, N, C, fast", [(2, 2, 3, False), (2, 5, 9, True)])
def test_gated_residual_gradcheck(triton_backend, seed, kernel_calls, B, N, C, fast):
    inputs = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((B, N, C), (B, C), (B, N, C))]
    tangents = [torch.randn_like(t) for t in inputs]
    assert torch.autograd.gradcheck(mfkernels.gated_residual, inputs, check_forward_ad=True, fast_mode=fast)
    assert torch.autograd.gradcheck(
        lambda x, gate, y: mfkernels.gated_residual_jvp(x, gate, y, *tangents)[0], inputs, check_forward_ad=True,
        fast_mode=True)
    assert all(kernel_calls.values()), kernel_calls


@pytest.mark.interpret
def test_double_backward_stays_differentiable(triton_backend, seed):
    # a kernel's result has no history: when the backward itself is recorded the ops must switch to torch
    assert torch.autograd.gradgradcheck(mfkernels.adaln_modulate, _adaln_inputs(2, 2, 3, requires_grad=True))
    inputs = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 2, 3), (2, 3), (2, 2, 3))]
    assert torch.autograd.gradgradcheck(mfkernels.gated_residual, inputs)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_func_jvp_and_forward_ad_use_the_kernel(triton_backend, seed, kernel_calls, dtype):
    primals = [t.to(dtype) for t in _adaln_inputs(B=2, N=5, C=72)]
    tangents = [torch.randn_like(t) for t in primals]
    ref = adaln.adaln_tangent_reference(*[t.double() for t in primals + tangents])

    y, dy = torch.func.jvp(mfkernels.adaln_modulate, tuple(primals), tuple(tangents))
    assert kernel_calls["tangent"] == 1
    _assert_close("func.jvp dy", dy, ref, dtype)
    assert torch.equal(y, adaln._AdaLNModulate.apply(*primals, adaln.DEFAULT_EPS)[0])

    with fwAD.dual_level():
        out = mfkernels.adaln_modulate(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        dy_fw = fwAD.unpack_dual(out).tangent
    assert kernel_calls["tangent"] == 2
    _assert_close("forward_ad dy", dy_fw, ref, dtype)

    # only x carries a tangent: the others must count as zero
    _, dy_x = torch.func.jvp(lambda x: mfkernels.adaln_modulate(x, *primals[1:]), (primals[0],), (tangents[0],))
    zeros = [torch.zeros_like(t) for t in primals[1:]]
    _assert_close("func.jvp along x", dy_x, adaln.adaln_tangent_reference(
        *[t.double() for t in primals + tangents[:1] + zeros]), dtype)

    gates = [torch.randn(2, 5, 72, dtype=dtype), torch.randn(2, 72, dtype=dtype), torch.randn(2, 5, 72, dtype=dtype)]
    dgates = [torch.randn_like(t) for t in gates]
    _, dout = torch.func.jvp(mfkernels.gated_residual, tuple(gates), tuple(dgates))
    (x, g, yy), (dx, dg, dyy) = ([t.double() for t in ts] for ts in (gates, dgates))
    _assert_close("gated func.jvp", dout, dx + dg[:, None] * yy + g[:, None] * dyy, dtype)


@pytest.mark.interpret
def test_func_jvp_tangent_is_differentiable(triton_backend, seed, kernel_calls):
    # Inputs that require grad: the tangent must carry a graph, so the Function's jvp computes it in torch, and
    # gradcheck differentiates it numerically. (torch.func.jvp over F.layer_norm is no oracle for this: in torch 2.13
    # the gradient of its tangent with respect to x disagrees with finite differences; layer_norm's saved mean/rstd
    # carry no history, the cause of a family of its higher-order AD bugs, cf. pytorch/pytorch#196700.)
    primals = tuple(_adaln_inputs(B=2, N=2, C=4, requires_grad=True))
    tangents = tuple(torch.randn_like(t) for t in primals)
    _, dy = torch.func.jvp(mfkernels.adaln_modulate, primals, tangents)
    assert dy.requires_grad
    _assert_close("dy", dy, adaln.adaln_tangent_reference(*primals, *tangents), torch.float64)
    assert torch.autograd.gradcheck(lambda *p: torch.func.jvp(mfkernels.adaln_modulate, p, tangents)[1], primals)
    assert kernel_calls["forward"] > 0 and kernel_calls["tangent"] == 0  # forward ran the kernel, jvp did not


@pytest.mark.interpret
def test_func_grad_through_the_op(triton_backend, seed):
    # forward through the kernel; functorch records every backward, so the backward takes the torch formulas here
    primals = _adaln_inputs(B=2, N=4, C=9)
    w = torch.randn(2, 4, 9, dtype=torch.float64)
    grads = torch.func.grad(lambda *p: (mfkernels.adaln_modulate(*p) * w).sum(), argnums=(0, 1, 2))(*primals)
    grads_ref = torch.func.grad(lambda *p: (adaln.adaln_modulate_reference(*p) * w).sum(), argnums=(0, 1, 2))(*primals)
    for g, g_ref in zip(grads, grads_ref):
        _assert_close("func.grad", g, g_ref, torch.float64)


@pytest.mark.interpret
def test_jvp_outputs_differentiability(triton_backend, seed):
    x, shift, scale = _adaln_inputs(requires_grad=True)
    dx, dshift, dscale = (torch.randn_like(t).requires_grad_() for t in (x, shift, scale))
    y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    assert y.requires_grad and not dy.requires_grad
    assert torch.autograd.grad(y.sum(), (dx, dshift, dscale), allow_unused=True) == (None, None, None)
    gate, ygate = torch.randn(2, 5, dtype=torch.float64, requires_grad=True), torch.randn_like(x, requires_grad=True)
    out, dout = mfkernels.gated_residual_jvp(x, gate, ygate, dx, dshift, torch.randn_like(x))
    assert out.requires_grad and not dout.requires_grad


# ----------------------------------------------------------------------------------------------------------------------
# layouts, purity, dispatch, bad input
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.interpret
def test_non_contiguous_inputs_are_made_contiguous(triton_backend, seed):
    # the DiT block's shift/scale/gate are chunks of one (B, 6C) tensor; x here is a transposed view
    B, N, C = 2, 7, 24
    x = (torch.randn(B, C, N, dtype=torch.float64) + 1).transpose(1, 2).requires_grad_()  # (B, N, C) view
    mod = torch.randn(B, 6 * C, dtype=torch.float64, requires_grad=True)
    shift, scale, gate, dshift, dscale, dgate = mod.chunk(6, dim=1)  # (B, C) each, stride 6C
    dx = torch.randn(B, C, N, dtype=torch.float64).transpose(1, 2)
    assert not (x.is_contiguous() or shift.is_contiguous() or dx.is_contiguous())

    y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    out, dout = mfkernels.gated_residual_jvp(x, gate, y, dx, dgate, dy)
    grads = torch.autograd.grad(out.sum(), (x, mod))  # upstream of sum(): an expanded, stride-0 tensor

    with torch.no_grad():
        c = [t.contiguous() for t in (x, shift, scale, dx, dshift, dscale, gate, dgate)]
        y_ref = adaln.adaln_modulate_reference(*c[:3])
        dy_ref = adaln.adaln_tangent_reference(*c[:6])
        out_ref, dout_ref = gr.gated_residual_jvp_torch(c[0], c[6], y_ref, c[3], c[7], dy_ref)
    leaves = [t.detach().clone().requires_grad_() for t in (x, mod)]
    s, sc, g = leaves[1].chunk(6, dim=1)[:3]
    grads_ref = torch.autograd.grad(
        gr.gated_residual_reference(leaves[0], g, adaln.adaln_modulate_reference(leaves[0], s, sc)).sum(), leaves)
    for name, a, b in (("y", y, y_ref), ("dy", dy, dy_ref), ("out", out, out_ref), ("dout", dout, dout_ref),
                       ("d x", grads[0], grads_ref[0]), ("d mod", grads[1], grads_ref[1])):
        _assert_close(name, a, b, torch.float64)


@pytest.mark.interpret
def test_kernels_never_write_inputs_or_grad_output(triton_backend, seed):
    x, shift, scale = _adaln_inputs(B=2, N=9, C=33, requires_grad=True)
    dx, dshift, dscale = (torch.randn_like(t) for t in (x, shift, scale))
    gate, dgate = torch.randn_like(shift, requires_grad=True), torch.randn_like(shift)
    upstream = torch.randn_like(x)
    before = [t.detach().clone() for t in (x, shift, scale, dx, dshift, dscale, gate, dgate, upstream)]
    y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
    out, dout = mfkernels.gated_residual_jvp(x, gate, y, dx, dgate, dy)
    torch.autograd.grad(out, (x, shift, scale, gate), grad_outputs=upstream)
    torch.autograd.grad(mfkernels.adaln_modulate(x, shift, scale), (x,), grad_outputs=upstream)
    after = (x, shift, scale, dx, dshift, dscale, gate, dgate, upstream)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_torch_backend_does_not_launch(seed, kernel_calls):
    x, shift, scale = _adaln_inputs(requires_grad=True)
    y, _ = mfkernels.adaln_modulate_jvp(x, shift, scale, x.detach(), shift.detach(), scale.detach())
    mfkernels.gated_residual(x, shift, y).sum().backward()
    assert not any(kernel_calls.values())


@pytest.mark.interpret
def test_too_wide_rows(seed):
    C = adaln.MAX_BLOCK_C + 1
    x, shift, scale = _adaln_inputs(B=1, N=2, C=C)
    mfkernels.set_backend("auto")  # interpreting: auto would take the kernels, but the rows are too wide for them
    torch.testing.assert_close(mfkernels.adaln_modulate(x, shift, scale),
                               adaln.adaln_modulate_reference(x, shift, scale), rtol=0, atol=0)
    mfkernels.set_backend("triton")
    with pytest.raises(ValueError, match="C <= "):
        mfkernels.adaln_modulate(x, shift, scale)


def _bad_adaln_calls(x, shift, scale):
    B, N, C = x.shape
    meta = torch.empty(B, C, dtype=x.dtype, device="meta")
    return [
        ("x", lambda: mfkernels.adaln_modulate(x[0], shift, scale)),
        ("shift", lambda: mfkernels.adaln_modulate(x, shift[:, :-1], scale)),
        ("scale", lambda: mfkernels.adaln_modulate(x, shift, scale[:1])),  # wrong batch size
        ("shift", lambda: mfkernels.adaln_modulate(x, shift[:1], scale)),
        ("scale", lambda: mfkernels.adaln_modulate(x, shift, scale.float())),
        ("shift", lambda: mfkernels.adaln_modulate(x, meta, scale)),  # wrong device
        ("dx", lambda: mfkernels.adaln_modulate_jvp(x, shift, scale, x[:, :-1], shift, scale)),
        ("dshift", lambda: mfkernels.adaln_modulate_jvp(x, shift, scale, x, shift[:1], scale)),
        ("dscale", lambda: mfkernels.adaln_modulate_jvp(x, shift, scale, x, shift, meta)),
        ("x", lambda: mfkernels.gated_residual(x[0], shift, x)),
        ("gate", lambda: mfkernels.gated_residual(x, shift[:1], x)),  # wrong batch size
        ("y", lambda: mfkernels.gated_residual(x, shift, x[:, :-1])),
        ("gate", lambda: mfkernels.gated_residual(x, meta, x)),
        ("y", lambda: mfkernels.gated_residual(x, shift, x.float())),
        ("dgate", lambda: mfkernels.gated_residual_jvp(x, shift, x, x, shift[:, :-1], x)),
        ("dy", lambda: mfkernels.gated_residual_jvp(x, shift, x, x, shift, x[:1])),
        ("dx", lambda: mfkernels.gated_residual_jvp(x, shift, x, x.to("meta"), shift, x)),
    ]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_input_raises_value_error_naming_the_argument(seed, backend):
    mfkernels.set_backend(backend)
    for name, call in _bad_adaln_calls(*_adaln_inputs()):
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import torch, mfkernels\n"
        "from mfkernels import adaln, gated as gr\n"
        "mfkernels.set_backend('auto')\n"
        "x, s, c = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)\n"
        "assert torch.equal(mfkernels.adaln_modulate(x, s, c), adaln.adaln_modulate_reference(x, s, c))\n"
        "assert torch.equal(mfkernels.gated_residual(x, s, x), gr.gated_residual_reference(x, s, x))\n"
        "print('ok')\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                            cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]), timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# ----------------------------------------------------------------------------------------------------------------------
# larger grids (--runslow)
# ----------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, N, C", [(4, 256, 1152), (3, 100, 768), (2, 17, 4096)])
def test_adaln_large(triton_backend, seed, dtype, B, N, C):
    _check_adaln_case(B, N, C, dtype)


@pytest.mark.interpret
def test_no_graph_launches_the_kernel_directly_without_statistics(triton_backend, seed, monkeypatch):
    """Under no_grad (sampling, the EMA model, the tangent) nothing will backprop: the ops launch the kernel without
    their Function and write no mean/rstd, with the same results as the graph-recording path."""
    launches = []
    forward = adaln._adaln_forward

    def spy(*args, **kwargs):
        launches.append(kwargs.get("save_stats", False))
        return forward(*args, **kwargs)

    monkeypatch.setattr(adaln, "_adaln_forward", spy)
    x, shift, scale = _adaln_inputs(B=2, N=7, C=24)
    dx, dshift, dscale = _adaln_inputs(B=2, N=7, C=24)
    with torch.no_grad():
        y, dy = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
        y_only = mfkernels.adaln_modulate(x, shift, scale)
    assert launches == [False, False]
    primals = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y_graph, dy_graph = mfkernels.adaln_modulate_jvp(*primals, dx, dshift, dscale)
    assert launches == [False, False, True] and y_graph.grad_fn is not None
    assert torch.equal(y, y_graph.detach()) and torch.equal(dy, dy_graph) and torch.equal(y_only, y)
