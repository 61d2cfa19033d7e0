"""Model registry, shapes, the paper's parameter counts, zero-init, and clear errors on bad inputs."""

import math

import numpy as np
import pytest
import torch

from meanflow.jvp import u_and_dudt
from meanflow.models import MODEL_NAMES, create_model
from meanflow.models.dit import sincos_pos_embed_2d
from tests.meanflow.reference_models import random_inputs, small_model

# MeanFlow paper, Table 2 (millions of parameters)
PAPER_PARAMS = {"DiT-B/2": 131, "DiT-M/2": 308, "DiT-L/2": 459, "DiT-XL/2": 676}


@pytest.mark.parametrize("name,millions", PAPER_PARAMS.items())
def test_paper_sizes_have_the_papers_parameter_count(name, millions):
    with torch.device("meta"):
        model = create_model(name)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == millions


def test_every_registered_name_builds():
    with torch.device("meta"):
        for name in MODEL_NAMES:
            kw = {"dim": 3} if name == "MLP" else {"input_size": 24} if name.endswith("/6") else {}
            assert isinstance(create_model(name, **kw), torch.nn.Module)


def test_output_shape_and_zero_init():
    model = create_model("DiT-Nano/4", input_size=16, in_channels=3, num_classes=10)
    z = torch.randn(2, 3, 16, 16)
    u = model(z, torch.zeros(2), torch.ones(2), torch.tensor([1, 10]))
    assert u.shape == z.shape
    assert torch.count_nonzero(u) == 0  # adaLN-Zero: the output layer starts at zero


def test_unknown_name_and_override():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'"):
        create_model("DiT-Q/2")
    with pytest.raises(ValueError, match="hidden"):
        create_model("DiT-Nano/2", hiddn_size=3)
    with pytest.raises(ValueError, match="input_size"):
        create_model("DiT-Nano/2", input_size=7)


def _bad_calls(model):
    z, r, t, y, v = random_inputs(model)
    B = z.shape[0]
    yield "r", (z, r + 1.0, t, y)  # r > t
    yield "r", (z, r[:, None], t, y)  # would broadcast to (B, B)
    yield "t", (z, r, t[:-1], y)
    yield "z", (z[..., :-1], r, t, y)
    yield "y", (z, r, t, torch.full((B,), model.num_classes + 1))
    yield "y", (z, r, t, torch.full((B,), -1))
    yield "y", (z, r, t, y.float())
    yield "z", (z.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"), dtype=z.dtype)), r, t, y)
    yield "t", (z, r, t.clone().fill_(float("nan")), y)


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_bad_inputs_raise_value_error_naming_the_argument(kind, seed):
    model = small_model(kind)
    for name, args in _bad_calls(model):
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            model(*args)
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            u_and_dudt(model, *args, v=torch.randn_like(random_inputs(model)[0]))


def test_unconditional_model_rejects_labels_and_tangent_shape_is_checked(seed):
    model = small_model("dit_uncond")
    z, r, t, _, v = random_inputs(model)
    with pytest.raises(ValueError, match="^y must be None"):
        model(z, r, t, torch.zeros(z.shape[0], dtype=torch.long))
    with pytest.raises(ValueError, match="^v must have the shape of z"):
        u_and_dudt(model, z, r, t, None, v[:1])
    with pytest.raises(ValueError, match="engine"):
        u_and_dudt(model, z, r, t, None, v, engine="forward_ad")


@pytest.mark.parametrize("dim, grid", [(16, 4), (64, 3), (128, 7)])
def test_sincos_pos_embed_2d_is_mae_dit_order(dim, grid):
    """Against the formula written out element by element: token k = i * grid + j (row i, column j) gets
    [sin(j w_d), cos(j w_d), sin(i w_d), cos(i w_d)] with w_d = 10000^(-d / (dim / 4)), the column half first as in
    MAE/DiT's get_2d_sincos_pos_embed."""
    quarter = dim // 4
    expected = np.empty((grid * grid, dim))
    for i in range(grid):
        for j in range(grid):
            for d in range(quarter):
                w = 10000.0 ** (-d / quarter)
                expected[i * grid + j, d] = math.sin(j * w)
                expected[i * grid + j, quarter + d] = math.cos(j * w)
                expected[i * grid + j, 2 * quarter + d] = math.sin(i * w)
                expected[i * grid + j, 3 * quarter + d] = math.cos(i * w)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, grid), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, kw", [("DiT-Nano/2", dict(input_size=6, in_channels=3, num_classes=4)),
                                      ("MLP", dict(dim=5, num_classes=3))])
