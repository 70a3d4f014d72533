"""``vad export``: a saved model as one ONNX graph.

Input ``images``: float32 ``[B, 3, H, W]``, RGB in [0, 1] (the decoded 8-bit image divided by
255, channels first) and nothing else done to it. Batch, height and width are dynamic: images of
any size go in as they are (one size per batch) and the graph resizes them exactly as vad does;
``--input-size H,W`` pins one size instead (static shapes, for runtimes that need them). Inside
the graph:

1. resize to the working size (the network's own input size, or the one its input geometry,
   :mod:`vad.geometry`, sets) exactly as :func:`vad.preprocess.to_batch` does (antialiased
   bilinear etc.). torch's antialiased interpolation has no ONNX export and ONNX's Resize does
   not match it, so the resize is two matrix products, rows then columns, with matrices the graph
   builds from the input's height and width (:func:`resize_operator`); centre crop; clamp to
   [0, 1]; normalise with the backbone's mean and std;
2. with tiles: the tiles cut by static slices (:meth:`vad.geometry.TileLayout.cut`);
3. the feature source (backbone layers + aggregation, or a feature-level ensemble with its
   fitted PCA) traced as is;
4. the detector's head from ``Detector.export_module()`` (PatchCore: the memory bank as a
   constant and exact nearest neighbours by matmul), on every tile;
5. with tiles: the stitching (:meth:`vad.geometry.TileLayout.stitch`: two products with
   constant matrices holding the upsampling, blending weights and placement) and the image
   score as the stitched map's maximum, as :mod:`vad.model` does;
6. post-processing up to the working size: bilinear upsampling of the grid map and the
   Gaussian blur (sigma from the model).

Outputs: ``scores`` ``[B]`` (raw, compare with ``image_threshold``) and ``maps`` ``[B, h, w]`` at
the working size (the cropped window with a centre crop). Left outside: decoding, the resize of
the maps back to each image's original size, and the thresholds, which are stored in the ONNX
metadata and in the ``<file>.json`` written next to it, with the exact preprocessing. With
``--keep-aspect`` vad refuses images of another aspect ratio; the graph cannot refuse, it
resizes them too (the description says which ratio the model expects).
Not exportable: score-level ensembles of several detectors, and heads whose
``export_module()`` returns None.

``vad export --format openvino`` converts this graph to OpenVINO IR: float32, float16 weights,
or INT8 convolutions in the feature source calibrated on normal images (:func:`quantise_int8`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vad.errors import VadError

OPSET = 17
#: Largest absolute score difference accepted between onnxruntime and torch.
PARITY_TOLERANCE = 1e-4
#: The feature source's scope in the graph (the export module's attribute; its nodes are ``/features/...``).
SOURCE_SCOPE = "features"


def require_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime`` or say how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise VadError(
            f"ONNX export needs the optional packages onnx and onnxruntime ({error.name} is missing): "
            "pip install 'vad-core[onnx]' (or: pip install onnx onnxruntime)"
        ) from error
    return onnx, onnxruntime


def _triangle(distance):
    """PIL's (and torch's antialiased) bilinear filter at ``|distance|``."""
    return (1.0 - distance).clamp(min=0.0)


def _keys_cubic(distance):
    """PIL's (and torch's antialiased) bicubic filter at ``|distance|``: Keys' cubic, a = -0.5."""
    import torch

    a = -0.5
    inner = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    outer = (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a
    return torch.where(distance < 1.0, inner, torch.where(distance < 2.0, outer, torch.zeros_like(distance)))


def resize_operator(length, size_out: int, interpolation: str):
    """The ``[size_out, length]`` float32 matrix of :func:`vad.preprocess.resize_batch` along an
    axis of ``length`` samples (an int, or a traced size: the matrix is built from tensor
    operations only, so the graph builds it for each input's own size).

    It follows torch's kernels: antialiased bilinear and bicubic (the filter widened by the
    shrink factor when shrinking, weights normalised over the samples inside the axis), legacy
    nearest (``floor(i * length / size_out)``), and area (adaptive average pooling).
    """
    import torch

    from vad.preprocess import interpolate_mode

    mode = interpolate_mode(interpolation)
    samples = torch.arange(length, dtype=torch.float32)
    count = torch.ones_like(samples).sum()  # ``length`` as a tensor, so a trace keeps it dynamic
    outputs = torch.arange(size_out, dtype=torch.float32)
    if mode == "nearest":
        source = torch.minimum(torch.floor(outputs * (count / size_out)), count - 1)
        return (samples[None, :] == source[:, None]).float()
    if mode == "area":
        start, end = torch.floor(outputs * count / size_out), torch.ceil((outputs + 1) * count / size_out)
        inside = (samples[None, :] >= start[:, None]) & (samples[None, :] < end[:, None])
        return inside.float() / (end - start)[:, None]
    scale = count / size_out
    distance = (samples[None, :] + 0.5 - scale * (outputs[:, None] + 0.5)) / torch.clamp(scale, min=1.0)
    weights = (_keys_cubic if mode == "bicubic" else _triangle)(distance.abs())
    return weights / weights.sum(dim=1, keepdim=True)


def _resize_statement(preprocessing: Any) -> str:
    """The exact resize vad applies, for the description: to what size, with which call."""
    from vad.preprocess import interpolate_mode

    mode = interpolate_mode(preprocessing.interpolation)
    resized = preprocessing.resize or preprocessing.size
    arguments = f"mode={mode!r}" + (", align_corners=False, antialias=True" if mode in ("bilinear", "bicubic") else "")
    return f"resize to {resized[0]}x{resized[1]} as torch.nn.functional.interpolate({arguments}) does"


def build_export_module(model: Any):
    """The traceable ``torch.nn.Module`` for a loaded :class:`vad.model.AnomalyModel` (inputs of
    any size)."""
    import torch

    from vad.contracts import Prediction
    from vad.postprocess import upsample_and_blur

    if len(model.members) != 1 or model.ensembler is not None:
        raise VadError(
            f"this model fuses {len(model.members)} detectors with a score-level ensemble "
            f"({model.ensembler_name}); ONNX export covers single-detector models (feature-level "
            "ensembles are fine): export each member's model separately"
        )
    member = model.members[0]
    head = member.detector.export_module()
    if head is None:
        raise VadError(
            f"detector {member.detector_name!r} cannot be exported to ONNX: its export_module() returns None "
            "(the head is not a traceable torch module)"
        )
    preprocessing = model.input_preprocessing(member)
    layout = model.geometry.layout()
    source = member.source
    resized = tuple(preprocessing.resize or preprocessing.size)

    roi = model.roi
    if roi is not None and layout is not None:
        raise VadError("a model with a region of interest and tiles cannot be exported")

    class SourceScope(torch.nn.Module):
        """The feature source as a submodule, so that its nodes are named ``/features/...``
        (:data:`SOURCE_SCOPE`) in the graph: INT8 quantisation covers those only."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return source(x)

    class ExportGraph(torch.nn.Module):
        """ROI paint + preprocessing + feature source + head + upsample/blur (+ ROI score), for tracing."""

        def __init__(self) -> None:
            super().__init__()
            self.head = head
            self.features = SourceScope() if source is not None else None  # SOURCE_SCOPE
            self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))
            if roi is not None:
                self.register_buffer("roi_inside", torch.from_numpy(roi.mask.copy())[None, None])
                self.register_buffer("roi_fill", torch.tensor(roi.fill, dtype=torch.float32).view(1, 3, 1, 1) / 255.0)
                if model.produces_maps:
                    self.register_buffer("roi_working", roi.working_mask(preprocessing))

        def forward(self, images: torch.Tensor):
            if roi is not None and roi.mode == "before":
                # A Where, not images * mask + fill * (1 - mask): OpenVINO's CPU plugin fused that
                # per-channel sum into the next convolution and refused to compile it.
                images = torch.where(self.roi_inside, images, self.roi_fill)
            rows = resize_operator(images.shape[-2], resized[0], preprocessing.interpolation)
            cols = resize_operator(images.shape[-1], resized[1], preprocessing.interpolation)
            # Columns first: with a pinned input size both matrices are constants, and OpenVINO's CPU
            # plugin turns "x @ constant" into a fully connected layer whose fused per-channel
            # normalisation it then refuses to compile; "constant @ x" last avoids that.
            x = torch.matmul(rows, torch.matmul(images, cols.T))
            if preprocessing.crop:
                top, left = (resized[0] - preprocessing.size[0]) // 2, (resized[1] - preprocessing.size[1]) // 2
                x = x[:, :, top : top + preprocessing.size[0], left : left + preprocessing.size[1]]
            x = (x.clamp(0.0, 1.0) - self.mean) / self.std
            if layout is not None:
                x = layout.cut(x)
            inputs = self.features(x) if self.features is not None else x
            scores, maps = self.head(inputs)
            if layout is not None:
                stitched = layout.image_prediction(Prediction(scores, maps))
                scores, maps = stitched.scores, stitched.maps
            if maps is None:  # an image-level detector: scores only
                return scores.float()
            maps = upsample_and_blur(maps.float(), tuple(preprocessing.size), float(model.sigma))
            if roi is not None:
                scores = roi.restrict(maps, self.roi_working)
            return scores.float(), maps

    return ExportGraph().eval()


def export_onnx(model: Any, output: str | Path, input_size: tuple[int, int] | None = None, metadata: dict[str, Any] | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Trace and write ``output`` (atomically) plus ``output.json``; returns the description.

    The graph takes images of any height and width, or of ``input_size`` only when given.
    """
    import io
    import json
    import warnings

    import torch

    from vad import artifacts

    onnx, _ = require_onnx()
    model.to(torch.device("cpu"))
    if model.roi is not None:
        if input_size is not None and tuple(input_size) != model.roi.size:
            raise VadError(f"the model's region of interest was set on {model.roi.size[0]}x{model.roi.size[1]} images; export it for that --input-size or none")
        input_size = model.roi.size  # the ROI holds for images of its size only
    module = build_export_module(model)
    member = model.members[0]
    preprocessing = model.input_preprocessing(member)
    resized = tuple(preprocessing.resize or preprocessing.size)
    if input_size is not None:
        model.geometry.check_image(input_size, f"the export input size {input_size}")
    axes = {0: "batch"} if input_size is not None else {0: "batch", 2: "height", 3: "width"}
    outputs = ["scores", "maps"] if model.produces_maps else ["scores"]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
        try:
            torch.onnx.export(
                module, (torch.rand(2, 3, *(input_size or resized)),), buffer, dynamo=False, opset_version=opset,
                input_names=["images"], output_names=outputs,
                dynamic_axes={"images": axes, **{name: {0: "batch"} for name in outputs}},
            )
        except Exception as error:  # the tracer raises many types; say which part failed
            raise VadError(f"ONNX export failed while tracing the model: {type(error).__name__}: {error}") from error
    description = describe_graph(model, input_size, opset)
    description.update(metadata or {})
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {"vad": json.dumps(description, default=str), "image_threshold": str(model.image_threshold), "pixel_threshold": str(model.pixel_threshold)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    output = Path(output)
    artifacts.atomic_write_bytes(output, proto.SerializeToString())
    artifacts.atomic_write_json(output.with_name(output.name + ".json"), description)
    return description


def describe_graph(model: Any, input_size: tuple[int, int] | None, opset: int) -> dict[str, Any]:
    """What the graph of :func:`export_onnx` expects, does and leaves to the caller: the ONNX
    metadata and ``<file>.json``, exact enough to use the graph without reading vad's code."""
    member = model.members[0]
    preprocessing = model.input_preprocessing(member)
    geometry = model.geometry
    layout = geometry.layout()
    size, resized = tuple(preprocessing.size), tuple(preprocessing.resize or preprocessing.size)
    tiling = None if layout is None else f"{layout.count} tiles of {layout.tile} px, stride {layout.stride}"
    crop = f"centre crop to {size[0]}x{size[1]}" if preprocessing.crop else None
    roi = model.roi
    painted = f"pixels outside the region of interest (the mask in model.json's folder) set to {list(roi.fill)} / 255" if roi is not None and roi.mode == "before" else None
    restricted = "the score as the maximum of the blurred map inside the region of interest" if roi is not None and model.produces_maps else None
    steps = [
        painted, _resize_statement(preprocessing), crop,
        f"clamp to [0, 1], then (x - mean) / std with mean {list(preprocessing.mean)} and std {list(preprocessing.std)} (R, G, B)",
        None if tiling is None else f"tiling: {tiling}", "feature source", "detector head",
        None if tiling is None else "stitching (blended tile maps) and the score as its maximum" if model.produces_maps else "the score as the maximum of the tiles' scores",
        "bilinear upsampling" if layout is None and model.produces_maps else None,
        f"Gaussian blur sigma {model.sigma}" if model.produces_maps else None,
        restricted,
    ]
    map_resize = "resize of the maps to each image's original size: vad uses torch.nn.functional.interpolate(mode='bilinear', align_corners=False), no antialiasing"
    if preprocessing.crop:
        map_resize += f" (the maps cover the central {size[0]}x{size[1]} window of the image resized to {resized[0]}x{resized[1]}; vad fills the rest with the map's minimum)"
    description: dict[str, Any] = {
        "input": {
            "name": "images",
            "shape": ["batch", 3, "height", "width"] if input_size is None else ["batch", 3, *input_size],
            "dtype": "float32",
            "range": "RGB in [0, 1]: the decoded 8-bit image divided by 255, channels first (R, G, B); nothing else done to it",
            "sizes": (
                f"any height and width, one size per batch: the graph resizes to {resized[0]}x{resized[1]} itself"
                if input_size is None else f"{input_size[0]}x{input_size[1]} only (pinned at export); the graph resizes to {resized[0]}x{resized[1]} itself"
            ),
        },
        "outputs": {
            "scores": "raw anomaly score per image; anomalous when >= image_threshold"
            + ("" if layout is None else " (the maximum of the stitched map)" if model.produces_maps else " (the maximum of the tiles' scores)"),
            **({"maps": f"anomaly map per image at {list(size)} (resize it to the original image size)"} if model.produces_maps else {}),
        },
        "inside_graph": [step for step in steps if step],
        "outside_graph": (
            ["image decoding to RGB and division by 255", map_resize, "thresholding: score >= image_threshold, map >= pixel_threshold"]
            if model.produces_maps else ["image decoding to RGB and division by 255", "thresholding: score >= image_threshold (an image-level detector: no maps)"]
        ),
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "preprocessing": preprocessing.to_dict(),
        "geometry": geometry.to_dict(),
        "detector": member.detector_name,
        "opset": opset,
    }
    if model.registration is not None:
        description["outside_graph"].insert(1, (
            f"registration ({model.registration.kind}) of each image to the model's reference view (vad.registration, "
            "scikit-image): the graph takes aligned images; their maps are in the reference frame"
        ))
    if roi is not None:
        description["roi"] = {"mode": roi.mode, "fill": list(roi.fill), "size": list(roi.size), "inspected_fraction": float(roi.mask.mean())}
        if model.produces_maps:
            description["outside_graph"].append("the map outside the region of interest: vad sets it to the map's smallest value inside")
    if geometry.keep_aspect:
        fit = geometry.fit_size
        description["input"]["aspect_ratio"] = (
            f"the training images' ({fit[0]}x{fit[1]}): vad refuses images whose aspect ratio gives another working size "
            f"than {size[0]}x{size[1]}; the graph resizes every image, so check the ratio before"
        )
    return description


def parity_images(model: Any, input_size: tuple[int, int] | None = None, seed: int = 0) -> list[Any]:
    """Random RGB uint8 images for :func:`check_parity`: two of ``input_size`` for a graph pinned
    to it; else one at the size the graph resizes to, one larger and one smaller (odd sizes, so
    both resize directions and uneven scales are checked), of the sizes the model's geometry accepts."""
    import numpy as np

    preprocessing = model.input_preprocessing(model.members[0])
    height, width = preprocessing.resize or preprocessing.size
    fixed = model.roi or model.registration  # an ROI or a reference holds for its size only
    input_size = fixed.size if fixed is not None else input_size
    sizes = [input_size] * 2 if input_size else [(height, width), (height * 3 // 2 + 1, width * 3 // 2 + 1), (height * 2 // 3 + 1, width * 2 // 3 + 1)]
    rng = np.random.default_rng(seed)
    images = []
    for size in sizes:
        try:
            model.geometry.check_image(size)
        except VadError:
            continue
        images.append(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8))
    return images


class GraphSession:
    """An exported graph ready to score: ``.onnx`` on onnxruntime, ``.xml`` (OpenVINO IR) on
    OpenVINO's CPU plugin at float32 precision. ``session(image)`` takes an RGB uint8 image
    (aligned first when the model registers images) and gives its score and its map at the
    working size (None for image-level detectors)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise VadError(f"no exported graph at {path}: run `vad export` first (or pass --graph FILE)")
        self.path = path
        if path.suffix == ".onnx":
            _, onnxruntime = require_onnx()
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            self._run = lambda x: session.run(None, {"images": x})
        elif path.suffix == ".xml":
            openvino = require_openvino()
            compiled = openvino.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            self._run = lambda x: [result for result in compiled([x]).values()]
        else:
            raise VadError(f"{path}: an exported graph is a .onnx file (onnxruntime) or a .xml file (OpenVINO IR)")

    def __call__(self, image: Any) -> tuple[float, Any]:
        outputs = self._run(graph_input(image))
        return float(outputs[0][0]), (outputs[1][0] if len(outputs) > 1 else None)


def graph_input(image: Any) -> Any:
    """The graph's input for one RGB uint8 image: float32 ``[1, 3, H, W]`` in [0, 1]."""
    import numpy as np

    return np.ascontiguousarray(image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)


def check_parity(model: Any, graph_file: str | Path, images: list[Any]) -> float:
    """Largest absolute score difference between the exported graph (ONNX or OpenVINO, see
    :class:`GraphSession`) and the torch model on ``images`` (RGB uint8 arrays of any sizes):
    the graph gets each image as its description says (aligned to the reference first when the
    model registers images; divided by 255, channels first), the torch side runs the model's
    own prediction path."""
    import numpy as np

    from vad.contracts import Sample

    session = GraphSession(graph_file)
    aligned = images if model.registration is None else [model.registration.align(image)[0] for image in images]  # outside the graph
    graph_scores = np.array([session(image)[0] for image in aligned], dtype=np.float64)
    samples = [
        Sample(path=f"parity-{i}", label=0, category="export", split="test", image_loader=lambda image=image: image)
        for i, image in enumerate(images)
    ]
    torch_scores = np.array([o.score for o in model.predict(samples, description="parity check")])
    return float(np.max(np.abs(torch_scores - graph_scores)))


# --------------------------------------------------------------------------- OpenVINO

#: Precisions of ``vad export --format openvino``: float32 weights; weights stored as float16
#: (computed in float32 on the CPU plugin); or the feature source's convolutions in INT8
#: (post-training quantisation calibrated on normal images, :func:`quantise_int8`).
OPENVINO_PRECISIONS = ("fp32", "fp16", "int8")
#: Most calibration images INT8 quantisation uses (NNCF's own default subset size).
INT8_CALIBRATION_LIMIT = 300
#: The operations INT8 quantises (their inputs and weights), inside the feature source only.
INT8_OPERATIONS = ("Convolution", "GroupConvolution")


def require_openvino() -> Any:
    """Import ``openvino`` or say how to install it."""
    try:
        import openvino
    except ImportError as error:
        raise VadError("OpenVINO export and scoring need the openvino package: pip install 'vad-core[openvino]'") from error
    return openvino


def require_nncf() -> Any:
    """Import ``nncf`` (INT8 post-training quantisation) or say how to install it."""
    try:
        import nncf
    except ImportError as error:
        raise VadError("INT8 export needs the nncf package: pip install 'vad-core[openvino]'") from error
    return nncf


def quantise_int8(converted: Any, model: Any, calibration: list[Any]) -> tuple[Any, dict[str, Any]]:
    """INT8 post-training quantisation (NNCF) of an OpenVINO model converted from
    :func:`export_onnx`'s graph, calibrated on ``calibration`` (RGB uint8 normal images the graph
    accepts, at most :data:`INT8_CALIBRATION_LIMIT` used). Only the feature source's
    convolutions are quantised (their inputs and weights); resizing, normalisation, the source's
    patch aggregation and fusion, the head, upsampling and blur stay float32. Quantising the
    aggregation too (its pooling, interpolation and concatenation of layers, whose inputs NNCF
    would give one range) wrecked PatchCore's distances (scores off by more than twice their
    size); activation ranges of the head and maps, calibrated on normal images only, would clip
    anomalous scores. Activation ranges are the calibration images' minimum and maximum (NNCF's
    default, averages of the per-image extremes, clipped anomalous activations more). Returns
    the quantised model and what the description says of it."""
    import logging

    import numpy as np

    nncf = require_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    logging.getLogger("nncf").setLevel(logging.WARNING)  # it lists every operation it leaves alone
    images = calibration[:INT8_CALIBRATION_LIMIT]
    if model.registration is not None:
        images = [model.registration.align(image)[0] for image in images]  # as the graph's callers do
    quantised = [op for op in converted.get_ordered_ops() if op.get_type_name() in INT8_OPERATIONS and op.get_friendly_name().startswith(f"/{SOURCE_SCOPE}/")]
    if not quantised:
        raise VadError("INT8 quantisation: this model's graph has no convolutions in its feature source to quantise; export fp32 or fp16")
    keep = {op.get_friendly_name() for op in quantised}
    ignored = [op.get_friendly_name() for op in converted.get_ordered_ops() if op.get_friendly_name() not in keep]
    result = nncf.quantize(
        converted, nncf.Dataset([graph_input(np.asarray(image)) for image in images]), subset_size=len(images),
        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        advanced_parameters=AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX),
    )
    return result, {"int8": f"the feature source's {len(quantised)} convolutions (inputs and weights), calibrated on {len(images)} normal images (NNCF {nncf.__version__}); everything else float32"}


def check_calibration_images(model: Any, calibration: list[Any] | None, input_size: tuple[int, int] | None) -> None:
    """INT8 calibration images exist and have the size a pinned graph takes (``--input-size``,
    or the region of interest's size), checked before anything is exported."""
    if not calibration:
        raise VadError("INT8 quantisation needs calibration images: normal images such as the training images (--calibration)")
    pinned = tuple(input_size) if input_size is not None else (model.roi.size if model.roi is not None else None)
    wrong = [image.shape[:2] for image in calibration if pinned is not None and tuple(image.shape[:2]) != pinned]
    if wrong:
        raise VadError(f"calibration images must be {pinned[0]}x{pinned[1]} like the graph's pinned input, got {wrong[0][0]}x{wrong[0][1]}")


def export_openvino(
    model: Any, output: str | Path, precision: str = "fp32", input_size: tuple[int, int] | None = None, opset: int = OPSET, calibration: list[Any] | None = None,
) -> dict[str, Any]:
    """The graph of :func:`export_onnx` converted to OpenVINO IR: ``output`` (``.xml``) with its
    weights beside it (``.bin``) and the description (``.xml.json``); returns the description.
    ``int8`` needs ``calibration`` images (:func:`quantise_int8`). Both files are written under
    temporary names and renamed, weights first."""
    import os
    import tempfile

    from vad import artifacts

    if precision not in OPENVINO_PRECISIONS:
        raise VadError(f"--precision {precision!r}: OpenVINO export offers {', '.join(OPENVINO_PRECISIONS)}")
    if calibration is not None and precision != "int8":
        raise VadError("calibration images go with --precision int8 only")
    output = Path(output)
    if output.suffix != ".xml":
        raise VadError(f"an OpenVINO model is written as a .xml file (its weights beside it as .bin), got {output}")
    openvino = require_openvino()
    if precision == "int8":
        require_nncf()
        check_calibration_images(model, calibration, input_size)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".vad-openvino-") as folder:
        onnx_file = Path(folder) / "graph.onnx"
        description = export_onnx(model, onnx_file, input_size, opset=opset)
        converted = openvino.convert_model(str(onnx_file))
        if precision == "int8":
            converted, said = quantise_int8(converted, model, calibration)
            description.update(said)
        staged = Path(folder) / "model.xml"
        openvino.save_model(converted, str(staged), compress_to_fp16=precision == "fp16")
        os.replace(staged.with_suffix(".bin"), output.with_suffix(".bin"))
        os.replace(staged, output)
    description.update({"runtime": f"OpenVINO {openvino.__version__} (IR converted from the ONNX graph)", "precision": precision})
    artifacts.atomic_write_json(output.with_name(output.name + ".json"), description)
    return description
