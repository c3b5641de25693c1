"""Image and video output: saving images, validation image grids and turntable videos.

Everything here takes images laid out ``[H, W, C]`` with row 0 at the top (the layout of every
renderer output in lift3d), either float in [0, 1] (tensor or array) or ``uint8``, with C in
1 (gray), 3 (RGB) or 4 (RGBA). Parent folders are created, and files are written under a
temporary name in the same folder and then moved into place, so a reader never sees half a file.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

__all__ = ["to_uint8", "save_image", "image_grid", "save_image_grid", "write_video", "atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix); move it onto ``path`` on success.

    The temporary file lives in the same folder, so ``os.replace`` is a rename on one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_uint8(x: Any) -> np.ndarray:
    """An image (or any array) as ``uint8``.

    ``uint8`` passes through unchanged; bool maps to 0/255; floats are clipped to [0, 1] and
    rounded to the nearest of 256 levels. Other integer types must already lie in [0, 255].
    """
    a = _to_numpy(x)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"to_uint8: integer image values must lie in [0, 255], got [{a.min()}, {a.max()}]")
        return a.astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    return np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)


def _as_hwc_uint8(img: Any, what: str = "image") -> np.ndarray:
    a = to_uint8(img)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what} must be [H, W] or [H, W, C] with C in 1, 3, 4; got shape {tuple(a.shape)}")
    return a


def _expand_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """[H, W, c] uint8 -> [H, W, channels]: gray repeats into RGB, a missing alpha is opaque."""
    c = a.shape[-1]
    if c == channels:
        return a
    if c == 1:
        a = np.repeat(a, 3, axis=-1)
    if channels == 4 and a.shape[-1] == 3:
        a = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    if a.shape[-1] != channels:
        raise ValueError(f"cannot turn a {c}-channel image into {channels} channels")
    return a


def save_image(path: str | os.PathLike, img: Any) -> Path:
    """Write ``img`` ([H, W] or [H, W, C], C in 1/3/4; float in [0, 1] or uint8) to ``path``.

    The format follows the suffix (png, jpg, ...); one channel is saved as a gray image.
    """
    from PIL import Image

    a = _as_hwc_uint8(img)
    path = Path(path)
    if a.shape[-1] == 1:
        pil = Image.fromarray(np.ascontiguousarray(a[:, :, 0]), mode="L")
    else:
        pil = Image.fromarray(np.ascontiguousarray(a), mode="RGB" if a.shape[-1] == 3 else "RGBA")
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"save_image: unknown image suffix {path.suffix!r} in {path}; use .png or .jpg")
    if fmt == "JPEG" and pil.mode == "RGBA":
        pil = pil.convert("RGB")
    with atomic_path(path) as tmp:
        pil.save(tmp, format=fmt)
    return path


def image_grid(rows: Sequence[Sequence[Any]], gap: int = 0) -> np.ndarray:
    """Tile images into one ``uint8`` array [rows * H, cols * W, C].

    Each cell is [H, W] or [H, W, C] (C in 1, 3, 4; float in [0, 1] or uint8; ``None`` leaves
    the cell empty). Cells are placed top-left in slots of the largest height and width; short
    rows are padded with empty (black) cells. The grid is RGB, or RGBA when any cell has alpha
    (opaque cells get alpha 255); 1-channel cells are shown as gray. ``gap`` pixels of black
    separate the cells.
    """
    if not rows or not any(len(r) for r in rows):
        raise ValueError("image_grid needs at least one image")
    cells = [[None if im is None else _as_hwc_uint8(im, f"image_grid cell ({i}, {j})") for j, im in enumerate(r)]
             for i, r in enumerate(rows)]
    present = [c for r in cells for c in r if c is not None]
    if not present:
        raise ValueError("image_grid needs at least one image that is not None")
    channels = 4 if any(c.shape[-1] == 4 for c in present) else 3
    h = max(c.shape[0] for c in present)
    w = max(c.shape[1] for c in present)
    n_cols = max(len(r) for r in cells)
    out = np.zeros((len(cells) * h + gap * (len(cells) - 1), n_cols * w + gap * (n_cols - 1), channels), np.uint8)
    for i, r in enumerate(cells):
        for j, c in enumerate(r):
            if c is None:
                continue
            y, x = i * (h + gap), j * (w + gap)
            out[y : y + c.shape[0], x : x + c.shape[1]] = _expand_channels(c, channels)
    return out


def save_image_grid(path: str | os.PathLike, rows: Sequence[Sequence[Any]], gap: int = 0) -> Path:
    """:func:`image_grid` written to ``path`` (e.g. validation rows of rgb, normal, opacity)."""
    return save_image(path, image_grid(rows, gap=gap))


def write_video(path: str | os.PathLike, frames: Sequence[Any], fps: int = 30) -> Path:
    """Encode ``frames`` (each [H, W, C], float in [0, 1] or uint8) as an H.264 mp4.

    Uses imageio's ffmpeg plugin with libx264 and yuv420p, which players expect; yuv420p needs
    even sizes, so odd frames are padded by one black row/column at the bottom/right (never
    resized). Gray frames become RGB; alpha is dropped.
    """
    import imageio.v2 as iio

    if len(frames) == 0:
        raise ValueError("write_video needs at least one frame")
    first = _as_hwc_uint8(frames[0], "video frame 0")
    h, w = first.shape[:2]
    h2, w2 = h + h % 2, w + w % 2
    path = Path(path)
    with atomic_path(path) as tmp:
        # macro_block_size=1: imageio would otherwise resize to multiples of 16 behind our back.
        writer = iio.get_writer(
            tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error",
        )
        try:
            for k, f in enumerate(frames):
                a = _as_hwc_uint8(f, f"video frame {k}")
                if a.shape[:2] != (h, w):
                    raise ValueError(f"video frame {k} is {a.shape[:2]}, but frame 0 is {(h, w)}; all frames must match")
                a = _expand_channels(a, 3) if a.shape[-1] != 4 else a[:, :, :3]
                if (h2, w2) != (h, w):
                    a = np.pad(a, ((0, h2 - h), (0, w2 - w), (0, 0)))
                writer.append_data(np.ascontiguousarray(a))
        finally:
            writer.close()
    return path
