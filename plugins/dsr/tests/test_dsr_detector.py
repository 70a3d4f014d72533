"""DSR as a vad detector: contract, phases, score, VQ pretraining command and weights, features, CLI, bad input."""

import json

import numpy as np
import pytest
import torch

from vad.errors import VadError
from vad.testing import single_torch_thread, tiny_image_batch
from vad_dsr.detector import Dsr, DsrFeatures
from vad_dsr.vq import bgr
from vad_reconstruction.losses import anomaly_score

TINY = dict(Dsr.tiny_options)
VQ_SIZES = {"hidden_channels": 8, "residual_channels": 4, "residual_layers": 1, "embedding_dim": 4, "codebook_size": 32}


@pytest.fixture(scope="module")
def fitted():
    """DSR with tiny widths after one VQ pretraining step and one main step on the tiny images."""
    detector = Dsr(**TINY)
    with single_torch_thread():
        detector.fit([tiny_image_batch(detector)])
    return detector



def test_the_options_default_to_the_official_hyper_parameters():
    o = Dsr().options
    assert (o.image_size, o.epochs, o.upsampling_epochs, o.steps_per_epoch, o.batch_size, o.lr) == (256, 100, 50, 1000, 8, 2e-4)
    assert (o.lr_milestones, o.lr_gamma, o.anomaly_strength, o.score_window) == ((0.8,), 0.1, 0.2, 21)
    assert (o.hidden_channels, o.residual_channels, o.residual_layers, o.embedding_dim, o.codebook_size) == (128, 64, 2, 128, 4096)
    assert (o.commitment_cost, o.decay, o.base_width) == (0.25, 0.99, 64)
    assert (o.vq_weights, o.vq_epochs, o.vq_batch_size, o.vq_lr) == (None, 100, 64, 2e-4)  # deviation: no ImageNet VQ offline
    assert Dsr().preprocessing.size == (256, 256) and Dsr().preprocessing.mean == (0.0, 0.0, 0.0)
    assert not Dsr.allows_mixed_precision and Dsr.steps_itself


