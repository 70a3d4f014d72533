"""GANomaly's numerical heart: losses and score by hand, the official architecture, the
initialisation, the discriminator's re-initialisation rule, and one training step against a
transcription of the official ``optimize_params``."""

import copy
import math

import pytest
import torch
from torch import nn

from vad_ganomaly.detector import Ganomaly
from vad_ganomaly.network import Discriminator, Generator, dcgan_init, discriminator_loss, generator_losses, latent_distance

TINY = {"image_size": 16, "nz": 6, "ngf": 4, "ndf": 4, "epochs": 1, "batch_size": 4, "seed": 0}


def test_generator_losses_match_a_hand_computation():
    images = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    reconstruction = torch.tensor([0.5, -1.0]).view(1, 1, 1, 2)
    latent_i, latent_o = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1), torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    real_features, fake_features = torch.tensor([2.0, 0.0]).view(1, 2, 1, 1), torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    adversarial, contextual, encoder = generator_losses(images, reconstruction, latent_i, latent_o, real_features, fake_features)
    assert float(adversarial) == pytest.approx((2**2 + 1**2) / 2)  # L2 between the discriminator's features
    assert float(contextual) == pytest.approx((0.5 + 2.0) / 2)  # L1 reconstruction error
    assert float(encoder) == pytest.approx((0 + 2**2 + 3**2) / 3)  # L2 between the latent codes


def test_discriminator_loss_matches_a_hand_computation():
    real, fake = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.9])
    expected = 0.5 * ((-math.log(0.8) - math.log(0.5)) / 2 + (-math.log(0.8) - math.log(0.1)) / 2)
    assert float(discriminator_loss(real, fake)) == pytest.approx(expected, rel=1e-6)
    assert float(discriminator_loss(torch.ones(3), torch.zeros(3))) == 0.0  # a perfect discriminator


def test_the_score_is_the_mean_squared_latent_difference_per_image():
    latent_i = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).view(2, 3, 1, 1)
    latent_o = torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 2.0]]).view(2, 3, 1, 1)
    torch.testing.assert_close(latent_distance(latent_i, latent_o), torch.tensor([0.0, 2.0]))


def test_the_networks_have_the_official_shapes_and_layer_names():
    generator = Generator(32, 100, 64)
    keys = set(generator.state_dict())
    assert {"encoder1.main.initial-conv-3-64.weight", "encoder1.main.pyramid-64-128-conv.weight", "encoder1.main.pyramid-256-batchnorm.running_var",
            "encoder1.main.final-256-1-conv.weight", "decoder.main.initial-100-256-convt.weight", "decoder.main.pyramid-128-64-convt.weight",
            "decoder.main.final-64-3-convt.weight", "encoder2.main.final-256-1-conv.weight"} <= keys
    assert not any(key.endswith(".bias") and "batchnorm" not in key for key in keys)  # convolutions without biases
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        reconstruction, latent_i, latent_o = generator.eval()(images)
    assert reconstruction.shape == images.shape and latent_i.shape == latent_o.shape == (2, 100, 1, 1)
    assert float(reconstruction.abs().max()) <= 1.0  # tanh
    assert generator.encoder_features(images).shape == (2, 256, 4, 4)
    discriminator = Discriminator(32, 64)
    assert set(discriminator.state_dict()) >= {"features.0.weight", "features.2.weight", "classifier.0.weight"}
    probability, features = discriminator.eval()(images)
    assert probability.shape == (2,) and features.shape == (2, 256, 4, 4) and bool(((probability > 0) & (probability < 1)).all())
    assert Generator(256, 8, 4).decoder.main[0].out_channels == 4 * 32  # official cngf = ngf / 2 * 2^6 for isize 256
    extra = Generator(16, 8, 4, extra_layers=1)
    assert "encoder1.main.extra-layers-0-4-conv.weight" in extra.state_dict() and "decoder.main.extra-layers-0-4-conv.weight" in extra.state_dict()


def test_weights_init_is_the_official_dcgan_one():
    network = nn.Sequential(nn.Conv2d(3, 64, 4, bias=False), nn.BatchNorm2d(64), nn.ConvTranspose2d(64, 64, 4, bias=False))
    dcgan_init(network, torch.Generator().manual_seed(0))
    network.requires_grad_(False)
    for layer in (network[0], network[2]):
        assert abs(float(layer.weight.mean())) < 0.002 and float(layer.weight.std()) == pytest.approx(0.02, rel=0.05)
    assert float(network[1].weight.std()) == pytest.approx(0.02, rel=0.3) and float(network[1].weight.mean()) == pytest.approx(1.0, abs=0.01)
    assert not network[1].bias.any()
    again = copy.deepcopy(network)
    dcgan_init(again, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(network.parameters(), again.parameters()))  # the draws come from the generator


