"""Named configs: the embedded demo, a seconds-long smoke run, and the paper's ImageNet 256 recipes.

Each preset is a dict of overrides on the defaults of meanflow.config.schema.Config (what a config file would hold).
"""


def _mnist_demo():
    """Sized so that `make demo` (setup, training, FID at n = 1000) ends within 10 minutes on a 2-core CPU.

    Measured choices (README, "Demo"; judged by meanflow.digits' classifier and FID on 1-NFE samples, n = 1000, each
    a 1500-step run on one thread unless said): patch 8 (16 tokens of the 32x32 digit) costs a third of patch 4's
    step (64 tokens), and at equal time the extra steps won over finer tokens; lr 2e-3 with EMA 0.999 read 94% against
    76% for lr 1e-3 with EMA 0.995 (lr 3e-3: FID 61 against 58); the network predicting the clean image
    (model.prediction "x") took the FID from 153 to 84, and bounding that image by a tanh ("x_tanh") from 87 to 63
    (seed 1: 56), the black background no longer grey by a few levels; guidance in training
    (v~ = w v + (1 - w) u(z, t, t | null)) at w = 3 read FID 58 against 78, 63 and 64 for w = 1.5, 2 and 4.
    Not better: adaptive_p 1 (67), the uniform time sampler (74), time_mu 0 (57, within the seed-to-seed spread).
    Longer runs (3000 steps, FID at 2250 / 3000): half the rows with r != t, 45.1 / 40.7, against 48.6 / 45.5 for a
    quarter, at 5% more time a step (the JVP still runs on those rows only); three quarters 43.4 / 41.8 and w = 2.5
    45.1 / 41.5, within the spread; adaptive_p 0.5 47.7 / 45.3, worse. Guidance with the official code's kappa,
    v~ = w v + k u(z, t, t | y) + (1 - w - k) u(z, t, t | null) at w = 1.5, k = 0.5 (the same w / (1 - k) = 3): 40.3 /
    39.2, at 16% more time a step (one more forward): the target leans on the model's own conditional velocity, less
    noisy than v = e - x. 2100 such steps fit the 10 minutes once the FID's Inception ran in bf16; 2400 once the
    guidance forward skipped the rows it does not need and the GELU ran natively (one-thread runs, bf16 Inception: FID
    42.3 at 2100 steps, 41.6 at 2400).
    Not better at equal time (FID at 2100-step cost): a conv head 45.1, widths 192 x 3 blocks 47.6, 256 x 2 57.9, 96 x 6
    44.5; kappa 0.75 (w 0.75) 46.0; guidance only for t <= 0.8 54.6; the lr decayed linearly over the last 30% 44.3;
    a longer or shorter EMA (power-function profiles, gamma 4 / 16) 45.3 / 41.6 against 42.3 (the spread is ~+-4).
    Then (2400 steps, FID of seeds 0 / 1; the seed-to-seed spread dominates: other noise seeds move a run's FID by ~1,
    its training seed by ~5): U-ViT's long skips (model.long_skips) 39.5 / 34.2 against 41.6 / 36.1, at 5% more time a
    step; a 24x24 canvas (model.canvas: 9 tokens for 16; 12% of the digits have ink outside it, 0.24% of all ink), a
    step 0.76x on two threads (0.56x on one), with long skips at 4300 steps (one thread's equal time) 35.8 / 36.6
    (noise seeds 11, 12: 33.9, 34.2 / 35.2, 35.2, against 39.8, 39.6 / 35.3, 34.3 for long skips alone), at 3000
    steps 38.8 / -. Not better (seed 0): Muon on the blocks' matrices 41.5 at 12-25% more time a step; an overlapping
    patch head (16x16 windows, stride 8) 48.5; an MLP patch head 40.9 and lr 3e-3 42.3 (with long skips, against
    39.5); batch 128 at equal time 42.5; a batch share of 1/8 at (r, t) = (0, 1), the one-step sampler's point, 42.0.
    Guidance scale 2.5 (w 1.25, k 0.5) with the canvas and long skips, 4300 steps: 32.8 / 37.2 (mean of three noise
    seeds) against 34.6 / 35.6 for 3, a gain on one seed and a loss on the other; so were 6 blocks at equal time
    (2890 steps): 39.2 / 31.2 against 35.8 / 36.6.
    Not better at 3200 steps, against 38.0 / 31.8 (README, "Where the recipe stands": a run's FID wanders by a few
    points within a few hundred steps): the JVP tangent from the model's own guided velocity (iMF's boundary condition
    u(z, t, t) for v = e - x) 43.0 / 45.1; a curriculum on t - r (scaled from 0.1x to 1x over the first half) 37.6 /
    34.7; power-profile EMAs of gamma 2, 4, 16, 32 (the warm-up formula's is ~8) 41.3, 38.5, 38.9, 40.6 / 34.6, 32.2,
    31.9, 32.8; guidance from the EMA weights 43.5 / 34.0; MLP ratio 2 at equal time (3700 steps) 39.3 / 39.4; a cosine
    lr to 0.1x 40.9 / 37.5; 4000 steps 35.6 / 36.7. Seeds 2 / 3 read 41.3 / 39.9 (3.8x their floors: the four seeds'
    mean is 3.5x); class_drop 0.2 on seeds 0-3, 35.6, 34.8, 40.4, 37.1 against 38.0, 31.8, 41.3, 39.9, is within that
    spread.
    Then, on an AMD EPYC (where the same recipe's seeds 0 / 1 read 40.1 / 31.2 at 3200 steps: training differs by CPU
    in its rounding): patch 6 (DiT-Micro/6, 16 tokens of 6x6 pixels on the canvas for 9 of 8x8; a step 1.33x on two
    threads, 112 ms against 84) at 3200 steps read 33.8, 30.3, 36.6, 36.0 on seeds 0-3, 3.06x, 2.83x, 3.36x, 3.39x
    their floors (mean 3.16x), and 38.1 / 35.2 at 2400 steps (seeds 0 / 1): unlike patch 8 it still gains with steps.
    At 3200 steps too: patch 7 on a 28x28 canvas (the whole digit, 16 tokens of 7x7) 33.5 / 35.6; width 192 (6
    heads; 1.8x the step) 38.7 and batch 128 (2x) 34.6 on seed 0. 3600 steps: 33.4 / 35.6 on seeds 0 / 2 (against
    33.8 / 36.6). bf16 training (fp32 tangents; a step 0.76x fp32's here) 39.0 / 30.8 on seeds 0 / 1, not adopted.
    At 2800 steps make demo read 36.7 in 6 min 52 s from a fresh clone; 3200 steps fit as well (README, "Demo").
    Then (the same EPYC, 3200 steps, one thread): bf16 training at batch 96 (a step 1.09x fp32's at 64, two threads)
    33.7, 29.6, 35.0, 30.0 on seeds 0-3 (2.97x the floors on average, against 3.16x): make demo adds it where the CPU
    has bf16 matrix instructions (Makefile, DEMO_TRAIN_FLAGS), this preset stays fp32 for the CPUs that emulate bf16.
    Not better on seed 0 (against 33.8): class_drop 0.2, 36.9; guidance scale 2.5 (cfg_w 1.25), 34.6; the whole digit
    on a 30x30 canvas (25 tokens, a step 1.59x) at 2000 steps, 37.7 (seed 2: 40.0 against 36.6); time_scale 100, 137.8
    (seed 2: 62.2; the target's du/dt a hundred times rougher, layers.TimestepEmbedder).
    Then, bf16 at 96 with the native bf16 GELU (other rounding, other weights; make demo: 32.0 on seed 0, 2.90x):
    3600 steps 32.5 / 36.9 on seeds 1 / 2 (torch's GELU, seed 0: 32.7); batch 128 (a step 1.24-1.28x) 32.0 on seed 0
    (torch's GELU). Neither clearly better for its time.
    make demo runs the bf16 recipe for 2800 steps (Makefile, DEMO_TRAIN_FLAGS): the demo's run read 35.4, 33.8, 32.35,
    32.30, 32.02 at steps 2400, 2600, 2800, 3000, 3200 (checkpoints every 200 steps of the one deterministic training),
    2.93x its floor at 2800 for a minute less of the demo's ten; this fp32 preset keeps 3200.
    """
    return {
        "model": {"name": "DiT-Micro/6", "input_size": 32, "in_channels": 1, "num_classes": 10,
                  "prediction": "x_tanh", "long_skips": True, "canvas": 24},
        # the 5000 digits (20 MB) read once into memory: the same batches as the DataLoader's (and DALI's), without
        # its two workers reading 96 files a step on the training cores (300 steps without them: 52-53 s, with 59-61 s)
        "data": {"source": "mnist", "loader": "memory"},
        "objective": {"adaptive_p": 0.75, "adaptive_c": 1e-3, "ratio_r_neq_t": 0.5, "time_mu": -0.4,
                      "class_drop": 0.1, "cfg_w": 1.5, "cfg_k": 0.5},
        "optim": {"lr": 2e-3, "warmup_steps": 100, "grad_clip": 1.0, "ema_decay": 0.999, "ema_warmup": True},
        "train": {"steps": 3200, "global_batch": 64, "out": "runs/mnist-demo"},
        "log": {"every": 50, "sample_every": 400},  # samples/step_<step>.png: the digits forming, 8 grids
        "checkpoint": {"every": 800, "keep_last": 2},
    }


