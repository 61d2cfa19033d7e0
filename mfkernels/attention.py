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

Head dim: D is covered by a power-of-two tile and, where that saves work, a second tile over the rest (see
:func:`head_dim_tiles`): DiT-XL/2's 72 = 64 + 16 with 8 masked lanes (11% of the work) instead of one 128 tile (44%).

Dtypes: fp16 / bf16 / fp32 / fp64 primals; the tangent has the primal's dtype or, on a 16-bit primal, fp32 (how the
dual engine keeps MeanFlow's target accurate under bf16): its dots then take fp32 operands in TF32. Accumulation is
fp32 (fp64 for fp64). On a GPU fp32 dots are TF32, so fp32 inputs run the kernels only where torch allows TF32
(torch.backends.cuda.matmul.allow_tf32) and take torch's exact path otherwise; fp64 runs in the interpreter only (its
tiles exceed a GPU's shared memory); and the tangent kernel covers D <= 80 (no wider tangent tile stays out of
register spills). The "auto" backend sends those cases to torch; the forced "triton" backend raises saying which.

Kernel limits: D a multiple of 8 from 16 to 128, any Nq and Nkv >= 1 (masked tails), a positive scale, any strides
with unit stride over D (others are copied). Outputs are contiguous, o in the primal dtype and dO in the tangent's.

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
from mfkernels._launch import (
    FP64_INTERPRETER_ONLY,
    LOG2E,
    configs_for,
    dot_types,
    finish,
    fp64_on_gpu,
    kernel_launch,
    kernel_takes,
    last_dim_contiguous,
    out_dtype,
    plain,
    records_graph,
    split_scalar,
    tl,
    triton,
)
from mfkernels.attention_backward import attention_backward

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

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


def _declined(q, tangent):
    """Why the kernels leave these inputs to the torch path on a GPU, or None when they take them: fp64 (interpreter
    only), fp32 without TF32 (the kernels' fp32 dots are TF32, so strict fp32 runs torch's exact attention), and a
    tangent wider than the tangent kernel's spill-free tiles."""
    if not q.is_cuda:
        return None
    if fp64_on_gpu(q):
        return FP64_INTERPRETER_ONLY
    if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return ("fp32 runs the kernels only with TF32 allowed (torch.backends.cuda.matmul.allow_tf32 = True, the "
                "trainer's --train.tf32); strict fp32 takes the torch path")
    if not fwd_configs(tangent, sum(head_dim_tiles(q.shape[-1]))):
        return f"the tangent kernel has no spill-free tile for head dim {q.shape[-1]} on a GPU (it covers D <= 80)"
    return None


def _use_kernels(q, *tensors, tangent):
    return use_triton(q, *tensors) and kernel_takes("attention", _declined(q, tangent))


def _resolve_scale(q, scale):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    # Positive, because the kernels take the running max of unscaled scores.
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"attention: scale must be positive and finite, got {scale}")
    return scale


# ----------------------------------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------------------------------

def head_dim_tiles(D):
    """(BLOCK_D, BLOCK_E): the kernels cover the head dim D with a power-of-two tile of BLOCK_D and, when that wastes
    less than one padded power-of-two tile would, a second tile over the rest, padded to BLOCK_E (a power of two, at
    least tl.dot's 16). DiT-XL/2's D = 72 is 64 + 16 (8 padded lanes, 11% of the work) where one tile of 128 would
    pad 56 (44%). BLOCK_E = 0 means one tile."""
    padded = max(16, triton.next_power_of_2(D))
    block_d = max(16, 1 << (D.bit_length() - 1))  # the largest power of two <= D
    block_e = max(16, triton.next_power_of_2(D - block_d)) if D > block_d else 0
    return (block_d, block_e) if 0 < block_e and block_d + block_e < padded else (padded, 0)


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# GPU autotune lists by kind and by the padded head-dim width BLOCK_D + BLOCK_E (<= 32, 64, 80, 128). Every entry is
# compiled for sm_80 and sm_90 in every dtype by the compile gate (mfkernels.aot, tests/mfkernels/test_compile_gate.py)
# and keeps all in registers; docs/kernels-sm90.md has the table. The tangent kernel carries twice the accumulators and
# four score tiles (S, P, dS, P dS), so past 32 channels it streams keys 16 at a time. Past 80 channels no tangent tile
# tried stays out of spills (D = 128: every BLOCK_M in 16..128, BLOCK_N in 16..64, 2..16 warps), so there the tangent
# takes the torch path on a GPU (DiT's head dims are 64 and 72).
FWD_INTERPRETER_CONFIG = _cfg(32, 16, 4, 1)
FWD_CONFIGS = {
    ("primal", 32): [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 32, 4, 3)],
    ("primal", 64): [_cfg(64, 64, 4, 3), _cfg(128, 64, 8, 3), _cfg(128, 32, 8, 3), _cfg(64, 32, 8, 3)],
    ("primal", 80): [_cfg(64, 64, 4, 3), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 3)],
    ("primal", 128): [_cfg(128, 32, 8, 3), _cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)],
    ("tangent", 32): [_cfg(64, 32, 8, 2), _cfg(128, 32, 8, 2), _cfg(64, 64, 8, 2)],
    ("tangent", 64): [_cfg(128, 16, 8, 2), _cfg(64, 16, 8, 2)],
    ("tangent", 80): [_cfg(128, 16, 8, 2)],
    ("tangent", 128): [],
}


