"""The in-context DiT's layers (iMF, arXiv 2512.02012), each with its dual (primal, tangent) form beside forward.

Conventions as in :mod:`meanflow.models.layers`: y is recorded by autograd, dy is computed under no_grad from detached
weights in the tangent's dtype with autocast off, and no tangent is updated in place.

    RMSNorm   xh = x s, s = (mean(x^2) + eps)^(-1/2);  y = xh w
              dxh = s (dx - xh mean(xh dx));           dy = dxh w
    RoPE      pairs (x_2i, x_2i+1) of each head rotated by the angle n theta^(-2i/d) at sequence position n:
              linear in x, so dy = rope(dx)
    SwiGLU    y = W2 (silu(W1 x) * W3 x);              dy = W2 (silu'(a) da * b + silu(a) db),  a = W1 x, b = W3 x
    Gate      x + g * y (g a per-channel parameter):   dx + g * dy

The norms compute in fp32 at least and return the input's dtype: under bf16, mean(x^2) in bf16 loses the
normalisation's accuracy (the official JAX code also normalises in fp32 before casting back).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import mfkernels
from meanflow.models.layers import (
    LabelEmbedder,
    TimestepEmbedder,
    linear_dual,
    merge_heads,
    no_autocast,
    silu_dual,
    split_heads,
)


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMS normalisation over the last dimension with a learned per-channel weight (ones at init)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _normalize(self, x):
        x = x.to(_compute_dtype(x.dtype))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x):
        return self._normalize(x).to(x.dtype) * self.weight.to(x.dtype)

    def dual(self, x, dx):
        y = self(x)
        with torch.no_grad(), no_autocast(dx):
            xd = x.detach().to(dx.dtype)
            s = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + self.eps)
            xh = xd * s
            dxh = s * (dx - xh * (xh * dx).mean(-1, keepdim=True))
            dy = dxh * self.weight.to(dx.dtype)
        return y, dy


class Rope1D(nn.Module):
    """1-D rotary position embedding over the whole sequence (prefix tokens then patches), interleaved pairs.

    Pair i of a head (channels 2i, 2i + 1) at position n turns by n * theta^(-2i/d), as in the official code's complex
    product. The tables are built in float64 and kept in fp32 (non-persistent, real: ``Module.to`` would not cast a
    complex table with the model); the rotation runs in fp32 at least (complex64 or complex128).
    """

    def __init__(self, head_dim: int, seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
        freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (d/2,)
        angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None]  # (N, d/2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def _rotate(self, x, dtype):
        # pairs as complex numbers times e^(i angle): one complex product, 10x faster on CPU than rotating the
        # halves of each pair apart and interleaving them again with torch.stack
        turn = torch.complex(self.cos.to(dtype), self.sin.to(dtype))  # (N, d/2)
        pairs = torch.view_as_complex(x.to(dtype).contiguous().unflatten(-1, (-1, 2)))  # (B, H, N, d/2)
        return torch.view_as_real(pairs * turn).flatten(-2)

    def forward(self, x):
        """x (B, H, N, d) -> the same, rotated by position."""
        return self._rotate(x, _compute_dtype(x.dtype)).to(x.dtype)

    def dual(self, x, dx):
        with torch.no_grad(), no_autocast(dx):
            dy = self._rotate(dx, _compute_dtype(dx.dtype)).to(dx.dtype)  # a bf16 tangent has no complex type
        return self(x), dy


class RopeAttention(nn.Module):
    """Bias-free q/k/v/o projections, RMSNorm on q and k per head, RoPE on q and k, softmax attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rope):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        return self.proj(merge_heads(mfkernels.attention(q, k, v)))

    def dual(self, x, dx, rope):
        qkv, dqkv = linear_dual(self.qkv, x, dx)
        (q, k, v), (dq, dk, dv) = split_heads(qkv, self.num_heads), split_heads(dqkv, self.num_heads)
        q, dq = rope.dual(*self.q_norm.dual(q, dq))
        k, dk = rope.dual(*self.k_norm.dual(k, dk))
        o, do = mfkernels.attention_jvp(q, k, v, dq, dk, dv)
        return linear_dual(self.proj, merge_heads(o), merge_heads(do))


