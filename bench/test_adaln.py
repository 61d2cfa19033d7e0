"""adaLN modulation with its tangent: the fused dual op against the torch composites, and a plain copy as the ceiling.

Implementations, all timed on the same rotating input sets (x, shift, scale, dx, dshift, dscale), bf16, x (B, N, C):
- "adaln_modulate_jvp_torch": the reference, the torch composite the dual engine uses without kernels.
- "adaln_modulate_jvp kernel": mfkernels.adaln_modulate_jvp on the Triton backend (one read of x and dx, one write
  of y and dy).
- "func.jvp(layer_norm + modulate)": the naive composite, torch.func.jvp over F.layer_norm then modulate.
- "copy x, dx": clone x and dx, the bandwidth ceiling for an op that must read and write that much.

Bytes moved (the op's unavoidable traffic): read x, dx and the four (B, C) vectors, write y and dy:
(4 B N C + 4 B C) * element size; the copy moves 4 B N C elements. GB/s = bytes / median time.
Shapes: DiT-B/2 and DiT-XL/2 blocks at 256 px, batch 32 (B=32, N=256, C=768 / 1152). GPU only.
"""

import pytest
import torch

import mfkernels
from bench.common import Case, bench_device, kernel_backend, pool_size, require_gpu, time_once
from mfkernels.adaln import adaln_modulate_jvp_torch, adaln_modulate_reference

REFERENCE, PROJECT, CEILING = "adaln_modulate_jvp_torch", "adaln_modulate_jvp kernel", "copy x, dx"
SHAPES = [(32, 256, 768), (32, 256, 1152)]  # (B, N, C)


def _kernel(x, shift, scale, dx, dshift, dscale):
    with kernel_backend("triton"):
        return mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)


def _naive(x, shift, scale, dx, dshift, dscale):
    return torch.func.jvp(adaln_modulate_reference, (x, shift, scale), (dx, dshift, dscale))


def _copy(x, shift, scale, dx, dshift, dscale):
    return x.clone(), dx.clone()


IMPLS = {
    REFERENCE: adaln_modulate_jvp_torch,
    PROJECT: _kernel,
    "func.jvp(layer_norm + modulate)": _naive,
    CEILING: _copy,
}


def adaln_bytes(B, N, C, element_size, impl):
    if impl == CEILING:
        return 4 * B * N * C * element_size
    return (4 * B * N * C + 4 * B * C) * element_size


def adaln_record(B, N, C, impl):
    """(group, extra_info) of one benchmark: what the report reads (names of the compared rows, the byte count)."""
    info = dict(suite="adaln", impl=impl, reference=REFERENCE, project=PROJECT, ceiling=CEILING,
                shape={"B": B, "N": N, "C": C}, dtype="bf16", bytes=adaln_bytes(B, N, C, 2, impl))
    return f"adaLN B={B} N={N} C={C}", info


def adaln_case(B, N, C, *, dtype=torch.bfloat16, device=None, pool=None, seed=0):
    """The setup factory of this suite: a pool of (x, shift, scale, dx, dshift, dscale) sets, drawn on the device."""
    device = device or bench_device()
    g = torch.Generator(device=device).manual_seed(seed)
    set_bytes = (2 * B * N * C + 4 * B * C) * torch.empty((), dtype=dtype).element_size()
    pool = pool or pool_size(set_bytes)

    def one_set():
        x, dx = (torch.randn(B, N, C, generator=g, device=device) for _ in range(2))
        shift, scale, dshift, dscale = (0.1 * torch.randn(B, C, generator=g, device=device) for _ in range(4))
        return tuple(t.to(dtype) for t in (x, shift, scale, dx, dshift, dscale))

    return Case([one_set() for _ in range(pool)], IMPLS, device)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-N{s[1]}-C{s[2]}")
def test_adaln(benchmark, shape, impl, profile):
    device = bench_device()
    require_gpu(device, "adaLN")
    B, N, C = shape
    case = adaln_case(B, N, C, device=device)
    call = case.call(impl)
    for _ in range(3):  # autotuning and the allocator's first growth happen here, not in the timed calls
        call()
    estimate = min(time_once(call, device) for _ in range(3))
    benchmark.group, info = adaln_record(B, N, C, impl)
    benchmark.extra_info.update(info)
    benchmark.pedantic(call, rounds=profile.kernel_rounds(estimate, 20, 500), warmup_rounds=profile.scaled(5),
                       iterations=1)