def _smoke():
    """A tiny model and a few steps: seconds on a CPU (the trainer tests run it)."""
    return {
        "model": {"name": "DiT-Nano/8", "input_size": 32, "in_channels": 1, "num_classes": 10},
        "data": {"source": "mnist", "num_workers": 0},
        "objective": {"adaptive_p": 0.75},
        "optim": {"lr": 1e-3, "ema_decay": 0.9, "ema_warmup": True},
        "train": {"steps": 6, "global_batch": 8, "out": "runs/smoke", "samples_at_end": 2},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 3, "keep_last": 2},
    }


def _imagenet(name, w, k, t_end, p=1.0, c=1e-2):
    """The paper's ImageNet 256 recipe on SD-VAE latents (32x32x4, scaled 0.18215): 240 epochs at batch 256.

    In bf16 with fp32 tangents rather than the paper's fp32: bf16 tensor cores run twice TF32's rate on A100/H100 and
    bf16 activations and all-gathers move half the bytes, while master weights, optimizer, gradient reduction and
    the tangent (the target's derivative, at the bf16 primal's floor: tests/meanflow/test_precision.py) stay fp32.
    --train.precision=fp32 (TF32 matmuls) is the paper's setting.
    """
    return {
        "model": {"name": name, "input_size": 32, "in_channels": 4, "num_classes": 1000},
        "data": {"source": "npy", "scale": 0.18215, "hflip": True},
        "objective": {"adaptive_p": p, "adaptive_c": c, "ratio_r_neq_t": 0.25, "time_mu": -0.4, "time_sigma": 1.0,
                      "cfg_w": w, "cfg_k": k, "cfg_t_start": 0.0, "cfg_t_end": t_end, "class_drop": 0.1},
        "optim": {"lr": 1e-4, "beta2": 0.95, "weight_decay": 0.0, "ema_decay": 0.9999},
        "train": {"steps": 1_200_000, "global_batch": 256, "out": f"runs/imagenet-{name[4:].replace('/', '')}",
                  "precision": "bf16", "tangent_precision": "fp32", "tf32": True},
    }


