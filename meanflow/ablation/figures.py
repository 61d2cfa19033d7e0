"""The doc's figures: a bar chart per ablation (ours beside the paper's), sample grids per setting, scatter plots of
the 2-D toys. matplotlib (Agg) is imported only here and only when drawing, so the rest of the package and the
tests that need no figures run without it.

Sample grids come from the run folder's samples.npz (the trainer's 1-NFE grid of the EMA model: one row per class,
seed train.seed); other step counts are drawn here from the newest checkpoint with the same noise and labels
(meanflow.sampling.sample_grid with the trainer's n and seed), so grids of one run differ only in the sampler.
"""

import math
import os

import numpy as np
import torch

from meanflow.images import make_grid, to_uint8, write_png


class FiguresUnavailable(RuntimeError):
    """matplotlib is missing."""


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise FiguresUnavailable("the figures need matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def ablation_chart(path, title, rows):
    """Two panels over the same settings: our FID at each row's NFE (and at 2 NFE) and the paper's 1-NFE FID.

    Apart, not on one axis: MNIST and ImageNet FIDs share no scale, only the order of the bars matters."""
    plt = pyplot()
    labels = [r.label for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(7.0, 1.6 * len(rows) + 3), 3.6))
    ours = [r.fid if r.fid is not None and math.isfinite(r.fid) else 0.0 for r in rows]
    twos = [r.fid2 if r.fid2 is not None and r.nfe == 1 else 0.0 for r in rows]
    one = "1-NFE" if all(r.nfe == 1 for r in rows) else "at the row's step count"
    ax1.bar(x - 0.2, ours, 0.4, label=one, color="tab:blue")
    if any(twos):
        ax1.bar(x + 0.2, twos, 0.4, label="2-NFE", color="tab:cyan")
    for i, r in enumerate(rows):
        if r.status != "done" or r.fid is None:
            ax1.text(i, 0, "diverged" if r.status == "diverged" else "n/a", ha="center", va="bottom", fontsize=8,
                     rotation=90)
    ax1.set_title("ours (MNIST, FID)")
    ax1.legend(fontsize=7)
    ax2.bar(x, [r.paper or 0.0 for r in rows], 0.5, color="tab:gray")
    for i, r in enumerate(rows):
        if r.paper is None:
            ax2.text(i, 0, "no number", ha="center", va="bottom", fontsize=8, rotation=90)
    ax2.set_title("paper (ImageNet 256, DiT-B/4, 1-NFE FID)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rows_of(n) -> int:
    """The trainer's grid has one row per class (10 for MNIST); otherwise a square."""
    return 10 if n % 10 == 0 else max(1, round(n ** 0.5))


def samples_png(path, samples):
    """samples (B, C, H, W) in the data range -> a PNG grid, one row per class."""
    x = torch.as_tensor(np.asarray(samples, dtype=np.float32))
    write_png(path, make_grid(to_uint8(x), rows_of(x.shape[0])))


def run_samples(run_dir, steps):
    """The run's 1-NFE grid (samples.npz), or for other step counts the same grid drawn at `steps`; None if the run
    has no samples (diverged, or samples_at_end = 0)."""
    npz = os.path.join(run_dir, "samples.npz")
    if not os.path.exists(npz):
        return None
    with np.load(npz) as z:
        grid = z["samples"]
    if not np.isfinite(grid).all():
        return None
    if steps == 1:
        return grid
    from meanflow.sample import load_run
    from meanflow.sampling import sample_grid

    cfg, model, _, _ = load_run(run_dir, verify=False)
    x, _, _ = sample_grid(model, grid.shape[0], num_classes=cfg.model.num_classes, sample_shape=grid.shape[1:],
                          seed=cfg.train.seed, steps=steps)
    return x.numpy() if bool(torch.isfinite(x).all()) else None


def toy_scatter(path, title, panels):
    """panels: [(caption, points (N, 2) or None)] side by side, on shared axes limits."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.8), squeeze=False)
    finite = [p for _, p in panels if p is not None and np.isfinite(p).all()]
    lim = max([3.0] + [float(np.quantile(np.abs(p), 0.99)) * 1.1 for p in finite])
    for ax, (caption, points) in zip(axes[0], panels):
        if points is None or not np.isfinite(points).all():
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def toy_samples(run_dir, steps, n, seed=0):
    """n points of a toy run's EMA model at `steps`, from seeded noise (the same for every run and step count)."""
    from meanflow.sample import load_run
    from meanflow.sampling import sample

    cfg, model, _, _ = load_run(run_dir, verify=False)
    noise = torch.randn(n, cfg.model.in_channels, generator=torch.Generator().manual_seed(seed))
    return sample(model, noise, None, steps=steps).float().numpy()
