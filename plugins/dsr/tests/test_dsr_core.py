"""DSR's numerical parts: the VQ layer, code-space and colour anomalies, targets, phases and rates
(the focal loss and the mean-filtered score are tested in vad-reconstruction)."""

import math

import pytest
import torch

from vad_dsr.anomalies import code_anomalies, color_anomalies, downsample_mask, segmentation_target
from vad_dsr.detector import Dsr
from vad_dsr.network import AnomalyDetectionModule, ImageReconstructionNetwork, SubspaceRestrictionModule, UpsamplingModule
from vad_dsr.vq import DiscreteLatentModel, VectorQuantizerEMA


def numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values())


def test_official_sizes_give_the_official_networks():
    # Counted on the official discrete_model.py / dsr_model.py (128 hidden, 64 residual, 2 layers,
    # 4096 x 128 codebooks): the VQ model's 40 state-dict keys hold 4,029,571 numbers (its
    # codebooks and EMA sums are parameters there, buffers here).
    with torch.device("meta"):
        vq = DiscreteLatentModel()
        counts = [numel(m) for m in (SubspaceRestrictionModule(128), ImageReconstructionNetwork(256, 128, 2, 64), AnomalyDetectionModule(64), UpsamplingModule(64))]
    assert numel(vq) == 4_029_571 and len(vq.state_dict()) == 40
    assert {"_vq_vae_top._embedding.weight", "_vq_vae_bot._ema_w", "_vq_vae_bot._ema_cluster_size", "upsample_t.weight", "_decoder_b._conv_trans_2.bias"} <= set(vq.state_dict())
    assert counts == [7_818_240, 9_418_371, 5_610_690, 5_611_842]
    assert [name for name, _ in vq.named_parameters() if "_vq_vae" in name] == []  # codebooks learn by EMA only


def quantizer() -> VectorQuantizerEMA:
    layer = VectorQuantizerEMA(3, 2, commitment_cost=0.25, decay=0.5)
    layer.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    layer._ema_w.copy_(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    layer._ema_cluster_size.copy_(torch.tensor([1.0, 2.0, 3.0]))
    return layer


def test_quantizer_takes_the_nearest_code_with_a_straight_through_gradient_and_commitment_loss():
    layer = quantizer().eval()
    points = torch.tensor([[0.1, -0.2], [0.8, 0.3], [0.2, 1.4], [0.6, 0.0]])  # nearest codes 0, 1, 2, 1
    inputs = points.t().reshape(1, 2, 2, 2).clone().requires_grad_(True)  # [B, D, H, W], positions in row order
    quantized, loss = layer(inputs)
    expected = layer.codebook[[0, 1, 2, 1]]
    torch.testing.assert_close(quantized.permute(0, 2, 3, 1).reshape(4, 2), expected)
    torch.testing.assert_close(loss, 0.25 * ((expected - points) ** 2).mean())
    weights = torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    (quantized * weights).sum().backward()
    torch.testing.assert_close(inputs.grad, weights)  # straight through: d quantized / d inputs = identity


def test_ema_update_follows_the_official_formulas_in_training_mode_only():
    points = torch.tensor([[0.1, -0.2], [0.8, 0.3], [0.6, 0.0]])  # codes 0, 1, 1; code 2 unused
    inputs = points.t().reshape(1, 2, 1, 3)
    frozen = quantizer().eval()
    frozen(inputs)
    torch.testing.assert_close(frozen.codebook, quantizer().codebook)  # eval: no update
    layer = quantizer().train()
    quantized, _ = layer(inputs)
    torch.testing.assert_close(quantized[0, :, 0, :].t(), torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]]))  # codes before the update
    cluster = torch.tensor([1.0, 2.0, 3.0]) * 0.5 + 0.5 * torch.tensor([1.0, 2.0, 0.0])  # [1.0, 2.0, 1.5]
    total = cluster.sum()
    cluster = (cluster + 1e-5) / (total + 3 * 1e-5) * total  # Laplace smoothing
    sums = torch.tensor([[0.1, -0.2], [1.4, 0.3], [0.0, 0.0]])
    ema_w = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]) * 0.5 + 0.5 * sums
    torch.testing.assert_close(layer._ema_cluster_size, cluster)
    torch.testing.assert_close(layer._ema_w, ema_w)
    torch.testing.assert_close(layer.codebook, ema_w / cluster[:, None])


