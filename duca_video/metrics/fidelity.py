"""Fidelity of a cached result to the uncached one: PSNR, SSIM and (when its weights are here) LPIPS.

`psnr` and `ssim` take tensors whose last two dimensions are (H, W) (frames, latents or images; any leading dims)
and a `data_range` (the span of valid values: 2 for pixels in [-1, 1], 255 for uint8 frames; for latents the
reference's max - min). `video_fidelity` compares two decoded videos frame chunk by frame chunk, so a 480p or
720p video never needs more than a few frames' worth of float64 work memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["LPIPS_NETS", "latent_fidelity", "load_lpips", "psnr", "psnr_from_mse", "ssim", "video_fidelity"]


def psnr(reference: torch.Tensor, other: torch.Tensor, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB; +inf when the two are identical."""
    if reference.shape != other.shape:
        raise ValueError(f"psnr: shapes differ {tuple(reference.shape)} vs {tuple(other.shape)}")
    return psnr_from_mse((reference.double() - other.double()).pow(2).mean().item(), data_range)


def psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


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


# ---------------------------------------------------------------------------------------------------- videos
# lpips' network name -> the torchvision backbone it loads, saved in torch hub's checkpoint folder as NAME-HASH.pth.
LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}


def load_lpips(net: str = "alex", device: str | torch.device = "cpu") -> tuple[Callable | None, str | None]:
    """(lpips model, None), or (None, why not). LPIPS (Zhang et al. 2018, the `lpips` package) needs torchvision
    and an ImageNet backbone; nothing is downloaded here, so without a local backbone LPIPS is reported as
    unavailable instead of being fetched."""
    if net not in LPIPS_NETS:
        raise ValueError(f"lpips net {net!r} is not allowed; allowed: {', '.join(LPIPS_NETS)}")
    try:
        import lpips
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision failing inside it
        return None, f"the lpips package cannot be imported ({type(exc).__name__}: {exc}); it needs torchvision"
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    backbone = LPIPS_NETS[net]
    if not any(checkpoints.glob(f"{backbone}-*.pth")):
        return None, f"no local {backbone} backbone weights in {checkpoints} (lpips would download them)"
    try:
        model = lpips.LPIPS(net=net, verbose=False).eval().to(device)
    except Exception as exc:  # noqa: BLE001 - any failure leaves LPIPS unavailable, with the reason
        return None, f"lpips.LPIPS(net={net!r}) failed: {type(exc).__name__}: {exc}"
    return model, None


@torch.no_grad()
def video_fidelity(
    reference: torch.Tensor, other: torch.Tensor, lpips_model: Callable | None = None, chunk: int = 4
) -> dict[str, float | None]:
    """PSNR, SSIM and LPIPS of two decoded videos, (T, H, W, 3) uint8 each (duca_video.metrics.video.read_video).

    PSNR: one MSE over every pixel of the video (data range 255), +inf when identical. SSIM: mean over frames
    and RGB planes. LPIPS: mean over frames of the model's distance on [-1, 1] inputs, None without a model."""
    if reference.shape != other.shape:
        raise ValueError(f"videos differ in shape: {tuple(reference.shape)} vs {tuple(other.shape)} (T, H, W, 3)")
    if reference.dtype != torch.uint8 or other.dtype != torch.uint8 or reference.dim() != 4:
        raise ValueError(f"expected (T, H, W, 3) uint8 videos, got {tuple(reference.shape)} {reference.dtype}")
    frames = reference.shape[0]
    squared, ssim_sum, lpips_sum = 0.0, 0.0, 0.0
    device = next(lpips_model.parameters()).device if isinstance(lpips_model, torch.nn.Module) else "cpu"
    for start in range(0, frames, chunk):
        a = reference[start : start + chunk].permute(0, 3, 1, 2)  # (t, 3, H, W)
        b = other[start : start + chunk].permute(0, 3, 1, 2)
        squared += (a.double() - b.double()).pow(2).sum().item()
        ssim_sum += ssim(a, b, 255.0) * a.shape[0]  # every frame has the same number of planes and windows
        if lpips_model is not None:
            x, y = (t.to(device=device, dtype=torch.float32) / 127.5 - 1 for t in (a, b))
            lpips_sum += float(lpips_model(x, y).sum())
    return {
        "psnr": psnr_from_mse(squared / reference.numel(), 255.0),
        "ssim": ssim_sum / frames,
        "lpips": lpips_sum / frames if lpips_model is not None else None,
    }
