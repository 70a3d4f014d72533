#!/usr/bin/env python
"""PatchCore speed and memory: vad-patchcore against a straightforward implementation.

    python benchmarks/patchcore.py            # full run (200 train / 100 test at 224 px)
    python benchmarks/patchcore.py --quick    # 40 train / 20 test, baseline run in full

Both sides get the same images and the same patch features (the backbone, then
``vad.features.PatchFeatures``: stride-8 + stride-16 stages, 3x3 aggregation, bilinear
alignment). The backbone is ``tf_efficientnet_lite0`` from the vad-timm plugin when it is
installed, else a torchvision-free stand-in with Lite0's architecture and random weights (same
cost; random weights are fine for timing, and the synthetic anomalies remain detectable).

* **vad**: ``PatchCore()`` with its defaults (streaming fit, chunked approximate greedy coreset
  with a 128-dim projection, exact search by the cell-pruned ``pruned`` backend, which ``auto``
  picks on the CPU for this bank) and ``vad.postprocess``.
* **baseline**: embeddings accumulated in a list and stacked, the full greedy k-center loop
  over all patches without projection (one pass over ``[N, D]`` per selected item, as in the
  official/anomalib loops), brute-force torch distances, then bilinear upsampling and
  ``scipy.ndimage.gaussian_filter`` per map (as the official code).

The baseline's coreset loop over all 156,800 patches of 200 images takes far longer than the
whole benchmark may (every selected item is a pass over ``[N, D]``): in the full run it stops
after ``--baseline-budget`` seconds and its time is extrapolated linearly (each iteration is the
same pass); ``--quick`` runs it completely and compares the scores of both sides.

Each configuration runs in its own subprocess so that ``ru_maxrss`` is its own peak RSS. The
memory table streams random feature grids of the same shape straight into the detectors (no
backbone) to show how the fit peak grows with 200 vs 2,000 training images; the baseline there
only accumulates and stacks (its coreset loop at 2,000 images would take hours).
Test images are synthetic textures, half with a pasted square defect: image AUROC of both sides
shows that the speed-up comes at equal scores. The time spent making them is not counted.
A last table times every search backend (``vad_patchcore.knn``) on all test patches at once
(median of 3 runs each, in one process), with its agreement with exact search and whether the
image scores change; ``--knn NAME`` runs the vad side with another backend.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

SIZE = 224
BATCH = 8


# --------------------------------------------------------------------------- data


def texture_batch(start: int, count: int, defective: list[bool], seed: int):
    """Deterministic synthetic RGB textures (striped, noisy), float [count, 3, SIZE, SIZE] in [0, 1]."""
    import numpy as np
    import torch

    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    images = []
    for offset in range(count):
        rng = np.random.default_rng(seed * 1_000_003 + start + offset)
        phase, angle = rng.uniform(0, 2 * np.pi, 2)
        angle = 0.3 * angle / (2 * np.pi)
        base = 0.5 + 0.25 * np.sin(2 * np.pi * (np.cos(angle) * xx + np.sin(angle) * yy) / 12 + phase)
        image = np.clip(base[None] + rng.normal(0, 0.05, (3, SIZE, SIZE)), 0, 1).astype(np.float32)
        if defective[offset]:
            side = SIZE // 8
            top, left = rng.integers(8, SIZE - side - 8, size=2)
            image[:, top : top + side, left : left + side] = np.array([1.0, 0.2, 0.2], np.float32)[:, None, None]
        images.append(image)
    return torch.from_numpy(np.stack(images))


def normalise(images, preprocessing):
    import torch

    mean = torch.tensor(preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).view(1, 3, 1, 1)
    return (images - mean) / std


def train_batches(count: int):
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        yield texture_batch(start, n, [False] * n, seed=1)


def test_batches(count: int):
    labels = [int(i >= count // 2) for i in range(count)]
    for start in range(0, count, BATCH):
        n = min(BATCH, count - start)
        yield texture_batch(start, n, [bool(x) for x in labels[start : start + n]], seed=2), labels[start : start + n]


# --------------------------------------------------------------------------- backbone


def lite0_stand_in():
    """EfficientNet-Lite0's layout (stem 32, MBConv stages 16/24/40/80/112/...), random weights."""
    import torch
    from torch import nn

    from vad.contracts import Backbone, FeatureInfo, Preprocessing

    def mbconv(cin: int, cout: int, expand: int, kernel: int, stride: int) -> nn.Module:
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        return nn.Sequential(*layers)

    # (expand, kernel, stride, out, repeats) of EfficientNet-Lite0 up to the stride-16 stage
    spec = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3)]

    class Lite0StandIn(Backbone):
        name = "lite0-stand-in"

        def __init__(self) -> None:
            torch.manual_seed(0)
            self._hparams = {}
            blocks, cin = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())], 32
            for expand, kernel, stride, cout, repeats in spec:
                stage = [mbconv(cin if i == 0 else cout, cout, expand, kernel, stride if i == 0 else 1) for i in range(repeats)]
                blocks.append(nn.Sequential(*stage))
                cin = cout
            self.blocks = nn.ModuleList(blocks).eval().requires_grad_(False)
            self.preprocessing = Preprocessing(size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

        def feature_info(self):
            return [FeatureInfo("blocks.1", 4, 24), FeatureInfo("blocks.2", 8, 40), FeatureInfo("blocks.4", 16, 112)]

        def forward_features(self, images, layers):
            names = {1: "blocks.1", 2: "blocks.2", 4: "blocks.4"}
            wanted, out, x = set(layers), {}, images
            with torch.inference_mode():
                for index, block in enumerate(self.blocks):
                    x = block(x)
                    if names.get(index) in wanted:
                        out[names[index]] = x
                        if len(out) == len(wanted):  # stop early, as the official code does
                            break
            return out

    return Lite0StandIn()


def make_backbone():
    """tf_efficientnet_lite0 through the vad-timm plugin when installed, else the stand-in."""
    try:
        import vad_timm  # noqa: F401

        from vad.build import create_backbone

        return create_backbone("tf_efficientnet_lite0"), "tf_efficientnet_lite0 (vad-timm)"
    except Exception:  # noqa: BLE001 - any failure: fall back to the stand-in
        return lite0_stand_in(), "Lite0 stand-in (random weights; vad-timm not available)"


class TimedIterator:
    """Wraps an iterator to add up the time spent producing its items (the synthetic images),
    so that the stage timings exclude making the benchmark's own data."""

    def __init__(self, iterable) -> None:
        self.seconds = 0.0
        self._iterator = iter(iterable)

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self._iterator)
        finally:
            self.seconds += time.perf_counter() - start


