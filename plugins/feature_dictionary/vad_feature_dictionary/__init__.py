"""vad-feature-dictionary: the CNN feature dictionary (Napoletano, Piccoli, Schettini, Sensors
2018), the pretrained-feature baseline of the MVTec AD paper (Bergmann et al., CVPR 2019).

``--detector cnn-dictionary``: image patches described by a frozen backbone's average-pooled
features, PCA, a k-means dictionary of normal descriptors; a patch's score is its distance to
the nearest words and each pixel's score the mean of the patches covering it. See
:mod:`vad_feature_dictionary.detector` for the hyper-parameters and deviations and
:mod:`vad_feature_dictionary.dictionary` for the numerical core. Registration is lazy: this
module does not import torch.
"""

from vad import hookimpl

__version__ = "0.1.0"


@hookimpl
def vad_register_detectors(register):
    """Register the CNN feature dictionary."""
    register(
        "vad_feature_dictionary.detector:CnnFeatureDictionary",
        name="cnn-dictionary",
        summary="CNN feature dictionary: pooled CNN descriptors of patches, k-means words, distance to the nearest word (MVTec AD baseline).",
    )
