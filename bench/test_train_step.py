"""A full MeanFlow training step per engine: draw (t, r, noise), target, loss, backward, AdamW step.

Engines, all on one model and one optimizer (the work of a step does not depend on the weights' values):
- "flow matching": ratio_r_neq_t = 0, no JVP at all: the lower bound of any MeanFlow step (torch ops, SDPA).
- "func": the torch.func.jvp reference engine (SDPA forced to MATH, the only backend with forward AD).
- "dual": the one-pass dual engine on the torch reference ops (mfkernels backend "torch").
- "dual+kernels": the dual engine on the Triton kernels (backend "triton"; GPU only).
An engine that cannot run is recorded in extra_info["train_step"]["failed"] and the others are still timed: "func"
may fail on a GPU (out of memory, functorch limits) and any engine may run out of memory (a batch that does not fit
is a result); any other error of the project's engines fails the benchmark.

The engines run interleaved, one step each per round in a rotating order, so that drift in the machine's speed
(other jobs on shared cores, clocks) falls on all of them alike; ratios are medians of per-round ratios, on CPU over
the rounds in which no step lost its cores to other jobs (each step's CPU share is recorded: bench.report.quiet_rounds).
pytest-benchmark's own row is the time of one whole round; the per-engine numbers live in extra_info["train_step"].
Shapes: on GPU DiT-B/2 and DiT-XL/2 on 256 px latents (32x32x4, 1000 classes), batch 64, bf16 autocast; on CPU a
small DiT (DiT-Tiny/4 on 32x32x1, 10 classes, batch 32: 64 tokens) in fp32.
Under --gpu-check (make gpu-check) DiT-XL/2 runs "dual+kernels" only: its step time and peak memory.
"""

import contextlib
import gc
import os
import statistics
from dataclasses import dataclass

import pytest
import torch

from bench.common import Rotation, bench_device, kernel_backend, memory_meter, time_and_share
from meanflow.models import create_model
from meanflow.objective import ObjectiveConfig, draw, meanflow_loss


@dataclass(frozen=True)
class Engine:
    engine: str  # meanflow.jvp engine
    backend: str  # mfkernels backend
    ratio_r_neq_t: float = 0.25
    gpu_only: bool = False


ENGINES = {
    "flow matching": Engine("dual", "torch", ratio_r_neq_t=0.0),
    "func": Engine("func", "torch"),
    "dual": Engine("dual", "torch"),
    "dual+kernels": Engine("dual", "triton", gpu_only=True),
}

LATENTS_256PX = dict(input_size=32, in_channels=4, num_classes=1000)
GPU_SHAPES = [("DiT-B/2", LATENTS_256PX, 64), ("DiT-XL/2", LATENTS_256PX, 64)]
CPU_SHAPES = [("DiT-Tiny/4", dict(input_size=32, in_channels=1, num_classes=10), 32)]
ROUNDS = {"cuda": (3, 10), "cpu": (1, 20)}  # (warm-up rounds, timed rounds); scaled by the profile on GPU
GPU_CHECK_ENGINES = {"DiT-XL/2": ("dual+kernels",)}  # --gpu-check: the fast path only where func would not pay off


class TrainStepCase:
    """One model, its AdamW, a pool of data batches and a generator for the per-step randomness."""

    def __init__(self, model, optimizer, data: Rotation, generator, batch, device, dtype, autocast_dtype):
        self.model, self.optimizer, self.data, self.generator = model, optimizer, data, generator
        self.batch, self.device, self.dtype, self.autocast_dtype = batch, device, dtype, autocast_dtype

    def engines(self):
        return [name for name, e in ENGINES.items() if self.device.type == "cuda" or not e.gpu_only]

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, engine: str):
        """One full training step with ``engine``; returns the loss (detached)."""
        spec = ENGINES[engine]
        cfg = ObjectiveConfig(engine=spec.engine, ratio_r_neq_t=spec.ratio_r_neq_t)
        x, y = self.data.next()
        with kernel_backend(spec.backend):
            d = draw(cfg, self.batch, self.model.sample_shape, generator=self.generator, dtype=self.dtype)
            d = d.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, _ = meanflow_loss(self.model, x, y, d, cfg)
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def runner(self, engine: str):
        return lambda: self.step(engine)


