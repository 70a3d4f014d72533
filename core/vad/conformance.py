"""The conformance kit: each component's contract, run on tiny data (re-exported by :mod:`vad.testing`).

``check_entry(kind, name)`` checks one registered entry with the check of its kind;
``tests/test_conformance.py`` runs it over every registered entry, so a plugin is checked the
moment it registers. Every check first checks the declared options (:func:`check_options`),
then builds the component with its ``tiny_options`` and runs its contract:

* :func:`check_detector`: predict before fit and bad batches are clear errors; fit on the tiny
  data set's training images; predict gives scores ``[B]`` and maps ``[B, h, w]`` (or None for
  image-level detectors); a detector offering ``leave_one_out`` scores a training image left out
  no lower than in-sample; the claimed ``tiny_image_auroc`` is reached;
  ``cls(**hparams)`` + ``load_state(state())`` predicts the same; the model folder saves and
  loads; ONNX export matches where ``export_module()`` is offered; a detector's own feature
  source passes :func:`check_feature_source`;
* :func:`check_feature_source`, :func:`check_backbone`, :func:`check_ensembler`,
  :func:`check_metric`, :func:`check_threshold`, :func:`check_dataset`,
  :func:`check_augmentation`: see each.

A failed check raises :class:`ConformanceError` naming the component and what broke. The
detector check returns what it measured (:class:`DetectorRun`), which ``benchmarks/gpu.py``
uses to compare devices.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vad.errors import VadError
from vad.options import Configurable, OptionError

#: Tolerance for "the same output" after a state round trip or a rebuild (float32 arithmetic).
ROUND_TRIP_TOLERANCE = 1e-5


class ConformanceError(AssertionError):
    """A component does not keep its contract."""


def _require(condition: Any, owner: str, message: str) -> None:
    if not condition:
        raise ConformanceError(f"{owner}: {message}")


@contextmanager
def _raises_vad_error(owner: str, what: str) -> Iterator[None]:
    """The block must raise a VadError (a clear error), nothing else and not nothing."""
    try:
        yield
    except VadError:
        return
    except Exception as error:  # a traceback instead of a clear error
        raise ConformanceError(f"{owner}: {what} raised {type(error).__name__}: {error} instead of a VadError with a clear message") from error
    raise ConformanceError(f"{owner}: {what} raised no error")


def _close(a: Any, b: Any, owner: str, what: str) -> None:
    import torch

    if a is None or b is None:
        _require(a is None and b is None, owner, f"{what}: one side is None")
        return
    try:
        torch.testing.assert_close(torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu(), rtol=ROUND_TRIP_TOLERANCE, atol=ROUND_TRIP_TOLERANCE)
    except AssertionError as error:
        raise ConformanceError(f"{owner}: {what} differ: {error}") from None


# --------------------------------------------------------------------------- options


def check_options(cls: type[Configurable]) -> None:
    """The declared options: each documented in one line, defaults and ``tiny_options`` valid,
    ``hparams`` JSON-safe, unknown keys and bad values refused with errors naming them."""
    owner = cls.describe_owner()
    _require(isinstance(cls, type) and issubclass(cls, Configurable), owner, "is not a vad component (derive from a vad.contracts class)")
    _require(cls.name, owner, "has no registered name (class attribute name)")
    fields = cls.Options.fields()
    for name, (_, spec, _) in fields.items():
        _require(spec.description.strip() and "\n" not in spec.description, owner, f"option {name!r} needs a one-line description")
    unknown = sorted(set(cls.tiny_options) - set(fields))
    _require(not unknown, owner, f"tiny_options names undeclared options {unknown}")
    options = cls.Options.parse(cls.tiny_options, owner=owner, set_name=cls.name)
    json.dumps(options.to_dict())
    try:
        cls.Options.parse({**cls.tiny_options, "no_such_option": 1}, owner=owner)
    except VadError as error:
        _require("no_such_option" in str(error) and owner in str(error), owner, f"the unknown-option error does not name the option and component: {error}")
    else:
        raise ConformanceError(f"{owner}: an unknown option was accepted")
    for name in fields:
        bad = object()  # fits no declared type
        try:
            cls.Options.parse({**cls.tiny_options, name: bad}, owner=owner)
        except OptionError as error:
            _require(error.option == name and owner in str(error), owner, f"the error for a bad {name!r} does not name it: {error}")
        else:
            raise ConformanceError(f"{owner}: option {name!r} accepted {bad!r}: declare its type")


def _tiny(cls: type[Configurable], **extra: Any) -> dict[str, Any]:
    return {**cls.tiny_options, **extra}


# --------------------------------------------------------------------------- tiny data


def _tiny_data():
    from vad.testing import make_tiny_splits

    return make_tiny_splits()


def _fake_backbone(seed: int = 0, size: int = 64):
    from vad.testing import _fake_backbone_class

    backbone = _fake_backbone_class()(seed=seed, size=size)
    backbone.spec = backbone.name
    return backbone


@contextmanager
def _registered(kind: str | None = None, cls: type | None = None) -> Iterator[Any]:
    """The process registry with the test fakes, and ``cls`` registered under its name when no
    installed plugin registers it already (a class under test)."""
    from vad.plugins import plugin_registering, registered
    from vad.testing import FakesPlugin

    with registered(FakesPlugin(), "vad-testing-fakes") as registry:
        entry = registry.entries(kind).get(cls.name) if cls is not None and kind is not None else None
        if cls is None or kind is None or (entry is not None and entry.load() is cls):
            yield registry
            return
        with registered(plugin_registering(kind, cls), f"vad-conformance-{cls.name}") as inner:
            yield inner


# --------------------------------------------------------------------------- detectors


@dataclass
class DetectorRun:
    """What :func:`check_detector` measured on the tiny data set."""

    name: str
    device: str
    scores: Any
    maps: Any
    image_auroc: float
    fit_seconds: float
    predict_seconds: float
    onnx: str


def check_detector(cls: type, device: str = "cpu", onnx: bool = True, options: dict[str, Any] | None = None) -> DetectorRun:
    """Run a detector's contract on the tiny data set (see the module docstring) on ``device``
    with its ``tiny_options`` updated by ``options``; ``onnx=False`` skips the export (which
    runs on the CPU only)."""
    import time

    import torch

    from vad.contracts import Detector
    from vad.features import PatchFeatures
    from vad.preprocess import to_batch

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Detector), owner, "is not a vad.contracts.Detector")
    _require(cls.input in ("features", "images"), owner, f"input must be 'features' or 'images', got {cls.input!r}")
    detector = cls(**_tiny(cls, **(options or {}))).to(device)
    _require(not detector.fitted, owner, "says it is fitted before fit")
    source = PatchFeatures(_fake_backbone()).to(device) if cls.input == "features" else None
    preprocessing = source.preprocessing if source is not None else detector.preprocessing
    _require(preprocessing is not None, owner, "reads images but states no preprocessing")
    data = _tiny_data()

    def inputs(samples: list) -> torch.Tensor:
        batch = to_batch([s.load_image() for s in samples], preprocessing, device)
        if source is None:
            return batch
        with torch.inference_mode():
            grid = source(batch)
        return grid.clone()  # usable outside inference mode, as vad hands features to fit

    train = [inputs(data.train[:4]), inputs(data.train[4:])]
    test = inputs(data.test)
    labels = [s.label for s in data.test]
    with _raises_vad_error(owner, "predict before fit"):
        detector.predict(test)
    with _raises_vad_error(owner, "fit on an empty training set"):
        cls(**detector.hparams).to(device).fit([])
    start = time.perf_counter()
    detector.fit(train)
    fit_seconds = time.perf_counter() - start
    _require(detector.fitted, owner, "does not say it is fitted after fit")
    start = time.perf_counter()
    prediction = detector.predict(test)
    predict_seconds = time.perf_counter() - start
    scores = prediction.scores
    _require(isinstance(scores, torch.Tensor) and tuple(scores.shape) == (len(labels),), owner, f"scores must be a tensor [B]={len(labels)}, got {getattr(scores, 'shape', scores)}")
    _require(bool(torch.isfinite(scores).all()), owner, "predicted non-finite scores")
    if detector.produces_maps:  # the instance: an option may turn maps off (DFM score_type=nll)
        maps = prediction.maps
        _require(isinstance(maps, torch.Tensor) and maps.ndim == 3 and maps.shape[0] == len(labels), owner, f"maps must be [B, h, w], got {getattr(maps, 'shape', maps)}")
        _require(bool(torch.isfinite(maps).all()), owner, "predicted non-finite maps")
    else:
        _require(prediction.maps is None, owner, "says produces_maps = False but returns maps")
    with _raises_vad_error(owner, "predict on a batch of the wrong rank"):
        detector.predict(test[0])
    if cls.leave_one_out:
        in_sample = detector.predict(train[0])
        left_out = detector.predict_left_out(train[0], torch.arange(len(train[0])))
        _require(tuple(left_out.scores.shape) == tuple(in_sample.scores.shape) and bool(torch.isfinite(left_out.scores).all()), owner, "predict_left_out must give finite scores [B] like predict")
        _require(bool((left_out.scores >= in_sample.scores - ROUND_TRIP_TOLERANCE * (1 + in_sample.scores.abs())).all()), owner, "a training image left out of fit must not look more normal than in it")
    from vad.comparison import auroc as image_auroc

    auroc = image_auroc(labels, scores.detach().cpu().numpy())
    if cls.tiny_image_auroc is not None:
        _require(auroc >= cls.tiny_image_auroc, owner, f"claims image AUROC >= {cls.tiny_image_auroc} on the tiny data set, reached {auroc:.3f}")

    state = detector.state()
    json.dumps(state.meta)
    _require(all(isinstance(t, torch.Tensor) for t in state.tensors.values()), owner, "state() tensors must be torch tensors")
    json.dumps(detector.hparams)
    rebuilt = cls(**detector.hparams).to(device)
    rebuilt.load_state(state)
    again = rebuilt.predict(test)
    _close(again.scores, scores, owner, "scores after cls(**hparams) + load_state(state())")
    _close(again.maps, prediction.maps, owner, "maps after cls(**hparams) + load_state(state())")

    onnx_result = "not offered" if detector.export_module() is None else "skipped"
    with _registered("detectors", cls) as registry, tempfile.TemporaryDirectory(prefix="vad-conformance-") as folder:
        from vad.model import AnomalyModel, Member

        model = AnomalyModel([Member(cls.name, detector, source)], batch_size=4).to(torch.device(device))
        outputs = [(o.score, o.map) for o in model.predict(data.test)]
        model.save(Path(folder) / "model", registry)
        loaded = AnomalyModel.load(Path(folder) / "model", device, registry)
        for (score, anomaly_map), output in zip(outputs, loaded.predict(data.test)):
            _close(output.score, score, owner, "scores of the reloaded model folder")
            _close(output.map, anomaly_map, owner, "maps of the reloaded model folder")
        if onnx and onnx_result == "skipped" and device == "cpu":
            onnx_result = _check_onnx(loaded, Path(folder) / "model.onnx", data.test, owner)
        features = detector.feature_source()
        if features is not None:
            check_feature_source(features, [s.load_image() for s in data.train], registry)
    return DetectorRun(cls.name, device, scores.detach().cpu(), None if prediction.maps is None else prediction.maps.detach().cpu(), auroc, fit_seconds, predict_seconds, onnx_result)


def _check_onnx(model: Any, path: Path, samples: list, owner: str) -> str:
    """Export the model and compare onnxruntime's scores with torch's."""
    import importlib.util

    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx

    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        return "skipped (onnx / onnxruntime not installed)"
    images = [s.load_image() for s in samples[:4]]
    export_onnx(model, path)  # any input size: the graph resizes as vad does
    import onnx

    outputs = [output.name for output in onnx.load(str(path)).graph.output]
    expected = ["scores", "maps"] if model.produces_maps else ["scores"]
    _require(outputs == expected, owner, f"its ONNX graph gives {outputs}, expected {expected} (produces_maps = {model.produces_maps})")
    difference = check_parity(model, path, images)
    _require(difference <= PARITY_TOLERANCE, owner, f"ONNX scores differ from torch's by {difference:.3g} (> {PARITY_TOLERANCE})")
    return f"parity {difference:.2g}"


# --------------------------------------------------------------------------- feature sources


def check_feature_source(source: Any, images: list, registry: Any = None) -> None:
    """A FeatureSource on RGB uint8 ``images``: fitted when it must be, grids ``[B, C, h, w]``
    with ``C == out_channels``, and rebuilt from ``config()`` + ``load_state`` to the same output."""
    import torch

    from vad.build import source_from_config
    from vad.contracts import FeatureSource, Preprocessing
    from vad.preprocess import to_batch

    owner = f"feature source {getattr(source, 'name', type(source).__name__)!r}"
    _require(isinstance(source, FeatureSource), owner, "is not a vad.contracts.FeatureSource")
    _require(isinstance(source.preprocessing, Preprocessing), owner, "has no Preprocessing")
    batch = to_batch(images, source.preprocessing, source.device)
    if source.requires_fit:
        source.fit([batch[: len(batch) // 2], batch[len(batch) // 2 :]])
    with torch.inference_mode():
        grid = source(batch)
    _require(grid.ndim == 4 and grid.shape[0] == len(images), owner, f"must return [B, C, h, w], got {tuple(grid.shape)}")
    _require(grid.shape[1] == source.out_channels, owner, f"returned {grid.shape[1]} channels but out_channels is {source.out_channels}")
    _require(bool(torch.isfinite(grid).all()), owner, "returned non-finite features")
    config = source.config()
    json.dumps(config)
    rebuilt = source_from_config(json.loads(json.dumps(config)), registry).to(source.device)
    rebuilt.load_state(source.state())
    with torch.inference_mode():
        _close(rebuilt(batch), grid, owner, "features after rebuilding from config() + load_state")


def check_backbone(cls: type, model_name: str) -> None:
    """A backbone built without pretrained weights: its layers, their strides and channels, its
    preprocessing, and a rebuild from ``hparams``."""
    import torch

    from vad.contracts import Backbone, Preprocessing

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Backbone), owner, "is not a vad.contracts.Backbone")
    backbone = cls(model_name, **_tiny(cls, pretrained=False))
    _require(isinstance(backbone.preprocessing, Preprocessing), owner, "has no Preprocessing")
    info = backbone.feature_info()
    _require(info, owner, "offers no feature maps")
    strides = [f.stride for f in info]
    _require(strides == sorted(strides), owner, f"feature_info must go shallow to deep, got strides {strides}")
    json.dumps(backbone.describe(), default=str)
    size = 64
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    names = [f.name for f in info]
    maps = backbone.forward_features(images, names)
    for feature in info:
        grid = maps.get(feature.name)
        _require(grid is not None, owner, f"forward_features did not return {feature.name!r}")
        expected = (2, feature.channels, -(-size // feature.stride), -(-size // feature.stride))
        _require(tuple(grid.shape) == expected, owner, f"{feature.name!r} is {tuple(grid.shape)}, feature_info says {expected}")
    rebuilt = cls(model_name, **backbone.hparams)
    _require([vars(f) for f in rebuilt.feature_info()] == [vars(f) for f in info], owner, "rebuilding from hparams changes its feature maps")


# --------------------------------------------------------------------------- ensemblers


def check_ensembler(cls: type) -> None:
    """A feature-level ensembler over two fake backbones (as a FeatureSource, fitted, rebuilt);
    a score-level one: calibrated on two members, one fused value per image whatever the batch,
    never lowered by a higher member score, refusing a single member, rebuilt from its state."""
    from vad.contracts import FeatureEnsembler, ScoreEnsembler
    from vad.features import PatchFeatures

    owner = cls.describe_owner()
    check_options(cls)
    if issubclass(cls, FeatureEnsembler):
        with _registered("ensemblers", cls) as registry:
            members = [PatchFeatures(_fake_backbone(seed=0)), PatchFeatures(_fake_backbone(seed=1))]
            ensemble = cls(members, **_tiny(cls))
            check_feature_source(ensemble, [s.load_image() for s in _tiny_data().train], registry)
            with _raises_vad_error(owner, "an ensemble of one member"):
                cls(members[:1], **_tiny(cls))
        return
    _require(issubclass(cls, ScoreEnsembler), owner, "is neither a FeatureEnsembler nor a ScoreEnsembler")
    import torch

    from vad.contracts import Prediction

    generator = torch.Generator().manual_seed(0)

    def member(count: int, grid: int, shift: float = 0.0) -> Prediction:
        return Prediction(torch.randn(count, generator=generator) + shift, torch.rand(count, grid, grid, generator=generator))

    validation = [member(20, 4), member(20, 8)]
    test = [member(6, 4, 1.0), member(6, 8, 1.0)]
    ensemble = cls(**_tiny(cls))
    with _raises_vad_error(owner, "calibration on one member"):
        cls(**_tiny(cls)).calibrate(validation[:1])
    ensemble.calibrate(validation)
    if cls.learns_from_anomalies:
        _check_learning(ensemble, owner, validation, [member(20, 4, 2.0), member(20, 8, 2.0)], test)
    fused = ensemble.combine(test)
    _require(tuple(fused.scores.shape) == (6,), owner, f"combine must give scores [B]=6, got {tuple(fused.scores.shape)}")
    _require(fused.maps is not None and fused.maps.ndim == 3 and fused.maps.shape[0] == 6, owner, "combine must give maps [B, h, w] when members have maps")
    for index in range(6):
        single = ensemble.combine([Prediction(p.scores[index : index + 1], p.maps[index : index + 1]) for p in test])
        _close(single.scores, fused.scores[index : index + 1], owner, "an image's fused score alone and in a batch")
    higher = [Prediction(test[0].scores + 1.0, test[0].maps), test[1]]
    _require(bool((ensemble.combine(higher).scores >= fused.scores - ROUND_TRIP_TOLERANCE).all()), owner, "a higher member score lowered the fused score")
    rebuilt = cls(**ensemble.hparams)
    rebuilt.load_state(ensemble.state())
    again = rebuilt.combine(test)
    _close(again.scores, fused.scores, owner, "fused scores after rebuilding from hparams + state")
    _close(again.maps, fused.maps, owner, "fused maps after rebuilding from hparams + state")


def _check_learning(ensemble: Any, owner: str, normal: list, anomalous: list, test: list) -> None:
    """An ensemble that learns from synthetic anomalies: ``synthesize`` keeps the image's shape
    and range and changes it; ``combine`` before ``learn`` is refused; ``learn`` succeeds."""
    import torch

    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    made = [ensemble.synthesize(image.clone(), torch.Generator().manual_seed(seed)) for seed in range(4)]
    made = [anomaly for anomaly in made if anomaly is not None]
    _require(bool(made), owner, "synthesize() left the image normal in 4 draws out of 4")
    for anomaly in made:
        _require(tuple(anomaly.shape) == tuple(image.shape), owner, f"synthesize() must keep the shape {tuple(image.shape)}, got {tuple(anomaly.shape)}")
        _require(float(anomaly.min()) >= 0 and float(anomaly.max()) <= 1, owner, "synthesize() must keep values in [0, 1]")
        _require(not torch.equal(anomaly, image), owner, "synthesize() returned the image unchanged instead of None")
    with _raises_vad_error(owner, "combine() before learn()"):
        ensemble.combine(test)
    ensemble.learn(normal, anomalous)


# --------------------------------------------------------------------------- metrics, thresholds


def _evaluation_data(maps: bool = True) -> Any:
    """Near-perfect predictions on the tiny test set: scores and maps follow the truth plus noise."""
    import numpy as np

    from vad.contracts import EvaluationData

    samples = _tiny_data().test
    rng = np.random.default_rng(0)
    labels = np.array([s.label for s in samples])
    masks = [s.load_mask() for s in samples]
    truth = [np.zeros(s.load_image().shape[:2], bool) if m is None else m for s, m in zip(samples, masks)]
    return EvaluationData(
        scores=labels + 0.3 * rng.random(len(samples)),
        labels=labels,
        maps=[t + 0.3 * rng.random(t.shape) for t in truth] if maps else None,
        masks=masks,
        samples=samples,
        image_threshold=0.5,
        pixel_threshold=0.5,
    )


def check_metric(cls: type) -> None:
    """A metric on near-perfect tiny predictions: finite values, deterministic, curves with
    ascending x; a pixel metric says why it does not apply without maps."""
    import numpy as np

    from vad.contracts import Curve, Metric

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Metric) and cls.level in ("image", "pixel"), owner, "is not a Metric of level 'image' or 'pixel'")
    metric = cls(**_tiny(cls))
    data = _evaluation_data()
    if cls.level == "pixel":
        reason = metric.applicable(_evaluation_data(maps=False))
        _require(isinstance(reason, str) and reason, owner, "a pixel metric must say why it does not apply without maps")
    reason = metric.applicable(data)
    if reason is not None:
        _require(isinstance(reason, str) and reason, owner, "applicable() must return None or a reason")
        return
    value = metric.compute(data)
    values = value if isinstance(value, dict) else {cls.name: value}
    for key, number in values.items():
        _require(isinstance(key, str) and isinstance(number, (int, float)) and math.isfinite(number), owner, f"{key} = {number!r} is not a finite number")
    _require(metric.compute(data) == value, owner, "computing twice gives different values")
    for curve in metric.curves(data):
        _require(isinstance(curve, Curve), owner, "curves() must return Curve objects")
        x, y = np.asarray(curve.x), np.asarray(curve.y)
        _require(x.ndim == 1 and x.shape == y.shape and x.size >= 2, owner, f"curve {curve.name!r} needs matching 1-d x and y")
        _require(bool(np.all(np.diff(x) >= 0)) and np.isfinite(x).all() and np.isfinite(y).all(), owner, f"curve {curve.name!r} needs finite points with ascending x")


def check_threshold(cls: type) -> None:
    """A threshold rule on normal (and, where it needs them, anomalous) validation scores: a
    finite number, the same after a rebuild from hparams; a rule needing anomalous samples
    refuses normal-only data with a clear error."""
    import numpy as np

    from vad.contracts import Threshold

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Threshold), owner, "is not a vad.contracts.Threshold")
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(0, 1, 50), rng.normal(4, 1, 10)]
    labels = np.r_[np.zeros(50, int), np.ones(10, int)]
    rule = cls(**_tiny(cls))
    value = rule.fit(scores, labels)
    _require(isinstance(value, float) and math.isfinite(value), owner, f"fit must return a finite float, got {value!r}")
    _require(cls(**rule.hparams).fit(scores, labels) == value, owner, "a rebuild from hparams fits another threshold")
    if cls.needs_anomalous:
        with _raises_vad_error(owner, "fitting on normal-only validation scores"):
            rule.fit(scores[:50], labels[:50])
    else:
        normal = rule.fit(scores[:50], labels[:50])
        _require(math.isfinite(normal), owner, "fit on normal-only validation scores must give a finite threshold")


# --------------------------------------------------------------------------- data, augmentations


def check_dataset(cls: type) -> None:
    """A data set on its own ``tiny_layout``: categories, splits with the right labels, images
    and masks that decode at one size, the same samples on every load, clear errors for an
    unknown category."""
    import numpy as np

    from vad.contracts import DataSplits, Dataset

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Dataset), owner, "is not a vad.contracts.Dataset")
    with tempfile.TemporaryDirectory(prefix="vad-conformance-") as folder:
        root = cls.tiny_layout(Path(folder))
        dataset = cls(root=root, **_tiny(cls))
        categories = dataset.categories()
        _require(categories and all(isinstance(c, str) for c in categories), owner, f"categories() must list names, got {categories!r}")
        splits = dataset.load(categories[0])
        _require(isinstance(splits, DataSplits) and splits.category == categories[0], owner, "load() must return the category's DataSplits")
        _require(splits.train and splits.test, owner, "the tiny layout gives no training or no test images")
        for split_name in ("train", "validation", "test"):
            for sample in getattr(splits, split_name):
                _require(sample.split == split_name, owner, f"{sample.path} is in {split_name} but says split {sample.split!r}")
        _require(all(s.label == 0 for s in splits.train + splits.validation), owner, "training and validation samples must be normal")
        for sample in [splits.train[0], *splits.test]:
            image = sample.load_image()
            _require(image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, owner, f"{sample.path} must decode to RGB uint8 [H, W, 3]")
            mask = sample.load_mask()
            if mask is not None:
                _require(mask.dtype == bool and mask.shape == image.shape[:2], owner, f"the mask of {sample.path} must be bool at the image's size")
        again = cls(root=root, **_tiny(cls)).load(categories[0])
        _require([s.path for s in again.test] == [s.path for s in splits.test], owner, "two loads give different test samples")
        with _raises_vad_error(owner, "an unknown category"):
            dataset.load("no-such-category")


def check_augmentation(cls: type) -> None:
    """An augmentation on a random batch: same shape and dtype, input untouched, a mask
    ``[B, 1, H, W]`` in [0, 1] or None, images kept in [0, 1], the same result for the same seed."""
    import torch

    from vad.contracts import Augmentation

    owner = cls.describe_owner()
    check_options(cls)
    _require(issubclass(cls, Augmentation) and cls.target in ("image", "feature"), owner, "is not an Augmentation of target 'image' or 'feature'")
    shape = (4, 3, 32, 32) if cls.target == "image" else (4, 8, 8, 8)
    batch = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    original = batch.clone()
    augmentation = cls(**_tiny(cls))
    out, mask = augmentation(batch, torch.Generator().manual_seed(1))
    _require(torch.equal(batch, original), owner, "changed its input batch in place")
    _require(out.shape == batch.shape and out.dtype == batch.dtype, owner, f"returned {tuple(out.shape)} {out.dtype} for {tuple(batch.shape)} {batch.dtype}")
    if cls.target == "image":
        _require(bool(((out >= 0) & (out <= 1)).all()), owner, "images must stay in [0, 1]")
    if mask is not None:
        _require(tuple(mask.shape) == (shape[0], 1, *shape[2:]) and bool(((mask >= 0) & (mask <= 1)).all()), owner, "masks must be [B, 1, H, W] in [0, 1]")
    again, again_mask = cls(**_tiny(cls))(original.clone(), torch.Generator().manual_seed(1))
    _require(torch.equal(again, out) and (mask is None or torch.equal(again_mask, mask)), owner, "the same seed gave a different result")


# --------------------------------------------------------------------------- registered entries


def _check_backbone_entry(cls: type, name: str) -> None:
    model_name = cls.tiny_model if name == cls.name and cls.tiny_model else name
    check_backbone(cls, model_name)


CHECKS: dict[str, Callable[[type, str], Any]] = {
    "backbones": _check_backbone_entry,
    "detectors": lambda cls, name: check_detector(cls),
    "datasets": lambda cls, name: check_dataset(cls),
    "augmentations": lambda cls, name: check_augmentation(cls),
    "ensemblers": lambda cls, name: check_ensembler(cls),
    "metrics": lambda cls, name: check_metric(cls),
    "thresholds": lambda cls, name: check_threshold(cls),
}


def registered_entries(registry: Any = None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every registered entry, in a stable order."""
    from vad.plugins import KINDS, get_registry

    registry = registry or get_registry()
    return [(kind, name) for kind in KINDS for name in sorted(registry.entries(kind))]


def check_entry(kind: str, name: str, registry: Any = None) -> Any:
    """Check the registered ``name`` of ``kind`` with the check of its kind."""
    from vad.plugins import get_registry

    registry = registry or get_registry()
    return CHECKS[kind](registry.load_class(kind, name), name)


__all__ = [
    "ConformanceError",
    "DetectorRun",
    "check_augmentation",
    "check_backbone",
    "check_dataset",
    "check_detector",
    "check_ensembler",
    "check_entry",
    "check_feature_source",
    "check_metric",
    "check_options",
    "check_threshold",
    "registered_entries",
]
