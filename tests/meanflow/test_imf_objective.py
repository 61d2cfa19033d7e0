"""The iMF objective (meanflow/objective_imf.py) against a reference written out row by row, in float64.

The reference reads only the model's plain forward (one row at a time) and torch.func.jvp; it forms the guidance
scale, interval, class drop, guided target, tangent, compound V and both adaptive terms with explicit formulas, so a
wrong mask, a batching slip in the 2B-row guidance forward, a wrong condition or a wrong stop-gradient shows.
"""

import math

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.objective import ObjectiveConfig, draw, meanflow_loss
from meanflow.objective_imf import ImfDraw, imf_draw, omega_from_uniform
from tests.meanflow.reference_models import randomize_fan_in

NUM_CLASSES = 3
SHAPE = (2, 3, 3)


class StandInImf(nn.Module):
    """A tiny network with the iMF model interface: u and a v-head from features of (z, h = t - r, 1 - 1/omega,
    t_min, t_max, label); ``dual`` carries the tangent by hand (tanh layers), independent of torch.func."""

    is_imf = True

    def __init__(self, width=16):
        super().__init__()
        self.num_classes, self.sample_shape = NUM_CLASSES, SHAPE
        d = math.prod(SHAPE)
        self.embed = nn.Embedding(NUM_CLASSES + 1, width)
        self.inp = nn.Linear(d + 4, width)
        self.u_out = nn.Linear(width, d)
        self.v_mid = nn.Linear(width, width)
        self.v_out = nn.Linear(width, d)

    def _features(self, z, r, t, cond):
        B = z.shape[0]
        cond = cond or {}
        omega = cond.get("omega", torch.ones(B, dtype=z.dtype))
        t_min = cond.get("t_min", torch.zeros(B, dtype=z.dtype))
        t_max = cond.get("t_max", torch.ones(B, dtype=z.dtype))
        return torch.cat([z.flatten(1), torch.stack([t - r, 1 - 1 / omega, t_min, t_max], 1)], 1)

    def _label(self, y, B, like):
        return self.embed(y) if y is not None else torch.zeros(B, self.embed.embedding_dim, dtype=like.dtype)

    def forward(self, z, r, t, y=None, cond=None, return_v=False):
        a = torch.tanh(self.inp(self._features(z, r, t, cond)) + self._label(y, z.shape[0], z))
        u = self.u_out(a).view_as(z)
        if not return_v:
            return u
        return u, self.v_out(torch.tanh(self.v_mid(a))).view_as(z)

    def dual(self, z, r, t, y, dz, dr, dt, cond=None, return_v=False):
        a = torch.tanh(self.inp(self._features(z, r, t, cond)) + self._label(y, z.shape[0], z))
        with torch.no_grad():
            dfeat = torch.cat([dz.flatten(1), torch.stack([dt - dr] + [torch.zeros_like(dt)] * 3, 1)], 1)
            da = (1 - a.detach() ** 2) * (dfeat @ self.inp.weight.detach().T)
            du = (da @ self.u_out.weight.detach().T).view_as(z)
        u = self.u_out(a).view_as(z)
        if not return_v:
            return u, du
        return u, du, self.v_out(torch.tanh(self.v_mid(a))).view_as(z)


def stand_in(seed=0):
    torch.manual_seed(seed)
    return randomize_fan_in(StandInImf().double())


def imf_config(**kw):
    base = dict(kind="imf", ratio_r_neq_t=0.5, adaptive_p=1.0, adaptive_c=0.01, class_drop=0.1)
    return ObjectiveConfig(**{**base, **kw}).validate()


def covering_draw(B=6):
    """A hand-made draw whose rows cover every branch: r = t (interval [0, 1]), r < t inside and outside [t_min,
    t_max] (t below t_min, t above t_max), dropped labels on an r = t and on an r < t row."""
    g = torch.Generator().manual_seed(5)
    t = torch.tensor([0.7, 0.6, 0.2, 0.9, 0.5, 0.55], dtype=torch.float64)
    r = torch.tensor([0.7, 0.1, 0.05, 0.3, 0.5, 0.2], dtype=torch.float64)
    omega = torch.tensor([3.0, 5.5, 7.0, 2.0, 1.5, 6.0], dtype=torch.float64)
    t_min = torch.tensor([0.0, 0.3, 0.35, 0.1, 0.0, 0.4], dtype=torch.float64)
    t_max = torch.tensor([1.0, 0.8, 0.6, 0.7, 1.0, 0.9], dtype=torch.float64)
    drop = torch.tensor([False, False, False, False, True, True])
    e = torch.randn(B, *SHAPE, generator=g, dtype=torch.float64)
    return ImfDraw(e, r, t, drop, omega, t_min, t_max)


