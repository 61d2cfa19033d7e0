"""Attention with its forward-mode tangent. q (B, H, Nq, D), k and v (B, H, Nkv, D), scale s = 1/sqrt(D) by default.

    S = q k^T s,  P = softmax(S) (over keys),  O = P v
    dS = (dq k^T + q dk^T) s
    dO = (P * (dS - rowsum(P * dS))) v + P dv

In ``attention_jvp`` the primal O is differentiable with respect to q, k, v; the tangent dO is not.

Triton kernel (one pass, flash style): one program per (query block, b, h) sweeps the key blocks once. With m the
running row maximum of the raw scores q k^T and P~ = exp2((q k^T - m) s log2(e)) (log2(e) folded into the scale so
that exp2 does the exponentials; m subtracted before scaling, so that the exponent is exact up to one rounding even
for scores of 1e4), it keeps in registers, each rescaled by exp2((m_old - m_new) s log2(e)) when the max moves:

    l = sum rowsum(P~),  O~ = sum P~ v,  T~ = sum (P~ dv + (P~ * dS) v),  r = sum rowsum(P~ * dS)

and ends with O = O~ / l, dO = (T~ - r O) / l, and the statistics (m, log2 l) for the backward: the log-sum-exp is
lse = m s + log(l). T~ is the design note's A~ + B~ in one accumulator: only their sum is used, and one fewer
(BLOCK_M, D) fp32 tile is what keeps the tangent kernel out of register spills. Six matmuls per tile (S, dq k^T,
q dk^T, P~ v, P~ dv, (P~ dS) v), three times a flash forward. The backward (flash-attention-2 style, from the saved
statistics) is in :mod:`mfkernels.attention_backward`.

Numerics of the one-pass tangent: dO comes out as a difference (T~ - r O) / l, so its rounding error scales with
sum_j P_j |dS_j| |v_j|, where torch's two-pass form (softmax backward first) cancels dS - rowsum(P dS) before the
product with v. The two agree to the dtype's rounding when dS is of order one; with |dS| >> 1 in a saturated row the
one-pass result is less accurate by about that factor.

Kernel limits: D a multiple of 8 from 16 to 128 (DiT's 72 included; D is padded to the next power of two with
masks), any Nq and Nkv >= 1 (masked tails), a positive scale, fp16 / bf16 / fp32 / fp64 (fp64 is for tests;
accumulation is fp64 there and fp32 otherwise), any strides with unit stride over D (others are copied). Outputs are
contiguous, in the input dtype.

torch.func.jvp over ``attention`` runs the Function's ``jvp``, which launches the same one-pass kernel from the inputs
rather than a tangent-only pass over the saved statistics: one kernel and one test surface for both public ops, and
nothing that depends on what the forward saved. The price, one matmul (P~ v) of six, falls on the torch.func reference
path, not on MeanFlow's hot path (``attention_jvp``). Kernel results carry no autograd history, so where a graph is
being recorded through the tangent or the gradient (double backward, grad of a jvp) the Function computes that piece
with differentiable torch instead of silently cutting it.
"""

import math

import torch
import torch.nn.functional as F

from mfkernels._backend import use_triton
from mfkernels._dtypes import check_dtypes, no_autocast
from mfkernels._launch import kernel_launch as _kernel_launch
from mfkernels._launch import plain as _plain
from mfkernels._launch import records_graph as _records_graph
from mfkernels.attention_backward import (
    LOG2E,
    SUPPORTED_DTYPES,
    _configs,
    _finish,
    _kernel_types,
    _last_dim_contiguous,
    _out_dtype,
    _split,
    attention_backward,
    tl,
    triton,
)

