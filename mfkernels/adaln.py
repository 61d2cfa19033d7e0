"""adaLN modulation with its forward-mode tangent: LayerNorm (no affine) over C, then scale and shift per sample.

Shapes: x (B, N, C), shift and scale (B, C). Math, per row x of length C:

    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  xh = (x - mean) * rstd
    y    = xh * (1 + scale) + shift

The tangent along (dx, dshift, dscale) is

    dxh = (dx - mean(dx) - xh * mean(xh * dx)) * rstd
    dy  = dxh * (1 + scale) + xh * dscale + dshift

and the gradients of a loss with upstream g = dL/dy are

    d shift = sum_N g,  d scale = sum_N g * xh,  gxh = g * (1 + scale)
    d x     = (gxh - mean(gxh) - xh * mean(gxh * xh)) * rstd

In ``adaln_modulate_jvp`` the primal y is differentiable with respect to x, shift and scale; the tangent dy is not
(MeanFlow puts the whole tangent under stop-gradient, so it needs values only).

Kernels (used when :func:`mfkernels._backend.use_triton` says so; the torch composite otherwise):
- ``_adaln_fwd``: one program per tile of rows of one sample; each row is read once (x and dx), mean, rstd, mean(dx)
  and mean(xh * dx) stay in registers, y and dy are written once; mean and rstd are saved for the backward.
- ``_adaln_bwd``: reuses the saved mean/rstd; each program loops over a group of rows and writes one partial of
  d shift and d scale per (sample, group); a torch sum over groups finishes them (deterministic, no atomics).
Dtypes fp32, fp16, bf16 and fp64 (fp64 in the interpreter only; on a GPU it takes the torch path): the primals share
one dtype, the tangents share the primal's or, on a 16-bit primal, fp32 (mfkernels._dtypes); y has the primal's dtype
and dy the tangent's. fp32 accumulation, fp64 for fp64 inputs. Without a graph to record (no_grad: sampling, the
tangent) the ops launch the forward kernel directly and write no mean/rstd.
Off the Triton path, CPU fp32/fp64 ``adaln_modulate_jvp`` runs the native C kernel (csrc/adaln_cpu.c, the same
one-pass row math; see :mod:`mfkernels.adaln_native`) when it is built and not disabled by ``MFKERNELS_NATIVE=0``; its
backward reuses the saved mean/rstd. Under torch.func transforms, forward-mode AD or torch.compile that op takes the
torch composite instead.
Limits: C <= 4096 (a whole row lives in registers, spill-free on sm_80/sm_90 up to there; wider rows take the torch
path unless the triton backend is forced, which raises). Non-contiguous inputs are copied to contiguous ones before a
launch. The eps reaches a compiled kernel as an fp32 scalar.
The gated residual of the DiT block lives in :mod:`mfkernels.gated` and is re-exported here.
"""

import torch
import torch.nn.functional as F

from mfkernels._backend import use_triton
from mfkernels._dtypes import check_dtypes, no_autocast
from mfkernels._launch import (
    FP64_INTERPRETER_ONLY,
    MAX_BLOCK_C,
    acc_dtype,
    autotune_warps,
    cast_out,
    fp64_on_gpu,
    is_traced,
    jit,
    kernel_launch,
    kernel_takes,
    next_power_of_2,
    num_groups,
    plain,
    records_graph,
    row_tile,
    tl,
)
from mfkernels.adaln_native import adaln_modulate_jvp_native, use_native
from mfkernels.gated import (  # noqa: F401  (re-exported: the public ops live beside adaLN)
    gated_residual,
    gated_residual_jvp,
    gated_residual_jvp_torch,
    gated_residual_reference,
)

DEFAULT_EPS = 1e-6  # DiT's LayerNorm eps


# ----------------------------------------------------------------------------------------------------------------------
# torch reference: the oracle for tests and benchmarks, and the CPU path
# ----------------------------------------------------------------------------------------------------------------------