IMAGENET_STEPS_PER_EPOCH = 1251  # 1,281,167 images at batch 1024, last partial batch dropped (official loader)


def _imagenet_imf(name, epochs, omega, t_min, t_max):
    """Improved MeanFlow's official ImageNet 256 recipe (Lyy-iiis/imeanflow: configs/default.py, train_config.yml,
    imf.py): SD-VAE latents as the MeanFlow presets, batch 1024, AdamW lr 1e-4 (10 warmup epochs) beta2 0.95 wd 0,
    EMA 0.9999, fp32 (TF32 matmuls on GPUs). train_config.yml gives B/2's 640 epochs; the released checkpoints are
    step 800,640 (640 epochs) for B, M and L and 1,000,800 (800 epochs) for XL. Sampling defaults are the official
    1-NFE settings of eval_config.yml (omega, [t_min, t_max]); docs/imf.md lists them all.
    """
    ipe = IMAGENET_STEPS_PER_EPOCH
    return {
        "model": {"name": name, "input_size": 32, "in_channels": 4, "num_classes": 1000},
        "data": {"source": "npy", "scale": 0.18215, "hflip": True},
        "objective": {"kind": "imf", "time_mu": -0.4, "time_sigma": 1.0, "ratio_r_neq_t": 0.5, "adaptive_p": 1.0,
                      "adaptive_c": 0.01, "class_drop": 0.1, "imf_omega_max": 8.0, "imf_omega_beta": 1.0,
                      "imf_interval_split": 0.5, "imf_sample_omega": omega, "imf_sample_t_min": t_min,
                      "imf_sample_t_max": t_max},
        "optim": {"lr": 1e-4, "beta2": 0.95, "weight_decay": 0.0, "warmup_steps": 10 * ipe, "ema_decay": 0.9999},
        "train": {"steps": epochs * ipe, "global_batch": 1024, "out": f"runs/imagenet-{name.replace('/', '')}",
                  "precision": "fp32", "tf32": True},
    }


