"""Model registry: ``create_model(name, **overrides)``.

Paper sizes (DiT-S/B/M/L/XL with patch 2, 4 or 8: "DiT-XL/2", "DiT-B/4", ...), small sizes for CPU work
("DiT-Tiny/4", "DiT-Nano/2", ...; patch 6 too, "DiT-Micro/6", for a canvas of 24 or 30 pixels: the MNIST demo's 4 x 4
tokens) and "MLP" for vector data. Every model is called as ``model(z, r, t, y=None)``
and has ``dual(z, r, t, y, dz, dr, dt) -> (u, du)``.

iMF's in-context DiT ("iMF-B/2", ..., "iMF-XL/2", small "iMF-Micro/8", "iMF-Nano/2", ...) also takes
``cond`` (omega, t_min, t_max) and ``return_v``, and has ``is_imf = True`` (meanflow.models.imf_dit).
"""

import inspect

from meanflow.models.dit import DiT
from meanflow.models.imf_dit import ImfDiT
from meanflow.models.mlp import MLP

# (depth, hidden, heads): DiT paper sizes, plus MeanFlow's M (16 blocks at L's width) and small CPU sizes.
DIT_SIZES = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "M": (16, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
    "Tiny": (6, 256, 4),
    "Micro": (4, 128, 4),
    "Nano": (2, 64, 2),
}
PATCHES = (2, 4, 8)
SMALL_SIZES, SMALL_PATCHES = ("Tiny", "Micro", "Nano"), (2, 4, 6, 8)  # 6: a 24 x 24 canvas of a 32 x 32 input

# (depth, hidden, heads, aux_head_depth): iMF's sizes, head dim 64; depth counts the trunk plus one head's blocks.
IMF_SIZES = {
    "XL": (48, 1024, 16, 8),
    "L": (32, 1024, 16, 8),
    "M": (24, 768, 12, 8),
    "B": (12, 768, 12, 8),
    "Tiny": (6, 256, 4, 2),
    "Micro": (4, 128, 2, 2),
    "Nano": (2, 64, 2, 1),
}

MODEL_NAMES = (tuple(f"DiT-{size}/{p}" for size in DIT_SIZES
                     for p in (SMALL_PATCHES if size in SMALL_SIZES else PATCHES)) + ("MLP",)
               + tuple(f"iMF-{size}/{p}" for size in IMF_SIZES for p in PATCHES))


def create_model(name: str, **overrides):
    """Build a model by registry name; keyword overrides replace the size's defaults.

    DiT overrides: input_size, in_channels, num_classes, hidden_size, depth, num_heads, mlp_ratio, time_scale,
    prediction, head, long_skips, canvas.
    MLP overrides: dim, width, depth, num_classes, time_scale.
    iMF overrides: input_size, in_channels, num_classes, hidden_size, depth, num_heads, mlp_ratio, aux_head_depth
    (None: the size's; 0: the inference model, without the v-head), weight_init_constant.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    cls, kwargs = MLP, {}
    if name.startswith("iMF-"):
        size, patch = name[len("iMF-"):].split("/")
        depth, hidden, heads, aux = IMF_SIZES[size]
        cls, kwargs = ImfDiT, dict(patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads,
                                   aux_head_depth=aux)
        if overrides.get("aux_head_depth", 0) is None:
            del overrides["aux_head_depth"]
    elif name != "MLP":
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = DIT_SIZES[size]
        cls, kwargs = DiT, dict(patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads)
    valid = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown override(s) {unknown}; valid: {', '.join(valid)}")
    return cls(**{**kwargs, **overrides})


__all__ = ["DiT", "ImfDiT", "MLP", "MODEL_NAMES", "create_model"]
