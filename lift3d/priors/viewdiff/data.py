"""The multi-view dataset ViewDiff trains on: one folder per object, posed images and their cameras.

Layout::

    <root>/
      <object>/                  any folder name; one object (or scene) per folder
        cameras.json
        images/000.png           RGB or RGBA (alpha is composited over white), any size
        images/001.png
        ...

``cameras.json``::

    {
      "prompt": "a teddy bear sitting on a table",       # optional caption ("" when absent)
      "frames": [
        {"file": "images/000.png",
         "c2w": [[r00, r01, r02, x], [r10, r11, r12, y], [r20, r21, r22, z], [0, 0, 0, 1]],
         "fovy": 40.0},                                  # vertical field of view in degrees, or:
        {"file": "images/001.png",
         "c2w": [...],
         "intrinsics": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]},   # normalised by the image size
        ...
      ]
    }

Conventions (lift3d's, :mod:`lift3d.utils.cameras`): the world is right-handed with +z up and the
object centred at the origin, inside the ViewDiff model's box ``[-bound, bound]^3`` (bound 1 by
default); ``c2w`` is camera-to-world with OpenGL camera axes (columns: right, up, back, position;
the camera looks along its -z axis). ``intrinsics`` are in pixels divided by the image width
(``fx``, ``cx``) and height (``fy``, ``cy``), with v growing down the image and (0.5, 0.5) the image
centre; a frame with ``fovy`` gets a centred camera with square pixels. Normalised intrinsics do not
change when an image is resized, so every image is resized (bilinearly, without cropping) to the
training resolution, a square.

Converting CO3D (PyTorch3D cameras, ``X_cam = X_world R + T`` with camera axes left, up, forward):
the camera centre is ``-R T`` (T as a column), the camera-to-world rotation is R with its first and
third columns negated (left -> right, forward -> back); focal length and principal point from
CO3D's NDC convention go to pixels, then are divided by the image width and height. Then move and
scale the world so the object's centre (e.g. the mean of the cameras' look-at points or of the
point cloud) is at the origin and the object fits the box, and rotate it so the average camera up
vector is +z. Each sequence becomes one ``<object>`` folder, its category (or a caption) the prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from lift3d.priors.viewdiff.cameras import intrinsics_from_fovy

CAMERAS_FILE = "cameras.json"


@dataclass
class ObjectViews:
    """One object of the dataset: its caption, image files and cameras."""

    name: str
    prompt: str
    files: list[Path]
    c2w: Tensor
    """[V, 4, 4] camera-to-world."""
    intrinsics: Tensor
    """[V, 3, 3] normalised intrinsics."""

    def __len__(self) -> int:
        return len(self.files)


def _matrix(value: Any, shape: tuple[int, int], where: str) -> Tensor:
    try:
        m = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError):
        m = None
    if m is None or tuple(m.shape) != shape or not torch.isfinite(m).all():
        raise ValueError(f"{where}: expected a {shape[0]}x{shape[1]} matrix of numbers (a list of rows), got {value!r}")
    return m


def read_object(folder: str | Path) -> ObjectViews:
    """Read ``folder/cameras.json`` (see the module docstring); errors name the file and the frame."""
    folder = Path(folder)
    path = folder / CAMERAS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} has no {CAMERAS_FILE} (see lift3d.priors.viewdiff.data for the layout)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    frames = data.get("frames") if isinstance(data, dict) else None
    if not isinstance(frames, list) or not frames:
        raise ValueError(f"{path}: expected an object with a non-empty list 'frames'")
    prompt = data.get("prompt", "")
    if not isinstance(prompt, str):
        raise ValueError(f"{path}: 'prompt' must be a string, got {prompt!r}")
    files, c2ws, Ks = [], [], []
    for i, fr in enumerate(frames):
        where = f"{path} frames[{i}]"
        if not isinstance(fr, dict) or not isinstance(fr.get("file"), str):
            raise ValueError(f"{where}: each frame needs 'file' (the image, relative to {folder})")
        f = folder / fr["file"]
        if not f.is_file():
            raise ValueError(f"{where}: the image {f} does not exist")
        c2ws.append(_matrix(fr.get("c2w"), (4, 4), f"{where}.c2w"))
        if "intrinsics" in fr:
            Ks.append(_matrix(fr["intrinsics"], (3, 3), f"{where}.intrinsics"))
        elif isinstance(fr.get("fovy"), (int, float)) and 0 < fr["fovy"] < 180:
            w, h = _image_size(f)
            Ks.append(intrinsics_from_fovy(torch.tensor([float(fr["fovy"])]), aspect=w / h)[0])
        else:
            raise ValueError(f"{where}: give 'fovy' (degrees, in (0, 180)) or 'intrinsics' (normalised 3x3)")
        files.append(f)
    return ObjectViews(folder.name, prompt, files, torch.stack(c2ws), torch.stack(Ks))


def scan_dataset(root: str | Path, min_views: int = 1) -> list[ObjectViews]:
    """Every object folder under ``root`` (sorted by name) with at least ``min_views`` frames."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"the dataset root {root} is not a folder (see lift3d.priors.viewdiff.data for the layout)")
    objects = [read_object(d) for d in sorted(root.iterdir()) if d.is_dir() and (d / CAMERAS_FILE).is_file()]
    usable = [o for o in objects if len(o) >= min_views]
    if not usable:
        raise ValueError(f"{root} holds no object folder with {CAMERAS_FILE} and at least {min_views} views "
                         f"({len(objects)} object folders found); see lift3d.priors.viewdiff.data for the layout")
    return usable


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def load_image(path: str | Path, resolution: int) -> Tensor:
    """An image as ``[3, resolution, resolution]`` float in [0, 1]; RGBA is composited over white."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        a = np.asarray(im, dtype=np.float32) / 255.0
    rgb = a[..., :3] * a[..., 3:] + (1 - a[..., 3:])
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    if x.shape[-2:] != (resolution, resolution):
        x = torch.nn.functional.interpolate(x[None], (resolution, resolution), mode="bilinear", align_corners=False,
                                            antialias=True)[0]
    return x.clamp(0, 1)


def write_object(folder: str | Path, images: Tensor, c2w: Tensor, fovy: Optional[Tensor] = None,
                 intrinsics: Optional[Tensor] = None, prompt: str = "") -> Path:
    """Write ``images`` ``[V, H, W, 3]`` (in [0, 1]) and their cameras in the dataset layout; returns the
    ``cameras.json`` path. Give ``fovy`` ``[V]`` (degrees) or normalised ``intrinsics`` ``[V, 3, 3]``."""
    from lift3d.utils.io import atomic_path, save_image

    folder = Path(folder)
    frames = []
    for i in range(images.shape[0]):
        name = f"images/{i:03d}.png"
        save_image(folder / name, images[i])
        frame: dict[str, Any] = {"file": name, "c2w": c2w[i].tolist()}
        if intrinsics is not None:
            frame["intrinsics"] = intrinsics[i].tolist()
        elif fovy is not None:
            frame["fovy"] = float(fovy[i])
        else:
            raise ValueError("write_object needs fovy or intrinsics")
        frames.append(frame)
    path = folder / CAMERAS_FILE
    with atomic_path(path) as tmp:
        # one frame per line: readable, and diffs stay small
        rows = ",\n".join("    " + json.dumps(fr) for fr in frames)
        tmp.write_text(f'{{\n  "prompt": {json.dumps(prompt)},\n  "frames": [\n{rows}\n  ]\n}}\n')
    return path


__all__ = ["CAMERAS_FILE", "ObjectViews", "read_object", "scan_dataset", "load_image", "write_object"]
