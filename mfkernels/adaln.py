"""adaLN modulation with its forward-mode tangent: LayerNorm (no affine) over C, then scale and shift per sample.

Shapes: x (B, N, C), shift and scale (B, C). Math, per row x of length C:

    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  xh = (x - mean) * rstd
    y    = xh * (1 + scale) + shift

The tangent along (dx, dshift, dscale) is

    dxh = (dx - mean(dx) - xh * mean(xh * dx)) * rstd
    dy  = dxh * (1 + scale) + xh * dscale + dshift

In ``adaln_modulate_jvp`` the primal y is differentiable with respect to x, shift and scale; the tangent dy is not
(MeanFlow puts the whole tangent under stop-gradient, so it needs values only).
"""

import torch
import torch.nn.functional as F

from mfkernels._backend import use_triton

DEFAULT_EPS = 1e-6  # DiT's LayerNorm eps


# ----------------------------------------------------------------------------------------------------------------------
# torch reference: the oracle for tests and benchmarks, and the CPU path
# ----------------------------------------------------------------------------------------------------------------------

def adaln_modulate_reference(x, shift, scale, eps=DEFAULT_EPS):
    xh = F.layer_norm(x, (x.shape[-1],), eps=eps)  # (B, N, C)
    return xh * (1 + scale[:, None, :]) + shift[:, None, :]


def adaln_tangent_reference(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """dy from the closed form in the module docstring, written out term by term (no autograd)."""
    with torch.no_grad():
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
        xh = (x - mean) * rstd
        dxh = (dx - dx.mean(-1, keepdim=True) - xh * (xh * dx).mean(-1, keepdim=True)) * rstd
        return dxh * (1 + scale[:, None, :]) + xh * dscale[:, None, :] + dshift[:, None, :]


def adaln_modulate_jvp_torch(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """Fast torch composite: the LayerNorm Jacobian is symmetric, so its backward kernel applied to dx is J dx."""
    C = x.shape[-1]
    xh, mean, rstd = torch.ops.aten.native_layer_norm(x, [C], None, None, eps)
    y = torch.addcmul(shift[:, None, :], xh, 1 + scale[:, None, :])
    with torch.no_grad():
        dxh = torch.ops.aten.native_layer_norm_backward(
            dx, x.detach(), [C], mean.detach(), rstd.detach(), None, None, [True, False, False]
        )[0]
        xh = xh.detach()
        dy = dxh * (1 + scale[:, None, :]) + xh * dscale[:, None, :] + dshift[:, None, :]
    return y, dy


# ----------------------------------------------------------------------------------------------------------------------
# input checks
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
        if t.dtype != x.dtype:
            raise ValueError(f"adaln_modulate: {name} has dtype {t.dtype} but x has {x.dtype}")


# ----------------------------------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------------------------------

def adaln_modulate(x, shift, scale, eps=DEFAULT_EPS):
    """y = LayerNorm(x) * (1 + scale) + shift; x (B, N, C), shift/scale (B, C)."""
    _check(x, shift, scale)
    return adaln_modulate_reference(x, shift, scale, eps)


def adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale, eps=DEFAULT_EPS):
    """(y, dy): y differentiable with respect to x, shift, scale; dy detached."""
    _check(x, shift, scale, {"dx": dx, "dshift": dshift, "dscale": dscale})
    return adaln_modulate_jvp_torch(x, shift, scale, dx, dshift, dscale, eps)


# ----------------------------------------------------------------------------------------------------------------------
# gated residual of the DiT block: out = x + gate * y, tangent dx + dgate * y + gate * dy
# ----------------------------------------------------------------------------------------------------------------------

def gated_residual(x, gate, y):
    """x + gate[:, None] * y; x, y (B, N, C), gate (B, C)."""
    return torch.addcmul(x, gate[:, None, :], y)


def gated_residual_jvp(x, gate, y, dx, dgate, dy):
    """(out, dout): out differentiable, dout = dx + dgate * y + gate * dy detached."""
    out = torch.addcmul(x, gate[:, None, :], y)
    with torch.no_grad():
        dout = torch.addcmul(torch.addcmul(dx, dgate[:, None, :], y), gate[:, None, :], dy)
    return out, dout
