"""Attention with its tangent: the one-pass kernel against torch.func.jvp over SDPA (MATH) and over the kernel.

Implementations, all timed on the same rotating input sets (q, k, v, dq, dk, dv), bf16, (B, H, N, D):
- "func.jvp(SDPA MATH)": the reference, the only SDPA backend with forward AD.
- "attention_jvp kernel": mfkernels.attention_jvp on the Triton backend, MeanFlow's hot path.
- "func.jvp(kernel)": torch.func.jvp over mfkernels.attention, i.e. the Function's own ``jvp`` (triton backend).
- "attention_jvp_torch": the torch composite the dual engine uses without kernels.
- "attention kernel (forward)": mfkernels.attention alone (no tangent) on the Triton backend, the primal path.
- "SDPA flash forward": the primal alone through flash attention: the floor a one-pass JVP is held against.

FLOPs: a forward is 4 B H N^2 D (two matmuls of 2 B H N^2 D); the JVP is counted as 3 forwards (six matmuls per
tile: S, dq k^T, q dk^T, P v, P dv, (P dS) v), whatever an implementation actually spends; the two forward rows
count one forward. TFLOP/s = FLOPs / median time. GPU only: the interpreter is not a speed target.
Shapes: N in {256, 1024, 4096} (DiT at 256 px has 256 tokens) and D in {64, 72} (DiT-B/2, DiT-XL/2 head dims).
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import mfkernels
from bench.common import Case, bench_device, kernel_backend, pool_size, require_gpu, time_once
from mfkernels.attention import attention_jvp_torch, attention_reference

REFERENCE, PROJECT, FLOOR = "func.jvp(SDPA MATH)", "attention_jvp kernel", "SDPA flash forward"
FORWARD = "attention kernel (forward)"
SHAPES = [(N, D) for N in (256, 1024, 4096) for D in (64, 72)]  # (N, D): DiT-B/2 and XL/2 at 256 px, then longer
HEADS = 16
ROWS = 2**18  # B * H * N: enough (query block, head) programs to fill an H100 at every N


def _math_jvp(q, k, v, dq, dk, dv):
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(attention_reference, (q, k, v), (dq, dk, dv))


def _kernel(q, k, v, dq, dk, dv):
    with kernel_backend("triton"):
        return mfkernels.attention_jvp(q, k, v, dq, dk, dv)


def _kernel_func_jvp(q, k, v, dq, dk, dv):
    with kernel_backend("triton"):
        return torch.func.jvp(mfkernels.attention, (q, k, v), (dq, dk, dv))


def _kernel_forward(q, k, v, *_tangents):
    with kernel_backend("triton"):
        return mfkernels.attention(q, k, v), None


def _flash_forward(q, k, v, *_tangents):
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return attention_reference(q, k, v), None


IMPLS = {
    REFERENCE: _math_jvp,
    PROJECT: _kernel,
    "func.jvp(kernel)": _kernel_func_jvp,
    "attention_jvp_torch": attention_jvp_torch,
    FORWARD: _kernel_forward,
    FLOOR: _flash_forward,
}
TANGENT_FREE = (FORWARD, FLOOR)  # rows that compute the primal only


def attention_flops(B, H, N, D, impl):
    forward = 4 * B * H * N * N * D
    return forward if impl in TANGENT_FREE else 3 * forward


def attention_record(B, H, N, D, impl):
    """(group, extra_info) of one benchmark: what the report reads (names of the compared rows, the FLOP count)."""
    info = dict(suite="attention", impl=impl, reference=REFERENCE, project=PROJECT, floor=FLOOR,
                shape={"B": B, "H": H, "N": N, "D": D}, dtype="bf16", flops=attention_flops(B, H, N, D, impl),
                tangent=impl not in TANGENT_FREE)
    return f"attention N={N} D={D}", info


def attention_case(B, H, N, D, *, dtype=torch.bfloat16, device=None, pool=None, seed=0):
    """The setup factory of this suite: a pool of (q, k, v, dq, dk, dv) sets of shape (B, H, N, D), drawn on the
    device (drawing hundreds of MB on the CPU would cost more than the benchmark)."""
    device = device or bench_device()
    g = torch.Generator(device=device).manual_seed(seed)
    set_bytes = 6 * B * H * N * D * torch.empty((), dtype=dtype).element_size()
    pool = pool or pool_size(set_bytes)
    sets = [tuple(torch.randn(B, H, N, D, generator=g, device=device).to(dtype) for _ in range(6))
            for _ in range(pool)]
    return Case(sets, IMPLS, device)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}")
def test_attention(benchmark, shape, impl, profile):
    device = bench_device()
    require_gpu(device, "attention")
    N, D = shape
    B = ROWS // (N * HEADS)
    case = attention_case(B, HEADS, N, D, device=device)
    call = case.call(impl)
    for _ in range(3):  # autotuning and the allocator's first growth happen here, not in the timed calls
        call()
    estimate = min(time_once(call, device) for _ in range(3))
    benchmark.group, info = attention_record(B, HEADS, N, D, impl)
    benchmark.extra_info.update(info)
    benchmark.pedantic(call, rounds=profile.kernel_rounds(estimate, 10, 200), warmup_rounds=profile.scaled(3),
                       iterations=1)
