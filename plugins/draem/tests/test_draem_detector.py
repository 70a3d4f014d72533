"""DRAEM as a vad detector: fit, predict, state, features, bad inputs (checkpoints: tests/test_training.py)."""

import copy

import pytest
import torch

from vad.errors import VadError
from vad.testing import check_state_refused, single_torch_thread
from vad_draem.detector import Draem, DraemFeatures

SMALL = {"image_size": 64, "base_channels": 4, "epochs": 1, "batch_size": 4, "seed": 0}


@pytest.fixture(scope="module")
def train_images():
    """Eight 64 px striped images in [0, 1]."""
    generator = torch.Generator().manual_seed(0)
    columns = torch.arange(64).view(1, 1, 1, 64).float()
    stripes = 0.5 + 0.25 * torch.sin(2 * torch.pi * columns / 8 + torch.rand(8, 1, 1, 1, generator=generator) * 6)
    return (stripes.expand(8, 3, 64, 64) + 0.05 * torch.rand(8, 3, 64, 64, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def fitted(train_images):
    """A DRAEM fitted for one epoch on the tiny images (shared: fitting is the slow part)."""
    detector = Draem(**SMALL)
    with single_torch_thread():
        detector.fit([train_images[:4], train_images[4:]])
    return detector


def test_fit_predict_shapes_and_ranges(fitted, train_images):
    prediction = fitted.predict(train_images[:3])
    assert prediction.scores.shape == (3,) and prediction.maps.shape == (3, 64, 64)
    assert torch.isfinite(prediction.scores).all()
    assert prediction.maps.min() >= 0 and prediction.maps.max() <= 1
    assert fitted.fitted and fitted.epochs_trained == 1
    assert fitted.preprocessing.size == (64, 64) and fitted.preprocessing.mean == (0.0, 0.0, 0.0)
    assert fitted.preprocessing.std == (1.0, 1.0, 1.0)


def test_same_seed_same_training(train_images):
    first, second = Draem(**SMALL), Draem(**SMALL)
    first.fit([train_images[:4]])
    second.fit([train_images[:4]])
    for name, tensor in first.state().tensors.items():
        assert torch.equal(tensor, second.state().tensors[name]), name


def test_synthesized_masks_match_where_the_image_changed(fitted, train_images):
    from vad_augment.generators import CutoutAnomaly, PerlinTextureAnomaly

    generator = torch.Generator().manual_seed(3)
    augmented, masks = fitted.synthesize(train_images, [PerlinTextureAnomaly(), CutoutAnomaly()], generator)
    changed = (augmented != train_images).any(dim=1, keepdim=True)
    assert torch.equal(changed, masks.bool())
    normal = Draem(**{**SMALL, "no_anomaly_probability": 1.0})
    same, empty = normal.synthesize(train_images, [CutoutAnomaly()], generator)
    assert torch.equal(same, train_images) and empty.sum() == 0


def test_feature_source_shape_and_rebuild(fitted, train_images):
    source = fitted.feature_source()
    features = source(train_images[:2])
    assert features.shape == (2, source.out_channels, 16, 16) and source.out_channels == 4 * 4 + 8 * 4
    assert source.preprocessing == fitted.preprocessing and not source.requires_fit
    config = source.config()
    assert config["kind"] == "detector-features" and config["detector"] == "draem"
    hparams = dict(config["hparams"])
    rebuilt = Draem(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, DraemFeatures) and rebuilt.out_channels == source.out_channels
    assert rebuilt.requires_fit
    rebuilt.load_state(source.state())
    assert torch.equal(rebuilt(train_images[:2]), features)
    deep = fitted.feature_source(layers=["block4", "block6"])
    assert deep(train_images[:1]).shape == (1, 32 + 32, 8, 8)


def test_unfitted_feature_source_fits_its_detector(train_images):
    source = Draem(**SMALL).feature_source()
    source.fit([train_images[:4]])
    assert not source.requires_fit and source(train_images[:1]).shape[1] == source.out_channels


def test_image_size_default_depends_on_device():
    assert Draem(base_channels=2).preprocessing.size == (128, 128)
    detector = Draem(base_channels=2)
    _ = detector.preprocessing
    assert detector.hparams["image_size"] == 128


def test_device_placement(fitted, train_images):
    assert fitted.predict(train_images[:1]).scores.device.type == "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    detector = copy.deepcopy(fitted).to("cuda")
    prediction = detector.predict(train_images[:2])
    assert prediction.maps.device.type == "cuda"
    assert torch.allclose(prediction.scores.cpu(), fitted.predict(train_images[:2]).scores, atol=1e-4)
    detector.fit([train_images[:4].cuda()])


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 100},
        {"image_size": 0},
        {"base_channels": 0},
        {"epochs": 0},
        {"lr": -1.0},
        {"lr_milestones": [1.5]},
        {"anomalies": "perlin"},
        {"anomalies": []},
        {"anomaly_options": {"swirl": {}}},
        {"no_anomaly_probability": 2},
        {"score_window": 20},
        {"seed": "zero"},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Draem(**{**SMALL, **options})


def test_bad_batches_and_order_of_calls(fitted, train_images):
    with pytest.raises(VadError, match="before predict"):
        Draem(**SMALL).predict(train_images)
    with pytest.raises(VadError, match="multiples of 32"):
        fitted.predict(torch.rand(1, 3, 50, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        Draem(**SMALL).fit([])
    with pytest.raises(VadError, match="anomaly generator"):
        Draem(**{**SMALL, "anomalies": ["rotate"]}).fit([train_images[:2]])
    with pytest.raises(VadError, match="texture folder"):
        Draem(**{**SMALL, "textures": "/does/not/exist"}).fit([train_images[:2]])


def test_mismatched_state_is_refused_and_changes_nothing(fitted, train_images):
    check_state_refused(fitted, Draem(**{**SMALL, "base_channels": 8}), train_images[:2], other_match="weights of 'reconstructive' do not fit its options")