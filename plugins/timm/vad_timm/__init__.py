"""vad-timm: any timm network as a vad backbone.

``--backbone NAME`` for the names registered here, or ``--backbone timm:ANY_TIMM_MODEL`` (for
example ``timm:convnext_tiny`` or ``timm:wide_resnet50_2.tv_in1k``) through the family entry
``timm``. Weights come, in order, from an explicit local file (``--weights``), from installed
packages (ImageNet EfficientNet-Lite0/1/2, the offline default), or from the Hugging Face hub
(online or its cache); see :mod:`vad_timm.weights`. Vision transformers (DINOv2, DINOv3, CLIP:
``timm:vit_small_patch14_dinov2``, ``timm:vit_small_patch16_dinov3``,
``timm:vit_base_patch16_clip_224.openai``) give the patch tokens of any block as a feature grid,
at any input size that is a multiple of the patch size; see :mod:`vad_timm.vit`.
:mod:`vad_timm.compat` makes timm importable next to a torchvision built for another torch.
Registration is lazy: this module does not import torch or timm.
"""

from vad import hookimpl

__version__ = "0.1.0"

_BACKBONE = "vad_timm.backbone:TimmBackbone"

#: Registered names and their one-line summaries (each builds ``TimmBackbone(name)``).
BACKBONES = {
    "tf_efficientnet_lite0": "EfficientNet-Lite0, 224 px; ImageNet weights packaged (offline default).",
    "tf_efficientnet_lite1": "EfficientNet-Lite1, 240 px; ImageNet weights packaged (offline).",
    "tf_efficientnet_lite2": "EfficientNet-Lite2, 260 px; ImageNet weights packaged (offline).",
    "resnet18": "ResNet-18 (timm weights from the hub or its cache, or --weights).",
    "resnet50": "ResNet-50 (timm weights from the hub or its cache, or --weights).",
    "wide_resnet50_2": "Wide ResNet-50-2, PatchCore's backbone (hub or cache, or --weights).",
    "timm": "Family entry: timm:MODEL builds any timm network (e.g. timm:convnext_tiny, or a ViT as patch-token grids: timm:vit_small_patch14_dinov2).",
}


@hookimpl
def vad_register_backbones(register):
    """Register the named timm backbones and the ``timm`` family entry."""
    for name, summary in BACKBONES.items():
        register(_BACKBONE, name=name, summary=summary)
