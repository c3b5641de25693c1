"""A folder of generated views and their cameras: what a multi-view generator hands to reconstruction.

Zero123++ writes its six views in this layout, and any other generator's views (SyncDreamer's 16,
a set of renders) can be put in it to be reconstructed the same way
(``multiview-images-guidance`` with ``views_dir``)::

    views/
      cameras.json        the cameras, one entry per view (below); written last
      view_00.png ...     one image per view: RGB, or RGBA whose alpha is the object's mask
      grid.png            optional: the generator's tiled output
      input.png           optional: the conditioning image

``cameras.json`` (angles in degrees, lift3d's world frame: +z up, a camera at elevation e,
azimuth a, distance r sits at r (cos e cos a, cos e sin a, sin e) and looks at the origin;
azimuth 0, +x, is the front, i.e. the input image's view)::

    {"convention": "lift3d",
     "background": [0.5, 0.5, 0.5],        optional: the views' background colour, for masks
     "views": [{"file": "view_00.png", "elevation": 20.0, "azimuth": 30.0, "distance": 4.0,
                "fovy": 30.0}, ...],
     "record": {...}}                      optional: how the views were made (for cache checks)

``fovy`` is the vertical field of view. An RGB view gets its mask from its background: a pixel
whose colour is within ``threshold`` of the background colour in every channel is background
(:func:`background_mask`). Generators that draw on a flat colour (Zero123++: mid grey; SyncDreamer:
white) are covered by that; a view with an alpha channel uses the alpha instead.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.config import ConfigError

CAMERAS_FILE = "cameras.json"
CAMERA_KEYS = ("elevation", "azimuth", "distance", "fovy")


@dataclass
class ViewSet:
    """Views and their cameras, as read from (or about to be written to) a views folder."""

    rgb: Float[Tensor, "N H W 3"]
    cameras: dict[str, Tensor]
    """``elevation``, ``azimuth``, ``distance``, ``fovy`` [N] (degrees)."""
    alpha: Optional[Float[Tensor, "N H W"]] = None
    """From RGBA files; None for RGB views (masks then come from the background)."""
    background: Optional[tuple[float, float, float]] = None
    record: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.rgb.shape[0])


def background_mask(rgb: Float[Tensor, "... 3"], background: Sequence[float], threshold: float
                    ) -> Float[Tensor, "..."]:
    """1 where a pixel differs from ``background`` by more than ``threshold`` in some channel, else 0."""
    bg = torch.as_tensor(list(background), dtype=rgb.dtype, device=rgb.device)
    return ((rgb - bg).abs().amax(-1) > threshold).to(rgb.dtype)


def _to_uint8(x: Tensor) -> np.ndarray:
    return (x.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


def write_views(folder: str | Path, views: Float[Tensor, "N 3 h w"], cameras: dict[str, Tensor], *,
                grid: Optional[Tensor] = None, input_image: Optional[Tensor] = None,
                background: Optional[Sequence[float]] = None, record: Optional[dict[str, Any]] = None) -> Path:
    """Write a views folder; ``cameras.json`` goes last, through a rename, so a folder that has it is complete."""
    import imageio.v3 as iio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(views.shape[0]):
        name = f"view_{i:02d}.png"
        iio.imwrite(folder / name, _to_uint8(views[i].permute(1, 2, 0)))
        entries.append({"file": name, **{k: float(cameras[k][i]) for k in CAMERA_KEYS}})
    if grid is not None:
        iio.imwrite(folder / "grid.png", _to_uint8(grid.permute(1, 2, 0)))
    if input_image is not None:
        iio.imwrite(folder / "input.png", _to_uint8(input_image.permute(1, 2, 0)))
    doc: dict[str, Any] = {"convention": "lift3d", "views": entries}
    if background is not None:
        doc["background"] = [float(v) for v in background]
    if record:
        doc["record"] = record
    tmp = folder / f".{CAMERAS_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, folder / CAMERAS_FILE)
    return folder


def read_record(folder: str | Path) -> Optional[dict[str, Any]]:
    """The ``record`` of a complete views folder, ``{}`` if it has none, None if the folder is incomplete."""
    p = Path(folder) / CAMERAS_FILE
    if not p.is_file():
        return None
    try:
        return dict(json.loads(p.read_text()).get("record") or {})
    except (json.JSONDecodeError, AttributeError):
        return None


def read_cameras(folder: str | Path, key: str = "views_dir") -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The view entries and the whole document of ``folder/cameras.json``, checked; ConfigError naming ``key``."""
    folder = Path(folder).expanduser()
    where = f"config key '{key}' = {folder}"
    if not folder.is_dir():
        raise ConfigError(f"{where}: no such folder; expected a views folder (cameras.json + view images, see "
                          "lift3d.priors.zero123pp.views)")
    p = folder / CAMERAS_FILE
    if not p.is_file():
        raise ConfigError(f"{where}: no {CAMERAS_FILE}; a views folder lists its images and their cameras there "
                          "(see lift3d.priors.zero123pp.views)")
    try:
        doc = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: {CAMERAS_FILE} is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("convention", "lift3d") != "lift3d":
        raise ConfigError(f"{where}: {CAMERAS_FILE} must be an object with \"convention\": \"lift3d\"")
    views = doc.get("views")
    if not isinstance(views, list) or not views:
        raise ConfigError(f"{where}: {CAMERAS_FILE} has no \"views\" list")
    for i, v in enumerate(views):
        bad = [k for k in ("file",) + CAMERA_KEYS if k not in v]
        if not isinstance(v, dict) or bad:
            raise ConfigError(f"{where}: {CAMERAS_FILE} view {i} lacks {', '.join(bad)}; each view needs file, "
                              f"{', '.join(CAMERA_KEYS)} (degrees; fovy is vertical)")
        if not (folder / v["file"]).is_file():
            raise ConfigError(f"{where}: view {i}'s image {v['file']} is not in the folder")
    bg = doc.get("background")
    if bg is not None and (not isinstance(bg, list) or len(bg) != 3):
        raise ConfigError(f"{where}: {CAMERAS_FILE}'s background must be 3 numbers in [0, 1], got {bg!r}")
    return views, doc


