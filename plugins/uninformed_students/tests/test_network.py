"""Uninformed Students' networks and formulas against exact patch-wise extraction and hand computations."""

import pytest
import torch

from vad_uninformed_students.network import StudentEnsemble, UninformedStudentsModel, ensemble_scores, student_loss
from vad_uninformed_students.teacher import PATCH_SIZES, PatchNetwork


@pytest.mark.parametrize("patch_size", PATCH_SIZES)
def test_dense_extraction_equals_the_patch_network_at_random_pixels(patch_size):
    torch.manual_seed(patch_size)
    network = PatchNetwork(patch_size).eval()
    image = torch.randn(2, 3, 20, 23)
    field = network.receptive_field
    before = (field - 1) // 2
    padded = torch.nn.functional.pad(image, (before, field - 1 - before, before, field - 1 - before))
    with torch.no_grad():
        dense = network(image)
        assert dense.shape == (2, 128, 20, 23)
        generator = torch.Generator().manual_seed(0)
        pixels = [(0, 0, 0), (1, 19, 22), *zip(torch.randint(2, (6,), generator=generator).tolist(), torch.randint(20, (6,), generator=generator).tolist(), torch.randint(23, (6,), generator=generator).tolist())]
        for b, y, x in pixels:
            patch = padded[b : b + 1, :, y : y + field, x : x + field]
            torch.testing.assert_close(network.describe_patches(patch)[0], dense[b, :, y, x], rtol=1e-4, atol=1e-5)
            if field < patch_size and y + patch_size <= padded.shape[-2] and x + patch_size <= padded.shape[-1]:  # the full p x p patch: the same descriptor
                full = padded[b : b + 1, :, y : y + patch_size, x : x + patch_size]
                torch.testing.assert_close(network.describe_patches(full)[0], dense[b, :, y, x], rtol=1e-4, atol=1e-5)


def test_student_loss_against_a_hand_computation():
    student = torch.tensor([[[[1.0, 2.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]: pixel 0 = (1, 0), pixel 1 = (2, 2)
    target = torch.tensor([[[[0.0, 0.0]], [[0.0, 1.0]]]])  # pixel 0 = (0, 0), pixel 1 = (0, 1)
    # squared L2 per pixel: 1 + 0 = 1 and 4 + 1 = 5; mean over the pixels: 3
    assert float(student_loss(student, target)) == pytest.approx(3.0)
    # over a batch of two images: the mean over every pixel of both
    batch_loss = student_loss(torch.cat([student, torch.zeros_like(student)]), torch.cat([target, target]))
    assert float(batch_loss) == pytest.approx((1 + 5 + 0 + 1) / 4)


def test_error_and_variance_against_a_hand_computation():
    # two students, two channels, two pixels
    first = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]]])  # pixel 0: (1, 0); pixel 1: (0, 0)
    second = torch.tensor([[[[3.0, 0.0]], [[2.0, 4.0]]]])  # pixel 0: (3, 2); pixel 1: (0, 4)
    target = torch.tensor([[[[0.0, 1.0]], [[1.0, 1.0]]]])  # pixel 0: (0, 1); pixel 1: (1, 1)
    error, variance = ensemble_scores([first, second], target)
    # pixel 0: mean (2, 1); e = ||(2, 0)||^2 = 4; v = (1 + 13) / 2 - 5 = 2
    # pixel 1: mean (0, 2); e = ||(-1, 1)||^2 = 2; v = (0 + 16) / 2 - 4 = 4
    torch.testing.assert_close(error, torch.tensor([[[4.0, 2.0]]]))
    torch.testing.assert_close(variance, torch.tensor([[[2.0, 4.0]]]))
    # the variance is the students' mean squared distance to their mean; 0 for one student
    students = [torch.randn(2, 5, 3, 4) for _ in range(3)]
    mean = sum(students) / 3
    _, v = ensemble_scores(students, torch.zeros(2, 5, 3, 4))
    torch.testing.assert_close(v, sum(((s - mean) ** 2).sum(1) for s in students) / 3, rtol=1e-4, atol=1e-5)
    e, v = ensemble_scores(students[:1], torch.zeros(2, 5, 3, 4))
    assert float(v.abs().max()) == 0.0 and torch.allclose(e, (students[0] ** 2).sum(1))