def test_the_discriminator_is_reinitialised_only_below_the_threshold():
    detector = Ganomaly(**TINY)
    detector.networks = detector.build({})
    discriminator = detector.networks["discriminator"]
    with torch.no_grad():
        for parameter in discriminator.parameters():
            parameter.add_(1.0)
        discriminator.features[3].running_mean.fill_(0.5)
    before = copy.deepcopy(discriminator.state_dict())
    assert not detector.reinitialise_collapsed_discriminator(torch.tensor(1.1e-5), torch.Generator().manual_seed(3))  # not below
    assert all(torch.equal(value, before[key]) for key, value in discriminator.state_dict().items())
    assert detector.reinitialise_collapsed_discriminator(torch.tensor(0.9e-5), torch.Generator().manual_seed(3))
    fresh = Discriminator(16, 4)
    dcgan_init(fresh, torch.Generator().manual_seed(3))
    for (name, value), expected in zip(discriminator.named_parameters(), fresh.parameters()):
        assert torch.equal(value, expected), name  # weights_init's draws
    assert torch.equal(discriminator.features[3].running_mean, before["features.3.running_mean"])  # as official: statistics kept
    never = Ganomaly(**{**TINY, "reinit_below": 0.0})
    never.networks = never.build({})
    assert not never.reinitialise_collapsed_discriminator(torch.tensor(0.0), torch.Generator())


def official_step(netg, netd, optimizer_g, optimizer_d, images, w_adv, w_con, w_enc):
    """lib/model.py's optimize_params (forward_g, forward_d, backward_g, backward_d), transcribed."""
    fake, latent_i, latent_o = netg(images)
    pred_real, _ = netd(images)
    pred_fake, _ = netd(fake.detach())
    optimizer_g.zero_grad()
    err_g_adv = torch.mean(torch.pow(netd(images)[1] - netd(fake)[1], 2))
    err_g_con = nn.L1Loss()(fake, images)
    err_g_enc = torch.mean(torch.pow(latent_o - latent_i, 2))
    err_g = err_g_adv * w_adv + err_g_con * w_con + err_g_enc * w_enc
    err_g.backward(retain_graph=True)
    optimizer_g.step()
    optimizer_d.zero_grad()
    err_d = (nn.BCELoss()(pred_real, torch.ones(len(images))) + nn.BCELoss()(pred_fake, torch.zeros(len(images)))) * 0.5
    err_d.backward()
    optimizer_d.step()
    return err_g, err_d


def test_a_training_step_updates_both_networks_as_the_official_code():
    weights = {"w_adv": 2.0, "w_con": 3.0, "w_enc": 0.5}
    detector = Ganomaly(**TINY, **weights)
    detector.networks = detector.build({})
    netg, netd = copy.deepcopy(detector.networks["generator"]), copy.deepcopy(detector.networks["discriminator"])
    for network in (*detector.networks.values(), netg, netd):
        network.train()
    optimizers, _ = detector.optimizers()
    optimizer_g = torch.optim.Adam(netg.parameters(), lr=2e-4, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(netd.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1 for seed in (1, 2)]
    for batch in batches:
        loss, parts = detector.training_step(batch, torch.Generator().manual_seed(0))
        err_g, err_d = official_step(netg, netd, optimizer_g, optimizer_d, batch, **weights)
        torch.testing.assert_close(loss, err_g.detach())
        assert parts["discriminator"] == pytest.approx(float(err_d.detach()), rel=1e-5) and parts["reinitialised"] == 0.0
        assert float(loss) == pytest.approx(2.0 * parts["adversarial"] + 3.0 * parts["contextual"] + 0.5 * parts["encoder"], rel=1e-5)
    for ours, theirs in ((detector.networks["generator"], netg), (detector.networks["discriminator"], netd)):
        for (name, value), expected in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)
    for (name, value), expected in zip(detector.networks["generator"].named_buffers(), netg.buffers()):
        torch.testing.assert_close(value, expected, msg=name)  # the generator's BatchNorm statistics too
    assert optimizers[0].state and optimizers[1].state


def test_a_collapsed_discriminator_is_redrawn_inside_the_step():
    detector = Ganomaly(**{**TINY, "reinit_below": 1e9})  # every loss counts as collapsed
    detector.networks = detector.build({})
    detector.optimizers()
    draws = torch.Generator().manual_seed(7)
    expected = Discriminator(16, 4)
    dcgan_init(expected, torch.Generator().manual_seed(7))
    _, parts = detector.training_step(torch.rand(4, 3, 16, 16) * 2 - 1, draws)
    assert parts["reinitialised"] == 1.0
    for value, fresh in zip(detector.networks["discriminator"].parameters(), expected.parameters()):
        assert torch.equal(value, fresh)
