"""Gated residual of the DiT block with its forward-mode tangent: out = x + gate * y, gate per sample and channel.

Shapes: x and y (B, N, C), gate (B, C). Math (gate broadcast over N):

    out  = x + gate * y
    dout = dx + dgate * y + gate * dy
    d x = g,  d gate = sum_N g * y,  d y = g * gate          (g = dL/dout)

In ``gated_residual_jvp`` out is differentiable with respect to x, gate and y; dout is not.

Kernels (when :func:`mfkernels._backend.use_triton` says so; the torch composite otherwise):
- ``_gated_fwd``: one program per (BLOCK_N rows x BLOCK_C channels) tile of one sample; x, y (and dx, dy) are read
  once, out and dout written once; gate and dgate are loaded once per tile.
- ``_gated_bwd``: d y per tile; d gate as one partial per (sample, group of rows) summed by torch afterwards
  (deterministic, no atomics); d x is g itself (returned, never written).
This is not fused into the adaLN kernel: in the block, the residual follows attention or the MLP, whose output is
only ready after the adaLN that fed them. (Fusing it into the *next* adaLN, add + norm in one pass, would save one
read of out; left for a later change since it changes the op boundaries the model calls.)
Dtypes fp32, fp16, bf16, fp64 (fp64 in the interpreter only; on a GPU it takes the torch path): the primals share one
dtype, the tangents share the primal's or, on a 16-bit primal, fp32 (mfkernels._dtypes); out has the primal's dtype
and dout the tangent's. fp32 arithmetic, fp64 for fp64 inputs. Any C and N (masked).
Non-contiguous inputs are copied to contiguous ones before a launch.
"""

import torch

