"""Sampling with the average velocity: exact for the Gaussian closed form, at any number of steps."""

import pytest
import torch

from meanflow.sampling import sample, time_grid
from tests.meanflow.reference_models import GaussianAverageVelocity, small_model


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_exact_average_velocity_maps_noise_to_data_quantiles(steps, seed):
    """For N(m, s^2) data the flow sends noise e to m + s e; the true u does it in any number of steps."""
    m, s = torch.randn(2, 4, dtype=torch.float64), 0.2 + torch.rand(()).item()
    model = GaussianAverageVelocity(m, s)
    e = torch.randn(32, 2, 4, dtype=torch.float64)
    x = sample(model, e, steps=steps)
    assert torch.allclose(x, m + s * e, rtol=1e-12, atol=1e-12)


def test_sample_shapes_and_labels(seed):
    model = small_model("dit")
    noise = torch.randn(5, *model.sample_shape, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (5,))
    x1 = sample(model, noise, y, steps=1)
    assert x1.shape == noise.shape and not x1.requires_grad
    # one step is z - u(z, 0, 1)
    ones = torch.ones(5, dtype=torch.float64)
    assert torch.allclose(x1, noise - model(noise, 0 * ones, ones, y), rtol=1e-13)
    x2 = sample(model, noise, y, steps=2)
    assert not torch.allclose(x1, x2)


def test_time_grid_and_bad_arguments():
    assert torch.equal(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="steps"):
            time_grid(bad)
    model = GaussianAverageVelocity(torch.zeros(3, dtype=torch.float64) + 0.5, 0.5)
    with pytest.raises(ValueError, match="grid"):
        sample(model, torch.randn(2, 3, dtype=torch.float64), grid=[1.0, 0.5, 0.7, 0.0])
    with pytest.raises(ValueError, match="noise"):
        sample(model, torch.ones(2, 3, dtype=torch.long))