def test_data_init_and_dead_code_restarts_put_codes_on_encoder_outputs():
    generator = torch.Generator().manual_seed(0)
    rows = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    layer = VectorQuantizerEMA(5, 2, decay=0.5)
    layer.init_from(rows, generator)  # 3 rows for 5 codes: each row once, then 2 jittered copies
    assert sorted(map(tuple, layer.codebook[:3].tolist())) == sorted(map(tuple, rows.tolist()))
    jitter = torch.cdist(layer.codebook[3:], rows).min(dim=1).values
    assert ((jitter > 0) & (jitter < 0.2)).all()  # 1 % of the rows' spread (std ~1.9) per dimension
    torch.testing.assert_close(layer._ema_w, layer.codebook)
    torch.testing.assert_close(layer._ema_cluster_size, torch.ones(5))

    official = VectorQuantizerEMA(5, 2, decay=0.5).train()
    restarted = VectorQuantizerEMA(5, 2, decay=0.5).train()
    restarted.load_state_dict(official.state_dict())
    restarted.restart_dead_codes(2, generator)
    points = torch.tensor([[0.1, 0.0], [3.9, 0.1], [0.0, 4.1], [4.0, 4.0]])
    inputs = points.t().reshape(1, 2, 1, 4)
    for _ in range(2):
        official(inputs), restarted(inputs)
    unused = torch.bincount(official.nearest(points), minlength=5) == 0
    assert unused.any() and official.codebook[unused].norm(dim=1).min() > 1e3  # official: thrown far away, dead
    moved = torch.cdist(restarted.codebook[unused], points).min(dim=1).values
    assert (moved < 0.2).all()  # restarted onto (jittered) inputs of the batch
    torch.testing.assert_close(restarted._ema_cluster_size[unused], torch.ones(int(unused.sum())))
    assert set(restarted.state_dict()) == set(official.state_dict())  # nothing new is saved


def test_code_anomalies_replace_codes_inside_the_mask_by_codes_near_but_not_nearest():
    codebook = torch.arange(40.0).view(40, 1)  # one-dimensional codes 0 .. 39
    features = torch.full((2, 1, 4, 4), 10.2)
    quantized = torch.full((2, 1, 4, 4), 10.0)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8, :] = 1  # the top half of the codes
    mask[0, 0, 12, 13] = 1  # one pixel anomalous: its whole 4 x 4 cell is
    strength = torch.tensor([0.25, 1.0])
    out = code_anomalies(features, quantized, codebook, mask, strength, torch.Generator().manual_seed(0))
    inside = downsample_mask(mask, (4, 4)).bool()
    assert int(inside[0].sum()) == 9 and bool(inside[0, 0, 3, 3])
    assert torch.equal(out[~inside.expand_as(out)], quantized[~inside.expand_as(quantized)])
    by_distance = sorted(range(40), key=lambda v: abs(v - 10.2))
    skip = int(40 * 0.05)  # the 5 % nearest codes are never drawn
    for image, s in enumerate(strength.tolist()):
        top = max(1, min(int(s * 40) + 1, 39))
        allowed = set(by_distance[skip:top])
        drawn = {int(v) for v in out[image][inside[image]].tolist()}
        assert drawn <= allowed and len(drawn) > 1, (s, drawn)
    assert 10 not in {int(v) for v in out[inside.expand_as(out)].tolist()}  # the nearest code is never drawn
    assert max(abs(v - 10.2) for v in out[1][inside[1]].tolist()) > 11  # full strength reaches far codes


