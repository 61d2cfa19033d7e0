"""The two JVP engines: (u, du/dt) of a model along the tangent (v, dr, dt), default (v, 0, 1).

    du/dt = v . d_z u + dr * d_r u + dt * d_t u

- ``"dual"`` (default, fast): one forward of ``model.dual`` carries (primal, tangent) through every layer; the
  tangent is computed from detached weights with no graph, so memory stays about one forward's.
- ``"func"`` (reference): ``torch.func.jvp`` over the plain forward, with SDPA forced to its MATH backend (the only
  one with forward AD). Forward AD multiplies the weights' zero tangents through full GEMMs and records the tangent
  graph: slower and heavier, but independent of every dual layer, hence the oracle.

In both, u carries gradients to the parameters and du/dt is detached (MeanFlow's target is under stop-gradient).
iMF models (``model.is_imf``) also take ``cond`` (omega, t_min, t_max: constants, no tangent) and can return their
v-head's output v from the same forward (``return_v``), with its graph.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow.models.inputs import check_model_inputs

ENGINES = ("dual", "func")


def _time_tangent(value, like):
    if isinstance(value, torch.Tensor):
        if value.shape != like.shape:
            raise ValueError(f"a time tangent must have shape {tuple(like.shape)}, got {tuple(value.shape)}")
        return value.to(like)
    return torch.full_like(like, float(value))


def u_and_dudt(model, z, r, t, y, v, engine="dual", tangent_r=0.0, tangent_t=1.0, check_values=True, cond=None,
               return_v=False):
    """Return (u, dudt), or (u, dudt, v_head) with return_v, for u = model(z, r, t, y) along (v, tangent_r, tangent_t).

    z (B, ...), r and t (B,), y (B,) labels or None, v like z. tangent_r / tangent_t: floats or (B,) tensors; the
    paper's tangent is (v, 0, 1); other values exist only to reproduce its ablation. cond and return_v: iMF models
    only (a dict of (B,) tensors omega, t_min, t_max; the v-head's output, with its graph).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    imf = getattr(model, "is_imf", False)
    if not imf and (cond is not None or return_v):
        raise ValueError("cond and return_v are inputs of iMF models only (model.is_imf)")
    extra = dict(cond=cond, return_v=return_v) if imf else {}
    sample_shape = getattr(model, "sample_shape", tuple(z.shape[1:]))
    num_classes = getattr(model, "num_classes", 0 if y is None else None)
    if num_classes is not None:
        check_model_inputs(z, r, t, y, sample_shape=sample_shape, num_classes=num_classes,
                           check_values=check_values, v=v)
    dr, dt = _time_tangent(tangent_r, r), _time_tangent(tangent_t, t)
    if engine == "dual":
        u, dudt, *v_head = model.dual(z, r, t, y, v, dr, dt, **extra)
        return (u, dudt.detach(), *v_head)

    def u_fn(z, r, t):
        out = model(z, r, t, y, **extra)
        return out if return_v else (out, ())  # (u, aux): the v-head's output rides along as jvp's aux

    with sdpa_kernel([SDPBackend.MATH]):
        u, dudt, v_head = torch.func.jvp(u_fn, (z, r, t), (v, dr, dt), has_aux=True)
    return (u, dudt.detach(), v_head) if return_v else (u, dudt.detach())
