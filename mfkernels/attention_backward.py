"""Backward of flash attention (flash-attention-2 style), from the row statistics the forward saved.

Shapes: q (B, H, Nq, D), k and v (B, H, Nkv, D), o and grad_o (B, H, Nq, D); stats (2, B, H, Nq): stats[0] = m, the
row maximum of the raw scores q k^T (an exact copy of one of them), stats[1] = log2 of the row sum of
exp(scale (q k^T - m)). P is recomputed per tile as exp2((q k^T - m) scale log2(e) - stats[1]): subtracting the exact
m before scaling keeps P accurate to the dtype's rounding even for scores of 1e4, where one fp32 log-sum-exp would
carry an absolute error of ~1e-3 into every exponent. Then

    delta = rowsum(grad_o * o)                       (preprocessing pass, one read of o and grad_o)
    dV = P^T grad_o,  dP = grad_o V^T,  dS = P * (dP - delta)
    dQ = dS K * scale,  dK = dS^T Q * scale

Two kernels, so that nothing needs atomics: one program per (key block, b, h) sweeps all query blocks and owns dK and
dV of its keys; one program per (query block, b, h) sweeps all key blocks and owns dQ of its queries. Accumulation is
fp32 (fp64 for fp64 inputs), outputs take the input dtype, and neither inputs nor grad_o are written.
"""

import torch

from mfkernels._launch import (
    LOG2E,
    configs_for,
    dot_types,
    finish,
    last_dim_contiguous,
    out_dtype,
    split_scalar,
    tl,
    triton,
)


