"""The pictures of a run: samples.png (1-NFE beside 2-NFE), samples/step_<step>.png every log.sample_every steps,
loss.png (meanflow.plots, also `python -m meanflow.plots`), and the 2-D scatter; that a run without matplotlib still
finishes, saying so once; and that the pictures leave the training losses exactly as they were."""

import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import meanflow.plots as plots
from meanflow.config import ConfigError, resolve_config
from meanflow.distributed import Dist
from meanflow.images import CAPTION_H, GAP, caption, make_grid, panels, to_uint8
from meanflow.models import create_model
from meanflow.sample import load_run
from meanflow.sampling import sample_grid
from meanflow.trainer.pictures import STEP_PER_CLASS, Pictures, picture_kind
from tests.meanflow.cli import cli_env, run
from tests.meanflow.reference_models import randomize_fan_in
from tests.meanflow.test_train import metrics, randomized_cmd, reports

PAD = 2  # make_grid's default padding


def png(path):
    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


def below_caption(image, left, width):
    """The grid of the panel whose left edge is at `left` (a grey PNG reads back as (H, W))."""
    return image[CAPTION_H:, left:left + width]


# ----------------------------------------------------------------------------------------------------------------------
# the panels and the scatter, on random arrays


def test_panels_put_grids_side_by_side_with_a_gap_and_captions():
    g = torch.Generator().manual_seed(1)
    one, two = (make_grid(to_uint8(torch.randn(7, 3, 5, 9, generator=g)), rows=3) for _ in range(2))  # odd sizes
    image = panels([one, two], ["1-NFE", "2-NFE"])
    h, w, _ = one.shape
    assert image.shape == (CAPTION_H + h, 2 * w + GAP, 3)
    np.testing.assert_array_equal(image[CAPTION_H:, :w], one)
    np.testing.assert_array_equal(image[CAPTION_H:, w + GAP:], two)
    assert (image[:, w:w + GAP] == 255).all()  # the gap: white from top to bottom
    assert image[:CAPTION_H, :w].any() and image[:CAPTION_H, w + GAP:].any()  # lit captions
    assert not np.array_equal(image[:CAPTION_H, :w], image[:CAPTION_H, w + GAP:])  # "1-NFE" is not "2-NFE"
    assert not caption("STEP 12345678", 40, 1).any()  # wider than its panel: left blank, never cut
    with pytest.raises(ValueError, match="no glyph for 'x'"):
        caption("x", 40, 1)
    with pytest.raises(ValueError, match="one caption per grid"):
        panels([one, two], ["1-NFE"])


def test_scatter_puts_data_and_samples_on_the_same_square_axes(tmp_path):
    g = np.random.default_rng(3)
    data = g.normal(size=(600, 2)) * [3.0, 0.5] + [1.0, -2.0]
    samples = {"1-NFE": g.normal(size=(500, 2)) * 4, "2-NFE": g.normal(size=(450, 2))}
    fig = plots.scatter_figure(data, samples, title="step 7")
    axes = fig.axes
    assert [ax.get_title().split(" (")[0] for ax in axes] == ["data", "1-NFE", "2-NFE"]
    limits = {(ax.get_xlim(), ax.get_ylim()) for ax in axes}
    assert len(limits) == 1
    (x0, x1), (y0, y1) = limits.pop()
    assert x1 - x0 == pytest.approx(y1 - y0)  # square
    assert x0 < data[:, 0].min() and data[:, 0].max() < x1 and y0 < data[:, 1].min() and data[:, 1].max() < y1
    for ax, pts in zip(axes, [data, *samples.values()]):
        np.testing.assert_array_equal(ax.collections[0].get_offsets(), pts)  # every point drawn, none moved
        outside = int((~((pts[:, 0] >= x0) & (pts[:, 0] <= x1) & (pts[:, 1] >= y0) & (pts[:, 1] <= y1))).sum())
        assert (f", {outside} outside" in ax.get_title()) == (outside > 0), ax.get_title()
    assert "1-NFE (500), " in axes[1].get_title()  # 4x the data's spread: some fall outside
    path = tmp_path / "scatter.png"
    plots.plot_scatter(str(path), data, samples)
    assert png(path).shape[:2] == (400, 1200)
    assert os.listdir(tmp_path) == ["scatter.png"]  # written through a temporary name, none left
    with pytest.raises(ValueError, match=r"1-NFE must be \(N, 2\) points"):
        plots.scatter_figure(data, {"1-NFE": g.normal(size=(5, 3))})


