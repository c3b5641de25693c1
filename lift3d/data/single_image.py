"""One input image seen from a known camera, plus random training views: the data of image-to-3D.

Zero123 (Liu et al. 2023), DreamGaussian's image mode (Tang et al. 2023) and Magic123 (Qian et al.
2023) fit a 3D asset so that it reproduces an input image from a reference camera while a prior
judges random other views. This datamodule yields exactly the batches of
``random-camera-datamodule`` for a step (same draws, stage overrides and view groups) and adds
``batch["ref"]``: the reference camera, built by ``make_cameras``, with the image and its mask.

The image is an RGBA file (alpha is the mask) or an RGB file with a separate mask file; with
``remove_background``, rembg (an optional extra, ``pip install lift3d[rembg]``) makes the mask of an
RGB photo, as DreamGaussian does for an input without alpha. Like
DreamGaussian's preprocessing it is, by default, cropped to the mask's bounding box and pasted
centred so that the box's longer side covers ``foreground_ratio`` of the image; an input whose
camera is known exactly (a render) should keep its pixels with ``recenter: false``. Resizing works
on premultiplied colour, so the composite over ``background_color`` is what a renderer would
produce at the lower resolution. Everything is checked and prepared at construction; a reference
resolution that changes with the step (a schedule, a stage override) is prepared once per
resolution, on first use.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import C, ConfigError, Provenance, ScheduledInt
from lift3d.data.random_cameras import RandomCameraConfig, RandomCameraDataModule
from lift3d.registry import register
from lift3d.utils.cameras import make_cameras

#: Coverage above this counts as foreground (the bounding box, the empty-mask check). It sits at
#: one 8-bit level so that the faint noise of a compressed mask does not stretch the box.
FOREGROUND_EPS = 1.0 / 255.0

_VALID_IMAGE = (
    "an RGBA image (4 channels; alpha is the mask) or gray+alpha (2), or an RGB (3) or gray (1) image "
    "together with a mask file in '{key}.mask_path'; 8- or 16-bit, in a format imageio reads (PNG, ...)"
)

_VALID_MASK = (
    "a mask image of the input's size: gray (1 channel; an RGB mask is averaged, an RGBA or gray+alpha "
    "mask gives its alpha), 8- or 16-bit, in a format imageio reads (PNG, ...)"
)


@dataclass
class SingleImageConfig(RandomCameraConfig):
    image_path: Optional[str] = None
    """The input image (recipes set it from the command line: ``image_path: ${image}``). RGBA, or
    RGB with ``mask_path``; 8- or 16-bit."""
    mask_path: Optional[str] = None
    """A separate mask for ``image_path``, same size (gray; an RGB mask is averaged, an RGBA or
    gray+alpha mask gives its alpha). When set, the image's own alpha, if any, is ignored."""
    remove_background: Union[bool, Literal["auto"]] = False
    """Make the mask with rembg (U^2-Net salient-object segmentation; ``pip install lift3d[rembg]``)
    instead of reading it. ``false``: never (an RGB image then needs ``mask_path``); ``auto``: only
    when the input brings no mask (no ``mask_path``, and no alpha channel or one opaque everywhere);
    ``true``: always, replacing the image's own alpha (with ``mask_path`` it is an error: two masks).
    Only rembg's mask is used; the colour stays the file's. rembg fetches its model (about 170 MB)
    into ``~/.u2net`` on first use (``U2NET_HOME`` moves it)."""
    ref_elevation_deg: float = 0.0
    """Elevation of the reference camera (Zero123 and DreamGaussian assume 0)."""
    ref_azimuth_deg: float = 0.0
    """Azimuth of the reference camera; 0 is the front (+x)."""
    ref_camera_distance: float = 2.0
    """Distance of the reference camera from the origin."""
    ref_fovy_deg: float = 40.0
    """Vertical field of view of the reference camera."""
    ref_height: Optional[ScheduledInt] = None
    """Height of the reference image in pixels (may be a schedule); unset: follows ``height``."""
    ref_width: Optional[ScheduledInt] = None
    """Width of the reference image in pixels (may be a schedule); unset: follows ``width``."""
    recenter: bool = True
    """Crop to the mask's bounding box and paste it centred, its longer side ``foreground_ratio``
    of the image (DreamGaussian's preprocessing). Turn off for inputs whose camera is known exactly."""
    foreground_ratio: float = 0.8
    """With ``recenter``: the fraction of the image the object's longer side covers, in (0, 1]."""
    background_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The colour the reference RGB is composited over, in [0, 1]."""
    ref_shading: Optional[Literal["diffuse", "albedo", "textureless"]] = "diffuse"
    """The shading mode the reference view is rendered with (passed to the material as ``shading``):
    the input image is a shaded photo, so DreamFusion's random albedo and textureless passes must not
    reach the reference loss. Null lets the material choose as for random views. Its light is at the
    reference camera."""


# ---------------------------------------------------------------------------------------------
# Loading


def _read_image(path: str, key: str, valid: str) -> np.ndarray:
    """The pixels of ``path`` as [H, W, C]; a ConfigError naming ``key``, the path and ``valid`` otherwise."""
    import imageio.v3 as iio

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"config key '{key}': file {p} does not exist; expected {valid}")
    if not p.is_file():
        raise ConfigError(f"config key '{key}': {p} is not a file; expected {valid}")
    try:
        with warnings.catch_warnings():
            # On a file it cannot place, imageio tries its legacy plugins, which warn about themselves.
            warnings.simplefilter("ignore", DeprecationWarning)
            a = np.asarray(iio.imread(p))
    except Exception as exc:  # imageio raises many types for unreadable or unknown files
        # imageio's messages run to several lines of plugin advice; the first line says what failed.
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"config key '{key}': cannot read {p} as an image ({type(exc).__name__}: {reason}); "
                          f"expected {valid}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ConfigError(f"config key '{key}': {p} has pixel array shape {tuple(a.shape)}, not one still image "
                          f"[H, W, C]; expected {valid}")
    return a


def _to_unit(a: np.ndarray, key: str, path: str) -> np.ndarray:
    """Integer or float pixels as float32 in [0, 1]."""
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if a.dtype == np.uint16:
        return a.astype(np.float32) / 65535.0
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if np.issubdtype(a.dtype, np.floating):
        return np.clip(np.nan_to_num(a.astype(np.float32)), 0.0, 1.0)
    raise ConfigError(f"config key '{key}': {path} has {a.dtype} samples; expected 8- or 16-bit "
                      "unsigned integers (or floats in [0, 1])")


def _rembg_mask(rgb: np.ndarray, image_path: str, key: str, why: str) -> np.ndarray:
    """The foreground mask [H, W] in [0, 1] that rembg finds in ``rgb`` [H, W, 3] (float in [0, 1]).

    ``why`` says why the mask is being made, for the error when rembg is not installed."""
    rkey = f"{key}.remove_background"
    try:
        import rembg
    except ImportError as exc:  # absent, or present without its onnxruntime
        raise ConfigError(f"config key '{rkey}': {why}, so the background is to be removed with rembg, which does "
                          f"not import here ({exc}): pip install lift3d[rembg] (or pip install \"rembg[cpu]\"); or "
                          f"give the mask yourself (an RGBA image, or '{key}.mask_path') and set {rkey}: false") from None
    pixels = np.ascontiguousarray(np.round(rgb * 255.0).astype(np.uint8))
    try:
        out = np.asarray(rembg.remove(pixels))
    except Exception as exc:  # rembg's own failures (its model download, onnxruntime) vary in type
        reason = (str(exc).strip().splitlines() or [""])[0]
        raise ConfigError(f"config key '{rkey}': rembg failed on {image_path} ({type(exc).__name__}: {reason}); "
                          f"give the mask yourself (an RGBA image, or '{key}.mask_path') and set {rkey}: false") from None
    h, w = rgb.shape[:2]
    if out.ndim == 3 and out.shape[-1] in (2, 4):
        alpha = out[..., -1]  # a cut-out: its alpha is the mask
    elif out.ndim == 3 and out.shape[-1] == 1:
        alpha = out[..., 0]
    elif out.ndim == 2:
        alpha = out  # a mask alone
    else:
        raise ConfigError(f"config key '{rkey}': rembg returned pixels of shape {tuple(out.shape)} for {image_path}; "
                          "expected an RGBA cut-out or a gray mask")
    if alpha.shape[:2] != (h, w):
        raise ConfigError(f"config key '{rkey}': rembg returned a {alpha.shape[0]}x{alpha.shape[1]} (HxW) mask for "
                          f"{image_path}, which is {h}x{w}")
    return _to_unit(alpha, rkey, image_path)


def load_image_and_mask(image_path: str, mask_path: str | None = None, key: str = "data",
                        remove_background: bool | str = False) -> tuple[Tensor, Tensor]:
    """Read an input image and its mask.

    Args:
        image_path: RGBA / gray+alpha, or RGB / gray when ``mask_path`` is given or the mask is made.
        mask_path: optional separate mask of the same size.
        key: config path of the datamodule's config, for error messages (``data``).
        remove_background: make the mask with rembg: ``True`` always, ``"auto"`` when the input brings
            none (no ``mask_path``; no alpha, or one opaque everywhere), ``False`` never.
    Returns:
        rgb [H, W, 3] float32 in [0, 1] (straight, not premultiplied), alpha [H, W] float32 in [0, 1].
    Raises:
        ConfigError naming the path and the config key, for a missing or unreadable file, a wrong
        channel count, mismatched sizes, a mask with no foreground, or a mask to make without rembg.
    """
    ikey, mkey, rkey = f"{key}.image_path", f"{key}.mask_path", f"{key}.remove_background"
    if not (isinstance(remove_background, bool) or remove_background == "auto"):
        raise ConfigError(f"config key '{rkey}': {remove_background!r} is not one of false, true, auto")
    if remove_background is True and mask_path is not None:
        raise ConfigError(f"config key '{rkey}' is true, which makes the mask with rembg, but '{mkey}' gives one "
                          f"({mask_path}); keep one of them (remove_background: auto uses the file's mask)")
    valid = _VALID_IMAGE.format(key=key)
    img = _to_unit(_read_image(image_path, ikey, valid), ikey, image_path)
    c = img.shape[-1]
    if c not in (1, 2, 3, 4):
        raise ConfigError(f"config key '{ikey}': {image_path} has {c} channels; expected {valid}")
    rgb = img[..., :3] if c >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    has_alpha = c in (2, 4)
    # An alpha channel opaque everywhere (a photo saved as RGBA) carries no mask.
    opaque = has_alpha and bool((img[..., -1] >= 1.0 - FOREGROUND_EPS).all())
    made_by_rembg = remove_background is True or (
        remove_background == "auto" and mask_path is None and (not has_alpha or opaque))
    if made_by_rembg:
        why = (f"it is true for {image_path}" if remove_background is True else
               f"it is auto and {image_path} has " + ("an alpha channel opaque everywhere" if has_alpha else
                                                      f"{c} channels and no alpha") + f" and '{mkey}' is not set")
        alpha = _rembg_mask(rgb, image_path, key, why)
    elif mask_path is not None:
        m = _to_unit(_read_image(mask_path, mkey, _VALID_MASK), mkey, mask_path)
        mc = m.shape[-1]
        if mc == 1:
            alpha = m[..., 0]
        elif mc in (2, 4):
            alpha = m[..., -1]
        elif mc == 3:
            alpha = m.mean(-1)
        else:
            raise ConfigError(f"config key '{mkey}': mask {mask_path} has {mc} channels; expected {_VALID_MASK}")
        if m.shape[:2] != img.shape[:2]:
            raise ConfigError(f"config key '{mkey}': mask {mask_path} is {m.shape[0]}x{m.shape[1]} (HxW) but image "
                              f"{image_path} is {img.shape[0]}x{img.shape[1]}; they must be the same size")
        source = f"mask {mask_path}"
    elif c in (2, 4):
        alpha = img[..., -1]
        source = f"the alpha channel of {image_path}"
    else:
        raise ConfigError(f"config key '{ikey}': {image_path} has {c} channels and no alpha, and '{mkey}' is not "
                          f"set, so there is no mask; expected {valid}; or set {rkey}: auto to make the mask with "
                          "rembg (pip install lift3d[rembg])")
    if not (alpha > FOREGROUND_EPS).any():
        if made_by_rembg:
            raise ConfigError(f"config key '{rkey}': rembg found no object in {image_path} (its mask is empty); "
                              f"give the mask yourself (an RGBA image, or '{mkey}') and set {rkey}: false")
        raise ConfigError(f"config key '{mkey if mask_path is not None else ikey}': {source} is empty (no pixel "
                          f"above {FOREGROUND_EPS:.4f}), so there is no object to fit; expected the object opaque "
                          "(alpha or mask near 1) on a transparent (0) background")
    return torch.from_numpy(np.ascontiguousarray(rgb)), torch.from_numpy(np.ascontiguousarray(alpha))


# ---------------------------------------------------------------------------------------------
# Preparing the reference image


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """[C, h, w] -> [C, height, width], antialiased when shrinking."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x[None], size=(height, width), mode="bilinear", align_corners=False, antialias=True)[0]