def reference_loss(model, x, y, d, p, c):
    """The iMF loss written out one row at a time (official imf.py, our t convention)."""
    terms, mse_u, mse_v = [], [], []
    for i in range(x.shape[0]):
        xi, ei, yi = x[i:i + 1], d.e[i:i + 1], y[i:i + 1]
        ti, ri = d.t[i:i + 1], d.r[i:i + 1]
        z = (1 - ti.item()) * xi + ti.item() * ei
        v = ei - xi
        inside = d.t_min[i].item() <= ti.item() <= d.t_max[i].item()
        w = d.omega[i].item() if inside else 1.0
        one = torch.ones(1, dtype=x.dtype)
        with torch.no_grad():  # the guidance branch: h = 0, interval [0, 1]
            plain = {"t_min": 0 * one, "t_max": one}
            v_c = model(z, ti, ti, yi, cond={"omega": w * one, **plain}, return_v=True)[1]
            v_u = model(z, ti, ti, torch.full_like(yi, NUM_CLASSES), cond={"omega": one, **plain}, return_v=True)[1]
        v_g = v if d.drop[i] else v + (1 - 1 / w) * (v_c - v_u)
        label = torch.full_like(yi, NUM_CLASSES) if d.drop[i] else yi
        cond = {"omega": d.omega[i:i + 1], "t_min": d.t_min[i:i + 1], "t_max": d.t_max[i:i + 1]}
        with sdpa_kernel([SDPBackend.MATH]):  # the only SDPA backend with forward AD
            u, dudt = torch.func.jvp(lambda z_, r_, t_: model(z_, r_, t_, label, cond=cond), (z, ri, ti),
                                     (v_c, torch.zeros(1, dtype=x.dtype), one))
        v_head = model(z, ri, ti, label, cond=cond, return_v=True)[1]
        V = u + (ti - ri).item() * dudt.detach()
        L_u = ((V - v_g) ** 2).sum()
        L_v = ((v_head - v_g) ** 2).sum()
        terms.append(L_u / (L_u.detach() + c) ** p + L_v / (L_v.detach() + c) ** p)
        mse_u.append(L_u.detach() / xi.numel())
        mse_v.append(L_v.detach() / xi.numel())
    return torch.stack(terms).mean(), torch.stack(mse_u).mean(), torch.stack(mse_v).mean()


def data(B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *SHAPE, generator=g, dtype=torch.float64), torch.randint(0, NUM_CLASSES, (B,), generator=g)


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def loss_and_grads(fn, model):
    model.zero_grad()
    loss, *rest = fn()
    loss.backward()
    return (loss.detach(), *rest, grads(model))


def assert_close(a, b, tol):
    assert ((a - b).abs().max() / b.abs().max()).item() <= tol


@pytest.mark.parametrize("engine", ["dual", "func"])
@pytest.mark.parametrize("p, c", [(1.0, 0.01), (0.75, 0.05)])
def test_loss_equals_written_out_reference(engine, p, c):
    """Every branch (r = t rows with interval [0, 1], t inside and outside the interval, dropped labels on both kinds
    of rows) against the row-by-row reference: loss, both mse terms and every parameter gradient."""
    model = stand_in()
    x, y = data(6)
    d = covering_draw()
    cfg = imf_config(engine=engine, adaptive_p=p, adaptive_c=c)
    loss, stats, g = loss_and_grads(lambda: meanflow_loss(model, x, y, d, cfg), model)
    ref, mse_u, mse_v, g_ref = loss_and_grads(lambda: reference_loss(model, x, y, d, p, c), model)
    assert abs(loss - ref) / ref <= 1e-12
    assert abs(stats["mse"] - mse_u) / mse_u <= 1e-12 and abs(stats["mse_v"] - mse_v) / mse_v <= 1e-12
    assert_close(g, g_ref, 1e-10)
    assert model.v_out.weight.grad.abs().min() > 0 and model.u_out.weight.grad.abs().min() > 0  # both heads learn


