"""A residual MLP for vector data z (B, D), conditioned like the DiT on t, (t - r) and an optional label.

    c = T_t(t) + T_h(t - r) + Y(y)
    h = W_in z + c;  h = h + W_2 SiLU(W_1 SiLU(h))  (x depth);  u = W_out SiLU(h)
"""

import torch
import torch.nn as nn

from meanflow.models.inputs import check_model_inputs
from meanflow.models.layers import LabelEmbedder, TimestepEmbedder, linear_dual, silu_dual, tangent_dtype
from meanflow.models.prediction import PREDICTIONS, velocity_from_output, velocity_from_output_tangent


class ResidualBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h):
        return h + self.fc2(nn.functional.silu(self.fc1(nn.functional.silu(h))))

    def dual(self, h, dh):
        a, da = linear_dual(self.fc1, *silu_dual(h, dh))
        a, da = linear_dual(self.fc2, *silu_dual(a, da))
        return h + a, dh + da


class MLP(nn.Module):
    def __init__(self, dim: int = 2, width: int = 256, depth: int = 3, num_classes: int = 0, time_scale: float = 1.0,
                 prediction: str = "u"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction  # "u": the output is u; "x": a clean point u is read from (models.prediction)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.dim, self.num_classes = dim, num_classes
        self.sample_shape = (dim,)
        self.check_values = True
        self.tangent_precision = "fp32"  # "fp32" or "primal": the tangent dtype under bf16 (layers.tangent_dtype)
        self.in_proj = nn.Linear(dim, width)
        self.t_embedder = TimestepEmbedder(width, time_scale=time_scale)
        self.h_embedder = TimestepEmbedder(width, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList([ResidualBlock(width) for _ in range(depth)])
        self.out_proj = nn.Linear(width, dim)
        nn.init.zeros_(self.out_proj.weight)  # start at u = 0, like the DiT's zero-initialised output
        nn.init.zeros_(self.out_proj.bias)

    def _condition(self, y, batch, device):
        if self.y_embedder is None:
            return None
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.y_embedder(y)

    def forward(self, z, r, t, y=None):
        check_model_inputs(z, r, t, y, sample_shape=self.sample_shape, num_classes=self.num_classes,
                           check_values=self.check_values)
        # z follows the weights' dtype, as the DiT's tokens do: bf16 parameters (FSDP mixed precision) see bf16 input
        h = self.in_proj(z.to(self.in_proj.weight.dtype)) + self.t_embedder(t) + self.h_embedder(t - r)  # (B, W)
        cy = self._condition(y, z.shape[0], z.device)
        if cy is not None:
            h = h + cy
        for block in self.blocks:
            h = block(h)
        out = self.out_proj(nn.functional.silu(h))  # (B, D)
        return velocity_from_output(z, t, out, self.prediction)

    def dual(self, z, r, t, y, dz, dr, dt):
        check_model_inputs(z, r, t, y, sample_shape=self.sample_shape, num_classes=self.num_classes,
                           check_values=self.check_values, dz=dz)
        td = tangent_dtype(self.in_proj.weight, self.tangent_precision)  # every layer below keeps it
        h, dh = linear_dual(self.in_proj, z.to(self.in_proj.weight.dtype), dz.to(td))
        a, da = self.t_embedder.dual(t, dt.to(td))
        b, db = self.h_embedder.dual(t - r, (dt - dr).to(td))
        h, dh = h + a + b, dh + da + db
        cy = self._condition(y, z.shape[0], z.device)
        if cy is not None:
            h = h + cy
        for block in self.blocks:
            h, dh = block.dual(h, dh)
        out, dout = linear_dual(self.out_proj, *silu_dual(h, dh))
        u = velocity_from_output(z, t, out, self.prediction)
        return u, velocity_from_output_tangent(z, t, out, dz, dt, dout, self.prediction)
