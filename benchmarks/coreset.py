#!/usr/bin/env python
"""PatchCore's coreset strategies side by side: accuracy, fit time and the memory they hold.

    python benchmarks/coreset.py                     # demo data + the larger generated set
    python benchmarks/coreset.py --data demo --repeats 1

Strategies (every other option at its default: ratio 0.1, 128-d projection, 10 starts, lite0
features at 224 px, PatchFeatures' default layers):

* ``global``: one approximate greedy selection over every training patch
  (``coreset_chunk_patches=0``), what the official code does; memory grows with the training set;
* ``global, seed 1``: the same with another seed (projection and starting points): how far two
  equally valid selections differ, the noise floor of the comparison;
* ``merge-and-reduce``: the default: chunks of 16,384 patches each keep 4x the ratio as
  candidates (in 4 blocks), then one selection over the pooled candidates keeps the ratio of all
  patches (pool at most 32,768 candidates; see ``vad_patchcore.coreset.StreamingCoreset``);
* ``composable``: the default before issue 23: each chunk keeps its own 10 %, the bank is the
  union (``coreset_oversample=1``).

Per category the training feature grids are computed once and every strategy fits
``PatchCore`` on the same grids (``--repeats`` times for the default and the composable coreset,
whose ratio is the fit-time goal: median seconds, the coreset selection's own seconds in
brackets; "whole fit" adds the seconds the backbone took for the training images, measured once,
which every strategy pays the same); the first fit is evaluated on the test images with vad's
post-processing: image AUROC and pixel AUROC. "held" is the most patch rows the fit held at once
(chunk buffer, candidate pool, bank: ``StreamingCoreset.peak_held``) in MB of float32 features.
The last table streams feature rows of the demo's width for more and more training images
through each strategy with a free stand-in for the selection (a random pick; what is held does
not depend on which rows are picked): the memory the fit needs as the training set grows.
Ratios are against ``global`` of the same category, in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STRATEGIES = {
    "global": {"coreset_chunk_patches": 0},
    "global, seed 1": {"coreset_chunk_patches": 0, "seed": 1},
    "merge-and-reduce": {},
    "composable": {"coreset_oversample": 1.0},
}


def feature_grids(model, samples):
    """Training feature grids of the model's single member, as its detector would receive them."""
    from vad.features import SourceBatches
    from vad.model import ImageBatches

    member = model.members[0]
    images = ImageBatches(samples, model.input_preprocessing(member), model.batch_size, model.device, "features", geometry=model.geometry)
    return [grid.clone() for grid in SourceBatches(images, member.source)]


def category_rows(config, registry, category: str, repeats: int) -> list[dict]:
    from vad.build import build_model, create_dataset
    from vad.pipeline import compute_metrics, evaluation_data
    from vad_patchcore.detector import PatchCore

    splits = create_dataset(config, registry).load(category)
    model = build_model(config, registry)
    model.fit(splits.train, splits.validation)  # manual threshold: no calibration
    start = time.perf_counter()
    grids = feature_grids(model, splits.train)
    features_s = time.perf_counter() - start
    patches = sum(grid.shape[0] * grid.shape[2] * grid.shape[3] for grid in grids)
    rows = []
    for name, options in STRATEGIES.items():
        seconds, coreset_seconds = [], []
        for repeat in range(1 if name.startswith("global") else repeats):  # the time ratio is default vs composable
            detector = PatchCore(**options)
            start = time.perf_counter()
            detector.fit(grids)
            seconds.append(time.perf_counter() - start)
            coreset_seconds.append(detector.timings["fit_coreset"])
            if repeat == 0:
                fitted = detector
        model.members[0].detector = fitted
        outputs = list(model.predict(splits.test, description=f"{category} {name}"))
        values, _, _ = compute_metrics(evaluation_data(outputs, model), config, registry, True)
        rows.append({
            "category": category,
            "strategy": name,
            "patches": patches,
            "bank": int(fitted.memory_bank.shape[0]),
            "image_auroc": values["image_auroc"],
            "pixel_auroc": values["pixel_auroc"],
            "fit_s": statistics.median(seconds),
            "features_s": features_s,
            "coreset_s": statistics.median(coreset_seconds),
            "held_mb": fitted.fit_peak_patches * fitted.memory_bank.shape[1] * 4 / 2**20,
            "dim": int(grids[0].shape[1]),
            "patches_per_image": int(grids[0].shape[2] * grids[0].shape[3]),
        })
    return rows


