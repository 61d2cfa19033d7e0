"""What the trainer draws: samples at the end of the run, a sample grid every log.sample_every steps, the loss curve.

    <train.out>/samples.png          the EMA model's 1-NFE samples beside its 2-NFE samples of the same noise and
                                     labels (meanflow.images.panels: one row per class, captioned, GAP white pixels
                                     apart); on 2-D data a scatter of the data beside both (meanflow.plots)
    <train.out>/samples.npz          samples (1-NFE), samples_2nfe, labels (conditional runs), data (2-D runs)
    <train.out>/samples/step_N.png   every log.sample_every steps: the EMA model's 1-NFE samples, STEP_PER_CLASS per
                                     class (on 2-D data a scatter beside the data), from the same noise every time
    <train.out>/loss.png             loss and mse against step (meanflow.plots), at every checkpoint and the end

An Improved MeanFlow run (objective.kind "imf") samples with its stored guidance, objective.imf_sample_omega and
[imf_sample_t_min, imf_sample_t_max] (meanflow.sampling.default_guidance), as meanflow.sample does by default.

Sampling goes through meanflow.sampling.sample_grid: its noise comes from a generator of its own seeded with
train.seed, so the pictures never draw from the training randomness (every step's noise and times come from
(train.seed, step) generators anyway) and a step grid shows the same noise each time, so grids compare across steps.
The EMA module may be sharded (FSDP): every rank samples, rank 0 writes (Dist.run_on_main, so a failed write stops
every rank alike). A step grid's time counts into the next metrics line's step_time_s, as a checkpoint's does: it is
one forward of 40 samples (10 classes), against 250 steps of 64 items' forward, tangent and backward in mnist-demo.
Samples that are neither 1- nor 3-channel images nor 2-D points (latents) go to samples.npz only; log.sample_every
on such a run is refused at setup.
"""

import logging
import os
from contextlib import contextmanager

import torch

from meanflow.errors import ConfigError
from meanflow.images import make_grid, panels, save_arrays, to_uint8, write_png
from meanflow.plots import LOSS_PNG, PlotsUnavailable, plot_loss, plot_scatter
from meanflow.sampling import default_guidance, grid_classes, sample_grid
from meanflow.trainer.run_folder import METRICS

log = logging.getLogger("meanflow.train")

SAMPLES_DIR = "samples"  # the step grids' folder in the run folder
STEP_PER_CLASS = 4  # samples per class (row) of a step grid; an unconditional grid is STEP_PER_CLASS^2
SCATTER_POINTS = 2000  # points of a 2-D scatter when train.samples_at_end is 0 (else samples_at_end a class)


def picture_kind(model_cfg, item_shape):
    """"images" (1- or 3-channel (C, H, W) items), "points" (an MLP on 2-D vectors) or None (nothing to draw)."""
    item_shape = tuple(item_shape)
    if model_cfg.name == "MLP" and item_shape == (2,):
        return "points"
    if len(item_shape) == 3 and item_shape[0] in (1, 3):
        return "images"
    return None


def reshard(module):
    """Shard every FSDP2 module of `module` again. FSDP2 leaves the root module's parameters gathered after a forward
    (the backward that follows in training needs them at once); after sampling no backward comes, so the EMA's root
    parameters would stay whole, and the next EMA update would meet the model's shards (a size error)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextmanager
def sampling_mode(module):
    """no_grad and eval mode for sampling; after, the module's own mode again and its FSDP shards resharded."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)
        reshard(module)


