"""The in-context DiT of improved MeanFlow (iMF, arXiv 2512.02012), with a dual form; no adaLN.

    sequence = [class (8) | omega (4) | t_min (2) | t_max (2) | h (4) | patches (T)]     each prefix token is a learned
               token + its condition's embedding: y (a table), 1 - 1/omega, t_min, t_max, h = t - r (sinusoid + MLP)
    blocks   = pre-RMSNorm attention (bias-free, QK-RMSNorm, 1-D RoPE over the whole sequence) and SwiGLU, each branch
               behind a zero-initialised per-channel gate (meanflow.models.imf_layers)
    u path   = blocks[0 : depth] -> RMSNorm + Linear on the patch tokens -> u
    v path   = blocks[0 : depth - a] -> v_blocks (a copies) -> its own RMSNorm + Linear -> v     a = aux_head_depth

t itself is not an input, only h = t - r (so a time tangent enters through dh = dt - dr). The v-head (an auxiliary
instantaneous-velocity prediction, training only) branches after the shared trunk; ``aux_head_depth = 0`` builds the
inference model, whose parameters are those of a trained model less ``v_blocks.*`` and ``v_final_layer.*``. Official
sizes count ``depth`` = trunk + one head: B/2 is a 4-block trunk and two 8-block heads.

Converting the official checkpoints (not done here): q_proj/k_proj/v_proj stack into attn.qkv, out_proj is attn.proj,
SwiGLU w1/w3 stack into mlp.w13, attn_scale/mlp_scale are attn_gate/mlp_gate, shared_blocks + u_heads are blocks,
v_heads are v_blocks, {class,omega,t_min,t_max,time}_tokens and their embedders are {y,omega,t_min,t_max,h}_tokens,
flax Dense kernels transpose and the patch conv goes HWIO -> OIHW. The official count of B/2 is 89.7M without its
v-head; this model's is 88.9M: the difference is exactly one more timestep embedder (256 D + D^2 + 2 D), which the
official parameter tree holds (an unused t embedder, it seems) and this model does not.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from meanflow.models.imf_layers import ConditionTokens, FinalLayer, ImfBlock, Rope1D
from meanflow.models.inputs import check_model_inputs
from meanflow.models.layers import no_autocast, tangent_dtype

COND_DEFAULTS = {"omega": 1.0, "t_min": 0.0, "t_max": 1.0}  # no guidance, over the whole interval
PREFIX = {"y": 8, "omega": 4, "t_min": 2, "t_max": 2, "h": 4}  # tokens per condition, in sequence order


def resolve_cond(cond, like, check_values=True):
    """(omega, t_min, t_max), each (B,) in ``like``'s dtype and device, defaults for None or a missing key."""
    cond = {} if cond is None else cond
    unknown = sorted(set(cond) - set(COND_DEFAULTS))
    if unknown:
        raise ValueError(f"cond: unknown key(s) {unknown}; valid: {', '.join(COND_DEFAULTS)}")
    out = []
    for key, default in COND_DEFAULTS.items():
        value = cond.get(key)
        if value is None:
            out.append(torch.full_like(like, default))
            continue
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(like.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"cond[{key!r}] must be a tensor of shape {tuple(like.shape)}, got {shape}")
        out.append(value.to(like))
    if check_values and bool((out[0] < 1).any()):
        raise ValueError("cond['omega'] must be >= 1 (1: no guidance)")
    return tuple(out)