def test_segmentation_target_is_the_mask_on_the_altered_levels_grid():
    mask = torch.zeros(3, 1, 16, 16)
    mask[:, :, 5, 6] = 1
    hi = torch.zeros(16, 16)
    hi[4:8, 4:8] = 1  # stride 4 cell of pixel (5, 6)
    lo = torch.zeros(16, 16)
    lo[0:8, 0:8] = 1  # stride 8 cell
    use_both = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1)
    use_lo = torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1)
    target = segmentation_target(mask, (4, 4), (2, 2), use_both, use_lo)[:, 0]
    assert torch.equal(target[0], lo) and torch.equal(target[1], lo) and torch.equal(target[2], hi)


def test_color_anomalies_blend_one_colour_inside_the_mask():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(3, 1, 8, 8)
    masks[0, :, 2:5, 1:7] = 1
    masks[1, :, 0:3, 0:3] = 1
    out = color_anomalies(images, masks, torch.Generator().manual_seed(2))
    keep = ~masks.bool().expand_as(images)
    assert torch.equal(out[keep], images[keep]) and torch.equal(out[2], images[2])
    for i in (0, 1):
        region = masks[i, 0].bool()
        # (1 - beta) c + beta x: solve beta and c from two pixels, then check every pixel
        x, y = images[i][:, region], out[i][:, region]
        beta = ((y[:, 0] - y[:, 1]) / (x[:, 0] - x[:, 1])).mean()
        color = (y[:, :1] - beta * x[:, :1]) / (1 - beta)
        assert 0 <= float(beta) < 0.8
        torch.testing.assert_close(y, (1 - beta) * color + beta * x)
        assert bool((color >= 0).all() and (color <= 1).all())


def test_phases_follow_the_official_step_counts_and_schedules():
    detector = Dsr(epochs=2, upsampling_epochs=1, vq_epochs=1, steps_per_epoch=3, batch_size=4, vq_batch_size=8, lr_milestones=[0.5])
    assert detector.phase_epochs() == (1, 2, 1)  # no images yet: one pass per epoch
    detector.image_count = 8  # 2 steps per pass at batch 4, 1 at batch 8
    assert detector.phase_epochs() == (3, 3, 2)  # ceil(1 * 3 / 1), ceil(2 * 3 / 2), ceil(1 * 3 / 2)
    assert detector.total_epochs == 8
    assert [detector.phase(e) for e in range(1, 9)] == ["vq"] * 3 + ["main"] * 3 + ["upsampling"] * 2
    rates = [detector.learning_rate(e) for e in range(1, 9)]
    # milestones int(fraction x epochs) as the official MultiStepLR: VQ int(0.8 * 3) = int(0.9 * 3) = 2,
    # so x0.1 twice from its third epoch; main x0.1 from int(0.5 * 3) = 1
    assert rates == pytest.approx([2e-4, 2e-4, 2e-6] + [2e-4, 2e-5, 2e-5] + [2e-4] * 2)
    two_epochs = Dsr(vq_weights="vq.safetensors", epochs=2, upsampling_epochs=0, steps_per_epoch=None)
    two_epochs.image_count = 8
    # the official int(2 * 0.8) = 1: the second main epoch runs at lr x 0.1
    assert [two_epochs.learning_rate(e) for e in (1, 2)] == pytest.approx([2e-4, 2e-5])
    with_file = Dsr(vq_weights="vq.safetensors", epochs=2, upsampling_epochs=1, steps_per_epoch=None)
    with_file.image_count = 8
    assert with_file.phase_epochs() == (0, 2, 1) and with_file.phase(1) == "main"
    official = Dsr()
    official.image_count = 240
    assert official.phase_epochs() == (math.ceil(100_000 / 4), math.ceil(100_000 / 30), math.ceil(50_000 / 30))
