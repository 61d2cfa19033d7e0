"""Models for tests: small random networks (every weight drawn, so zero-init cannot hide a wrong tangent) and the
closed-form average velocity of Gaussian data, whose flow is affine.

Gaussian data x ~ N(m, s^2 I), noise e ~ N(0, I), z_t = (1 - t) x + t e. The marginal of z_t is
N((1 - t) m, sigma_t^2 I) with sigma_t = sqrt((1 - t)^2 s^2 + t^2), and the flow of the marginal velocity maps
quantile to quantile:

    phi_{t->r}(z) = (1 - r) m + (sigma_r / sigma_t) (z - (1 - t) m)
    v(z, t)       = -m + (sigma_t' / sigma_t) (z - (1 - t) m),     sigma_t' = (t - (1 - t) s^2) / sigma_t
    u(z, r, t)    = (z - phi_{t->r}(z)) / (t - r)                  (the true average velocity, r < t)
"""

import contextlib
import importlib
import math

import pytest
import torch
import torch.nn as nn

from meanflow.models import create_model


def randomize(model, std=0.1, generator=None):
    """Draw every parameter from N(0, std^2): the zero-initialised adaLN and output layers included."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def randomize_fan_in(model, generator=None):
    """Every weight from N(0, 1/fan_in) (fan_in: the size of one output's row; embedding tables alike), every bias
    from N(0, 0.1^2): nothing zero-initialised (adaLN-Zero would make every block the identity and hide a wrong
    tangent), and activations of order one through all blocks, unlike the small ones of :func:`randomize`."""
    with torch.no_grad():
        for p in model.parameters():
            std = 1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
    return model


def randomize_imf(model, generator=None):
    """An iMF model with nothing at its init: weights N(0, 1/fan_in), biases and learned tokens as
    :func:`randomize_fan_in`, RMSNorm weights 1 + N(0, 0.25^2) and residual gates N(0, 0.5^2) (zero at init: every
    block would be the identity), so that each block, QK-norm and the v-head change the output."""
    randomize_fan_in(model, generator)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                p.copy_(1 + 0.25 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
            elif name.endswith("_gate"):
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def random_cond(batch, dtype=torch.float64):
    """iMF's guidance conditions as its training draws them: omega = 8^U in [1, 8], t_min < 0.5 < t_max."""
    return dict(omega=8 ** torch.rand(batch, dtype=dtype), t_min=0.5 * torch.rand(batch, dtype=dtype),
                t_max=0.5 + 0.5 * torch.rand(batch, dtype=dtype))


@contextlib.contextmanager
def float64_tangent():
    """Inside, a DiT's dual engine carries a float64 tangent on whatever primal it runs (the floor of a bf16 primal:
    its tangent without rounding of its own). The ops' dtype rule admits no float64 tangent on a bf16 primal (fp32
    only), so it is lifted here; their torch paths compute in the tangent's dtype whatever it is."""
    import meanflow.models.dit as dit_module

    with pytest.MonkeyPatch.context() as m:
        m.setattr(dit_module, "tangent_dtype", lambda weight, precision: torch.float64)
        for name in ("attention", "adaln", "gated"):
            m.setattr(importlib.import_module(f"mfkernels.{name}"), "check_dtypes", lambda *a, **k: None)
        yield


def small_model(kind, dtype=torch.float64):
    if kind == "dit":
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2)
    elif kind == "dit_t1000":  # DiT's own time range: sharper time features, same exactness expected
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             time_scale=1000.0)
    elif kind == "dit_uncond":
        model = create_model("DiT-Nano/2", input_size=4, in_channels=2, num_classes=0, hidden_size=32, num_heads=2)
    elif kind == "mlp":
        model = create_model("MLP", dim=5, width=24, depth=2, num_classes=3)
    elif kind == "dit_x":  # the output is a clean image D, u = (z - D) / max(t, T_MIN) (meanflow.models.prediction)
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             prediction="x")
    elif kind == "dit_conv":  # the demo's shape: clean-image output through the 3x3 conv head (models.dit.ConvHead)
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             prediction="x", head="conv")
    elif kind == "mlp_x":
        model = create_model("MLP", dim=5, width=24, depth=2, num_classes=3, prediction="x")
    elif kind == "dit_x_tanh":  # the demo's shape: a clean image bounded by a tanh, u = (z - tanh(net)) / tau
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             prediction="x_tanh")
    elif kind == "dit_skips":  # the demo's shape: long skips (models.dit.LongSkip), at an odd depth (a middle block)
        model = create_model("DiT-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             depth=5, prediction="x_tanh", long_skips=True)
    elif kind == "dit_canvas":  # the demo's shape: tanh image on a centred canvas (background outside), long skips
        model = create_model("DiT-Nano/2", input_size=8, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             depth=3, prediction="x_tanh", long_skips=True, canvas=4)
    elif kind == "dit_canvas_odd":  # as the demo's patch 6 on its 24 x 24 canvas: the patch does not divide the input
        model = create_model("DiT-Nano/2", patch_size=3, input_size=8, in_channels=3, num_classes=4, hidden_size=32,
                             num_heads=2, depth=2, prediction="x_tanh", long_skips=True, canvas=6)
    elif kind == "dit_canvas_x":
        model = create_model("DiT-Nano/2", input_size=10, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             prediction="x", canvas=6)
    elif kind == "mlp_x_tanh":
        model = create_model("MLP", dim=5, width=24, depth=2, num_classes=3, prediction="x_tanh")
    elif kind == "imf":  # iMF's in-context DiT: a 2-block trunk, u and v heads of 1 block each, head dim 16
        model = create_model("iMF-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             depth=3, aux_head_depth=1)
        return randomize_imf(model.to(dtype))
    elif kind == "imf_uncond":  # no class tokens; a trunk of 0 blocks: the heads branch at the embeddings
        model = create_model("iMF-Nano/2", input_size=4, in_channels=2, num_classes=0, hidden_size=32, num_heads=2,
                             depth=2, aux_head_depth=2)
        return randomize_imf(model.to(dtype))
    else:
        raise ValueError(kind)
    return randomize(model.to(dtype))


def random_inputs(model, batch=3, dtype=torch.float64, margin=0.1):
    """Fresh (z, r, t, y, v) with r + margin <= t so that finite differences stay inside [0, 1]."""
    z = torch.randn(batch, *model.sample_shape, dtype=dtype)
    v = torch.randn_like(z)
    t = torch.rand(batch, dtype=dtype) * (0.8 - margin) + 0.1 + margin
    r = t - margin - torch.rand(batch, dtype=dtype) * (t - 0.1 - margin)
    y = None
    if model.num_classes > 0:
        y = torch.randint(0, model.num_classes + 1, (batch,))  # includes the null class
    return z, r, t, y, v


class GaussianAverageVelocity(nn.Module):
    """The exact average velocity u(z, r, t) of N(m, s^2 I) data, with a hand-derived dual (no autograd)."""

    num_classes = 0

    def __init__(self, m, s):
        super().__init__()
        self.register_buffer("m", m)
        self.s2 = float(s) ** 2
        self.sample_shape = tuple(m.shape)

    def _e(self, x):
        return x.view(-1, *([1] * len(self.sample_shape)))

    def sigma(self, t):
        return torch.sqrt((1 - t) ** 2 * self.s2 + t**2)

    def dsigma(self, t):
        return (t - (1 - t) * self.s2) / self.sigma(t)

    def velocity(self, z, t):
        """The marginal velocity v(z, t) = E[e - x | z_t = z]."""
        e = self._e
        return -self.m + e(self.dsigma(t) / self.sigma(t)) * (z - e(1 - t) * self.m)

    def forward(self, z, r, t, y=None):
        e = self._e
        rho = self.sigma(r) / self.sigma(t)
        num = z - e(1 - r) * self.m - e(rho) * (z - e(1 - t) * self.m)
        return num / e(t - r)

    def dual(self, z, r, t, y, dz, dr, dt):
        e = self._e
        sr, st = self.sigma(r), self.sigma(t)
        rho = sr / st
        drho = (self.dsigma(r) * dr * st - sr * self.dsigma(t) * dt) / st**2
        w = z - e(1 - t) * self.m
        dw = dz + e(dt) * self.m
        num = z - e(1 - r) * self.m - e(rho) * w
        dnum = dz + e(dr) * self.m - e(drho) * w - e(rho) * dw
        den, dden = t - r, dt - dr
        return num / e(den), (dnum * e(den) - num * e(dden)) / e(den) ** 2
