"""The shared training loop: epochs and step budgets, shuffling, checkpoints that resume to the
exact weights of an uninterrupted fit, interruption safety, clear errors; and `vad run --resume`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from vad.contracts import Prediction, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad.training import CHECKPOINT_FILE, TrainedDetector, session


class TinyAutoencoder(TrainedDetector):
    """A linear autoencoder of feature vectors: the smallest trained detector."""

    name = "tiny-autoencoder"

    class Options(TrainedDetector.Options):
        epochs: int = option(4, "Passes.", ge=1)
        width: int = option(3, "Bottleneck width.", ge=1)
        batch: int | None = option(None, "Shuffled minibatch size (null: batches as given).", ge=1)

    #: Set by a test: raise KeyboardInterrupt when this many steps were taken.
    interrupt_after: int | None = None

    def describe_input(self, first):
        return {"channels": int(first.shape[1])}

    def build(self, input_meta):
        generator = torch.Generator().manual_seed(self.options.seed)
        network = nn.Sequential(nn.Linear(input_meta["channels"], self.options.width), nn.Linear(self.options.width, input_meta["channels"]))
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        return {"autoencoder": network}

    def optimizers(self):
        optimizer = torch.optim.Adam(self.networks["autoencoder"].parameters(), lr=0.05)
        return [optimizer], [torch.optim.lr_scheduler.MultiStepLR(optimizer, [2, 3], gamma=0.5)]

    def minibatch(self):
        return self.options.batch

    def before_training(self):
        self.resuming_seen = self.resuming

    def training_step(self, batch, generator):
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        if self.interrupt_after is not None and self.steps_seen > self.interrupt_after:
            raise KeyboardInterrupt
        rows = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
        noisy = rows + 0.1 * torch.randn(rows.shape, generator=generator)  # uses the loop's generator
        return (self.networks["autoencoder"](noisy) - rows).pow(2).mean()

    def predict(self, batch):
        self.require_fitted()
        batch = self.check_batch(batch, "predict")
        rows = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
        with torch.no_grad():
            errors = (self.networks["autoencoder"](rows) - rows).pow(2).sum(1).view(batch.shape[0], *batch.shape[2:])
        return Prediction(errors.flatten(1).amax(1), errors)


def batches(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 5, 3, 3, generator=generator) for _ in range(count)]


def weights(detector: TrainedDetector) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in detector.state().tensors.items()}


@pytest.mark.parametrize("batch", [None, 2])
def test_a_resumed_fit_reaches_the_weights_of_an_uninterrupted_one(tmp_path, batch):
    straight = TinyAutoencoder(batch=batch)
    straight.fit(batches())
    interrupted = TinyAutoencoder(batch=batch)
    interrupted.interrupt_after = 7  # in the third epoch (3 steps per epoch)
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        interrupted.fit(batches())
    assert not interrupted.fitted  # nothing half-trained is left on the detector
    assert (tmp_path / CHECKPOINT_FILE).is_file()
    resumed = TinyAutoencoder(batch=batch)
    with session(tmp_path, resume=True, every_minutes=0):
        resumed.fit(batches())
    assert resumed.steps_seen == 6  # epochs 3 and 4 only
    assert interrupted.resuming_seen is False and resumed.resuming_seen is True and resumed.resuming is False
    for name, value in weights(straight).items():
        assert torch.equal(value, weights(resumed)[name]), name
    assert resumed.history == straight.history and resumed.epochs_trained == 4


def test_fitted_and_loaded_networks_are_frozen():
    detector = TinyAutoencoder()
    detector.fit(batches())
    loaded = TinyAutoencoder()
    loaded.load_state(detector.state())
    for fitted in (detector, loaded):  # eval mode, no gradients: constants for fusion and ONNX tracing
        network = fitted.networks["autoencoder"]
        assert not network.training and not any(p.requires_grad for p in network.parameters())
    detector.fit(batches())  # a refit trains fresh networks
    assert detector.epochs_trained == 4


def test_an_interrupted_refit_keeps_the_previous_weights():
    detector = TinyAutoencoder()
    detector.fit(batches())
    before = weights(detector)
    detector.interrupt_after, detector.steps_seen = 1, 0
    with pytest.raises(KeyboardInterrupt):
        detector.fit(batches())
    assert all(torch.equal(value, weights(detector)[name]) for name, value in before.items())


def test_max_steps_and_shuffled_minibatches():
    detector = TinyAutoencoder(max_steps=4)
    detector.fit(batches())
    assert detector.steps_seen == 4 and detector.epochs_trained == 2
    shuffled = TinyAutoencoder(batch=4, epochs=2)
    seen = []
    shuffled.training_step = lambda batch, generator: seen.append(batch.clone()) or torch.zeros((), requires_grad=True)
    shuffled.fit(batches())
    first, second = torch.cat(seen[:2]), torch.cat(seen[2:])  # 6 inputs in batches of 4 and 2
    assert sorted(first.sum((1, 2, 3)).tolist()) == sorted(torch.cat(batches()).sum((1, 2, 3)).tolist())
    assert not torch.equal(first, second)  # reshuffled every epoch


def test_checkpoints_of_other_options_or_damaged_files_are_refused(tmp_path):
    detector = TinyAutoencoder()
    detector.interrupt_after = 4
    with session(tmp_path, every_minutes=0), pytest.raises(KeyboardInterrupt):
        detector.fit(batches())
    with session(tmp_path, resume=True), pytest.raises(VadError, match="other options or inputs"):
        TinyAutoencoder(width=4).fit(batches())
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with session(tmp_path, resume=True), pytest.raises(VadError, match="not a readable vad training checkpoint"):
        TinyAutoencoder().fit(batches())


def test_a_diverging_loss_and_an_empty_training_set_are_clear_errors():
    class Diverges(TinyAutoencoder):
        name = "diverges"

        def training_step(self, batch, generator):
            return torch.tensor(float("nan"), requires_grad=True)

    with pytest.raises(VadError, match="training loss became nan at epoch 1"):
        Diverges().fit(batches())
    with pytest.raises(VadError, match="empty training set"):
        TinyAutoencoder().fit([])


class TwoPhaseSelfStepping(TinyAutoencoder):
    """Steps itself with two optimisers in phase one, one in phase two (as f-AnoGAN's GAN, then encoder)."""

    name = "two-phase"

    class Options(TinyAutoencoder.Options):
        second_phase_epochs: int = option(2, "Epochs of the second phase.", ge=0)

    steps_itself = True

    @property
    def total_epochs(self):
        return self.options.epochs + self.options.second_phase_epochs

    def optimizers(self):
        first, second = self.networks["autoencoder"]
        self.first_optimizer = torch.optim.SGD(first.parameters(), lr=0.01)
        self.second_optimizer = torch.optim.SGD(second.parameters(), lr=0.01)
        return [self.first_optimizer, self.second_optimizer], []

    def training_step(self, batch, generator):
        self.phases_seen = getattr(self, "phases_seen", []) + [self.current_epoch]
        loss = super().training_step(batch, generator)
        if self.current_epoch <= self.options.epochs:
            self.optimizer_step(self.first_optimizer, loss)
        loss = super().training_step(batch, generator)
        self.optimizer_step(self.second_optimizer, loss)
        return loss.detach()


def test_self_stepping_phased_methods():
    detector = TwoPhaseSelfStepping(epochs=2, second_phase_epochs=1)
    before = [p.clone() for p in detector.build({"channels": 5})["autoencoder"].parameters()]
    detector.fit(batches())
    assert detector.epochs_trained == 3 and detector.training_passes == 3 and len(detector.history) == 3
    assert detector.phases_seen == [1] * 3 + [2] * 3 + [3] * 3 and detector.current_epoch == 0
    after = list(detector.networks["autoencoder"].parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))  # both optimisers stepped
    # a loss that stops being finite inside the method's own step is the loop's clear error
    diverging = TwoPhaseSelfStepping()
    diverging.training_step = lambda batch, generator: diverging.optimizer_step(diverging.first_optimizer, torch.tensor(float("inf"), requires_grad=True))
    with pytest.raises(VadError, match="training loss became inf at epoch 1"):
        diverging.fit(batches())