def foreground_bbox(alpha: Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), bottom/right exclusive, of the pixels of ``alpha`` [H, W] above FOREGROUND_EPS."""
    rows = (alpha > FOREGROUND_EPS).any(1).nonzero().flatten()
    cols = (alpha > FOREGROUND_EPS).any(0).nonzero().flatten()
    if rows.numel() == 0:
        raise ValueError("the mask has no foreground")
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def prepare_reference(
    rgb: Tensor,
    alpha: Tensor,
    height: int,
    width: int,
    recenter: bool = True,
    foreground_ratio: float = 0.8,
    background_color: tuple[float, float, float] | Tensor = (0.0, 0.0, 0.0),
) -> tuple[Tensor, Tensor]:
    """The reference image at ``height x width``.

    Args:
        rgb: [h, w, 3] straight colour in [0, 1]; alpha: [h, w] coverage in [0, 1].
        recenter: crop to the foreground's bounding box and paste it centred, scaled so that it
            fills ``foreground_ratio`` of the image along its tighter dimension (for a square
            image: the box's longer side is ``foreground_ratio`` of the side).
        background_color: 3 values the colour is composited over.
    Returns:
        rgb [1, height, width, 3] composited over the background, mask [1, height, width, 1]; float32.
    """
    # Premultiplied colour resizes correctly: averaging straight colour would bleed the (arbitrary)
    # colour of transparent pixels into the edges.
    x = torch.cat([rgb.float() * alpha.float()[..., None], alpha.float()[..., None]], dim=-1).permute(2, 0, 1)
    if recenter:
        top, bottom, left, right = foreground_bbox(alpha)
        crop = x[:, top:bottom, left:right]
        bh, bw = crop.shape[-2:]
        scale = foreground_ratio * min(height / bh, width / bw)
        h2 = min(height, max(1, round(bh * scale)))
        w2 = min(width, max(1, round(bw * scale)))
        out = torch.zeros(4, height, width)
        y0, x0 = (height - h2) // 2, (width - w2) // 2
        out[:, y0 : y0 + h2, x0 : x0 + w2] = _resize(crop, h2, w2)
    else:
        out = _resize(x, height, width)
    out = out.clamp(0.0, 1.0).permute(1, 2, 0)
    a = out[..., 3:]
    bg = torch.as_tensor(background_color, dtype=out.dtype).reshape(3)
    composite = (out[..., :3] + (1.0 - a) * bg).clamp(0.0, 1.0)
    return composite[None].contiguous(), a[None].contiguous()


# ---------------------------------------------------------------------------------------------


@register("single-image-datamodule")
class SingleImageDataModule(RandomCameraDataModule):
    """random-camera-datamodule's batches plus ``batch["ref"]``: the input image at its camera.

    ``batch["ref"]`` holds the ``make_cameras`` keys of the reference camera (batch 1, at the
    reference resolution; ``light_positions`` at the camera) and ``rgb`` [1, H, W, 3] (composited
    over ``background_color``), ``mask`` [1, H, W, 1], ``background_color`` [3], and ``shading``
    (``ref_shading``). Validation and test orbits are those of random-camera-datamodule.
    """

    Config = SingleImageConfig
    #: Systems check this at start-up for guidances that read the reference view.
    provides_reference = True

    def __init__(self, cfg: Any = None, *, cfg_key: str = "data", prov: Provenance | None = None, seed: int = 0,
                 stage_plan: list[tuple[int, dict]] | None = None):
        # Filled while the base class checks each config (the images are loaded then).
        self._sources: dict[tuple, tuple[Tensor, Tensor]] = {}
        self._refs: dict[tuple, dict[str, Any]] = {}
        super().__init__(cfg, cfg_key=cfg_key, prov=prov, seed=seed, stage_plan=stage_plan)
        # Prepare the reference at the resolution each stage starts with, so a bad config fails now.
        for step in [0] + [start for start, _ in self.stage_plan]:
            self.ref_batch(step)

    def check_config(self, cfg: SingleImageConfig, key: str) -> None:
        super().check_config(cfg, key)
        where = (lambda k: self._prov.describe(f"{key}.{k}")) if self._prov else (lambda k: "")
        if not cfg.image_path:
            raise ConfigError(f"config key '{key}.image_path'{where('image_path')} is not set: "
                              "single-image-datamodule needs an input image; pass image=path/to/image.png on the "
                              "command line (recipes set image_path: ${image}) or set it in the recipe")
        if not 0.0 < cfg.foreground_ratio <= 1.0:
            raise ConfigError(f"config key '{key}.foreground_ratio'{where('foreground_ratio')}: must be in (0, 1], "
                              f"got {cfg.foreground_ratio}")
        if not all(0.0 <= v <= 1.0 for v in cfg.background_color):
            raise ConfigError(f"config key '{key}.background_color'{where('background_color')}: 3 values in [0, 1], "
                              f"got {list(cfg.background_color)}")
        for name in ("ref_height", "ref_width"):
            v = getattr(cfg, name)
            if v is not None and C(v, 0) < 1:
                raise ConfigError(f"config key '{key}.{name}'{where(name)}: must be a positive number of pixels, "
                                  f"got {v}")
        self._source(cfg, key)

    def _source(self, cfg: SingleImageConfig, key: str) -> tuple[Tensor, Tensor]:
        k = (cfg.image_path, cfg.mask_path, cfg.remove_background)
        if k not in self._sources:  # rembg, when asked, runs once per image
            self._sources[k] = load_image_and_mask(cfg.image_path, cfg.mask_path, key, cfg.remove_background)
        return self._sources[k]

    def ref_size(self, step: int) -> tuple[int, int]:
        """(height, width) of the reference image at ``step``."""
        cfg = self.cfg_at(step)
        h = cfg.height if cfg.ref_height is None else cfg.ref_height
        w = cfg.width if cfg.ref_width is None else cfg.ref_width
        return int(C(h, step)), int(C(w, step))

    def ref_batch(self, step: int = 0) -> dict[str, Any]:
        """``batch["ref"]`` for ``step``: the reference camera, image and mask (fresh tensors)."""
        cfg = self.cfg_at(step)
        h, w = self.ref_size(step)
        camera = (cfg.ref_elevation_deg, cfg.ref_azimuth_deg, cfg.ref_camera_distance, cfg.ref_fovy_deg)
        prep = (cfg.recenter, cfg.foreground_ratio, tuple(cfg.background_color))
        k = (cfg.image_path, cfg.mask_path, cfg.remove_background, prep, camera, h, w)
        if k not in self._refs:
            rgb, alpha = self._source(cfg, self.cfg_key)
            if not cfg.recenter:
                self._check_aspect(cfg, rgb, h, w)
            ref = make_cameras(*(torch.tensor([float(v)]) for v in camera), h, w)
            ref["rgb"], ref["mask"] = prepare_reference(rgb, alpha, h, w, *prep)
            ref["background_color"] = torch.tensor(cfg.background_color, dtype=torch.float32)
            if cfg.ref_shading is not None:
                ref["shading"] = cfg.ref_shading
            self._refs[k] = ref
        return {name: v.clone() if torch.is_tensor(v) else v for name, v in self._refs[k].items()}

    @staticmethod
    def _check_aspect(cfg: SingleImageConfig, rgb: Tensor, h: int, w: int) -> None:
        ih, iw = rgb.shape[:2]
        if abs(ih / iw - h / w) > 0.01 * (h / w):
            warnings.warn(f"{cfg.image_path} is {ih}x{iw} (HxW) but the reference camera is {h}x{w}, and "
                          "recenter is off: the image is stretched to the camera's aspect", stacklevel=3)

    def training_batch(self, step: int, rank: int = 0) -> dict[str, Any]:
        batch = super().training_batch(step, rank)
        batch["ref"] = self.ref_batch(step)
        return batch


__all__ = [
    "SingleImageDataModule",
    "SingleImageConfig",
    "load_image_and_mask",
    "prepare_reference",
    "foreground_bbox",
    "FOREGROUND_EPS",
]
