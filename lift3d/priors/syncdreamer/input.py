"""SyncDreamer's input image: the object recentred and scaled, pasted over white, at the model's size.

The authors' ``prepare_inputs`` crops an RGBA image to its object's bounding box, scales it so its
longer side is ``crop_size`` pixels (200 of 256 is their usual), pastes it in the middle of a
256-pixel canvas and composites the alpha over white. Here the same framing is
``foreground_ratio = crop_size / 256`` (0.78125), through Zero123++'s recentring helper.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from lift3d.priors.zero123pp.input import read_image, recenter

#: The views' and the input's background.
BACKGROUND = (1.0, 1.0, 1.0)
DEFAULT_RATIO = 200.0 / 256.0


def prepare_input(rgb: Tensor, alpha: Optional[Tensor], *, size: int = 256,
                  foreground_ratio: Optional[float] = DEFAULT_RATIO) -> Tensor:
    """[1, 3, size, size] in [0, 1]: recentred when there is an alpha and ``foreground_ratio`` is set,
    composited over white, resized (bicubic, antialiased)."""
    if alpha is not None and foreground_ratio:
        rgb, alpha = recenter(rgb, alpha, foreground_ratio)
    x = rgb.float()
    if alpha is not None:
        a = alpha.float()[..., None]
        x = x * a + (1.0 - a)
    x = x.clamp(0, 1).permute(2, 0, 1)[None].contiguous()
    if tuple(x.shape[-2:]) != (size, size):
        H, W = x.shape[-2:]
        if H != W:  # pad to a square with white, as the original's add_margin
            s = max(H, W)
            x = F.pad(x, ((s - W) // 2, s - W - (s - W) // 2, (s - H) // 2, s - H - (s - H) // 2), value=1.0)
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x


__all__ = ["prepare_input", "read_image", "BACKGROUND", "DEFAULT_RATIO"]
