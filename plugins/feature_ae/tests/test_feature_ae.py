"""Feature autoencoder: seed 003's widths, DFR's latent rule, loss and map by hand, the contract,
its feature source, `vad run`, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from vad.errors import VadError
from vad.testing import single_torch_thread
from vad_feature_ae.detector import FeatureAE, FeatureAEFeatures
from vad_feature_ae.network import FeatCAE, dfr_hidden, pca_latent_dim, reconstruction_error

SMALL = {"epochs": 1, "batch_size": 4, "latent_dim": 3, "hidden": 10}  # 8 images: 2 steps


def grids(count: int = 8, channels: int = 12, seed: int = 0) -> torch.Tensor:
    """Feature grids ``[count, channels, 5, 5]`` on a 3-d subspace plus a little noise."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(channels, 3, generator=generator))[0].T  # orthonormal: 3 equal components
    codes = torch.randn(count, 5, 5, 3, generator=generator)
    return (codes @ basis + 0.05 * torch.randn(count, 5, 5, channels, generator=generator)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def fitted() -> FeatureAE:
    detector = FeatureAE(**SMALL)
    features = grids()
    with single_torch_thread():
        detector.fit([features[:4], features[4:]])
    return detector


def test_seed_003_widths_and_dfr_rules():
    network = FeatCAE(1536, 100, 400)
    assert sum(p.numel() for p in network.parameters()) == 1_434_036  # seed 003's table, exactly
    convolutions = [m for m in network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convolutions] == [(1536, 400), (400, 200), (200, 100), (100, 200), (200, 400), (400, 1536)]
    assert all(c.kernel_size == (1, 1) and c.bias is not None for c in convolutions)
    kinds = [type(m).__name__ for m in network.encoder] + [type(m).__name__ for m in network.decoder]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"] * 2  # no BN/ReLU after each half's last conv
    assert dfr_hidden(1536, 100) == 868  # DFR's (C + 2L) // 2, what hidden=null builds
    built = FeatureAE(hidden=None).build({"channels": 1536, "latent_dim": 100})["autoencoder"]
    assert built.encoder[0].out_channels == 868 and built.encoder[6].out_channels == 100
    options = FeatureAE().options
    assert (options.epochs, options.batch_size, options.lr, options.latent_dim, options.hidden, options.pca_variance) == (150, 4, 1e-3, 100, 400, 0.9)


def test_latent_rule_is_dfrs_pca_on_the_first_ten_images():
    # orthogonal zero-mean columns (Hadamard) with variances 5, 3, 2: explained ratios 0.5, 0.3, 0.2
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    patches = hadamard[:, 1:] * torch.tensor([5.0, 3.0, 2.0]).sqrt()
    # scikit-learn's PCA(n_components=fraction): the fewest components whose cumulative ratio exceeds it
    assert [pca_latent_dim(patches, v) for v in (0.49, 0.51, 0.79, 0.81, 0.99)] == [1, 2, 2, 3, 3]
    generator = torch.Generator().manual_seed(1)
    first = grids(count=10, channels=12)
    odd = torch.randn(2, 12, 5, 5, generator=generator) * 5  # images 11 and 12 would widen the PCA
    detector = FeatureAE(**{**SMALL, "latent_dim": None, "max_steps": 1})
    detector.fit([first[:4], first[4:8], torch.cat([first[8:], odd])])
    expected = pca_latent_dim(first.permute(0, 2, 3, 1).reshape(-1, 12), 0.9)
    assert detector.input_meta["latent_dim"] == expected == 3  # the 3-d subspace the grids live on
    assert pca_latent_dim(torch.cat([first, odd]).permute(0, 2, 3, 1).reshape(-1, 12), 0.9) > expected
    assert detector.networks["autoencoder"].encoder[3].out_channels == 6  # 2L
    assert detector.networks["autoencoder"].encoder[0].out_channels == 10  # hidden option


def test_map_score_and_loss_by_hand(fitted):
    features, reconstruction = torch.tensor([[[[1.0]], [[2.0]]]]), torch.tensor([[[[0.0]], [[4.0]]]])
    assert reconstruction_error(features, reconstruction).tolist() == [[[2.5]]]  # ((1-0)^2 + (2-4)^2) / 2 channels

    def by_hand(x: torch.Tensor) -> torch.Tensor:  # the eval-mode network, layer by layer
        for layer in [*fitted.networks["autoencoder"].encoder, *fitted.networks["autoencoder"].decoder]:
            if isinstance(layer, torch.nn.Conv2d):
                x = torch.einsum("oc,bchw->bohw", layer.weight[:, :, 0, 0], x) + layer.bias[None, :, None, None]
            elif isinstance(layer, torch.nn.BatchNorm2d):
                scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
                x = (x - layer.running_mean[None, :, None, None]) * scale[None, :, None, None] + layer.bias[None, :, None, None]
            else:
                x = x.clamp(min=0)
        return x

    test = grids(count=3, seed=5)
    with torch.no_grad():
        expected = ((test - by_hand(test)) ** 2).sum(1) / test.shape[1]
    prediction = fitted.predict(test)
    torch.testing.assert_close(prediction.maps, expected)
    torch.testing.assert_close(prediction.scores, expected.flatten(1).max(1).values)
    network = fitted.networks["autoencoder"].train()
    try:
        with torch.no_grad():
            loss = fitted.training_step(test, torch.Generator())
            torch.testing.assert_close(loss, torch.nn.functional.mse_loss(network(test), test))  # DFR's loss_function
    finally:
        network.eval()
    assert fitted.epochs_trained == 1 and len(fitted.history) == 1



def test_feature_source_is_the_latent_or_the_residual_of_its_own_autoencoder(register_plugin):
    from vad.build import source_from_config
    from vad.testing import FakesPlugin

    options = {**FeatureAE.tiny_options, "epochs": 1}
    with register_plugin(FakesPlugin(), "vad-testing-fakes"):
        assert FeatureAE(**options).feature_source().options.output == "residual"
        source = FeatureAE(**options).feature_source(output="latent")
        assert isinstance(source, FeatureAEFeatures) and source.requires_fit and source.out_channels == 4
        assert source.preprocessing.size == (64, 64)  # the source backbone's
        images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with single_torch_thread():
            source.fit([images])
        assert not source.requires_fit
        latent = source(images[:2])
        with torch.no_grad():
            expected = source.detector.networks["autoencoder"].encoder(source.patches(images[:2]))
        assert latent.shape == (2, 4, 8, 8)
        torch.testing.assert_close(latent, expected, rtol=0, atol=0)
        rebuilt = source_from_config(json.loads(json.dumps(source.config())))
        rebuilt.load_state(source.state())
        torch.testing.assert_close(rebuilt(images[:2]), latent, rtol=0, atol=0)
        residual_source = FeatureAE(**options).feature_source()
        residual_source.load_state(source.state())
        features = source.patches(images[:2])
        with torch.no_grad():
            expected_residual = features - source.detector.networks["autoencoder"](features)
        assert residual_source.out_channels == features.shape[1] and not residual_source.leave_one_out
        torch.testing.assert_close(residual_source(images[:2]), expected_residual, rtol=0, atol=0)
        again = source.detector.feature_source(output="latent")  # a fitted detector's source trains its own autoencoder
        assert again.requires_fit and again.detector is not source.detector and again.detector.hparams == source.detector.hparams
        with pytest.raises(VadError, match="known only after fit"):
            FeatureAE(**{**options, "latent_dim": None}).feature_source(output="latent").out_channels


def test_vad_run_with_the_seed_threshold_and_as_a_fused_source(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    small = ["--set", "feature-ae.epochs=1", "--set", "feature-ae.latent_dim=4", "--set", "feature-ae.hidden=16"]
    common = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--device", "cpu", "--no-report"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--detector", "feature-ae", "--backbone", "fake-backbone", "--threshold", "k-sigma", *small, "--output", str(tmp_path / "ae")])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((tmp_path / "ae" / "tiny-a" / "model" / "model.json").read_text())
    assert saved["members"][0]["detector"]["meta"]["input"] == {"channels": 48, "latent_dim": 4}  # fake stage2 + stage3
    assert saved["threshold"]["name"] == "k-sigma"
    source = ["--set", "feature-ae.source_backbone=fake-backbone", "--set", "feature-ae.source_pretrained=false"]
    result = runner.invoke(app, [*common, "--detector", "patchcore", "--backbone", "detector:feature-ae", *small, *source, "--output", str(tmp_path / "fused")])
    assert result.exit_code == 0, (result.output, result.exception)
    member = json.loads((tmp_path / "fused" / "tiny-a" / "model" / "model.json").read_text())["members"][0]
    assert member["source"]["kind"] == "detector-features" and member["source"]["detector"] == "feature-ae"
    assert member["source"]["hparams"]["output"] == "residual"  # the default
    # the source's own options: --set detector:NAME.KEY=VALUE, checked before the run folder exists
    latent = ["--set", "detector:feature-ae.output=latent"]
    result = runner.invoke(app, [*common, "--detector", "patchcore", "--backbone", "detector:feature-ae", *small, *source, *latent, "--output", str(tmp_path / "latent")])
    assert result.exit_code == 0, (result.output, result.exception)
    member = json.loads((tmp_path / "latent" / "tiny-a" / "model" / "model.json").read_text())["members"][0]
    assert member["source"]["hparams"]["output"] == "latent"
    for bad, message in (
        (["--set", "detector:feature-ae.output=reconstruction"], "output"),
        (["--set", "detector:feature-ae.outptu=residual"], "outptu"),
        (["--set", "detector:stfpm.output=student"], "does not use it"),
        (["--set", "detector:no-such-detector.output=x"], "no-such-detector"),
    ):
        result = runner.invoke(app, [*common, "--detector", "patchcore", "--backbone", "detector:feature-ae", *small, *source, *bad, "--output", str(tmp_path / "bad")])
        assert isinstance(result.exception, VadError) and message in str(result.exception), (bad, result.exception)
        assert not (tmp_path / "bad").exists()
    pytest.importorskip("onnxruntime")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel
    from vad.testing import make_tiny_splits

    for run in ("fused", "latent"):  # the residual and the latent source traced into the graph
        model = AnomalyModel.load(tmp_path / run / "tiny-a" / "model", "cpu")
        export_onnx(model, tmp_path / f"{run}.onnx")
        assert check_parity(model, tmp_path / f"{run}.onnx", [sample.load_image() for sample in make_tiny_splits().test[:4]]) <= PARITY_TOLERANCE


