"""DSR's discrete latent model: a two-level VQ-VAE with EMA codebooks, as plain torch modules.

Same layers, attribute names and state-dict keys as the official ``discrete_model.py``
(github.com/VitjanZ/DSR_anomaly_detection), so the official ImageNet checkpoint
``vq_model_pretrained_128_4096.pckl``, converted to safetensors, loads strictly:

* ``_encoder_b`` (F_hi encoder, stride 4) and ``_encoder_t`` (F_lo encoder, stride 8 overall);
* ``_pre_vq_conv_top`` -> ``_vq_vae_top`` (codebook K_lo) quantizes F_lo; ``upsample_t`` brings
  Q_lo to stride 4, ``_pre_vq_conv_bot`` mixes it with the F_hi encoder output -> ``_vq_vae_bot``
  (codebook K_hi);
* ``_decoder_b``, the general object appearance decoder, renders ``cat(upsample_t(Q_lo), Q_hi)``.

Official sizes: 128 hidden channels, 2 residual layers of 64, codebooks of 4096 codes of 128
dimensions, commitment cost 0.25, EMA decay 0.99. Codebooks are buffers here (the official module
keeps them as parameters that no optimiser can reach): they change by the EMA update only.

The official ``Residual`` applies an in-place ReLU to its input before adding it back, so its
output is ``relu(x) + block(relu(x))``; :class:`Residual` computes exactly that without the
in-place trick.

Deviations against codebook collapse, off unless ``vad dsr pretrain-vq`` asks for them
(``codebook_init="data"``, ``dead_code_steps``): the official quantizer starts its codes and EMA
sums N(0, 1), independently, with zero EMA counts, so its first update divides the random sum of
every code the first batch did not use by a Laplace-smoothed count of ~1e-5 and throws it out of
reach for about a thousand steps (short runs end on 1-2 codes).
:func:`init_codebooks_from_data` starts both codebooks at encoder outputs of a batch
(:meth:`VectorQuantizerEMA.init_from`), and :meth:`VectorQuantizerEMA.restart_dead_codes` moves
codes left unused for a number of steps to current encoder outputs. Neither changes the state
dict; with both off every update is the official one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.errors import VadError

#: The ``format`` metadata of VQ model files written by ``vad dsr pretrain-vq``.
VQ_FORMAT = "vad-dsr-vq"
#: The VQ pretraining schedule (3DSR's ``train_dada.py``): x``VQ_GAMMA`` after these fractions of its epochs.
VQ_MILESTONES, VQ_GAMMA = (0.8, 0.9), 0.1


def multistep_milestones(fractions: Sequence[float], epochs: int) -> list[int]:
    """The epochs after which a MultiStepLR multiplies the rate, ``int(fraction x epochs)`` as the
    official ``train_dsr.py`` writes them (a repeated milestone applies its factor twice)."""
    return [int(fraction * epochs) for fraction in fractions]
#: How a user gets a VQ model file (for error messages).
HOW_TO_MAKE = (
    "make one with `vad dsr pretrain-vq --images FOLDER --output FILE.safetensors`, or convert the official "
    "vq_model_pretrained_128_4096.pckl with safetensors.torch.save_file(torch.load(PCKL), FILE)"
)


class Codebook(nn.Module):
    """The ``K x D`` code vectors as a buffer named ``weight`` (the official ``nn.Embedding``'s key)."""

    def __init__(self, count: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.randn(count, dim))


class VectorQuantizerEMA(nn.Module):
    """Nearest-code quantization with a straight-through gradient, a commitment loss and
    exponential-moving-average codebook updates (the official ``VectorQuantizerEMA``, from
    zalandoresearch/pytorch-vq-vae)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost: float = 0.25, decay: float = 0.99, epsilon: float = 1e-5) -> None:
        super().__init__()
        self._num_embeddings, self._embedding_dim = num_embeddings, embedding_dim
        self._commitment_cost, self._decay, self._epsilon = commitment_cost, decay, epsilon
        self._embedding = Codebook(num_embeddings, embedding_dim)
        self.register_buffer("_ema_cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("_ema_w", torch.randn(num_embeddings, embedding_dim))
        # Dead-code restarts (deviation, off by default: see restart_dead_codes); not saved.
        self.register_buffer("_idle_steps", torch.zeros(num_embeddings, dtype=torch.long), persistent=False)
        self._dead_code_steps, self._restart_generator = 0, None

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors ``[K, D]``."""
        return self._embedding.weight

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean distance, official formula) of each row of ``[N, D]``."""
        codebook = self.codebook
        distances = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return distances.argmin(dim=1)

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(quantized [B, D, H, W], commitment loss)``: each position replaced by its nearest
        code, gradients passed straight through to ``inputs``; in training mode the codebook then
        moves by EMA towards the inputs assigned to it (the loss uses the codes before the move,
        as official)."""
        x = inputs.permute(0, 2, 3, 1)
        flat = x.reshape(-1, self._embedding_dim)
        indices = self.nearest(flat)
        quantized = self.codebook.index_select(0, indices).view(x.shape)
        if self.training:
            self.ema_update(flat.detach(), indices)
        loss = self._commitment_cost * F.mse_loss(quantized.detach(), x)
        quantized = x + (quantized - x).detach()
        return quantized.permute(0, 3, 1, 2).contiguous(), loss

    @torch.no_grad()
    def ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        """The official update: EMA of the code counts (Laplace-smoothed) and of the sums of the
        assigned inputs; each code becomes their ratio. Then, only if :meth:`restart_dead_codes`
        turned them on, the restarts (a deviation)."""
        counts = torch.bincount(indices, minlength=self._num_embeddings).to(flat.dtype)
        cluster = self._ema_cluster_size * self._decay + (1 - self._decay) * counts
        total = cluster.sum()
        cluster = (cluster + self._epsilon) / (total + self._num_embeddings * self._epsilon) * total
        sums = torch.zeros_like(self._ema_w).index_add_(0, indices, flat)
        self._ema_cluster_size.copy_(cluster)
        self._ema_w.mul_(self._decay).add_((1 - self._decay) * sums)
        self.codebook.copy_(self._ema_w / cluster.unsqueeze(1))
        if self._dead_code_steps > 0:
            self._idle_steps.add_(1).masked_fill_(counts > 0, 0)
            dead = (self._idle_steps >= self._dead_code_steps).nonzero().squeeze(1)
            if dead.numel():
                codes = pick_rows(flat, dead.numel(), self._restart_generator)
                self.codebook.index_copy_(0, dead, codes)
                self._ema_w.index_copy_(0, dead, codes)
                self._ema_cluster_size.index_fill_(0, dead, 1.0)
                self._idle_steps.index_fill_(0, dead, 0)

    def restart_dead_codes(self, steps: int, generator: torch.Generator | None) -> None:
        """From now on, in training mode, move every code that no input was assigned to in
        ``steps`` consecutive updates to a random input of the current batch (EMA count 1, the
        code as its EMA sum, as :meth:`init_from`); 0 turns it off (official: dead codes stay)."""
        self._dead_code_steps, self._restart_generator = steps, generator
        self._idle_steps.zero_()

    @torch.no_grad()
    def init_from(self, flat: torch.Tensor, generator: torch.Generator) -> None:
        """Start the codebook at ``K`` rows of ``[N, D]`` inputs drawn at random (deviation: the
        official codebook and EMA sums start N(0, 1), independently, with zero counts). Without
        replacement while the rows last; rows drawn again get a jitter of 1 % of the inputs' spread
        per dimension so that copies can split a cluster. Each code starts with an EMA count of 1
        and the code itself as its EMA sum, so the next update moves it by the usual rate
        instead of dividing a random sum by a near-zero count."""
        codes = pick_rows(flat, self._num_embeddings, generator)
        self.codebook.copy_(codes)
        self._ema_w.copy_(codes)
        self._ema_cluster_size.fill_(1.0)


