"""The MeanFlow objective: the identity on Gaussian data (closed form), time sampling, weighting, guidance."""

import math

import pytest
import torch

import meanflow.objective as objective
from meanflow.jvp import u_and_dudt
from meanflow.objective import (
    ObjectiveConfig,
    adaptive_loss,
    draw,
    dudt_where_r_neq_t,
    guided_velocity,
    meanflow_loss,
    meanflow_target,
    sample_times,
)
from tests.meanflow.reference_models import GaussianAverageVelocity, random_inputs, small_model


@pytest.mark.parametrize("engine", ["dual", "func"])
def test_identity_holds_for_gaussian_data(engine, seed):
    """With the true average velocity as the model and the marginal velocity as v, the target equals u exactly."""
    m = torch.randn(2, 3, dtype=torch.float64)
    model = GaussianAverageVelocity(m, s=0.3 + torch.rand(()).item())
    z, r, t, _, _ = random_inputs(model, batch=16)
    v = model.velocity(z, t)
    u, dudt = u_and_dudt(model, z, r, t, None, v, engine=engine)
    target = meanflow_target(v, r, t, dudt)
    assert dudt.abs().max() > 1e-2
    assert ((target - u).abs().max() / u.abs().max()).item() <= 1e-12


def test_gaussian_dual_matches_func(seed):
    model = GaussianAverageVelocity(torch.randn(4, dtype=torch.float64), s=0.5)
    z, r, t, _, v = random_inputs(model, batch=8)
    for tangent in [(0.0, 1.0), (1.0, 0.0), (0.3, 0.7)]:
        _, a = u_and_dudt(model, z, r, t, None, v, "dual", *tangent)
        _, b = u_and_dudt(model, z, r, t, None, v, "func", *tangent)
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-12


def test_wrong_tangent_breaks_the_identity(seed):
    """The (v, 0, 0) ablation of the paper's Table 1b gives a target that is not u."""
    model = GaussianAverageVelocity(torch.randn(3, dtype=torch.float64), s=0.4)
    z, r, t, _, _ = random_inputs(model, batch=8)
    v = model.velocity(z, t)
    u, dudt = u_and_dudt(model, z, r, t, None, v, "dual", tangent_r=0.0, tangent_t=0.0)
    assert ((meanflow_target(v, r, t, dudt) - u).abs().max() / u.abs().max()).item() > 1e-3


@pytest.mark.parametrize("sampler", ["logit_normal", "uniform"])
def test_sample_times(sampler, seed):
    cfg = ObjectiveConfig(time_sampler=sampler, ratio_r_neq_t=0.25)
    r, t = sample_times(cfg, 4000, torch.Generator().manual_seed(seed), torch.float64)
    assert bool((r <= t).all()) and bool((r >= 0).all()) and bool((t <= 1).all())
    assert int((r != t).sum()) == 1000  # exactly the requested fraction
    if sampler == "logit_normal":
        # t = max of two sigmoid(N(mu, sigma)) draws: its logit's median solves Phi((x - mu) / sigma)^2 = 1/2
        x = torch.logit(t).median().item()
        expected = cfg.time_mu + cfg.time_sigma * math.sqrt(2) * torch.erfinv(torch.tensor(2 * 0.5**0.5 - 1)).item()
        assert abs(x - expected) < 0.1


def test_draw_is_deterministic_and_rows_slice(seed):
    cfg = ObjectiveConfig(class_drop=0.5)
    a = draw(cfg, 8, (1, 4, 4), torch.Generator().manual_seed(seed))
    b = draw(cfg, 8, (1, 4, 4), torch.Generator().manual_seed(seed))
    assert torch.equal(a.e, b.e) and torch.equal(a.t, b.t) and torch.equal(a.drop, b.drop)
    half = a.rows(4, 8)
    assert torch.equal(half.e, a.e[4:]) and torch.equal(half.r, a.r[4:])


