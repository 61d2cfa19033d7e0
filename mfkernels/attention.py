"""Attention with its forward-mode tangent. q (B, H, Nq, D), k and v (B, H, Nkv, D), scale s = 1/sqrt(D) by default.

    S = q k^T s,  P = softmax(S) (over keys),  O = P v
    dS = (dq k^T + q dk^T) s
    dO = (P * (dS - rowsum(P * dS))) v + P dv

In ``attention_jvp`` the primal O is differentiable with respect to q, k, v; the tangent dO is not.
"""

import math

import torch
import torch.nn.functional as F

from mfkernels._backend import use_triton


# ----------------------------------------------------------------------------------------------------------------------
# torch reference: the oracle for tests and benchmarks, and the CPU path
# ----------------------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_jvp_torch(q, k, v, dq, dk, dv, scale=None):
    """Primal through explicit softmax (autograd records it); the tangent reuses P with no graph.

    The softmax Jacobian is symmetric, so softmax's backward kernel applied to dS is exactly P * (dS - rowsum(P dS)).
    """
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p = torch.softmax((q @ k.transpose(-2, -1)) * s, dim=-1)  # (B, H, Nq, Nkv)
    o = p @ v  # (B, H, Nq, D)
    with torch.no_grad():
        p = p.detach()
        ds = (dq @ k.detach().transpose(-2, -1) + q.detach() @ dk.transpose(-2, -1)) * s
        dp = torch.ops.aten._softmax_backward_data(ds, p, -1, p.dtype)
        do = dp @ v.detach() + p @ dv
    return o, do


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
        if t.dtype != q.dtype:
            raise ValueError(f"attention: {name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"attention: {name} is on {t.device} but q is on {q.device}")


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------

def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v over (B, H, N, D) tensors."""
    _check(q, k, v)
    return attention_reference(q, k, v, scale)


def attention_jvp(q, k, v, dq, dk, dv, scale=None):
    """(o, do): o differentiable with respect to q, k, v; do detached."""
    _check(q, k, v, {"dq": dq, "dk": dk, "dv": dv})
    return attention_jvp_torch(q, k, v, dq, dk, dv, scale)
