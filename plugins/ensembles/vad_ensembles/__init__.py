"""vad-ensembles: feature-level and score-level ensembles for vad.

Feature level (each a :class:`vad.contracts.FeatureEnsembler`, itself a FeatureSource, built as
``cls(members, **options)``): ``concat``, ``pca-global``, ``pca-individual`` — see
:mod:`vad_ensembles.features`. Score level (:class:`vad.contracts.ScoreEnsembler`, calibrated on
validation normals only): ``score-mean``, ``score-max``, ``rank-mean``, ``weighted`` — see
:mod:`vad_ensembles.scores` — and, learning their weights from synthetic anomalies,
``learned-weights`` and ``stacker`` — see :mod:`vad_ensembles.learned`. Registration is lazy: this module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_ensemblers(register):
    """Register the three feature-level and six score-level ensemblers."""
    features = "vad_ensembles.features"
    scores = "vad_ensembles.scores"
    register(f"{features}:ConcatEnsemble", name="concat", summary="Resize members' features to one grid and concatenate channels (no PCA).")
    register(f"{features}:PCAGlobalEnsemble", name="pca-global", summary="Concatenate members' features on one grid, then PCA along channels fitted on training normals.")
    register(f"{features}:PCAIndividualEnsemble", name="pca-individual", summary="PCA per member on training normals, then resize to one grid and concatenate.")
    register(f"{scores}:ScoreMean", name="score-mean", summary="Mean of members' z-scores calibrated on validation normals.")
    register(f"{scores}:ScoreMax", name="score-max", summary="Maximum of members' z-scores calibrated on validation normals.")
    register(f"{scores}:RankMean", name="rank-mean", summary="Mean of members' ranks within their validation-normal score distributions.")
    register(f"{scores}:WeightedScores", name="weighted", summary="Weighted mean of members' calibrated z-scores (weights option).")
    learned = "vad_ensembles.learned"
    register(f"{learned}:LearnedWeights", name="learned-weights", summary="Weighted mean of members' z-scores, weights from each member's AUROC on synthetic anomalies.")
    register(f"{learned}:Stacker", name="stacker", summary="Logistic regression or random forest on members' z-scores, trained on calibration normals + synthetic anomalies.")
