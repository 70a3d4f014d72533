"""vad.features.FrozenLevels and chosen_levels: the frozen backbone levels trained heads read."""

import pytest
import torch

from vad.errors import VadError
from vad.features import FrozenLevels

pytest.importorskip("vad_timm")


def frozen(**changes):
    options = {"pretrained": False, "weights": None, "layers": None, "strides": (4, 8, 16), "seed": 0, "owner": "flow", **changes}
    return FrozenLevels("resnet18", **options)


def test_default_levels_are_the_deepest_at_the_strides_and_encode_has_no_gradient():
    levels = frozen()
    assert levels.names == ["layer1", "layer2", "layer3"]
    assert [(level.stride, level.channels) for level in levels.levels] == [(4, 64), (8, 128), (16, 256)]
    maps = levels.encode(torch.rand(2, 3, 32, 32))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    assert not any(m.requires_grad or m.is_inference() for m in maps)  # a head can train on them
    preprocessing = levels.preprocessing(48)
    assert preprocessing.size == (48, 48) and preprocessing.interpolation == "bilinear"
    assert preprocessing.mean == pytest.approx((0.485, 0.456, 0.406))  # the backbone's own


def test_named_or_positional_layers_and_the_seed_decide_the_weights():
    assert frozen(layers=["2", "layer3"]).names == ["layer2", "layer3"]
    first, again, other = (frozen(seed=s).backbone.model.state_dict() for s in (0, 0, 1))
    state = torch.get_rng_state()
    frozen(seed=5).backbone
    assert torch.equal(state, torch.get_rng_state())  # the global random state is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_bad_levels_are_clear_errors():
    with pytest.raises(VadError, match="flow: layers .* name the same level twice"):
        frozen(layers=["layer2", "2"]).levels
    with pytest.raises(VadError, match="no feature map at stride"):
        frozen(strides=(4, 3)).levels


def test_a_level_the_backbone_does_not_have_is_named_with_those_it_offers(fake_backbone):
    from vad.features import chosen_levels

    backbone = fake_backbone
    with pytest.raises(VadError, match=r"flow: layers \['no-such-level'\] are not levels of backbone .*it offers"):
        chosen_levels(backbone, ["no-such-level"], (8,), "flow")