# CPU time of one mnist-imf training step over one mnist-demo step (`python -m meanflow.imf_compare cost`, one
# thread, the trainer's whole step, 30 steps each after 5 of warm-up, alternating blocks: 0.543 s against 0.131 s),
# measured when the demo's model was DiT-Micro/8 on the whole 32 x 32 input (16 tokens); kept so that mnist-imf and
# docs/imf.md's results stay the run they describe
MNIST_IMF_STEP_COST = 4.13


def _mnist_imf():
    """iMF on the embedded MNIST at the demo's size and CPU budget: iMF-Micro/8 (the demo's width 128 and 4 blocks
    on the u path: a 2-block trunk with 2-block u- and v-heads; 16 patch tokens + 20 prefix tokens), the demo's
    batch and optimizer, iMF's official objective, and as many steps as cost the demo's 1500 steps of CPU time
    (MNIST_IMF_STEP_COST; 1500 was the demo's budget when the two were compared; it has changed since). Sampling
    guidance omega 4 over [0.4, 0.65] (B/2's official interval): the best 1-NFE FID of a sweep (omega 1, 2, 4, 8;
    intervals [0, 1], [0.2, 0.8], [0.4, 0.65]) on a 1500-step run, intervals within noise of each other; at 363
    steps omega has not been learned yet and changes nothing (docs/imf.md, "Results").
    """
    return {
        "model": {"name": "iMF-Micro/8", "input_size": 32, "in_channels": 1, "num_classes": 10},
        "data": {"source": "mnist"},
        "objective": {"kind": "imf", "time_mu": -0.4, "time_sigma": 1.0, "ratio_r_neq_t": 0.5, "adaptive_p": 1.0,
                      "adaptive_c": 0.01, "class_drop": 0.1, "imf_sample_omega": 4.0, "imf_sample_t_min": 0.4,
                      "imf_sample_t_max": 0.65},
        "optim": {"lr": 2e-3, "warmup_steps": 100, "grad_clip": 1.0, "ema_decay": 0.999, "ema_warmup": True},
        "train": {"steps": round(1500 / MNIST_IMF_STEP_COST), "global_batch": 64, "out": "runs/mnist-imf"},
        "log": {"every": 50, "sample_every": 300},
        "checkpoint": {"every": 500, "keep_last": 2},
    }


def _toy(name, scale=1.0):
    """MLP (the default: 256 wide, 3 residual blocks) on a 2-D toy of meanflow/data/toy.py, unconditional: 3000 steps,
    ~45 s in one CPU thread (README: 2-D toys). Tuned by meanflow.toy_eval's distances on 1000-4000-step runs: adaptive
    p = 1 was 2x worse than p <= 0.5, uniform times worse than logit-normal, batch 512 no better than 256 at 2x the
    time; r != t on 1/2 or 3/4 of the batch, p 0.25 or 0.5, time sigma 1 or 1.6, lr 5e-4 or 1e-3 and 3000 or 4000
    steps differed by less than the seed-to-seed spread (~0.01 in SW2 at n = 5000)."""
    return {
        "model": {"name": "MLP", "in_channels": 2, "num_classes": 0},
        "data": {"source": "toy", "toy": name, "scale": scale, "num_workers": 0},
        "objective": {"time_sampler": "logit_normal", "time_mu": -0.4, "time_sigma": 1.6, "ratio_r_neq_t": 0.75,
                      "adaptive_p": 0.25, "adaptive_c": 1e-3, "class_drop": 0.0},
        "optim": {"lr": 5e-4, "warmup_steps": 100, "ema_decay": 0.999, "ema_warmup": True},
        "train": {"steps": 3000, "global_batch": 256, "out": f"runs/toy-{name}", "samples_at_end": 4000},
        "log": {"every": 100},
        "checkpoint": {"every": 1000, "keep_last": 1},
    }


