"""FLOPs of one MeanFlow (or iMF) training step, the devices' peak rates, MFU, and a memory estimate per preset.

A matmul of (m, k) by (k, n) costs 2 m n k FLOPs. Per image, a DiT of depth L, width D, H heads, MLP width M (4 D),
T = (input_size / patch)^2 tokens of C p^2 values each and the embedders' 256 sinusoid features, forward:

    patch embed         2 T (C p^2) D                      (a stride-p convolution: a matmul per token)
    t and (t - r)       2 x 2 (256 D + D^2)                (two time embedders, each Linear-SiLU-Linear)
    per block           adaLN 2 D (6 D)  +  qkv 2 T D (3 D)  +  attention 2 T^2 D (Q K^T) + 2 T^2 D (P V)
                        +  out proj 2 T D^2  +  MLP 2 x 2 T D M
    final layer         adaLN 2 D (2 D)  +  linear 2 T D (p^2 C)
    long skips          L // 2 x 2 T (2 D) D               (model.long_skips: one Linear from 2D to D per skip)
With model.canvas the patches tile the canvas only: T = (canvas / patch)^2.

Neglected: everything that is not a matmul (LayerNorm, modulation, softmax, GELU/SiLU, residuals, biases, the
sinusoids, the label lookup): O(T D) per layer against O(T D^2), under 1% for the paper's sizes. This is the count
torch.utils.flop_counter.FlopCounterMode makes layer by layer (tests/meanflow/test_flops.py).

Write F for the forward, A for its attention part (L x 4 T^2 D) and E for the layers whose input needs no gradient
(the patch embed and the first Linear of each time embedder: their backward computes the weight gradient only).

    backward of a forward F      2 F - E              (input and weight gradients, each a matmul of the forward's size)
    dual forward (primal + tangent, models/layers.py, DESIGN.md)    2 F + A
        every Linear and the patch embed run once more on the tangent (dy = dx W^T); attention's tangent is four
        matmuls (dq k^T, q dk^T, (P dS) V, P dV) against the primal's two (Q K^T, P V)

A step per image (meanflow/objective.py, meanflow_loss), with rho the share of rows with r != t (exactly
round(ratio_r_neq_t G) / G of a global batch G) and g guidance forwards:

    ratio_r_neq_t = 0 (flow matching)          F + (2 F - E)                                  + g F
    ratio_r_neq_t <= JVP_SPLIT_MAX_RATIO       F + (2 F - E) + rho (2 F + A)                  + g F
        (a forward of all rows with gradients, its backward, a no-grad dual pass of the r != t rows)
    otherwise                                  (2 F + A) + (2 F - E)                          + g F
        (one dual pass of all rows with gradients; the tangent is under no_grad, so the backward is the primal's)

    g = P_I ((1 - delta) [1 - cfg_w - cfg_k != 0] + c [cfg_k != 0]) on a class-conditional model with guidance in
        training, else 0: objective.guided_velocity's one no-grad forward, over the rows it guides (t in the guidance
        interval, probability P_I; the label kept, a share 1 - delta of the rows), of u(z, t, t | null) on each and of
        u(z, t, t | y) where the training forward has not given it, on a share c of the rows: 0 for flow matching, the
        r != t rows with a kept label for the split, 1 - delta for one dual pass. Expected FLOPs where an interval
        applies (P_I = F(t_end)^2 - F(t_start)^2, t the larger of two draws of CDF F), exact counts otherwise.

On an iMF model (meanflow.models.imf_dit) the dual pass's tangent skips the class and guidance tokens (constants
along it), so the tangent adds F - (three embedders) + A rather than F + A: ForwardFlops.tangent holds it. An iMF
step (objective.kind "imf", meanflow/objective_imf.py) has its own passes, with F_v the training forward (u and the
v-head's v), E its no-gradient layers and U the tangent of the u path (the v-head takes no tangent):

    objective.kind = "imf"      g F_v + (F_v + U) + (2 F_v - E)
        (one no-grad forward of the guidance rows through the trunk and both heads: g = 2 on a class-conditional
        model, the (y, w) and (null, 1) copies of every row, g = 1 without labels; one dual pass of every row, the
        v-head in the same pass; its backward, through both heads and the shared trunk once)

These are the dual engine's model FLOPs (PaLM's convention; objective.engine "func" runs more): recomputation is not
counted, neither activation checkpointing's second forward nor the flash attention backward's second Q K^T, nor the
torch reference attention's P recomputed in fp32 for an fp32 tangent on a bf16 primal. A rank that drew no r != t
row runs its dual pass on one row (its model calls must match the others'): ignored.

MFU = step FLOPs per image x images/s over all ranks / (world size x the device's peak), the peak being the dense
(no 2:4 sparsity) tensor-core rate of the compute dtype: bf16 under train.precision bf16, TF32 under fp32 with
train.tf32 (FP32 without it), from NVIDIA's data sheets (PEAKS). Under bf16 the fp32 tangent's matmuls run at TF32's
rate, half bf16's, so a bf16 run's MFU counts them at a rate they cannot reach. No CUDA device: no peak, no MFU.
"""