@pytest.mark.parametrize("ratio, class_drop", [(0.25, 0.1), (0.5, 0.3), (1.0, 0.1), (0.0, 0.2)])
def test_dropped_rows_are_r_equal_t_rows(ratio, class_drop, seed):
    """The official rule, written out: one random order of the batch; its first round((1 - ratio) B) rows have
    r = t and its first round(class_drop B) rows lose their label, so dropped rows are r = t rows."""
    batch = 40
    cfg = ObjectiveConfig(ratio_r_neq_t=ratio, class_drop=class_drop, time_sampler="uniform")
    d = draw(cfg, batch, (1, 2, 2), torch.Generator().manual_seed(seed), torch.float64)

    g = torch.Generator().manual_seed(seed)
    torch.randn(batch, 1, 2, 2, generator=g, dtype=torch.float64)  # the noise comes first
    s = torch.rand(2, batch, generator=g, dtype=torch.float64)
    order = torch.randperm(batch, generator=g)
    n_equal, n_drop = round((1 - ratio) * batch), round(class_drop * batch)
    r_ref, t_ref = s.min(0).values, s.max(0).values
    r_ref[order[:n_equal]] = t_ref[order[:n_equal]]
    drop_ref = torch.zeros(batch, dtype=torch.bool)
    drop_ref[order[:n_drop]] = True

    assert torch.equal(d.t, t_ref) and torch.equal(d.r, r_ref) and torch.equal(d.drop, drop_ref)
    assert int(d.drop.sum()) == n_drop and int((d.r == d.t).sum()) == n_equal
    if n_drop <= n_equal:
        assert bool((d.r[d.drop] == d.t[d.drop]).all())


def test_adaptive_loss_matches_formula(seed):
    u, target = torch.randn(5, 3, 2, dtype=torch.float64), torch.randn(5, 3, 2, dtype=torch.float64)
    p, c = 0.75, 1e-3
    per = ((u - target) ** 2).sum((1, 2))
    loss, _ = adaptive_loss(u, target, p, c)
    assert torch.allclose(loss, (per / (per + c) ** p).mean(), rtol=1e-14)
    u.requires_grad_(True)
    adaptive_loss(u, target, p, c)[0].backward()
    # the weight is under stop-gradient: d/du = 2 (u - target) / (L + c)^p / B
    expected = 2 * (u.detach() - target) / (per + c).pow(p).view(-1, 1, 1) / 5
    assert torch.allclose(u.grad, expected, rtol=1e-12)
    assert torch.allclose(adaptive_loss(u, target, 0.0, c)[0], per.mean())


def test_flow_matching_is_the_ratio_zero_case(seed):
    """ratio_r_neq_t = 0: every r = t, the loss is plain flow matching against v = e - x."""
    model = small_model("dit")
    x = torch.randn(4, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (4,))
    cfg = ObjectiveConfig(ratio_r_neq_t=0.0, adaptive_p=0.0, class_drop=0.0)
    d = draw(cfg, 4, model.sample_shape, torch.Generator().manual_seed(seed), torch.float64)
    assert torch.equal(d.r, d.t)
    loss, _ = meanflow_loss(model, x, y, d, cfg)
    tt = d.t.view(-1, 1, 1, 1)
    z = (1 - tt) * x + tt * d.e
    expected = ((model(z, d.t, d.t, y) - (d.e - x)) ** 2).flatten(1).sum(1).mean()
    assert torch.allclose(loss, expected, rtol=1e-12)
    # and the MeanFlow path with the same draw gives the same value, since (t - r) du/dt vanishes
    cfg_mf = ObjectiveConfig(ratio_r_neq_t=0.5, adaptive_p=0.0, class_drop=0.0)
    assert torch.allclose(meanflow_loss(model, x, y, d, cfg_mf)[0], expected, rtol=1e-12)


