"""Image registration: known shifts, rotations and affine maps recovered to within a pixel,
failures said per image, maps back in each file's frame, a shifted camera no longer flagged, the
reference saved with the model, and the exported graph fed aligned images."""

from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage
from skimage.transform import AffineTransform, EuclideanTransform, warp

from vad.config import RunConfig, load_config
from vad.contracts import DataSplits, Sample
from vad.errors import VadError
from vad.model import AnomalyModel
from vad.registration import Registration


POINTS = np.array([[20, 20, 1], [100, 30, 1], [64, 64, 1], [30, 100, 1]], float).T  # (x, y, 1) columns


def scene(seed: int = 0, size: int = 128) -> np.ndarray:
    """A smooth random RGB scene with plenty of corners for ORB."""
    noise = np.random.default_rng(seed).random((size, size, 3))
    smooth = np.stack([ndimage.gaussian_filter(noise[..., c], 2.0) for c in range(3)], axis=2)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def moved(image: np.ndarray, transform) -> np.ndarray:
    """``image`` seen by a camera moved by ``transform`` (reference -> image coordinates)."""
    out = np.stack([warp(image[..., c].astype(float), transform.inverse, order=1, mode="edge", preserve_range=True) for c in range(3)], axis=2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind, transform", [
    ("translation", EuclideanTransform(translation=(3.4, -2.7))),
    ("rigid", EuclideanTransform(rotation=np.deg2rad(3), translation=(2.0, -1.5))),
    ("affine", AffineTransform(scale=(1.02, 0.99), rotation=np.deg2rad(2), shear=0.01, translation=(1.5, 2.0))),
])
def test_known_camera_moves_are_recovered_to_within_a_pixel(kind, transform):
    reference = scene()
    alignment = Registration(reference, kind).estimate(moved(reference, transform))
    assert alignment.error is None and alignment.overlap > 0.9
    back = alignment.matrix @ (transform.params @ POINTS)
    assert np.abs(back[:2] / back[2] - POINTS[:2]).max() < 1.0


def test_failures_say_why_and_leave_the_image_as_it_is():
    reference = scene()
    flat = np.full_like(reference, 120)
    for kind, reason in (("rigid", "keypoint|ORB|inliers|matches"), ("affine", "keypoint|ORB|inliers|matches")):
        image, alignment = Registration(reference, kind).align(flat)
        assert alignment.error is not None and __import__("re").search(reason, alignment.error)
        assert image is flat and np.array_equal(alignment.matrix, np.eye(3))
    far = moved(reference, EuclideanTransform(translation=(50, 40)))
    _, alignment = Registration(reference, "translation").align(far)
    assert "covers" in alignment.error
    with pytest.raises(VadError, match="registration must be one of"):
        Registration(reference, "elastic")
    with pytest.raises(VadError, match="registration reference is 128x128"):
        Registration(reference).check_image((100, 128, 3), "x.png")
    with pytest.raises(VadError, match="unknown keys"):
        load_config(None, {"detectors": ["patchcore"], "registration": "rigid", "registration_options": {"octaves": 3}})
    with pytest.raises(VadError, match="registration must be one of"):
        load_config(None, {"detectors": ["patchcore"], "registration": "elastic"})


def test_a_map_in_the_reference_frame_comes_back_in_the_files_frame():
    reference = scene()
    image = moved(reference, EuclideanTransform(translation=(4.0, 3.0)))
    registration = Registration(reference, "translation")
    aligned, alignment = registration.align(image)
    as_map = aligned.astype(np.float32).mean(axis=2)
    back = registration.to_original(as_map, alignment, image.shape[:2])
    inner = (slice(10, -10), slice(10, -10))
    assert np.abs(back[inner] - image.astype(np.float32).mean(axis=2)[inner]).mean() < 2.0  # gray levels of 255


@pytest.fixture
def registry(report_registry):
    return report_registry


def shots(count: int, split: str, seed: int, shift: tuple[float, float] = (0.0, 0.0), size: int = 64) -> list[Sample]:
    """Shots of one scene with camera noise, the camera moved by ``shift`` (x, y) px."""
    rng = np.random.default_rng(seed)
    base = scene(7, size)
    samples = []
    for index in range(count):
        image = moved(base, EuclideanTransform(translation=shift)) if any(shift) else base
        noisy = np.clip(image.astype(float) + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8)
        samples.append(Sample(f"memory://view/{split}/good/{seed}-{index}.png", 0, "view", split, image_loader=lambda image=noisy: image.copy()))  # type: ignore[arg-type]
    return samples


def test_a_shifted_camera_is_flagged_without_registration_and_not_with_it(registry):
    from vad.build import build_model

    config = RunConfig(dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu")
    train, shifted = shots(10, "train", 0), shots(6, "test", 1, shift=(3.0, -2.0))
    flagged = {}
    for kind in (None, "translation"):
        model = build_model(config, registry)
        model.registration = None if kind is None else Registration(train[0].load_image(), kind)
        model.fit(train)
        outputs = list(model.predict(shifted))
        flagged[kind] = sum(bool(o.anomalous) for o in outputs)
        assert all(o.registration_error is None for o in outputs)
    assert flagged[None] == len(shifted) and flagged["translation"] <= 1


def test_a_run_saves_the_reference_and_predict_and_export_use_it(registry, tmp_path):
    from vad.export import check_parity, export_onnx
    from vad.pipeline import run

    config = RunConfig(
        dataset="tiny", backbones=["fake-backbone"], detectors=["report-distance"], threshold="report-max", device="cpu",
        categories=["tiny-a"], report=False, output=str(tmp_path / "run"), registration="translation",
    )
    folder, _ = run(config, registry)
    model = AnomalyModel.load(folder / "tiny-a" / "model", "cpu", registry)
    assert model.registration is not None and model.registration.kind == "translation" and model.registration.size == (64, 64)
    header = (folder / "tiny-a" / "scores.csv").read_text().splitlines()[0]
    assert header.endswith(",registration_error")
    assert "registration_failures" in (folder / "metrics.json").read_text()
    description = export_onnx(model, tmp_path / "registered.onnx")
    assert any("registration (translation)" in step for step in description["outside_graph"])
    images = [np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8) for seed in range(2)]
    assert check_parity(model, tmp_path / "registered.onnx", images) < 1e-4


def test_images_of_another_size_than_the_reference_are_refused_before_the_run(registry, tmp_path):
    from vad.pipeline import category_registration

    splits = DataSplits("view", shots(3, "train", 0), [], shots(1, "test", 1, size=48))
    with pytest.raises(VadError, match="48x48 px .* registration reference is 64x64"):
        category_registration(RunConfig(registration="rigid"), splits)
