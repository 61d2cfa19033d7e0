"""The learning-rate schedule (meanflow.trainer.optim.lr_at) and the optimizer's update against their formulas
written out."""

import math

import pytest
import torch

from meanflow.trainer.optim import OptimConfig, build_optimizer, lr_at


def test_constant_schedule_warms_up_linearly_then_holds():
    cfg = OptimConfig(lr=2e-3, warmup_steps=4)
    assert [lr_at(cfg, k, 100) for k in range(6)] == pytest.approx([5e-4, 1e-3, 1.5e-3, 2e-3, 2e-3, 2e-3])
    assert lr_at(OptimConfig(lr=3e-4), 0, 10) == 3e-4


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_schedule_decays_from_the_end_of_warmup_to_the_final_ratio(final):
    lr, warm, total = 1e-3, 10, 111
    cfg = OptimConfig(lr=lr, warmup_steps=warm, schedule="cosine", final_lr_ratio=final)
    values = [lr_at(cfg, k, total) for k in range(total)]
    assert values[0] == pytest.approx(lr / warm)  # still warming up: the cosine factor is 1 there
    assert values[warm] == pytest.approx(lr)
    assert values[-1] == pytest.approx(final * lr)
    mid = warm + (total - 1 - warm) // 2  # q = 1/2 exactly
    assert values[mid] == pytest.approx(lr * (final + (1 - final) / 2))
    k = warm + 17
    q = (k - warm) / (total - 1 - warm)
    assert values[k] == pytest.approx(lr * (final + (1 - final) * (1 + math.cos(math.pi * q)) / 2))
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))
    assert lr_at(cfg, total + 5, total) == pytest.approx(final * lr)  # beyond the last step: held at the final rate


@pytest.mark.parametrize("key,value", [("schedule", "linear"), ("final_lr_ratio", 1.5), ("final_lr_ratio", -0.1)])
def test_bad_schedule_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"optim.{key}"):
        OptimConfig(**{key: value}).validate()


def test_the_cpu_optimizer_is_fused_and_takes_adamws_update_written_out():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    cfg = OptimConfig(lr=2e-3, beta1=0.8, beta2=0.95, weight_decay=0.1)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["fused"]
    params = [p.detach().double().clone() for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for k in range(1, 4):  # AdamW (Loshchilov & Hutter) in float64: decoupled decay, bias-corrected moments
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.float()
        opt.step()
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = cfg.beta1 * m[i] + (1 - cfg.beta1) * g
            v[i] = cfg.beta2 * v[i] + (1 - cfg.beta2) * g * g
            p.mul_(1 - cfg.lr * cfg.weight_decay)
            p.sub_(cfg.lr * (m[i] / (1 - cfg.beta1**k)) / ((v[i] / (1 - cfg.beta2**k)).sqrt() + 1e-8))
        for got, want in zip(model.parameters(), params):
            torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-7)
