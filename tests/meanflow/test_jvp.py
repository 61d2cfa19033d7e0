"""The dual engine against the torch.func.jvp oracle: values, tangents, gradients, finite differences, memory."""

import pytest
import torch

from bench.common import saved_activation_bytes  # the meter the benchmarks report, so both agree
from meanflow.jvp import u_and_dudt
from meanflow.objective import adaptive_loss, meanflow_target
from tests.meanflow.reference_models import random_inputs, small_model

KINDS = ["dit", "dit_uncond", "mlp", "dit_x", "mlp_x", "dit_conv", "dit_x_tanh", "mlp_x_tanh", "dit_skips",
         "dit_canvas", "dit_canvas_odd", "dit_canvas_x"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("kind", KINDS + ["dit_t1000"])
@pytest.mark.parametrize("tangents", [(0.0, 1.0), (0.0, 0.0), (1.0, 0.0)])
def test_dual_matches_func_float64(kind, tangents, seed):
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    kw = dict(tangent_r=tangents[0], tangent_t=tangents[1])
    u_d, du_d = u_and_dudt(model, z, r, t, y, v, engine="dual", **kw)
    u_f, du_f = u_and_dudt(model, z, r, t, y, v, engine="func", **kw)
    assert du_d.abs().max() > 1e-3  # a zero tangent would agree trivially
    assert rel_err(u_d, u_f) <= 1e-10
    assert rel_err(du_d, du_f) <= 1e-10


@pytest.mark.parametrize("kind", KINDS + ["dit_t1000"])
def test_loss_gradients_match_func_float64(kind, seed):
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    grads = {}
    for engine in ("dual", "func"):
        model.zero_grad(set_to_none=True)
        u, dudt = u_and_dudt(model, z, r, t, y, v, engine=engine)
        loss, _ = adaptive_loss(u, meanflow_target(v, r, t, dudt), p=1.0, c=1e-3)
        loss.backward()
        grads[engine] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["dual"].keys() == grads["func"].keys() and len(grads["dual"]) > 0
    for name, g in grads["func"].items():
        err = ((grads["dual"][name] - g).norm() / g.norm().clamp_min(1e-300)).item()
        assert err <= 1e-9, f"{name}: relative gradient error {err:.3e}"


@pytest.mark.parametrize("kind", KINDS)
def test_dual_matches_func_float32(kind, seed):
    model64 = small_model(kind)
    model32 = small_model(kind, torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    # Round the inputs to float32 first: the reference then sees the same inputs, and the comparison measures the
    # engines' float32 arithmetic rather than the rounding of the inputs.
    args32 = [a.float() if a is not None and a.is_floating_point() else a for a in random_inputs(model64)]
    z, r, t, y, v = [a.double() if a is not None and a.is_floating_point() else a for a in args32]
    _, du_ref = u_and_dudt(model64, z, r, t, y, v, engine="func")
    u_ref = model64(z, r, t, y)
    for engine in ("dual", "func"):
        u, du = u_and_dudt(model32, *args32, engine=engine)
        assert rel_err(u.double(), u_ref) <= 1e-5, engine
        assert rel_err(du.double(), du_ref) <= 1e-4, engine


@pytest.mark.parametrize("kind", KINDS)
def test_dudt_matches_finite_difference(kind, seed):
    model = small_model(kind)
    z, r, t, y, v = random_inputs(model)
    _, dudt = u_and_dudt(model, z, r, t, y, v, engine="dual")
    # Fourth-order central stencil: truncation error O(h^4) leaves room below the 1e-6 bound at h = 1e-5.
    h = 1e-5

    def u_at(step):
        return model(z + step * v, r, t + step, y)

    with torch.no_grad():
        fd = (-u_at(2 * h) + 8 * u_at(h) - 8 * u_at(-h) + u_at(-2 * h)) / (12 * h)
    assert rel_err(dudt, fd) <= 1e-6


def test_tangent_is_detached_and_builds_no_graph(seed):
    model = small_model("dit")
    z, r, t, y, v = random_inputs(model)
    u, dudt = u_and_dudt(model, z, r, t, y, v, engine="dual")
    assert u.requires_grad and u.grad_fn is not None
    assert not dudt.requires_grad and dudt.grad_fn is None


def test_dual_saves_far_less_for_backward_than_func(seed):
    from meanflow.models import create_model
    from tests.meanflow.reference_models import randomize

    model = randomize(create_model("DiT-Nano/2", input_size=8, in_channels=4, num_classes=10, hidden_size=64))
    model = model.float()
    z, r, t, y, v = (a.float() if a is not None and a.is_floating_point() else a for a in random_inputs(model, 8))

    def step(engine):
        def run():
            u, dudt = u_and_dudt(model, z, r, t, y, v, engine=engine)
            adaptive_loss(u, meanflow_target(v, r, t, dudt), 1.0, 1e-3)[0].backward()
        return run

    params = list(model.parameters())
    dual, func = saved_activation_bytes(step("dual"), params), saved_activation_bytes(step("func"), params)
    print(f"autograd-saved bytes: dual {dual / 2**20:.2f} MiB, func {func / 2**20:.2f} MiB, ratio {dual / func:.2f}")
    assert dual < 0.6 * func


def test_activation_checkpointing_changes_nothing(seed):
    model = small_model("dit")
    z, r, t, y, v = random_inputs(model)
    results = []
    for flag in (False, True):
        model.checkpoint_blocks = flag
        model.zero_grad(set_to_none=True)
        u, dudt = u_and_dudt(model, z, r, t, y, v, engine="dual")
        adaptive_loss(u, meanflow_target(v, r, t, dudt), 1.0, 1e-3)[0].backward()
        results.append((u.detach(), dudt, [p.grad.clone() for p in model.parameters()]))
    (u0, d0, g0), (u1, d1, g1) = results
    assert torch.equal(u0, u1) and torch.equal(d0, d1)
    assert all(torch.allclose(a, b, rtol=1e-12, atol=1e-15) for a, b in zip(g0, g1))


@pytest.mark.parametrize("kind", ["dit_x", "mlp_x", "dit_x_tanh"])
def test_dual_matches_func_where_the_image_division_is_clipped(kind, seed):
    """Rows with t below T_MIN divide by the constant T_MIN: their d tau is 0 in both engines."""
    from meanflow.models.prediction import T_MIN

    model = small_model(kind)
    z, r, t, y, v = random_inputs(model, batch=4)
    t = torch.tensor([0.5 * T_MIN, 0.9 * T_MIN, 2 * T_MIN, 0.6], dtype=torch.float64)
    r = t * torch.rand(4, dtype=torch.float64)
    u_d, du_d = u_and_dudt(model, z, r, t, y, v, engine="dual")
    u_f, du_f = u_and_dudt(model, z, r, t, y, v, engine="func")
    assert du_d.abs().max() > 1e-3
    assert rel_err(u_d, u_f) <= 1e-10 and rel_err(du_d, du_f) <= 1e-10
