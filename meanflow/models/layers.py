"""Layers with a primal forward and a dual (primal, tangent) form side by side.

Every ``*_dual`` returns (y, dy): y is recorded by autograd as usual, dy is computed under ``torch.no_grad`` from
the same (detached) weights, so the tangent never enters the graph (MeanFlow puts it under stop-gradient). Tangents
are never updated in place: doing so while autograd records keeps dead graphs alive through reference cycles.

    Linear   y = x W^T + b          dy = dx W^T
    SiLU     y = x sigmoid(x)       dy = silu'(x) dx
    GELU     y = gelu_tanh(x)       dy = gelu_tanh'(x) dx
    Sinusoid f(t) = [cos(t w), sin(t w)]   df = [-sin(t w) w, cos(t w) w] dt

Elementwise activations are diagonal, so their backward kernels applied to dx give the tangent directly.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def linear_dual(layer: nn.Linear, x, dx):
    y = layer(x)
    with torch.no_grad():
        dy = F.linear(dx, layer.weight)  # the bias is constant: no tangent
    return y, dy


def silu_dual(x, dx):
    y = F.silu(x)
    with torch.no_grad():
        dy = torch.ops.aten.silu_backward(dx, x.detach())
    return y, dy


def gelu_tanh_dual(x, dx):
    y = F.gelu(x, approximate="tanh")
    with torch.no_grad():
        dy = torch.ops.aten.gelu_backward(dx, x.detach(), approximate="tanh")
    return y, dy


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear, as in DiT's blocks."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))

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
        return t[:, None].to(self.freqs.dtype) * self.freqs[None, :]  # (B, half)

    def features(self, t):
        args = self._args(t)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)  # (B, freq_dim)

    def features_dual(self, t, dt):
        args = self._args(t)
        f = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        with torch.no_grad():
            dargs = self._args(dt)
            df = torch.cat([-torch.sin(args) * dargs, torch.cos(args) * dargs], dim=-1)
        dtype = self.mlp[0].weight.dtype
        return f.to(dtype), df.to(dtype)

    def forward(self, t):
        return self.mlp(self.features(t))

    def dual(self, t, dt):
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