import argparse
import inspect
import math
import re
import sys
from dataclasses import dataclass, replace

import torch

from meanflow.models import DIT_SIZES, IMF_SIZES
from meanflow.models.imf_dit import PREFIX
from meanflow.models.mlp import MLP
from meanflow.objective import JVP_SPLIT_MAX_RATIO

FREQ_DIM = 256  # sinusoid features of the time embedders (meanflow.models.layers.TimestepEmbedder)
CONV_HEAD_HIDDEN = 32  # channels of the DiT's optional conv head (model.head "conv": two 3x3 convolutions)

# ----------------------------------------------------------------------------------------------------------------------
# the forward, layer by layer
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardFlops:
    """FLOPs of one forward for one image: per layer (keyed by the model's module names; a block's attention core
    is ``blocks.<i>.attn.core``), the attention core's share and that of the layers whose input needs no gradient.
    ``tangent``: what the tangent adds to a dual pass; None means every layer carries one, i.e. F + A."""

    layers: dict
    attention: int
    no_input_grad: int
    tangent: int = None

    @property
    def total(self) -> int:
        return sum(self.layers.values())

    @property
    def dual_tangent(self) -> int:
        return self.total + self.attention if self.tangent is None else self.tangent


def _linear(m, k, n):
    return 2 * m * k * n


def _time_embedder(prefix, hidden):
    return {f"{prefix}.mlp.0": _linear(1, FREQ_DIM, hidden), f"{prefix}.mlp.2": _linear(1, hidden, hidden)}


