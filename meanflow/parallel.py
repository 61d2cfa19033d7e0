"""Apply parallelism to a single-device model, in torchtitan's order: activation checkpointing, then compile,
then FSDP2 (``fully_shard`` per block, an iMF v-head's too, then the root).

The dual path is a method beside ``forward``; ``register_fsdp_forward_method`` gives it the same all-gather hooks.
Mixed precision keeps fp32 master weights and fp32 gradient reduction, with bf16 compute on GPU; the dual engine
carries its tangent in fp32 on the bf16 primal (``model.tangent_precision``). Inputs are not cast by FSDP: times must
stay fp32 (the embedders multiply them by up to 1000), and the model casts the rest.
"""

import torch


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


def set_tf32(enabled: bool):
    """fp32 matmuls and convolutions on CUDA in TF32 (fp32 range, 10-bit mantissa: the tensor cores' fp32 path) or
    in full fp32. Under bf16 it governs the fp32 tangent's GEMMs. The Triton attention kernel reads the same matmul
    flag for its fp32 dots. CPU matmuls ignore both flags."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def blocks_of(model):
    """The transformer blocks, each its own FSDP unit and compiled on its own: an iMF model's v-head blocks
    (``v_blocks``, training only) too, so they are sharded per block rather than left to the root's one unit."""
    return list(getattr(model, "blocks", [])) + list(getattr(model, "v_blocks", []))


def apply_activation_checkpointing(model):
    if hasattr(model, "checkpoint_blocks"):
        model.checkpoint_blocks = True


def apply_compile(model):
    """Compile each block's forward and dual (the hot path); the embedders and final layer stay eager."""
    for block in blocks_of(model):
        block.forward = torch.compile(block.forward)
        block.dual = torch.compile(block.dual)


def apply_fsdp(model, compute_dtype: torch.dtype, reshard_after_forward: bool = True):
    """reshard_after_forward=False keeps each unit's gathered weights from its forward to its backward: one
    all-gather per unit and step instead of one per call (a step calls the model up to three times: guidance,
    dual, forward with gradients), for the memory of the unsharded model. Small models gain: the demo's DiT-Micro/8
    on two single-thread CPU processes (gloo) stepped in 176 ms against 228 ms."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in blocks_of(model):
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        register_fsdp_forward_method(block, "dual")
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "dual")
    return model


def parallelize(model, *, distributed: bool, compute_dtype: torch.dtype, compile: bool = False,
                activation_checkpointing: bool = False, reshard_after_forward: bool = True):
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if distributed:
        apply_fsdp(model, compute_dtype, reshard_after_forward)
    return model
