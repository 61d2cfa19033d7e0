"""Layers with a primal forward and a dual (primal, tangent) form side by side.

Every ``*_dual`` returns (y, dy): y is recorded by autograd as usual, dy is computed under ``torch.no_grad`` from
the same (detached) weights, so the tangent never enters the graph (MeanFlow puts it under stop-gradient). Tangents
are never updated in place: doing so while autograd records keeps dead graphs alive through reference cycles.

    Linear   y = x W^T + b          dy = dx W^T
    SiLU     y = x sigmoid(x)       dy = silu'(x) dx
    GELU     y = gelu_tanh(x)       dy = gelu_tanh'(x) dx
    Sinusoid f(t) = [cos(t w), sin(t w)]   df = [-sin(t w) w, cos(t w) w] dt

Elementwise activations are diagonal, so their backward kernels applied to dx give the tangent directly.

Precision. Each dual layer computes its tangent in the dtype of the tangent it is given, with autocast off for it, and
reads the primal (and the weights) cast to that dtype; the model picks that dtype once, at its inputs, with
:func:`tangent_dtype`. Under bf16 (autocast, or FSDP's bf16 parameters) the primal runs in bf16 and, by default
(``tangent_precision = "fp32"``), the tangent in fp32: it is the training target's derivative, and a bf16 tangent
adds its own rounding to that of the bf16 primal (1.7-2.0x the error of du/dt on a random DiT-Tiny, see
tests/meanflow/test_precision.py). The time features and their tangents are computed in fp32 at least: in bf16,
cos(t w) rounds to 1.0 for every t w < 1/16, i.e. for 89 of the 128 frequencies even at t = 1.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import mfkernels

TANGENT_PRECISIONS = ("fp32", "primal")


def primal_dtype(weight):
    """The dtype the primal's matmuls run in: autocast's when it is on (it casts fp32 weights), else the weights'."""
    kind = weight.device.type
    if weight.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype


def tangent_dtype(weight, precision="fp32"):
    """The dtype a model carries its tangent in, given one of its weights and its ``tangent_precision``.

    "fp32": fp32 when the primal runs in bf16 or fp16, else the primal's dtype (fp32, or fp64 in tests).
    "primal": the primal's dtype (a bf16 tangent under bf16).
    """
    if precision not in TANGENT_PRECISIONS:
        raise ValueError(f"tangent_precision must be one of {TANGENT_PRECISIONS}, got {precision!r}")
    dtype = primal_dtype(weight)
    if precision == "fp32" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return dtype


def no_autocast(t):
    """Autocast off for a tangent computation on t's device: it would run an fp32 tangent's GEMM in bf16."""
    return torch.autocast(t.device.type, enabled=False)


def linear_dual(layer: nn.Linear, x, dx):
    y = layer(x)
    with torch.no_grad(), no_autocast(dx):
        dy = F.linear(dx, layer.weight.to(dx.dtype))  # the bias is constant: no tangent
    return y, dy


def split_heads(qkv, num_heads: int):
    """(B, N, 3 C) fused q|k|v -> q, k, v each (B, H, N, C / H), the layout mfkernels.attention takes."""
    B, N, C3 = qkv.shape
    qkv = qkv.view(B, N, 3, num_heads, C3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)


def merge_heads(o):
    """(B, H, N, Dh) -> (B, N, H Dh)."""
    B, H, N, Dh = o.shape
    return o.transpose(1, 2).reshape(B, N, H * Dh)


def silu_dual(x, dx):
    y = F.silu(x)
    with torch.no_grad(), no_autocast(dx):
        dy = torch.ops.aten.silu_backward(dx, x.detach().to(dx.dtype))
    return y, dy


def gelu_tanh_dual(x, dx):
    y = mfkernels.gelu_tanh(x)
    with torch.no_grad(), no_autocast(dx):
        dy = mfkernels.gelu_tanh_backward(dx, x.detach().to(dx.dtype))
    return y, dy


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as in DiT's blocks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(mfkernels.gelu_tanh(self.fc1(x)))

    def dual(self, x, dx):
        h, dh = linear_dual(self.fc1, x, dx)
        h, dh = gelu_tanh_dual(h, dh)
        return linear_dual(self.fc2, h, dh)


class TimestepEmbedder(nn.Module):
    """Scalar time -> sinusoidal features -> MLP (DiT's embedder).

    Times live in [0, 1] and are embedded as they are (``time_scale`` = 1). MeanFlow differentiates the network in t,
    and d/dt of a feature cos(s t w) is s w: stretching t to DiT's [0, 1000] makes du/dt, hence the bootstrapped
    target, a thousand times rougher: on the MNIST demo, s = 1000 diverged (mse from 1 to 1e5 within 2000 steps) where
    s = 1 kept decreasing. ``time_scale`` stays configurable for experiments.
    """

    def __init__(self, hidden: int, freq_dim: int = 256, time_scale: float = 1.0, max_period: float = 10000.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        half = freq_dim // 2
        freqs = time_scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
        self.register_buffer("freqs", freqs.float(), persistent=False)
        self.freq_dim = freq_dim

    def _args(self, t):
        # fp32 at least, even if the module was cast to bf16: see the module docstring
        dtype = torch.promote_types(self.freqs.dtype, torch.float32)
        return t[:, None].to(dtype) * self.freqs[None, :].to(dtype)  # (B, half)

    def features(self, t):
        args = self._args(t)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)  # (B, freq_dim)

    def features_dual(self, t, dt):
        """(f, df): f in the weights' dtype, as in forward; df in dt's dtype (the model's tangent dtype)."""
        args = self._args(t)
        f = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        with torch.no_grad():
            dargs = self._args(dt)
            df = torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1)  # (B, freq_dim)
        return f.to(self.mlp[0].weight.dtype), df.to(dt.dtype)

    def forward(self, t):
        return self.mlp(self.features(t))

    def dual(self, t, dt):
        """(embedding, its tangent along dt); the tangent comes back in dt's dtype."""
        f, df = self.features_dual(t, dt)
        h, dh = linear_dual(self.mlp[0], f, df)
        h, dh = silu_dual(h, dh)
        return linear_dual(self.mlp[2], h, dh)


class LabelEmbedder(nn.Module):
    """Class label -> vector; index ``num_classes`` is the null class used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y):
        return self.embedding(y)