def dit_forward_flops(input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio=4.0,
                      head="linear", long_skips=False, canvas=0):
    """ForwardFlops of meanflow.models.dit.DiT with these sizes (num_heads does not change the count). The conv
    head adds two 3x3 convolutions over the input_size^2 pixels: 2 S^2 (9 C) h + 2 S^2 (9 h) C, h its width; long
    skips one 2D -> D Linear over the T tokens per second-half block. A canvas (0: the whole input) is the side of
    the window the patches tile (and the conv head convolves)."""
    side = canvas or input_size
    T, D, P = (side // patch_size) ** 2, hidden_size, patch_size * patch_size * in_channels
    M = int(D * mlp_ratio)
    layers = {"x_embedder": _linear(T, P, D), **_time_embedder("t_embedder", D), **_time_embedder("h_embedder", D)}
    for i in range(depth):
        b = f"blocks.{i}"
        layers.update({
            f"{b}.adaLN_modulation.1": _linear(1, D, 6 * D),
            f"{b}.attn.qkv": _linear(T, D, 3 * D),
            f"{b}.attn.core": 2 * _linear(T, D, T),  # Q K^T and P V, all heads together
            f"{b}.attn.proj": _linear(T, D, D),
            f"{b}.mlp.fc1": _linear(T, D, M),
            f"{b}.mlp.fc2": _linear(T, M, D),
        })
    if long_skips:
        layers.update({f"long_skips.{i}.linear": _linear(T, 2 * D, D) for i in range(depth // 2)})
    layers.update({"final_layer.adaLN_modulation.1": _linear(1, D, 2 * D), "final_layer.linear": _linear(T, D, P)})
    if head == "conv":
        pixels, h = side * side, CONV_HEAD_HIDDEN
        layers.update({"conv_head.conv_1": _linear(pixels, 9 * in_channels, h),
                       "conv_head.conv_2": _linear(pixels, 9 * h, in_channels)})
    no_grad_in = layers["x_embedder"] + layers["t_embedder.mlp.0"] + layers["h_embedder.mlp.0"]
    return ForwardFlops(layers, depth * layers["blocks.0.attn.core"] if depth else 0, no_grad_in)


def mlp_forward_flops(dim, width=None, depth=None):
    """ForwardFlops of meanflow.models.mlp.MLP (its default width and depth unless given)."""
    defaults = inspect.signature(MLP.__init__).parameters
    width = defaults["width"].default if width is None else width
    depth = defaults["depth"].default if depth is None else depth
    layers = {"in_proj": _linear(1, dim, width), **_time_embedder("t_embedder", width),
              **_time_embedder("h_embedder", width)}
    for i in range(depth):
        layers.update({f"blocks.{i}.fc1": _linear(1, width, width), f"blocks.{i}.fc2": _linear(1, width, width)})
    layers["out_proj"] = _linear(1, width, dim)
    no_grad_in = layers["in_proj"] + layers["t_embedder.mlp.0"] + layers["h_embedder.mlp.0"]
    return ForwardFlops(layers, 0, no_grad_in)


def _imf_block(prefix, N, D, M):
    return {
        f"{prefix}.attn.qkv": _linear(N, D, 3 * D),
        f"{prefix}.attn.core": 2 * _linear(N, D, N),  # Q K^T and P V over the whole sequence, all heads together
        f"{prefix}.attn.proj": _linear(N, D, D),
        f"{prefix}.mlp.w13": _linear(N, D, 2 * M),  # W1 and W3 stacked
        f"{prefix}.mlp.w2": _linear(N, M, D),
    }


def imf_forward_flops(input_size, patch_size, in_channels, hidden_size, depth, num_heads, aux_head_depth,
                      num_classes, mlp_ratio=8 / 3, v_head=False):
    """ForwardFlops of meanflow.models.imf_dit.ImfDiT (num_heads does not change the count).

    N = T + P tokens: T patches and P prefix tokens (20, or 12 without class tokens). The class tokens are a table
    lookup; omega, t_min, t_max and h each have a time embedder. The blocks are bias-free, SwiGLU of hidden width
    M = int(D mlp_ratio) (three matmuls), and the final layers run on every token (the prefix is dropped after):

        patch embed 2 T (C p^2) D     4 embedders 4 x 2 (256 D + D^2)     final layer 2 N D (p^2 C)
        per block   qkv 2 N D (3 D) + attention 2 N^2 D + 2 N^2 D + out proj 2 N D^2 + SwiGLU 2 N D (2 M) + 2 N M D

    u runs the first ``depth`` blocks and the final layer; v_head adds the v-head's aux_head_depth blocks and its
    final layer (it branches after the trunk's depth - aux_head_depth blocks). A dual pass's tangent (``tangent``)
    runs the patch embed, the h embedder, the u path's blocks (attention's tangent: four matmuls against two) and
    its final layer: the class and guidance tokens are constants along the tangent, and the v-head takes none.
    """
    if v_head and aux_head_depth == 0:
        raise ValueError("meanflow.flops: v_head: this iMF model has no v-head (aux_head_depth=0)")
    T, D, P = (input_size // patch_size) ** 2, hidden_size, patch_size * patch_size * in_channels
    N, M = T + sum(PREFIX.values()) - (PREFIX["y"] if num_classes == 0 else 0), int(hidden_size * mlp_ratio)
    layers = {"x_embedder": _linear(T, P, D)}
    for cond in ("omega", "t_min", "t_max", "h"):
        layers.update(_time_embedder(f"{cond}_tokens.embedder", D))
    for i in range(depth):
        layers.update(_imf_block(f"blocks.{i}", N, D, M))
    layers["final_layer.linear"] = _linear(N, D, P)
    heads = [f"blocks.{i}" for i in range(depth)]
    if v_head:
        for i in range(aux_head_depth):
            layers.update(_imf_block(f"v_blocks.{i}", N, D, M))
        layers["v_final_layer.linear"] = _linear(N, D, P)
        heads += [f"v_blocks.{i}" for i in range(aux_head_depth)]
    u_attention = depth * layers["blocks.0.attn.core"] if depth else 0
    with_tangent = ("x_embedder", "h_tokens.", "blocks.", "final_layer.")  # v_blocks. and v_final_layer. excluded
    tangent = sum(v for k, v in layers.items() if k.startswith(with_tangent)) + u_attention
    no_grad_in = layers["x_embedder"] + sum(layers[f"{c}_tokens.embedder.mlp.0"] for c in ("omega", "t_min", "t_max",
                                                                                          "h"))
    attention = sum(layers[f"{b}.attn.core"] for b in heads)
    return ForwardFlops(layers, attention, no_grad_in, tangent)


def imf_patch(name):
    return int(name.split("/")[1])


def imf_size(model_cfg):
    """(depth, hidden, heads, aux_head_depth) of an iMF ``model.*`` section (its aux_head_depth override applied)."""
    depth, hidden, heads, aux = IMF_SIZES[model_cfg.name[len("iMF-"):].split("/")[0]]
    aux = aux if getattr(model_cfg, "aux_head_depth", -1) == -1 else model_cfg.aux_head_depth
    return depth, hidden, heads, aux


def model_forward_flops(model_cfg, v_head=False) -> ForwardFlops:
    """ForwardFlops of the network a ``model.*`` config section (meanflow.models.config.ModelConfig) builds: its
    forward for u (what sampling runs); with v_head, an iMF model's training forward (u and the v-head's v)."""
    name = model_cfg.name
    if name.startswith("iMF-"):
        depth, hidden, heads, aux = imf_size(model_cfg)
        return imf_forward_flops(model_cfg.input_size, imf_patch(name), model_cfg.in_channels, hidden, depth,
                                 heads, aux, model_cfg.num_classes, v_head=v_head)
    if v_head:
        raise ValueError(f"meanflow.flops: {name} has no v-head (objective.kind 'imf' needs an iMF model)")
    if name == "MLP":
        return mlp_forward_flops(model_cfg.in_channels)
    if name.startswith("DiT-") and name[len("DiT-"):].split("/")[0] in DIT_SIZES:
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = DIT_SIZES[size]
        return dit_forward_flops(model_cfg.input_size, int(patch), model_cfg.in_channels, hidden, depth, heads,
                                 head=getattr(model_cfg, "head", "linear"),
                                 long_skips=getattr(model_cfg, "long_skips", False),
                                 canvas=getattr(model_cfg, "canvas", 0))
    raise ValueError(f"meanflow.flops: no FLOP count for model {name!r} (counted: DiT-*, iMF-*, MLP)")


# ----------------------------------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------------------------------


def guidance_forwards(objective_cfg, conditional: bool, global_batch=None) -> float:
    """g: the no-grad forwards per image that guidance in training adds (objective.guided_velocity), the expected
    share of a batch that its one call runs on (module docstring)."""
    cfg = objective_cfg
    if not (conditional and cfg.guided):
        return 0.0
    inside = guidance_interval_share(cfg)
    dropped = cfg.class_drop if global_batch is None else round(cfg.class_drop * global_batch) / global_batch
    null = (1.0 - dropped) * inside if 1.0 - cfg.cfg_w - cfg.cfg_k != 0.0 else 0.0
    if cfg.cfg_k == 0.0 or cfg.ratio_r_neq_t == 0.0:  # flow matching: the training forward gives every u(z,t,t|y)
        return null
    if cfg.ratio_r_neq_t <= JVP_SPLIT_MAX_RATIO:  # the r != t rows with a kept label (dropped rows are r = t first)
        rho = r_neq_t_share(cfg, global_batch)
        return null + (rho - max(0.0, dropped - (1.0 - rho))) * inside
    return null + (1.0 - dropped) * inside


def guidance_interval_share(objective_cfg) -> float:
    """P(cfg_t_start <= t <= cfg_t_end) for t the larger of two draws of the time sampler: F(end)^2 - F(start)^2."""
    cfg = objective_cfg

    def cdf(x):  # one draw's
        if cfg.time_sampler == "uniform" or x <= 0.0 or x >= 1.0:
            return min(max(x, 0.0), 1.0)
        return 0.5 * (1.0 + math.erf((math.log(x / (1.0 - x)) - cfg.time_mu) / (cfg.time_sigma * math.sqrt(2.0))))

    return cdf(cfg.cfg_t_end) ** 2 - cdf(cfg.cfg_t_start) ** 2


def r_neq_t_share(objective_cfg, global_batch=None) -> float:
    """rho: the share of a global batch with r != t (objective.draw takes an exact count of rows)."""
    ratio = objective_cfg.ratio_r_neq_t
    if global_batch is None:
        return ratio
    return (global_batch - round((1.0 - ratio) * global_batch)) / global_batch


def step_flops_per_image(fwd: ForwardFlops, objective_cfg, conditional: bool, global_batch=None) -> float:
    """FLOPs of one MeanFlow training step per image (module docstring)."""
    F, E, dual = fwd.total, fwd.no_input_grad, fwd.total + fwd.dual_tangent  # dual: 2 F + A for a DiT
    guidance = guidance_forwards(objective_cfg, conditional, global_batch) * F
    if objective_cfg.ratio_r_neq_t == 0.0:
        return F + (2 * F - E) + guidance
    if objective_cfg.ratio_r_neq_t <= JVP_SPLIT_MAX_RATIO:
        return F + (2 * F - E) + r_neq_t_share(objective_cfg, global_batch) * dual + guidance
    return dual + (2 * F - E) + guidance


def imf_step_flops_per_image(fwd: ForwardFlops, conditional: bool) -> float:
    """FLOPs of one iMF training step per image (meanflow.objective_imf.imf_loss); fwd is the training forward
    (u and v: model_forward_flops(..., v_head=True)). Module docstring."""
    F, E = fwd.total, fwd.no_input_grad
    return (2 if conditional else 1) * F + (F + fwd.dual_tangent) + (2 * F - E)


def config_step_flops(cfg) -> float:
    """step_flops_per_image (or imf_step_flops_per_image) for a whole run config (meanflow.config.Config)."""
    conditional = cfg.model.num_classes > 0
    if getattr(cfg.objective, "kind", "meanflow") == "imf":
        return imf_step_flops_per_image(model_forward_flops(cfg.model, v_head=True), conditional)
    return step_flops_per_image(model_forward_flops(cfg.model), cfg.objective, conditional, cfg.train.global_batch)


# ----------------------------------------------------------------------------------------------------------------------
# peak rates and MFU
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak TFLOP/s of one GPU (NVIDIA's data sheets list bf16 and TF32 tensor rates "with sparsity", twice
    these)."""

    name: str
    bf16: float
    tf32: float
    fp32: float  # CUDA cores, no tensor cores: fp32 with train.tf32=false
    source: str


# First match wins: more specific names before their prefixes (H100 NVL before H100, L40S before L40 before L4).
PEAKS = [
    (r"\bB200\b", DevicePeak("B200 (HGX)", 2250, 1100, 75, "HGX B200 data sheet (per GPU)")),
    (r"\bH200\b.*\bNVL\b", DevicePeak("H200 NVL", 835.5, 417.5, 60, "H200 data sheet")),
    (r"\bH200\b", DevicePeak("H200 SXM", 989.5, 494.5, 67, "H200 data sheet")),
    (r"\bH100\b.*\bNVL\b", DevicePeak("H100 NVL", 835.5, 417.5, 60, "H100 data sheet")),
    (r"\bH100\b.*\bPCIe\b", DevicePeak("H100 PCIe", 756.5, 378, 51, "H100 data sheet")),
    (r"\bH100\b", DevicePeak("H100 SXM", 989.5, 494.5, 67, "H100 data sheet")),
    (r"\bA100\b", DevicePeak("A100 (SXM or PCIe)", 312, 156, 19.5, "A100 data sheet")),
    (r"\bL40S\b", DevicePeak("L40S", 362.05, 183, 91.6, "L40S data sheet")),
    (r"\bL40\b", DevicePeak("L40", 181.05, 90.5, 90.5, "L40 data sheet")),
    (r"\bL4\b", DevicePeak("L4", 121, 60, 30.3, "L4 data sheet")),
    (r"\bA10\b", DevicePeak("A10", 125, 62.5, 31.2, "A10 data sheet")),
]


def device_peak(device_name: str):
    """The DevicePeak of a CUDA device name (torch.cuda.get_device_name), or None for a device not in PEAKS."""
    for pattern, peak in PEAKS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return peak
    return None


def peak_flops_per_device(device, compute_dtype, tf32: bool, override_tflops: float = 0.0):
    """FLOP/s one device can reach in the step's compute dtype: override_tflops when > 0 (log.peak_tflops), else
    from PEAKS; None on a CPU or a GPU not in the table (MFU is then not logged)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if torch.device(device).type != "cuda":
        return None
    peak = device_peak(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    rate = peak.bf16 if compute_dtype in (torch.bfloat16, torch.float16) else (peak.tf32 if tf32 else peak.fp32)
    return rate * 1e12


def mfu(step_flops: float, images_per_s: float, world_size: int, peak_flops):
    """Model FLOPs utilisation: achieved model FLOP/s over world_size x the peak; None without a peak."""
    if not peak_flops:
        return None
    return step_flops * images_per_s / (world_size * peak_flops)


# ----------------------------------------------------------------------------------------------------------------------
# memory per GPU, estimated
# ----------------------------------------------------------------------------------------------------------------------

STATE_BYTES_PER_PARAM = 20  # fp32 weights 4 + fp32 gradients 4 + AdamW's two moments 8 + the fp32 EMA 4
SAVED_PER_TOKEN_PER_BLOCK = 18  # activations a DiT block keeps for its backward, in units of D values per token
# an iMF block's, measured with torch.autograd.graph.saved_tensors_hooks on a CPU fp32 block (D 768 and 1024, 276
# tokens): 26.8 besides its input (norm outputs, q k v, normed and rotated q k, attention output and its log-sum-exp,
# merged heads, out proj, SwiGLU's 2 M + M + M, its output), so 28 with the input. Under bf16 the norms' fp32
# internals add a little.
IMF_SAVED_PER_TOKEN_PER_BLOCK = 28


def parameter_count(model_cfg) -> int:
    from meanflow.models import create_model

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(model_cfg.name, **model_cfg.build_kwargs())
    return sum(p.numel() for p in model.parameters())


def memory_per_gpu_bytes(cfg, gpus: int = 8, activation_checkpointing: bool = False) -> float:
    """Estimated (not measured) peak memory of one of `gpus` GPUs training cfg under FSDP2.

        state        20 N / gpus                          (N parameters: fp32 weights, gradients, AdamW m and v, EMA)
        gathered     N_block (2 x 2 + 4)                  (two blocks' bf16 weights, current and prefetched, and one
                                                           block's fp32 gradient before its reduce-scatter)
        activations  b L T D s a                          without checkpointing, a = 18 per token per block:
                       x and modulated x (2), q k v (3), attention output (1), out proj (1), x and modulated x (2),
                       MLP hidden before and after GELU (2 x 4), MLP output (1); flash attention keeps no T x T
                     b T D s (L + a)                      with activation checkpointing: each block's input, plus
                                                           one block recomputed in the backward
    b = train.global_batch / gpus images, s = 2 bytes (bf16 compute on GPUs) or 4 (train.precision fp32). An iMF
    model (_imf_memory_terms): T counts its prefix tokens, L its v-head's blocks under objective.kind "imf", a = 28
    (IMF_SAVED_PER_TOKEN_PER_BLOCK, measured) and N_block = 4 D^2 + 3 D M. Left out: the no-grad passes (guidance
    forwards, iMF's of 2B rows, the r != t dual pass: freed layer by layer), the CUDA context and the allocator's
    fragmentation (often 1-3 GiB), and the MLP's activations (counted as zero).
    """
    n = parameter_count(cfg.model)
    b = cfg.train.global_batch / gpus
    s = 4 if cfg.train.precision == "fp32" else 2
    if cfg.model.name == "MLP":
        return STATE_BYTES_PER_PARAM * n / gpus
    if cfg.model.name.startswith("iMF-"):
        L, D, T, n_block, a = _imf_memory_terms(cfg)
    else:
        model_forward_flops(cfg.model)  # an unknown name: the same clear error as the FLOP count
        size, patch = cfg.model.name[len("DiT-"):].split("/")
        L, D, _ = DIT_SIZES[size]
        T = (cfg.model.input_size // int(patch)) ** 2
        n_block, a = 18 * D * D, SAVED_PER_TOKEN_PER_BLOCK  # qkv 3 D^2, proj D^2, MLP 8 D^2, adaLN 6 D^2 (no biases)
    per_token_blocks = (L + a) if activation_checkpointing else L * a
    return STATE_BYTES_PER_PARAM * n / gpus + n_block * 8 + b * T * D * s * per_token_blocks


def _imf_memory_terms(cfg):
    """(L, D, T, N_block, a) of memory_per_gpu_bytes for an iMF model: L blocks with gradients (the u path's depth,
    plus the v-head's under objective.kind "imf"), T tokens including the prefix, N_block = 4 D^2 + 3 D M (bias-free
    q/k/v/o and SwiGLU) and a = IMF_SAVED_PER_TOKEN_PER_BLOCK."""
    depth, D, _, aux = imf_size(cfg.model)
    L = depth + (aux if getattr(cfg.objective, "kind", "meanflow") == "imf" else 0)
    M = int(D * 8 / 3)
    T = (cfg.model.input_size // imf_patch(cfg.model.name)) ** 2 + sum(PREFIX.values())
    T -= PREFIX["y"] if cfg.model.num_classes == 0 else 0
    return L, D, T, 4 * D * D + 3 * D * M, IMF_SAVED_PER_TOKEN_PER_BLOCK


# ----------------------------------------------------------------------------------------------------------------------
# the README tables: python -m meanflow.flops --table | --peaks
# ----------------------------------------------------------------------------------------------------------------------

# MeanFlow's Table 2, and iMF's paper as its official README (Lyy-iiis/imeanflow) lists it
PAPER_FID_1NFE = {"imagenet-B2": 6.17, "imagenet-M2": 5.01, "imagenet-L2": 3.84, "imagenet-XL2": 3.43,
                  "imagenet-iMF-B2": 3.39, "imagenet-iMF-M2": 2.27, "imagenet-iMF-L2": 1.86, "imagenet-iMF-XL2": 1.72}
TABLE_PRESETS = ("imagenet-B2", "imagenet-M2", "imagenet-L2", "imagenet-XL2", "mnist-demo", "imagenet-iMF-B2",
                 "imagenet-iMF-M2", "imagenet-iMF-L2", "imagenet-iMF-XL2", "mnist-imf")


def preset_row(name, gpus=8):
    from meanflow.config import PRESETS, Config, apply_overrides

    cfg = apply_overrides(Config(), PRESETS[name]())  # not validated: the ImageNet presets need a data.root
    fwd = model_forward_flops(cfg.model)
    gib = 2.0**30
    inference = None  # an iMF model's parameters without its v-head (the paper's count)
    if cfg.model.name.startswith("iMF-"):
        inference = parameter_count(replace(cfg.model, aux_head_depth=0))
    return {
        "preset": name, "model": cfg.model.name, "parameters": parameter_count(cfg.model),
        "parameters_inference": inference,
        "forward_gflops": fwd.total / 1e9, "step_gflops": config_step_flops(cfg) / 1e9,
        "batch_per_gpu": cfg.train.global_batch / gpus,
        "memory_gib": memory_per_gpu_bytes(cfg, gpus) / gib,
        "memory_gib_checkpointed": memory_per_gpu_bytes(cfg, gpus, activation_checkpointing=True) / gib,
        "fid_1nfe": PAPER_FID_1NFE.get(name),
    }


def preset_table(gpus=8) -> str:
    lines = [f"| preset | model | params | GFLOPs forward | GFLOPs step | img/GPU at {gpus} | GiB/GPU (est.) | "
             "GiB/GPU, act. ckpt (est.) | paper 1-NFE FID |", "|---|---|---|---|---|---|---|---|---|"]
    for name in TABLE_PRESETS:
        r = preset_row(name, gpus)
        fid = "-" if r["fid_1nfe"] is None else f"{r['fid_1nfe']:.2f}"
        params = f"{r['parameters'] / 1e6:.1f}M"
        if r["parameters_inference"] is not None:
            params += f" ({r['parameters_inference'] / 1e6:.1f}M w/o v-head)"
        lines.append(f"| {name} | {r['model']} | {params} | {r['forward_gflops']:.4g} | "
                     f"{r['step_gflops']:.4g} | {r['batch_per_gpu']:g} | {r['memory_gib']:.2f} | "
                     f"{r['memory_gib_checkpointed']:.2f} | {fid} |")
    return "\n".join(lines)


def peaks_table() -> str:
    lines = ["| device | bf16 dense TFLOP/s | TF32 dense TFLOP/s | FP32 TFLOP/s | source |", "|---|---|---|---|---|"]
    for _, p in PEAKS:
        lines.append(f"| {p.name} | {p.bf16:g} | {p.tf32:g} | {p.fp32:g} | NVIDIA {p.source} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meanflow.flops", description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", help="the README's per-preset table (markdown)")
    parser.add_argument("--peaks", action="store_true", help="the peak-rate table MFU uses (markdown)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the memory estimate shards over (default 8)")
    args = parser.parse_args(argv)
    problem = (f"--gpus: must be > 0, got {args.gpus}" if args.gpus <= 0 else
               None if args.table or args.peaks else "nothing to print: give --table and/or --peaks")
    if problem:
        print(f"meanflow.flops: error: {problem}", file=sys.stderr)
        return 2
    if args.table:
        print(preset_table(args.gpus))
    if args.peaks:
        print(peaks_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