def accuracy_table(title: str, rows: list[dict]) -> str:
    lines = [f"### {title}", "",
             "| category | strategy | patches | bank | image AUROC | pixel AUROC | Δ image vs global | Δ pixel vs global | fit s (coreset s) | vs composable | whole fit vs composable | held MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        reference = next(r for r in rows if r["category"] == row["category"] and r["strategy"] == "global")
        old = next(r for r in rows if r["category"] == row["category"] and r["strategy"] == "composable")
        lines.append(
            f"| {row['category']} | {row['strategy']} | {row['patches']} | {row['bank']} | {row['image_auroc']:.3f} | {row['pixel_auroc']:.3f} "
            f"| {row['image_auroc'] - reference['image_auroc']:+.3f} | {row['pixel_auroc'] - reference['pixel_auroc']:+.3f} "
            f"| {row['fit_s']:.2f} ({row['coreset_s']:.2f}) | {row['fit_s'] / old['fit_s']:.2f}x "
            f"| {(row['features_s'] + row['fit_s']) / (old['features_s'] + old['fit_s']):.2f}x | {row['held_mb']:.1f} |"
        )
    for name in STRATEGIES:
        chosen = [r for r in rows if r["strategy"] == name]
        worst_image = min(r["image_auroc"] - next(g for g in rows if g["category"] == r["category"] and g["strategy"] == "global")["image_auroc"] for r in chosen)
        worst_pixel = min(r["pixel_auroc"] - next(g for g in rows if g["category"] == r["category"] and g["strategy"] == "global")["pixel_auroc"] for r in chosen)
        lines.append(
            f"| **mean** | {name} | | | {statistics.fmean(r['image_auroc'] for r in chosen):.3f} | {statistics.fmean(r['pixel_auroc'] for r in chosen):.3f} "
            f"| worst {worst_image:+.3f} | worst {worst_pixel:+.3f} | {statistics.fmean(r['fit_s'] for r in chosen):.2f} | | | |"
        )
    return "\n".join(lines)


def memory_table(dim: int, patches_per_image: int, images: list[int]) -> str:
    """Peak rows held for growing training sets (random picks stand in for the selection)."""
    import torch

    from vad_patchcore.coreset import StreamingCoreset
    from vad_patchcore.detector import PatchCore

    defaults = PatchCore.Options.parse({})
    lines = ["### Memory the fit holds as the training set grows", "",
             f"{patches_per_image} patches of {dim} float32 per image, batches of 8 images; MB of rows held at once (chunk, pool, bank)", "",
             "| training images | " + " | ".join(STRATEGIES) + " |", "|---:|" + "---:|" * len(STRATEGIES)]
    generator = torch.Generator().manual_seed(0)

    def random_pick(rows: torch.Tensor, count: int) -> torch.Tensor:
        return torch.randperm(rows.shape[0], generator=generator)[:count]

    batch = torch.zeros(8 * patches_per_image, dim)
    for count in images:
        cells = []
        for options in STRATEGIES.values():
            merged = {**defaults.__dict__, **options}
            stream = StreamingCoreset(merged["coreset_ratio"], merged["coreset_chunk_patches"], merged["coreset_oversample"], merged["coreset_pool_patches"], random_pick)
            owners = torch.zeros(batch.shape[0], dtype=torch.int64)
            for _ in range(count // 8):
                stream.add(batch, owners)
            stream.finish()
            cells.append(f"{stream.peak_held * dim * 4 / 2**20:.0f}")
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["demo", "larger"], choices=["demo", "larger"])
    parser.add_argument("--larger-root", default="runs/larger-data", help="where the larger data set is (built there if missing)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from vad.build import create_dataset
    from vad.config import RunConfig
    from vad.plugins import get_registry
    from vad.progress import set_log_mode

    set_log_mode("quiet")
    registry = get_registry()
    common = {"detectors": ["patchcore"], "device": "cpu", "report": False, "threshold": "manual",
              "options": {"manual": {"value": 0.0}}, "metrics": ["image_auroc", "pixel_auroc"]}
    rows: list[dict] = []
    for data in args.data:
        if data == "demo":
            config = RunConfig(dataset="demo", **common)
            title = "Demo data (3 categories, 24 training images)"
        else:
            sys.path.insert(0, str(HERE))
            import larger_data

            summary = larger_data.build(args.larger_root)
            first = next(iter(summary.values()))
            config = RunConfig(dataset="mvtec", root=args.larger_root, **common)
            title = f"Larger generated data ({len(summary)} categories, {first['train']} training images of 224 px, {first['test_good'] + first['test_defects']} test images)"
        rows = []
        for category in create_dataset(config, registry).categories():
            rows.extend(category_rows(config, registry, category, args.repeats))
            print(f"  {category} done", file=sys.stderr, flush=True)
        print(accuracy_table(title, rows) + "\n", flush=True)
    print(memory_table(rows[-1]["dim"], rows[-1]["patches_per_image"], images=[64, 200, 1000, 4000]))


if __name__ == "__main__":
    main()
