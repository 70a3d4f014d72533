"""STFPM's numerical heart: loss, per-level maps, map combination, the frozen teacher."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vad_stfpm.network import StudentTeacher, combine_maps, image_losses, layer_maps, normalized_differences, stfpm_loss


def pyramid(seed: int, batch: int = 2) -> list[torch.Tensor]:
    """Three levels shaped like a tiny feature pyramid."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, side, side + 1, generator=generator) for channels, side in ((3, 4), (5, 2), (7, 1))]


def test_loss_matches_a_hand_computation():
    teacher, student = pyramid(0), pyramid(1)
    expected = []  # the paper's eqs. 1-3, one image at a time, one position at a time
    for b in range(2):
        total = 0.0
        for t, s in zip(teacher, student):
            _, _, h, w = t.shape
            level = 0.0
            for i in range(h):
                for j in range(w):
                    tv, sv = t[b, :, i, j].tolist(), s[b, :, i, j].tolist()
                    tn, sn = math.sqrt(sum(v * v for v in tv)), math.sqrt(sum(v * v for v in sv))
                    level += 0.5 * sum((a / tn - c / sn) ** 2 for a, c in zip(tv, sv))
            total += level / (h * w)
        expected.append(total)
    expected = torch.tensor(expected)
    torch.testing.assert_close(image_losses(teacher, student), expected)
    torch.testing.assert_close(stfpm_loss(teacher, student, "official"), 2 * expected.mean())
    torch.testing.assert_close(stfpm_loss(teacher, student, "anomalib"), expected.sum())


def test_loss_reductions_are_the_official_and_anomalib_code():
    teacher, student = pyramid(2, batch=3), pyramid(3, batch=3)
    # official main.py: loss += torch.sum((t - s) ** 2, 1).mean() on F.normalize(dim=1) features
    official = sum(torch.sum((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2, 1).mean() for t, s in zip(teacher, student))
    torch.testing.assert_close(stfpm_loss(teacher, student, "official"), official)
    # anomalib STFPMLoss: (0.5 / (w * h)) * MSELoss(reduction="sum") per level, summed
    mse = nn.MSELoss(reduction="sum")
    anomalib = sum((0.5 / (t.shape[2] * t.shape[3])) * mse(F.normalize(t), F.normalize(s)) for t, s in zip(teacher, student))
    torch.testing.assert_close(stfpm_loss(teacher, student, "anomalib"), anomalib)


def test_loss_sees_directions_only():
    teacher = pyramid(4)
    scale = [torch.rand(2, 1, *t.shape[2:], generator=torch.Generator().manual_seed(5)) + 0.1 for t in teacher]
    assert stfpm_loss(teacher, [t * k for t, k in zip(teacher, scale)]) == pytest.approx(0.0, abs=1e-6)
    # opposite directions: 1/2 ||2u||^2 = 2 at every position of each of the three levels
    torch.testing.assert_close(image_losses(teacher, [-t for t in teacher]), torch.full((2,), 6.0))


def test_layer_maps_are_half_the_squared_normalized_difference():
    teacher, student = pyramid(6), pyramid(7)
    for level, difference in zip(layer_maps(teacher, student), normalized_differences(teacher, student)):
        torch.testing.assert_close(level, 0.5 * difference.pow(2).sum(1))
        assert bool((level >= 0).all()) and bool((level <= 2 + 1e-6).all())


def test_maps_combine_by_product_after_upsampling_to_the_input_size():
    constant = combine_maps([torch.full((1, 2, 2), 2.0), torch.full((1, 1, 1), 3.0)], (8, 6))
    torch.testing.assert_close(constant, torch.full((1, 8, 6), 6.0))
    first = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(8))
    second = torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(9))
    expected = F.interpolate(first[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0] * F.interpolate(
        second[:, None], size=(16, 16), mode="bilinear", align_corners=False
    )[:, 0]
    torch.testing.assert_close(combine_maps([first, second], (16, 16)), expected)
    # a discrepancy at one level only is silenced where another level matches perfectly
    silent = torch.zeros(1, 4, 4)
    assert combine_maps([torch.ones(1, 4, 4), silent], (4, 4)).abs().max() == 0


class Tiny(nn.Module):
    """Two levels (strides 1 and 2) with BatchNorm, returning a list as timm's features_only."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        first = self.first(x)
        return [first, self.second(first)]


def test_the_teacher_is_frozen_and_stays_in_eval_mode():
    torch.manual_seed(0)
    pair = StudentTeacher(Tiny(), Tiny(), positions=[0, 1]).train()
    assert not pair.teacher.training and pair.student.training
    assert not any(p.requires_grad for p in pair.teacher.parameters())
    assert all(p.requires_grad for p in pair.student.parameters())
    teacher_before = {k: v.clone() for k, v in pair.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in pair.student.state_dict().items()}
    optimizer = torch.optim.SGD(pair.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        teacher, student = pair.features(images)
        assert not any(t.requires_grad for t in teacher)
        loss = stfpm_loss(teacher, student)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in pair.teacher.state_dict().items():  # weights and BatchNorm running statistics
        assert torch.equal(value, teacher_before[key]), key
    assert not torch.equal(pair.student.state_dict()["first.0.weight"], student_before["first.0.weight"])
    assert not torch.equal(pair.student.state_dict()["first.1.running_mean"], student_before["first.1.running_mean"])


def test_forward_gives_the_map_maximum_as_the_score():
    torch.manual_seed(0)
    pair = StudentTeacher(Tiny(), Tiny(), positions=[0, 1]).eval()
    images = torch.rand(3, 3, 8, 10, generator=torch.Generator().manual_seed(2))
    scores, maps = pair(images)
    assert maps.shape == (3, 8, 10)
    teacher, student = pair.features(images)
    torch.testing.assert_close(maps, combine_maps(layer_maps(teacher, student), (8, 10)))
    torch.testing.assert_close(scores, maps.amax(dim=(1, 2)))
