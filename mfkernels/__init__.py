"""Triton kernels that carry a primal and its forward-mode tangent through a layer in one pass.

Public ops (tensors (B, H, N, D) for attention, (B, N, C) with (B, C) shift/scale for adaLN):
``attention``, ``attention_jvp``, ``adaln_modulate``, ``adaln_modulate_jvp``, ``gated_residual``,
``gated_residual_jvp``; ``gelu_tanh`` and ``gelu_tanh_backward`` (native on the CPU, :mod:`mfkernels.gelu`). Backend
selection: see :mod:`mfkernels._backend`.
"""

from mfkernels._backend import get_backend, set_backend
from mfkernels.adaln import adaln_modulate, adaln_modulate_jvp, gated_residual, gated_residual_jvp
from mfkernels.attention import attention, attention_jvp
from mfkernels.gelu import gelu_tanh, gelu_tanh_backward

__all__ = [
    "adaln_modulate",
    "adaln_modulate_jvp",
    "attention",
    "attention_jvp",
    "gated_residual",
    "gated_residual_jvp",
    "gelu_tanh",
    "gelu_tanh_backward",
    "get_backend",
    "set_backend",
]
