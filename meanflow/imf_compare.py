"""Improved MeanFlow against the MeanFlow demo on the embedded MNIST (docs/imf.md, "Results"): what one training step
costs, which sampling guidance reads best at 1 NFE, and a grid of samples across the guidance scale omega.

    python -m meanflow.imf_compare cost  [--presets mnist-demo,mnist-imf] [--warmup 5] [--steps 30] [--rounds 3]
    python -m meanflow.imf_compare sweep --run RUN [--omega 1,2,4,8] [--interval 0,1] [--n 300]
    python -m meanflow.imf_compare grid  --run RUN [--omega 1,2,4,8] [--per-class 6] [--out docs/imf/omega-grid.png]

The comparison itself is the ordinary commands: `python -m meanflow.train --config mnist-imf` (its train.steps set
from `cost` so that its training costs the demo's 1500 steps of CPU time) and `python -m meanflow.evaluate --run RUN
--steps 1 --n 1000` on both runs.

cost: the CPU time (time.process_time, this process only: set OMP_NUM_THREADS=1 for one thread) of the trainer's
own step (meanflow.trainer.loop.Trainer.train_step: draw, loss, backward, clip, AdamW, EMA) per preset on its own
batches, after `warmup` untimed steps; `rounds` alternate the presets in blocks of steps // rounds so that a load
change on a shared machine falls on both. Each preset trains in a throwaway run folder. The last line is JSON:
{preset: seconds per step} and the ratio of the second preset to the first.

sweep: meanflow.evaluate's 1-NFE FID and class accuracy of one run for each omega (n samples, no real-vs-real
floor), one JSON line per omega and a last line with all of them.

grid: 1-NFE samples of one iMF run, one row per class 0-9 and one block of `per-class` columns per omega, every
block from the same noise and labels: what changes from block to block is the guidance alone.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch

from meanflow.config import ConfigError, resolve_config
from meanflow.distributed import init_distributed
from meanflow.evaluate import evaluate_run
from meanflow.images import make_grid, panels, to_uint8, write_png
from meanflow.sample import load_run
from meanflow.sampling import check_guidance, sample
from meanflow.trainer.loop import Trainer

PROG = "meanflow.imf_compare"


# ----------------------------------------------------------------------------------------------------------------------
# cost: CPU seconds per training step


def _trainer(preset, out):
    """A set-up Trainer for a preset, writing into `out`, with an endless iterator of its batches."""
    trainer = Trainer(resolve_config(["--config", preset, f"--train.out={out}", "--train.samples_at_end=0"]),
                      init_distributed())
    trainer.setup()

    def batches():
        epoch = 0
        while True:
            for x, y in trainer.loader.epoch(epoch):
                yield x, (y if trainer.cfg.model.num_classes > 0 else None)
            epoch += 1

    return trainer, batches()


def _steps(trainer, batches, k):
    """CPU seconds of k training steps."""
    start = time.process_time()
    for _ in range(k):
        trainer.train_step(*next(batches))
        trainer.step += 1
    return time.process_time() - start


def step_costs(presets, warmup=5, steps=30, rounds=3):
    """{preset: CPU seconds per training step}, the presets measured in alternating blocks (module docstring)."""
    per_round = max(1, steps // rounds)
    spent = {p: 0.0 for p in presets}
    with tempfile.TemporaryDirectory(prefix="imf-cost-") as tmp:
        runs = {p: _trainer(p, os.path.join(tmp, p.replace("/", "_"))) for p in presets}
        try:
            for p, (trainer, batches) in runs.items():
                _steps(trainer, batches, warmup)
            for _ in range(rounds):
                for p, (trainer, batches) in runs.items():
                    spent[p] += _steps(trainer, batches, per_round)
        finally:
            for trainer, _ in runs.values():
                trainer.loader.close()
                trainer.run_lock.release()
    return {p: spent[p] / (per_round * rounds) for p in presets}


# ----------------------------------------------------------------------------------------------------------------------
# sweep: 1-NFE quality per omega


def omega_sweep(run, omegas, interval=None, n=300):
    """[{omega, interval, fid_1nfe, accuracy_1nfe}] of a run, one evaluate per omega (no floor, paired noise)."""
    rows = []
    for omega in omegas:
        m = evaluate_run(run, steps=(1,), n=n, floor=False, progress=False, omega=omega, interval=interval)
        rows.append({"omega": omega, "interval": m.get("interval"), "fid_1nfe": m["fid_1nfe"],
                     "accuracy_1nfe": m.get("accuracy_1nfe")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# grid: samples across omega from the same noise


def omega_grid(model, omegas, *, sample_shape, num_classes=10, per_class=6, interval=None, seed=0):
    """One (H, W, C) uint8 image: a captioned block per omega, rows = classes, the same noise in every block."""
    n = num_classes * per_class
    noise = torch.randn(n, *sample_shape, generator=torch.Generator().manual_seed(seed))  # (n, C, H, W)
    labels = torch.arange(num_classes).repeat_interleave(per_class)  # (n,) row c: class c
    grids = []
    with torch.no_grad():
        for omega in omegas:
            x = sample(model, noise, labels, steps=1, omega=omega, interval=interval)
            grids.append(make_grid(to_uint8(x), rows=num_classes))
    return panels(grids, [f"OMEGA {omega:g}" for omega in omegas])


# ----------------------------------------------------------------------------------------------------------------------
# command line


def _floats(text, name):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every meanflow command, instead of usage + message
        raise ConfigError(message)


def _parser():
    p = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("cost", "sweep", "grid"))
    p.add_argument("--presets", default="mnist-demo,mnist-imf", help="cost: the presets, comma-separated")
    p.add_argument("--warmup", type=int, default=5, help="cost: untimed steps per preset")
    p.add_argument("--steps", type=int, default=30, help="cost: timed steps per preset")
    p.add_argument("--rounds", type=int, default=3, help="cost: alternating blocks the timed steps are split into")
    p.add_argument("--run", help="sweep, grid: an iMF run folder")
    p.add_argument("--omega", default="1,2,4,8", help="sweep, grid: guidance scales, comma-separated")
    p.add_argument("--interval", default=None, help="sweep, grid: T_MIN,T_MAX (default: the run's)")
    p.add_argument("--n", type=int, default=300, help="sweep: samples per omega")
    p.add_argument("--per-class", type=int, default=6, help="grid: samples per class in each omega block")
    p.add_argument("--seed", type=int, default=0, help="grid: the noise seed")
    p.add_argument("--out", default="docs/imf/omega-grid.png", help="grid: the PNG written")
    return p


def main(argv=None) -> int:
    try:
        a = _parser().parse_args(argv)
        if a.command == "cost":
            presets = a.presets.split(",")
            costs = step_costs(presets, a.warmup, a.steps, a.rounds)
            ratio = costs[presets[-1]] / costs[presets[0]]
            print(json.dumps({"cpu_s_per_step": costs, "ratio": ratio, "threads": torch.get_num_threads()}))
            return 0
        if a.run is None:
            raise ConfigError(f"--run is required for {a.command}")
        omegas = _floats(a.omega, "--omega")
        interval = None if a.interval is None else tuple(_floats(a.interval, "--interval"))
        check_guidance(min(omegas), interval)
        if a.command == "sweep":
            print(json.dumps({"run": a.run, "n": a.n, "sweep": omega_sweep(a.run, omegas, interval, a.n)}))
            return 0
        cfg, model, _, step = load_run(a.run, prog=PROG)
        if interval is None:
            interval = (cfg.objective.imf_sample_t_min, cfg.objective.imf_sample_t_max)
        shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        image = omega_grid(model, omegas, sample_shape=shape, num_classes=cfg.model.num_classes,
                           per_class=a.per_class, interval=interval, seed=a.seed)
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        write_png(a.out, image)
        print(json.dumps({"out": a.out, "run": a.run, "step": step, "omega": omegas, "interval": list(interval)}))
        return 0
    except (ConfigError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
