"""DRAEM's sub-networks (its losses and image score are tested in vad-reconstruction)."""

import torch

from vad_draem.network import DiscriminativeSubNetwork, ReconstructiveSubNetwork


def test_official_widths_give_the_official_parameter_counts():
    # Official model_unet.py: ReconstructiveSubNetwork(base_width=128) and
    # DiscriminativeSubNetwork(base_channels=64) have 69,048,579 and 28,374,146 parameters.
    with torch.device("meta"):
        reconstructive = ReconstructiveSubNetwork(3, 3, base_width=128)
        discriminative = DiscriminativeSubNetwork(6, 2, base_width=64)
    assert sum(p.numel() for p in reconstructive.parameters()) == 69_048_579
    assert sum(p.numel() for p in discriminative.parameters()) == 28_374_146


def test_sub_network_shapes():
    x = torch.rand(2, 3, 64, 96)
    reconstruction = ReconstructiveSubNetwork(base_width=4)(x)
    assert reconstruction.shape == x.shape
    discriminative = DiscriminativeSubNetwork(base_width=4)
    features = discriminative.encode(torch.cat((reconstruction, x), 1))
    assert [f.shape[1] for f in features] == [4, 8, 16, 32, 32, 32]
    assert [f.shape[-1] for f in features] == [96, 48, 24, 12, 6, 3]
    assert discriminative.decode(features).shape == (2, 2, 64, 96)
