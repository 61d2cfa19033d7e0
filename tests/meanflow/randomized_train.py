"""meanflow.train from a random start, for the trainer tests (test-only entry point).

    python -m tests.meanflow.randomized_train [--zero-dudt] --config smoke --train.out=... [--section.key=value ...]
    torchrun --standalone --nproc_per_node=2 -m tests.meanflow.randomized_train --config smoke ...

The smoke model is adaLN-Zero: at step 1 its output layer and every block's modulation are zero, so u = 0 and
du/dt = 0 whatever the engine, precision or number of processes, and the first steps agree trivially. Here
``meanflow.models.create_model`` is replaced, before meanflow.train is first imported (the trainer binds the name at
import), by one that draws every weight with ``randomize_fan_in`` from a generator seeded with a fixed constant: the
same weights on every rank and in every run (a resumed run then loads its checkpoint over them, as usual).

At exit each process prints one line ``randomized_train {json}`` for the tests to parse, written from inside the run:
the dtypes of the first block's qkv weight and output at their first call (a forward hook: bf16 under bf16 compute,
with fp32 weights under autocast and bf16 ones under FSDP's policy) and of the u and du/dt the objective got at its
first call, and the norm of that first u (0 exactly for the zero-initialised model). qkv dtypes in the report and a
non-zero |u| show that the trainer ran the model built here.

--zero-dudt (measurements only): the objective gets du/dt = 0, as if the tangent were lost; its loss then falls back
towards flow matching. Used once to size the tolerance of test_bf16_mixed_precision_tracks_fp32.
"""

import importlib
import json
import os
import sys

import torch

import meanflow.jvp
import meanflow.models
import meanflow.objective
from tests.meanflow.reference_models import randomize_fan_in

WEIGHTS_SEED = 20240611  # fixed: every rank and every run draw the same weights
PREFIX = "randomized_train "

report = {"rank": int(os.environ.get("RANK", "0")), "weights_seed": WEIGHTS_SEED, "zero_dudt": False}


def _first_qkv_call(module, args, out):
    if "qkv_out" not in report:  # the first call is step 1's (the EMA copy, which shares this hook, samples at the end)
        report["qkv_weight"], report["qkv_out"] = str(module.weight.dtype), str(out.dtype)


def randomized(create_model):
    def create_randomized_model(name, **overrides):
        model = create_model(name, **overrides)
        if any(p.is_meta for p in model.parameters()):  # the run summary's FLOP count: no values, never trained
            return model
        randomize_fan_in(model, torch.Generator().manual_seed(WEIGHTS_SEED))
        if hasattr(model, "blocks"):
            model.blocks[0].attn.qkv.register_forward_hook(_first_qkv_call)
        return model

    return create_randomized_model


def recorded(u_and_dudt, zero_dudt):
    def u_and_dudt_recorded(*args, **kwargs):
        u, dudt = u_and_dudt(*args, **kwargs)
        if zero_dudt:
            dudt = torch.zeros_like(dudt)
        if "u" not in report:
            report.update(u=str(u.dtype), dudt=str(dudt.dtype), u_norm=u.detach().double().norm().item())
        return u, dudt

    return u_and_dudt_recorded


def main(argv):
    zero_dudt = "--zero-dudt" in argv
    argv = [a for a in argv if a != "--zero-dudt"]
    report["zero_dudt"] = zero_dudt
    early = [m for m in sys.modules if m == "meanflow.train" or m.startswith("meanflow.trainer")]
    if early:
        raise RuntimeError(f"{early} imported before create_model could be replaced")
    meanflow.models.create_model = randomized(meanflow.models.create_model)
    # the objective binds u_and_dudt by name at import: replace it there, where meanflow_loss looks it up
    meanflow.objective.u_and_dudt = recorded(meanflow.jvp.u_and_dudt, zero_dudt)

    train = importlib.import_module("meanflow.train")
    code = train.main(argv)
    # one write of the whole line: with PYTHONUNBUFFERED, print() writes the text and the newline separately, and two
    # ranks sharing the pipe then interleaved as '{...}{...}\n\n' (seen under load)
    sys.stdout.write(PREFIX + json.dumps(report) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
