"""vad.distillation: the pieces the teacher-student plugins share."""

import json

import numpy as np
import pytest
import torch

from vad.distillation import FolderImages, Sampler, TensorImages, denormalize, normalize, random_grayscale, read_teacher_file, save_teacher_file
from vad.errors import VadError


def test_sampler_visits_every_image_once_per_pass():
    sampler = Sampler(5, torch.Generator().manual_seed(0))
    first, second = sampler.take(5), sampler.take(5)
    assert sorted(first) == sorted(second) == list(range(5))
    assert len(sampler.take(12)) == 12


def test_normalize_round_trips_and_grayscale_is_luma():
    images = torch.rand(3, 3, 8, 8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    assert torch.allclose(denormalize(normalize(images, mean, std), mean, std), images, atol=1e-6)
    gray = random_grayscale(images, 1.0, torch.Generator().manual_seed(0))
    luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
    assert torch.allclose(gray[:, 1], luma) and torch.equal(random_grayscale(images, 0.0, torch.Generator()), images)


def test_image_sources_resize(tmp_path):
    from PIL import Image

    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.fromarray(np.full((10, 14, 3), 200, np.uint8)).save(tmp_path / "a" / "b" / "x.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = FolderImages(tmp_path, "test")
    assert len(folder) == 1 and folder.load([0], 6).shape == (1, 3, 6, 6)
    assert torch.allclose(folder.load([0], 6), torch.full((1, 3, 6, 6), 200 / 255))
    assert TensorImages(torch.rand(2, 3, 9, 9)).load([1, 0], 4).shape == (2, 3, 4, 4)


def test_folder_errors_name_the_owner(tmp_path):
    with pytest.raises(VadError, match="my-command: image folder .* does not exist"):
        FolderImages(tmp_path / "missing", "my-command")
    with pytest.raises(VadError, match="my-command: no images"):
        FolderImages(tmp_path, "my-command")


def test_teacher_files_round_trip_and_fail_clearly(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_teacher_file(path, {"w": torch.ones(2)}, "some-format", {"steps": 3, "backbone": "lite0"})
    tensors, facts = read_teacher_file(path, "owner", "make one with X")
    assert torch.equal(tensors["w"], torch.ones(2)) and facts == {"format": "some-format", "steps": 3, "backbone": "lite0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.safetensors"]  # nothing left over
    with pytest.raises(VadError, match="owner: teacher file .* does not exist; make one with X"):
        read_teacher_file(tmp_path / "missing.safetensors", "owner", "make one with X")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(VadError, match="owner: cannot read teacher file"):
        read_teacher_file(tmp_path / "bad.safetensors", "owner", "make one with X")
    assert json.loads(json.dumps(facts))