def cameras_of(entries: list[dict[str, Any]]) -> dict[str, Tensor]:
    return {k: torch.tensor([float(v[k]) for v in entries], dtype=torch.float32) for k in CAMERA_KEYS}


def read_views(folder: str | Path, key: str = "views_dir") -> ViewSet:
    """Read a views folder (images as float32 in [0, 1]); all views must have the same size."""
    import imageio.v3 as iio

    folder = Path(folder).expanduser()
    entries, doc = read_cameras(folder, key)
    rgbs, alphas = [], []
    for v in entries:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            a = np.asarray(iio.imread(folder / v["file"]))
        if a.ndim == 2:
            a = a[..., None]
        scale = 65535.0 if a.dtype == np.uint16 else 255.0 if a.dtype == np.uint8 else 1.0
        a = a.astype(np.float32) / scale
        c = a.shape[-1]
        if c not in (1, 2, 3, 4):
            raise ConfigError(f"config key '{key}' = {folder}: {v['file']} has {c} channels; expected RGB or RGBA")
        rgb = a[..., :3] if c >= 3 else np.repeat(a[..., :1], 3, -1)
        rgbs.append(torch.from_numpy(np.ascontiguousarray(rgb)))
        alphas.append(torch.from_numpy(np.ascontiguousarray(a[..., -1])) if c in (2, 4) else None)
    sizes = {tuple(r.shape[:2]) for r in rgbs}
    if len(sizes) != 1:
        raise ConfigError(f"config key '{key}' = {folder}: the views have different sizes {sorted(sizes)}")
    alpha = None
    if any(a is not None for a in alphas):
        if not all(a is not None for a in alphas):
            raise ConfigError(f"config key '{key}' = {folder}: some views have an alpha channel and some do not")
        alpha = torch.stack(alphas)
    bg = doc.get("background")
    return ViewSet(rgb=torch.stack(rgbs), cameras=cameras_of(entries), alpha=alpha,
                   background=tuple(float(x) for x in bg) if bg is not None else None,
                   record=dict(doc.get("record") or {}))


__all__ = ["ViewSet", "write_views", "read_views", "read_cameras", "read_record", "cameras_of", "background_mask",
           "CAMERAS_FILE", "CAMERA_KEYS"]
