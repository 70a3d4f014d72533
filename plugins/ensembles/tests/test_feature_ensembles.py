"""Feature-level ensembles: shared input, grid alignment, PCA on training normals only, state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vad.contracts import State
from vad.errors import VadError
from vad.options import OptionError
from vad.plugins import get_registry
from vad_ensembles.features import ConcatEnsemble, PCAGlobalEnsemble, PCAIndividualEnsemble


def rebuild(ensemble, members):
    """What vad does on load: cls(members, **hparams without members) + load_state."""
    hparams = ensemble.hparams
    assert [m.config() for m in members] == hparams.pop("members")
    again = type(ensemble)(members, **hparams)
    state = ensemble.state()
    again.load_state(State(dict(state.meta), {k: v.clone() for k, v in state.tensors.items()}))
    return again


def test_registered_under_their_names():
    entries = get_registry().entries("ensemblers")
    for name in ("concat", "pca-global", "pca-individual"):
        assert name in entries


def test_shared_input_is_the_largest_member_in_zero_one_and_each_member_gets_its_own(members, image_batches):
    ensemble = ConcatEnsemble(members, scaling="none")  # raw features: the geometry alone
    assert ensemble.preprocessing.size == (96, 96)
    assert ensemble.preprocessing.mean == (0.0, 0.0, 0.0) and ensemble.preprocessing.std == (1.0, 1.0, 1.0)
    images = image_batches(2, 96)[0]
    small, large = ensemble.member_inputs(images)
    assert small.shape[-2:] == (64, 64) and large.shape[-2:] == (96, 96)
    torch.testing.assert_close(large, (images - 0.5) / 0.5)
    features = ensemble(images)
    # finest grid: the 96 px member at stride 8 -> 12 x 12; channels add up
    assert features.shape == (2, ensemble.out_channels, 12, 12)
    assert ensemble.out_channels == members[0].out_channels + members[1].out_channels
    first = members[0](small)
    torch.testing.assert_close(features[:, : first.shape[1]], F.interpolate(first, size=(12, 12), mode="bilinear", align_corners=False))


def test_configurable_grid(members, image_batches):
    features = ConcatEnsemble(members, grid=[5, 7], scaling="none")(image_batches(1, 96)[0])
    assert features.shape[-2:] == (5, 7)
    square = ConcatEnsemble(members, grid=6, scaling="none")
    assert square.hparams["grid"] == [6, 6]  # one side means a square grid, saved as (height, width)
    assert square(image_batches(1, 96)[0]).shape[-2:] == (6, 6)


def test_hparams_rebuild_the_ensemble_with_members_and_resolved_options(members):
    ensemble = PCAGlobalEnsemble(members, max_fit_patches=500, seed=3, grid=[4, 5])
    hparams = ensemble.hparams
    assert hparams["members"] == [m.config() for m in members]
    # the default n_components (None) is saved resolved: the widest member's channels
    assert {k: v for k, v in hparams.items() if k != "members"} == {
        "grid": [4, 5], "max_fit_patches": 500, "seed": 3, "n_components": max(m.out_channels for m in members), "scaling": "channel",
    }
    assert ensemble.config() == {"kind": "pca-global", "hparams": hparams}
    individual = PCAIndividualEnsemble(members, n_components=[3, 0.5])
    assert individual.hparams["n_components"] == [3, 0.5]
    assert individual.member_components == [3, 0.5]


def test_pca_global_reduces_channels_and_fits_on_training_images_only(members, image_batches):
    ensemble = PCAGlobalEnsemble(members, n_components=6)
    train = image_batches(8, 96, seed=0)
    ensemble.fit(train)
    state = {k: v.clone() for k, v in ensemble.state().tensors.items()}
    test_a = image_batches(3, 96, seed=1)[0]
    out_a = ensemble(test_a)
    assert out_a.shape == (3, 6, 12, 12)
    # Scoring other test images never changes the projection or a fixed image's features.
    ensemble(image_batches(4, 96, seed=2)[0] * 0.3)
    out_mixed = ensemble(torch.cat([test_a, image_batches(2, 96, seed=3)[0]]))
    torch.testing.assert_close(out_mixed[:3], out_a, atol=1e-5, rtol=1e-5)
    for name, tensor in ensemble.state().tensors.items():
        torch.testing.assert_close(tensor, state[name])
    # Fitting again on the same training images gives the same PCA (deterministic).
    other = PCAGlobalEnsemble(members, n_components=6)
    other.fit(train)
    torch.testing.assert_close(other(test_a), out_a)


def test_pca_global_default_width_is_the_widest_member_and_fraction_width_is_known_after_fit(members, image_batches):
    assert PCAGlobalEnsemble(members).out_channels == max(m.out_channels for m in members)
    ensemble = PCAGlobalEnsemble(members, n_components=0.9, max_fit_patches=200, seed=3)
    with pytest.raises(VadError, match="known only after fit"):
        ensemble.out_channels
    ensemble.fit(image_batches(6, 96))
    assert 1 <= ensemble.out_channels < sum(m.out_channels for m in members)
    assert ensemble.state().meta["explained_variance_kept"] > 0.9


@pytest.mark.parametrize("cls", [PCAGlobalEnsemble, PCAIndividualEnsemble])
def test_save_and_load_reproduce_features(cls, members, image_batches, make_member):
    ensemble = cls(members, n_components=4, max_fit_patches=300)
    ensemble.fit(image_batches(6, 96))
    test = image_batches(2, 96, seed=5)[0]
    again = rebuild(ensemble, [make_member(64, (6, 10), seed=1), make_member(96, (8, 12), seed=2, mean=(0.5,) * 3, std=(0.5,) * 3)])
    torch.testing.assert_close(again(test), ensemble(test))


def test_pca_individual_fits_one_pca_per_member(members, image_batches):
    ensemble = PCAIndividualEnsemble(members, n_components=[3, 5])
    assert ensemble.out_channels == 8
    ensemble.fit(image_batches(6, 96))
    assert ensemble(image_batches(2, 96)[0]).shape == (2, 8, 12, 12)
    assert ensemble.state().meta["n_components_kept"] == [3, 5]
    default = PCAIndividualEnsemble(members)
    assert default.out_channels == 2 * (max(m.out_channels for m in members) // 2)


def test_unfitted_pca_ensembles_refuse_to_run_or_save(members, image_batches):
    for cls in (PCAGlobalEnsemble, PCAIndividualEnsemble):
        ensemble = cls(members, n_components=2)
        with pytest.raises(VadError, match="must be fitted"):
            ensemble(image_batches(1, 96)[0])
        with pytest.raises(VadError, match="must be fitted"):
            ensemble.state()


def test_clear_errors(members, make_member):
    with pytest.raises(VadError, match="at least two members"):
        PCAGlobalEnsemble(members[:1])
    with pytest.raises(VadError, match="list of member"):
        ConcatEnsemble(members[0])
    with pytest.raises(VadError, match="not a FeatureSource"):
        ConcatEnsemble([members[0], "resnet18"])
    too_many = sum(m.out_channels for m in members) + 1
    with pytest.raises(OptionError, match=rf"ensembler 'pca-global': option n_components={too_many} is not allowed; n_components must be at most {too_many - 1}, the channels of the concatenated members"):
        PCAGlobalEnsemble(members, n_components=too_many)
    with pytest.raises(OptionError, match=rf"n_components={members[0].out_channels + 1} .* at most {members[0].out_channels}, the channels of member 0"):
        PCAIndividualEnsemble(members, n_components=members[0].out_channels + 1)
    with pytest.raises(OptionError, match=r"option n_components=\(2, 2, 2\) is not allowed; n_components must be one value for all members or a list of 2, one per member"):
        PCAIndividualEnsemble(members, n_components=[2, 2, 2])
    for bad in (1.5, 0, -0.2, True, "many"):
        with pytest.raises(OptionError, match=r"option n_components=.* is not allowed; n_components must be .*variance fraction in \(0, 1\)"):
            PCAGlobalEnsemble(members, n_components=bad)
    with pytest.raises(OptionError, match=r"option n_components=\[2, 0.5, 7.5\] is not allowed"):
        PCAIndividualEnsemble(members, n_components=[2, 0.5, 7.5])
    with pytest.raises(OptionError, match=r"ensembler 'pca-global': option max_fit_patches=1 is not allowed; max_fit_patches must be an integer or null, >= 2"):
        PCAGlobalEnsemble(members, max_fit_patches=1)
    with pytest.raises(OptionError, match=r"ensembler 'concat': option grid=\[0, 4\] is not allowed; grid must be .*>= 1"):
        ConcatEnsemble(members, grid=[0, 4])
    with pytest.raises(OptionError, match=r"option grid=\[4, 4, 4\] is not allowed"):
        ConcatEnsemble(members, grid=[4, 4, 4])
    with pytest.raises(VadError, match=r"ensembler 'concat' has no option 'n_components'"):
        ConcatEnsemble(members, n_components=4)
    wide = make_member(64, seed=4)
    wide.preprocessing = type(wide.preprocessing)(size=(64, 128))
    with pytest.raises(VadError, match="aspect ratio"):
        ConcatEnsemble([members[0], wide])
    with pytest.raises(VadError, match="image batch"):
        ConcatEnsemble(members)(torch.zeros(2, 1, 96, 96))
    with pytest.raises(VadError, match="no training images"):
        PCAGlobalEnsemble(members, n_components=2).fit([])


@pytest.mark.parametrize("cls", [ConcatEnsemble, PCAGlobalEnsemble, PCAIndividualEnsemble])
def test_tiny_options_build_fit_and_every_option_is_described(cls, image_batches, make_member):
    from vad.options import describe_options

    members = [make_member(64, (6, 10), seed=1), make_member(64, (8, 12), seed=2)]
    ensemble = cls(members, **cls.tiny_options)
    ensemble.fit(image_batches(4, 64))
    assert ensemble(image_batches(2, 64)[0]).shape[:2] == (2, ensemble.out_channels)
    records = describe_options(cls.Options)
    assert [r["name"] for r in records] == list(cls.Options.fields())
    assert all(r["description"] for r in records)


def test_members_scale_with_the_shared_input(members):
    from vad_ensembles.features import ConcatEnsemble

    ensemble = ConcatEnsemble(members)
    own = [tuple(member.preprocessing.size) for member in members]
    reference = tuple(ensemble.preprocessing.size)
    assert [ensemble.member_size(i, reference) for i in range(len(members))] == own  # no input geometry: unchanged
    doubled = (2 * reference[0], 2 * reference[1])
    for index, size in enumerate(own):
        scaled = ensemble.member_size(index, doubled)
        assert all(s % 32 == 0 and abs(s - 2 * o) <= 16 for s, o in zip(scaled, size))


def test_member_scaling_gives_every_member_the_same_variance(make_member, image_batches):
    loud = make_member(96, (8, 12), seed=2, mean=(0.5,) * 3, std=(0.01,) * 3)  # features ~50x larger
    members = [make_member(64, (6, 10), seed=1), loud]
    training = image_batches(6, 96)
    raw = ConcatEnsemble(members, scaling="none")
    scaled = ConcatEnsemble(members, scaling="member")
    assert not raw.requires_fit and scaled.requires_fit
    scaled.fit(training)

    def member_variances(ensemble):
        grids = [ensemble.member_grids(batch) for batch in training]
        return [float(torch.cat([g[i] for g in grids]).transpose(0, 1).flatten(1).var(dim=1, unbiased=False).sum()) for i in range(2)]

    quiet_raw, loud_raw = member_variances(raw)
    assert loud_raw > 100 * quiet_raw
    assert member_variances(scaled) == pytest.approx([1.0, 1.0], rel=1e-3)
    channel = ConcatEnsemble(members, scaling="channel")
    channel.fit(training)
    grids = torch.cat([channel.member_grids(batch)[1] for batch in training]).transpose(0, 1).flatten(1)
    torch.testing.assert_close(grids.std(dim=1, unbiased=False), torch.ones(grids.shape[0]), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(grids.mean(dim=1), torch.zeros(grids.shape[0]), rtol=0, atol=1e-3)


@pytest.mark.parametrize("cls", [ConcatEnsemble, PCAGlobalEnsemble, PCAIndividualEnsemble])
def test_member_scaling_is_saved_and_refused_before_fit(cls, make_member, image_batches):
    def members():
        return [make_member(64, (6, 10), seed=1), make_member(96, (8, 12), seed=2, mean=(0.5,) * 3, std=(0.05,) * 3)]

    options = {} if cls is ConcatEnsemble else {"n_components": 4}
    ensemble = cls(members(), scaling="member", **options)
    with pytest.raises(VadError, match="must be fitted"):
        ensemble(image_batches(1, 96)[0])
    ensemble.fit(image_batches(6, 96))
    test = image_batches(2, 96, seed=5)[0]
    torch.testing.assert_close(rebuild(ensemble, members())(test), ensemble(test))
    state = ensemble.state()
    again = cls(members(), **{k: v for k, v in ensemble.hparams.items() if k != "members"})
    with pytest.raises(VadError, match="without its member scaling"):
        again.load_state(State(dict(state.meta), {k: v for k, v in state.tensors.items() if not k.startswith("scaling")}))
