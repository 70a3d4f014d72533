"""The thesis' VAE: posterior, loss, reconstruction probability, the detector, `vad run`, bad input."""

import json
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from vad.errors import VadError
from vad.testing import single_torch_thread, tiny_image_batch
from vad_autoencoder.network import ConvAutoencoder
from vad_vae.detector import Vae, VaeScorer, VariationalAutoencoder, kl_divergence, reconstruction_log_probability

SMALL = {"image_size": 32, "patch_size": None, "latent_dim": 8, "training_samples": 8, "batch_size": 4, "epochs": 1, "samples": 3, "opening": 0, "seed": 0}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread."""


@pytest.fixture(scope="module")
def fitted():
    """A VAE on whole 32 px images, fitted for two Adam steps (shared)."""
    detector = Vae(**SMALL)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_thesis_chapter_3_variant():
    options = Vae().options
    assert (options.architecture, options.image_size, options.patch_size, options.patch_stride, options.patch_average) == ("thesis", 256, 128, 30, "reconstructions")
    assert (options.latent_dim, options.epochs, options.batch_size, options.lr, options.weight_decay) == (100, 200, 64, 2e-4, 1e-5)
    assert (options.training_samples, options.samples, options.score, options.kl_weight, options.opening) == (10000, 6, "reconstruction-probability", 1.0, 4)
    assert Vae().channels == 3  # colour unless asked


def test_the_network_is_the_autoencoders_with_the_latent_convolution_duplicated():
    network = VariationalAutoencoder(128, 1, 100, "thesis", samples=6)
    plain = ConvAutoencoder(128, 1, 100)
    assert isinstance(network, ConvAutoencoder)
    assert network.log_variance.weight.shape == network.bottleneck.weight.shape == plain.bottleneck.weight.shape
    assert sum(p.numel() for p in network.parameters()) == sum(p.numel() for p in plain.parameters()) + sum(p.numel() for p in network.log_variance.parameters())
    assert network.posterior_noise.shape == (6, 100)
    images = torch.rand(2, 1, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, log_variance = network.posterior(images)
        samples = network.posterior_samples(images)
        assert samples.shape == (6, 2, 1, 128, 128)
        latent = mean[1] + torch.exp(0.5 * log_variance[1]) * network.posterior_noise[4].view(-1, 1, 1)
        torch.testing.assert_close(samples[4, 1], network.decode(latent[None])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(network(images), network.decode(mean))


def test_the_loss_is_the_negative_elbo():
    torch.manual_seed(0)
    network = VariationalAutoencoder(32, 3, 8, "thesis", samples=2)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for weight in (1.0, 0.25):
        loss = Vae(**SMALL, kl_weight=weight).training_loss(network, images, torch.Generator().manual_seed(5))
        mean, log_variance = network.posterior(images)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
        reconstructions = network.decode(mean + torch.exp(0.5 * log_variance) * noise)
        posterior = Normal(mean.flatten(1), torch.exp(0.5 * log_variance.flatten(1)))
        kl = torch_kl(posterior, Normal(torch.zeros_like(posterior.loc), torch.ones_like(posterior.loc))).sum(1)
        torch.testing.assert_close(kl_divergence(mean, log_variance), kl)
        expected = ((images - reconstructions) ** 2).flatten(1).sum(1) + weight * kl
        torch.testing.assert_close(loss, expected.mean())


def test_the_map_is_the_negative_log_reconstruction_probability():
    generator = torch.Generator().manual_seed(2)
    images, reconstructions = torch.rand(2, 3, 5, 6, generator=generator), torch.rand(4, 2, 3, 5, 6, generator=generator)
    # An & Cho: the mean over samples of the likelihood; per pixel, Gaussian over its channels, variance 1/2
    likelihood = Normal(reconstructions, math.sqrt(0.5)).log_prob(images.unsqueeze(0)).sum(2).exp().mean(0)
    torch.testing.assert_close(reconstruction_log_probability(images, reconstructions), likelihood.log())
    # one sample: the squared error plus a constant, so the map ranks pixels as the L2-AE's
    single = -reconstruction_log_probability(images, reconstructions[:1])
    torch.testing.assert_close(single, ((images - reconstructions[0]) ** 2).sum(1) + 1.5 * math.log(math.pi))


def test_fit_predicts_deterministic_maps_of_the_stored_posterior_samples(fitted):
    test = tiny_image_batch(fitted, "test")
    prediction = fitted.predict(test)
    assert prediction.scores.shape == (12,) and prediction.maps.shape == (12, 32, 32)
    torch.testing.assert_close(prediction.scores, prediction.maps.amax(dim=(1, 2)))
    model = fitted.networks["model"]
    with torch.no_grad():
        expected = -reconstruction_log_probability(test, model.posterior_samples(test))
    torch.testing.assert_close(prediction.maps, expected)
    torch.testing.assert_close(fitted.predict(test[:2]).maps, prediction.maps[:2])  # same draws for every image and call
    scorer = VaeScorer(model, "l2", 3, **fitted.scorer_options())
    with torch.no_grad():
        _, l2 = scorer.eval()(test[:2])
        torch.testing.assert_close(l2, ((test[:2] - model(test[:2])) ** 2).sum(1))
    assert fitted.feature_source()(test[:1]).shape == (1, 32, 8, 8)  # the autoencoder's encoder features


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    options = ["patch_size=null", "latent_dim=8", "training_samples=8", "batch_size=4", "epochs=1", "samples=2"]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "vae", "--device", "cpu", "--no-report", "--image-size", "32", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"vae.{option}")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "vae" and saved["hparams"]["samples"] == 2 and saved["meta"]["epochs_trained"] == 1


@pytest.mark.parametrize(
    "options",
    [{"samples": 0}, {"kl_weight": -1}, {"score": "kl"}, {"patch_size": 64}, {"latent_dim": 0}],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Vae(**{**SMALL, **options})


def test_a_state_with_other_samples_is_refused_and_changes_nothing(fitted):
    other = Vae(**{**SMALL, "samples": 6})
    with pytest.raises(VadError, match="do not fit its options"):
        other.load_state(fitted.state())
    assert not other.fitted
    with pytest.raises(VadError, match="before predict"):
        Vae(**SMALL).predict(torch.rand(1, 3, 32, 32))
    with pytest.raises(VadError, match="32 x 32 px"):
        fitted.predict(torch.rand(1, 3, 64, 64))
