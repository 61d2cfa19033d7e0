"""Run under torchrun (test_precision.py): the dual engine through FSDP2 with bf16 parameters, against the float64
func engine on the unsharded model. Rank 0 writes the measurements as JSON to argv[1].

    torchrun --standalone --nproc_per_node=2 -m tests.meanflow.fsdp_dual_worker OUT.json SEED
"""

import copy
import json
import sys

import torch

import mfkernels
from meanflow.distributed import init_distributed, shutdown
from meanflow.jvp import u_and_dudt
from meanflow.models import create_model
from meanflow.parallel import apply_fsdp
from tests.meanflow.reference_models import float64_tangent, random_inputs, randomize_fan_in


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main(out, seed):
    d = init_distributed()
    mfkernels.set_backend("torch")
    torch.manual_seed(seed)  # the same model and batch on every rank
    model = randomize_fan_in(create_model("DiT-Micro/4", input_size=16, in_channels=4, num_classes=10,
                                          long_skips=True))  # long skips: root parameters used between blocks
    z, r, t, y, v = random_inputs(model, batch=4, dtype=torch.float32)
    model64 = copy.deepcopy(model).double()
    _, du64 = u_and_dudt(model64, z.double(), r.double(), t.double(), y, v.double(), engine="func")
    # the function a bf16-parameter run computes: the same network with its weights rounded to bf16
    rounded64 = copy.deepcopy(model).to(torch.bfloat16).double()
    _, du64_rounded = u_and_dudt(rounded64, z.double(), r.double(), t.double(), y, v.double(), engine="func")

    apply_fsdp(model, torch.bfloat16)
    with float64_tangent():
        _, du_floor = u_and_dudt(model, z, r, t, y, v, engine="dual")
    result = {"floor": {"err": rel(du_floor, du64), "du_dtype": str(du_floor.dtype)}}
    for precision in ("fp32", "primal"):
        model.tangent_precision = precision
        u, du = u_and_dudt(model, z, r, t, y, v, engine="dual")
        result[precision] = {"u_dtype": str(u.dtype), "du_dtype": str(du.dtype), "err": rel(du, du64),
                             "err_rounded_weights": rel(du, du64_rounded), "vs_floor": rel(du, du_floor)}
    if d.is_main:
        with open(out, "w") as f:
            json.dump(result, f)
    shutdown(d)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