@pytest.mark.parametrize(("epoch", "phase", "networks"), [
    (1, "vq", {"vq"}),  # encoders, decoder and (by EMA) both codebooks
    (2, "main", {"restriction_hi", "restriction_lo", "decoder", "detection"}),  # the VQ model stays frozen, codebooks too
    (3, "upsampling", {"upsampling"}),
])
def test_each_phase_trains_only_its_networks(epoch, phase, networks):
    detector = Dsr(**{**TINY, "upsampling_epochs": 1})
    images = tiny_image_batch(detector)
    detector.image_count = len(images)
    detector.networks = detector.build({})
    detector.before_training()
    detector.optimizers()
    before = {name: {k: v.clone() for k, v in net.state_dict().items()} for name, net in detector.networks.items()}
    detector.current_epoch = epoch
    assert detector.phase(epoch) == phase
    loss, parts = detector.training_step(images, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and not loss.requires_grad and parts
    changed = {name: {k for k, v in net.state_dict().items() if not torch.equal(v, before[name][k])} for name, net in detector.networks.items()}
    assert {name for name, keys in changed.items() if keys} == networks
    if phase == "vq":
        assert {"_vq_vae_top._embedding.weight", "_vq_vae_bot._embedding.weight", "_vq_vae_bot._ema_w"} <= changed["vq"]


def test_resume_across_phases_reaches_the_uninterrupted_weights(tmp_path):
    from vad.training import session

    images = tiny_image_batch(Dsr(**TINY))
    uninterrupted = Dsr(**TINY)
    uninterrupted.fit([images])  # epoch 1: VQ pretraining, epoch 2: main training
    with session(tmp_path, resume=False, every_minutes=0):  # a checkpoint after epoch 1
        Dsr(**TINY).fit([images])
    assert (tmp_path / "checkpoint.safetensors").is_file()
    resumed = Dsr(**TINY)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit([images])
    assert resumed.history == uninterrupted.history and resumed.epochs_trained == 2
    reference = uninterrupted.state().tensors
    assert all(torch.equal(tensor, resumed.state().tensors[name]) for name, tensor in reference.items())


def test_maps_come_from_the_upsampling_module_and_scores_from_the_detection_map(fitted):
    images = tiny_image_batch(fitted, "test")[:4]
    prediction = fitted.predict(images)
    assert prediction.scores.shape == (4,) and prediction.maps.shape == (4, 64, 64)
    model = fitted.export_module()
    with torch.no_grad():
        specific, general, probabilities = model.parts(bgr(images))
        refined = torch.softmax(model.upsampling(specific, general, probabilities), dim=1)
    torch.testing.assert_close(prediction.maps, refined[:, 1])
    torch.testing.assert_close(prediction.scores, anomaly_score(probabilities[:, 1], 21))
    assert not torch.allclose(prediction.scores, anomaly_score(prediction.maps, 21))
    # the networks see BGR, as the official cv2 loaders: the VQ encodes the swapped channels
    colour = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    vq = fitted.networks["vq"]
    with torch.no_grad():
        torch.testing.assert_close(fitted.feature_source(levels=["lo"], quantized=False)(colour), vq.encode_lo(colour.flip(1))[1])


def test_vq_pretraining_command_writes_weights_that_replace_phase_one(fitted, tmp_path):
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    import vad_dsr

    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root."""

    vad_dsr.vad_register_commands(app)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(tiny_image_batch(fitted)[:2]):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    weights = tmp_path / "vq.safetensors"
    sizes = [arg for key, value in VQ_SIZES.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    arguments = ["dsr", "pretrain-vq", "--images", str(folder), "--output", str(weights), "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--image-size", "32"]
    result = CliRunner().invoke(app, arguments + sizes)
    assert result.exit_code == 0, (result.output, result.exception)
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
        facts = handle.metadata()
    assert facts["format"] == "vad-dsr-vq" and json.loads(facts["images"]) == 2

    detector = Dsr(**{**TINY, "vq_weights": str(weights)})
    detector.fit([tiny_image_batch(detector)])
    assert detector.epochs_trained == 1 and "vq" not in detector._optimizers  # main phase only
    assert all(torch.equal(value, saved[key]) for key, value in detector.networks["vq"].state_dict().items())

    with pytest.raises(VadError, match="does not exist; make one with `vad dsr pretrain-vq"):
        Dsr(**{**TINY, "vq_weights": str(tmp_path / "nope.safetensors")}).fit([tiny_image_batch(detector)])
    wrong = Dsr(**{**TINY, "vq_weights": str(weights), "codebook_size": 64})
    with pytest.raises(VadError, match=r"does not fit the options \(codebook_size=64.*holds codebook_size=32"):
        wrong.fit([tiny_image_batch(detector)])
    assert not wrong.fitted  # nothing half-done
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VadError, match="cannot read VQ weights file"):
        Dsr(**{**TINY, "vq_weights": str(tmp_path / "broken.safetensors")}).fit([tiny_image_batch(detector)])
    for bad, words in ((["--images", str(tmp_path / "none")], "does not exist"), (["--images", str(folder), "--image-size", "48"], "image_size must be")):
        refused = CliRunner().invoke(app, ["dsr", "pretrain-vq", "--output", str(tmp_path / "x.safetensors"), *bad])
        assert isinstance(refused.exception, VadError) and words in str(refused.exception)
        assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(("extra", "least"), [
    ({}, None),  # official: collapsed to one code per codebook
    ({"codebook_init": "data"}, 8),
    ({"dead_code_steps": 2}, 8),
    ({"codebook_init": "data", "dead_code_steps": 2}, 8),
])
def test_short_vq_pretraining_collapses_unless_codes_start_or_restart_on_encoder_outputs(extra, least):
    from vad.distillation import TensorImages
    from vad.options import OptionError
    from vad_dsr.cli import PretrainOptions, pretrain_vq

    assert (PretrainOptions().codebook_init, PretrainOptions().dead_code_steps) == ("random", 0)  # official by default
    with pytest.raises(OptionError, match="codebook_init"):
        PretrainOptions.parse({"codebook_init": "kmeans"}, owner="test")
    images = tiny_image_batch(Dsr(**TINY))
    options = PretrainOptions(image_size=32, epochs=1, steps_per_epoch=5, batch_size=4, **VQ_SIZES, **extra)
    model, facts = pretrain_vq(TensorImages(images), options)
    assert facts["codebook_init"] == options.codebook_init and model.quantizer_lo._dead_code_steps == 0  # restarts end with the run
    with torch.no_grad():
        latents = model.latents(bgr(images))
    used = [
        len(torch.unique(quantizer.nearest(latents[key].permute(0, 2, 3, 1).reshape(-1, VQ_SIZES["embedding_dim"]))))
        for key, quantizer in (("z_lo", model.quantizer_lo), ("z_hi", model.quantizer_hi))
    ]
    if least is None:
        assert used == [1, 1]
    else:
        assert min(used) >= least, used


def test_feature_source_gives_the_codes(fitted):
    images = tiny_image_batch(fitted, "test")[:2]
    source = fitted.feature_source()
    features = source(images)
    assert features.shape == (2, 8, 16, 16) and source.out_channels == 8 and source.stride == 4
    with torch.no_grad():
        latents = fitted.networks["vq"].latents(bgr(images))
    torch.testing.assert_close(features[:, :4], latents["q_hi"])
    codebook = fitted.networks["vq"].quantizer_hi.codebook
    assert bool((torch.cdist(features[:, :4].permute(0, 2, 3, 1).reshape(-1, 4), codebook).min(dim=1).values < 1e-5).all())  # codes
    before = fitted.feature_source(levels=["lo"], quantized=False)
    torch.testing.assert_close(before(images), latents["z_lo"])
    hparams = dict(source.config()["hparams"])
    rebuilt = Dsr(**hparams.pop("detector")).feature_source(**hparams)
    assert isinstance(rebuilt, DsrFeatures) and rebuilt.requires_fit
    rebuilt.load_state(source.state())
    torch.testing.assert_close(rebuilt(images), features, rtol=0, atol=0)
    with pytest.raises(VadError):
        fitted.feature_source(levels=["hi", "hi"])


def test_vad_run_end_to_end_on_tiny_data(vad_fakes, tmp_path):
    from typer.testing import CliRunner

    from vad.cli import app

    output = tmp_path / "run"
    options = ["epochs=1", "upsampling_epochs=1", "vq_epochs=0", "steps_per_epoch=null", "batch_size=8", "vq_batch_size=8", "base_width=4"]
    options += [f"{key}={value}" for key, value in VQ_SIZES.items()]
    arguments = ["--quiet", "run", "--dataset", "tiny", "--category", "tiny-a", "--detector", "dsr", "--device", "cpu", "--no-report", "--image-size", "64", "-o", str(output)]
    result = CliRunner().invoke(app, arguments + [arg for option in options for arg in ("--set", f"dsr.{option}")])
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((output / "metrics.json").read_text())["categories"]["tiny-a"]
    assert 0 <= metrics["image_auroc"] <= 1 and 0 <= metrics["pixel_auroc"] <= 1
    saved = json.loads((output / "tiny-a" / "model" / "model.json").read_text())["members"][0]["detector"]
    assert saved["name"] == "dsr" and saved["hparams"]["image_size"] == 64 and saved["meta"]["epochs_trained"] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"image_size": 100},
        {"epochs": 0},
        {"upsampling_epochs": -1},
        {"steps_per_epoch": 0},
        {"batch_size": 0},
        {"lr": 0},
        {"lr_milestones": [1.5]},
        {"anomaly_strength": 0},
        {"vq_epochs": -1},
        {"hidden_channels": 7},
        {"codebook_size": 1},
        {"decay": 1.0},
        {"score_window": 20},
    ],
)
def test_bad_hyper_parameters_are_clear_errors(options):
    with pytest.raises(VadError):
        Dsr(**{**TINY, **options})


def test_bad_batches_and_order_of_calls(fitted):
    with pytest.raises(VadError, match="before predict"):
        Dsr(**TINY).predict(torch.rand(1, 3, 64, 64))
    with pytest.raises(VadError, match="multiples of 32"):
        fitted.predict(torch.rand(1, 3, 48, 64))
    with pytest.raises(VadError, match=r"\[B, 3, H, W\]"):
        fitted.predict(torch.rand(3, 64, 64))
    with pytest.raises(VadError, match="empty"):
        Dsr(**TINY).fit([])
    with pytest.raises(VadError, match="do not fit its options"):
        Dsr(**{**TINY, "embedding_dim": 8}).load_state(fitted.state())
    before = fitted.predict(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).scores
    with pytest.raises(VadError, match="do not fit"):
        fitted.load_state(type(fitted.state())(fitted.state().meta, {}))  # a damaged state changes nothing
    torch.testing.assert_close(fitted.predict(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))).scores, before, rtol=0, atol=0)