@pytest.mark.parametrize("engine", ["dual", "func"])
def test_meanflow_loss_gradient_only_through_u(engine, seed):
    model = small_model("mlp")
    x = torch.randn(6, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (6,))
    cfg = ObjectiveConfig(ratio_r_neq_t=1.0, class_drop=0.0, engine=engine)
    d = draw(cfg, 6, model.sample_shape, torch.Generator().manual_seed(seed), torch.float64)
    loss, _ = meanflow_loss(model, x, y, d, cfg)
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    # the same loss with the target computed separately and frozen
    model.zero_grad()
    tt = d.t.view(-1, 1)
    z, v = (1 - tt) * x + tt * d.e, d.e - x
    u, dudt = u_and_dudt(model, z, d.r, d.t, y, v, engine="func")
    adaptive_loss(u, meanflow_target(v, d.r, d.t, dudt), cfg.adaptive_p, cfg.adaptive_c)[0].backward()
    for g, p in zip(got, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("engine", ["dual", "func"])
@pytest.mark.parametrize("ratio, tangents", [(0.25, (0.0, 1.0)), (0.5, (1.0, 1.0)), (0.25, (1.0, 0.0))])
def test_jvp_on_r_neq_t_rows_only_equals_jvp_on_every_row(engine, ratio, tangents, seed, monkeypatch):
    """The split path (forward of every row + no-grad JVP of the r != t rows) gives the loss and the gradients of
    one JVP pass over every row: the r = t rows' (t - r) du/dt is zero either way."""
    model = small_model("dit")
    x = torch.randn(8, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (8,))
    cfg = ObjectiveConfig(ratio_r_neq_t=ratio, tangent_r=tangents[0], tangent_t=tangents[1], cfg_w=1.5,
                          class_drop=0.25, engine=engine)
    d = draw(cfg, 8, model.sample_shape, torch.Generator().manual_seed(seed), torch.float64)
    assert 0 < int((d.r != d.t).sum()) < 8

    def loss_and_grads():
        model.zero_grad()
        loss, _ = meanflow_loss(model, x, y, d, cfg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    split_loss, split_grads = loss_and_grads()
    monkeypatch.setattr(objective, "JVP_SPLIT_MAX_RATIO", -1.0)  # every row through one dual pass
    joint_loss, joint_grads = loss_and_grads()
    assert torch.allclose(split_loss, joint_loss, rtol=1e-12)
    for a, b in zip(split_grads, joint_grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_jvp_rows_when_a_rank_drew_none(seed):
    """A rank whose rows all have r = t still makes the dual call (the other ranks' collectives wait for it) and
    gets a zero du/dt."""
    model = small_model("dit")
    z, _, t, _, v = random_inputs(model, batch=3)
    calls = []
    original = model.dual
    model.dual = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    dudt = dudt_where_r_neq_t(model, ObjectiveConfig(), z, t, t, None, v)
    assert calls == [1] and not dudt.any() and dudt.shape == v.shape


def test_guided_velocity(seed):
    model = small_model("dit")
    z, _, t, _, v = random_inputs(model, batch=6)
    y = torch.randint(0, model.num_classes, (6,))
    dropped = torch.tensor([False, True, False, False, True, False])
    t = torch.tensor([0.1, 0.2, 0.5, 0.9, 0.95, 0.3], dtype=torch.float64)
    cfg = ObjectiveConfig(cfg_w=0.2, cfg_k=0.92, cfg_t_start=0.0, cfg_t_end=0.8)
    got = guided_velocity(model, cfg, z, t, y, v, dropped)
    null = torch.full_like(y, model.num_classes)
    full = 0.2 * v + 0.92 * model(z, t, t, y) + (1 - 0.2 - 0.92) * model(z, t, t, null)
    active = torch.tensor([True, False, True, False, False, True])
    assert torch.allclose(got[active], full[active], rtol=1e-12)
    assert torch.equal(got[~active], v[~active])  # dropped labels and t outside the interval keep v
    assert not got.requires_grad


def test_guided_loss_uses_guided_velocity_as_tangent(seed):
    """With guidance on, v~ replaces v as target and tangent: compare against a hand-assembled loss."""
    model = small_model("dit")
    x = torch.randn(4, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (4,))
    cfg = ObjectiveConfig(ratio_r_neq_t=1.0, cfg_w=0.5, cfg_k=0.3, class_drop=0.0, adaptive_p=0.0)
    # p = 0: the loss moves with the target; under p = 1 each row's weighted loss L / (L + c) is ~1 whatever it is
    d = draw(cfg, 4, model.sample_shape, torch.Generator().manual_seed(seed), torch.float64)
    loss, _ = meanflow_loss(model, x, y, d, cfg)
    tt = d.t.view(-1, 1, 1, 1)
    z = (1 - tt) * x + tt * d.e
    vg = guided_velocity(model, cfg, z, d.t, y, d.e - x, d.drop)
    u, dudt = u_and_dudt(model, z, d.r, d.t, y, vg, engine="func")
    expected, _ = adaptive_loss(u, meanflow_target(vg, d.r, d.t, dudt), cfg.adaptive_p, cfg.adaptive_c)
    assert torch.allclose(loss, expected, rtol=1e-10)


def _written_out_guided_velocity(model, cfg, z, t, y, v, dropped):
    """v~ as the module docstring writes it: both u's over every row, then the rows outside the guidance kept as v."""
    null = torch.full_like(y, model.num_classes)
    full = cfg.cfg_w * v + cfg.cfg_k * model(z, t, t, y) + (1 - cfg.cfg_w - cfg.cfg_k) * model(z, t, t, null)
    active = (t >= cfg.cfg_t_start) & (t <= cfg.cfg_t_end) & ~dropped
    return torch.where(active.view(-1, 1, 1, 1), full, v)


def _count_calls(model):
    calls = []
    original = model.forward
    model.forward = lambda z, *a, **k: calls.append(z.shape[0]) or original(z, *a, **k)
    return calls


def test_guided_velocity_reuses_known_rows_in_one_call(seed):
    """Rows whose u(z, t, t | y) is known are not recomputed; the others' cond and null u's come from one call over
    the guided rows only."""
    model = small_model("dit")
    z, _, _, _, v = random_inputs(model, batch=6)
    y = torch.randint(0, model.num_classes, (6,))
    t = torch.tensor([0.1, 0.2, 0.5, 0.9, 0.7, 0.3], dtype=torch.float64)
    dropped = torch.tensor([False, True, False, False, False, False])
    known_mask = torch.tensor([True, True, False, False, True, False])
    cfg = ObjectiveConfig(cfg_w=1.5, cfg_k=0.5, cfg_t_end=0.8)
    expected = _written_out_guided_velocity(model, cfg, z, t, y, v, dropped)
    with torch.no_grad():
        known_u = torch.where(known_mask.view(-1, 1, 1, 1), model(z, t, t, y), torch.nan)
    calls = _count_calls(model)
    got = guided_velocity(model, cfg, z, t, y, v, dropped, known=(known_mask, known_u))
    assert calls == [2 + 4]  # cond on the guided unknown rows 2 and 5, null on the guided rows 0, 2, 4, 5
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    wrong = known_u + 1.0  # the known rows' u is what enters v~ there, not a recomputed one
    moved = guided_velocity(model, cfg, z, t, y, v, dropped, known=(known_mask, wrong))
    shifted = (known_mask & (t <= 0.8) & ~dropped).view(-1, 1, 1, 1)  # rows 0 and 4
    assert torch.allclose(moved - got, (0.5 * shifted.double()).expand_as(got), rtol=0, atol=1e-12)


def test_guided_velocity_still_calls_the_model_without_guided_rows(seed):
    """A rank with no guided row makes the same single call as the others (FSDP's collectives) and keeps v."""
    model = small_model("dit")
    z, _, _, _, v = random_inputs(model, batch=3)
    y = torch.randint(0, model.num_classes, (3,))
    t = torch.tensor([0.85, 0.9, 0.95], dtype=torch.float64)
    calls = _count_calls(model)
    got = guided_velocity(model, ObjectiveConfig(cfg_w=1.5, cfg_k=0.5, cfg_t_end=0.8), z, t, y, v,
                          torch.zeros(3, dtype=torch.bool))
    assert calls == [1] and torch.equal(got, v)


@pytest.mark.parametrize("ratio", [0.0, 0.5])
@pytest.mark.parametrize("w,k,t_end", [(1.5, 0.5, 1.0), (3.0, 0.0, 0.8), (0.4, 0.6, 1.0)])
def test_guided_loss_with_known_rows_equals_the_written_out_loss(ratio, w, k, t_end, seed):
    """Reusing the training forward's r = t rows gives the loss of guidance computed over every row."""
    model = small_model("dit")
    x = torch.randn(8, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (8,))
    cfg = ObjectiveConfig(ratio_r_neq_t=ratio, cfg_w=w, cfg_k=k, cfg_t_end=t_end, class_drop=0.25,
                          adaptive_p=0.0)  # p = 0: see test_guided_loss_uses_guided_velocity_as_tangent
    d = draw(cfg, 8, model.sample_shape, torch.Generator().manual_seed(seed), torch.float64)
    loss, _ = meanflow_loss(model, x, y, d, cfg)
    tt = d.t.view(-1, 1, 1, 1)
    z = (1 - tt) * x + tt * d.e
    y_kept = torch.where(d.drop, torch.full_like(y, model.num_classes), y)
    with torch.no_grad():
        vg = _written_out_guided_velocity(model, cfg, z, d.t, y_kept, d.e - x, d.drop)
        _, dudt = u_and_dudt(model, z, d.r, d.t, y_kept, vg, engine="func")
    u = model(z, d.r, d.t, y_kept)
    expected, _ = adaptive_loss(u, meanflow_target(vg, d.r, d.t, dudt), cfg.adaptive_p, cfg.adaptive_c)
    assert torch.allclose(loss, expected, rtol=1e-10)


@pytest.mark.parametrize(
    "key,value",
    [("time_sampler", "gauss"), ("engine", "jax"), ("ratio_r_neq_t", 1.5), ("class_drop", -0.1),
     ("time_sigma", 0.0), ("cfg_t_start", 0.9)],
)
def test_config_rejects_bad_values(key, value):
    cfg = ObjectiveConfig(**{key: value, **({"cfg_t_end": 0.5} if key == "cfg_t_start" else {})})
    with pytest.raises(ValueError, match=f"objective.{key}"):
        cfg.validate()