# ----------------------------------------------------------------------------------------------------------------------
# torch reference: the oracle for tests and benchmarks, and the CPU path
# ----------------------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_jvp_torch(q, k, v, dq, dk, dv, scale=None):
    """Primal through explicit softmax (autograd records it); the tangent with no graph, in the tangents' dtype.

    The softmax Jacobian is symmetric, so softmax's backward kernel applied to dS is exactly P * (dS - rowsum(P dS)).
    Tangents of the primal's dtype reuse P. fp32 tangents on 16-bit primals get P recomputed in fp32 from q and k, as
    the kernel's fp32 scores give it: the tangent then depends on the rounded inputs only, not on a rounded P.
    """
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1)  # (B, H, Nq, Nkv)
    o = p @ v  # (B, H, Nq, D)
    td = dq.dtype
    with torch.no_grad(), no_autocast(dq):
        wider = td != q.dtype
        q, k, v = (t.detach().to(td) for t in (q, k, v))
        p = torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1) if wider else p.detach().to(td)
        ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * s
        dp = torch.ops.aten._softmax_backward_data(ds, p, -1, td)
        do = dp @ v + p @ dv
    return o, do


def attention_tangent_torch(q, k, v, dq, dk, dv, scale):
    """dO written out with differentiable torch ops: the Function's jvp when a graph is recorded through it."""
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # (B, H, Nq, Nkv)
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    pds = p * ds
    return (pds - p * pds.sum(-1, keepdim=True)) @ v + p @ dv  # (B, H, Nq, D)


def attention_backward_torch(q, k, v, grad_o, scale):
    """(dq, dk, dv) with differentiable torch ops: the Function's backward when its result is itself differentiated."""
    p = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)  # (B, H, Nq, Nkv)
    dp = grad_o @ v.transpose(-2, -1)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ grad_o


# ----------------------------------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------------------------------