class SwiGLU(nn.Module):
    """W2 (silu(W1 x) * W3 x), bias-free; W1 and W3 stacked in one Linear (``w13``, rows [W1; W3])."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)

    def dual(self, x, dx):
        ab, dab = linear_dual(self.w13, x, dx)
        (a, b), (da, db) = ab.chunk(2, dim=-1), dab.chunk(2, dim=-1)
        s, ds = silu_dual(a, da)
        with torch.no_grad(), no_autocast(dx):
            dh = torch.addcmul(ds * b.detach().to(ds.dtype), s.detach().to(ds.dtype), db)
        return linear_dual(self.w2, s * b, dh)


def gated_add_dual(x, dx, gate, y, dy):
    """(x + gate * y, dx + gate * dy): the per-channel gate is a parameter, constant along the tangent."""
    with torch.no_grad(), no_autocast(dx):
        dout = dx + gate.detach().to(dx.dtype) * dy
    return x + gate.to(y.dtype) * y, dout


class ImfBlock(nn.Module):
    """Pre-RMSNorm transformer block with zero-initialised per-channel gates on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 8 / 3):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = RopeAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))  # the official rounding: int(), e.g. 1024 * 8/3 -> 2730
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        self.mlp_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x, rope):
        x = x + self.attn_gate.to(x.dtype) * self.attn(self.norm1(x), rope)
        x = x + self.mlp_gate.to(x.dtype) * self.mlp(self.norm2(x))
        return x  # (B, N, D)

    def dual(self, x, dx, rope):
        h, dh = self.attn.dual(*self.norm1.dual(x, dx), rope)
        x, dx = gated_add_dual(x, dx, self.attn_gate, h, dh)
        h, dh = self.mlp.dual(*self.norm2.dual(x, dx))
        return gated_add_dual(x, dx, self.mlp_gate, h, dh)


class FinalLayer(nn.Module):
    """RMSNorm then a linear map of each token to its p x p x C patch (zero-initialised)."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = nn.Linear(dim, patch * patch * out_channels)

    def forward(self, x):
        return self.linear(self.norm(x))

    def dual(self, x, dx):
        return linear_dual(self.linear, *self.norm.dual(x, dx))


class ConditionTokens(nn.Module):
    """``count`` learned tokens plus one condition's embedding, broadcast over them: (B,) -> (B, count, D).

    Scalars embed through DiT's sinusoid + MLP embedder (fp32 sinusoids, see layers.TimestepEmbedder), labels
    through a table with a null class.
    """

    def __init__(self, count: int, dim: int, num_classes: int | None = None):
        super().__init__()
        self.tokens = nn.Parameter(torch.zeros(count, dim))
        self.embedder = TimestepEmbedder(dim) if num_classes is None else LabelEmbedder(num_classes, dim)

    def forward(self, value):
        return self.tokens + self.embedder(value)[:, None]  # (B, count, D)

    def dual(self, value, dvalue):
        """Scalar conditions only (labels have no tangent); the tangent comes back in dvalue's dtype."""
        e, de = self.embedder.dual(value, dvalue)
        return self.tokens + e[:, None], de[:, None].expand(-1, self.tokens.shape[0], -1)

    def initialize(self, dim: int):
        """The official init: tokens N(0, 1/D), embedder linears N(0, 1/fan_in) with zero biases, table N(0, 1/D)."""
        nn.init.normal_(self.tokens, std=1 / math.sqrt(dim))
        if isinstance(self.embedder, LabelEmbedder):
            nn.init.normal_(self.embedder.embedding.weight, std=1 / math.sqrt(dim))
            return
        for layer in (self.embedder.mlp[0], self.embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
            nn.init.zeros_(layer.bias)
