"""Checks of a model call's inputs, shared by every model, the JVP engines and the sampler.

A wrong shape must never broadcast silently (a (B,) time against a (B, 1) one gives (B, B) and trains on garbage),
so every argument is checked and a failure names it. Value checks (r <= t, finite values, labels in range) read
the data, which costs a device sync on GPU: callers that build their inputs themselves may turn them off.
"""

import torch


def check_model_inputs(z, r, t, y, *, sample_shape, num_classes, check_values=True, **tangents):
    """Validate a call ``model(z, r, t, y)`` (and tangents named like ``v=...``); raise ValueError naming the argument.

    sample_shape: the shape of one sample, e.g. (C, H, W) or (D,). num_classes: 0 for an unconditional model; labels
    may be 0 ... num_classes, the last being the null class.
    """
    _check_z(z, sample_shape)
    _check_times(z, r, t)
    _check_tangents(z, tangents)
    _check_labels(z.shape[0], y, num_classes)
    if check_values:
        _check_values(z, r, t, y, num_classes, tangents)


def _check_z(z, sample_shape):
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a tensor, got {type(z).__name__}")
    if tuple(z.shape[1:]) != tuple(sample_shape) or z.dim() != len(sample_shape) + 1:
        raise ValueError(f"z must have shape (B, {', '.join(map(str, sample_shape))}), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got {z.dtype}")


def _check_times(z, r, t):
    B = z.shape[0]
    for name, s in (("r", r), ("t", t)):
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"{name} must be a tensor of shape ({B},), got {type(s).__name__}")
        if tuple(s.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},) to match z, got {tuple(s.shape)}")
        if s.device != z.device:
            raise ValueError(f"{name} is on {s.device} but z is on {z.device}")


def _check_tangents(z, tangents):
    for name, dz in tangents.items():
        if dz is None:
            continue
        if not isinstance(dz, torch.Tensor) or dz.shape != z.shape:
            shape = tuple(dz.shape) if isinstance(dz, torch.Tensor) else type(dz).__name__
            raise ValueError(f"{name} must have the shape of z {tuple(z.shape)}, got {shape}")


def _check_labels(B, y, num_classes):
    if num_classes == 0 and y is not None:
        raise ValueError("y must be None for an unconditional model (num_classes=0)")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32) or tuple(y.shape) != (B,):
            desc = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be an integer tensor of shape ({B},), got {desc}")


def _check_values(z, r, t, y, num_classes, tangents):
    """The checks that read the data (a device sync on GPU)."""
    if y is not None and z.shape[0] > 0 and (int(y.min()) < 0 or int(y.max()) > num_classes):
        raise ValueError(
            f"y has labels outside 0..{num_classes} (num_classes={num_classes}, index {num_classes} is the null "
            f"class): min {int(y.min())}, max {int(y.max())}"
        )
    for name, x in (("z", z), ("r", r), ("t", t), *tangents.items()):
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
    if bool((r > t).any()):
        raise ValueError("r must be <= t elementwise (the average velocity runs from time r to time t)")
    if bool((r < 0).any()) or bool((t > 1).any()):
        raise ValueError("times must lie in [0, 1]: got r < 0 or t > 1")
