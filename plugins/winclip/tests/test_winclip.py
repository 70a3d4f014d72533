"""Tests of vad-winclip on open_clip's machinery with a tiny random CLIP (48 px, 6 x 6 patches):
the paper's formulas against hand computations, the window masking, leave-one-out, zero-shot
mode, weights and offline errors, the contract and a `vad run`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vad.contracts import State
from vad.errors import VadError
from vad.options import OptionError
from vad.testing import check_state_refused, single_torch_thread, tiny_image_batch
from vad_winclip import clip as clip_model
from vad_winclip.detector import WinClip
from vad_winclip.prompts import ANOMALOUS_STATES, TEMPLATES, prompt_ensemble
from vad_winclip.scoring import coverage, harmonic_aggregation, window_indices

TINY = dict(WinClip.tiny_options)


@pytest.fixture(scope="module")
def images():
    detector = WinClip(**TINY)
    return tiny_image_batch(detector, "train"), tiny_image_batch(detector, "test")


@pytest.fixture(scope="module")
def fitted(images):
    detector = WinClip(**TINY)
    with single_torch_thread():
        detector.fit([images[0][:4], images[0][4:]])
    return detector



def test_the_prompt_ensemble_is_the_papers():
    normal, anomalous = prompt_ensemble("bottle")
    assert (len(normal), len(anomalous)) == (7 * 22, 5 * 22) and len(set(normal + anomalous)) == 264
    assert normal[0] == "a cropped photo of the bottle." and anomalous[22] == "a cropped photo of the broken bottle."
    assert "broken {}" in ANOMALOUS_STATES  # anomalib's list lacks it
    for template in TEMPLATES:  # each template once with "a" and once with "the" (anomalib: a duplicate, two missing)
        partner = template.replace(" of a ", " of the ") if " of a " in template else template.replace(" of the ", " of a ")
        assert partner != template and partner in TEMPLATES


def test_harmonic_aggregation_by_hand():
    # 3 x 3 patches, four 2 x 2 windows: the centre patch is under all four, a corner under one
    indices = window_indices((3, 3), 2)
    assert indices.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[1.0, 0.75, 0.5, 0.25]])
    expected = torch.tensor([[1.0, 2 / (1 + 1 / 0.75), 0.75], [2 / (1 + 2), 4 / (1 + 1 / 0.75 + 2 + 4), 2 / (1 / 0.75 + 4)], [0.5, 2 / (2 + 4), 0.25]])
    torch.testing.assert_close(harmonic_aggregation(scores, coverage((3, 3), indices), (3, 3))[0], expected)
    zero = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), coverage((3, 3), indices), (3, 3))[0]
    assert zero[0, 0] == 0 and zero[1, 1] == 0 and zero[2, 2] == 0.5 and torch.isfinite(zero).all()


def test_scores_follow_the_paper_formulas(fitted, images):
    """Eq. 1 per embedding, harmonic aggregation per patch, harmonic mean over the scales and
    the image, eq. 4 against a memory re-encoded from the training images, and WinCLIP+'s
    combination, computed by loops over patches and windows."""
    train, test = images
    head, batch = fitted.head, test[[0, 11]]
    encoder = head.encoder
    with torch.no_grad():
        image, windows, patches = encoder(batch)
        _, memory_windows, memory_patches = encoder(train)
    text, scale = F.normalize(head.text, dim=-1), head.logit_scale

    def anomalous(embedding):
        cos = F.normalize(embedding, dim=-1) @ text.T
        return math.exp(scale * cos[1]) / (math.exp(scale * cos[0]) + math.exp(scale * cos[1]))

    def distance(embedding, memory):  # to every row of every reference image
        return ((1 - F.cosine_similarity(embedding[None], memory.reshape(-1, memory.shape[-1]), dim=1)) / 2).min().item()

    def per_patch(window_values, side, y, x):
        covering = [window_values[i * (6 - side + 1) + j] for i in range(6 - side + 1) for j in range(6 - side + 1) if i <= y < i + side and j <= x < j + side]
        return len(covering) / sum(1 / v for v in covering)

    prediction = fitted.predict(batch)
    random_clip = clip_model.build_clip(clip_model.model_config("vad-tiny-clip"), None, seed=0)
    assert head.logit_scale == pytest.approx(float(random_clip.logit_scale.exp()))  # temperature null: CLIP's own
    for b in range(2):
        zero = [anomalous(w) for w in windows[0][b]], [anomalous(w) for w in windows[1][b]]
        few = [distance(w, memory_windows[0]) for w in windows[0][b]], [distance(w, memory_windows[1]) for w in windows[1][b]]
        image_score, vision = anomalous(image[b]), torch.zeros(6, 6)
        expected = torch.zeros(6, 6)
        for y in range(6):
            for x in range(6):
                m0 = 3 / (1 / image_score + 1 / per_patch(zero[0], 2, y, x) + 1 / per_patch(zero[1], 3, y, x))
                vision[y, x] = (distance(patches[b, 6 * y + x], memory_patches) + per_patch(few[0], 2, y, x) + per_patch(few[1], 3, y, x)) / 3
                expected[y, x] = (m0 + vision[y, x]) / 2
        torch.testing.assert_close(prediction.maps[b], expected, rtol=1e-4, atol=1e-5)
        assert prediction.scores[b].item() == pytest.approx((image_score + vision.max().item()) / 2, rel=1e-4)


def test_a_window_embedding_sees_only_its_patches(fitted, images):
    encoder, batch = fitted.head.encoder, images[1][:1]
    whole = type(encoder)(encoder.visual, (6,))  # one window over the whole 6 x 6 grid: the image itself
    with torch.no_grad():
        image, (window,), _ = whole(batch)
        torch.testing.assert_close(window[:, 0], image, rtol=1e-5, atol=1e-5)
        changed = batch.clone()
        changed[..., 16:, :] = 0  # patch rows 2-5 change; the first 2 x 2 window covers rows 0-1
        before, after = encoder(batch), encoder(changed)
    torch.testing.assert_close(after[1][0][:, 0], before[1][0][:, 0])
    assert not torch.allclose(after[0], before[0]) and not torch.allclose(after[1][0][:, -1], before[1][0][:, -1])


def test_left_out_scores_equal_a_refit_without_the_image(fitted, images):
    train = images[0]
    left_out = fitted.predict_left_out(train[[0, 5]], torch.tensor([0, 5]))
    for row, image in enumerate((0, 5)):
        refit = WinClip(**TINY)
        refit.fit([torch.cat([train[:image], train[image + 1 :]])])
        expected = refit.predict(train[image : image + 1])
        torch.testing.assert_close(left_out.maps[row : row + 1], expected.maps, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(left_out.scores[row : row + 1], expected.scores, rtol=1e-5, atol=1e-6)
    single = WinClip(**TINY)
    single.fit([train[:1]])
    with pytest.raises(VadError, match="one reference image"):
        single.predict_left_out(train[:1], torch.tensor([0]))


def test_zero_shot_mode_uses_no_training_image(images):
    train, test = images
    first, second = WinClip(**TINY, mode="zero-shot"), WinClip(**TINY, mode="zero-shot")
    first.fit([train[:2]])
    second.fit([torch.flip(train[5:], dims=[-1])])
    torch.testing.assert_close(first.predict(test).maps, second.predict(test).maps, rtol=0, atol=0)
    state = first.state()
    assert set(state.tensors) == {"text_embeddings"} and state.meta["reference_images"] == 0
    torch.testing.assert_close(first.predict_left_out(train[:3], torch.arange(3)).scores, first.predict(train[:3]).scores)
    with pytest.raises(VadError, match="empty training set"):
        WinClip(**TINY, mode="zero-shot").fit([])
    rebuilt = WinClip(**first.hparams)
    rebuilt.load_state(State(dict(state.meta), dict(state.tensors)))
    torch.testing.assert_close(rebuilt.predict(test).scores, first.predict(test).scores, rtol=0, atol=0)


def test_weights_come_from_a_local_file_and_offline_tags_fail_at_once(images, tmp_path, monkeypatch):
    config = clip_model.model_config("vad-tiny-clip")
    file = tmp_path / "clip.pt"
    torch.save(clip_model.build_clip(config, None, seed=3).state_dict(), file)
    detector = WinClip(**TINY, weights=str(file))  # the file wins over pretrained=false
    detector.fit([images[0][:2]])
    assert detector.state().meta["vision_fingerprint"] == clip_model.fingerprint(clip_model.build_clip(config, None, seed=3).visual)
    with pytest.raises(VadError, match="does not exist"):
        WinClip(**TINY, weights=str(tmp_path / "missing.pt"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(VadError, match=r"no network and not in the Hugging Face cache.*--set winclip\.weights=FILE"):
        WinClip()  # the paper's ViT-B-16-plus-240, laion400m_e31
    with pytest.raises(VadError, match="laion400m_e31"):
        WinClip(pretrained_tag="laion2b")  # unknown tags list the known ones
    with pytest.raises(VadError, match="no pretrained tag"):
        WinClip(model="vad-tiny-clip")


def test_bad_inputs_are_clear_errors(fitted, images):
    with pytest.raises(VadError, match="not fitted"):
        WinClip(**TINY).predict(images[1])
    with pytest.raises(VadError, match="positional embeddings"):
        fitted.predict(F.interpolate(images[1], size=(64, 64)))
    with pytest.raises(VadError, match=r"RGB images \[B, 3, H, W\]"):
        fitted.predict(images[1][0])
    with pytest.raises(VadError, match="did you mean 'ViT-B-16-plus-240'"):
        WinClip(model="ViT-B-16-plus-24")
    with pytest.raises(OptionError, match="scales"):
        WinClip(**TINY, scales=[7])  # the grid is 6 x 6
    with pytest.raises(OptionError, match="distinct"):
        WinClip(**TINY, scales=[2, 2])
    with pytest.raises(OptionError, match="image_size must be null or 48"):
        WinClip(**TINY, image_size=64)  # vad passes --image-size here: refused before a run starts
    assert WinClip(**TINY, image_size=48).preprocessing.size == (48, 48)
    other_weights = WinClip(**TINY, seed=1)
    with pytest.raises(VadError, match="other CLIP weights"):
        other_weights.load_state(fitted.state())
    assert not other_weights.fitted
    check_state_refused(fitted, WinClip(**TINY, mode="zero-shot"), images[1], other_match="does not fit its options", empty_match="does not fit")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(fitted, images):
    on_cuda = WinClip(**TINY).to("cuda")
    on_cuda.fit([images[0][:4].cuda(), images[0][4:].cuda()])
    prediction = on_cuda.predict(images[1].cuda())
    assert prediction.maps.device.type == "cuda" and on_cuda.head.memory_patches.device.type == "cuda"
    expected = fitted.predict(images[1])
    torch.testing.assert_close(prediction.maps.cpu(), expected.maps, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(on_cuda.predict_left_out(images[0][:2].cuda(), torch.arange(2)).scores.cpu(), fitted.predict_left_out(images[0][:2], torch.arange(2)).scores, rtol=1e-3, atol=1e-4)


def test_vad_run_end_to_end_with_four_shots_and_the_category_in_the_prompts(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    run_folder = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "winclip", "--device", "cpu", "--no-report",
        "--train-count", "4", *[f"--set=winclip.{k}={json.dumps(v)}" for k, v in TINY.items()], "--set", "winclip.class_name={category}",
        "--output", str(run_folder),
    ])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((run_folder / "metrics.json").read_text())
    assert "tiny-a" in json.dumps(metrics)
    saved = json.loads((run_folder / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "winclip" and saved["meta"]["reference_images"] == 4 and saved["meta"]["mode"] == "few-shot"
    assert saved["hparams"]["class_name"] == "tiny-a"  # the placeholder filled with the category
    assert (run_folder / "tiny-a" / "scores.csv").read_text().count("\n") == 13  # header + 12 test images


def test_defaults_are_the_papers():
    fields = {name: default for name, (_, _, default) in WinClip.Options.fields().items()}
    assert fields["model"] == "ViT-B-16-plus-240" and fields["pretrained_tag"] == "laion400m_e31" and fields["pretrained"]
    assert tuple(fields["scales"]) == (2, 3) and fields["temperature"] is None and fields["mode"] == "few-shot"
