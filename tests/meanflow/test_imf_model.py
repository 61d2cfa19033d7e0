"""iMF's in-context DiT: dual vs the torch.func.jvp oracle (values, tangents, v-head, gradients), finite differences,
the conditions' defaults and checks, the inference model, and the paper sizes' parameter counts."""

import pytest
import torch

from meanflow.jvp import u_and_dudt
from meanflow.models import create_model
from meanflow.objective import adaptive_loss, meanflow_target
from tests.meanflow.reference_models import random_cond, random_inputs, small_model

KINDS = ["imf", "imf_uncond"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tangents", [(0.0, 1.0), (0.0, 0.0), (1.0, 0.0)])
def test_dual_matches_func_float64(kind, tangents, seed):
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    kw = dict(tangent_r=tangents[0], tangent_t=tangents[1], cond=cond, return_v=True)
    u_d, du_d, v_d = u_and_dudt(model, z, r, t, y, v, engine="dual", **kw)
    u_f, du_f, v_f = u_and_dudt(model, z, r, t, y, v, engine="func", **kw)
    assert du_d.abs().max() > 1e-3  # a zero tangent would agree trivially
    errors = rel_err(u_d, u_f), rel_err(du_d, du_f), rel_err(v_d, v_f)
    print(f"{kind} {tangents}: max relative error u {errors[0]:.1e}, du {errors[1]:.1e}, v {errors[2]:.1e}")
    assert max(errors) <= 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_loss_gradients_match_func_float64(kind, seed):
    """iMF's loss shape: u through a target built from du/dt, plus the v-head's own regression; every parameter
    (both heads, the gates, every condition's tokens) gets the same gradient from both engines."""
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    grads = {}
    for engine in ("dual", "func"):
        model.zero_grad(set_to_none=True)
        u, dudt, v_head = u_and_dudt(model, z, r, t, y, v, engine=engine, cond=cond, return_v=True)
        loss_u, _ = adaptive_loss(u, meanflow_target(v, r, t, dudt), p=1.0, c=1e-2)
        loss_v, _ = adaptive_loss(v_head, v, p=1.0, c=1e-2)
        (loss_u + loss_v).backward()
        grads[engine] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["dual"].keys() == grads["func"].keys() == {n for n, _ in model.named_parameters()}
    worst = 0.0
    for name, g in grads["func"].items():
        err = ((grads["dual"][name] - g).norm() / g.norm().clamp_min(1e-300)).item()
        worst = max(worst, err)
        assert err <= 1e-9, f"{name}: relative gradient error {err:.3e}"
    print(f"{kind}: worst relative gradient error {worst:.1e}")


@pytest.mark.parametrize("kind", KINDS)
def test_dual_matches_func_float32(kind, seed):
    model64 = small_model(kind)
    model32 = small_model(kind, torch.float32)
    model32.load_state_dict({k: p.float() for k, p in model64.state_dict().items()})
    # inputs rounded to float32 first, so that the comparison measures float32 arithmetic, not input rounding
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in random_inputs(model64)]
    z, r, t, y, v = [a.double() if a is not None and a.is_floating_point() else a for a in args32]
    cond32 = {k: c.float() for k, c in random_cond(z.shape[0]).items()}
    cond = {k: c.double() for k, c in cond32.items()}
    u_ref, du_ref, v_ref = u_and_dudt(model64, z, r, t, y, v, engine="func", cond=cond, return_v=True)
    for engine in ("dual", "func"):
        u, du, v_head = u_and_dudt(model32, *args32, engine=engine, cond=cond32, return_v=True)
        assert rel_err(u.double(), u_ref) <= 1e-5, engine
        assert rel_err(v_head.double(), v_ref) <= 1e-5, engine
        assert rel_err(du.double(), du_ref) <= 1e-4, engine


@pytest.mark.parametrize("kind", KINDS)
def test_dudt_matches_finite_difference(kind, seed):
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    _, dudt = u_and_dudt(model, z, r, t, y, v, engine="dual", cond=cond)
    h = 1e-5  # fourth-order central stencil: truncation O(h^4), rounding ~1e-16 / h

    def u_at(step):
        return model(z + step * v, r, t + step, y, cond=cond)

    with torch.no_grad():
        fd = (-u_at(2 * h) + 8 * u_at(h) - 8 * u_at(-h) + u_at(-2 * h)) / (12 * h)
    assert rel_err(dudt, fd) <= 1e-6


def test_only_t_minus_r_enters(seed):
    """t is not an input: shifting r and t together leaves u unchanged (and the time tangent (0, 1) equals (-1, 0))."""
    model = small_model("imf")
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    shift = 0.05
    with torch.no_grad():
        assert rel_err(model(z, r + shift, t + shift, y, cond=cond), model(z, r, t, y, cond=cond)) <= 1e-14
    _, du_t = u_and_dudt(model, z, r, t, y, v, tangent_r=0.0, tangent_t=1.0, cond=cond)
    _, du_r = u_and_dudt(model, z, r, t, y, v, tangent_r=-1.0, tangent_t=0.0, cond=cond)
    assert rel_err(du_r, du_t) <= 1e-12


