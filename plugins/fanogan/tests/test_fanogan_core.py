"""f-AnoGAN's networks and formulas against the official code and hand computations."""

import math

import pytest
import torch
from torch import nn

from vad_fanogan.network import (
    Critic,
    Encoder,
    Generator,
    critic_loss,
    gradient_penalty,
    izif_residual,
    official_rmsprop,
    to_model_range,
)


def test_official_widths_give_the_theses_parameter_count():
    # Bergmann's thesis, Table 4.5: f-AnoGAN has 24.57 M parameters, counting TensorFlow's
    # BatchNorm moving statistics (generator and encoder) with the weights.
    with torch.device("meta"):
        networks = [Generator(128, 64), Critic(64), Encoder(128, 64)]
    weights = sum(p.numel() for n in networks for p in n.parameters())
    statistics = sum(b.numel() for n in networks for name, b in n.named_buffers() if name.endswith(("running_mean", "running_var")))
    assert weights == 24_561_218 and round((weights + statistics) / 1e6, 2) == 24.57


def test_shapes_and_ranges():
    generator, critic, encoder = Generator(8, 2), Critic(2), Encoder(8, 2)
    patches = torch.rand(3, 1, 64, 64) * 2 - 1
    z = encoder(patches)
    assert z.shape == (3, 8) and z.abs().max() < 1  # tanh latent
    fake = generator(z)
    assert fake.shape == (3, 1, 64, 64) and fake.abs().max() <= 1
    assert critic(fake).shape == (3,) and critic.features(fake).shape == (3, 16, 4, 4)


def test_grey_levels_are_pil_luma_in_the_official_range():
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]).view(5, 3, 1, 1)
    torch.testing.assert_close(to_model_range(colours).flatten(), torch.tensor([0.299, 0.587, 0.114, 1.0, 0.0]) * 2 - 1)


class HalfSquaredNorm(nn.Module):
    """A tiny critic ``D(x) = w ||x||^2 / 2``: its input gradient is ``w x``."""

    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return self.w * x.flatten(1).square().sum(1) / 2


def test_gradient_penalty_and_critic_loss_by_hand():
    real = torch.tensor([[1.0, 2.0], [0.0, -1.0]]).view(2, 1, 1, 2)
    fake = torch.tensor([[3.0, 0.0], [4.0, 2.0]]).view(2, 1, 1, 2)
    alpha = torch.tensor([0.5, 0.25])
    critic = HalfSquaredNorm(0.5)
    # x_hat = real + alpha (fake - real) = (2, 1) and (1, -0.25); |grad| = w |x_hat|
    norms = torch.tensor([math.sqrt(5.0), math.sqrt(1.0625)])
    expected = ((0.5 * norms - 1) ** 2).mean()
    penalty = gradient_penalty(critic, real, fake, alpha)
    torch.testing.assert_close(penalty, expected)
    # differentiable with respect to the critic's weight: d/dw mean((w s - 1)^2) = mean(2 (w s - 1) s)
    (grad,) = torch.autograd.grad(penalty, critic.w)
    torch.testing.assert_close(grad, (2 * (0.5 * norms - 1) * norms).mean())
    loss, parts = critic_loss(critic, real, fake, alpha, weight=10.0)
    d_real, d_fake = torch.tensor([1.25, 0.25]), torch.tensor([2.25, 5.0])  # w |x|^2 / 2
    torch.testing.assert_close(loss, d_fake.mean() - d_real.mean() + 10 * expected)
    assert parts["wasserstein"] == pytest.approx(float(d_real.mean() - d_fake.mean()))
    assert parts["gradient_penalty"] == pytest.approx(float(expected))


def test_izif_residual_by_hand():
    patches = torch.zeros(2, 1, 2, 2)
    reconstructions = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, -1.0]]).view(2, 1, 2, 2)
    features = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    reconstruction_features = torch.tensor([[1.0, 2.0, 5.0], [1.0, 1.0, 1.0]]).view(2, 3, 1, 1)
    residual = izif_residual(patches, reconstructions, features, reconstruction_features, kappa=2.0)
    # image terms 0.25 and 0.5; feature terms 4/3 and 1
    torch.testing.assert_close(residual, torch.tensor([0.25 + 2 * 4 / 3, 0.5 + 2 * 1.0]))
    assert izif_residual(patches, reconstructions, features, reconstruction_features, kappa=0.0)[1] == 0.5


def test_rmsprop_is_tensorflows():
    weight = nn.Parameter(torch.tensor([1.0, -1.0]))
    optimizer = official_rmsprop([weight], lr=0.1)
    ms = torch.ones(2)
    expected = weight.detach().clone()
    for gradient in (torch.tensor([2.0, 0.5]), torch.tensor([-1.0, 3.0])):
        weight.grad = gradient.clone()
        optimizer.step()
        ms = 0.9 * ms + 0.1 * gradient**2  # TF1: the mean square starts at 1
        expected -= 0.1 * gradient / torch.sqrt(ms + 1e-10)
        torch.testing.assert_close(weight.detach(), expected)
