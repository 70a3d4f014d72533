"""AnomalyDINO: distances and score against hand-computed values, the masking rules against the
official ones (sklearn PCA), rotations, the bank and leave-one-out, export, `vad run`, errors.

The backbone is timm's tiny test ViT (random weights, patch 16, 64 channels): no download.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from vad.errors import VadError
from vad.options import OptionError
from vad.testing import single_torch_thread, striped_images
from vad_anomaly_dino.detector import AnomalyDINO
from vad_anomaly_dino.scoring import background_mask, first_principal_scores, nearest_distances, rotate, top_percent_mean

TINY = dict(AnomalyDINO.tiny_options)
#: A mask threshold at which the random tiny ViT's first component splits the striped images' patches.
MASK_THRESHOLD = 0.5


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``vad.testing.one_torch_thread``)."""


@pytest.fixture(scope="module")
def images():
    """Six 64 px striped images."""
    return striped_images(6, 64)


@pytest.fixture(scope="module")
def two_shot(images):
    """Fitted on two reference images (with their rotations)."""
    with single_torch_thread():
        detector = AnomalyDINO(**TINY)
        detector.fit([images[:1], images[1:2]])
    return detector


# ------------------------------------------------------------------ numerical parts


def test_distances_and_image_score_match_hand_computed_values():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[0.6, 0.8]])
    assert nearest_distances(query, bank, 1, "cosine", 16).item() == pytest.approx(1 - 0.8, abs=1e-6)
    assert nearest_distances(query, bank, 2, "cosine", 1).item() == pytest.approx(((1 - 0.8) + (1 - 0.6)) / 2, abs=1e-6)
    raw_bank, raw_query = torch.tensor([[0.0, 0.0], [3.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert nearest_distances(raw_query, raw_bank, 1, "euclidean", 1).item() == pytest.approx(4.0, abs=1e-5)
    assert nearest_distances(raw_query, raw_bank, 2, "euclidean", 16).item() == pytest.approx(np.sqrt((25 + 16) / 2), abs=1e-5)
    # a query's own owner's rows are left out
    owners = torch.tensor([0, 1])
    assert nearest_distances(query, bank, 1, "cosine", 1, torch.tensor([1]), owners).item() == pytest.approx(1 - 0.6, abs=1e-6)
    # mean_top1p: the int(1 %) largest of N patches, the largest alone below 100 patches
    assert top_percent_mean(torch.arange(250.0)[None]).item() == pytest.approx(248.5)
    assert top_percent_mean(torch.arange(50.0)[None]).item() == 49.0


def test_first_principal_component_is_sklearns_with_its_sign():
    from sklearn.decomposition import PCA

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 300, 24, generator=generator) @ torch.randn(24, 24, generator=generator)
    ours = first_principal_scores(tokens)
    for image in range(2):
        expected = PCA(n_components=1, svd_solver="full").fit_transform(tokens[image].double().numpy())[:, 0]
        np.testing.assert_allclose(ours[image].numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def official_mask(tokens: np.ndarray, grid: tuple[int, int], raster: bool) -> np.ndarray:
    """The official compute_background_mask (threshold 10, border 0.2, 35 %, 3-wide kernel):
    sklearn PCA; OpenCV's dilation and closing, whose borders count for nothing, on the N x 1
    patch column (raster) or, as anomalib, on the grid."""
    from sklearn.decomposition import PCA

    first = PCA(n_components=1, svd_solver="randomized", random_state=0).fit_transform(tokens)[:, 0]
    mask = first > 10
    h, w = grid
    centre = mask.reshape(grid)[int(h * 0.2) : int(h * 0.8), int(w * 0.2) : int(w * 0.8)]
    if centre.sum() <= centre.size * 0.35:
        mask = -first > 10
    shape, kernel = ((h * w,), np.ones(3)) if raster else (grid, np.ones((3, 3)))
    mask = ndimage.binary_dilation(mask.reshape(shape), kernel)
    mask = ndimage.binary_dilation(mask, kernel)
    return ndimage.binary_erosion(mask, kernel, border_value=1).reshape(grid)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_background_mask_follows_the_official_rules(sign):
    generator = torch.Generator().manual_seed(1)
    strength = torch.full((8, 8), -18.0)
    strength[1:7, 1:7] = 14.0  # the object: rows and columns 1-6
    strength[3, 3] = -18.0  # a hole in it, which the closing fills
    strength[7, 7] = 14.0  # a speck at the end of the last row
    direction = torch.zeros(16)
    direction[0], direction[1] = 0.8 * sign, 0.6  # the sign decides which side the PCA calls positive
    tokens = strength.reshape(64, 1) * direction + 0.3 * torch.randn(64, 16, generator=generator)
    features = tokens.T.reshape(1, 16, 8, 8)
    for morphology in ("raster", "grid"):
        ours = background_mask(features, 10.0, 0.2, 0.35, 3, morphology)[0].numpy()
        np.testing.assert_array_equal(ours, official_mask(tokens.double().numpy(), (8, 8), morphology == "raster"))
        assert ours[3, 3] and ours[1:7, 1:7].all()
    raster, grid = (background_mask(features, 10.0, 0.2, 0.35, 3, morphology)[0] for morphology in ("raster", "grid"))
    assert grid[0, 3] and not raster[0, 3]  # the official kernel runs along the rows only: the object does not grow upwards


def test_rotations_are_counter_clockwise_about_the_centre_with_reflected_borders():
    image = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    torch.testing.assert_close(rotate(image, 90), torch.rot90(image, 1, (-2, -1)), atol=1e-4, rtol=0)
    torch.testing.assert_close(rotate(image, 180), torch.rot90(image, 2, (-2, -1)), atol=1e-4, rtol=0)
    assert rotate(image, 0) is image and rotate(image, 360) is image
    turned = rotate(image, 45)
    torch.testing.assert_close(turned[..., 2, 2], image[..., 2, 2])  # the centre stays
    assert bool((turned >= image.amin()).all())  # reflected, not zero-padded, corners


# ------------------------------------------------------------------ the detector


def test_bank_holds_every_rotation_and_left_out_equals_a_bank_without_the_image(two_shot, images):
    grid = (64 // 16) ** 2
    assert tuple(two_shot.bank.shape) == (2 * 8 * grid, 64) and two_shot.train_images == 2
    torch.testing.assert_close(two_shot.bank.norm(dim=1), torch.ones(2 * 8 * grid))
    assert torch.equal(two_shot.bank_sources.bincount(), torch.tensor([8 * grid, 8 * grid]))
    other_only = AnomalyDINO(**TINY)
    other_only.fit([images[1:2]])
    left_out = two_shot.predict_left_out(images[:1], torch.tensor([0]))
    torch.testing.assert_close(left_out.maps, other_only.predict(images[:1]).maps, atol=1e-6, rtol=0)
    assert bool((left_out.scores >= two_shot.predict(images[:1]).scores).all())
    with pytest.raises(VadError, match="at least 2 reference images"):
        other_only.predict_left_out(images[1:2], torch.tensor([0]))


def test_masked_export_matches_torch(images, tiny_dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    from vad.export import check_parity, export_onnx
    from vad.model import AnomalyModel, Member

    detector = AnomalyDINO(**TINY, masking=True, mask_threshold=MASK_THRESHOLD, rotation=False)
    model = AnomalyModel([Member("anomaly-dino", detector)], batch_size=4)
    model.fit(tiny_dataset.train, [])
    kept = int(detector._mask(detector.patch_features(images)).sum())
    assert 0 < kept < 6 * 16  # the mask leaves some patches out
    export_onnx(model, tmp_path / "anomaly_dino.onnx")
    assert check_parity(model, tmp_path / "anomaly_dino.onnx", [s.load_image() for s in tiny_dataset.test[:3]]) < 1e-4


def test_vad_run_end_to_end_few_shot(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "anomaly-dino", "--device", "cpu",
        "--no-report", "--image-size", "64", "--train-count", "3", "--set", "anomaly-dino.backbone=timm:test_vit",
        "--set", "anomaly-dino.pretrained=false", "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["hparams"]["image_size"] == 64 and saved["meta"]["train_images"] == 3 and saved["meta"]["bank_size"] == 3 * 8 * 16


def test_bad_inputs_are_clear_errors(two_shot, images):
    with pytest.raises(VadError, match="reads the patch tokens of a vision transformer.*'timm:resnet18' is not"):
        AnomalyDINO(**{**TINY, "backbone": "timm:resnet18"})
    with pytest.raises(OptionError, match=r"image_size.*a multiple of the patch size 16 .*\(e\.g\. 64 or 80\)"):
        AnomalyDINO(**{**TINY, "image_size": 70})
    with pytest.raises(VadError, match="not fitted"):
        AnomalyDINO(**TINY).predict(images[:1])
    with pytest.raises(VadError, match=r"expects an image batch \[B, 3, H, W\]"):
        two_shot.predict(images[0])
    with pytest.raises(VadError, match="bank holds 64-channel cosine features of blocks.5, but these options give 64-channel cosine features of blocks.2"):
        AnomalyDINO(**TINY, layer=2).load_state(two_shot.state())


def test_default_backbone_offline_fails_fast_saying_how_to_get_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    started = time.perf_counter()
    with pytest.raises(VadError, match="no weights for 'vit_small_patch14_dinov2'.*dinov2_vits14_pretrain.pth.*--weights FILE"):
        AnomalyDINO()
    assert time.perf_counter() - started < 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(two_shot, images):
    on_cpu = two_shot.predict(images[:2])
    moved = AnomalyDINO(**TINY)
    moved.load_state(two_shot.state())
    on_cuda = moved.to("cuda").predict(images[:2].cuda())
    torch.testing.assert_close(on_cuda.maps.cpu(), on_cpu.maps, atol=1e-4, rtol=1e-4)
    assert moved.bank.device.type == "cuda" and moved.backbone.device.type == "cuda"
