"""Fidelity of a cached result to the uncached one: PSNR and SSIM.

Both take tensors whose last two dimensions are (H, W) (frames, latents or images; any leading dims) and a
`data_range` (the span of valid values: 2 for pixels in [-1, 1], 255 for uint8 frames; for latents the
reference's max - min).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(reference: torch.Tensor, other: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; +inf when the two are identical."""
    if reference.shape != other.shape:
        raise ValueError(f"psnr: shapes differ {tuple(reference.shape)} vs {tuple(other.shape)}")
    mse = (reference.double() - other.double()).pow(2).mean().item()
    if mse == 0:
        return math.inf
    return 10 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(
    reference: torch.Tensor, other: torch.Tensor, data_range: float, window: int = 11, sigma: float = 1.5
) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian 11x11 window, sigma 1.5, K1=0.01, K2=0.03),
    computed per (H, W) plane over every leading index and averaged. Planes smaller than the window use a
    window the size of the smaller side."""
    if reference.shape != other.shape:
        raise ValueError(f"ssim: shapes differ {tuple(reference.shape)} vs {tuple(other.shape)}")
    if reference.dim() < 2:
        raise ValueError("ssim needs at least (H, W)")
    h, w = reference.shape[-2:]
    size = min(window, h, w)
    x = reference.double().reshape(-1, 1, h, w)
    y = other.double().reshape(-1, 1, h, w)
    kernel = _gaussian_window(size, sigma, x.device)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).mean())


def latent_fidelity(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """PSNR / SSIM of latents (B, C, T, H, W), with the reference's value span as the data range."""
    span = float(reference.max() - reference.min()) or 1.0
    return {"psnr": psnr(reference, other, span), "ssim": ssim(reference, other, span)}