def test_loss_on_a_drawn_batch_equals_reference():
    """The same on the objective's own draw (official settings, B = 20: ten r = t rows, two dropped labels)."""
    model = stand_in(1)
    cfg = imf_config()
    x, y = data(20, seed=2)
    d = draw(cfg, 20, SHAPE, torch.Generator().manual_seed(3), torch.float64)
    assert isinstance(d, ImfDraw)
    loss, _, g = loss_and_grads(lambda: meanflow_loss(model, x, y, d, cfg), model)
    ref, _, _, g_ref = loss_and_grads(lambda: reference_loss(model, x, y, d, 1.0, 0.01), model)
    assert abs(loss - ref) / ref <= 1e-12
    assert_close(g, g_ref, 1e-10)


def test_guidance_is_one_forward_of_2b_rows():
    """The no-grad v-head evaluations (conditional with w, null with omega 1) are one call over 2B rows at h = 0 and
    interval [0, 1]; the loss itself is one dual pass with the drawn conditions."""
    model = stand_in()
    calls = []
    forward, dual = model.forward, model.dual
    model.forward = lambda z, r, t, y=None, cond=None, return_v=False: calls.append(("forward", z, r, t, y, cond)) \
        or forward(z, r, t, y, cond, return_v)
    model.dual = lambda z, r, t, y, *a, cond=None, return_v=False: calls.append(("dual", z, r, t, y, cond)) \
        or dual(z, r, t, y, *a, cond=cond, return_v=return_v)
    x, y = data(6)
    d = covering_draw()
    meanflow_loss(model, x, y, d, imf_config())
    assert [c[0] for c in calls] == ["forward", "dual"]
    _, z2, r2, t2, y2, cond2 = calls[0]
    assert z2.shape[0] == 12 and torch.equal(r2, t2) and torch.equal(t2, torch.cat([d.t, d.t]))
    assert torch.equal(y2, torch.cat([y, torch.full_like(y, NUM_CLASSES)]))  # the labels before the drop
    inside = (d.t >= d.t_min) & (d.t <= d.t_max)
    assert bool(inside.any()) and bool((~inside).any())
    assert torch.equal(cond2["omega"], torch.cat([torch.where(inside, d.omega, 1.0), torch.ones(6).double()]))
    assert bool((cond2["t_min"] == 0).all()) and bool((cond2["t_max"] == 1).all())
    _, _, r1, t1, y1, cond1 = calls[1]
    assert torch.equal(r1, d.r) and torch.equal(y1, torch.where(d.drop, NUM_CLASSES, y))
    assert all(torch.equal(cond1[k], getattr(d, k)) for k in ("omega", "t_min", "t_max"))


def test_draw_masks_and_conditions():
    """Official sampling: half the rows r = t with interval [0, 1]; t_min ~ U(0, .5), t_max ~ U(.5, 1) elsewhere;
    omega = 8^u; an exact 10% of labels dropped, drawn independently of the r = t rows (imf.py's cond_drop)."""
    cfg = imf_config()
    B = 4000
    d = imf_draw(cfg, B, (1,), torch.Generator().manual_seed(0), torch.float64)
    eq = d.r == d.t
    assert int(eq.sum()) == B // 2 and bool((d.r <= d.t).all())
    assert bool((d.t_min[eq] == 0).all()) and bool((d.t_max[eq] == 1).all())
    t_min, t_max = d.t_min[~eq], d.t_max[~eq]
    assert 0 <= t_min.min() and t_min.max() <= 0.5 and 0.5 <= t_max.min() and t_max.max() <= 1
    assert abs(t_min.mean().item() - 0.25) < 0.02 and abs(t_max.mean().item() - 0.75) < 0.02
    assert 1 <= d.omega.min() and d.omega.max() <= 8
    u = torch.log(d.omega) / math.log(8)  # uniform on [0, 1] when omega = 8^u
    assert abs(u.mean().item() - 0.5) < 0.02 and abs(u.var().item() - 1 / 12) < 0.01
    assert int(d.drop.sum()) == round(0.1 * B)
    share_neq = d.drop[~eq].float().mean().item()
    assert 0.07 < share_neq < 0.13  # dropped rows fall among r != t rows as often as among r = t rows
    one = d.rows(10, 20)
    assert torch.equal(one.omega, d.omega[10:20]) and isinstance(one, ImfDraw)
    assert one.to("cpu", torch.float32).t_max.dtype == torch.float32


