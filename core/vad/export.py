"""``vad export``: a saved model as one ONNX graph.

Inside the graph (input ``images``: float32 ``[B, 3, H, W]``, RGB in [0, 1], at the fixed input
size chosen at export, by default the model's working size: the network's own input size, or
the one its input geometry (:mod:`vad.geometry`) sets; the batch axis is dynamic):

1. resize to the working size exactly as :func:`vad.preprocess.to_batch` does (antialiased
   bilinear etc.). ONNX's Resize has no antialiasing that matches torch, so the resize is
   exported as two constant matrices (rows then columns), which is the same linear operator;
   centre crop; clamp to [0, 1]; normalise with the backbone's mean and std;
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
the working size (the cropped window with a centre crop). Left outside: decoding,
the resize of the maps back to each image's original size, and the thresholds, which are
stored in the ONNX metadata and in the ``<file>.json`` written next to it.
Not exportable: score-level ensembles of several detectors, and heads whose
``export_module()`` returns None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vad.errors import VadError

OPSET = 17
#: Largest absolute score difference accepted between onnxruntime and torch.
PARITY_TOLERANCE = 1e-4


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


def resize_matrix(size_in: int, size_out: int, interpolation: str):
    """The ``[size_out, size_in]`` matrix of :func:`vad.preprocess.resize_batch` along one axis.

    Resizing is linear and separable, so resizing the identity gives the operator itself.
    """
    import torch

    from vad.preprocess import resize_batch

    # size_in images of [size_in, 2]: image k is the k-th unit vector along the axis. (Width 2,
    # not 1: torch's antialiased kernels mis-handle width-1 inputs; the width is kept as is.)
    identity = torch.eye(size_in)[:, None, :, None].expand(-1, -1, -1, 2).contiguous()
    resized = resize_batch(identity, (size_out, 2), interpolation)  # [size_in, 1, size_out, 2]
    return resized[:, 0, :, 0].T.contiguous()


def build_export_module(model: Any, input_size: tuple[int, int] | None = None):
    """The traceable ``torch.nn.Module`` for a loaded :class:`vad.model.AnomalyModel`."""
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
    geometry = model.geometry
    preprocessing = model.input_preprocessing(member)
    layout = geometry.layout()
    source = member.source
    resized = tuple(preprocessing.resize or preprocessing.size)
    input_size = tuple(input_size or resized)
    geometry.check_image(input_size, f"the export input size {input_size}")

    class ExportGraph(torch.nn.Module):
        """Preprocessing + feature source + head + upsample/blur, for tracing."""

        def __init__(self) -> None:
            super().__init__()
            self.head = head
            self.register_buffer("rows", resize_matrix(input_size[0], resized[0], preprocessing.interpolation))
            self.register_buffer("cols", resize_matrix(input_size[1], resized[1], preprocessing.interpolation))
            self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, images: torch.Tensor):
            x = images
            if tuple(input_size) != resized:
                x = torch.matmul(torch.matmul(self.rows, x), self.cols.T)
            if preprocessing.crop:
                top, left = (resized[0] - preprocessing.size[0]) // 2, (resized[1] - preprocessing.size[1]) // 2
                x = x[:, :, top : top + preprocessing.size[0], left : left + preprocessing.size[1]]
            x = (x.clamp(0.0, 1.0) - self.mean) / self.std
            if layout is not None:
                x = layout.cut(x)
            inputs = source(x) if source is not None else x
            scores, maps = self.head(inputs)
            if layout is not None:
                stitched = layout.image_prediction(Prediction(scores, maps))
                scores, maps = stitched.scores, stitched.maps
            maps = upsample_and_blur(maps.float(), tuple(preprocessing.size), float(model.sigma))
            return scores.float(), maps

    return ExportGraph().eval(), input_size


def export_onnx(model: Any, output: str | Path, input_size: tuple[int, int] | None = None, metadata: dict[str, Any] | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Trace and write ``output`` (atomically) plus ``output.json``; returns the description."""
    import io
    import json
    import warnings

    import torch

    from vad import artifacts

    onnx, _ = require_onnx()
    model.to(torch.device("cpu"))
    module, input_size = build_export_module(model, input_size)
    example = torch.rand(2, 3, *input_size)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about constants are expected here
        try:
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=opset,
                input_names=["images"], output_names=["scores", "maps"],
                dynamic_axes={"images": {0: "batch"}, "scores": {0: "batch"}, "maps": {0: "batch"}},
            )
        except Exception as error:  # the tracer raises many types; say which part failed
            raise VadError(f"ONNX export failed while tracing the model: {type(error).__name__}: {error}") from error
    member = model.members[0]
    preprocessing = model.input_preprocessing(member)
    layout = model.geometry.layout()
    tiling = None if layout is None else f"{layout.count} tiles of {layout.tile} px, stride {layout.stride}"
    description = {
        "input": {"name": "images", "shape": ["batch", 3, *input_size], "dtype": "float32", "range": "RGB in [0, 1]"},
        "outputs": {
            "scores": "raw anomaly score per image; anomalous when >= image_threshold"
            + ("" if layout is None else " (the maximum of the stitched map)"),
            "maps": f"anomaly map per image at {list(preprocessing.size)} (resize it to the original image size)",
        },
        "inside_graph": [
            "resize to the working size", "centre crop" if preprocessing.crop else None, "normalisation",
            None if tiling is None else f"tiling: {tiling}", "feature source", "detector head",
            None if tiling is None else "stitching (blended tile maps) and the score as its maximum",
            "bilinear upsampling" if layout is None else None, f"Gaussian blur sigma {model.sigma}",
        ],
        "outside_graph": ["image decoding", "resize of the maps to each image's original size", "thresholding"],
        "image_threshold": model.image_threshold,
        "pixel_threshold": model.pixel_threshold,
        "preprocessing": preprocessing.to_dict(),
        "geometry": model.geometry.to_dict(),
        "detector": member.detector_name,
        "opset": opset,
        **(metadata or {}),
    }
    description["inside_graph"] = [step for step in description["inside_graph"] if step]
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in {"vad": json.dumps(description, default=str), "image_threshold": str(model.image_threshold), "pixel_threshold": str(model.pixel_threshold)}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    output = Path(output)
    artifacts.atomic_write_bytes(output, proto.SerializeToString())
    artifacts.atomic_write_json(output.with_name(output.name + ".json"), description)
    return description


def check_parity(model: Any, onnx_file: str | Path, images: list[Any], input_size: tuple[int, int]) -> float:
    """Largest absolute score difference between onnxruntime and the torch model on ``images``.

    ``images`` are RGB uint8 arrays of exactly ``input_size``; the torch side runs the model's
    own prediction path on them.
    """
    import numpy as np

    from vad.contracts import Sample

    _, onnxruntime = require_onnx()
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    batch = np.stack([image.astype(np.float32) / 255.0 for image in images]).transpose(0, 3, 1, 2)
    onnx_scores, _ = session.run(None, {"images": np.ascontiguousarray(batch)})
    samples = [
        Sample(path=f"parity-{i}", label=0, category="export", split="test", image_loader=lambda image=image: image)
        for i, image in enumerate(images)
    ]
    torch_scores = np.array([o.score for o in model.predict(samples, description="parity check")])
    return float(np.max(np.abs(torch_scores - onnx_scores.astype(np.float64))))
