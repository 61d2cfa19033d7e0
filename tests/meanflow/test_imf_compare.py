"""meanflow.imf_compare: the step-cost measurement, the omega sweep's calls and the omega grid."""

import numpy as np
import torch

import meanflow.imf_compare as imf_compare
from meanflow.images import CAPTION_H, GAP, make_grid, to_uint8
from meanflow.models import create_model
from meanflow.sampling import sample
from tests.meanflow.reference_models import randomize_imf


def test_step_costs_time_the_trainers_own_step_per_preset(monkeypatch):
    """Each preset's seconds per step come from its own Trainer.train_step calls on its own batches, warm-up
    excluded, the presets alternating in blocks. A fake CPU clock advances by the cost of the step that runs."""
    cost = {"DiT-Micro/6": 0.5, "DiT-Nano/8": 2.0}  # mnist-demo's model and smoke's
    clock, calls = [0.0], []

    def fake_step(trainer, x, y):
        name = trainer.cfg.model.name
        assert x.shape[0] == trainer.cfg.train.global_batch and y.shape == (x.shape[0],)  # its own batches
        calls.append(name)
        clock[0] += cost[name]

    monkeypatch.setattr(imf_compare.Trainer, "train_step", fake_step)
    monkeypatch.setattr(imf_compare.time, "process_time", lambda: clock[0])
    costs = imf_compare.step_costs(["mnist-demo", "smoke"], warmup=2, steps=4, rounds=2)
    assert costs == {"mnist-demo": 0.5, "smoke": 2.0}
    demo, smoke = "DiT-Micro/6", "DiT-Nano/8"
    assert calls == [demo] * 2 + [smoke] * 2 + ([demo] * 2 + [smoke] * 2) * 2


def test_omega_grid_blocks_differ_by_guidance_alone():
    """Every omega block is the 1-NFE samples of the same noise and labels (rows: classes 0..9) at that omega."""
    torch.manual_seed(0)
    model = randomize_imf(create_model("iMF-Nano/4", input_size=8, in_channels=1, num_classes=10),
                          torch.Generator().manual_seed(1)).eval()
    omegas, per_class = [1.0, 4.0, 1.0], 2
    image = imf_compare.omega_grid(model, omegas, sample_shape=(1, 8, 8), per_class=per_class, interval=(0.2, 0.8),
                                   seed=3)
    noise = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(10).repeat_interleave(per_class)
    blocks = []
    for omega in (1.0, 4.0):
        with torch.no_grad():
            x = sample(model, noise, labels, steps=1, omega=omega, interval=(0.2, 0.8))
        blocks.append(make_grid(to_uint8(x), rows=10))
    h, w = blocks[0].shape[:2]
    assert image.shape == (CAPTION_H + h, 3 * w + 2 * GAP, 1)
    shown = [image[CAPTION_H:, i * (w + GAP): i * (w + GAP) + w] for i in range(3)]
    np.testing.assert_array_equal(shown[0], blocks[0])
    np.testing.assert_array_equal(shown[1], blocks[1])
    np.testing.assert_array_equal(shown[2], blocks[0])
    assert (blocks[0] != blocks[1]).any()  # the guidance reached the model
    assert image[:CAPTION_H].any()  # captions drawn


def test_sweep_evaluates_one_omega_at_a_time(monkeypatch):
    seen = []

    def fake_evaluate(run, **kw):
        seen.append((run, kw["steps"], kw["n"], kw["floor"], kw["omega"], kw["interval"]))
        return {"fid_1nfe": 10.0 * kw["omega"], "accuracy_1nfe": 0.9, "interval": [0.0, 1.0]}

    monkeypatch.setattr(imf_compare, "evaluate_run", fake_evaluate)
    rows = imf_compare.omega_sweep("RUN", [1.0, 2.0], interval=(0.0, 1.0), n=30)
    assert seen == [("RUN", (1,), 30, False, 1.0, (0.0, 1.0)), ("RUN", (1,), 30, False, 2.0, (0.0, 1.0))]
    assert [r["fid_1nfe"] for r in rows] == [10.0, 20.0] and rows[0]["omega"] == 1.0


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    for argv, words in ((["bogus"], "invalid choice"), (["grid"], "--run is required"),
                        (["sweep", "--run", "R", "--omega", "0.5"], "omega"), (["grid", "--run", "R", "--omega", "a"],
                                                                                "--omega")):
        assert imf_compare.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{imf_compare.PROG}: error:") and words in err and err.count("\n") == 1