def test_omega_mapping():
    u = torch.rand(1000, dtype=torch.float64)
    assert_close(omega_from_uniform(u, 8.0), 8.0 ** u, 1e-15)
    # beta = 2: density ~ omega^-2 on [1, W], CDF (1 - 1/omega) / (1 - 1/W): omega = 1 / (1 - u (1 - 1/W))
    assert_close(omega_from_uniform(u, 8.0, 2.0), 1 / (1 - u * (1 - 1 / 8)), 1e-14)
    # beta = 0: uniform on [1, W]
    assert_close(omega_from_uniform(u, 8.0, 0.0), 1 + 7 * u, 1e-14)


@pytest.mark.parametrize("key, value, msg", [
    ("kind", "improved", "objective.kind"),
    ("cfg_w", 2.0, "objective.cfg_w"),
    ("imf_omega_max", 0.5, "objective.imf_omega_max"),
    ("imf_interval_split", 1.5, "objective.imf_interval_split"),
    ("imf_sample_omega", 0.9, "objective.imf_sample_omega"),
    ("imf_sample_t_max", 0.3, "objective.imf_sample_t_min"),
])
def test_config_errors_name_the_key(key, value, msg):
    with pytest.raises(ValueError, match=msg):
        imf_config(**{key: value})


def test_imf_kind_needs_an_imf_model():
    from tests.meanflow.reference_models import small_model

    model = small_model("dit")
    cfg = imf_config()
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    d = draw(cfg, 4, (3, 6, 6), torch.Generator().manual_seed(0), torch.float64)
    with pytest.raises(ValueError, match="needs an iMF model"):
        meanflow_loss(model, x, torch.zeros(4, dtype=torch.long), d, cfg)


def test_meanflow_kind_draws_as_before():
    """kind "meanflow" (the default) keeps its draw: same generator stream, a plain Draw."""
    cfg = ObjectiveConfig()
    a = draw(cfg, 16, (2,), torch.Generator().manual_seed(4))
    assert type(a).__name__ == "Draw"
    assert int((a.r != a.t).sum()) == 4 and bool(a.drop[a.r != a.t].logical_not().all())


def real_model(dtype=torch.float64):
    """The small iMF DiT (meanflow.models.imf_dit) with every weight drawn: its zero-initialised gates and output
    layers would otherwise hide a wrong tangent or condition."""
    from meanflow.models import create_model

    torch.manual_seed(0)
    model = create_model("iMF-Nano/2", input_size=4, in_channels=2, num_classes=NUM_CLASSES)
    return randomize_fan_in(model.to(dtype))


def test_real_model_dual_equals_func_engine():
    """The iMF loss on the real small model: the dual engine and torch.func.jvp give the same loss and gradients in
    float64 (both engines see the same guidance forward, conditions and v-head)."""
    model = real_model()
    cfg = imf_config()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(10, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (10,), generator=g)
    d = draw(cfg, 10, (2, 4, 4), g, torch.float64)
    out = {}
    for engine in ("dual", "func"):
        c = imf_config(engine=engine)
        out[engine] = loss_and_grads(lambda: meanflow_loss(model, x, y, d, c), model)
    (a, sa, ga), (b, sb, gb) = out["dual"], out["func"]
    assert abs(a - b) / b <= 1e-12 and abs(sa["mse_v"] - sb["mse_v"]) / sb["mse_v"] <= 1e-12
    assert_close(ga, gb, 1e-9)
    assert model.v_final_layer.linear.weight.grad.abs().min() > 0  # the v-head learns from its own term


def test_real_model_matches_the_written_out_reference():
    model = real_model()
    x = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    d = covering_draw()
    d.e = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    loss, _, g = loss_and_grads(lambda: meanflow_loss(model, x, y, d, imf_config()), model)
    ref, _, _, g_ref = loss_and_grads(lambda: reference_loss(model, x, y, d, 1.0, 0.01), model)
    assert abs(loss - ref) / ref <= 1e-12
    assert_close(g, g_ref, 1e-9)
