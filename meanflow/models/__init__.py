"""Model registry: ``create_model(name, **overrides)``.

Paper sizes (DiT-S/B/M/L/XL with patch 2, 4 or 8: "DiT-XL/2", "DiT-B/4", ...), small sizes for CPU work
("DiT-Tiny/4", "DiT-Nano/2", ...) and "MLP" for vector data. Every model is called as ``model(z, r, t, y=None)``
and has ``dual(z, r, t, y, dz, dr, dt) -> (u, du)``.
"""

import inspect

from meanflow.models.dit import DiT
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

MODEL_NAMES = tuple(f"DiT-{size}/{p}" for size in DIT_SIZES for p in PATCHES) + ("MLP",)


def create_model(name: str, **overrides):
    """Build a model by registry name; keyword overrides replace the size's defaults.

    DiT overrides: input_size, in_channels, num_classes, hidden_size, depth, num_heads, mlp_ratio, time_scale.
    MLP overrides: dim, width, depth, num_classes, time_scale.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    cls, kwargs = MLP, {}
    if name != "MLP":
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = DIT_SIZES[size]
        cls, kwargs = DiT, dict(patch_size=int(patch), hidden_size=hidden, depth=depth, num_heads=heads)
    valid = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown override(s) {unknown}; valid: {', '.join(valid)}")
    return cls(**{**kwargs, **overrides})


__all__ = ["DiT", "MLP", "MODEL_NAMES", "create_model"]