def adaln_modulate_reference(x, shift, scale, eps=DEFAULT_EPS):
    xh = F.layer_norm(x, (x.shape[-1],), eps=eps)  # (B, N, C)
    return xh * (1 + scale[:, None, :]) + shift[:, None, :]


def _adaln_tangent(x, shift, scale, dx, dshift, dscale, eps):
    """The closed-form tangent, differentiable (the Functions' fallback when a graph must run through dy)."""
    mean = x.mean(-1, keepdim=True)  # (B, N, 1)
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # (B, N, 1)
    xh = (x - mean) * rstd  # (B, N, C)
    dxh = (dx - dx.mean(-1, keepdim=True) - xh * (xh * dx).mean(-1, keepdim=True)) * rstd  # (B, N, C)
    return dxh * (1 + scale[:, None, :]) + xh * dscale[:, None, :] + dshift[:, None, :]


def adaln_tangent_reference(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """dy from the closed form in the module docstring, written out term by term (no autograd)."""
    with torch.no_grad():
        return _adaln_tangent(x, shift, scale, dx, dshift, dscale, eps)


def adaln_modulate_jvp_torch(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """Fast torch composite: the LayerNorm Jacobian is symmetric, so its backward kernel applied to dx is J dx.

    The tangent is computed in the tangents' dtype. fp32 tangents on 16-bit primals get xh, mean and rstd recomputed
    in fp32 from x (aten returns them in bf16 for bf16 x), as the kernel's fp32 row statistics give them.
    """
    C = x.shape[-1]
    xh, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], None, None, eps)
    y = torch.addcmul(shift[:, None, :], xh, 1 + scale[:, None, :])
    td = dx.dtype
    with torch.no_grad(), no_autocast(dx):
        wider = td != x.dtype
        x, scale = x.detach().to(td), scale.detach().to(td)
        if wider:
            xh, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], None, None, eps)
        dxh = torch.ops.aten.native_layer_norm_backward(
            dx, x, [C], mean.detach(), rstd.detach(), None, None, [True, False, False]
        )[0]
        xh = xh.detach()
        dy = dxh * (1 + scale[:, None, :]) + xh * dscale[:, None, :] + dshift[:, None, :]
    return y, dy


def _adaln_backward_torch(g, x, scale, eps):
    """The closed-form gradients, differentiable (fallback when the backward itself is recorded)."""
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # (B, N, 1)
    xh = (x - x.mean(-1, keepdim=True)) * rstd  # (B, N, C)
    gxh = g * (1 + scale[:, None, :])  # (B, N, C)
    gx = (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True)) * rstd
    return gx, g.sum(1), (g * xh).sum(1)


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

@autotune_warps(key=["C", "BLOCK_N", "WRITE_Y", "HAS_TANGENT"])
@jit
def _adaln_fwd(X, SHIFT, SCALE, DX, DSHIFT, DSCALE, Y, DY, MEAN, RSTD, N, C, eps,
               WRITE_Y: tl.constexpr, HAS_TANGENT: tl.constexpr, SAVE_STATS: tl.constexpr, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(N, BLOCK_N), B): a tile of BLOCK_N rows of sample b, each row whole in registers
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    row_ok = n < N
    col_ok = c < C
    mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_N, BLOCK_C)
    rows = b * N + n  # (BLOCK_N,) int64: B * N * C may pass 2**31
    offs = rows[:, None] * C + c[None, :]  # (BLOCK_N, BLOCK_C)

    # upcast right after the load: bf16 arithmetic is wrong in the interpreter, and we accumulate in ACC anyway
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    mean = tl.sum(x, axis=1) / C  # (BLOCK_N,)
    xc = tl.where(mask, x - mean[:, None], 0.0)  # padded lanes must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)  # (BLOCK_N,); sqrt, not rsqrt: rsqrt has no fp64
    xh = xc * rstd[:, None]  # (BLOCK_N, BLOCK_C), zero in padded lanes
    scale1 = 1.0 + tl.load(SCALE + b * C + c, mask=col_ok, other=0.0).to(ACC)  # (BLOCK_C,)
    if WRITE_Y:
        shift = tl.load(SHIFT + b * C + c, mask=col_ok, other=0.0).to(ACC)
        y = xh * scale1[None, :] + shift[None, :]
        tl.store(Y + offs, cast_out(y, Y.dtype.element_ty), mask=mask)
    if SAVE_STATS:
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)
    if HAS_TANGENT:
        dx = tl.load(DX + offs, mask=mask, other=0.0).to(ACC)
        dx_mean = tl.sum(dx, axis=1) / C  # (BLOCK_N,)
        xh_dx_mean = tl.sum(xh * dx, axis=1) / C  # (BLOCK_N,)
        dxh = (dx - dx_mean[:, None] - xh * xh_dx_mean[:, None]) * rstd[:, None]
        dshift = tl.load(DSHIFT + b * C + c, mask=col_ok, other=0.0).to(ACC)
        dscale = tl.load(DSCALE + b * C + c, mask=col_ok, other=0.0).to(ACC)
        dy = dxh * scale1[None, :] + xh * dscale[None, :] + dshift[None, :]
        tl.store(DY + offs, cast_out(dy, DY.dtype.element_ty), mask=mask)