class ImfDiT(nn.Module):
    is_imf = True  # the objective and the samplers branch on this

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 8 / 3,
        num_classes: int = 1000,
        aux_head_depth: int = 8,
        weight_init_constant: float = 0.32,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if not 0 <= aux_head_depth <= depth:
            raise ValueError(f"aux_head_depth must lie in [0, depth={depth}], got {aux_head_depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.depth, self.aux_head_depth = num_classes, depth, aux_head_depth
        self.weight_init_constant = weight_init_constant
        self.sample_shape = (in_channels, input_size, input_size)
        self.check_values = True  # the trainer turns value checks off: it builds r, t, y and cond itself
        self.checkpoint_blocks = False  # activation checkpointing of each block (set by meanflow.parallel)
        self.tangent_precision = "fp32"  # "fp32" or "primal": the tangent dtype under bf16 (layers.tangent_dtype)
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        # an unconditional model has no class tokens (nothing to attend to but a constant)
        self.y_tokens = ConditionTokens(PREFIX["y"], hidden_size, num_classes) if num_classes > 0 else None
        self.omega_tokens = ConditionTokens(PREFIX["omega"], hidden_size)
        self.t_min_tokens = ConditionTokens(PREFIX["t_min"], hidden_size)
        self.t_max_tokens = ConditionTokens(PREFIX["t_max"], hidden_size)
        self.h_tokens = ConditionTokens(PREFIX["h"], hidden_size)
        self.num_prefix = sum(PREFIX.values()) - (PREFIX["y"] if num_classes == 0 else 0)
        self.rope = Rope1D(hidden_size // num_heads, self.num_prefix + (input_size // patch_size) ** 2)
        self.blocks = nn.ModuleList([ImfBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.v_blocks = nn.ModuleList([ImfBlock(hidden_size, num_heads, mlp_ratio) for _ in range(aux_head_depth)])
        self.v_final_layer = FinalLayer(hidden_size, patch_size, in_channels) if aux_head_depth > 0 else None
        self.initialize_weights()

    def initialize_weights(self):
        """The official init: block linears N(0, (c^2 / fan_in)), c = weight_init_constant; xavier patch embedding;
        zero gates and outputs (every block starts as the identity, u and v at zero); norms at one."""
        for blocks in (self.blocks, self.v_blocks):
            for m in blocks.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=self.weight_init_constant / m.in_features**0.5)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for tokens in self._condition_tokens():
            tokens.initialize(self.x_embedder.out_channels)
        for final in (self.final_layer, self.v_final_layer):
            if final is not None:
                nn.init.zeros_(final.linear.weight)
                nn.init.zeros_(final.linear.bias)

    def _condition_tokens(self):
        tokens = [self.omega_tokens, self.t_min_tokens, self.t_max_tokens, self.h_tokens]
        return tokens if self.y_tokens is None else [self.y_tokens, *tokens]

    # --------------------------------------------------------------------------------------------------------------

    def _check(self, z, r, t, y, **tangents):
        check_model_inputs(z, r, t, y, sample_shape=self.sample_shape, num_classes=self.num_classes,
                           check_values=self.check_values, **tangents)

    def _labels(self, y, batch, device):
        if self.y_tokens is None:
            return None
        if y is None:  # no labels on a conditional model: the null class, i.e. unconditional
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return y

    def _fixed_prefix(self, y, cond, t):
        """The class and guidance tokens, which carry no tangent: [class | omega | t_min | t_max], (B, P - 4, D)."""
        omega, t_min, t_max = resolve_cond(cond, t, self.check_values)
        parts = [] if y is None else [self.y_tokens(y)]
        parts += [self.omega_tokens(1 - 1 / omega), self.t_min_tokens(t_min), self.t_max_tokens(t_max)]
        return torch.cat(parts, dim=1)

    def _patches(self, z):
        return self.x_embedder(z.to(self.x_embedder.weight.dtype)).flatten(2).transpose(1, 2)  # (B, T, D)

    def _run(self, blocks, method, *carry):
        """Apply ``block.<method>`` in turn, through activation checkpointing when it is on and grads are needed."""
        for block in blocks:
            fn = block if method == "forward" else getattr(block, method)  # __call__ runs FSDP's hooks
            if self.checkpoint_blocks and torch.is_grad_enabled():
                carry = checkpoint(fn, *carry, self.rope, use_reentrant=False)
            else:
                carry = fn(*carry, self.rope)
            carry = carry if isinstance(carry, tuple) else (carry,)
        return carry

    def _unpatchify(self, x):
        x = x[:, self.num_prefix:]  # the patch tokens
        B, T, _ = x.shape
        p, C, g = self.patch_size, self.in_channels, self.input_size // self.patch_size
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, g * p, g * p)  # (B, C, H, W)

    def _v_head(self, x):
        if self.v_final_layer is None:
            raise ValueError("return_v: this model has no v-head (built with aux_head_depth=0, for inference)")
        (x,) = self._run(self.v_blocks, "forward", x)
        return self._unpatchify(self.v_final_layer(x))

    def forward(self, z, r, t, y=None, cond=None, return_v=False):
        """u(z, r, t | y, cond), or (u, v) with return_v. z (B, C, H, W); r, t (B,) with r <= t; y (B,) or None;
        cond None or a dict of (B,) tensors omega (>= 1), t_min, t_max (defaults 1, 0, 1)."""
        self._check(z, r, t, y)
        y = self._labels(y, z.shape[0], z.device)
        x = self._patches(z)
        x = torch.cat([self._fixed_prefix(y, cond, t).to(x.dtype), self.h_tokens(t - r).to(x.dtype), x], dim=1)
        trunk = self.depth - self.aux_head_depth
        (x,) = self._run(self.blocks[:trunk], "forward", x)
        (xu,) = self._run(self.blocks[trunk:], "forward", x)
        u = self._unpatchify(self.final_layer(xu))  # (B, C, H, W)
        return (u, self._v_head(x)) if return_v else u

    def dual(self, z, r, t, y, dz, dr, dt, cond=None, return_v=False):
        """(u, du) or (u, du, v): u and v as in forward (with their graphs), du = J u . (dz, dr, dt) with no graph.

        dr and dt are (B,) tensors. The conditions in cond are constants (no tangent), and only h = t - r enters the
        network, so the time tangents act through dh = dt - dr. du comes back in the tangent's dtype (fp32 under bf16
        unless ``tangent_precision`` is "primal"), u and v in the primal's.
        """
        self._check(z, r, t, y, dz=dz)
        y = self._labels(y, z.shape[0], z.device)
        x = self._patches(z)
        w = self.x_embedder.weight
        td = tangent_dtype(w, self.tangent_precision)  # every layer below keeps the tangent in this dtype
        with torch.no_grad(), no_autocast(dz):
            dx = F.conv2d(dz.to(td), w.to(td), stride=self.patch_size).flatten(2).transpose(1, 2)  # (B, T, D)
        fixed = self._fixed_prefix(y, cond, t).to(x.dtype)
        h, dh = self.h_tokens.dual(t - r, (dt - dr).to(td))
        x = torch.cat([fixed, h.to(x.dtype), x], dim=1)
        dx = torch.cat([torch.zeros(fixed.shape, dtype=td, device=dx.device), dh, dx], dim=1)
        trunk = self.depth - self.aux_head_depth
        x, dx = self._run(self.blocks[:trunk], "dual", x, dx)
        xu, dxu = self._run(self.blocks[trunk:], "dual", x, dx)
        u, du = self.final_layer.dual(xu, dxu)
        u, du = self._unpatchify(u), self._unpatchify(du)  # (B, C, H, W) each
        return (u, du, self._v_head(x)) if return_v else (u, du)
