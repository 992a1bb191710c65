"""torchvision.utils.save_image for one (C, H, W) image in `value_range`, as Open-Sora saves 1-frame samples."""

import torch
from PIL import Image


def save_image(tensor, fp, normalize=False, value_range=None, **_grid):
    x = torch.stack(list(tensor)) if isinstance(tensor, (list, tuple)) else tensor
    if x.dim() == 4:
        if x.shape[0] != 1:
            raise NotImplementedError("save_image stand-in: one image only (no grids)")
        x = x[0]
    x = x.detach().float().cpu()
    if normalize:
        low, high = value_range if value_range is not None else (float(x.min()), float(x.max()))
        x = x.clamp(low, high).sub(low).div(max(high - low, 1e-5))
    array = x.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(array).save(fp)
