"""The Triton kernels with an fp32 tangent on a bf16/fp16 primal (how the dual engine runs under bf16): the primal
output keeps the primal dtype, the tangent output is fp32 and as accurate as fp32 arithmetic on the given inputs,
where an all-16-bit tangent is not. The reference is float64 from the very same input values."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfkernels
from mfkernels.adaln import adaln_modulate_reference
from mfkernels.attention import attention_reference
from mfkernels.gated import gated_residual_reference

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
# On CUDA the attention kernel's fp32 tangent dots are TF32 (unit roundoff 4.9e-4, against bf16's 3.9e-3): a few
# roundings bound it, and it need only beat the bf16 tangent rather than by 10x. Elementwise kernels stay fp32.
ON_CUDA = torch.cuda.is_available()
TF32_TOL = 2e-3


def _rel(actual, expected):
    return ((actual.to(F64) - expected).norm() / expected.norm()).item()


def _jvp64(fn, primals, tangents):
    return torch.func.jvp(fn, tuple(t.to(F64) for t in primals), tuple(t.to(F64) for t in tangents))


def _check(op, fn64, primals, tangents, half, tol):
    """op on (half primals, fp32 tangents) and on (half, half): dtypes, and the fp32 tangent within tol of float64
    while the half tangent is clearly worse."""
    y, dy = op(*primals, *tangents)
    y_half, dy_half = op(*primals, *(t.to(half) for t in tangents))
    y_ref, dy_ref = _jvp64(fn64, primals, tangents)
    assert y.dtype == half and dy.dtype == F32 and dy_half.dtype == half
    err, err_half = _rel(dy, dy_ref), _rel(dy_half, dy_ref)
    print(f"tangent error: fp32 {err:.2e}, {half} {err_half:.2e}; primal error {_rel(y, y_ref):.2e}")
    assert err <= tol, f"fp32 tangent error {err:.3e} > {tol:.0e}"
    assert err_half > (1.5 if tol == TF32_TOL else 10) * err, "an all-16-bit tangent should be far less accurate"
    assert torch.equal(y, y_half), "the primal must not depend on the tangent's dtype"


# bf16 only: the interpreter computes fp16 dots in fp16 (a GPU accumulates them in fp32), so its fp16 scores, hence P,
# carry fp16 rounding into every tangent (3e-5 here), a property of the interpreter, not of the kernel.
@pytest.mark.parametrize("half", [BF16])
@pytest.mark.parametrize("D", [64, 72])
def test_attention_fp32_tangent(half, D, triton_backend, seed):
    B, H, Nq, Nkv = 1, 2, 37, 45
    primals = [torch.randn(B, H, n, D, dtype=F64).to(half) for n in (Nq, Nkv, Nkv)]
    tangents = [torch.randn(B, H, n, D, dtype=F32) for n in (Nq, Nkv, Nkv)]

    def fn64(q, k, v):
        with sdpa_kernel([SDPBackend.MATH]):
            return attention_reference(q, k, v, 1 / math.sqrt(D))

    # fp32 accumulation over 45 keys and 72 channels from exact inputs: a few fp32 ulps (TF32 dots on CUDA)
    _check(mfkernels.attention_jvp, fn64, primals, tangents, half, TF32_TOL if ON_CUDA else 1e-5)


@pytest.mark.parametrize("half", [BF16, F16])
def test_adaln_fp32_tangent(half, triton_backend, seed):
    B, N, C = 2, 19, 72
    primals = [torch.randn(B, N, C, dtype=F64).to(half)] + [torch.randn(B, C, dtype=F64).to(half) for _ in range(2)]
    tangents = [torch.randn(B, N, C, dtype=F32)] + [torch.randn(B, C, dtype=F32) for _ in range(2)]
    _check(mfkernels.adaln_modulate_jvp, adaln_modulate_reference, primals, tangents, half, 1e-5)


@pytest.mark.parametrize("half", [BF16, F16])
def test_gated_residual_fp32_tangent(half, triton_backend, seed):
    B, N, C = 2, 19, 72
    primals = [torch.randn(B, N, C, dtype=F64).to(half), torch.randn(B, C, dtype=F64).to(half),
               torch.randn(B, N, C, dtype=F64).to(half)]
    tangents = [torch.randn(B, N, C, dtype=F32), torch.randn(B, C, dtype=F32), torch.randn(B, N, C, dtype=F32)]
    _check(mfkernels.gated_residual_jvp, gated_residual_reference, primals, tangents, half, 1e-6)


@pytest.mark.parametrize("half", [BF16, F16])
def test_attention_kernel_takes_the_fp32_tangent_path(half, triton_backend, monkeypatch):
    """The fp32 tangent reaches the kernel as fp32 dots (TDOT fp32), not rounded to the primal's dtype first. (The
    interpreter widens bf16 dots to fp32 anyway, so fp16 is the case where it shows there.)"""
    attn = __import__("importlib").import_module("mfkernels.attention")
    seen = {}
    launch = attn._attn_fwd.run

    def spy(*args, **kwargs):
        seen.update({k: kwargs[k] for k in ("DOT", "TDOT", "TPRECISION") if k in kwargs})
        return launch(*args, **kwargs)

    monkeypatch.setattr(attn._attn_fwd, "run", spy)
    q, k, v = (torch.randn(1, 1, 17, 64).to(half) for _ in range(3))
    mfkernels.attention_jvp(q, k, v, *(torch.randn(1, 1, 17, 64) for _ in range(3)))
    import triton.language as tl

    assert seen["TDOT"] == tl.float32 and seen["TPRECISION"] == "tf32"