def train_step_case(name, overrides, batch, *, device=None, dtype=torch.float32, autocast_dtype=None, seed=0,
                    pool=3, lr=1e-4):
    """The setup factory of this suite: the same seed gives the same weights, data pool and step randomness."""
    device = device or bench_device()
    torch.manual_seed(seed)
    model = create_model(name, **overrides).to(device=device, dtype=dtype)
    model.check_values = False  # as in the trainer: the step builds r, t and y itself, and checks would sync
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    g = torch.Generator().manual_seed(seed + 1)
    sets = []
    for _ in range(pool):
        x = torch.randn(batch, *model.sample_shape, generator=g, dtype=dtype).to(device)
        y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=g).to(device)
        sets.append((x, y if model.num_classes > 0 else None))
    return TrainStepCase(model, optimizer, Rotation(sets), torch.Generator().manual_seed(seed + 2), batch, device,
                         dtype, autocast_dtype)


def train_step_record(name, overrides, batch, precision, times, shares, memory, memory_measure, load, failed=None):
    """extra_info of one interleaved run: what the report reads. times and shares {engine: [one per round]} (shares
    from time_and_share; None on GPU), memory {engine: bytes}, failed {engine: why it did not run}."""
    engines = {
        engine: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "img_per_s": batch / statistics.median(t),
            "memory_bytes": memory[engine],
            "times_s": t,
            "cpu_share": shares[engine],
        }
        for engine, t in times.items()
    }
    step = dict(model=name, overrides=overrides, batch=batch, precision=precision,
                rounds=len(next(iter(times.values()))), memory_measure=memory_measure, engines=engines, load=load,
                failed=dict(failed or {}))
    return {"suite": "train_step", "train_step": step}


def _shapes():
    return GPU_SHAPES if bench_device().type == "cuda" else CPU_SHAPES


def _tolerated(engine, error):
    return engine == "func" or isinstance(error, torch.OutOfMemoryError)


def _describe(error):
    """One line for the report (a markdown table cell: no pipes)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
    return text.replace("|", "/")


def _release(device):
    """Return what a failed step left behind to the allocator, so the other engines are measured as usual."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.benchmark(group="train_step")
@pytest.mark.parametrize("shape", _shapes(), ids=lambda s: f"{s[0]}-b{s[2]}")
def test_train_step(benchmark, shape, profile):
    name, overrides, batch = shape
    device = bench_device()
    case = train_step_case(name, overrides, batch, device=device,
                           autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    only = GPU_CHECK_ENGINES.get(name) if profile.quick else None
    mem_kind, meter = memory_meter(device)
    memory, failed = {}, {}
    for engine in [e for e in case.engines() if only is None or e in only]:
        try:
            case.step(engine)  # also the first warm-up step of each engine
            memory[engine] = meter(case.runner(engine), list(case.model.parameters()))
        except Exception as error:  # noqa: BLE001 (which errors are tolerated is decided by _tolerated)
            if not _tolerated(engine, error):
                raise
            failed[engine] = _describe(error)
        if engine in failed:  # outside the except block: the error and its frames are gone by now
            _release(device)
    engines = list(memory)
    if not engines:
        pytest.fail(f"{name} batch {batch}: no engine could run: {failed}")
    times = {engine: [] for engine in engines}
    shares = {engine: [] for engine in engines}

    def one_round():
        start = one_round.calls % len(engines)
        one_round.calls += 1
        for engine in engines[start:] + engines[:start]:
            seconds, share = time_and_share(case.runner(engine), device)
            times[engine].append(seconds)
            shares[engine].append(share)

    one_round.calls = 0
    warmup, rounds = ROUNDS[device.type]
    if device.type == "cuda":
        warmup, rounds = profile.scaled(warmup), profile.scaled(rounds)
    load_before = os.getloadavg()[0]
    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup, iterations=1)
    for engine in engines:  # drop the warm-up rounds
        times[engine], shares[engine] = times[engine][warmup:], shares[engine][warmup:]
    load = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count()}
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    benchmark.extra_info.update(
        train_step_record(name, overrides, batch, precision, times, shares, memory, mem_kind, load, failed))