def _check(q, k, v, tangents=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be (B, H, N, D), got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    named = {"k": k, "v": v}
    if tangents is not None:
        for name, t in tangents.items():
            primal = {"dq": q, "dk": k, "dv": v}[name]
            if t.shape != primal.shape:
                raise ValueError(f"attention: {name} must have shape {tuple(primal.shape)}, got {tuple(t.shape)}")
            named[name] = t
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")
    check_dtypes("attention", {"q": q, "k": k, "v": v}, tangents)


def _check_kernel(q, k):
    """What the Triton kernels add to :func:`_check` (the torch path takes any D, dtype and Nkv)."""
    D = q.shape[-1]
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: the Triton kernels take fp16, bf16, fp32 or fp64, got {q.dtype}")
    if D % 8 or not 16 <= D <= 128:
        raise ValueError(
            f"attention: head dim D={D} is not supported by the Triton kernels (D must be a multiple of 8 from 16 to "
            f"128); use mfkernels.set_backend('torch') for other head dims"
        )
    if k.shape[2] == 0 and q.shape[2] > 0:
        raise ValueError("attention: k and v have no keys (Nkv = 0), so softmax over keys is undefined")


def _resolve_scale(q, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Positive, because the kernels take the running max of unscaled scores.
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be positive and finite, got {scale}")
    return scale


# ----------------------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------------------

@triton.autotune(
    configs=_configs(
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1),
        [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
        ],
    ),
    # TANGENT in the key: the tangent kernel holds twice the tiles, so its best tile differs from the primal one's.
    key=["N_Q", "N_KV", "HEAD_DIM", "TANGENT"],
)
@triton.jit
def _attn_fwd(
    Q, K, V, DQ, DK, DV, O, DO, M, L2,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    H, N_Q, N_KV,
    SCALE_HI, SCALE_LO, QK_SCALE_HI, QK_SCALE_LO,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, TANGENT: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # (H, B) on grid axes 1 and 2: B * H may exceed one axis' 65535 limit
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0).to(DOT)
    qk_scale = tl.cast(QK_SCALE_HI, ACC) + tl.cast(QK_SCALE_LO, ACC)
    k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    o_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    r_i = tl.zeros([BLOCK_M], dtype=ACC)
    t_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if TANGENT:
        dq_ptrs = DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n + offs_d[None, :]
        dq = tl.load(dq_ptrs, mask=q_mask, other=0.0).to(DOT)
        scale = tl.cast(SCALE_HI, ACC) + tl.cast(SCALE_LO, ACC)
        dk_ptrs = DK + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n + offs_d[None, :]
        dv_ptrs = DV + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n + offs_d[None, :]

    for start_n in range(0, N_KV, BLOCK_N):
        mask_n = (start_n + offs_n) < N_KV
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs + start_n * sk_n, mask=kv_mask, other=0.0).to(DOT)
        v = tl.load(v_ptrs + start_n * sv_n, mask=kv_mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_M, BLOCK_N) raw scores
        # Every block holds at least one real key, so m_new is finite and padded keys get exactly P~ = 0.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)  # 0 on the first block (m_i = -inf)
        p = tl.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        o_acc = tl.dot(p.to(DOT), v, o_acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        if TANGENT:
            dk = tl.load(dk_ptrs + start_n * sdk_n, mask=kv_mask, other=0.0).to(DOT)
            dv = tl.load(dv_ptrs + start_n * sdv_n, mask=kv_mask, other=0.0).to(DOT)
            ds = tl.dot(dq, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
            ds = tl.dot(q, tl.trans(dk), ds, input_precision=PRECISION, out_dtype=ACC) * scale
            # r sums the same (rounded, for 16-bit dots) P~ dS that multiplies v, so T~ - r O cancels consistently:
            # in a row dominated by key j the result is ~ pds_j (v_j - O), not a difference of two rounded large terms.
            pds = (p * ds).to(DOT)
            r_i = r_i * alpha + tl.sum(pds.to(ACC), 1)
            t_acc = tl.dot(p.to(DOT), dv, t_acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
            t_acc = tl.dot(pds, v, t_acc, input_precision=PRECISION, out_dtype=ACC)
        m_i = m_new

    inv_l = 1.0 / l_i  # l >= 1: the row's maximum contributes exp2(0)
    o = o_acc * inv_l[:, None]
    out = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(O + out, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(M + bh * N_Q + offs_m, m_i, mask=mask_m)
    tl.store(L2 + bh * N_Q + offs_m, tl.log2(l_i), mask=mask_m)
    if TANGENT:
        do = (t_acc - r_i[:, None] * o) * inv_l[:, None]
        tl.store(DO + out, do.to(DO.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------------

def _attention_forward(q, k, v, dq, dk, dv, scale):
    """(o, do or None, stats) from the kernel; tangents None for the primal-only kernel. stats (2, B, H, Nq), fp32
    (fp64 for fp64 inputs): the row max m of q k^T and log2 of the row sum (see mfkernels.attention_backward).
    Callers have run :func:`_check`."""
    _check_kernel(q, k)
    tangent = dq is not None
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    dq, dk, dv = (_last_dim_contiguous(t) for t in (dq, dk, dv)) if tangent else (q, k, v)
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    acc, dot, precision = _kernel_types(q.dtype)
    out_dtype = _out_dtype(q.dtype)
    o = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    do = torch.empty(q.shape, dtype=out_dtype, device=q.device) if tangent else None
    stats = torch.empty((2, B, H, N_Q), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                        device=q.device)
    if o.numel() == 0:
        return _finish(o, q.dtype), _finish(do, q.dtype), stats
    scale_hi, scale_lo = _split(scale)
    qk_hi, qk_lo = _split(scale * LOG2E)  # log2(e) folded into the scale: the kernel exponentiates with exp2
    _attn_fwd[lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), H, B)](
        q, k, v, dq, dk, dv, o, do if tangent else o, stats[0], stats[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, N_Q, N_KV, scale_hi, scale_lo, qk_hi, qk_lo,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), TANGENT=tangent,
        ACC=acc, DOT=dot, PRECISION=precision,
    )
    return _finish(o, q.dtype), _finish(do, q.dtype), stats


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Functions
# ----------------------------------------------------------------------------------------------------------------------

def _backward(q, k, v, o, stats, grad_o, scale):
    if _records_graph(q, k, v, grad_o):
        return attention_backward_torch(q, k, v, grad_o, scale)
    with _kernel_launch():
        return attention_backward(*(_plain(t) for t in (q, k, v, o, stats, grad_o)), scale)


class _AttentionFn(torch.autograd.Function):
    """o = attention(q, k, v) with backward and jvp; the stats output is internal (saved for backward)."""

    @staticmethod
    def forward(q, k, v, scale):
        o, _, stats = _attention_forward(q, k, v, None, None, None, scale)
        return o, stats

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        o, stats = output
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.save_for_forward(q, k, v)
        ctx.mark_non_differentiable(stats)

    @staticmethod
    def backward(ctx, grad_o, _grad_stats):
        q, k, v, o, stats = ctx.saved_tensors
        return (*_backward(q, k, v, o, stats, grad_o, ctx.scale), None)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = (torch.zeros_like(p) if t is None else t for p, t in ((q, dq), (k, dk), (v, dv)))
        if _records_graph(q, k, v, dq, dk, dv):
            return attention_tangent_torch(q, k, v, dq, dk, dv, ctx.scale), None
        with _kernel_launch():
            _, do, _ = _attention_forward(*(_plain(t) for t in (q, k, v, dq, dk, dv)), ctx.scale)
        return do, None


class _AttentionJVPFn(torch.autograd.Function):
    """(o, do) in one kernel pass; o differentiable with respect to q, k, v, do and stats not."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, scale):
        return _attention_forward(q, k, v, dq, dk, dv, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs[:3]
        o, do, stats = output
        ctx.scale = inputs[6]
        ctx.save_for_backward(q, k, v, o, stats)
        ctx.mark_non_differentiable(do, stats)
        ctx.set_materialize_grads(False)  # do and stats get no gradient: spare a zeros tensor per backward

    @staticmethod
    def backward(ctx, grad_o, _grad_do, _grad_stats):
        if grad_o is None:
            return (None,) * 7
        q, k, v, o, stats = ctx.saved_tensors
        return (*_backward(q, k, v, o, stats, grad_o, ctx.scale), None, None, None, None)


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------

def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over (B, H, N, D) tensors."""
    _check(q, k, v)
    if use_triton(q, k, v):
        return _AttentionFn.apply(q, k, v, _resolve_scale(q, scale))[0]
    return attention_reference(q, k, v, scale)


def attention_jvp(q, k, v, dq, dk, dv, scale=None):
    """(o, do): o differentiable with respect to q, k, v; do detached."""
    _check(q, k, v, {"dq": dq, "dk": dk, "dv": dv})
    if use_triton(q, k, v, dq, dk, dv):
        o, do, _ = _AttentionJVPFn.apply(q, k, v, dq, dk, dv, _resolve_scale(q, scale))
        return o, do
    return attention_jvp_torch(q, k, v, dq, dk, dv, scale)


def _attention_jvp_lse(q, k, v, dq, dk, dv, scale=None):
    """(o, do, lse) with lse = logsumexp(q k^T scale) over keys (natural log): the kernel's statistics, for tests."""
    _check(q, k, v, {"dq": dq, "dk": dk, "dv": dv})
    s = _resolve_scale(q, scale)
    if use_triton(q, k, v, dq, dk, dv):
        with torch.no_grad():
            o, do, stats = _attention_forward(q, k, v, dq, dk, dv, s)
        return o, do, stats[0] * s + stats[1] * math.log(2.0)
    o, do = attention_jvp_torch(q, k, v, dq, dk, dv, s)
    return o, do, torch.logsumexp((q @ k.transpose(-2, -1)) * s, dim=-1)
