"""vad-sklearn: classical anomaly detectors on globally pooled deep features (contrib).

kNN distance, Local Outlier Factor, Elliptic Envelope, One-Class SVM and Isolation Forest, as
benchmarked in seed 003, fitted with scikit-learn on one average-pooled feature vector per image
(optionally standardised and PCA-projected). Image scores only: vad skips pixel metrics for them
and says so in the report. Registered lazily (import paths) so this module imports neither torch
nor scikit-learn. See :mod:`vad_sklearn.detectors`.
"""

from vad import hookimpl

DETECTORS = {
    "sklearn-knn": ("KNNDetector", "mean distance to the k nearest training images (pooled deep features; image scores only)"),
    "sklearn-lof": ("LOFDetector", "Local Outlier Factor, novelty mode (pooled deep features; image scores only)"),
    "sklearn-elliptic": ("EllipticDetector", "Elliptic Envelope, robust Gaussian (pooled deep features; image scores only)"),
    "sklearn-ocsvm": ("OneClassSVMDetector", "One-Class SVM (pooled deep features; image scores only)"),
    "sklearn-iforest": ("IsolationForestDetector", "Isolation Forest (pooled deep features; image scores only)"),
}


@hookimpl
def vad_register_detectors(register):
    """Register the five pooled-feature detectors."""
    for name, (attribute, summary) in DETECTORS.items():
        register(f"vad_sklearn.detectors:{attribute}", name=name, summary=summary)
