"""Translation registration by phase correlation, and integer translations with a validity mask.

Convention: ``estimate_shifts(moving, reference)`` returns ``s`` (rows, columns) with
``moving(y) ~ reference(y - s)``, i.e. the moving image is the reference moved by ``s``.
:func:`translate` moves images by ``t``: ``out(y) = x(y - t)``, zero (and invalid) where
``y - t`` falls outside. Before the DFT each image loses its mean and is multiplied by a 2-D
Hann window (:func:`tapered`, as OpenCV's ``phaseCorrelate`` is used): without it the jump
between opposite borders of a non-periodic image dominates the normalised spectrum and pulls
the peak to zero shift. Both are plain torch; :class:`DFT2` computes the 2-D DFT by matrix
products so that the registration exports to ONNX (torch's FFT has no ONNX export in the
TorchScript exporter), :func:`fft_spectrum` is the fast path used by ``predict``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Floor of the cross-power spectrum's magnitude before it is normalised (as scikit-image).
SPECTRUM_EPS = 1e-12


def tapered(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, H, W]`` images minus their mean, times a 2-D Hann window (registration input)."""
    height, width = (int(v) for v in images.shape[-2:])
    rows = torch.hann_window(height, periodic=False, dtype=images.dtype, device=images.device)
    cols = torch.hann_window(width, periodic=False, dtype=images.dtype, device=images.device)
    return (images - images.mean((2, 3), keepdim=True)) * (rows[:, None] * cols[None, :])


def fft_spectrum(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the 2-D DFT of ``[B, 1, H, W]`` real images."""
    spectrum = torch.fft.fft2(images.double())
    return spectrum.real, spectrum.imag


def fft_inverse_real(real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
    """Real part of the inverse 2-D DFT (up to the constant ``1 / HW``)."""
    return torch.fft.ifft2(torch.complex(real, imag)).real


class DFT2(nn.Module):
    """The 2-D DFT of ``H x W`` images as products with constant cosine and sine matrices."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        for name, size in (("rows", height), ("cols", width)):
            index = torch.arange(size, dtype=torch.float64)
            angle = 2 * math.pi * torch.outer(index, index) / size
            self.register_buffer(f"{name}_cos", torch.cos(angle).float())
            self.register_buffer(f"{name}_sin", torch.sin(angle).float())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(real, imag)`` of the DFT of real ``[B, 1, H, W]`` images: ``W_H X W_W`` with ``W = C - iS``."""
        cos_x = torch.matmul(self.rows_cos, images)
        sin_x = torch.matmul(self.rows_sin, images)
        real = torch.matmul(cos_x, self.cols_cos) - torch.matmul(sin_x, self.cols_sin)
        imag = -(torch.matmul(cos_x, self.cols_sin) + torch.matmul(sin_x, self.cols_cos))
        return real, imag

    def inverse_real(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        """Real part of the inverse DFT up to ``1 / HW``: ``Re(conj(W_H) Y conj(W_W))``."""
        left_real = torch.matmul(self.rows_cos, real) - torch.matmul(self.rows_sin, imag)
        left_imag = torch.matmul(self.rows_cos, imag) + torch.matmul(self.rows_sin, real)
        return torch.matmul(left_real, self.cols_cos) - torch.matmul(left_imag, self.cols_sin)


def phase_correlation_peak(
    moving: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor], inverse, size: tuple[int, int]
) -> torch.Tensor:
    """Integer shifts ``[B, 2]`` (rows, columns; in ``(-size/2, size/2]``) from the spectra of the
    moving and reference images: the peak of the inverse DFT of the normalised cross-power
    spectrum ``M conj(R) / |M conj(R)|``."""
    (m_real, m_imag), (r_real, r_imag) = moving, reference
    real = m_real * r_real + m_imag * r_imag
    imag = m_imag * r_real - m_real * r_imag
    magnitude = torch.sqrt(real * real + imag * imag).clamp_min(SPECTRUM_EPS)
    surface = inverse(real / magnitude, imag / magnitude)
    height, width = size
    peak = surface.flatten(1).argmax(1)
    rows, cols = torch.div(peak, width, rounding_mode="floor"), torch.remainder(peak, width)
    rows = torch.where(rows > height // 2, rows - height, rows)
    cols = torch.where(cols > width // 2, cols - width, cols)
    return torch.stack([rows, cols], 1)


def estimate_shifts(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Integer shifts ``[B, 2]`` with ``moving(y) ~ reference(y - s)`` for ``[B, 1, H, W]`` moving
    images and a ``[1 or B, 1, H, W]`` reference, by phase correlation (FFT) of the
    :func:`tapered` images."""
    size = (int(moving.shape[-2]), int(moving.shape[-1]))
    return phase_correlation_peak(fft_spectrum(tapered(moving)), fft_spectrum(tapered(reference)), fft_inverse_real, size)


def translate(images: torch.Tensor, shifts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``out(y) = images(y - t)`` for integer shifts ``t`` ``[B, 2]``, and the ``[B, 1, H, W]``
    mask of pixels whose source lies inside the image (outside: 0). ``images`` may have batch 1
    (one model moved by each image's shift)."""
    batch = shifts.shape[0]  # a traced size, so an exported graph keeps a dynamic batch
    channels, height, width = (int(v) for v in images.shape[1:])
    images = images.expand(batch, -1, -1, -1)
    rows = torch.arange(height, device=images.device)[None, :] - shifts[:, 0:1]  # [B, H]
    cols = torch.arange(width, device=images.device)[None, :] - shifts[:, 1:2]  # [B, W]
    rows_inside = (rows >= 0) & (rows < height)
    cols_inside = (cols >= 0) & (cols < width)
    rows_index = rows.clamp(0, height - 1)[:, None, :, None].expand(-1, channels, -1, width)
    cols_index = cols.clamp(0, width - 1)[:, None, None, :].expand(-1, channels, height, -1)
    moved = images.gather(2, rows_index).gather(3, cols_index)
    inside = (rows_inside[:, None, :, None] & cols_inside[:, None, None, :])
    return moved * inside.to(moved.dtype), inside