def test_x_prediction_reads_u_from_the_image_the_network_outputs(name, kw, seed):
    """prediction="x": u = (z - D) / max(t, T_MIN), D being what the same weights output under prediction="u";
    "x_tanh": the same with D = tanh(output)."""
    from meanflow.models.prediction import T_MIN
    from tests.meanflow.reference_models import randomize

    as_u = randomize(create_model(name, **kw).double())
    as_x = create_model(name, prediction="x", **kw).double()
    as_x.load_state_dict(as_u.state_dict())
    z, r, t, y, _ = random_inputs(as_u, batch=5)
    t = torch.tensor([0.3 * T_MIN, 0.2, 0.5, 0.8, 1.0], dtype=torch.float64)
    r = t * torch.rand(5, dtype=torch.float64)
    image = as_u(z, r, t, y)
    tau = t.clamp_min(T_MIN).view(-1, *([1] * (z.dim() - 1)))
    assert torch.allclose(as_x(z, r, t, y), (z - image) / tau, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="prediction"):
        create_model(name, prediction="eps", **kw)
    as_tanh = create_model(name, prediction="x_tanh", **kw).double()
    as_tanh.load_state_dict(as_u.state_dict())
    assert image.abs().max() > 1.5  # outputs past the pixel range, which the tanh must bring inside
    assert torch.allclose(as_tanh(z, r, t, y), (z - torch.tanh(image)) / tau, rtol=1e-13, atol=0)


@pytest.mark.parametrize("prediction", ["x", "x_tanh"])
@pytest.mark.parametrize("canvas, patch", [(4, 2), (6, 3)])  # (6, 3): the patch divides the canvas, not the input
def test_canvas_draws_the_centre_and_the_background_around_it(prediction, canvas, patch, seed):
    """canvas c: D on the centred c x c window is what the same weights draw on a c x c input; outside, D = -1, so
    u = (z + 1) / tau there, and z outside the window changes nothing else."""
    from meanflow.models.prediction import T_MIN
    from tests.meanflow.reference_models import randomize

    kw = dict(in_channels=3, num_classes=4, prediction=prediction, patch_size=patch)
    small = randomize(create_model("DiT-Nano/2", input_size=canvas, **kw).double())
    framed = create_model("DiT-Nano/2", input_size=8, canvas=canvas, **kw).double()
    framed.load_state_dict(small.state_dict())
    z, r, t, y, _ = random_inputs(framed, batch=4)
    tau = t.clamp_min(T_MIN).view(-1, 1, 1, 1)
    u = framed(z, r, t, y)
    m = (8 - canvas) // 2
    inside = (slice(None), slice(None), slice(m, m + canvas), slice(m, m + canvas))
    torch.testing.assert_close(u[inside], small(z[inside], r, t, y), rtol=1e-13, atol=0)
    outside = torch.ones_like(z, dtype=torch.bool)
    outside[inside] = False
    torch.testing.assert_close(u[outside], ((z + 1) / tau)[outside], rtol=1e-13, atol=0)
    z2 = torch.where(outside, torch.randn_like(z), z)
    torch.testing.assert_close(framed(z2, r, t, y)[inside], u[inside], rtol=0, atol=0)


@pytest.mark.parametrize("kw, needle", [(dict(canvas=5), "canvas 5"), (dict(canvas=3), "canvas 3"),
                                        (dict(canvas=10), "canvas 10"), (dict(canvas=4, prediction="u"), "canvas"),
                                        (dict(patch_size=3), "input_size 8 is not divisible by patch_size 3")])
def test_bad_canvas_is_refused(kw, needle):
    kw = {"prediction": "x", **kw}
    with pytest.raises(ValueError, match=needle):
        create_model("DiT-Nano/2", input_size=8, in_channels=1, num_classes=0, **kw)