def fwd_configs(tangent, width):
    """The GPU configs the forward kernel may pick for a primal-only or a tangent launch whose head-dim tiles span
    width = BLOCK_D + BLOCK_E channels (empty: the kernel declines, see :func:`_declined`)."""
    bucket = next(w for w in (32, 64, 80, 128) if width <= w)
    return FWD_CONFIGS["tangent" if tangent else "primal", bucket]


def _prune_fwd(configs, named_args, **kwargs):
    meta = {**named_args, **kwargs}
    if "TANGENT" not in meta:  # triton passes the constexprs as kwargs in 3.6-3.9; keep all rather than guess
        return configs
    keep = {str(c) for c in fwd_configs(meta["TANGENT"], meta["BLOCK_D"] + meta["BLOCK_E"])}
    return [c for c in configs if str(c) in keep] or configs[:1]


@triton.autotune(
    configs=configs_for(FWD_INTERPRETER_CONFIG, list({str(c): c for cs in FWD_CONFIGS.values() for c in cs}.values())),
    # TANGENT in the key: the tangent kernel holds twice the tiles, so its best tile differs from the primal one's.
    key=["N_Q", "N_KV", "HEAD_DIM", "TANGENT"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)
@triton.jit
def _attn_fwd(
    Q, K, V, DQ, DK, DV, O, DO, M, L2,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    sdq_b, sdq_h, sdq_n, sdk_b, sdk_h, sdk_n, sdv_b, sdv_h, sdv_n,
    H, N_Q, N_KV,
    SCALE_HI, SCALE_LO, QK_SCALE_HI, QK_SCALE_LO,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, TANGENT: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, TDOT: tl.constexpr, TPRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # D is covered by columns [0, BLOCK_D) and, when BLOCK_E > 0, [BLOCK_D, BLOCK_D + BLOCK_E) (see head_dim_tiles):
    # every (., D) tile below comes as a pair (x, x2), every product over D as a sum of two dots.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # (H, B) on grid axes 1 and 2: B * H may exceed one axis' 65535 limit
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    q_mask = mask_m[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_rows = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n
    q = tl.load(q_rows + offs_d[None, :], mask=q_mask, other=0.0).to(DOT)
    k_rows = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n
    v_rows = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n
    qk_scale = tl.cast(QK_SCALE_HI, ACC) + tl.cast(QK_SCALE_LO, ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    r_i = tl.zeros([BLOCK_M], dtype=ACC)
    o_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    t_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    if BLOCK_E > 0:
        offs_e = BLOCK_D + tl.arange(0, BLOCK_E)
        q2_mask = mask_m[:, None] & (offs_e < HEAD_DIM)[None, :]
        q2 = tl.load(q_rows + offs_e[None, :], mask=q2_mask, other=0.0).to(DOT)
        o_acc2 = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
        t_acc2 = tl.zeros([BLOCK_M, BLOCK_E], dtype=ACC)
    if TANGENT:
        scale = tl.cast(SCALE_HI, ACC) + tl.cast(SCALE_LO, ACC)
        dq_rows = DQ + b * sdq_b + h * sdq_h + offs_m[:, None] * sdq_n
        dk_rows = DK + b * sdk_b + h * sdk_h + offs_n[:, None] * sdk_n
        dv_rows = DV + b * sdv_b + h * sdv_h + offs_n[:, None] * sdv_n
        dq = tl.load(dq_rows + offs_d[None, :], mask=q_mask, other=0.0).to(TDOT)
        q_t = q.to(TDOT)  # q as a tangent-dot operand (a no-op unless the tangent is wider than the primal)
        if BLOCK_E > 0:
            dq2 = tl.load(dq_rows + offs_e[None, :], mask=q2_mask, other=0.0).to(TDOT)
            q2_t = q2.to(TDOT)

    for start_n in range(0, N_KV, BLOCK_N):
        mask_n = (start_n + offs_n) < N_KV
        kv_mask = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_rows + start_n * sk_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)  # (BLOCK_M, BLOCK_N) raw scores
        if BLOCK_E > 0:
            kv2_mask = mask_n[:, None] & (offs_e < HEAD_DIM)[None, :]
            k2 = tl.load(k_rows + start_n * sk_n + offs_e[None, :], mask=kv2_mask, other=0.0).to(DOT)
            s = tl.dot(q2, tl.trans(k2), s, input_precision=PRECISION, out_dtype=ACC)
        # Every block holds at least one real key, so m_new is finite and padded keys get exactly P~ = 0.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2((m_i - m_new) * qk_scale)  # 0 on the first block (m_i = -inf)
        p = tl.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows + start_n * sv_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
        o_acc = tl.dot(p.to(DOT), v, o_acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        if BLOCK_E > 0:
            v2 = tl.load(v_rows + start_n * sv_n + offs_e[None, :], mask=kv2_mask, other=0.0).to(DOT)
            o_acc2 = tl.dot(p.to(DOT), v2, o_acc2 * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        if TANGENT:
            dk = tl.load(dk_rows + start_n * sdk_n + offs_d[None, :], mask=kv_mask, other=0.0).to(TDOT)
            ds = tl.dot(dq, tl.trans(k.to(TDOT)), input_precision=TPRECISION, out_dtype=ACC)
            ds = tl.dot(q_t, tl.trans(dk), ds, input_precision=TPRECISION, out_dtype=ACC)
            if BLOCK_E > 0:
                dk2 = tl.load(dk_rows + start_n * sdk_n + offs_e[None, :], mask=kv2_mask, other=0.0).to(TDOT)
                ds = tl.dot(dq2, tl.trans(k2.to(TDOT)), ds, input_precision=TPRECISION, out_dtype=ACC)
                ds = tl.dot(q2_t, tl.trans(dk2), ds, input_precision=TPRECISION, out_dtype=ACC)
            # r sums the same (rounded, for 16-bit dots) P~ dS that multiplies v, so T~ - r O cancels consistently:
            # in a row dominated by key j the result is ~ pds_j (v_j - O), not a difference of two rounded large terms.
            pds = (p * (ds * scale)).to(TDOT)
            r_i = r_i * alpha + tl.sum(pds.to(ACC), 1)
            dv = tl.load(dv_rows + start_n * sdv_n + offs_d[None, :], mask=kv_mask, other=0.0).to(TDOT)
            t_acc = tl.dot(p.to(TDOT), dv, t_acc * alpha[:, None], input_precision=TPRECISION, out_dtype=ACC)
            t_acc = tl.dot(pds, v.to(TDOT), t_acc, input_precision=TPRECISION, out_dtype=ACC)
            if BLOCK_E > 0:
                dv2 = tl.load(dv_rows + start_n * sdv_n + offs_e[None, :], mask=kv2_mask, other=0.0).to(TDOT)
                t_acc2 = tl.dot(p.to(TDOT), dv2, t_acc2 * alpha[:, None], input_precision=TPRECISION,
                                out_dtype=ACC)
                t_acc2 = tl.dot(pds, v2.to(TDOT), t_acc2, input_precision=TPRECISION, out_dtype=ACC)
        m_i = m_new

    inv_l = 1.0 / l_i  # l >= 1: the row's maximum contributes exp2(0)
    tl.store(M + bh * N_Q + offs_m, m_i, mask=mask_m)
    tl.store(L2 + bh * N_Q + offs_m, tl.log2(l_i), mask=mask_m)
    out_rows = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM  # O and DO are contiguous (B, H, N_Q, D)
    o = o_acc * inv_l[:, None]
    tl.store(O + out_rows + offs_d[None, :], o.to(O.dtype.element_ty), mask=q_mask)
    if TANGENT:
        do = (t_acc - r_i[:, None] * o) * inv_l[:, None]
        tl.store(DO + out_rows + offs_d[None, :], do.to(DO.dtype.element_ty), mask=q_mask)
    if BLOCK_E > 0:
        o2 = o_acc2 * inv_l[:, None]
        tl.store(O + out_rows + offs_e[None, :], o2.to(O.dtype.element_ty), mask=q2_mask)
        if TANGENT:
            do2 = (t_acc2 - r_i[:, None] * o2) * inv_l[:, None]
            tl.store(DO + out_rows + offs_e[None, :], do2.to(DO.dtype.element_ty), mask=q2_mask)


# ----------------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------------

def tangent_dot_types(dtype, tangent_dtype):
    """(TDOT, TPRECISION) for the tangent's dots: the primal's own types, or fp32 operands in TF32 when an fp32
    tangent rides on a 16-bit primal (TF32's 10-bit mantissa against bf16's 7: the tangent's products round about 8x
    finer than the primal's, at tensor-core speed)."""
    if tangent_dtype == dtype:
        return dot_types(dtype)[1:]
    return tl.float32, "tf32"


def _attention_forward(q, k, v, dq, dk, dv, scale):
    """(o, do or None, stats) from the kernel; tangents None for the primal-only kernel. o has q's dtype, do the
    tangents' (fp32 tangents may ride on 16-bit primals). stats (2, B, H, Nq), fp32 (fp64 for fp64 inputs): the row
    max m of q k^T and log2 of the row sum (see mfkernels.attention_backward). Callers have run :func:`_check`."""
    _check_kernel(q, k)
    tangent = dq is not None
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    dq, dk, dv = (last_dim_contiguous(t) for t in (dq, dk, dv)) if tangent else (q, k, v)
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    acc, dot, precision = dot_types(q.dtype)
    tdot, tprecision = tangent_dot_types(q.dtype, dq.dtype)
    o = torch.empty(q.shape, dtype=out_dtype(q.dtype), device=q.device)
    do = torch.empty(q.shape, dtype=out_dtype(dq.dtype), device=q.device) if tangent else None
    stats = torch.empty((2, B, H, N_Q), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                        device=q.device)
    if o.numel() == 0:
        return finish(o, q.dtype), finish(do, dq.dtype), stats
    scale_hi, scale_lo = split_scalar(scale)
    qk_hi, qk_lo = split_scalar(scale * LOG2E)  # log2(e) folded into the scale: the kernel exponentiates with exp2
    block_d, block_e = head_dim_tiles(D)
    _attn_fwd[lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), H, B)](
        q, k, v, dq, dk, dv, o, do if tangent else o, stats[0], stats[1],
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, N_Q, N_KV, scale_hi, scale_lo, qk_hi, qk_lo,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_E=block_e, TANGENT=tangent,
        ACC=acc, DOT=dot, PRECISION=precision, TDOT=tdot, TPRECISION=tprecision,
    )
    return finish(o, q.dtype), finish(do, dq.dtype), stats


# ----------------------------------------------------------------------------------------------------------------------
# autograd.Functions
# ----------------------------------------------------------------------------------------------------------------------

def _backward(q, k, v, o, stats, grad_o, scale):
    if records_graph(q, k, v, grad_o):
        return attention_backward_torch(q, k, v, grad_o, scale)
    with kernel_launch():
        return attention_backward(*(plain(t) for t in (q, k, v, o, stats, grad_o)), scale)


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
        # a graph through the tangent needs torch's history; a head dim the GPU tangent kernel declines needs torch
        if records_graph(q, k, v, dq, dk, dv) or _declined(plain(q), tangent=True):
            return attention_tangent_torch(q, k, v, dq, dk, dv, ctx.scale), None
        with kernel_launch():
            _, do, _ = _attention_forward(*(plain(t) for t in (q, k, v, dq, dk, dv)), ctx.scale)
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
    if _use_kernels(q, k, v, tangent=False):
        return _AttentionFn.apply(q, k, v, _resolve_scale(q, scale))[0]
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # torch's 16-bit flash attention backward on the CPU runs ~20x slower than fp32's (20 ms against 1 ms a call
        # for the demo's model under bf16 autocast); fp32 is also the more exact of the two
        with no_autocast(q):
            return attention_reference(q.float(), k.float(), v.float(), scale).to(q.dtype)
    return attention_reference(q, k, v, scale)


def attention_jvp(q, k, v, dq, dk, dv, scale=None):
    """(o, do): o differentiable with respect to q, k, v; do detached."""
    _check(q, k, v, {"dq": dq, "dk": dk, "dv": dv})
    if _use_kernels(q, k, v, dq, dk, dv, tangent=True):
        o, do, _ = _AttentionJVPFn.apply(q, k, v, dq, dk, dv, _resolve_scale(q, scale))
        return o, do
    return attention_jvp_torch(q, k, v, dq, dk, dv, scale)


def _attention_jvp_lse(q, k, v, dq, dk, dv, scale=None):
    """(o, do, lse) with lse = logsumexp(q k^T scale) over keys (natural log): the kernel's statistics, for tests."""
    _check(q, k, v, {"dq": dq, "dk": dk, "dv": dv})
    s = _resolve_scale(q, scale)
    if _use_kernels(q, k, v, dq, dk, dv, tangent=True):
        with torch.no_grad():
            o, do, stats = _attention_forward(q, k, v, dq, dk, dv, s)
        return o, do, stats[0] * s + stats[1] * math.log(2.0)
    o, do = attention_jvp_torch(q, k, v, dq, dk, dv, s)
    return o, do, torch.logsumexp((q @ k.transpose(-2, -1)) * s, dim=-1)
