"""Input images for image-to-3D in the toy world: one catalogue object, rendered exactly, as RGBA.

The image-to-3D recipes (Zero123, DreamGaussian's image mode, Magic123) start from a single
picture of an object; in the toy world that picture is an exact render of a catalogue object,
shaded the way the embedded prior's training images are (Lambertian, ambient 0.35 + diffuse 0.65,
see ``data.py``), with alpha the pixel coverage. Colour is stored straight (not premultiplied), as
PNG expects, so compositing it over black gives back the renderer's image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from lift3d.priors.toyworld.data import AMBIENT, DIFFUSE
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import get_object
from lift3d.utils.cameras import make_cameras

LIGHTS = ("above", "headlight")


def light_direction(cameras: dict, light: str | Sequence[float]) -> Tensor:
    """[B, 3] unit directions towards the light for a light spec.

    ``"above"``: halfway between the direction to the camera and the camera's up axis, so 45
    degrees above the view direction, inside the camera's upper hemisphere where the prior's
    training lights are; ``"headlight"``: at the camera; 3 numbers: a fixed world direction.
    """
    to_cam = torch.nn.functional.normalize(cameras["camera_positions"], dim=-1)
    if isinstance(light, str):
        if light == "above":
            return torch.nn.functional.normalize(to_cam + cameras["c2w"][:, :3, 1], dim=-1)
        if light == "headlight":
            return to_cam
        raise ValueError(f"light {light!r} is not one of {', '.join(LIGHTS)} or 3 numbers (a world direction)")
    d = torch.as_tensor(light, dtype=to_cam.dtype).reshape(-1)
    if d.numel() != 3 or float(d.norm()) == 0.0:
        raise ValueError(f"light must be one of {', '.join(LIGHTS)} or a nonzero 3-vector, got {light!r}")
    return torch.nn.functional.normalize(d, dim=0).expand_as(to_cam)


def render_rgba(
    prompt: str,
    elevation_deg: float = 0.0,
    azimuth_deg: float = 0.0,
    distance: float = 2.0,
    fovy_deg: float = 40.0,
    resolution: int = 256,
    supersample: int = 2,
    light: str | Sequence[float] = "above",
) -> np.ndarray:
    """A catalogue object rendered as an RGBA image.

    Args:
        prompt: a catalogue prompt ("a red cube"); spelling as ``vocab.parse_prompt`` accepts.
        elevation_deg, azimuth_deg, distance, fovy_deg: the camera (world conventions of lift3d:
            +z up, azimuth 0 is the front, +x).
        resolution: image side in pixels (square).
        supersample: rays per pixel side; alpha is the covered fraction of each pixel.
        light: "above" (default), "headlight", or a world direction towards the light.
    Returns:
        uint8 [resolution, resolution, 4]: straight sRGB colour (0 where nothing is covered) and
        alpha = coverage.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    obj = get_object(prompt)
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    cams = make_cameras(t(elevation_deg), t(azimuth_deg), t(distance), t(fovy_deg), resolution, resolution)
    out = render(obj, cams, light_direction(cams, light), ambient=AMBIENT, diffuse=DIFFUSE, background=0.0,
                 supersample=supersample)
    alpha = out["mask"][0]  # [H, W, 1]
    # Over a black background the rendered colour is premultiplied by coverage; PNG stores it straight.
    rgb = torch.where(alpha > 0, out["rgb"][0] / alpha.clamp(min=1e-8), torch.zeros_like(out["rgb"][0]))
    rgba = torch.cat([rgb.clamp(0.0, 1.0), alpha], dim=-1)
    return (rgba * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def save_rgba(path: str | os.PathLike, prompt: str, **kwargs) -> Path:
    """:func:`render_rgba` (same keyword arguments) written to ``path`` (PNG keeps the alpha)."""
    from lift3d.utils.io import save_image

    return save_image(path, render_rgba(prompt, **kwargs))


__all__ = ["render_rgba", "save_rgba", "light_direction", "LIGHTS"]