def test_cond_defaults_and_checks(seed):
    model = small_model("imf")
    z, r, t, y, _ = random_inputs(model)
    B = z.shape[0]
    ones, zeros = torch.ones(B, dtype=z.dtype), torch.zeros(B, dtype=z.dtype)
    with torch.no_grad():
        u = model(z, r, t, y)
        assert torch.equal(model(z, r, t, y, cond=dict(omega=ones, t_min=zeros, t_max=ones)), u)
        assert torch.equal(model(z, r, t, y, cond=dict(t_min=zeros)), u)  # the missing keys take their defaults
        for key, value in random_cond(B).items():  # each condition reaches the output
            assert rel_err(model(z, r, t, y, cond={key: value}), u) > 1e-6, key
    with pytest.raises(ValueError, match="omega"):
        model(z, r, t, y, cond=dict(omega=0.5 * ones))
    with pytest.raises(ValueError, match="unknown key"):
        model(z, r, t, y, cond=dict(w=ones))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model(z, r, t, y, cond=dict(t_max=ones[:2]))


def test_inference_model_has_no_v_head_and_matches_the_trained_u(seed):
    model = small_model("imf")
    inference = create_model("iMF-Nano/2", input_size=6, in_channels=3, num_classes=4, hidden_size=32, num_heads=2,
                             depth=3, aux_head_depth=0).double()
    assert not any(n.startswith("v_") for n, _ in inference.named_parameters())
    state = {k: p for k, p in model.state_dict().items() if not k.startswith(("v_blocks.", "v_final_layer."))}
    inference.load_state_dict(state)  # strict: the same names less the v-head's
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    with torch.no_grad():
        assert torch.allclose(inference(z, r, t, y, cond=cond), model(z, r, t, y, cond=cond), rtol=1e-12, atol=0)
        with pytest.raises(ValueError, match="no v-head"):
            inference(z, r, t, y, return_v=True)
    with pytest.raises(ValueError, match="no v-head"):
        inference.dual(z, r, t, y, v, torch.zeros_like(t), torch.ones_like(t), return_v=True)


def test_cond_and_return_v_are_refused_by_models_without_them(seed):
    model = small_model("dit")
    z, r, t, y, v = random_inputs(model)
    with pytest.raises(ValueError, match="iMF"):
        u_and_dudt(model, z, r, t, y, v, cond=random_cond(z.shape[0]))
    with pytest.raises(ValueError, match="iMF"):
        u_and_dudt(model, z, r, t, y, v, return_v=True)
    assert create_model("iMF-Micro/8", input_size=32, in_channels=1, num_classes=10).is_imf
    assert not getattr(model, "is_imf", False)


@pytest.mark.parametrize("precision", ["fp32", "primal"])
def test_bf16_primal_with_its_tangent_precision(precision, seed):
    model = small_model("imf", torch.float32)
    z, r, t, y, v = [a.float() if a is not None and a.is_floating_point() else a for a in random_inputs(model)]
    cond = {k: c.float() for k, c in random_cond(z.shape[0]).items()}
    _, du_ref = u_and_dudt(model.double(), z.double(), r.double(), t.double(), y, v.double(),
                           cond={k: c.double() for k, c in cond.items()})
    model.float()
    model.tangent_precision = precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, du = u_and_dudt(model, z, r, t, y, v, cond=cond)
    assert u.dtype == torch.bfloat16 and du.dtype == (torch.float32 if precision == "fp32" else torch.bfloat16)
    assert rel_err(du.double(), du_ref) <= 0.1  # bf16 rounding, not a broken tangent (O(1) errors)


# the counts without the v-head; each is this model's plus one timestep embedder (see models.imf_dit)
PAPER_PARAMS = {"iMF-B/2": 89.7e6, "iMF-M/2": 174.7e6, "iMF-L/2": 410.4e6, "iMF-XL/2": 611.7e6}


@pytest.mark.parametrize("name", PAPER_PARAMS)
def test_paper_sizes_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, aux_head_depth=0)
        trained = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[name]) <= 0.01 * PAPER_PARAMS[name], f"{name}: {count / 1e6:.1f}M"
    assert model.rope.cos.shape == (20 + 256, 32)  # head dim 64; prefix + 16 x 16 patches
    v_head = sum(p.numel() for p in trained.parameters()) - count
    assert v_head == sum(p.numel() for p in (*trained.v_blocks.parameters(), *trained.v_final_layer.parameters()))
    assert len(trained.v_blocks) == 8


def test_model_config_builds_imf_models():
    from meanflow.models.config import ModelConfig

    cfg = ModelConfig(name="iMF-Micro/8", input_size=32, in_channels=1, num_classes=10)
    cfg.validate()
    assert len(create_model(cfg.name, **cfg.build_kwargs()).v_blocks) == 2  # -1: the size's v-head
    cfg.aux_head_depth = 0
    assert create_model(cfg.name, **cfg.build_kwargs()).v_final_layer is None
    for bad in (dict(prediction="x"), dict(time_scale=1000.0), dict(aux_head_depth=-2)):
        with pytest.raises(ValueError, match="model."):
            ModelConfig(name="iMF-Micro/8", **bad).validate()
    with pytest.raises(ValueError, match="aux_head_depth"):
        ModelConfig(name="DiT-Micro/8", aux_head_depth=2).validate()


def test_activation_checkpointing_changes_nothing(seed):
    model = small_model("imf")
    z, r, t, y, v = random_inputs(model)
    cond = random_cond(z.shape[0])
    results = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        model.zero_grad(set_to_none=True)
        u, dudt, v_head = u_and_dudt(model, z, r, t, y, v, cond=cond, return_v=True)
        (adaptive_loss(u, meanflow_target(v, r, t, dudt), 1.0, 1e-2)[0] + v_head.square().mean()).backward()
        results.append((u.detach(), dudt, [p.grad.clone() for p in model.parameters()]))
    (u0, d0, g0), (u1, d1, g1) = results
    assert torch.equal(u0, u1) and torch.equal(d0, d1)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(g0, g1))
