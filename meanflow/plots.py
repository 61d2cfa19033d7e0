"""Plots of a run with matplotlib (imported lazily, Agg backend, no display): the loss curve and 2-D scatters.

    python -m meanflow.plots --run runs/mnist-demo [--out FILE.png]     # redraw RUN/loss.png from metrics.jsonl

loss.png: loss (the adaptive-weighted objective, L / sg(L + c)^p with L an item's sum of squared errors) and mse
(the squared error of u against its target per dimension) of every metrics.jsonl line against step, log-scale y:
both are positive and fall over decades. The trainer draws it at every checkpoint and at the end of the run; this
command redraws it for any run folder, a finished one or one a trainer is writing (it reads whole lines only). The
last line of standard output is a JSON object saying what was written.

A 2-D scatter (the trainer's samples.png of an MLP on 2-D data): the data beside each set of samples (1-NFE,
2-NFE), every panel on the same square axes around the data's range (its wider side plus a 10% margin each side),
so a panel's spread compares with the data's at a glance; samples outside it are counted in the panel's title
rather than stretching the axes.

matplotlib is optional (the "plots" extra): without it plot functions raise PlotsUnavailable, which the trainer turns
into one log line and this command into exit 2.
"""

import argparse
import json
import os
import sys

import numpy as np

from meanflow.errors import ConfigError

LOSS_PNG = "loss.png"
LOSS_SIZE = (8.0, 4.5)  # inches at DPI: an 800 x 450 PNG
PANEL_SIZE = 4.0  # inches a side of one scatter panel: (400 n) x 400 pixels for n panels
DPI = 100
MARGIN = 0.1  # of the data's range, on each side of a scatter's axes
COLUMNS = ("loss", "mse")


class PlotsUnavailable(RuntimeError):
    """matplotlib cannot be imported; the message says why and how to install it."""


def _figure(width, height):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global figure registry, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise PlotsUnavailable(f"matplotlib is not importable ({e}): pip install matplotlib, or "
                               "pip install -e '.[plots]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")  # room for titles and labels
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path):
    """Write a figure as PNG atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------------
# the loss curve


def read_metrics(path):
    """The rows of a metrics.jsonl; a line cut short by a crash or a concurrent write is left out."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def loss_figure(rows, title=None):
    """loss and mse against step, log-scale y; rows as read_metrics returns them (at least one)."""
    if not rows:
        raise ValueError("no metrics lines to plot")
    fig = _figure(*LOSS_SIZE)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    for key in COLUMNS:
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key, linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss, mse (log scale)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def plot_loss(metrics_path, out_path):
    """Draw out_path from metrics_path (titled with the run folder's name); False (nothing written) when the file
    holds no complete line yet."""
    rows = read_metrics(metrics_path)
    if not rows:
        return False
    run = os.path.basename(os.path.dirname(os.path.abspath(metrics_path)))
    save_figure(loss_figure(rows, title=f"{run}: steps {rows[0]['step']}-{rows[-1]['step']}"), out_path)
    return True


# ----------------------------------------------------------------------------------------------------------------------
# 2-D scatters


def _points(name, a):
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or len(a) == 0:
        raise ValueError(f"scatter: {name} must be (N, 2) points with N > 0, got shape {a.shape}")
    return a


def scatter_figure(data, panels: dict, title=None):
    """The data (N, 2) and each panel's points (M, 2) (name -> points) side by side on the same square axes limits:
    the data's finite range, its wider side with a MARGIN on each side, centred."""
    data = _points("data", data)
    panels = {name: _points(name, p) for name, p in panels.items()}
    finite = data[np.isfinite(data).all(axis=1)]
    if not len(finite):
        raise ValueError("scatter: the data holds no finite point")
    lo, hi = finite.min(axis=0), finite.max(axis=0)
    half = (0.5 + MARGIN) * max(float((hi - lo).max()), 1e-6)  # square limits: equal aspect fills the panel
    lo, hi = (lo + hi) / 2 - half, (lo + hi) / 2 + half
    fig = _figure(PANEL_SIZE * (1 + len(panels)), PANEL_SIZE)
    axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    for ax, (name, pts) in zip(axes, [("data", data), *panels.items()]):
        outside = int((~((pts >= lo) & (pts <= hi)).all(axis=1)).sum())  # NaN counts as outside
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0, color="C0" if name == "data" else "C1")
        ax.set_title(f"{name} ({len(pts)})" + (f", {outside} outside" if outside else ""), fontsize=10)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal", adjustable="box")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_scatter(path, data, panels: dict, title=None):
    """Write scatter_figure(data, panels, title) as a PNG, (400 (1 + len(panels))) x 400 pixels."""
    save_figure(scatter_figure(data, panels, title), path)


# ----------------------------------------------------------------------------------------------------------------------
# the command line


def _parser():
    p = argparse.ArgumentParser(prog="python -m meanflow.plots", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="run folder written by meanflow.train (reads its metrics.jsonl)")
    p.add_argument("--out", default=None, help=f"output PNG (default RUN/{LOSS_PNG})")
    return p


def _redraw(run, out):
    if not os.path.isdir(run):
        raise ConfigError(f"--run: {run} is not a folder")
    metrics = os.path.join(run, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise ConfigError(f"--run: {run} holds no metrics.jsonl (not a run folder, or no step logged yet)")
    out = out or os.path.join(run, LOSS_PNG)
    if not out.endswith(".png"):
        raise ConfigError(f"--out must end in .png, got {out}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise ConfigError(f"--out {out}: the folder it goes in does not exist")
    if not plot_loss(metrics, out):
        raise ConfigError(f"--run: {metrics} holds no complete line yet: nothing to plot")
    return out


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        out = _redraw(args.run, args.out)
    except (ConfigError, PlotsUnavailable, OSError) as e:
        print(f"meanflow.plots: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": os.path.abspath(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
