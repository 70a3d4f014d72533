"""vad-winclip: WinCLIP and WinCLIP+ (Jeong et al., CVPR 2023) as a vad plugin.

Registers the detector ``winclip`` lazily (by import path) so that importing this entry module
imports neither torch nor open_clip. The parts: :mod:`vad_winclip.prompts` (the compositional
prompt ensemble), :mod:`vad_winclip.clip` (the open_clip model, its weights offline first, the
text embeddings), :mod:`vad_winclip.scoring` (window embeddings, zero- and few-shot scores,
harmonic aggregation) and :mod:`vad_winclip.detector` (the detector, its state and features).
"""

from vad import hookimpl


@hookimpl
def vad_register_detectors(register):
    """Register WinCLIP."""
    register(
        "vad_winclip.detector:WinClip",
        name="winclip",
        summary="WinCLIP/WinCLIP+: CLIP window embeddings vs. a prompt ensemble (zero-shot) and a memory of reference images (few-shot)",
    )