from mfkernels._backend import use_triton
from mfkernels._dtypes import check_dtypes, no_autocast
from mfkernels._launch import (
    FP64_INTERPRETER_ONLY,
    acc_dtype,
    autotune_warps,
    cast_out,
    fp64_on_gpu,
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

# ----------------------------------------------------------------------------------------------------------------------
# torch reference: the oracle for tests and benchmarks, and the CPU path
# ----------------------------------------------------------------------------------------------------------------------

def gated_residual_reference(x, gate, y):
    return torch.addcmul(x, gate[:, None, :], y)


def gated_residual_jvp_torch(x, gate, y, dx, dgate, dy):
    """out with its graph; dout with none, in the tangents' dtype (from the primal gate and y cast to it)."""
    out = torch.addcmul(x, gate[:, None, :], y)
    with torch.no_grad(), no_autocast(dx):
        gate, y = gate.detach().to(dx.dtype), y.detach().to(dx.dtype)
        dout = torch.addcmul(torch.addcmul(dx, dgate[:, None, :], y), gate[:, None, :], dy)
    return out, dout


# ----------------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------------

@autotune_warps(key=["C", "BLOCK_N", "BLOCK_C", "WRITE_OUT", "HAS_TANGENT"])
@jit
def _gated_fwd(X, GATE, Y, DX, DGATE, DY, OUT, DOUT, N, C,
               WRITE_OUT: tl.constexpr, HAS_TANGENT: tl.constexpr, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (cdiv(N, BLOCK_N), cdiv(C, BLOCK_C), B)
    b = tl.program_id(2).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_ok = c < C
    mask = (n < N)[:, None] & col_ok[None, :]  # (BLOCK_N, BLOCK_C)
    offs = (b * N + n)[:, None] * C + c[None, :]  # (BLOCK_N, BLOCK_C) int64
    gate = tl.load(GATE + b * C + c, mask=col_ok, other=0.0).to(ACC)  # (BLOCK_C,)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)  # upcast at once: bf16 math is wrong in the interpreter
    if WRITE_OUT:
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
        tl.store(OUT + offs, cast_out(x + gate[None, :] * y, OUT.dtype.element_ty), mask=mask)
    if HAS_TANGENT:
        dgate = tl.load(DGATE + b * C + c, mask=col_ok, other=0.0).to(ACC)  # (BLOCK_C,)
        dx = tl.load(DX + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        dout = dx + dgate[None, :] * y + gate[None, :] * dy
        tl.store(DOUT + offs, cast_out(dout, DOUT.dtype.element_ty), mask=mask)


@autotune_warps(key=["C", "BLOCK_N", "BLOCK_C"])
@jit
def _gated_bwd(G, GATE, Y, GY, PGATE, N, C, ROWS_PER_GROUP, NUM_GROUPS,
               ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # grid (NUM_GROUPS, cdiv(C, BLOCK_C), B): rows [group * ROWS_PER_GROUP, +ROWS_PER_GROUP) in tiles of BLOCK_N
    group = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    col_ok = c < C
    gate = tl.load(GATE + b * C + c, mask=col_ok, other=0.0).to(ACC)  # (BLOCK_C,)
    acc_gate = tl.zeros((BLOCK_C,), dtype=ACC)
    for start in range(0, ROWS_PER_GROUP, BLOCK_N):
        n = group * ROWS_PER_GROUP + start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask = (n < N)[:, None] & col_ok[None, :]  # (BLOCK_N, BLOCK_C)
        offs = (b * N + n)[:, None] * C + c[None, :]  # (BLOCK_N, BLOCK_C) int64
        g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        acc_gate += tl.sum(g * y, axis=0)
        tl.store(GY + offs, cast_out(g * gate[None, :], GY.dtype.element_ty), mask=mask)
    tl.store(PGATE + (b * NUM_GROUPS + group) * C + c, acc_gate, mask=col_ok)


# ----------------------------------------------------------------------------------------------------------------------
# launchers: plain contiguous tensors in, fresh tensors out (inputs and grad_output are never written)
# ----------------------------------------------------------------------------------------------------------------------

def _check(x, gate, y, tangents=None):
    if x.dim() != 3:
        raise ValueError(f"gated_residual: x must be (B, N, C), got shape {tuple(x.shape)}")
    B, _, C = x.shape
    named = {"gate": gate, "y": y}
    if tangents is not None:
        named.update(tangents)
    for name, t in named.items():
        want = (B, C) if name in ("gate", "dgate") else tuple(x.shape)
        if tuple(t.shape) != want:
            raise ValueError(f"gated_residual: {name} must have shape {want}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"gated_residual: {name} is on {t.device} but x is on {x.device}")
    check_dtypes("gated_residual", {"x": x, "gate": gate, "y": y}, tangents)


def _use_kernels(x, *tensors):
    return use_triton(x, *tensors) and kernel_takes("gated_residual", FP64_INTERPRETER_ONLY if fp64_on_gpu(x) else None)


def _tiles(N, C):
    # 128 channels = one warp's worth of 4-wide vector loads per row; C = 1152 (DiT-XL) is 9 tiles, no padding
    block_c = min(next_power_of_2(C), 128)
    return row_tile(N, block_c), block_c


def _gated_forward(x, gate, y, tangents=None, write_out=True):
    """Returns (out, dout), None where not asked for. tangents: (dx, dgate, dy) or None."""
    B, N, C = x.shape
    block_n, block_c = _tiles(N, C)
    _, tl_acc = acc_dtype(x.dtype)
    with kernel_launch():
        x, gate, y = (plain(t).contiguous() for t in (x, gate, y))
        dx, dgate, dy = (plain(t).contiguous() for t in tangents) if tangents is not None else (x, gate, y)
        out = torch.empty_like(x) if write_out else None  # (B, N, C)
        dout = torch.empty_like(dx) if tangents is not None else None  # (B, N, C), in the tangents' dtype
        grid = (-(-N // block_n), -(-C // block_c), B)
        # absent outputs get x as a placeholder pointer: the constexpr flags compile their accesses away
        _gated_fwd[grid](x, gate, y, dx, dgate, dy, x if out is None else out, x if dout is None else dout, N, C,
                         WRITE_OUT=write_out, HAS_TANGENT=tangents is not None, ACC=tl_acc,
                         BLOCK_N=block_n, BLOCK_C=block_c)
    return out, dout


def _gated_backward(g, gate, y):
    """(dx, dgate, dy) from the upstream g = dL/dout."""
    B, N, C = y.shape
    block_n, block_c = _tiles(N, C)
    acc, tl_acc = acc_dtype(y.dtype)
    with kernel_launch():
        g_in = g
        g, gate, y = (plain(t).contiguous() for t in (g, gate, y))
        n_blocks = -(-N // block_n)
        rows_per_group = -(-n_blocks // num_groups(n_blocks, B, y.device)) * block_n
        groups = -(-N // rows_per_group)  # recomputed so that no program is left without rows
        gy = torch.empty_like(y)  # (B, N, C)
        p_gate = torch.empty((B, groups, C), dtype=acc, device=y.device)
        _gated_bwd[(groups, -(-C // block_c), B)](g, gate, y, gy, p_gate, N, C, rows_per_group, groups,
                                                   ACC=tl_acc, BLOCK_N=block_n, BLOCK_C=block_c)
        return g_in, p_gate.sum(1).to(y.dtype), gy  # d x is the upstream itself, as for any sum


def _tangent(x, gate, y, tx, tgate, ty):
    """Tangent of out along (tx, tgate, ty) for a Function's jvp, recomputed from the inputs."""
    tx, tgate, ty = (torch.zeros_like(p) if t is None else t for p, t in ((x, tx), (gate, tgate), (y, ty)))
    if records_graph(x, gate, y, tx, tgate, ty):
        return tx + tgate[:, None, :] * y + gate[:, None, :] * ty
    return _gated_forward(x, gate, y, (tx, tgate, ty), write_out=False)[1]


def _gradients(ctx, g):
    gate, y = ctx.saved_tensors
    if records_graph(g, gate, y):  # double backward: stay differentiable
        return g, (g * y).sum(1), g * gate[:, None, :]
    return _gated_backward(g, gate, y)


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Functions (setup_context style, so torch.func transforms can call them)
# ----------------------------------------------------------------------------------------------------------------------

class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(x, gate, y):
        return _gated_forward(x, gate, y)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, y = inputs
        ctx.save_for_backward(gate, y)
        ctx.save_for_forward(x, gate, y)

    @staticmethod
    def backward(ctx, gout):
        return _gradients(ctx, gout)

    @staticmethod
    def jvp(ctx, tx, tgate, ty):
        return _tangent(*ctx.saved_tensors, tx, tgate, ty)


class _GatedResidualJvp(torch.autograd.Function):
    """(x, gate, y, dx, dgate, dy) -> (out, dout); only out is differentiable."""

    @staticmethod
    def forward(x, gate, y, dx, dgate, dy):
        return _gated_forward(x, gate, y, (dx, dgate, dy))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, gate, y = inputs[:3]
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # dout gets no gradient: spare a (B, N, C) zeros per backward
        ctx.save_for_backward(gate, y)
        ctx.save_for_forward(x, gate, y)

    @staticmethod
    def backward(ctx, gout, _gdout):
        if gout is None:
            return (None,) * 6
        return *_gradients(ctx, gout), None, None, None

    @staticmethod
    def jvp(ctx, tx, tgate, ty, _tdx, _tdgate, _tdy):
        return _tangent(*ctx.saved_tensors, tx, tgate, ty), None


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------

def gated_residual(x, gate, y):
    """x + gate[:, None] * y; x, y (B, N, C), gate (B, C)."""
    _check(x, gate, y)
    if _use_kernels(x, gate, y):
        return _GatedResidual.apply(x, gate, y)
    return gated_residual_reference(x, gate, y)


def gated_residual_jvp(x, gate, y, dx, dgate, dy):
    """(out, dout): out differentiable, dout = dx + dgate * y + gate * dy detached."""
    _check(x, gate, y, {"dx": dx, "dgate": dgate, "dy": dy})
    if _use_kernels(x, gate, y, dx, dgate, dy):
        return _GatedResidualJvp.apply(x, gate, y, dx, dgate, dy)
    return gated_residual_jvp_torch(x, gate, y, dx, dgate, dy)