def pick_rows(flat: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` rows of ``flat [N, D]`` drawn at random: each row once while they last, then
    again with a jitter of 1 % of each dimension's spread (so no two picks coincide)."""
    total = flat.shape[0]
    order = torch.randperm(total, generator=generator)[:count]
    rows = flat[order.to(flat.device)]
    if count > total:
        again = flat[torch.randint(total, (count - total,), generator=generator).to(flat.device)]
        spread = flat.std(dim=0, unbiased=False).clamp_min(1e-6) if total > 1 else flat.abs().mean().clamp_min(1e-6).expand(flat.shape[1])
        noise = torch.randn(again.shape, generator=generator).to(flat.device, flat.dtype)
        rows = torch.cat((rows, again + 0.01 * spread * noise))
    return rows


@torch.no_grad()
def init_codebooks_from_data(model: DiscreteLatentModel, images: torch.Tensor, generator: torch.Generator) -> None:
    """Start both codebooks at the encoder's outputs on ``images`` (the first pretraining batch):
    K_lo at random positions of F_lo, then K_hi at random positions of F_hi computed from the
    images' Q_lo under the new K_lo (:meth:`VectorQuantizerEMA.init_from`)."""
    encoded, z_lo = model.encode_lo(images)
    lo, hi = model.quantizer_lo, model.quantizer_hi
    flat_lo = z_lo.permute(0, 2, 3, 1).reshape(-1, z_lo.shape[1])
    lo.init_from(flat_lo, generator)
    q_lo = lo.codebook.index_select(0, lo.nearest(flat_lo)).view(z_lo.shape[0], z_lo.shape[2], z_lo.shape[3], -1).permute(0, 3, 1, 2)
    z_hi = model.features_hi(encoded, q_lo)
    hi.init_from(z_hi.permute(0, 2, 3, 1).reshape(-1, z_hi.shape[1]), generator)


class Residual(nn.Module):
    """``relu(x) + conv1x1(relu(conv3x3(relu(x))))`` (official ``Residual`` with its in-place ReLU)."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(in_channels, num_residual_hiddens, kernel_size=3, padding=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_residual_hiddens, num_hiddens, kernel_size=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return x + self._block(x)


class ResidualStack(nn.Module):
    """``num_residual_layers`` :class:`Residual` blocks, then a ReLU."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._layers = nn.ModuleList([Residual(in_channels, num_hiddens, num_residual_hiddens) for _ in range(num_residual_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._layers:
            x = layer(x)
        return F.relu(x)


class EncoderBot(nn.Module):
    """Image -> stride-4 features: two 4x4 stride-2 convs, a 3x3 conv, residual stack."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(num_hiddens // 2, num_hiddens, kernel_size=4, stride=2, padding=1)
        self._conv_3 = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_1(x))
        x = F.relu(self._conv_2(x))
        return self._residual_stack(self._conv_3(x))


class EncoderTop(nn.Module):
    """Stride-4 features -> stride-8 features: a 4x4 stride-2 conv, a 3x3 conv, residual stack."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens, kernel_size=4, stride=2, padding=1)
        self._conv_2 = nn.Conv2d(num_hiddens, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self._conv_1(x))
        return self._residual_stack(F.relu(self._conv_2(x)))


class DecoderBot(nn.Module):
    """Stride-4 codes -> image: a 3x3 conv, residual stack, two 4x4 stride-2 transposed convs."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int) -> None:
        super().__init__()
        self._conv_1 = nn.Conv2d(in_channels, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class DiscreteLatentModel(nn.Module):
    """The two-level VQ-VAE: encoders, both codebooks, the general object appearance decoder."""

    def __init__(
        self,
        hidden_channels: int = 128,
        residual_layers: int = 2,
        residual_channels: int = 64,
        codebook_size: int = 4096,
        embedding_dim: int = 128,
        commitment_cost: float = 0.25,
        decay: float = 0.99,
    ) -> None:
        super().__init__()
        h, d = hidden_channels, embedding_dim
        self._encoder_t = EncoderTop(h, h, residual_layers, residual_channels)
        self._encoder_b = EncoderBot(3, h, residual_layers, residual_channels)
        self._pre_vq_conv_bot = nn.Conv2d(h + d, d, kernel_size=1)
        self._pre_vq_conv_top = nn.Conv2d(h, d, kernel_size=1)
        self._vq_vae_top = VectorQuantizerEMA(codebook_size, d, commitment_cost, decay)
        self._vq_vae_bot = VectorQuantizerEMA(codebook_size, d, commitment_cost, decay)
        self._decoder_b = DecoderBot(2 * d, h, residual_layers, residual_channels)
        self.upsample_t = nn.ConvTranspose2d(d, d, kernel_size=4, stride=2, padding=1)

    @property
    def quantizer_lo(self) -> VectorQuantizerEMA:
        """K_lo, the stride-8 codebook (official ``_vq_vae_top``)."""
        return self._vq_vae_top

    @property
    def quantizer_hi(self) -> VectorQuantizerEMA:
        """K_hi, the stride-4 codebook (official ``_vq_vae_bot``)."""
        return self._vq_vae_bot

    def encode_lo(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_hi encoder output [B, h, H/4, W/4], pre-quantization F_lo [B, D, H/8, W/8])``."""
        encoded = self._encoder_b(images)
        return encoded, self._pre_vq_conv_top(self._encoder_t(encoded))

    def features_hi(self, encoded: torch.Tensor, quantized_lo: torch.Tensor) -> torch.Tensor:
        """Pre-quantization F_hi ``[B, D, H/4, W/4]`` from the F_hi encoder output and a Q_lo."""
        return self._pre_vq_conv_bot(torch.cat((encoded, self.upsample_t(quantized_lo)), dim=1))

    def decode(self, quantized_lo: torch.Tensor, quantized_hi: torch.Tensor) -> torch.Tensor:
        """The general object appearance decoder's image from ``(Q_lo, Q_hi)``."""
        return self._decoder_b(torch.cat((self.upsample_t(quantized_lo), quantized_hi), dim=1))

    def latents(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every cut point of one pass: ``encoded``, ``z_lo``, ``q_lo``, ``z_hi``, ``q_hi`` and the
        summed commitment ``loss`` of both codebooks."""
        encoded, z_lo = self.encode_lo(images)
        q_lo, loss_lo = self._vq_vae_top(z_lo)
        z_hi = self.features_hi(encoded, q_lo)
        q_hi, loss_hi = self._vq_vae_bot(z_hi)
        return {"encoded": encoded, "z_lo": z_lo, "q_lo": q_lo, "z_hi": z_hi, "q_hi": q_hi, "loss": loss_lo + loss_hi}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(general reconstruction, Q_lo, Q_hi, commitment loss)`` of an image batch."""
        latents = self.latents(images)
        return self.decode(latents["q_lo"], latents["q_hi"]), latents["q_lo"], latents["q_hi"], latents["loss"]


def vq_pretraining_loss(model: DiscreteLatentModel, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The VQ-VAE loss: ``MSE(reconstruction, images)`` plus both commitment losses (the codebooks
    learn by EMA in training mode). Returns the loss and its detached parts."""
    reconstruction, _, _, commitment = model(images)
    l2 = F.mse_loss(reconstruction, images)
    return l2 + commitment, {"l2": l2.detach(), "commitment": commitment.detach()}


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """The authors' ``weights_init``: every convolution's (and transposed convolution's) weight
    drawn from N(0, 0.02) with ``generator``; biases and everything else as built."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.02, generator=generator)


def bgr(images: torch.Tensor) -> torch.Tensor:
    """RGB batches in the channel order the official networks see (``cv2.imread``: BGR)."""
    return images[:, [2, 1, 0]]


def vq_sizes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """The architecture options a VQ state dict was built with (for messages), as far as its keys tell."""
    sizes = {}
    codebook = tensors.get("_vq_vae_top._embedding.weight")
    if codebook is not None and codebook.ndim == 2:
        sizes["codebook_size"], sizes["embedding_dim"] = int(codebook.shape[0]), int(codebook.shape[1])
    hidden = tensors.get("_encoder_b._conv_2.weight")
    if hidden is not None:
        sizes["hidden_channels"] = int(hidden.shape[0])
    residual = tensors.get("_encoder_b._residual_stack._layers.0._block.1.weight")
    if residual is not None:
        sizes["residual_channels"] = int(residual.shape[0])
    sizes["residual_layers"] = len({key.split(".")[3] for key in tensors if key.startswith("_encoder_b._residual_stack._layers.")})
    return sizes


def save_vq(path: str | Path, model: DiscreteLatentModel, facts: dict[str, Any]) -> None:
    """Write a VQ model's state dict as safetensors (atomically), ``facts`` as JSON metadata."""
    from vad.artifacts import save_tensors

    save_tensors(path, model.state_dict(), metadata={"format": VQ_FORMAT, **{key: json.dumps(value) for key, value in facts.items()}})


def load_vq(model: DiscreteLatentModel, path: str | Path, owner: str) -> None:
    """Load a VQ model file into ``model`` (strict); a missing, unreadable or mismatched file is a
    VadError saying what to do, and leaves ``model`` as it was."""
    from safetensors.torch import load_file

    file = Path(path).expanduser()
    if not file.is_file():
        raise VadError(f"{owner}: VQ weights file {str(file)!r} does not exist; {HOW_TO_MAKE}")
    try:
        tensors = load_file(str(file))
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise VadError(f"{owner}: cannot read VQ weights file {str(file)!r} as safetensors ({error}); {HOW_TO_MAKE}") from error
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(tensors[key].shape != value.shape for key, value in expected.items()):
        found = ", ".join(f"{key}={value}" for key, value in vq_sizes(tensors).items()) or "no VQ model layers"
        wanted = ", ".join(f"{key}={value}" for key, value in vq_sizes(expected).items())
        raise VadError(f"{owner}: VQ weights file {str(file)!r} does not fit the options ({wanted}); it holds {found}: set those options to match it")
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in tensors.items()}, strict=True)
