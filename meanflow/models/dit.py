"""DiT with adaLN-Zero (Peebles & Xie), conditioned on t, (t - r) and a class label, with a dual form.

    c = T_t(t) + T_h(t - r) + Y(y)                              # (B, D) conditioning
    per block: shift, scale, gate (x2) = Linear(SiLU(c))
               x = x + gate_a * Attn(LN(x) * (1 + scale_a) + shift_a)
               x = x + gate_m * MLP (LN(x) * (1 + scale_m) + shift_m)
    long_skips (U-ViT, Bao et al.): block i of the second half reads W_i [x ; x_j], x_j the input of its mirror
               block j = L - 1 - i of the first half
    canvas     (image predictions): the patches tile only the centred canvas x canvas window of z, and the clean image
               D is the background (-1) outside it, so u = (z + 1) / tau there; only the canvas need be divisible by
               the patch (the demo: patch 6 on a 24 x 24 canvas of a 32 x 32 input)

``forward(z, r, t, y)`` is the plain network u(z, r, t | y). ``dual(z, r, t, y, dz, dr, dt)`` returns (u, du): the
same u with its graph, and its directional derivative along (dz, dr, dt) with no graph. Attention and adaLN call
mfkernels, which picks the Triton kernels or the torch reference.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import mfkernels
from meanflow.models.inputs import check_model_inputs
from meanflow.models.layers import (
    LabelEmbedder,
    Mlp,
    TimestepEmbedder,
    linear_dual,
    merge_heads,
    no_autocast,
    silu_dual,
    split_heads,
    tangent_dtype,
)
from meanflow.models.prediction import (
    PREDICTIONS,
    image_from_output,
    image_from_output_tangent,
    velocity_from_image,
    velocity_from_image_tangent,
    velocity_from_output,
    velocity_from_output_tangent,
)

# ----------------------------------------------------------------------------------------------------------------------
# blocks
# ----------------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        return self.proj(merge_heads(mfkernels.attention(q, k, v)))

    def dual(self, x, dx):
        qkv, dqkv = linear_dual(self.qkv, x, dx)
        q, k, v = split_heads(qkv, self.num_heads)
        dq, dk, dv = split_heads(dqkv, self.num_heads)
        o, do = mfkernels.attention_jvp(q, k, v, dq, dk, dv)
        return linear_dual(self.proj, merge_heads(o), merge_heads(do))


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden, num_heads)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = mfkernels.gated_residual(x, gate_a, self.attn(mfkernels.adaln_modulate(x, shift_a, scale_a)))
        x = mfkernels.gated_residual(x, gate_m, self.mlp(mfkernels.adaln_modulate(x, shift_m, scale_m)))
        return x  # (B, N, D)

    def dual(self, x, dx, c, dc):
        mod, dmod = linear_dual(self.adaLN_modulation[1], *silu_dual(c, dc))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)
        dshift_a, dscale_a, dgate_a, dshift_m, dscale_m, dgate_m = dmod.chunk(6, dim=1)
        h, dh = mfkernels.adaln_modulate_jvp(x, shift_a, scale_a, dx, dshift_a, dscale_a)
        h, dh = self.attn.dual(h, dh)
        x, dx = mfkernels.gated_residual_jvp(x, gate_a, h, dx, dgate_a, dh)
        h, dh = mfkernels.adaln_modulate_jvp(x, shift_m, scale_m, dx, dshift_m, dscale_m)
        h, dh = self.mlp.dual(h, dh)
        return mfkernels.gated_residual_jvp(x, gate_m, h, dx, dgate_m, dh)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(mfkernels.adaln_modulate(x, shift, scale))

    def dual(self, x, dx, c, dc):
        mod, dmod = linear_dual(self.adaLN_modulation[1], *silu_dual(c, dc))
        shift, scale = mod.chunk(2, dim=1)
        dshift, dscale = dmod.chunk(2, dim=1)
        h, dh = mfkernels.adaln_modulate_jvp(x, shift, scale, dx, dshift, dscale)
        return linear_dual(self.linear, h, dh)


class ConvHead(nn.Module):
    """A residual pixel-space refinement of the unpatchified output: y + conv_2(silu(conv_1(y))), 3x3 convolutions.

    A linear patch head writes each p x p patch from its own token alone, so nothing ties a pixel to its neighbour
    across a patch border; at patch 8 the seams and the grain within strokes show in 1-NFE samples. conv_2 starts
    at zero, so the head starts as the identity and the DiT's init is unchanged.
    """

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.conv_1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_2 = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, y):
        return y + self.conv_2(F.silu(self.conv_1(y)))

    def dual(self, y, dy):
        h = self.conv_1(y)
        with torch.no_grad(), no_autocast(dy):
            dh = F.conv2d(dy, self.conv_1.weight.to(dy.dtype), padding=1)  # biases are constant: no tangent
        a, da = silu_dual(h, dh)
        with torch.no_grad(), no_autocast(dy):
            dout = dy + F.conv2d(da, self.conv_2.weight.to(dy.dtype), padding=1)
        return y + self.conv_2(a), dout


HEADS = ("linear", "conv")
BACKGROUND = -1.0  # the clean image outside a canvas: black, for images scaled to [-1, 1]


def canvas_error(input_size: int, patch_size: int, canvas: int, prediction: str):
    """Why a DiT of these sizes cannot draw on this canvas (0: none, the patches tile the whole input), or None when
    it can. Only the tiled side need be divisible by the patch."""
    if canvas in (0, input_size):
        if input_size % patch_size:
            return f"input_size {input_size} is not divisible by patch_size {patch_size}"
        return None
    if prediction == "u":
        return f"canvas {canvas}: needs an image prediction (\"x\" or \"x_tanh\"): u has no background"
    if not 0 < canvas < input_size or (input_size - canvas) % 2 or canvas % patch_size:
        return (f"canvas {canvas}: must be below input_size {input_size} by an even number of pixels and divisible "
                f"by patch_size {patch_size}")
    return None


class LongSkip(nn.Module):
    """U-ViT's long skip into a second-half block: Linear([x ; skip]) from 2D to D features per token.

    A pixel-space model at large patches must carry each patch's detail from the input through every block; the skip
    hands the second half the first half's inputs directly (on the MNIST demo, 1-NFE FID -5% on each of two seeds at
    +5% time a step).
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(2 * hidden, hidden)

    def forward(self, x, skip):
        return self.linear(torch.cat([x, skip], dim=-1))

    def dual(self, x, skip, dx, dskip):
        return linear_dual(self.linear, torch.cat([x, skip], dim=-1), torch.cat([dx, dskip], dim=-1))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding of MAE/DiT, (grid*grid, dim) in float64.

    Token k = i * grid + j sits at row i, column j (the patch order of x_embedder's flatten). With D = dim / 4 and
    omega_d = 10000^(-d / D), d < D:
        embed[k] = [sin(j omega), cos(j omega), sin(i omega), cos(i omega)]
    the column half first, as in MAE/DiT (their meshgrid(w, h) puts w first), so that weights ported from DiT, SiT or
    MeanFlow checkpoints see the positions they were trained with.
    """
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    row, col = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def embed(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([embed(col), embed(row)], axis=1)


# ----------------------------------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------------------------------

class DiT(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        time_scale: float = 1.0,
        prediction: str = "u",
        head: str = "linear",
        long_skips: bool = False,
        canvas: int = 0,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction  # "u": the output is u; "x": a clean image u is read from (models.prediction)
        error = canvas_error(input_size, patch_size, canvas, prediction)
        if error:
            raise ValueError(error)
        canvas = canvas or input_size
        self.canvas, self.margin = canvas, (input_size - canvas) // 2  # margin: pixels of background on each side
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes = num_classes
        self.sample_shape = (in_channels, input_size, input_size)
        self.check_values = True  # the trainer turns value checks off: it builds r, t and y itself
        self.checkpoint_blocks = False  # activation checkpointing of each block (set by meanflow.parallel)
        self.tangent_precision = "fp32"  # "fp32" or "primal": the tangent dtype under bf16 (layers.tangent_dtype)
        grid = canvas // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.h_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)  # embeds the interval t - r
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        pos = torch.from_numpy(sincos_pos_embed_2d(hidden_size, grid)).float()[None]
        self.register_buffer("pos_embed", pos, persistent=False)  # (1, T, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        # one per second-half block, the last depth // 2 (an odd depth's middle block has none)
        self.long_skips = nn.ModuleList([LongSkip(hidden_size) for _ in range(depth // 2)]) if long_skips else None
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.conv_head = ConvHead(in_channels) if head == "conv" else None  # "linear": the DiT's head alone
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: xavier linears, zeroed adaLN modulation and output, so every block starts as the identity (the
        long skips' linears too are xavier, as U-ViT's default init: a random mix of the two inputs at the start)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)
        if self.conv_head is not None:  # conv_1 keeps torch's default init: xavier on a 3x3 conv is not DiT's
            nn.init.zeros_(self.conv_head.conv_2.weight)
            nn.init.zeros_(self.conv_head.conv_2.bias)

    # --------------------------------------------------------------------------------------------------------------

    def _check(self, z, r, t, y, **tangents):
        check_model_inputs(z, r, t, y, sample_shape=self.sample_shape, num_classes=self.num_classes,
                           check_values=self.check_values, **tangents)

    def _labels(self, y, batch, device):
        if self.y_embedder is None:
            return None
        if y is None:  # no labels on a conditional model: the null class, i.e. unconditional
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return y

    def _crop(self, z):
        """The canvas: the centred canvas x canvas window of z (all of z without a canvas)."""
        m = self.margin
        return z[..., m:m + self.canvas, m:m + self.canvas] if m else z

    def _tokens(self, z):
        # inputs and buffers follow the weights' dtype, so bf16 parameters (FSDP mixed precision) see bf16 tokens;
        # contiguous: torch 2.13's inductor (CPU) returns wrong gradients for compiled blocks fed the transposed view
        x = self.x_embedder(self._crop(z).to(self.x_embedder.weight.dtype))
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, T, D)
        return x + self.pos_embed.to(x.dtype)

    def _run_blocks(self, method, *args):
        """Apply ``block.<method>`` in turn, through activation checkpointing when it is on and grads are needed.

        ``args`` is the carry ((x,) or (x, dx)) then the conditioning ((c,) or (c, dc)). With long skips, the first
        depth // 2 blocks push their input carry and each of the last depth // 2 pops one into its skip first.
        """
        carry, cond = args[: len(args) // 2], args[len(args) // 2:]
        depth, stack = len(self.blocks), []
        n_skip = len(self.long_skips) if self.long_skips is not None else 0
        for i, block in enumerate(self.blocks):
            if i < n_skip:
                stack.append(carry)
            elif i >= depth - n_skip:
                skip = self.long_skips[i - (depth - n_skip)]
                popped = stack.pop()
                if method == "forward":
                    carry = (skip(carry[0], popped[0]),)
                else:
                    carry = skip.dual(carry[0], popped[0], carry[1], popped[1])
            fn = block if method == "forward" else getattr(block, method)  # __call__ runs FSDP's hooks
            if self.checkpoint_blocks and torch.is_grad_enabled():
                carry = checkpoint(fn, *carry, *cond, use_reentrant=False)
            else:
                carry = fn(*carry, *cond)
            carry = carry if isinstance(carry, tuple) else (carry,)
        return carry

    def _pad(self, image, value):
        """A canvas-sized image placed in the middle of the input's size, ``value`` around it."""
        return F.pad(image, [self.margin] * 4, value=value)

    def _unpatchify(self, x):
        B, T, _ = x.shape
        p, C, g = self.patch_size, self.in_channels, self.canvas // self.patch_size
        x = x.reshape(B, g, g, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, g * p, g * p)  # (B, C, H, W)

    def forward(self, z, r, t, y=None):
        """u(z, r, t | y): z (B, C, H, W), r and t (B,) with r <= t, y (B,) integer labels or None."""
        self._check(z, r, t, y)
        y = self._labels(y, z.shape[0], z.device)
        x = self._tokens(z)
        c = self.t_embedder(t) + self.h_embedder(t - r)  # (B, D)
        if y is not None:
            c = c + self.y_embedder(y)
        (x,) = self._run_blocks("forward", x, c)
        out = self._unpatchify(self.final_layer(x, c))  # (B, C, H, W)
        if self.conv_head is not None:
            out = self.conv_head(out)
        if not self.margin:
            return velocity_from_output(z, t, out, self.prediction)
        return velocity_from_image(z, t, self._pad(image_from_output(out, self.prediction), BACKGROUND))

    def dual(self, z, r, t, y, dz, dr, dt):
        """(u, du): u as in forward (with its graph), du = J u . (dz, dr, dt) with no graph.

        dr and dt are tensors of shape (B,) (the tangents of r and t). du comes back in the tangent's dtype (fp32
        under bf16 unless ``tangent_precision`` is "primal"), u in the primal's.
        """
        self._check(z, r, t, y, dz=dz)
        y = self._labels(y, z.shape[0], z.device)
        x = self._tokens(z)
        w = self.x_embedder.weight
        td = tangent_dtype(w, self.tangent_precision)  # every layer below keeps the tangent in this dtype
        with torch.no_grad(), no_autocast(dz):
            dx = F.conv2d(self._crop(dz).to(td), w.to(td), stride=self.patch_size)
            dx = dx.flatten(2).transpose(1, 2)  # (B, T, D); bias and position embedding are constant
        c, dc = self.t_embedder.dual(t, dt.to(td))
        h, dh = self.h_embedder.dual(t - r, (dt - dr).to(td))
        c, dc = c + h, dc + dh
        if y is not None:
            c = c + self.y_embedder(y)  # labels are discrete: no tangent
        x, dx = self._run_blocks("dual", x, dx, c, dc)
        out, dout = self.final_layer.dual(x, dx, c, dc)
        out, dout = self._unpatchify(out), self._unpatchify(dout)  # (B, C, H, W) each
        if self.conv_head is not None:
            out, dout = self.conv_head.dual(out, dout)
        if not self.margin:
            u = velocity_from_output(z, t, out, self.prediction)
            return u, velocity_from_output_tangent(z, t, out, dz, dt, dout, self.prediction)
        image = image_from_output(out, self.prediction)
        dimage = self._pad(image_from_output_tangent(image, dout, self.prediction), 0.0)  # the background is constant
        image = self._pad(image, BACKGROUND)
        return velocity_from_image(z, t, image), velocity_from_image_tangent(z, t, image, dz, dt, dimage)
