"""The Improved MeanFlow (iMF) objective (Geng et al., arXiv 2512.02012; official JAX code Lyy-iiis/imeanflow,
imf.py): ``objective.kind = "imf"``, for an iMF model (``model.is_imf``: prefix-token DiT with a v-head and the
guidance conditions omega, t_min, t_max as inputs).

Conventions as everywhere: data x at t = 0, noise e at t = 1, z_t = (1 - t) x + t e, v = e - x.

Per row: times r <= t (logit-normal, t = max, r = min; r = t on a share 1 - ratio_r_neq_t of rows), a guidance scale
omega in [1, omega_max] (log-uniform for beta = 1: omega = omega_max^u, u ~ U(0, 1)) and a guidance interval
t_min ~ U(0, s), t_max ~ U(s, 1) (s = imf_interval_split), except that r = t rows get [0, 1]. With w = omega for t in
[t_min, t_max] and w = 1 outside, one no-grad forward of 2B rows at h = t - r = 0 and interval [0, 1] gives

    v_c = v_theta(z_t | y, w)        v_u = v_theta(z_t | null, 1)        (the v-head's outputs)
    v_g = v + (1 - 1/w) (v_c - v_u)                                      (= v outside the interval: w = 1)

Rows whose label is dropped (class_drop, an exact count of rows drawn independently of r = t) see the null class in
the loss and regress onto v_g = v; their omega and interval stay as drawn. Then one dual pass with the drawn
conditions (omega, t_min, t_max) and the kept labels gives u, du/dt along the tangent (v_c, 0, 1) and the v-head's v:

    V = u + (t - r) sg(du/dt)
    loss = mean_batch [ adp(sum (V - v_g)^2) + adp(sum (v - v_g)^2) ],   adp(L) = L / sg(L + c)^p    (p 1, c 0.01)

v_g and v_c carry no gradient. The official code evaluates the conditional branch twice (with omega for v_g, then
with w for the tangent); inside the interval w = omega and outside the interval v_g does not read v_c, so one
conditional branch with w gives the same v_g and v_c: 2B rows instead of 3B.
"""

from dataclasses import dataclass

import torch

from meanflow.jvp import u_and_dudt
from meanflow.objective import Draw, ObjectiveConfig, _expand, _row_order, _times, adaptive_loss


@dataclass
class ImfDraw(Draw):
    """A Draw plus the per-row guidance conditions of iMF: omega, t_min, t_max (all (B,))."""

    omega: torch.Tensor = None
    t_min: torch.Tensor = None
    t_max: torch.Tensor = None

    def rows(self, start: int, stop: int) -> "ImfDraw":
        return ImfDraw(*(f[start:stop] for f in self._fields()))

    def to(self, device, dtype=None) -> "ImfDraw":
        dtype = dtype or self.e.dtype
        e, r, t, drop, omega, t_min, t_max = self._fields()
        return ImfDraw(e.to(device, dtype), r.to(device, dtype), t.to(device, dtype), drop.to(device),
                       *(s.to(device, dtype) for s in (omega, t_min, t_max)))

    def _fields(self):
        return self.e, self.r, self.t, self.drop, self.omega, self.t_min, self.t_max

    @property
    def cond(self) -> dict:
        """The model's guidance conditions as drawn (what the loss's dual pass sees)."""
        return {"omega": self.omega, "t_min": self.t_min, "t_max": self.t_max}


def omega_from_uniform(u, omega_max, beta=1.0):
    """omega in [1, omega_max] with density ~ omega^-beta, by inverting its CDF at u ~ U(0, 1):

        beta = 1:  omega = omega_max^u                                  (log-uniform; the official default)
        else:      omega = (1 + u (omega_max^(1 - beta) - 1))^(1 / (1 - beta))
    """
    if beta == 1.0:
        return torch.exp(u * torch.log(torch.as_tensor(omega_max, dtype=u.dtype)))
    b = 1.0 - beta
    return torch.pow(1.0 + u * (omega_max**b - 1.0), 1.0 / b)