def test_the_loop_keeps_the_contract():
    from vad.conformance import check_detector

    check_detector(TinyAutoencoder)


# --------------------------------------------------------------------------- vad run --resume


def _vad(*args: str, cwd: Path) -> subprocess.Popen:
    # SIGINT back to its default in the child: a suite started in the background by a shell
    # without job control ignores SIGINT, and the child would inherit that and never stop.
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("vad")), *args],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_vad_run_interrupted_by_sigint_leaves_no_model_and_resume_finishes(tmp_path):
    pytest.importorskip("vad_draem")
    pytest.importorskip("vad_datasets")
    config = tmp_path / "run.yaml"
    config.write_text(
        "detectors: [draem]\ncategories: [brick]\nreport: false\ncheckpoint_minutes: 0\n"
        "options: {draem: {image_size: 32, base_channels: 2, epochs: 60, batch_size: 8}}\n"
    )
    run_folder = tmp_path / "run"
    process = _vad("--quiet", "run", "--config", str(config), "--device", "cpu", "--output", str(run_folder), cwd=tmp_path)
    checkpoint = run_folder / "brick" / "checkpoints" / "member0" / CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert checkpoint.is_file(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert f"vad run --resume {run_folder}" in stderr
    assert not (run_folder / "brick" / "model").exists()
    assert not [p for p in (run_folder / "brick").rglob("*.tmp")]
    resumed = _vad("--quiet", "run", "--resume", str(run_folder), "--device", "cpu", "--set", "draem.epochs=5", cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=60)
    assert resumed.returncode == 2 and "--resume takes the configuration saved" in stderr
    resumed = _vad("--json-log", "run", "--resume", str(run_folder), "--device", "cpu", cwd=tmp_path)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "resumed from" in stderr
    assert (run_folder / "brick" / "model" / "model.json").is_file()
    assert not (run_folder / "brick" / "checkpoints").exists()


def test_held_out_split_is_seeded_disjoint_and_keeps_one_image():
    detector = TinyAutoencoder(seed=3)
    images = [torch.arange(10.0).view(10, 1, 1, 1).expand(10, 5, 2, 2)]
    train_images, validation = detector.held_out_split(images, 0.2)
    assert (len(train_images), len(validation)) == (8, 2)
    seen = sorted(float(x) for x in torch.cat([train_images, validation])[:, 0, 0, 0])
    assert seen == [float(i) for i in range(10)]  # disjoint, nothing lost
    again = TinyAutoencoder(seed=3).held_out_split(images, 0.2)[1]
    assert torch.equal(again, validation)
    single_train, single_validation = detector.held_out_split([images[0][:1]], 0.5)
    assert torch.equal(single_train, single_validation)  # one image: nothing to hold out
    with pytest.raises(VadError, match="empty training set"):
        detector.held_out_split([], 0.1)


def test_fixed_input_size_refuses_other_sizes():
    class Fixed(TinyAutoencoder):
        input = "images"
        fixed_input_size = True
        preprocessing = Preprocessing(size=(8, 8))

    detector = Fixed()
    assert detector.check_batch(torch.zeros(1, 3, 8, 8), "fit").shape == (1, 3, 8, 8)
    with pytest.raises(VadError, match=r"tiny-autoencoder predict takes 8 x 8 px images .* got \(8, 16\)"):
        detector.check_batch(torch.zeros(1, 3, 8, 16), "predict")


def test_a_seed_option_set_by_the_user_wins_over_the_run_seed(register_plugin):
    from vad import hookimpl
    from vad.build import create

    class Plugin:
        @hookimpl
        def vad_register_detectors(self, register):
            register(TinyAutoencoder, name="tiny-autoencoder", summary="A tiny trained detector.")

    with register_plugin(Plugin()) as registry:
        assert create("detectors", "tiny-autoencoder", registry, run_seed=7).options.seed == 7
        assert create("detectors", "tiny-autoencoder", registry, run_seed=7, seed=3).options.seed == 3  # was a TypeError