class TimedBackbone:
    """Wraps a backbone's forward_features to add up its time."""

    def __init__(self, backbone) -> None:
        self.seconds = 0.0
        original = backbone.forward_features

        def timed(images, layers):
            start = time.perf_counter()
            result = original(images, layers)
            self.seconds += time.perf_counter() - start
            return result

        backbone.forward_features = timed


# --------------------------------------------------------------------------- baseline


def baseline_greedy(features, count: int, seed: int = 0, budget: float | None = None):
    """Full greedy k-center on the raw features: one pass over [N, D] per selected item.

    With ``budget`` (seconds) the loop stops early; returns the selection and the loop time,
    extrapolated linearly to ``count`` items when stopped (every iteration costs one pass).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    norms = (features * features).sum(1)
    start = int(torch.randint(features.shape[0], (1,), generator=generator))
    min_distances = (norms - 2 * features @ features[start] + norms[start]).clamp_min(0).sqrt()
    selected = []
    began = time.perf_counter()
    for _ in range(count):
        index = int(torch.argmax(min_distances))
        selected.append(index)
        distances = (norms - 2 * features @ features[index] + norms[index]).clamp_min(0).sqrt()
        min_distances = torch.minimum(min_distances, distances)
        if budget is not None and time.perf_counter() - began > budget:
            break
    elapsed = time.perf_counter() - began
    return features[selected], elapsed * count / len(selected), len(selected) < count


def baseline_scores(features, bank):
    """Brute-force torch distances to the whole bank (plain L2), min per patch."""
    import torch

    distances = torch.cdist(features, bank)
    return distances.min(1).values


# --------------------------------------------------------------------------- workers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def worker_images(config: dict[str, Any]) -> dict[str, Any]:
    """Fit + predict on images, split timings; one side ("vad" or "baseline")."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import roc_auc_score

    from vad.features import PatchFeatures
    from vad.postprocess import postprocess_maps
    from vad_patchcore.detector import PatchCore

    torch.set_num_threads(config["threads"])
    backbone, backbone_name = make_backbone()
    timer = TimedBackbone(backbone)
    source = PatchFeatures(backbone)
    preprocessing = source.preprocessing
    setup_rss = peak_rss_mb()
    times: dict[str, float] = {}

    def features_of(images):
        with torch.inference_mode():
            return source(normalise(images, preprocessing))

    # ---------------------------------------------------------------- fit
    start = time.perf_counter()
    timer.seconds = 0.0
    train_data = TimedIterator(train_batches(config["train"]))
    if config["side"] == "vad":
        detector = PatchCore(coreset_ratio=config["ratio"], knn_backend=config.get("knn", "auto"), seed=0)
        detector.fit(features_of(images) for images in train_data)
        bank_size = int(detector.memory_bank.shape[0])
        times["fit_coreset"] = detector.timings["fit_coreset"]
        times["fit_index"] = detector.timings["fit_index"]
    else:
        embeddings = []
        for images in train_data:
            grid = features_of(images)
            embeddings.append(grid.permute(0, 2, 3, 1).reshape(-1, grid.shape[1]))
        embeddings = torch.vstack(embeddings)
        coreset_start = time.perf_counter()
        count = int(embeddings.shape[0] * config["ratio"])
        bank, coreset_seconds, truncated = baseline_greedy(embeddings, count, budget=config.get("budget"))
        measured = time.perf_counter() - coreset_start
        times["fit_coreset"] = coreset_seconds
        times["fit_index"] = 0.0  # brute force needs no index
        if truncated:  # time the search against a bank of the full size (scores are not comparable)
            fill = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(0))[: count - bank.shape[0]]
            bank = torch.cat([bank, embeddings[fill]])
        del embeddings
        bank_size = count
    times["fit_total"] = time.perf_counter() - start - train_data.seconds
    if config["side"] == "baseline":
        times["fit_total"] += times["fit_coreset"] - measured  # extrapolated when truncated
    times["fit_backbone"] = timer.seconds
    times["fit_aggregation"] = times["fit_total"] - times["fit_backbone"] - times["fit_coreset"] - times["fit_index"]
    fit_rss = peak_rss_mb()

    # ---------------------------------------------------------------- predict
    scores, labels = [], []
    timer.seconds = 0.0
    post = knn = 0.0
    start = time.perf_counter()
    test_data = TimedIterator(test_batches(config["test"]))
    for images, batch_labels in test_data:
        grid = features_of(images)
        t0 = time.perf_counter()
        if config["side"] == "vad":
            with torch.inference_mode():
                prediction = detector.predict(grid)
            maps, image_scores = prediction.maps, prediction.scores
        else:
            b, _, h, w = grid.shape
            with torch.inference_mode():
                patch = baseline_scores(grid.permute(0, 2, 3, 1).reshape(b * h * w, -1), bank).view(b, h, w)
            maps, image_scores = patch, patch.flatten(1).amax(1)
        t1 = time.perf_counter()
        if config["side"] == "vad":
            postprocess_maps(maps, preprocessing, [(SIZE, SIZE)] * len(batch_labels), sigma=4.0)
        else:
            from scipy import ndimage

            up = F.interpolate(maps[:, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
            [ndimage.gaussian_filter(m, sigma=4) for m in up]
        t2 = time.perf_counter()
        knn += t1 - t0
        post += t2 - t1
        scores += image_scores.tolist()
        labels += batch_labels
    times["predict_total"] = time.perf_counter() - start - test_data.seconds
    times["predict_backbone"] = timer.seconds
    times["predict_knn"] = knn
    times["predict_postprocess"] = post
    times["predict_aggregation"] = times["predict_total"] - timer.seconds - knn - post
    result = {
        "truncated": config["side"] == "baseline" and truncated,
        "backbone": backbone_name,
        "knn": detector._search_index().description if config["side"] == "vad" else "brute-force torch.cdist",
        "times": times,
        "bank": bank_size,
        "dim": source.out_channels,
        "auroc": float(roc_auc_score(labels, scores)),
        "scores": scores,
        "setup_rss_mb": setup_rss,
        "fit_rss_mb": fit_rss,
        "peak_rss_mb": peak_rss_mb(),
    }
    if config["side"] == "vad" and config.get("search"):
        result["search"] = search_table(detector, source, preprocessing, config)
    return result


#: Probes timed for each IVF backend (one index per backend, its ``nprobe`` changed in between).
IVF_PROBES = {"faiss-ivfflat": (1, 4, 8, 16), "faiss-ivfpq": (8, 32)}


def tensor_bytes(search) -> int:
    """Bytes of the distinct tensor storages a torch search holds (views counted once)."""
    import torch

    seen: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for value in vars(search).values():
        visit(value)
    return sum(seen.values())


def search_table(detector, source, preprocessing, config) -> dict[str, Any]:
    """Every search backend on all test patches at once (k = 1): build time, median search time
    of 3 runs, recall@1 and distance error against exact brute force, and the image scores
    (largest patch distance) against the exact ones."""
    import statistics

    import torch

    from vad_patchcore.knn import NearestNeighbours, faiss_available

    grids = []
    for images, _ in test_batches(config["test"]):
        with torch.inference_mode():
            grids.append(source(normalise(images, preprocessing)))
    grid = torch.cat(grids)
    images, dim = grid.shape[:2]
    queries = grid.permute(0, 2, 3, 1).reshape(-1, dim)
    bank = detector.memory_bank
    exact_distances = exact_scores = exact_indices = None
    rows = []

    def measure(label: str, search, build_s: float) -> None:
        nonlocal exact_distances, exact_scores, exact_indices
        times = []
        for _ in range(3):
            start = time.perf_counter()
            distances, indices = search.search(queries, 1)
            times.append(time.perf_counter() - start)
        scores = distances[:, 0].sqrt().view(images, -1).amax(1)
        if exact_indices is None:  # the first row is brute force: the reference
            exact_distances, exact_scores, exact_indices = distances[:, 0], scores, indices[:, 0]
        rows.append({
            "label": label,
            "build_s": build_s,
            "search_s": statistics.median(times),
            "recall": float((indices[:, 0] == exact_indices).float().mean()),
            "rel_err": float(((distances[:, 0] / exact_distances.clamp_min(1e-12)).sqrt() - 1).abs().mean()),
            "changed_scores": int((scores != exact_scores).sum()),
            "same_ranking": bool(torch.equal(scores.argsort(stable=True), exact_scores.argsort(stable=True))),
        })

    names = ["torch", "pruned"] + (["faiss", "faiss-ivfflat", "faiss-ivfpq"] if faiss_available() else [])
    index_bytes = {}
    for name in names:
        start = time.perf_counter()
        search = NearestNeighbours(bank, name, seed=0)
        build_s = time.perf_counter() - start
        if name == "pruned":
            index_bytes[name] = tensor_bytes(search.backend)
        if name not in IVF_PROBES:
            measure(search.description, search, build_s)
            continue
        for probe in IVF_PROBES[name]:
            search.backend.index.nprobe = probe  # the same trained index, probing more lists
            measure(search.description, search, build_s)
    return {"rows": rows, "bank": list(bank.shape), "pruned_bytes": index_bytes.get("pruned", 0)}


def worker_memory(config: dict[str, Any]) -> dict[str, Any]:
    """Fit on random feature grids (no backbone): peak RSS against the number of training images."""
    import torch

    from vad_patchcore.detector import PatchCore

    torch.set_num_threads(config["threads"])
    dim, grid = config["dim"], config["grid"]
    setup_rss = peak_rss_mb()

    def batches():
        generator = torch.Generator().manual_seed(0)
        for start in range(0, config["train"], BATCH):
            n = min(BATCH, config["train"] - start)
            yield torch.randn(n, dim, grid, grid, generator=generator)

    start = time.perf_counter()
    if config["side"] == "vad":
        detector = PatchCore(coreset_ratio=config["ratio"])
        detector.fit(batches())
        bank = int(detector.memory_bank.shape[0])
    else:
        embeddings = [b.permute(0, 2, 3, 1).reshape(-1, dim) for b in batches()]
        stacked = torch.vstack(embeddings)
        bank = int(stacked.shape[0] * config["ratio"])  # coreset loop not run (hours at 2,000)
        del embeddings, stacked
    return {"fit_s": time.perf_counter() - start, "bank": bank, "setup_rss_mb": setup_rss, "peak_rss_mb": peak_rss_mb()}


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess; returns its JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(config["threads"]), "MKL_NUM_THREADS": str(config["threads"])}
    completed = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True, env=env
    )
    if completed.returncode != 0:
        raise SystemExit(f"worker {config} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="shrink everything for a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline-budget", type=float, default=None,
                        help="seconds the baseline coreset loop may run before its time is extrapolated "
                        "(default: 120 for the full run, unlimited with --quick)")
    parser.add_argument("--knn", default="auto", help="knn_backend of the vad side (default: auto)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        from vad.heap import keep_freed_memory

        # as the vad command does: otherwise glibc maps and unmaps every large activation
        # tensor, and the page faults can double the backbone's time depending on what the
        # process did before (seen here: the same Lite0 forward at 26 vs 54 ms/image)
        keep_freed_memory()
        config = json.loads(args.worker)
        result = worker_images(config) if config["kind"] == "images" else worker_memory(config)
        print(json.dumps(result))
        return
    from vad_patchcore.knn import BACKENDS  # (after the worker branch: workers set up the heap first)

    if args.knn not in BACKENDS:
        parser.error(f"--knn must be one of {', '.join(BACKENDS)}")

    train, test, big = (40, 20, 400) if args.quick else (200, 100, 2000)
    common = {"threads": args.threads, "ratio": 0.1, "train": train, "test": test, "kind": "images"}
    started, load = time.perf_counter(), os.getloadavg()[0]
    ours = run_worker({**common, "side": "vad", "search": True, "knn": args.knn})
    budget = args.baseline_budget if args.baseline_budget is not None else (None if args.quick else 120.0)
    base = run_worker({**common, "side": "baseline", "budget": budget})
    import numpy as np
    from scipy.stats import spearmanr

    print(f"## PatchCore: {train} train / {test} test images at {SIZE}x{SIZE}, {args.threads} threads, coreset 10%\n")
    print(f"Host load average (1 min; other processes slow every timing down): {load:.2f} at the start, "
          f"{os.getloadavg()[0]:.2f} after the fits and predicts.\n")
    print(f"Backbone: {ours['backbone']}; features {ours['dim']}-dim on a {SIZE // 8}x{SIZE // 8} grid; "
          f"bank vad {ours['bank']} / baseline {base['bank']} patches; search vad {ours['knn']} / baseline {base['knn']}.\n")
    rows = []
    for label, key in [
        ("fit: backbone", "fit_backbone"),
        ("fit: aggregation + collection", "fit_aggregation"),
        ("fit: coreset", "fit_coreset"),
        ("fit: search index", "fit_index"),
        ("**fit total**", "fit_total"),
        ("predict: backbone", "predict_backbone"),
        ("predict: aggregation", "predict_aggregation"),
        ("predict: kNN + scoring", "predict_knn"),
        ("predict: postprocess", "predict_postprocess"),
        ("**predict total**", "predict_total"),
    ]:
        a, b = ours["times"][key], base["times"][key]
        rows.append([label, a, b, f"{b / a:.1f}x" if a > 0 and b > 0 else "-"])
    total_a = ours["times"]["fit_total"] + ours["times"]["predict_total"]
    total_b = base["times"]["fit_total"] + base["times"]["predict_total"]
    rows.append(["**fit + predict**", total_a, total_b, f"{total_b / total_a:.1f}x"])
    print(table(["seconds", "vad", "baseline", "speed-up"], rows))
    after = sum(ours["times"][k] for k in ("predict_aggregation", "predict_knn", "predict_postprocess"))
    rho = spearmanr(ours["scores"], base["scores"]).statistic
    if base["truncated"]:
        print(f"\nBaseline coreset loop stopped after {budget:.0f} s; its time is extrapolated linearly to the full "
              "selection (each iteration is the same pass over [N, D]). Its bank is therefore only the first part "
              "of the greedy order (filled up with random patches to time the search against a full-size bank) and its "
              "scores are not comparable; --quick compares scores at full selection, "
              "and --baseline-budget 100000 runs the whole loop (tens of minutes).\n")
    print(f"\nInference after the backbone (aggregation + kNN + postprocess): {after:.3f} s = "
          f"{100 * after / ours['times']['predict_backbone']:.1f}% of the backbone's {ours['times']['predict_backbone']:.3f} s.")
    print(f"Image AUROC: vad {ours['auroc']:.4f}, baseline {base['auroc']:.4f}{' (partial bank)' if base['truncated'] else ''}; Spearman rank correlation of "
          f"image scores {rho:.4f}; mean |relative score difference| "
          f"{float(np.mean(np.abs(np.array(ours['scores']) / np.array(base['scores']) - 1))):.4f}.")
    print(f"Peak RSS (MB): vad {ours['peak_rss_mb']:.0f} (fit {ours['fit_rss_mb']:.0f}, after imports {ours['setup_rss_mb']:.0f}); "
          f"baseline {base['peak_rss_mb']:.0f} (fit {base['fit_rss_mb']:.0f}, after imports {base['setup_rss_mb']:.0f}).\n")

    search = ours["search"]
    (size, dim), queries = search["bank"], test * (SIZE // 8) ** 2
    print(f"### Search backends: all {queries:,} test patches at once against the {size:,} x {dim} bank (k = 1; "
          "median of 3 runs; exact reference: the first row)\n")
    print(table(
        ["backend", "build s", "search s", "recall@1", "mean rel. distance error", "images with another score",
         "image ranking unchanged"],
        [[row["label"], f"{row['build_s']:.2f}", f"{row['search_s']:.3f}", f"{row['recall']:.4f}", f"{row['rel_err']:.6f}",
          f"{row['changed_scores']} / {test}", "yes" if row["same_ranking"] else "no"] for row in search["rows"]],
    ))
    per_item = search["pruned_bytes"] / (4 * size)
    print(f"\nThe pruned index holds {search['pruned_bytes'] / 2**20:.1f} MiB = 4 * M * (D + {per_item - dim:.2f}) bytes "
          f"(M = {size:,}, D = {dim}; the README's formula: D + 29 plus the centroids' 4 * L * (L + D)).")

    grid = SIZE // 16  # a coarser grid keeps the 2,000-image fit to about a minute
    print(f"\n### Fit peak RSS against the number of training images (random {ours['dim']}-dim feature grids "
          f"{grid}x{grid}, no backbone, coreset 10%)\n")
    rows = []
    for count in (train, big):
        for side in ("vad", "baseline"):
            result = run_worker({"threads": args.threads, "ratio": 0.1, "train": count, "kind": "memory", "side": side,
                                 "dim": ours["dim"], "grid": grid})
            rows.append([
                side if side == "vad" else "baseline (collect + stack only)",
                count, count * grid**2, result["bank"], result["fit_s"],
                result["peak_rss_mb"], result["peak_rss_mb"] - result["setup_rss_mb"],
            ])
    print(table(["implementation", "train images", "patches", "bank", "fit s", "peak RSS MB", "above imports MB"], rows))
    print(f"\n(total benchmark time {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
