"""Tests of vad-variation-model: the statistics and the map against NumPy/SciPy and hand
values, leave-one-out against a refit, registration against a known shift and scikit-image,
the contract (conformance kit, ONNX), `vad run`, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from vad.conformance import check_detector
from vad.errors import VadError
from vad.options import OptionError
from vad.testing import check_state_refused, single_torch_thread
from vad_variation_model.alignment import DFT2, estimate_shifts, fft_spectrum, tapered, translate
from vad_variation_model.detector import VariationModel
from vad_variation_model.statistics import PixelMoments


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread: tiny tensors, shared cores."""


def smooth_texture(size: int = 48, seed: int = 0) -> torch.Tensor:
    """A ``[1, 3, size, size]`` smooth random gray texture in [0.1, 0.9] (a clear correlation peak)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(size * 2, size * 2)), 1.0, mode="wrap")
    field = 0.1 + 0.8 * (field - field.min()) / (field.max() - field.min())
    return torch.tensor(field, dtype=torch.float32).expand(3, -1, -1)[None].contiguous()


def crop_shifted(base: torch.Tensor, shift: tuple[int, int], size: int = 48) -> torch.Tensor:
    """The ``size`` window of a larger texture moved by ``shift``: ``out(y) = base(y - shift)``
    within the frame (the part seen through a camera that moved)."""
    top, left = size // 2 - shift[0], size // 2 - shift[1]
    return base[..., top : top + size, left : left + size].contiguous()


@pytest.fixture(scope="module")
def aligned_fit():
    """A translation-aligned model of a texture seen at five shifts, and its training images."""
    with single_torch_thread():
        base = smooth_texture()
        shifts = [(0, 0), (3, -2), (-4, 1), (2, 5), (-1, -3)]
        train = torch.cat([crop_shifted(base, s) for s in shifts]) + 0.01 * torch.randn(5, 3, 48, 48, generator=torch.Generator().manual_seed(1))
        detector = VariationModel(align="translation")
        detector.fit([train[:2], train[2:]])
        return base, train, detector


# ------------------------------------------------------------------ formulas


def test_mean_std_tolerance_and_map_by_hand():
    # one pixel seen as 0 and 20 gray levels: mean 10, population std 10; band max(10, 2 * 10) = 20
    train = torch.zeros(2, 3, 4, 4)
    train[1] = 20 / 255
    detector = VariationModel()
    detector.fit([train[:1], train[1:]])
    assert torch.allclose(detector.mean, torch.full((3, 4, 4), 10.0)) and torch.allclose(detector.std, torch.full((3, 4, 4), 10.0))
    test = torch.zeros(1, 3, 4, 4)
    test[0, 0], test[0, 1], test[0, 2] = 50 / 255, 0 / 255, 14 / 255  # deviations 40, 10, 4 gray levels
    prediction = detector.predict(test)
    assert torch.allclose(prediction.maps, torch.full((1, 4, 4), 2.0), atol=1e-5)  # max over channels: 40 / 20
    assert torch.allclose(prediction.scores, torch.tensor([2.0]), atol=1e-5)
    mean = VariationModel(color="mean", b_rel=0.5)  # band max(10, 0.5 * 10) = 10: (4 + 1 + 0.4) / 3
    mean.fit([train])
    assert torch.allclose(mean.predict(test).maps, torch.full((1, 4, 4), 1.8), atol=1e-5)


def test_statistics_and_maps_match_numpy_on_random_images():
    generator = torch.Generator().manual_seed(0)
    train, test = torch.rand(7, 3, 6, 5, generator=generator), torch.rand(2, 3, 6, 5, generator=generator)
    for color in ("max", "gray"):
        detector = VariationModel(color=color, a_abs=3.0, b_rel=1.5)
        detector.fit([train[:3], train[3:5], train[5:]])
        values = train.double().numpy() * 255
        if color == "gray":
            values = np.einsum("bchw,c->bhw", values, [0.299, 0.587, 0.114])[:, None]
        np.testing.assert_allclose(detector.mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(detector.std.numpy(), values.std(0, ddof=0), rtol=1e-5, atol=1e-4)
        x = test.double().numpy() * 255
        if color == "gray":
            x = np.einsum("bchw,c->bhw", x, [0.299, 0.587, 0.114])[:, None]
        expected = (np.abs(x - values.mean(0)) / np.maximum(3.0, 1.5 * values.std(0))).max(1)
        np.testing.assert_allclose(detector.predict(test).maps.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_pixel_moments_with_coverage_match_masked_numpy():
    generator = torch.Generator().manual_seed(2)
    values, valid = torch.randn(9, 2, 3, 4, generator=generator) * 30 + 100, torch.rand(9, 1, 3, 4, generator=generator) > 0.3
    moments = PixelMoments()
    for part in (slice(0, 4), slice(4, 5), slice(5, 9)):
        moments.update(values[part], valid[part])
    mean, std, count = moments.finish()
    masked = np.ma.masked_array(values.double().numpy(), ~np.broadcast_to(valid.numpy(), values.shape))
    np.testing.assert_allclose(count.numpy(), valid.sum(0).numpy())
    np.testing.assert_allclose(mean.numpy(), masked.mean(0).filled(0), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), masked.std(0).filled(0), rtol=1e-4, atol=1e-4)


def test_smoothing_is_scipys_gaussian_filter():
    images = torch.rand(2, 3, 12, 9, generator=torch.Generator().manual_seed(3))
    detector = VariationModel(smoothing=1.5)
    detector.fit([images])
    expected = ndimage.gaussian_filter(images.double().numpy() * 255, (0, 0, 1.5, 1.5), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(detector.mean.numpy(), expected.mean(0), rtol=1e-4, atol=1e-3)


def test_left_out_scores_equal_a_refit_without_the_image():
    train = torch.rand(5, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    detector = VariationModel(b_rel=3.0)
    detector.fit([train])
    left_out = detector.predict_left_out(train, torch.arange(5))
    for image in range(5):
        refit = VariationModel(b_rel=3.0)
        refit.fit([torch.cat([train[:image], train[image + 1 :]])])
        torch.testing.assert_close(left_out.maps[image : image + 1], refit.predict(train[image : image + 1]).maps, rtol=1e-4, atol=1e-4)
    assert (left_out.scores >= detector.predict(train).scores).all()


# ------------------------------------------------------------------ registration


def test_phase_correlation_recovers_a_known_shift_like_scikit_image():
    registration = pytest.importorskip("skimage.registration")
    base = smooth_texture(seed=5)[:, :1]
    moving = crop_shifted(base, (5, -3))
    reference = crop_shifted(base, (0, 0))
    assert estimate_shifts(moving, reference).tolist() == [[5, -3]]
    found = registration.phase_cross_correlation(tapered(reference)[0, 0].numpy(), tapered(moving)[0, 0].numpy(), normalization="phase")[0]
    assert found.tolist() == [-5.0, 3.0]  # scikit-image: the shift that registers moving onto reference
    dft = DFT2(48, 48).double()
    spectrum = torch.fft.fft2(moving.double())
    real, imag = dft(moving.double())
    torch.testing.assert_close(real, spectrum.real, rtol=1e-5, atol=1e-4)  # float32 matrices
    torch.testing.assert_close(imag, spectrum.imag, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dft.inverse_real(*fft_spectrum(moving)), torch.fft.ifft2(spectrum).real * 48 * 48, rtol=1e-5, atol=1e-4)


def test_translate_moves_and_masks():
    image = torch.arange(12.0).view(1, 1, 3, 4)
    moved, inside = translate(image, torch.tensor([[1, -1]]))
    assert moved[0, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 0], [5, 6, 7, 0]]
    assert inside[0, 0].tolist() == [[False] * 4, [True, True, True, False], [True, True, True, False]]


def test_alignment_scores_shifted_parts_in_their_own_frame(aligned_fit):
    base, train, detector = aligned_fit
    assert detector.count.min() >= 1 and detector.count.max() == 5  # the first image covers the frame
    good = crop_shifted(base, (4, -6))
    defect = good.clone()
    defect[..., 30:34, 10:14] = 0.95
    prediction = detector.predict(torch.cat([good, defect]))
    peak = divmod(int(prediction.maps[1].argmax()), 48)
    assert 30 <= peak[0] < 34 and 10 <= peak[1] < 14  # in the image's own frame
    assert (prediction.maps[:, :4] == 0).all() and (prediction.maps[:, :, -6:] == 0).all()  # the model does not reach there
    assert prediction.scores[1] > 3 * prediction.scores[0]
    unaligned = VariationModel()
    unaligned.fit([train])
    assert unaligned.predict(good).scores[0] > 2 * prediction.scores[0]  # misregistered texture looks anomalous


def test_aligned_left_out_scores_equal_a_refit(aligned_fit):
    _, train, detector = aligned_fit
    left_out = detector.predict_left_out(train, torch.arange(5))
    refit = VariationModel(align="translation")
    refit.fit([train[:3], train[4:]])  # without image 3; the first image stays the reference
    torch.testing.assert_close(left_out.maps[3:4], refit.predict(train[3:4]).maps, rtol=1e-4, atol=1e-4)


def test_exported_registration_matches_predict(aligned_fit):
    base, _, detector = aligned_fit
    images = torch.cat([crop_shifted(base, (4, -6)), crop_shifted(base, (-2, 3))])
    scores, maps = detector.export_module()(images)
    prediction = detector.predict(images)
    torch.testing.assert_close(maps, prediction.maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scores, prediction.scores, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ contract


def test_conformance_kit_with_smoothing_on_gray():
    run = check_detector(VariationModel, options={"smoothing": 1.0, "color": "gray"})  # the defaults: tests/test_conformance.py
    assert run.image_auroc >= 0.9 and run.onnx.startswith("parity")


def test_onnx_parity_with_alignment(tmp_path, aligned_fit):
    pytest.importorskip("onnxruntime")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx
    from vad.model import AnomalyModel, Member

    base, _, detector = aligned_fit
    assert detector.preprocessing.size == (48, 48)  # a fitted model takes the size it was fitted on
    model = AnomalyModel([Member("variation-model", detector, None)], batch_size=2)
    export_onnx(model, tmp_path / "variation.onnx")
    images = [(crop_shifted(base, shift)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for shift in ((4, -6), (-2, 3))]
    assert check_parity(model, tmp_path / "variation.onnx", images) <= PARITY_TOLERANCE


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "variation-model", "--device", "cpu", "--no-report", "--image-size", "32,48", "--sigma", "0", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + ["--set", "variation-model.color=gray"])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "variation-model" and saved["hparams"]["color"] == "gray"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(aligned_fit):
    base, train, cpu = aligned_fit
    cuda = VariationModel(align="translation").to("cuda")
    cuda.fit([train.cuda()])
    images = crop_shifted(base, (4, -6))
    prediction = cuda.predict(images.cuda())
    assert prediction.maps.device.type == "cuda"
    torch.testing.assert_close(prediction.maps.cpu(), cpu.predict(images).maps, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ bad input


def test_bad_inputs_are_clear_errors_that_change_nothing():
    detector = VariationModel()
    with pytest.raises(VadError, match="not fitted"):
        detector.predict(torch.rand(1, 3, 8, 8))
    with pytest.raises(VadError, match="one size"):
        detector.fit([torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 9)])
    with pytest.raises(VadError, match="empty training set"):
        detector.fit([])
    assert not detector.fitted
    detector.fit([torch.rand(1, 3, 8, 8)])
    with pytest.raises(VadError, match=r"fitted on 8x8 images but predict got 8x10"):
        detector.predict(torch.rand(1, 3, 8, 10))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        detector.predict(torch.rand(1, 1, 8, 8))
    with pytest.raises(VadError, match="at least 2 training images"):
        detector.predict_left_out(torch.rand(1, 3, 8, 8), torch.arange(1))
    check_state_refused(detector, VariationModel(color="gray"), torch.rand(1, 3, 8, 8))
    with pytest.raises(OptionError, match="a_abs"):
        VariationModel(a_abs=0)
    with pytest.raises(OptionError, match="align"):
        VariationModel(align="affine")