class Pictures:
    """The trainer's pictures of one run; every method is called on every rank, only rank 0 writes."""

    def __init__(self, cfg, dist, run_dir, item_shape):
        self.cfg, self.d, self.run_dir = cfg, dist, run_dir
        self.item_shape = tuple(item_shape)
        self.kind = picture_kind(cfg.model, self.item_shape)
        self.classes = grid_classes(cfg.model.num_classes)
        self.end_n = max(1, len(self.classes)) * cfg.train.samples_at_end  # samples drawn at the end
        self.scatter_n = self.end_n if self.end_n > 0 else SCATTER_POINTS  # data points and samples of a scatter
        self.data = None  # (scatter_n, 2) data points of a 2-D run, on rank 0
        self._silenced = set()  # pictures already reported as skipped: one line each per run

    def check(self):
        """Before the run folder is touched: log.sample_every needs samples that can be drawn."""
        if self.cfg.log.sample_every > 0 and self.kind is None:
            raise ConfigError(f"log.sample_every: this run's {self.cfg.model.name} makes {self._what()}, which "
                              "cannot be drawn (images need 1 or 3 channels, scatters 2-D points): set "
                              "--log.sample_every=0")

    def _what(self):
        shape = self.item_shape
        return f"vectors of {shape[0]} values" if len(shape) == 1 else f"{shape[0]}-channel arrays {shape}"

    def collect_data(self, loader):
        """Rank 0 of a 2-D run keeps scatter_n of its items (the start of its share of epoch 0, fewer if the epoch
        is shorter) to draw beside the samples; called before training reads the loader (a reader serves one epoch at
        a time)."""
        wanted = self.cfg.train.samples_at_end > 0 or self.cfg.log.sample_every > 0
        if self.kind != "points" or not wanted or not self.d.is_main:
            return
        got, count = [], 0
        epoch = loader.epoch(0)
        try:
            for x, _ in epoch:
                got.append(x.reshape(len(x), -1).float().cpu())  # (B, 2)
                count += len(x)
                if count >= self.scatter_n:
                    break
        finally:
            if hasattr(epoch, "close"):  # a generator: end the reader's epoch now
                epoch.close()
        self.data = torch.cat(got)[:self.scatter_n].numpy()

    def _draw(self, module, n, steps):
        guidance = default_guidance(self.cfg.objective) if getattr(module, "is_imf", False) else {}
        with sampling_mode(module):
            return sample_grid(module, n, num_classes=self.cfg.model.num_classes, sample_shape=self.item_shape,
                               seed=self.cfg.train.seed, steps=steps, device=self.d.device, **guidance)

    def _skipped(self, what, why):
        if what not in self._silenced:
            self._silenced.add(what)
            log.warning("%s skipped: %s", what, why)

    # ------------------------------------------------------------------------------------------------------------------
    # every log.sample_every steps

    def due(self, step):
        every = self.cfg.log.sample_every
        return every > 0 and step % every == 0

    def at_step(self, module, step):
        """samples/step_<step>.png when the step is due (every rank samples: the model may be sharded)."""
        if not self.due(step):
            return
        if self.kind == "points":
            n = self.scatter_n
        else:
            n = len(self.classes) * STEP_PER_CLASS if self.classes else STEP_PER_CLASS**2
        x, _, rows = self._draw(module, n, 1)
        self.d.run_on_main(self._write_step, x, rows, step)

    def _write_step(self, x, rows, step):
        folder = os.path.join(self.run_dir, SAMPLES_DIR)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step}.png")
        if self.kind == "images":
            write_png(path, panels([make_grid(to_uint8(x), rows)], [f"STEP {step}"]))
            return
        try:
            plot_scatter(path, self.data, {"1-NFE": x.numpy()}, title=f"step {step}")
        except PlotsUnavailable as e:
            self._skipped(f"{SAMPLES_DIR}/step_*.png", e)

    # ------------------------------------------------------------------------------------------------------------------
    # the end of the run

    def at_end(self, module):
        """samples.npz and samples.png: 1-NFE and 2-NFE samples of the same noise and labels, train.samples_at_end
        per class (an unconditional run counts as one class)."""
        if self.end_n <= 0:
            return
        one, labels, rows = self._draw(module, self.end_n, 1)
        two, _, _ = self._draw(module, self.end_n, 2)
        self.d.run_on_main(self._write_end, one, two, labels, rows)

    def _write_end(self, one, two, labels, rows):
        arrays = {"samples": one, "samples_2nfe": two}
        if labels is not None:
            arrays["labels"] = labels
        if self.data is not None:
            arrays["data"] = self.data
        save_arrays(os.path.join(self.run_dir, "samples.npz"), **arrays)
        png = os.path.join(self.run_dir, "samples.png")
        if self.kind == "images":
            write_png(png, panels([make_grid(to_uint8(one), rows), make_grid(to_uint8(two), rows)],
                                  ["1-NFE", "2-NFE"]))
        elif self.kind == "points":
            try:
                plot_scatter(png, self.data, {"1-NFE": one.numpy(), "2-NFE": two.numpy()})
            except PlotsUnavailable as e:
                self._skipped("samples.png", f"{e}; samples.npz holds the samples")
                return
        else:
            self._skipped("samples.png", f"{self.cfg.model.name} makes {self._what()}, not images; samples.npz holds "
                          "the samples")
            return
        print(f"samples: {os.path.abspath(png)}", flush=True)

    # ------------------------------------------------------------------------------------------------------------------
    # the loss curve

    def loss_curve(self):
        """loss.png from metrics.jsonl on rank 0 (no collective: any rank may call it). A missing matplotlib is one
        line for the run; a failed write is a warning, never the end of the run."""
        if not self.d.is_main or LOSS_PNG in self._silenced:
            return
        try:
            plot_loss(os.path.join(self.run_dir, METRICS), os.path.join(self.run_dir, LOSS_PNG))
        except PlotsUnavailable as e:
            self._skipped(LOSS_PNG, e)
        except OSError as e:
            log.warning("%s not written: %s", LOSS_PNG, e)
