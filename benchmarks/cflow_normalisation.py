#!/usr/bin/env python
"""How much CFLOW-AD's image AUROC depends on where its map normalisers come from.

    python benchmarks/cflow_normalisation.py --model RUN/brick/model --root runs/larger-data --category brick

CFLOW-AD's map is ``max - sum_l exp(log p_l - max_l)``. vad takes the per-level maxima from the
training images; the official code from the whole test set; anomalib from each test batch (8
images, in data-set order). This scores one saved vad CFLOW model's test images all three ways
(per-level log-likelihoods from its feature source, resized to the finest level's grid) and
prints the image AUROCs.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from vad.model import AnomalyModel
from vad.plugins import get_registry
from vad.preprocess import to_batch


def image_scores(log_likelihoods: torch.Tensor, maxima: torch.Tensor | None, batch: int) -> np.ndarray:
    """``max - sum_l exp(log p_l - max_l)`` per position, its maximum per image; ``maxima`` None:
    each batch of ``batch`` images supplies its own (as do the map's maximum and offset)."""
    scores = []
    for part in log_likelihoods.split(batch):
        levels = maxima if maxima is not None else part.amax(dim=(0, 2, 3))
        probability = torch.exp(part - levels.view(1, -1, 1, 1)).sum(1)
        scores.append((probability.max() - probability).flatten(1).amax(1))
    return torch.cat(scores).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a saved vad model folder of a cflow run")
    parser.add_argument("--root", default="runs/larger-data")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="brick")
    parser.add_argument("--batch", type=int, default=8, help="anomalib's test batch size")
    args = parser.parse_args()

    detector = AnomalyModel.load(args.model).members[0].detector
    samples = get_registry().load_class("datasets", args.dataset)(root=args.root).load(args.category).test
    labels = np.array([sample.label for sample in samples])
    source = detector.feature_source(output="log_likelihood")
    with torch.no_grad():
        parts = [source(to_batch([s.load_image() for s in samples[i : i + args.batch]], detector.preprocessing)).double() for i in range(0, len(samples), args.batch)]
    log_likelihoods = torch.cat(parts)
    training = detector.networks["decoders"].log_likelihood_max.double()
    rows = (
        ("training images (vad)", image_scores(log_likelihoods, training, len(log_likelihoods))),
        (f"each test batch of {args.batch} (anomalib)", image_scores(log_likelihoods, None, args.batch)),
        ("the whole test set (official code)", image_scores(log_likelihoods, None, len(log_likelihoods))),
    )
    print("| maxima taken from | image AUROC |\n|---|---|")
    for name, scores in rows:
        print(f"| {name} | {roc_auc_score(labels, scores):.3f} |")


if __name__ == "__main__":
    main()
