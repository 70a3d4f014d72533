"""The VQ-VAE's architecture options, declared once for the detector and ``vad dsr pretrain-vq``
(a pretrained file loads only into a detector built with the same values). No torch import here:
``vad --help`` reads these declarations."""

from __future__ import annotations

from typing import Any

from vad.options import Options, option


class VqArchitecture(Options):
    """Sizes and codebook settings of DSR's two-level VQ-VAE (official values as defaults)."""

    hidden_channels: int = option(128, "VQ-VAE encoder/decoder channels (official 128; tests use 4-16).", ge=2, multiple_of=2)
    residual_channels: int = option(64, "Channels inside the VQ-VAE's residual blocks (official 64).", ge=1)
    residual_layers: int = option(2, "Residual blocks per VQ-VAE stack (official 2).", ge=0)
    embedding_dim: int = option(128, "Code dimension D of both codebooks, also the restriction modules' width (official 128).", ge=1)
    codebook_size: int = option(4096, "Codes K per codebook (official 4096).", ge=2)
    commitment_cost: float = option(0.25, "Weight of the VQ commitment loss (official 0.25).", ge=0)
    decay: float = option(0.99, "EMA decay of the codebook updates (official 0.99).", gt=0, lt=1)

    def build_vq(self) -> Any:
        """A :class:`vad_dsr.vq.DiscreteLatentModel` of these sizes."""
        from vad_dsr.vq import DiscreteLatentModel

        return DiscreteLatentModel(
            self.hidden_channels, self.residual_layers, self.residual_channels, self.codebook_size, self.embedding_dim, self.commitment_cost, self.decay
        )
