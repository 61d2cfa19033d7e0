"""The *_jvp ops' dtype rule (mfkernels._dtypes): an fp32 tangent riding on a bf16 primal, through the torch path
(the CPU path, and the oracle), against float64; and the ValueErrors of inputs that break the rule."""

import math

import pytest
import torch

import mfkernels
from mfkernels import _native, adaln, adaln_native

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def _attention_ref(q, k, v, dq, dk, dv):
    """float64 (o, do) from the closed form of mfkernels.attention's docstring."""
    s = 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax(q @ k.transpose(-2, -1) * s, dim=-1)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * s
    pds = p * ds
    return p @ v, (pds - p * pds.sum(-1, keepdim=True)) @ v + p @ dv


def _gated_ref(x, gate, y, dx, dgate, dy):
    return x + gate[:, None] * y, dx + dgate[:, None] * y + gate[:, None] * dy


def _adaln_ref(x, shift, scale, dx, dshift, dscale):
    return (adaln.adaln_modulate_reference(x, shift, scale),
            adaln.adaln_tangent_reference(x, shift, scale, dx, dshift, dscale))


B, H, N, C, D = 2, 3, 37, 96, 64
OPS = {  # op: (function, float64 reference, argument names, shapes)
    "attention": (mfkernels.attention_jvp, _attention_ref, ("q", "k", "v", "dq", "dk", "dv"),
                  [(B, H, N, D)] * 6),
    "adaln": (mfkernels.adaln_modulate_jvp, _adaln_ref, ("x", "shift", "scale", "dx", "dshift", "dscale"),
              [(B, N, C), (B, C), (B, C)] * 2),
    "gated": (mfkernels.gated_residual_jvp, _gated_ref, ("x", "gate", "y", "dx", "dgate", "dy"),
              [(B, N, C), (B, C), (B, N, C)] * 2),
}


def _inputs(op, primal_dtypes, tangent_dtypes):
    """Random primals and tangents of the given dtypes (rounded from float64); adaLN rows get a mean far from 0."""
    shapes = OPS[op][3]
    tensors = [torch.randn(s, dtype=F64) for s in shapes]
    if op == "adaln":
        tensors[0] = tensors[0] + 3 * torch.randn(B, N, 1, dtype=F64)
    return [t.to(d) for t, d in zip(tensors, (*primal_dtypes, *tangent_dtypes))]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("op", list(OPS))
def test_fp32_tangent_on_a_bf16_primal(op, autocast, seed):
    """The tangent is computed to fp32 accuracy from the bf16 primal inputs (under autocast too, which would
    otherwise run its matmuls in bf16); the primal is the all-bf16 op's, bit for bit."""
    fn, ref_fn = OPS[op][:2]
    inputs = _inputs(op, (BF16,) * 3, (F32,) * 3)
    primals, tangents = inputs[:3], inputs[3:]
    y_ref, dy_ref = ref_fn(*(t.double() for t in primals + tangents))  # the same rounded primal values
    with torch.autocast("cpu", BF16, enabled=autocast):
        y, dy = fn(*primals, *tangents)
        y_bf16, dy_bf16 = fn(*primals, *(t.to(BF16) for t in tangents))  # the bf16 tangent, for comparison
    assert y.dtype == BF16 and dy.dtype == F32 and dy_bf16.dtype == BF16
    assert torch.equal(y, y_bf16)
    err, err_bf16 = _rel(dy, dy_ref), _rel(dy_bf16, dy_ref)
    print(f"{op}: relative tangent error fp32 {err:.2e}, bf16 {err_bf16:.2e}; primal {_rel(y, y_ref):.2e}")
    assert err <= 1e-5, f"fp32 tangent error {err:.2e}"
    assert err_bf16 >= 100 * err, f"the bf16 tangent ({err_bf16:.2e}) should be far worse than fp32 ({err:.2e})"
    assert _rel(y, y_ref) <= 2 * 2.0**-8  # the primal: bf16 accuracy


def test_native_adaln_takes_one_dtype_only(monkeypatch):
    """The C kernel reads every input in x's dtype: any other mix takes the torch composite."""
    monkeypatch.delenv("MFKERNELS_NATIVE", raising=False)
    if not _native.native_available():
        pytest.skip(f"the native CPU library is not available ({_native.load_error()})")
    x, shift, scale = torch.randn(2, 3, 8), torch.randn(2, 8), torch.randn(2, 8)
    assert adaln_native.use_native(x, shift, scale, x, shift, scale)
    assert not adaln_native.use_native(x.bfloat16(), shift.bfloat16(), scale.bfloat16(), x, shift, scale)
    assert not adaln_native.use_native(x, shift, scale, x.double(), shift.double(), scale.double())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", list(OPS))
def test_dtype_rule(op, backend, seed):
    """Allowed: one primal dtype, one tangent dtype, equal or fp32 over bf16/fp16. Anything else: a ValueError that
    names the argument, raised before any kernel is chosen."""
    mfkernels.set_backend(backend)
    fn, names = OPS[op][0], OPS[op][2]
    _, p1, _, t0, t1, _ = names
    bad = [
        ((F32, F32, F32), (F64, F64, F64), t0),  # a wider tangent only over 16-bit primals
        ((F64, F64, F64), (F32, F32, F32), t0),  # a narrower tangent never
        ((BF16, BF16, BF16), (F16, F16, F16), t0),
        ((F32, F32, F32), (BF16, BF16, BF16), t0),
        ((BF16, BF16, BF16), (F32, BF16, F32), t1),  # tangents share one dtype
        ((BF16, F32, BF16), (F32, F32, F32), p1),  # primals share one dtype
    ]
    for primal, tangent, name in bad:
        with pytest.raises(ValueError, match=rf"\b{name} has dtype"):
            fn(*_inputs(op, primal, tangent))
    if backend == "torch":  # the Triton kernels' own tests (interpreter) cover their side of the rule
        for primal, tangent in [((BF16,) * 3, (F32,) * 3), ((F16,) * 3, (F32,) * 3), ((F32,) * 3, (F32,) * 3)]:
            y, dy = fn(*_inputs(op, primal, tangent))
            assert y.dtype == primal[0] and dy.dtype == tangent[0]
