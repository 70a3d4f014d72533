"""The CNN feature dictionary as a vad detector: contract, paper defaults, the patch scoring
against a direct computation, state, device, the CLI end to end, and bad inputs."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from vad.errors import VadError
from vad.options import OptionError
from vad.testing import check_state_refused, single_torch_thread, striped_images, tiny_image_batch
from vad_feature_dictionary.detector import CnnFeatureDictionary, l1_normalized

TINY = CnnFeatureDictionary.tiny_options


@pytest.fixture(scope="module")
def fitted():
    """The kit's tiny options with a stride that makes test patches overlap, fitted once."""
    detector = CnnFeatureDictionary(**{**TINY, "stride": 5, "neighbors": 2})
    with single_torch_thread():
        batch = tiny_image_batch(detector)
        detector.fit([batch[:4], batch[4:]])
    return detector



def test_the_options_default_to_the_mvtec_ad_papers_set_up():
    options = CnnFeatureDictionary().options
    assert (options.patch_size, options.stride, options.train_patches) == (128, 8, 100_000)
    assert (options.pca_variance, options.n_words, options.neighbors, options.l1_normalize) == (0.95, 50, 1, True)
    assert options.backbone == "tf_efficientnet_lite0" and options.pretrained  # deviation: no offline ResNet-18 weights
    assert options.image_size == 1024 and options.layer is None and options.patch_input_size is None


def test_scores_and_maps_equal_a_direct_computation(fitted):
    """Each window cropped by slicing, described, projected and scored by hand; each pixel the
    mean of the windows covering it; the image score the map's maximum."""
    images = tiny_image_batch(fitted, "test")[:3]
    prediction = fitted.predict(images)
    patch, starts = fitted.options.patch_size, [0, 5, 10, 15, 16]  # 32 px, stride 5, the last window at the border
    assert prediction.maps.shape == (3, 32, 32)
    sums, counts = torch.zeros(3, 32, 32), torch.zeros(32, 32)
    with torch.no_grad():
        for top in starts:
            for left in starts:
                pooled = fitted.pooled(images[:, :, top : top + patch, left : left + patch])
                projected = (l1_normalized(pooled) - fitted.pca_mean) @ fitted.pca_components
                distances = torch.cdist(projected.double(), fitted.words.double())
                score = distances.sort(dim=1).values[:, :2].mean(1).float()  # neighbors = 2
                sums[:, top : top + patch, left : left + patch] += score[:, None, None]
                counts[top : top + patch, left : left + patch] += 1
    torch.testing.assert_close(prediction.maps, sums / counts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prediction.scores, (sums / counts).flatten(1).amax(1), rtol=1e-4, atol=1e-5)


def test_fit_keeps_the_variance_share_and_words_in_the_pca_space(fitted):
    facts = fitted.state().meta
    assert facts["layer"] == "layer2" and facts["in_channels"] == 128 and facts["train_patches"] == 64 and facts["train_images"] == 8
    assert facts["explained_variance"] > 0.95 and fitted.words.shape == (8, facts["feature_dim"])
    assert fitted.hparams["patch_input_size"] == 16  # resolved options are saved


def test_fit_is_seeded_and_spreads_the_patches_evenly():
    detector = CnnFeatureDictionary(**{**TINY, "train_patches": 10})
    assert detector._quotas(4) == [3, 3, 2, 2]
    images = striped_images(4, size=32)
    detector.fit([images])
    again = CnnFeatureDictionary(**{**TINY, "train_patches": 10})
    again.fit([images[:1], images[1:]])  # another batching, the same patches
    assert torch.equal(detector.words, again.words)
    other = CnnFeatureDictionary(**{**TINY, "train_patches": 10, "seed": 1})
    other.fit([images])
    assert not torch.equal(detector.words, other.words)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_as_the_cpu_and_fits_there(fitted):
    images = tiny_image_batch(fitted, "test")[:4]
    cuda = CnnFeatureDictionary(**fitted.hparams)
    cuda.load_state(fitted.state())
    prediction = cuda.to("cuda").predict(images.cuda())
    assert prediction.maps.device.type == "cuda" and cuda.words.device.type == "cuda"
    torch.testing.assert_close(prediction.maps.cpu(), fitted.predict(images).maps, rtol=1e-3, atol=1e-3)
    refit = CnnFeatureDictionary(**fitted.hparams).to("cuda")
    refit.fit([tiny_image_batch(fitted).cuda()])
    assert refit.words.device.type == "cuda" and torch.isfinite(refit.predict(images.cuda()).scores).all()


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    settings = {key: value for key, value in TINY.items() if key not in ("image_size", "pretrained")}
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "cnn-dictionary", "--device", "cpu", "--no-report",
        "--image-size", "32", "--no-pretrained", *[arg for key, value in settings.items() for arg in ("--set", f"cnn-dictionary.{key}={value}")],
        "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "cnn-dictionary" and saved["hparams"]["image_size"] == 32 and saved["hparams"]["layer"] == "layer2"
    assert saved["meta"]["train_patches"] == 64
    with open(run_folder / "tiny-a" / "scores.csv") as handle:
        scores = [float(row["score"]) for row in csv.DictReader(handle)]
    assert len(scores) == 12 and all(math.isfinite(score) and score >= 0 for score in scores)  # distances


@pytest.mark.parametrize(
    "options, message",
    [
        ({"patch_size": 64, "image_size": 32}, "patch_size=64 is not allowed; patch_size must be at most image_size=32"),
        ({"neighbors": 9, "n_words": 8}, "neighbors=9 is not allowed; neighbors must be at most n_words=8"),
        ({"train_patches": 4, "n_words": 8}, "train_patches=4 is not allowed; train_patches must be at least n_words=8"),
        ({"pca_variance": 0}, "pca_variance=0 is not allowed"),
        ({"stride": 0}, "stride=0 is not allowed"),
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        CnnFeatureDictionary(**{**TINY, **options})


def test_bad_inputs_are_clear_errors_that_change_nothing(fitted):
    with pytest.raises(VadError, match="not fitted"):
        CnnFeatureDictionary(**TINY).predict(torch.zeros(1, 3, 32, 32))
    with pytest.raises(VadError, match=r"smaller than patch_size=16"):
        fitted.predict(torch.zeros(1, 3, 12, 40))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.zeros(3, 32, 32))
    with pytest.raises(VadError, match="no (layer|level) 'layer9'"):
        CnnFeatureDictionary(**{**TINY, "layer": "layer9"}).preprocessing
    flat = CnnFeatureDictionary(**TINY)
    with pytest.raises(VadError, match="same descriptor"):
        flat.fit([torch.zeros(4, 3, 32, 32)])
    with pytest.raises(VadError, match="empty training set"):
        flat.fit([])
    assert not flat.fitted
    other = CnnFeatureDictionary(**{**TINY, "n_words": 4})
    check_state_refused(fitted, other, tiny_image_batch(fitted, "test")[:2], empty_match="state_version")