@pytest.mark.parametrize(
    "options",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0}, {"latent_dim": 0}, {"hidden": 0}, {"pca_variance": 1.0}, {"pca_variance": 0}, {"source_layers": []}],
)
def test_bad_options_are_clear_errors(options):
    with pytest.raises(VadError):
        FeatureAE(**options)


def test_bad_input_is_a_clear_error_and_changes_nothing(fitted):
    with pytest.raises(VadError, match="before predict"):
        FeatureAE(**SMALL).predict(grids(count=1))
    with pytest.raises(VadError, match="empty training set"):
        FeatureAE(**SMALL).fit([])
    with pytest.raises(VadError, match=r"\[B, C, H, W\]"):
        fitted.predict(grids(count=1)[0])
    with pytest.raises(VadError, match="12-channel"):
        fitted.predict(torch.zeros(1, 5, 5, 5))
    weights = {name: value.clone() for name, value in fitted.state().tensors.items()}
    with pytest.raises(VadError, match="no bottleneck"):  # latent 3 for 2-channel features
        fitted.fit([torch.randn(4, 2, 5, 5)])
    with pytest.raises(VadError, match="different shapes"):
        fitted.fit([grids(count=4), grids(count=4, channels=7)])
    with pytest.raises(VadError, match="do not vary"):  # DFR's PCA of constant features
        FeatureAE(**{**SMALL, "latent_dim": None}).fit([torch.ones(4, 12, 5, 5)])
    assert fitted.input_meta == {"channels": 12, "latent_dim": 3}
    for name, value in fitted.state().tensors.items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    with pytest.raises(VadError, match="model folder is incomplete"):
        FeatureAE().load_state(type(fitted.state())({}, {}))
    with pytest.raises(VadError, match="hub is unreachable"):  # resnet50's weights do not ship offline
        FeatureAE(source_backbone="resnet50").feature_source()


def test_a_grids_source_options_reach_the_cells_that_fuse_the_source(vad_fakes, tmp_path):
    """vad bench: ``options: {detector:feature-ae: {...}}`` goes to cells with that member only."""
    from vad.bench import Cell, cell_config

    base = {"dataset": "tiny", "options": {"detector:feature-ae": {"output": "latent"}, "feature-ae": {"epochs": 1}}}
    fused = cell_config(base, Cell(["patchcore"], "pca-global", ["fake-backbone", "detector:feature-ae"], "tiny-a"), tmp_path / "a")
    alone = cell_config(base, Cell(["patchcore"], None, ["fake-backbone"], "tiny-a"), tmp_path / "b")
    assert fused.options == base["options"] and alone.options == {}