def _cfg(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# GPU autotune lists by the padded head dim BLOCK_D (<= 64, or up to 128: D = 72 pads to 128 here). Every entry is
# compiled for sm_80 and sm_90 in bf16, fp16 and fp32 by the compile gate (mfkernels.aot) and keeps all in registers.
# dK/dV programs hold two (BLOCK_N, D) accumulators plus k and v, so wide heads get 16 or 32 queries per step.
DKDV_INTERPRETER_CONFIG = _cfg(16, 32, 4, 1)
DKDV_CONFIGS = {
    64: [_cfg(16, 32, 4, 2), _cfg(16, 64, 4, 2), _cfg(32, 64, 8, 1), _cfg(32, 128, 8, 1)],
    128: [_cfg(16, 32, 4, 1), _cfg(16, 32, 4, 2), _cfg(32, 32, 4, 1), _cfg(32, 32, 4, 2)],
}
DQ_INTERPRETER_CONFIG = _cfg(32, 16, 4, 1)
DQ_CONFIGS = {
    64: [_cfg(32, 32, 4, 2), _cfg(64, 32, 8, 2), _cfg(128, 16, 8, 2), _cfg(128, 32, 8, 2)],
    128: [_cfg(32, 32, 4, 2), _cfg(64, 16, 4, 2), _cfg(64, 32, 8, 2), _cfg(32, 16, 4, 2)],
}
PREPROCESS_BLOCK_M = 32  # 64 rows of a 72-wide (128 padded) fp16 tile get a stack frame from ptxas


def bwd_configs(table, block_d):
    """The GPU configs of a backward kernel (table: DKDV_CONFIGS or DQ_CONFIGS) for a padded head dim."""
    return table[64 if block_d <= 64 else 128]


def _pruner(table):
    def prune(configs, named_args, **kwargs):
        meta = {**named_args, **kwargs}
        if "BLOCK_D" not in meta:  # triton passes the constexprs as kwargs in 3.6-3.9; keep all rather than guess
            return configs
        keep = {str(c) for c in bwd_configs(table, meta["BLOCK_D"])}
        return [c for c in configs if str(c) in keep] or configs[:1]
    return prune


def _all(table):
    return list({str(c): c for cs in table.values() for c in cs}.values())


# ----------------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_preprocess(
    O, GO, DELTA,
    sgo_b, sgo_h, sgo_n,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
    go = tl.load(GO + b * sgo_b + h * sgo_h + offs_m[:, None] * sgo_n + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC) * go.to(ACC), 1)
    tl.store(DELTA + bh * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.autotune(
    configs=configs_for(DKDV_INTERPRETER_CONFIG, _all(DKDV_CONFIGS)),
    key=["N_Q", "N_KV", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _pruner(DKDV_CONFIGS)},
)
@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, GO, M, L2, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sgo_b, sgo_h, sgo_n,
    H, N_Q, N_KV,
    SCALE_HI, SCALE_LO, QK_SCALE_HI, QK_SCALE_LO,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_KV
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0).to(DOT)
    qk_scale = tl.cast(QK_SCALE_HI, ACC) + tl.cast(QK_SCALE_LO, ACC)

    q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :]
    go_ptrs = GO + b * sgo_b + h * sgo_h + offs_m[:, None] * sgo_n + offs_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    for start_m in range(0, N_Q, BLOCK_M):
        mask_m = (start_m + offs_m) < N_Q
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptrs + start_m * sq_n, mask=q_mask, other=0.0).to(DOT)
        go = tl.load(go_ptrs + start_m * sgo_n, mask=q_mask, other=0.0).to(DOT)
        m = tl.load(M + bh * N_Q + start_m + offs_m, mask=mask_m, other=0.0)
        l2 = tl.load(L2 + bh * N_Q + start_m + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * N_Q + start_m + offs_m, mask=mask_m, other=0.0)
        # Transposed tile (keys x queries): P^T comes out in the layout both dK and dV need.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)
        # Padded keys get -inf before exp2: exp2((0 - m) ...) would overflow when a row's scores are all very
        # negative. Padded queries need nothing: their q and grad_o are zero, so they add zero to dK and dV.
        s_t = tl.where(mask_n[:, None], s_t, float("-inf"))
        p_t = tl.exp2((s_t - m[None, :]) * qk_scale - l2[None, :])
        dv = tl.dot(p_t.to(DOT), go, dv, input_precision=PRECISION, out_dtype=ACC)
        dp_t = tl.dot(v, tl.trans(go), input_precision=PRECISION, out_dtype=ACC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(DOT), q, dk, input_precision=PRECISION, out_dtype=ACC)

    scale = tl.cast(SCALE_HI, ACC) + tl.cast(SCALE_LO, ACC)
    out = bh * N_KV * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.autotune(
    configs=configs_for(DQ_INTERPRETER_CONFIG, _all(DQ_CONFIGS)),
    key=["N_Q", "N_KV", "HEAD_DIM"],
    prune_configs_by={"early_config_prune": _pruner(DQ_CONFIGS)},
)
@triton.jit
def _attn_bwd_dq(
    Q, K, V, GO, M, L2, DELTA, DQ,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sgo_b, sgo_h, sgo_n,
    H, N_Q, N_KV,
    SCALE_HI, SCALE_LO, QK_SCALE_HI, QK_SCALE_LO,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    bh = b * H + h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=q_mask, other=0.0).to(DOT)
    go = tl.load(GO + b * sgo_b + h * sgo_h + offs_m[:, None] * sgo_n + offs_d[None, :], mask=q_mask, other=0.0)
    go = go.to(DOT)
    m = tl.load(M + bh * N_Q + offs_m, mask=mask_m, other=0.0)
    l2 = tl.load(L2 + bh * N_Q + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + offs_m, mask=mask_m, other=0.0)
    qk_scale = tl.cast(QK_SCALE_HI, ACC) + tl.cast(QK_SCALE_LO, ACC)

    k_ptrs = K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for start_n in range(0, N_KV, BLOCK_N):
        mask_n = (start_n + offs_n) < N_KV
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_ptrs + start_n * sk_n, mask=kv_mask, other=0.0).to(DOT)
        v = tl.load(v_ptrs + start_n * sv_n, mask=kv_mask, other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        # As in _attn_bwd_dkdv: an overflowing P on a padded key would turn ds * k = inf * 0 into NaN.
        s = tl.where(mask_n[None, :], s, float("-inf"))
        p = tl.exp2((s - m[:, None]) * qk_scale - l2[:, None])
        dp = tl.dot(go, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(DOT), k, dq, input_precision=PRECISION, out_dtype=ACC)

    scale = tl.cast(SCALE_HI, ACC) + tl.cast(SCALE_LO, ACC)
    out = bh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------------------------------



def attention_backward(q, k, v, o, stats, grad_o, scale):
    """(dq, dk, dv) of o = softmax(q k^T scale) v given grad_o; o (contiguous) and stats from the forward.

    Inputs were validated by the forward that produced o and stats; grad_o must have o's shape.
    """
    if grad_o.shape != o.shape:
        raise ValueError(f"attention backward: grad_o has shape {tuple(grad_o.shape)}, expected {tuple(o.shape)}")
    q, k, v = (last_dim_contiguous(t) for t in (q, k, v))
    grad_o = last_dim_contiguous(grad_o.to(o.dtype))
    B, H, N_Q, D = q.shape
    N_KV = k.shape[2]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    acc, dot, precision = dot_types(q.dtype)
    scale_hi, scale_lo = split_scalar(scale)
    qk_hi, qk_lo = split_scalar(scale * LOG2E)
    # Contiguous outputs: the kernels index them as (B, H, N, D) without stride arguments.
    store_dtype = out_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=store_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=store_dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=store_dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return tuple(finish(t.zero_(), q.dtype) for t in (dq, dk, dv))
    delta = torch.empty(stats.shape[1:], dtype=stats.dtype, device=q.device)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_o.stride()[:3])
    common = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, ACC=acc, DOT=dot, PRECISION=precision)

    _attn_bwd_preprocess[(triton.cdiv(N_Q, PREPROCESS_BLOCK_M), H, B)](
        o, grad_o, delta, *grad_o.stride()[:3], H, N_Q,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, ACC=acc, BLOCK_M=PREPROCESS_BLOCK_M,
    )
    args = (H, N_Q, N_KV, scale_hi, scale_lo, qk_hi, qk_lo)
    _attn_bwd_dkdv[lambda meta: (triton.cdiv(N_KV, meta["BLOCK_N"]), H, B)](
        q, k, v, grad_o, stats[0], stats[1], delta, dk, dv, *strides, *args, **common
    )
    _attn_bwd_dq[lambda meta: (triton.cdiv(N_Q, meta["BLOCK_M"]), H, B)](
        q, k, v, grad_o, stats[0], stats[1], delta, dq, *strides, *args, **common
    )
    return tuple(finish(t, q.dtype) for t in (dq, dk, dv))