PRESETS = {
    "mnist-demo": _mnist_demo,
    "smoke": _smoke,
    "imagenet-B2": lambda: _imagenet("DiT-B/2", 1.0, 0.5, 1.0),
    "imagenet-M2": lambda: _imagenet("DiT-M/2", 1.0, 0.5, 1.0),
    "imagenet-L2": lambda: _imagenet("DiT-L/2", 0.2, 0.92, 0.8),
    "imagenet-XL2": lambda: _imagenet("DiT-XL/2", 0.2, 0.92, 0.75),
    "mnist-imf": _mnist_imf,
    "imagenet-iMF-B2": lambda: _imagenet_imf("iMF-B/2", 640, 8.0, 0.4, 0.65),
    "imagenet-iMF-M2": lambda: _imagenet_imf("iMF-M/2", 640, 10.5, 0.4, 0.6),
    "imagenet-iMF-L2": lambda: _imagenet_imf("iMF-L/2", 640, 10.5, 0.4, 0.6),
    "imagenet-iMF-XL2": lambda: _imagenet_imf("iMF-XL/2", 800, 8.0, 0.42, 0.62),
    # x 4/sqrt(3): FFJORD's [-4, 4] checker; at std 1 the 1-NFE samples came out as an X across the cells
    "toy-checkerboard": lambda: _toy("checkerboard", scale=4 / 3**0.5),
    "toy-8gaussians": lambda: _toy("8gaussians"),
    "toy-moons": lambda: _toy("moons"),
    "toy-gaussian": lambda: _toy("gaussian"),
}

PRESET_HELP = {
    "mnist-demo": "the default: class-conditional DiT-Micro/6 (clean-image output) on 5000 embedded MNIST digits",
    "smoke": "a tiny DiT and 6 steps on MNIST: seconds on a CPU",
    "imagenet-B2": "the paper's DiT-B/2 on ImageNet 256 SD-VAE latents (data.root: a latent folder), bf16",
    "imagenet-M2": "the paper's DiT-M/2 recipe, as imagenet-B2",
    "imagenet-L2": "the paper's DiT-L/2 recipe (guidance w 0.2, k 0.92, t <= 0.8)",
    "imagenet-XL2": "the paper's DiT-XL/2 recipe (guidance w 0.2, k 0.92, t <= 0.75)",
    "mnist-imf": "Improved MeanFlow (objective.kind imf) on the embedded MNIST: iMF-Micro/8, the demo's CPU time",
    "imagenet-iMF-B2": "iMF's official iMF-B/2 recipe on ImageNet 256 latents: 640 epochs at batch 1024, fp32",
    "imagenet-iMF-M2": "iMF's official iMF-M/2 recipe, as imagenet-iMF-B2 (sampling omega 10.5, [0.4, 0.6])",
    "imagenet-iMF-L2": "iMF's official iMF-L/2 recipe, as imagenet-iMF-B2 (sampling omega 10.5, [0.4, 0.6])",
    "imagenet-iMF-XL2": "iMF's official iMF-XL/2 recipe: 800 epochs (sampling omega 8.0, [0.42, 0.62])",
    "toy-checkerboard": "MLP on FFJORD's 2-D checkerboard (data.toy), unconditional, ~1 min on 2 CPU cores",
    "toy-8gaussians": "MLP on 8 Gaussians on a circle of radius 2, as toy-checkerboard",
    "toy-moons": "MLP on two moons, as toy-checkerboard",
    "toy-gaussian": "MLP on N((1.5, -1), 0.25 I): its exact 1-NFE map is linear, a sanity check",
}