@autotune_warps(key=["C", "BLOCK_N"])
@jit
def _adaln_bwd(X, SCALE, MEAN, RSTD, G, GX, PSHIFT, PSCALE, N, C, ROWS_PER_GROUP, NUM_GROUPS,
               ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (NUM_GROUPS, B): program (group, b) walks rows [group * ROWS_PER_GROUP, +ROWS_PER_GROUP) of sample b in
    # tiles of BLOCK_N, writes dx for them and one partial row of d shift and d scale
    group = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_ok = c < C
    scale1 = 1.0 + tl.load(SCALE + b * C + c, mask=col_ok, other=0.0).to(ACC)  # (BLOCK_C,)
    acc_shift = tl.zeros((BLOCK_C,), dtype=ACC)
    acc_scale = tl.zeros((BLOCK_C,), dtype=ACC)
    for start in range(0, ROWS_PER_GROUP, BLOCK_N):
        n = group * ROWS_PER_GROUP + start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_ok = n < N
        mask = row_ok[:, None] & col_ok[None, :]  # (BLOCK_N, BLOCK_C)
        rows = b * N + n  # (BLOCK_N,) int64
        offs = rows[:, None] * C + c[None, :]  # (BLOCK_N, BLOCK_C)
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # (BLOCK_N,)
        xh = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)  # (BLOCK_N, BLOCK_C)
        acc_shift += tl.sum(g, axis=0)
        acc_scale += tl.sum(g * xh, axis=0)
        gxh = g * scale1[None, :]  # zero in padded lanes since g is
        gxh_mean = tl.sum(gxh, axis=1) / C  # (BLOCK_N,)
        gxh_xh_mean = tl.sum(gxh * xh, axis=1) / C  # (BLOCK_N,)
        gx = (gxh - gxh_mean[:, None] - xh * gxh_xh_mean[:, None]) * rstd[:, None]
        tl.store(GX + offs, cast_out(gx, GX.dtype.element_ty), mask=mask)
    part = (b * NUM_GROUPS + group) * C + c  # (BLOCK_C,) into the (B, NUM_GROUPS, C) partials
    tl.store(PSHIFT + part, acc_shift, mask=col_ok)
    tl.store(PSCALE + part, acc_scale, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------------
# launchers: plain contiguous tensors in, fresh tensors out (inputs and grad_output are never written)
# ----------------------------------------------------------------------------------------------------------------------

def _check(x, shift, scale, tangents=None):
    if x.dim() != 3:
        raise ValueError(f"adaln_modulate: x must be (B, N, C), got shape {tuple(x.shape)}")
    B, _, C = x.shape
    named = {"shift": shift, "scale": scale}
    if tangents is not None:
        named.update(tangents)
    for name, t in named.items():
        want = tuple(x.shape) if name == "dx" else (B, C)
        if tuple(t.shape) != want:
            raise ValueError(f"adaln_modulate: {name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"adaln_modulate: {name} is on {t.device} but x is on {x.device}")
    check_dtypes("adaln_modulate", {"x": x, "shift": shift, "scale": scale}, tangents)


def _block_c(C):
    block_c = next_power_of_2(C)
    if block_c > MAX_BLOCK_C:
        raise ValueError(f"adaln_modulate: the Triton kernels take C <= {MAX_BLOCK_C}, got C={C}")
    return block_c


def _declined(x):
    if fp64_on_gpu(x):
        return FP64_INTERPRETER_ONLY
    if x.shape[-1] > MAX_BLOCK_C:
        return f"the Triton kernels take C <= {MAX_BLOCK_C} (a whole row in registers), got C={x.shape[-1]}"
    return None


def _use_kernels(x, *tensors):
    return use_triton(x, *tensors) and kernel_takes("adaln_modulate", _declined(x))


def _adaln_forward(x, shift, scale, eps, tangents=None, write_y=True, save_stats=False):
    """Returns (y, dy, mean, rstd), None where not asked for. tangents: (dx, dshift, dscale) or None."""
    B, N, C = x.shape
    block_c = _block_c(C)
    block_n = row_tile(N, block_c)
    acc, tl_acc = acc_dtype(x.dtype)
    with kernel_launch():
        x, shift, scale = (plain(t).contiguous() for t in (x, shift, scale))
        dx, dshift, dscale = (plain(t).contiguous() for t in tangents) if tangents is not None else (x, x, x)
        y = torch.empty_like(x) if write_y else None  # (B, N, C)
        dy = torch.empty_like(dx) if tangents is not None else None  # (B, N, C), in the tangents' dtype
        mean = torch.empty(B * N, dtype=acc, device=x.device) if save_stats else None  # (B * N,)
        rstd = torch.empty(B * N, dtype=acc, device=x.device) if save_stats else None  # (B * N,)
        grid = (-(-N // block_n), B)
        # absent outputs get x as a placeholder pointer: the constexpr flags compile their accesses away
        _adaln_fwd[grid](x, shift, scale, dx, dshift, dscale, x if y is None else y, x if dy is None else dy,
                         x if mean is None else mean, x if rstd is None else rstd, N, C, eps,
                         WRITE_Y=write_y, HAS_TANGENT=tangents is not None, SAVE_STATS=save_stats, ACC=tl_acc,
                         BLOCK_N=block_n, BLOCK_C=block_c)
    return y, dy, mean, rstd


def _adaln_backward(g, x, scale, mean, rstd):
    """(dx, dshift, dscale) from the upstream g = dL/dy and the saved mean/rstd."""
    B, N, C = x.shape
    block_c = _block_c(C)
    block_n = row_tile(N, block_c)
    acc, tl_acc = acc_dtype(x.dtype)
    with kernel_launch():
        g, x, scale, mean, rstd = (plain(t).contiguous() for t in (g, x, scale, mean, rstd))
        n_blocks = -(-N // block_n)
        rows_per_group = -(-n_blocks // num_groups(n_blocks, B, x.device)) * block_n
        groups = -(-N // rows_per_group)  # recomputed so that no program is left without rows
        gx = torch.empty_like(x)  # (B, N, C)
        p_shift = torch.empty((B, groups, C), dtype=acc, device=x.device)
        p_scale = torch.empty((B, groups, C), dtype=acc, device=x.device)
        _adaln_bwd[(groups, B)](x, scale, mean, rstd, g, gx, p_shift, p_scale, N, C, rows_per_group, groups,
                                ACC=tl_acc, BLOCK_N=block_n, BLOCK_C=block_c)
        return gx, p_shift.sum(1).to(x.dtype), p_scale.sum(1).to(x.dtype)  # (B, N, C), (B, C), (B, C)


def _tangent(x, shift, scale, tx, tshift, tscale, eps):
    """Tangent of y along (tx, tshift, tscale) for a Function's jvp, recomputed from the inputs."""
    tx, tshift, tscale = (torch.zeros_like(p) if t is None else t for p, t in ((x, tx), (shift, tshift),
                                                                                (scale, tscale)))
    if records_graph(x, shift, scale, tx, tshift, tscale):
        return _adaln_tangent(x, shift, scale, tx, tshift, tscale, eps)
    return _adaln_forward(x, shift, scale, eps, (tx, tshift, tscale), write_y=False)[1]


def _gradients(ctx, g):
    x, scale, mean, rstd = ctx.saved_tensors
    if records_graph(g, x, scale):  # double backward: stay differentiable
        return _adaln_backward_torch(g, x, scale, ctx.eps)
    return _adaln_backward(g, x, scale, mean, rstd)


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Functions (setup_context style, so torch.func transforms can call them)
# ----------------------------------------------------------------------------------------------------------------------

class _AdaLNModulate(torch.autograd.Function):
    """(x, shift, scale, eps) -> (y, mean, rstd); mean and rstd are outputs only so that backward can reuse them."""

    @staticmethod
    def forward(x, shift, scale, eps):
        y, _, mean, rstd = _adaln_forward(x, shift, scale, eps, save_stats=True)
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, shift, scale)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy, _gmean, _grstd):
        return *_gradients(ctx, gy), None

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, _teps):
        x, shift, scale = ctx.saved_tensors
        return _tangent(x, shift, scale, tx, tshift, tscale, ctx.eps), None, None


class _AdaLNModulateJvp(torch.autograd.Function):
    """(x, shift, scale, dx, dshift, dscale, eps) -> (y, dy, mean, rstd); only y is differentiable."""

    @staticmethod
    def forward(x, shift, scale, dx, dshift, dscale, eps):
        return _adaln_forward(x, shift, scale, eps, (dx, dshift, dscale), save_stats=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shift, scale, _, _, _, eps = inputs
        _, dy, mean, rstd = output
        ctx.mark_non_differentiable(dy, mean, rstd)
        ctx.set_materialize_grads(False)  # dy, mean and rstd get no gradient: spare a (B, N, C) zeros per backward
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.save_for_forward(x, shift, scale)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, gy, _gdy, _gmean, _grstd):
        if gy is None:
            return (None,) * 7
        return *_gradients(ctx, gy), None, None, None, None

    @staticmethod
    def jvp(ctx, tx, tshift, tscale, _tdx, _tdshift, _tdscale, _teps):
        x, shift, scale = ctx.saved_tensors
        return _tangent(x, shift, scale, tx, tshift, tscale, ctx.eps), None, None, None


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------

def adaln_modulate(x, shift, scale, eps=DEFAULT_EPS):
    """y = LayerNorm(x) * (1 + scale) + shift; x (B, N, C), shift/scale (B, C)."""
    _check(x, shift, scale)
    if _use_kernels(x, shift, scale):
        if not is_traced(x, shift, scale):  # no backward will run: skip the Function and the saved mean/rstd
            return _adaln_forward(x, shift, scale, eps)[0]
        return _AdaLNModulate.apply(x, shift, scale, eps)[0]
    return adaln_modulate_reference(x, shift, scale, eps)


def adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """(y, dy): y differentiable with respect to x, shift, scale; dy detached."""
    _check(x, shift, scale, {"dx": dx, "dshift": dshift, "dscale": dscale})
    if _use_kernels(x, shift, scale, dx, dshift, dscale):
        if not is_traced(x, shift, scale, dx, dshift, dscale):
            return _adaln_forward(x, shift, scale, eps, (dx, dshift, dscale))[:2]
        y, dy, _, _ = _AdaLNModulateJvp.apply(x, shift, scale, dx, dshift, dscale, eps)
        return y, dy
    if use_native(x, shift, scale, dx, dshift, dscale):
        return adaln_modulate_jvp_native(x, shift, scale, dx, dshift, dscale, eps)
    return adaln_modulate_jvp_torch(x, shift, scale, dx, dshift, dscale, eps)