def imf_draw(cfg: ObjectiveConfig, batch: int, sample_shape, generator=None, dtype=torch.float32) -> ImfDraw:
    """The randomness of one iMF step for a global batch (one generator, so any world size draws the same)."""
    e = torch.randn(batch, *sample_shape, generator=generator, dtype=dtype)
    r, t = _times(cfg, batch, generator)
    order, n_equal, n_drop = _row_order(cfg, batch, generator)
    equal = order[:n_equal]
    r[equal] = t[equal]
    # the official cond_drop draws its mask independently of the r = t rows (unlike MeanFlow's prefixes)
    drop = torch.zeros(batch, dtype=torch.bool)
    drop[torch.randperm(batch, generator=generator)[:n_drop]] = True
    omega = omega_from_uniform(torch.rand(batch, generator=generator, dtype=torch.float64), cfg.imf_omega_max,
                               cfg.imf_omega_beta)
    split = cfg.imf_interval_split
    t_min = torch.rand(batch, generator=generator, dtype=torch.float64) * split
    t_max = split + torch.rand(batch, generator=generator, dtype=torch.float64) * (1.0 - split)
    t_min[equal], t_max[equal] = 0.0, 1.0  # flow-matching rows: guidance everywhere, as the official sampler
    return ImfDraw(e, r.to(dtype), t.to(dtype), drop, omega.to(dtype), t_min.to(dtype), t_max.to(dtype))


def guidance_scale(d: ImfDraw):
    """w = omega where t lies in [t_min, t_max], else 1 (no guidance)."""
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    return torch.where(inside, d.omega, torch.ones_like(d.omega))


@torch.no_grad()
def guidance_velocities(model, z, t, y, w):
    """(v_c, v_u): the v-head at h = 0, interval [0, 1], (y, w) and (null, 1), in one forward of 2B rows.

    v_u is None for an unconditional model (y None), whose guided target is v itself.
    """
    B = z.shape[0]
    ones = torch.ones_like(w)
    if y is None:
        _, v_c = model(z, t, t, None, cond={"omega": w, "t_min": torch.zeros_like(w), "t_max": ones}, return_v=True)
        return v_c, None
    null = torch.full_like(y, model.num_classes)
    both = torch.cat([w, ones])  # (2B,)
    cond = {"omega": both, "t_min": torch.zeros_like(both), "t_max": torch.ones_like(both)}
    t2 = torch.cat([t, t])
    _, v = model(torch.cat([z, z]), t2, t2, torch.cat([y, null]), cond=cond, return_v=True)  # (2B, ...)
    return v[:B], v[B:]


def guided_target(v, v_c, v_u, w, drop):
    """v_g = v + (1 - 1/w) (v_c - v_u), and v on dropped rows (and everywhere without labels)."""
    if v_u is None:
        return v
    gain = _expand(1.0 - 1.0 / w, v).to(v.dtype)
    v_g = v + gain * (v_c.to(v.dtype) - v_u.to(v.dtype))
    return torch.where(_expand(drop, v), v, v_g)


def imf_loss(model, x, y, d: ImfDraw, cfg: ObjectiveConfig):
    """The iMF loss on data x (B, ...) with labels y (or None); returns (loss, stats).

    stats: mse (per element, of V against v_g: the u-term; the trainer logs it) and mse_v (the v-head's term).
    """
    if not getattr(model, "is_imf", False):
        raise ValueError(f"objective.kind = 'imf' needs an iMF model (model.name 'iMF-...', with a v-head); this "
                         f"model is a {type(model).__name__}")
    if not isinstance(d, ImfDraw):
        raise ValueError("objective.kind = 'imf' needs the step's randomness from objective.draw with the same config "
                         "(an ImfDraw with omega, t_min, t_max)")
    if y is not None and model.num_classes == 0:
        y = None
    z = (1 - _expand(d.t, x)) * x + _expand(d.t, x) * d.e
    v = d.e - x
    w = guidance_scale(d)
    v_c, v_u = guidance_velocities(model, z, d.t, y, w)
    v_g = guided_target(v, v_c, v_u, w, d.drop).detach()
    if y is not None:
        y = torch.where(d.drop, torch.full_like(y, model.num_classes), y)
    u, dudt, v_pred = u_and_dudt(model, z, d.r, d.t, y, v_c.to(z.dtype), engine=cfg.engine, tangent_r=cfg.tangent_r,
                                 tangent_t=cfg.tangent_t, check_values=False, cond=d.cond, return_v=True)
    V = u + _expand(d.t - d.r, u) * dudt.detach()
    loss_u, per_u = adaptive_loss(V, v_g, cfg.adaptive_p, cfg.adaptive_c)
    loss_v, per_v = adaptive_loss(v_pred, v_g, cfg.adaptive_p, cfg.adaptive_c)
    n = x[0].numel()
    return loss_u + loss_v, {"mse": per_u.mean() / n, "mse_v": per_v.mean() / n}
