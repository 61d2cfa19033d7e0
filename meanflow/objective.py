"""The MeanFlow objective: time sampling, the target from the MeanFlow identity, adaptive weighting, and
classifier-free guidance inside training.

Conventions: data x at t = 0, noise e at t = 1, z_t = (1 - t) x + t e, conditional velocity v = e - x.

    (u, du/dt) = JVP of u(z, r, t | y) along (v~, 0, 1)
    u_tgt      = sg(v~ - (t - r) du/dt)
    L          = sum over dims (u - u_tgt)^2,      loss = mean_batch  L / sg(L + c)^p

Guidance in training: for t in [t_start, t_end] and rows whose label was kept,
    v~ = w v + k u(z, t, t | y) + (1 - w - k) u(z, t, t | null)      (both u's under no_grad)
otherwise v~ = v. With ratio_r_neq_t = 0 every r equals t, the JVP term vanishes and the loss is flow matching.

Rows with r = t and rows whose label is dropped are both prefixes of one random order of the batch (exact counts
round((1 - ratio_r_neq_t) B) and round(class_drop B)), as in the official code: dropped rows are r = t rows.

All randomness of a step (noise, times, which rows have r = t, label drops) is drawn by ``draw`` for the *global*
batch from one generator, so a run gives the same samples whatever its number of processes (each rank slices
its rows with ``Draw.rows``).
"""

from dataclasses import dataclass

import torch

from meanflow.jvp import ENGINES, u_and_dudt

TIME_SAMPLERS = ("logit_normal", "uniform")
KINDS = ("meanflow", "imf")  # the regression: MeanFlow's u-loss, or Improved MeanFlow's (meanflow/objective_imf.py)