def test_teacher_statistics_are_over_every_pixel():
    ensemble = StudentEnsemble(17, students=1)
    batches = [torch.randn(1, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    ensemble.fit_teacher_statistics(batches)
    with torch.no_grad():
        outputs = torch.cat([ensemble.teacher(b) for b in batches])
    torch.testing.assert_close(ensemble.teacher_mean.flatten(), outputs.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ensemble.teacher_std.flatten(), outputs.std(dim=(0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)
    targets = ensemble.targets(torch.cat(batches))  # normalised: mean 0, std 1 per dimension
    torch.testing.assert_close(targets.mean(dim=(0, 2, 3)), torch.zeros(128), atol=1e-4, rtol=0)
    torch.testing.assert_close(targets.std(dim=(0, 2, 3), unbiased=False), torch.ones(128), atol=1e-4, rtol=0)


def test_losses_are_eq_5_7_per_student_on_the_normalised_teacher():
    torch.manual_seed(0)
    model = UninformedStudentsModel([17], students=2)
    ensemble = model.scale(17)
    ensemble.teacher_mean.normal_()
    ensemble.teacher_std.uniform_(0.5, 2.0)
    images = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        target = (ensemble.teacher(images) - ensemble.teacher_mean) / ensemble.teacher_std
        expected = [((student(images) - target) ** 2).sum(1).mean() for student in ensemble.students]
    total, parts = model.loss(images)
    assert float(total.detach()) == pytest.approx(float(sum(expected)), rel=1e-5)
    assert parts == {"p17": pytest.approx(float(sum(expected)) / 2, rel=1e-5)}


def test_validation_standardisation_gives_zero_mean_unit_std_terms():
    torch.manual_seed(1)
    ensemble = StudentEnsemble(17, students=3).eval()
    batches = [torch.randn(2, 3, 12, 12), torch.randn(1, 3, 12, 12)]
    ensemble.fit_score_statistics(batches)
    with torch.no_grad():
        error, variance = ensemble.normalized_scores(torch.cat(batches))
    for term in (error, variance):
        assert abs(float(term.mean())) < 1e-4 and float(term.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)


def test_maps_average_the_standardised_terms_over_patch_sizes_and_scores_are_the_maximum():
    torch.manual_seed(2)
    model = UninformedStudentsModel([17, 33], students=2).eval()
    for ensemble, values in zip(model.scales.values(), ((1.0, 2.0, 0.5, 4.0), (3.0, 0.5, 1.0, 0.25))):
        for name, value in zip(("error_mean", "error_std", "variance_mean", "variance_std"), values):
            getattr(ensemble, name).fill_(value)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        scores, maps = model(images)
        expected = 0
        for ensemble in model.scales.values():
            e, v = ensemble.raw_scores(images)
            expected = expected + (e - ensemble.error_mean) / ensemble.error_std + (v - ensemble.variance_mean) / ensemble.variance_std
    assert maps.shape == (2, 16, 16) and scores.shape == (2,)
    torch.testing.assert_close(maps, expected / 2)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))


def test_teachers_are_frozen_and_only_students_train():
    model = UninformedStudentsModel([17, 33], students=2).train()
    teachers = [ensemble.teacher for ensemble in model.scales.values()]
    assert all(not t.training and not any(p.requires_grad for p in t.parameters()) for t in teachers)
    assert all(s.training for ensemble in model.scales.values() for s in ensemble.students)
    trained = {id(p) for p in model.student_parameters()}
    assert trained == {id(p) for e in model.scales.values() for s in e.students for p in s.parameters()}
    assert not trained & {id(p) for t in teachers for p in t.parameters()}
    total, _ = model.loss(torch.randn(1, 3, 8, 8))
    total.backward()
    assert all(p.grad is None for t in teachers for p in t.parameters())
    assert all(p.grad is not None for p in model.student_parameters())
    keys = set(model.state_dict())
    assert {"scales.p17.teacher.convs.0.weight", "scales.p33.students.1.convs.3.weight", "scales.p33.teacher_mean", "scales.p17.variance_std"} <= keys
