"""The adaLN dual forward by the native CPU kernel (csrc/adaln_cpu.c through :mod:`mfkernels._native`), as an
autograd.Function: the CPU path of ``adaln_modulate_jvp`` off the Triton path. Math in :mod:`mfkernels.adaln`.

y is differentiable (backward from the kernel's saved mean/rstd: aten's LayerNorm backward, no recomputed statistics),
dy is not. The Function defines no jvp and C reads no wrapped or fake tensors, so :func:`use_native` sends torch.func
transforms, forward-mode AD and torch.compile traces to the torch composite instead.
"""

import torch

from mfkernels import _native
from mfkernels._launch import records_graph


def _adaln_backward_saved(g, x, scale, mean, rstd):
    """(dx, dshift, dscale) from the upstream g and the forward's mean/rstd (B, N): aten's LayerNorm backward on
    gxh = g (1 + scale), as autograd does for adaln_modulate_jvp_torch, without recomputing the statistics. Not
    differentiable (in-place on its own temporaries: fresh (B, N, C) buffers cost page faults on the CPU)."""
    C = x.shape[-1]
    mean, rstd = mean[..., None], rstd[..., None]  # (B, N, 1)
    gxh = g * (1 + scale[:, None, :])  # (B, N, C)
    gx = torch.ops.aten.native_layer_norm_backward(gxh, x, [C], mean, rstd, None, None, [True, False, False])[0]
    # xh recomputed rather than saved (the dual engine keeps ~1x a forward's memory), into gxh's buffer
    g_xh = torch.sub(x, mean, out=gxh).mul_(rstd).mul_(g)  # (B, N, C)
    return gx, g.sum(1), g_xh.sum(1)


class _AdaLNModulateJvpNative(torch.autograd.Function):
    """(x, shift, scale, dx, dshift, dscale, eps) -> (y, dy, mean, rstd) by the native kernel; only y is
    differentiable. No jvp: under torch.func or forward-mode AD the public op takes the torch composite."""

    @staticmethod
    def forward(x, shift, scale, dx, dshift, dscale, eps):
        # (B, C) chunks of the DiT block's (B, 6C) modulation are strided: copy them (cheap) rather than refuse
        return _native.adaln_forward_cpu(*(t.contiguous() for t in (x, shift, scale, dx, dshift, dscale)), eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, scale, _, _, _, eps = inputs
        _, dy, mean, rstd = output
        ctx.mark_non_differentiable(dy, mean, rstd)
        ctx.set_materialize_grads(False)  # dy, mean and rstd get no gradient: spare a (B, N, C) zeros per backward
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy, _gdy, _gmean, _grstd):
        x, scale, mean, rstd = ctx.saved_tensors
        if gy is None:
            return None, None, None, None, None, None, None
        if records_graph(gy, x, scale):  # double backward: stay differentiable
            from mfkernels.adaln import _adaln_backward_torch  # the closed form lives with the other references

            grads = _adaln_backward_torch(gy, x, scale, ctx.eps)
        else:
            grads = _adaln_backward_saved(gy, x, scale, mean, rstd)
        return *grads, None, None, None, None


def use_native(*tensors):
    """True when the native kernel can run the dual op on these tensors and nothing would trace through it: the
    library is built and enabled, the tensors are plain CPU fp32/fp64 of one dtype (the C kernel takes no fp32
    tangent on a 16-bit primal), and no torch.func transform, forward-mode AD level or torch.compile trace is active
    (the Function defines no jvp, and C cannot read wrapped or fake tensors)."""
    x = tensors[0]
    return (x.dtype in (torch.float32, torch.float64) and all(t.dtype == x.dtype for t in tensors)
            and _native.can_run_on(*tensors))


def adaln_modulate_jvp_native(x, shift, scale, dx, dshift, dscale, eps):
    """(y, dy) by the native CPU kernel: one pass per row; y differentiable (backward from the saved mean/rstd), dy
    detached. CPU fp32/fp64 only; raises RuntimeError when the library is not built."""
    y, dy, _, _ = _AdaLNModulateJvpNative.apply(x, shift, scale, dx, dshift, dscale, eps)
    return y, dy
