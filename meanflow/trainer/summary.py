"""The run summary: what a run runs on, printed once at its start and stored as <train.out>/summary.json.

FLOPs per image: the forward is counted, not guessed (one forward of the model on meta tensors under torch's
FlopCounterMode); a training step's is meanflow.flops' explicit count of the objective's passes (forward, backward,
the r != t rows' dual pass, guidance forwards), the same number MFU in metrics.jsonl is computed from.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode

import mfkernels
from meanflow import host_malloc
from meanflow.flops import config_step_flops
from meanflow.models import create_model
from mfkernels._backend import backend_summary


def forward_flops(cfg) -> int:
    """FLOPs of one forward of cfg.model for one input, counted on meta tensors (no memory, no compute)."""
    previous = mfkernels.get_backend()
    mfkernels.set_backend("torch")  # meta tensors run the torch reference ops
    try:
        with torch.device("meta"):
            model = create_model(cfg.model.name, **cfg.model.build_kwargs()).to("meta")  # buffers built on the CPU too
            model.check_values = False  # value checks read tensors, which meta tensors do not have
            z = torch.zeros(1, *model.sample_shape)
            t = torch.ones(1)
            y = torch.zeros(1, dtype=torch.long) if cfg.model.num_classes > 0 else None
        with FlopCounterMode(display=False) as counter:
            model(z, t, t, y)
    finally:
        mfkernels.set_backend(previous)
    return counter.get_total_flops()


def run_summary(trainer) -> dict:
    cfg, d, model = trainer.cfg, trainer.d, trainer.ema.module
    dtype = str(trainer.dtype).removeprefix("torch.")
    f = forward_flops(cfg)
    device = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu"
    return {
        "device": f"{d.world_size} x {device}" if d.initialized else device,
        "world_size": d.world_size,
        "cpu_threads": torch.get_num_threads(),  # per process: torchrun sets 1 (OMP_NUM_THREADS), one process all cores
        "precision": {"params": "float32", "compute": dtype,
                      "tangent": "float32" if cfg.train.tangent_precision == "fp32" or dtype == "float32" else dtype,
                      "reduce": "float32", "tf32": cfg.train.tf32},
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops_per_image": f,
        "step_flops_per_image": config_step_flops(cfg),
        "data": {"source": cfg.data.source, "backend": trainer.loader.backend, "items": trainer.loader.num_items,
                 "steps_per_epoch": trainer.loader.steps_per_epoch},
        "kernels": backend_summary(d.device),
        "host_malloc": host_malloc.state(),
        "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "resume_step": trainer.step if trainer.resumed_at is not None else None,
    }


def format_summary(s: dict) -> str:
    """The summary as a few readable lines for the log."""
    p, data = s["precision"], s["data"]
    kernels = ", ".join(f"{op} {impl}" for op, impl in s["kernels"].items())
    return "\n".join([
        f"run: {s['device']}, world size {s['world_size']}, {s['cpu_threads']} CPU thread(s) per process; "
        f"{s['parameters'] / 1e6:.2f}M parameters; "
        f"{s['step_flops_per_image'] / 1e9:.4g} GFLOP per image per step ({s['forward_flops_per_image'] / 1e9:.4g} "
        "forward)",
        f"precision: params {p['params']}, compute {p['compute']}, tangent {p['tangent']}, reduce {p['reduce']}, "
        f"tf32 {'on' if p['tf32'] else 'off'}; compile {s['compile']}, activation checkpointing "
        f"{s['activation_checkpointing']}",
        f"data: {data['source']} via {data['backend']}, {data['items']} items, {data['steps_per_epoch']} steps/epoch",
        f"kernels: {kernels}",
        f"host memory: {s['host_malloc']}",
        "start: fresh" if s["resume_step"] is None else f"start: resumed at step {s['resume_step']}",
    ])
