"""The dtype rule of every ``*_jvp`` op, and autocast off for the tangent of its torch path.

All primal inputs share one dtype, all tangent inputs share one dtype, and the tangent dtype is the primal's or, when
the primal is bf16 or fp16, float32 (an fp32 tangent riding on a 16-bit primal: MeanFlow's target is the tangent,
so the model keeps it in fp32 under bf16). The primal output has the primal dtype, the tangent output the tangent's.
"""

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)  # primals that may carry an fp32 tangent


def check_dtypes(op, primals, tangents=None):
    """Raise ValueError naming the argument unless {name: tensor} primals and tangents follow the rule above."""
    (first, ref), *rest = primals.items()
    for name, t in rest:
        if t.dtype != ref.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first} has {ref.dtype}")
    if not tangents:
        return
    (tfirst, tref), *trest = tangents.items()
    allowed = (ref.dtype, torch.float32) if ref.dtype in HALF_DTYPES else (ref.dtype,)
    if tref.dtype not in allowed:
        raise ValueError(f"{op}: {tfirst} has dtype {tref.dtype} but {first} has {ref.dtype}; tangents take the "
                         "primal's dtype, or float32 when the primal is bfloat16 or float16")
    for name, t in trest:
        if t.dtype != tref.dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {tfirst} has {tref.dtype} (all tangents share "
                             "one dtype)")


def no_autocast(t):
    """Autocast off on t's device, for a tangent computed in t's dtype: autocast would run its matmuls in bf16."""
    return torch.autocast(t.device.type, enabled=False)
