"""GELU with DiT's tanh approximation and its derivative applied to a vector:

    gelu_tanh(x)             = x (1 + tanh u) / 2,   u = sqrt(2 / pi) (x + 0.044715 x^3)
    gelu_tanh_backward(g, x) = g gelu_tanh'(x)       (the backward; on a tangent dx, the forward-mode tangent)

On plain CPU fp32 or bf16 tensors (all of one dtype, made contiguous if need be), with the native library built and
not disabled by ``MFKERNELS_NATIVE=0``, both run csrc/gelu_cpu.c: torch's CPU tanh-GELU is not vectorised (one thread,
1024 x 512: 0.95 ms forward and 1.05 ms backward against 0.32 and 0.39 ms native), and a MeanFlow step runs the MLP's
GELU five times over; bf16 is what autocast gives the MLP in bf16 training. Everything else takes torch's ``F.gelu`` /
``aten.gelu_backward``: GPUs, fp64, fp16, mixed dtypes, torch.func
transforms and forward-mode AD (the Function defines no jvp, and C cannot read wrapped tensors), torch.compile traces,
and double backward. The kernel is also more accurate than torch's fp32 op (tests/mfkernels/test_gelu_native.py).
"""

import torch
import torch.nn.functional as F

from mfkernels import _native
from mfkernels._launch import records_graph


def use_native_gelu(*tensors) -> bool:
    """True when the native kernels can take these tensors and nothing would trace through them."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) == 1 and dtypes <= set(_native.GELU_DTYPES) and _native.can_run_on(*tensors)


class _GeluTanhNative(torch.autograd.Function):
    """x -> gelu_tanh(x) by the native kernel, its backward too; a double backward takes torch's differentiable op."""

    @staticmethod
    def forward(x):
        return _native.gelu_tanh_forward_cpu(x.contiguous())

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if records_graph(g, x):
            return torch.ops.aten.gelu_backward(g, x, approximate="tanh")
        return _native.gelu_tanh_backward_cpu(g.contiguous(), x.contiguous())


def gelu_tanh(x):
    """GELU, tanh approximation (``F.gelu(x, approximate="tanh")``): native on CPU fp32 and bf16 (module docstring)."""
    if use_native_gelu(x):
        return _GeluTanhNative.apply(x)
    return F.gelu(x, approximate="tanh")


def gelu_tanh_backward(g, x):
    """g * gelu_tanh'(x) (``aten.gelu_backward(g, x, approximate="tanh")``): native on CPU fp32/bf16 when no graph is
    recorded through g or x, torch's differentiable op otherwise."""
    if use_native_gelu(g, x) and not records_graph(g, x):
        return _native.gelu_tanh_backward_cpu(g.contiguous(), x.contiguous())
    return torch.ops.aten.gelu_backward(g, x, approximate="tanh")