# ----------------------------------------------------------------------------------------------------------------------
# loss.png and python -m meanflow.plots


def write_metrics(path, steps):
    g = np.random.default_rng(5)
    rows = [{"step": s, "loss": float(g.uniform(0.1, 10)), "mse": float(g.uniform(0.01, 1))} for s in steps]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 99, "lo')  # the last line cut short
    return rows


def test_loss_figure_draws_loss_and_mse_on_a_log_scale(tmp_path):
    rows = write_metrics(tmp_path / "metrics.jsonl", [1, 5, 10, 20])
    assert plots.read_metrics(tmp_path / "metrics.jsonl") == rows
    ax = plots.loss_figure(rows).axes[0]
    assert ax.get_yscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["loss", "mse"]
    for key, line in lines.items():
        assert list(line.get_xdata()) == [1, 5, 10, 20] and list(line.get_ydata()) == [r[key] for r in rows]


def test_plots_command_redraws_loss_png(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_metrics(run_dir / "metrics.jsonl", range(1, 30))
    assert plots.main(["--run", str(run_dir)]) == 0
    said = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert said == {"out": str(run_dir / "loss.png")} and png(run_dir / "loss.png").shape[:2] == (450, 800)
    for argv, needle in [(["--run", str(tmp_path)], "holds no metrics.jsonl"),
                         (["--run", str(run_dir), "--out", str(tmp_path / "loss.svg")], "--out must end in .png")]:
        assert plots.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("meanflow.plots: error: ") and needle in err[0], err


def block_matplotlib(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # its import now raises ImportError


def test_without_matplotlib_loss_png_is_skipped_with_one_line(tmp_path, monkeypatch, caplog, capsys):
    block_matplotlib(monkeypatch)
    write_metrics(tmp_path / "metrics.jsonl", [1, 2])
    pictures = Pictures(resolve_config(["--config", "smoke"]), Dist(), str(tmp_path), (1, 32, 32))
    with caplog.at_level(logging.WARNING, logger="meanflow.train"):
        for _ in range(3):  # at each checkpoint and at the end: said once
            pictures.loss_curve()
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("loss.png skipped: matplotlib is not importable"), said
    assert not (tmp_path / "loss.png").exists()
    assert plots.main(["--run", str(tmp_path)]) == 2
    assert "matplotlib is not importable" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# the trainer's pictures of a 2-D run and of latents


class PointLoader:
    """Serves random 2-D points, 64 a batch, as Loader.epoch does."""

    def __init__(self):
        self.points = torch.randn(1000, 2, generator=torch.Generator().manual_seed(9)) * torch.tensor([2.0, 0.5])

    def epoch(self, epoch, start_step=0):
        for i in range(0, len(self.points), 64):
            yield self.points[i:i + 64], torch.zeros(64, dtype=torch.long)


def test_a_2d_run_draws_scatters_of_the_data_beside_its_samples(tmp_path):
    cfg = resolve_config(["--config", "smoke", "--model.name=MLP", "--model.in_channels=2", "--model.num_classes=0",
                          "--train.samples_at_end=300", "--log.sample_every=2"])
    pictures = Pictures(cfg, Dist(), str(tmp_path), (2,))
    assert pictures.kind == "points"
    loader = PointLoader()
    pictures.collect_data(loader)
    np.testing.assert_array_equal(pictures.data, loader.points[:300].numpy())
    model = randomize_fan_in(create_model("MLP", **cfg.model.build_kwargs()), torch.Generator().manual_seed(2))
    model.train()
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append((m.training, torch.is_grad_enabled())))
    pictures.at_step(model, 3)  # not due
    assert calls == []
    pictures.at_step(model, 4)
    assert set(calls) == {(False, False)} and model.training  # sampled in eval mode without grad, then train mode
    assert os.listdir(tmp_path / "samples") == ["step_4.png"]
    assert png(tmp_path / "samples" / "step_4.png").shape[:2] == (400, 800)  # data | 1-NFE
    pictures.at_end(model)
    assert png(tmp_path / "samples.png").shape[:2] == (400, 1200)  # data | 1-NFE | 2-NFE
    with np.load(tmp_path / "samples.npz") as z:
        assert sorted(z) == ["data", "samples", "samples_2nfe"]
        assert z["samples"].shape == z["samples_2nfe"].shape == (300, 2)
        np.testing.assert_array_equal(z["data"], pictures.data)
        assert np.abs(z["samples"] - z["samples_2nfe"]).max() > 1e-3  # two steps are not one


def test_latents_write_no_png_and_refuse_sample_every(tmp_path, caplog):
    cfg = resolve_config(["--config", "smoke", "--model.in_channels=4", "--model.input_size=16",
                          "--train.samples_at_end=1", "--log.sample_every=0"])
    assert picture_kind(cfg.model, (4, 16, 16)) is None and picture_kind(cfg.model, (3, 16, 16)) == "images"
    pictures = Pictures(cfg, Dist(), str(tmp_path), (4, 16, 16))
    pictures.check()  # log.sample_every is 0
    model = create_model(cfg.model.name, **cfg.model.build_kwargs())
    with caplog.at_level(logging.WARNING, logger="meanflow.train"):
        pictures.at_end(model)
    assert sorted(os.listdir(tmp_path)) == ["samples.npz"]
    assert "samples.png skipped: DiT-Nano/8 makes 4-channel arrays" in caplog.text
    cfg.log.sample_every = 5
    with pytest.raises(ConfigError, match="log.sample_every: .* 4-channel arrays"):
        Pictures(cfg, Dist(), str(tmp_path), (4, 16, 16)).check()


# ----------------------------------------------------------------------------------------------------------------------
# the smoke run


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def pictured_run(env, tmp_path_factory):
    """The smoke run (6 steps, 10 classes, 2 samples a class at the end) from random weights, a grid every 2 steps."""
    out = str(tmp_path_factory.mktemp("runs") / "pictured")
    reports(run(randomized_cmd(1, f"--train.out={out}", "--log.sample_every=2"), env), 1)
    return out


@pytest.fixture(scope="module")
def plain_run(env, tmp_path_factory):
    """The same run with no step grids and matplotlib unimportable (a package of that name that raises)."""
    blocker = tmp_path_factory.mktemp("blocker")
    (blocker / "matplotlib").mkdir()
    (blocker / "matplotlib" / "__init__.py").write_text('raise ImportError("blocked by the test")\n')
    out = str(tmp_path_factory.mktemp("runs") / "plain")
    e = dict(env, PYTHONPATH=str(blocker) + os.pathsep + env["PYTHONPATH"])
    p = run(randomized_cmd(1, f"--train.out={out}", "--log.sample_every=0"), e)
    reports(p, 1)
    return out, p


def test_smoke_run_writes_1nfe_beside_2nfe_step_grids_and_loss_png(pictured_run):
    rows, per_class, side = 10, 2, 32  # the smoke preset: 10 classes, samples_at_end 2, 32x32 digits
    image = png(os.path.join(pictured_run, "samples.png"))
    panel = per_class * (side + PAD) + PAD
    assert image.shape == (CAPTION_H + rows * (side + PAD) + PAD, 2 * panel + GAP)
    with np.load(os.path.join(pictured_run, "samples.npz")) as z:
        one, two = z["samples"], z["samples_2nfe"]
        assert one.shape == two.shape == (rows * per_class, 1, side, side)
        assert list(z["labels"]) == [c for c in range(rows) for _ in range(per_class)]
    for left, x in [(0, one), (panel + GAP, two)]:  # each panel is its own samples, to the grey level
        np.testing.assert_array_equal(below_caption(image, left, panel), make_grid(to_uint8(torch.from_numpy(x)),
                                                                                    rows)[..., 0])
    assert (image[:, panel:panel + GAP] == 255).all()
    assert np.abs(one - two).mean() > 1e-3  # the 2-NFE panel is not the 1-NFE one

    assert sorted(os.listdir(os.path.join(pictured_run, "samples"))) == ["step_2.png", "step_4.png", "step_6.png"]
    grids = {s: png(os.path.join(pictured_run, "samples", f"step_{s}.png")) for s in (2, 4, 6)}
    step_panel = STEP_PER_CLASS * (side + PAD) + PAD
    for grid in grids.values():
        assert grid.shape == (CAPTION_H + rows * (side + PAD) + PAD, step_panel)
    assert not np.array_equal(grids[2][CAPTION_H:], grids[6][CAPTION_H:])  # the EMA moved between them
    # step 6 is the end: its grid is the final EMA's 1-NFE samples of the sampler's noise (seed train.seed)
    cfg, model, _, step = load_run(pictured_run)
    x, _, grid_rows = sample_grid(model, rows * STEP_PER_CLASS, num_classes=10, sample_shape=(1, side, side),
                                  seed=cfg.train.seed)
    again = make_grid(to_uint8(x), grid_rows)[..., 0].astype(int)
    assert step == 6 and np.abs(below_caption(grids[6], 0, step_panel) - again).max() <= 1  # rounding at .5 only

    assert png(os.path.join(pictured_run, "loss.png")).shape[:2] == (450, 800)


def test_two_processes_sample_the_sharded_ema_together(env, pictured_run, tmp_path):
    """Under FSDP every rank samples the sharded EMA and rank 0 writes: the step-2 grid is the one-process run's, and
    the EMA update of step 3 (no checkpoint between) meets its shards again (FSDP2 keeps a root gathered after a
    forward with no backward: the update then failed on a size mismatch)."""
    out = str(tmp_path / "two")
    reports(run(randomized_cmd(2, f"--train.out={out}", "--train.steps=3", "--checkpoint.every=3",
                               "--log.sample_every=2"), env), 2)
    assert os.listdir(os.path.join(out, "samples")) == ["step_2.png"]
    two, one = (png(os.path.join(folder, "samples", "step_2.png")).astype(int) for folder in (out, pictured_run))
    assert two.shape == one.shape and np.abs(two - one).max() <= 1  # another summation order: a grey level at most
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]


def test_sample_grids_leave_the_training_losses_identical(pictured_run, plain_run):
    with_grids, without = metrics(pictured_run), metrics(plain_run[0])
    assert [m["step"] for m in with_grids] == [m["step"] for m in without] == list(range(1, 7))
    for a, b in zip(with_grids, without):
        assert (a["loss"], a["mse"], a["grad_norm"]) == (b["loss"], b["mse"], b["grad_norm"]), a["step"]
    assert not os.path.exists(os.path.join(plain_run[0], "samples"))


def test_without_matplotlib_the_run_finishes_and_says_so_once(plain_run):
    out, p = plain_run
    said = [line for line in p.stderr.splitlines() if "loss.png" in line]
    assert len(said) == 1 and "loss.png skipped: matplotlib is not importable" in said[0], p.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "loss.png"))
    assert os.path.isfile(os.path.join(out, "samples.png"))  # the image grid needs no matplotlib
