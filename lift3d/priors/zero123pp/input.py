"""The input image of Zero123++: read, optionally recentred, pasted over grey, as the model expects."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError
from lift3d.priors.zero123pp.model import INPUT_BACKGROUND, composite_input


def read_image(path: str | Path, key: str = "image") -> tuple[Tensor, Optional[Tensor]]:
    """(rgb [H, W, 3], alpha [H, W] or None) in [0, 1] from an RGB(A) or grey(+alpha) file."""
    import imageio.v3 as iio

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config key '{key}': no image file {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            a = np.asarray(iio.imread(p))
    except Exception as exc:  # imageio raises many kinds for unreadable files
        raise ConfigError(f"config key '{key}': cannot read {p} as an image ({type(exc).__name__})") from None
    if a.ndim == 2:
        a = a[..., None]
    scale = 65535.0 if a.dtype == np.uint16 else 255.0 if a.dtype == np.uint8 else 1.0
    a = a.astype(np.float32) / scale
    c = a.shape[-1]
    if a.ndim != 3 or c not in (1, 2, 3, 4):
        raise ConfigError(f"config key '{key}': {p} has shape {a.shape}; expected an RGB or RGBA image")
    rgb = a[..., :3] if c >= 3 else np.repeat(a[..., :1], 3, -1)
    alpha = a[..., -1] if c in (2, 4) else None
    return torch.from_numpy(np.ascontiguousarray(rgb)), (torch.from_numpy(np.ascontiguousarray(alpha))
                                                         if alpha is not None else None)


def recenter(rgb: Tensor, alpha: Tensor, ratio: float = 0.85) -> tuple[Tensor, Tensor]:
    """A square image with the object's bounding box centred, its longer side ``ratio`` of the side
    (the framing single-image-to-3D pipelines give Zero123++, e.g. InstantMesh's 0.85)."""
    fg = alpha > (1.0 / 255.0)
    if not fg.any():
        raise ConfigError("the input image's alpha channel is empty: no object to generate views of")
    rows, cols = fg.any(1).nonzero().flatten(), fg.any(0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    x = torch.cat([rgb * alpha[..., None], alpha[..., None]], -1)[top:bottom, left:right].permute(2, 0, 1)
    bh, bw = x.shape[-2:]
    side = max(1, round(max(bh, bw) / ratio))
    out = torch.zeros(4, side, side)
    y0, x0 = (side - bh) // 2, (side - bw) // 2
    out[:, y0:y0 + bh, x0:x0 + bw] = x
    a = out[3]
    return (out[:3] / a.clamp_min(1e-6)).clamp(0, 1).permute(1, 2, 0) * (a[..., None] > 0), a


def prepare_input(rgb: Tensor, alpha: Optional[Tensor], *, recenter_ratio: Optional[float] = 0.85,
                  size: Optional[int] = None, background: float = INPUT_BACKGROUND) -> Tensor:
    """[1, 3, S, S] in [0, 1]: recentred when there is an alpha and ``recenter_ratio`` is set, pasted
    over grey, and resized to ``size`` (none: kept)."""
    if alpha is not None and recenter_ratio:
        rgb, alpha = recenter(rgb, alpha, recenter_ratio)
    x = composite_input(rgb, alpha, background)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    return x


__all__ = ["read_image", "recenter", "prepare_input"]