@dataclass
class ObjectiveConfig:
    kind: str = "meanflow"  # "meanflow" (u onto its target) or "imf" (Improved MeanFlow: docs/imf.md; an iMF model)
    time_sampler: str = "logit_normal"  # how t and r are drawn: "logit_normal" or "uniform"
    time_mu: float = -0.4  # logit-normal mean of t and r (each sigmoid(N(mu, sigma)); t = max, r = min)
    time_sigma: float = 1.0  # logit-normal standard deviation
    ratio_r_neq_t: float = 0.25  # fraction of the batch with r != t; 0 gives plain flow matching
    tangent_r: float = 0.0  # tangent of r; the paper's is (v, 0, 1): change only to reproduce its Table 1b
    tangent_t: float = 1.0  # tangent of t in the JVP (the paper's 1)
    adaptive_p: float = 1.0  # adaptive weighting power; p = 0: plain L2
    adaptive_c: float = 1e-3  # adaptive weighting: loss = L / sg(L + c)^p
    class_drop: float = 0.1  # fraction of the batch (exact count) whose label is the null class; taken among r = t rows
    cfg_w: float = 1.0  # guidance in training: v~ = w v + k u(c) + (1 - w - k) u(null); w = 1, k = 0: none
    cfg_k: float = 0.0  # guidance mixing weight of the conditional u (see cfg_w)
    cfg_t_start: float = 0.0  # guidance applies for t in [cfg_t_start, cfg_t_end]
    cfg_t_end: float = 1.0  # end of the guidance interval
    engine: str = "dual"  # "dual" or "func" (the torch.func.jvp reference)
    imf_omega_max: float = 8.0  # iMF: guidance scale omega drawn per row in [1, imf_omega_max] (official 1 + 7)
    imf_omega_beta: float = 1.0  # iMF: omega's density ~ omega^-beta on [1, omega_max]; 1 = log-uniform (official)
    imf_interval_split: float = 0.5  # iMF: guidance interval t_min ~ U(0, split), t_max ~ U(split, 1) (official 0.5)
    imf_sample_omega: float = 8.0  # iMF sampling default of --omega (official 1-NFE B/2 and XL/2: 8.0)
    imf_sample_t_min: float = 0.4  # iMF sampling default guidance interval start (official 1-NFE B/2: 0.4)
    imf_sample_t_max: float = 0.65  # iMF sampling default guidance interval end (official 1-NFE B/2: 0.65)

    def validate(self):
        def bad(key, why):
            raise ValueError(f"objective.{key}: {why}")

        if self.time_sampler not in TIME_SAMPLERS:
            bad("time_sampler", f"must be one of {TIME_SAMPLERS}, got {self.time_sampler!r}")
        if self.engine not in ENGINES:
            bad("engine", f"must be one of {ENGINES}, got {self.engine!r}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            bad("ratio_r_neq_t", f"must lie in [0, 1], got {self.ratio_r_neq_t}")
        if not 0.0 <= self.class_drop < 1.0:
            bad("class_drop", f"must lie in [0, 1), got {self.class_drop}")
        if self.time_sigma <= 0:
            bad("time_sigma", f"must be > 0, got {self.time_sigma}")
        if self.adaptive_c <= 0 and self.adaptive_p != 0:
            bad("adaptive_c", f"must be > 0 when adaptive_p != 0, got {self.adaptive_c}")
        if not 0.0 <= self.cfg_t_start <= self.cfg_t_end <= 1.0:
            bad("cfg_t_start", f"need 0 <= cfg_t_start <= cfg_t_end <= 1, got {self.cfg_t_start}, {self.cfg_t_end}")
        if self.kind not in KINDS:
            bad("kind", f"must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "imf":
            self._validate_imf(bad)
        return self

    def _validate_imf(self, bad):
        if self.guided:
            bad("cfg_w" if self.cfg_w != 1.0 else "cfg_k", "MeanFlow's guidance in training does not apply to kind "
                "'imf', whose guidance is the sampled omega (objective.imf_omega_max): keep cfg_w = 1, cfg_k = 0")
        if not self.imf_omega_max >= 1.0:
            bad("imf_omega_max", f"must be >= 1 (omega = 1 is no guidance), got {self.imf_omega_max}")
        if not self.imf_omega_beta >= 0.0:
            bad("imf_omega_beta", f"must be >= 0, got {self.imf_omega_beta}")
        if not 0.0 <= self.imf_interval_split <= 1.0:
            bad("imf_interval_split", f"must lie in [0, 1], got {self.imf_interval_split}")
        if not self.imf_sample_omega >= 1.0:
            bad("imf_sample_omega", f"must be >= 1, got {self.imf_sample_omega}")
        if not 0.0 <= self.imf_sample_t_min < self.imf_sample_t_max <= 1.0:
            bad("imf_sample_t_min", "need 0 <= imf_sample_t_min < imf_sample_t_max <= 1, got "
                f"{self.imf_sample_t_min}, {self.imf_sample_t_max}")

    @property
    def guided(self) -> bool:
        return self.cfg_w != 1.0 or self.cfg_k != 0.0


@dataclass
class Draw:
    """The random part of one step for a global batch: noise e, times r <= t, and which labels are dropped."""

    e: torch.Tensor
    r: torch.Tensor
    t: torch.Tensor
    drop: torch.Tensor

    def rows(self, start: int, stop: int) -> "Draw":
        return Draw(self.e[start:stop], self.r[start:stop], self.t[start:stop], self.drop[start:stop])

    def to(self, device, dtype=None) -> "Draw":
        dtype = dtype or self.e.dtype
        return Draw(self.e.to(device, dtype), self.r.to(device, dtype), self.t.to(device, dtype),
                    self.drop.to(device))


def _row_order(cfg: ObjectiveConfig, batch: int, generator=None):
    """(order, n_equal, n_drop): one random order of the rows; its first n_equal rows get r = t, its first n_drop
    rows lose their label.

    Both sets are prefixes of the same order, as both masks are prefixes of the batch in the official code: every
    dropped row is an r = t (flow-matching) row whenever class_drop <= 1 - ratio_r_neq_t, so the null class learns
    the instantaneous velocity only. Counts are exact: round(fraction * batch).
    """
    order = torch.randperm(batch, generator=generator)
    return order, round((1.0 - cfg.ratio_r_neq_t) * batch), round(cfg.class_drop * batch)


def _times(cfg: ObjectiveConfig, batch: int, generator=None):
    """(r, t) in float64 with 0 <= r <= t <= 1: the min and max of two draws of the time sampler."""
    if cfg.time_sampler == "logit_normal":
        normal = torch.randn(2, batch, generator=generator, dtype=torch.float64)
        s = torch.sigmoid(normal * cfg.time_sigma + cfg.time_mu)
    else:
        s = torch.rand(2, batch, generator=generator, dtype=torch.float64)
    return s.min(0).values, s.max(0).values


def sample_times(cfg: ObjectiveConfig, batch: int, generator=None, dtype=torch.float32):
    """(r, t) with 0 <= r <= t <= 1; a fraction (1 - ratio_r_neq_t) of rows (exact count) has r = t."""
    d = draw(cfg, batch, (), generator, dtype)
    return d.r, d.t


def draw(cfg: ObjectiveConfig, batch: int, sample_shape, generator=None, dtype=torch.float32) -> Draw:
    if cfg.kind == "imf":  # imported here: objective_imf builds on this module
        from meanflow.objective_imf import imf_draw

        return imf_draw(cfg, batch, sample_shape, generator, dtype)
    e = torch.randn(batch, *sample_shape, generator=generator, dtype=dtype)
    r, t = _times(cfg, batch, generator)
    order, n_equal, n_drop = _row_order(cfg, batch, generator)
    r[order[:n_equal]] = t[order[:n_equal]]
    drop = torch.zeros(batch, dtype=torch.bool)
    drop[order[:n_drop]] = True
    return Draw(e, r.to(dtype), t.to(dtype), drop)


def meanflow_target(v, r, t, dudt):
    """u_tgt = v - (t - r) du/dt, with (t - r) broadcast over the sample dims."""
    return v - (t - r).view(-1, *([1] * (v.dim() - 1))) * dudt


def adaptive_loss(u, target, p, c):
    """Per-sample L = sum (u - target)^2 weighted by 1 / sg(L + c)^p; returns (loss mean, L per sample)."""
    per_sample = (u - target).pow(2).flatten(1).sum(1)
    if p == 0:
        return per_sample.mean(), per_sample.detach()
    weight = (per_sample.detach() + c).pow(-p)
    return (per_sample * weight).mean(), per_sample.detach()


def _expand(s, like):
    return s.view(-1, *([1] * (like.dim() - 1)))


def guidance_active(cfg: ObjectiveConfig, t, dropped):
    """The rows guidance applies to: t in [cfg_t_start, cfg_t_end] and the label kept."""
    return (t >= cfg.cfg_t_start) & (t <= cfg.cfg_t_end) & ~dropped


@torch.no_grad()
def guided_velocity(model, cfg: ObjectiveConfig, z, t, y, v, dropped, known=None):
    """v~ = w v + k u(z,t,t|y) + (1-w-k) u(z,t,t|null) on the guidance_active rows; v elsewhere.

    What the guided rows need comes from one no-grad forward over those rows only: u(z, t, t | null) where
    1 - w - k != 0, and u(z, t, t | y) where k != 0, except on the rows of ``known`` = (mask (B,), u (B, ...)) whose u
    already is u(z, t, t | y): the training forward's rows with r = t. That forward runs on every rank, on one
    throw-away row where a rank has none, so that FSDP's collectives (one set per model call) match across ranks.
    """
    k, k_null = cfg.cfg_k, 1.0 - cfg.cfg_w - cfg.cfg_k
    active = guidance_active(cfg, t, dropped)
    if k == 0.0 and k_null == 0.0:  # w = 1, k = 0: no guidance
        return v
    need_cond = active & ~known[0] if known is not None else active
    none = active.new_zeros(0, dtype=torch.long)
    cond_rows = need_cond.nonzero().squeeze(1) if k != 0.0 else none  # (n_c,)
    null_rows = active.nonzero().squeeze(1) if k_null != 0.0 else none  # (n_n,)
    rows = torch.cat([cond_rows, null_rows])
    labels = torch.cat([y[cond_rows], torch.full_like(y[null_rows], model.num_classes)])
    if rows.numel() == 0:  # the throw-away row; its output is discarded
        rows, labels = rows.new_zeros(1), y[:1]
    out = model(z[rows], t[rows], t[rows], labels).to(v.dtype)  # (n_c + n_n, ...)
    v_guided = cfg.cfg_w * v
    if k != 0.0:
        u_cond = known[1].to(v.dtype).clone() if known is not None else torch.zeros_like(v)
        u_cond[cond_rows] = out[: cond_rows.numel()]
        v_guided = v_guided + k * u_cond
    if k_null != 0.0:
        u_null = torch.zeros_like(v)
        u_null[null_rows] = out[cond_rows.numel() : cond_rows.numel() + null_rows.numel()]
        v_guided = v_guided + k_null * u_null
    return torch.where(_expand(active, v), v_guided, v)


# Up to this fraction of r != t rows, the JVP runs on those rows only: a plain forward of all rows (with gradients)
# plus a no-grad dual pass of the fraction rho costs F + rho (F + T) against F + T for one dual pass of every row
# with gradients, where the tangent T costs ~1.5 forwards F. Decided from the config, never from the rows a rank
# drew, so that every rank makes the same model calls (FSDP's collectives run per call).
JVP_SPLIT_MAX_RATIO = 0.5


@torch.no_grad()
def dudt_where_r_neq_t(model, cfg: ObjectiveConfig, z, r, t, y, v):
    """du/dt on the rows with r != t and 0 on the others, where (t - r) du/dt vanishes whatever du/dt is.

    A rank that drew no r != t row still runs the dual pass, on its first row, so that its model calls match the
    other ranks'; that result is discarded.
    """
    rows = (r != t).nonzero().squeeze(1)  # (n,)
    drew_none = rows.numel() == 0
    if drew_none:
        rows = rows.new_zeros(1)
    _, dudt_rows = u_and_dudt(model, z[rows], r[rows], t[rows], None if y is None else y[rows], v[rows],
                              engine=cfg.engine, tangent_r=cfg.tangent_r, tangent_t=cfg.tangent_t,
                              check_values=False)
    dudt = torch.zeros_like(v, dtype=dudt_rows.dtype)
    if not drew_none:
        dudt[rows] = dudt_rows
    return dudt


def meanflow_loss(model, x, y, d: Draw, cfg: ObjectiveConfig):
    """One MeanFlow loss on data x (B, ...) with labels y (or None) and the step's randomness d.

    Returns (loss, stats) where stats holds detached per-batch diagnostics. objective.kind "imf" is
    meanflow.objective_imf.imf_loss (d then comes from ``draw`` with the same config).
    """
    if cfg.kind == "imf":
        from meanflow.objective_imf import imf_loss

        return imf_loss(model, x, y, d, cfg)
    e, r, t = d.e, d.r, d.t
    z = (1 - _expand(t, x)) * x + _expand(t, x) * e
    v = e - x
    guided = y is not None and model.num_classes > 0 and cfg.guided
    if y is not None and model.num_classes > 0:
        y = torch.where(d.drop, torch.full_like(y, model.num_classes), y)
    # Where the training forward comes first, its rows with r = t are u(z, t, t | y): guidance reuses them.
    if cfg.ratio_r_neq_t == 0.0:  # flow matching: r = t everywhere, no JVP needed
        u = model(z, t, t, y)
        target = guided_velocity(model, cfg, z, t, y, v, d.drop, known=(r == t, u.detach())) if guided else v
    elif cfg.ratio_r_neq_t <= JVP_SPLIT_MAX_RATIO:
        u = model(z, r, t, y)
        if guided:
            v = guided_velocity(model, cfg, z, t, y, v, d.drop, known=(r == t, u.detach()))
        target = meanflow_target(v, r, t, dudt_where_r_neq_t(model, cfg, z, r, t, y, v))
    else:  # u comes with du/dt, whose tangent is v~: guidance first
        if guided:
            v = guided_velocity(model, cfg, z, t, y, v, d.drop)
        u, dudt = u_and_dudt(model, z, r, t, y, v, engine=cfg.engine, tangent_r=cfg.tangent_r,
                             tangent_t=cfg.tangent_t, check_values=False)
        target = meanflow_target(v, r, t, dudt)
    loss, per_sample = adaptive_loss(u, target.detach(), cfg.adaptive_p, cfg.adaptive_c)
    stats = {"mse": per_sample.mean() / x[0].numel()}
    return loss, stats
