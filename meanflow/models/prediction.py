"""What a network's output means: the average velocity itself, or a clean image the velocity is read from.

    "u" (MeanFlow's):  u(z, r, t) = net(z, r, t)
    "x":               u(z, r, t) = (z - D(z, r, t)) / tau,   D = net(z, r, t),         tau = max(t, T_MIN)
    "x_tanh":          u(z, r, t) = (z - D(z, r, t)) / tau,   D = tanh(net(z, r, t))

Why "x": a one-step sample is x = z - u(z, 0, 1), so a network that outputs u must carry the noise z through every
block to cancel it, and what a small network fails to carry stays in the sample as speckle. On a straight path
z_t = (1 - t) x + t e the average velocity over any [r, t] is e - x = (z_t - x) / t, so D is the clean image x at
every (r, t); for data with many modes D is an average of clean images, smooth where u is not. The noise passes
around the network instead of through it. Below T_MIN the division is clipped: u stays finite at t -> 0, and there
the network can still represent any u (D = z - tau u).

Why "x_tanh", for pixels in [-1, 1]: the one-step sample is D(z, 0, 1) itself, and a small network's D wobbles
around the flat black background of a digit by a few grey levels, which no reader sees and Inception does (FID).
The tanh keeps D inside the pixel range and flattens it near the ends: a background the network puts anywhere past
net = -3.3 is black to the last 8-bit level. Both ends of the path stay reachable: D(z, t, t) = E[x | z_t] and
D(z, 0, t) (the flow's endpoint) are clean images or averages of them, inside the range; only the extrapolation
D(z, r, t) = (t z_r - r z_t) / (t - r) at 0 < r < t is not bounded in general, and there the tanh saturates.
Not for latents: they are not bounded by 1.

Dual (tangents dz, dt; dD from the network's own dual):
    du = (dz - dD - u dtau) / tau,   dtau = dt where t > T_MIN, else 0,   dD = (1 - D^2) dnet for "x_tanh"
"""

import torch

PREDICTIONS = ("u", "x", "x_tanh")
T_MIN = 0.05


def _tau(t, like):
    return t.clamp_min(T_MIN).view(-1, *([1] * (like.dim() - 1)))  # (B, 1, ...)


def velocity_from_output(z, t, out, prediction):
    """u from the network's output `out` under `prediction` (one of PREDICTIONS); with its graph."""
    if prediction == "u":
        return out
    return velocity_from_image(z, t, image_from_output(out, prediction))


@torch.no_grad()
def velocity_from_output_tangent(z, t, out, dz, dt, dout, prediction):
    """du for velocity_from_output, given the tangents dz, dt and dout; in dout's dtype, no graph."""
    if prediction == "u":
        return dout
    image = image_from_output(out, prediction)
    return velocity_from_image_tangent(z, t, image, dz, dt, image_from_output_tangent(image, dout, prediction))


def image_from_output(out, prediction):
    """The clean image D the output stands for under an image prediction ("x": out, "x_tanh": tanh(out))."""
    return torch.tanh(out) if prediction == "x_tanh" else out


@torch.no_grad()
def image_from_output_tangent(image, dout, prediction):
    """dD for image_from_output given its result ``image`` = D and dout: (1 - D^2) dout for "x_tanh" (D = tanh(out)),
    dout for "x"; in dout's dtype."""
    if prediction == "x_tanh":
        return (1 - image.to(dout.dtype).square()) * dout
    return dout


def velocity_from_image(z, t, image):
    """u = (z - D) / max(t, T_MIN), in the image's dtype (bf16 under autocast, like a plain output)."""
    return ((z - image) / _tau(t, z)).to(image.dtype)


@torch.no_grad()
def velocity_from_image_tangent(z, t, image, dz, dt, dimage):
    """du for velocity_from_image, given the tangents dz, dt and dD; in dD's dtype (u recomputed in it), no graph."""
    td = dimage.dtype
    tau = _tau(t, z).to(td)
    dtau = torch.where(t > T_MIN, dt, torch.zeros_like(dt)).view_as(tau).to(td)
    u = (z.to(td) - image.to(td)) / tau
    return (dz.to(td) - dimage - u * dtau) / tau
