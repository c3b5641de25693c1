"""Reconstruction from generated views: photometric and silhouette losses at the views' cameras.

Generate-then-reconstruct (Zero123++, Shi et al. 2023; One-2-3-45++ and InstantMesh reconstruct
its views feed-forward, here they are fitted by optimisation): a multi-view generator draws the
object from a few fixed cameras once, then a 3D representation is fitted to those images like a
multi-view reconstruction. This guidance owns the views:

* with ``views_dir`` it reads a views folder any generator wrote (layout in
  :mod:`lift3d.priors.zero123pp.views`: images + ``cameras.json``; SyncDreamer's 16 views
  converted to it work the same way);
* otherwise it samples Zero123++'s six views of ``image_path`` once, before the first loss, and
  keeps them in ``cache_dir`` or, by default, the trial folder's ``views/`` (which
  ``multiview-images-datamodule`` passes in its batches). A folder there whose recorded settings
  (model, version, sampler, steps, scale, seed, view size, framing, and the input image's bytes)
  match is read instead of sampling again, so a resumed run reuses its views; the generator is
  loaded only when it samples, and dropped after.

Each call gets renders at some of the views' cameras (``multiview-images-datamodule`` yields them,
with ``view_index``; a batch without it has each camera matched to the view at the same camera).
The cameras are checked against the views' own (elevation, azimuth, distance, field of view): a
batch from another pose table fails with both named. Losses:

* ``loss_rgb``: mean squared error of the render against the view, both resized to the render's
  size (on every pixel, or with ``masked_rgb`` on the view's foreground only);
* ``loss_mask``: the rendered opacity against the view's mask: its alpha channel, or else the
  pixels that differ from the views' background colour by more than ``mask_threshold``
  (:func:`~lift3d.priors.zero123pp.views.background_mask`). Zero123++ draws on mid grey, so the
  recipe also renders the scene over mid grey, and the colour loss sees the same background.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import C, ConfigError
from lift3d.guidance.base import GuidanceInput, GuidanceOutput
from lift3d.guidance.latent_diffusion import weights_dtype
from lift3d.guidance.score_distillation import DiffusionGuidance
from lift3d.priors.zero123pp.model import DEFAULT_MODEL
from lift3d.registry import register


def _angle_gap(a: Tensor, b: Tensor) -> Tensor:
    """|a - b| in degrees, the short way round."""
    return torch.remainder(a - b + 180.0, 360.0).sub(180.0).abs()


@dataclass
class ViewLossConfig(DiffusionGuidance.Config):
    """The reconstruction-loss settings every generate-then-reconstruct guidance shares (a generator's
    config redeclares ``background_color`` / ``mask_threshold`` with its own defaults)."""

    background_color: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """The views' background, for masks of RGB views; a folder's cameras.json ``background`` takes precedence."""
    mask_threshold: float = 0.06
    """A pixel of an RGB view is foreground when it differs from the background colour by more than
    this in some channel."""
    mask_loss: Literal["mse", "bce"] = "mse"
    """How ``loss_mask`` compares the rendered opacity with the view's mask."""
    masked_rgb: bool = False
    """Compare colours on the view's foreground only."""
    camera_tolerance: float = 1e-3
    """Largest relative difference of distance / field of view, and degrees of angle, between a batch
    camera and its view's before the batch is refused (scaled to degrees x 100 for angles)."""


@register("multiview-images-guidance")
class MultiviewImagesGuidance(DiffusionGuidance):
    """RGB and mask losses of renders against generated views (Zero123++'s, or a views folder's)."""

    prior_family = "zero123pp"
    generator_label = "Zero123++"

    @dataclass
    class Config(ViewLossConfig):
        guidance_scale: float = 4.0
        """Classifier-free guidance scale of the sampling (the Zero123++ pipeline's default 4)."""
        views_dir: Optional[str] = None
        """A views folder to reconstruct (any generator's; see lift3d.priors.zero123pp.views): nothing is
        sampled and no weights are needed. Null: Zero123++ samples the views."""
        pretrained_model_name_or_path: str = DEFAULT_MODEL
        """Zero123++: a folder in the published layout, or a Hugging Face id found in the local cache.
        Never downloaded: ``hf download sudo-ai/zero123plus-v1.2`` once."""
        unet_weights: Optional[str] = None
        """A fine-tuned UNet replacing the folder's (safetensors, or a tensors-only .bin; plain diffusers
        keys or under ``unet.`` / ``unet.unet.``), e.g. InstantMesh's white-background UNet."""
        version: Literal["v1.1", "v1.2"] = "v1.2"
        """The model version: the elevations of its views (checked against the batch cameras)."""
        image_path: Optional[str] = None
        """The input image (recipes: ``${image}``); null: the data module's reference image."""
        recenter: bool = True
        """Centre an RGBA input's object and scale it to ``foreground_ratio`` of the frame before sampling."""
        foreground_ratio: float = 0.85
        """With ``recenter``: the object's longer side over the image side."""
        cache_dir: Optional[str] = None
        """Where sampled views are kept; null: ``<trial folder>/views`` from the data module."""
        num_inference_steps: int = 28
        """Sampling steps."""
        sampler: Literal["euler_ancestral", "ddim"] = "euler_ancestral"
        """Euler ancestral (the authors' choice) or DDIM."""
        seed: int = 0
        """Seed of the sampling noise."""
        view_size: int = 320
        """Pixels per view (320 for the released models)."""
        torch_dtype: Optional[Literal["float16", "bfloat16", "float32", "float64"]] = None
        """dtype of the generator's weights; null: float16 on CUDA (with half_precision_weights), else float32."""
        half_precision_weights: bool = True
        """float16 weights on CUDA when torch_dtype is null."""
        mask_threshold: float = 0.06
        """Foreground threshold of RGB views (0.06 is 15 of 255 levels: above the VAE's flat-background
        noise). The views' background is Zero123++'s mid grey (``background_color``)."""

    cfg: Config

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"opacity"})

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        if cfg.views_dir:
            return None  # nothing to sample
        from lift3d.priors.zero123pp.model import resolve_model
        from lift3d.utils.hub import MissingWeightsError

        try:
            resolve_model(cfg.pretrained_model_name_or_path, "system.guidance.pretrained_model_name_or_path")
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def configure(self) -> None:
        c = self.cfg
        if not 0.0 < c.foreground_ratio <= 1.0:
            raise ConfigError(f"{self._cfg_key}.foreground_ratio must be in (0, 1], got {c.foreground_ratio}")
        if c.num_inference_steps < 1 or c.view_size < 1:
            raise ConfigError(f"{self._cfg_key}: num_inference_steps and view_size must be positive")
        self.configure_views()

    def configure_views(self) -> None:
        """The checks and state every generator's guidance shares; its ``configure`` calls this last."""
        c = self.cfg
        if not 0.0 <= c.mask_threshold < 1.0:
            raise ConfigError(f"{self._cfg_key}.mask_threshold must be in [0, 1), got {c.mask_threshold}")
        if c.views_dir:
            from lift3d.priors.zero123pp.views import read_cameras

            read_cameras(c.views_dir, f"{self._cfg_key}.views_dir")  # fail at start-up, not at step 0
        # The views [N, H, W, 3], masks [N, H, W, 1] and cameras; filled on first use. Not buffers:
        # they are on disk (views_dir or the cache), never in a checkpoint.
        self.__dict__["views"] = None
        self.__dict__["_targets"] = {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "MultiviewImagesGuidance":
        self._targets.clear()  # resized on the old device
        return super(DiffusionGuidance, self)._apply(fn, *args, **kwargs)

    # -- the views ---------------------------------------------------------------------------

    def record(self, image_bytes: bytes) -> dict[str, Any]:
        """The settings a sampled views folder is valid for."""
        c = self.cfg
        return {"generator": "zero123pp", "model": str(c.pretrained_model_name_or_path),
                "unet_weights": c.unet_weights, "version": c.version, "steps": c.num_inference_steps,
                "guidance_scale": float(C(c.guidance_scale, 0)), "sampler": c.sampler, "seed": c.seed,
                "view_size": c.view_size, "recenter": c.recenter, "foreground_ratio": c.foreground_ratio,
                "input_sha256": hashlib.sha256(image_bytes).hexdigest()}

    def _input_image(self, inp: Optional[GuidanceInput], read_image: Any
                     ) -> tuple[Tensor, Optional[Tensor], bytes]:
        """The input image: rgb [H, W, 3], alpha [H, W] or None, and bytes identifying it; from
        ``image_path`` (read by the generator's ``read_image``) or else the batch's reference image."""
        c = self.cfg
        if c.image_path:
            rgb, alpha = read_image(c.image_path, f"{self._cfg_key}.image_path")
            return rgb, alpha, Path(c.image_path).expanduser().read_bytes()
        if inp is not None and inp.cond_image is not None:
            rgb = inp.cond_image[0].detach().float().cpu()
            alpha = inp.cond_mask[0, ..., 0].detach().float().cpu() if inp.cond_mask is not None else None
            return rgb, alpha, rgb.numpy().tobytes() + (alpha.numpy().tobytes() if alpha is not None else b"")
        raise ConfigError(f"{self._cfg_key}.image_path is not set and the batch has no input image: give "
                          "the image to generate views of (recipes: image_path: ${image}), or views_dir")

    def _input(self, inp: Optional[GuidanceInput]) -> tuple[Tensor, bytes]:
        """The conditioning image [1, 3, S, S] as the model sees it, and bytes identifying it."""
        from lift3d.priors.zero123pp.input import prepare_input, read_image

        c = self.cfg
        rgb, alpha, raw = self._input_image(inp, read_image)
        return prepare_input(rgb, alpha, recenter_ratio=c.foreground_ratio if c.recenter else None), raw

    def generate(self, image: Tensor, device: torch.device, distance: Optional[float], fovy: Optional[float]
                 ) -> tuple[Any, Tensor]:
        """Sample Zero123++'s views of ``image`` on ``device``: (a ViewSet, the tiled grid [3, H, W])."""
        from lift3d.priors.zero123pp.model import load_folder, resolve_model
        from lift3d.priors.zero123pp.sampler import sample_views
        from lift3d.priors.zero123pp.views import ViewSet

        c = self.cfg
        key = f"{self._cfg_key}.pretrained_model_name_or_path"
        folder = resolve_model(c.pretrained_model_name_or_path, key)
        dtype = weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=device.type == "cuda")
        model = load_folder(folder, key=key, dtype=dtype, unet_weights=c.unet_weights).to(device)
        try:
            with torch.autocast(device.type, enabled=False):
                res = sample_views(model, image, version=c.version, distance=distance, fovy_deg=fovy,
                                   view_size=c.view_size, steps=c.num_inference_steps,
                                   guidance_scale=float(C(c.guidance_scale, 0)), sampler=c.sampler, seed=c.seed)
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return ViewSet(rgb=res.views.permute(0, 2, 3, 1).contiguous(), cameras=res.cameras,
                       background=tuple(c.background_color)), res.grid

    def prepare(self, inp: Optional[GuidanceInput] = None, cache_dir: Optional[str | Path] = None,
                device: Optional[torch.device] = None) -> Any:
        """The views: read from ``views_dir``, or from a matching cache folder, or sampled (and cached)."""
        from lift3d.priors.zero123pp.views import read_record, read_views, write_views

        if self.views is not None:
            return self.views
        c = self.cfg
        if c.views_dir:
            vs = read_views(c.views_dir, f"{self._cfg_key}.views_dir")
        else:
            cache = cache_dir or c.cache_dir or (inp.extras.get("views_cache") if inp is not None else None)
            image, raw = self._input(inp)
            record = self.record(raw)
            # The generators draw their views around the input view at azimuth 0; the data module puts the
            # input at data.ref_azimuth_deg and sends it as input_azimuth, so the views turn with it.
            offset = float(inp.extras.get("input_azimuth", 0.0)) if inp is not None else 0.0
            if offset:
                record["input_azimuth"] = offset
            found = read_record(cache) if cache else None
            if found == record:
                vs = read_views(cache, f"{self._cfg_key}.cache_dir")
            else:
                if found is not None:
                    print(f"[lift3d] {cache}: views sampled with other settings; sampling them again")
                dev = device or (inp.rgb.device if inp is not None and inp.rgb is not None else torch.device("cpu"))
                distance = float(inp.cameras.distance[0]) if inp is not None else None
                fovy = float(inp.cameras.fovy[0]) if inp is not None else None
                vs, grid = self.generate(image, dev, distance, fovy)
                vs.cameras = {**vs.cameras, "azimuth": torch.remainder(vs.cameras["azimuth"].float() + offset + 180.0,
                                                                       360.0) - 180.0}
                vs.record = record
                if cache:
                    write_views(cache, vs.rgb.permute(0, 3, 1, 2), vs.cameras, grid=grid, input_image=image[0],
                                background=c.background_color, record=record)
                    print(f"[lift3d] {self.generator_label} views written to {cache}")
        self.__dict__["views"] = vs
        return vs

    def targets(self, H: int, W: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """All views' colours [N, H, W, 3] and masks [N, H, W, 1] at the render size."""
        key = (H, W, device, dtype)
        if key not in self._targets:
            from lift3d.priors.zero123pp.views import background_mask

            vs = self.views
            h, w = vs.rgb.shape[1:3]
            if abs(h / w - H / W) > 0.01 * (H / W):
                raise ValueError(f"{self.name()}: the views are {h}x{w} but the renders {H}x{W}; render at the "
                                 "views' aspect ratio (data.height / data.width)")
            if vs.alpha is not None:
                mask = vs.alpha.float()
            else:
                bg = vs.background if vs.background is not None else tuple(self.cfg.background_color)
                mask = background_mask(vs.rgb.float(), bg, self.cfg.mask_threshold)
            x = torch.cat([vs.rgb.float(), mask[..., None]], -1).permute(0, 3, 1, 2)
            if (h, w) != (H, W):
                x = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp(0, 1).permute(0, 2, 3, 1).to(device=device, dtype=dtype)
            self._targets[key] = (x[..., :3].contiguous(), x[..., 3:].contiguous())
        return self._targets[key]

    def match_cameras(self, inp: GuidanceInput) -> Tensor:
        """[B] the view each batch camera is at, for batches without ``view_index``: the view with the same
        camera (within ``camera_tolerance``); a ConfigError when a camera is at none of the views."""
        vs, cams, tol = self.views, inp.cameras, self.cfg.camera_tolerance
        dev = cams.elevation.device
        v = {k: t.to(dev).float() for k, t in vs.cameras.items()}
        gap = (_angle_gap(cams.elevation.float()[:, None], v["elevation"][None]) / (100 * tol)).maximum(
            _angle_gap(cams.azimuth.float()[:, None], v["azimuth"][None]) / (100 * tol))
        for name, got in (("distance", cams.distance), ("fovy", cams.fovy)):
            rel = (got.float()[:, None] - v[name][None]).abs() / (tol * v[name][None].abs().clamp_min(1e-6))
            gap = gap.maximum(rel)
        best, idx = gap.min(dim=1)
        if (best > 1.0).any():
            raise ConfigError(f"{self.name()}: {int((best > 1.0).sum())} batch camera(s) are at none of the views' "
                              "cameras (and the batch has no view_index): use data_type: multiview-images-datamodule, "
                              "whose batches are the views' cameras")
        return idx

    def check_cameras(self, inp: GuidanceInput, idx: Tensor) -> None:
        vs, cams, tol = self.views, inp.cameras, self.cfg.camera_tolerance
        want = {k: v.to(idx.device)[idx] for k, v in vs.cameras.items()}
        bad = []
        for name, got in (("elevation", cams.elevation), ("azimuth", cams.azimuth)):
            gap = _angle_gap(got.float(), want[name].float())
            if (gap > 100 * tol).any():
                bad.append(name)
        for name, got in (("distance", cams.distance), ("fovy", cams.fovy)):
            w = want[name].float()
            if ((got.float() - w).abs() > tol * w.abs().clamp_min(1e-6)).any():
                bad.append(name)
        if bad:
            i = int(idx[0])
            raise ConfigError(
                f"{self.name()}: the batch cameras are not the views' ({', '.join(bad)} differ; view {i}: the views "
                f"have elevation {float(vs.cameras['elevation'][i]):g}, azimuth {float(vs.cameras['azimuth'][i]):g}, "
                f"distance {float(vs.cameras['distance'][i]):g}, fovy {float(vs.cameras['fovy'][i]):g}). Make "
                f"data.views_dir / data.pose_table agree with {self._cfg_key}.views_dir / .version")

    # -- the losses --------------------------------------------------------------------------

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        rgb, opacity = inp.rgb, inp.opacity
        self.prepare(inp)
        idx = inp.extras.get("view_index")
        if idx is None:
            idx = self.match_cameras(inp)
        idx = torch.as_tensor(idx, device=rgb.device).long()
        self.check_cameras(inp, idx)
        B, H, W, _ = rgb.shape
        all_rgb, all_mask = self.targets(H, W, rgb.device, rgb.dtype)
        gt_rgb, gt_mask = all_rgb[idx], all_mask[idx]
        if self.cfg.masked_rgb:
            loss_rgb = ((rgb - gt_rgb) ** 2 * gt_mask).sum() / (gt_mask.sum() * 3).clamp_min(1.0)
        else:
            loss_rgb = F.mse_loss(rgb, gt_rgb)
        if opacity is None:
            raise ValueError(f"{self.name()} needs the rendered opacity")
        if self.cfg.mask_loss == "bce":
            # Written out (not F.binary_cross_entropy, which autocast refuses).
            op = opacity.float().clamp(1e-5, 1.0 - 1e-5)
            m = gt_mask.float()
            loss_mask = -(m * torch.log(op) + (1.0 - m) * torch.log1p(-op)).mean()
        else:
            loss_mask = F.mse_loss(opacity, gt_mask.to(opacity.dtype))
        with torch.no_grad():
            psnr = -10.0 * torch.log10(F.mse_loss(rgb.float(), gt_rgb.float()).clamp_min(1e-10))
            inter = ((opacity > 0.5) & (gt_mask > 0.5)).sum()
            union = ((opacity > 0.5) | (gt_mask > 0.5)).sum().clamp_min(1)
        return GuidanceOutput(losses={"loss_rgb": loss_rgb, "loss_mask": loss_mask},
                              diagnostics={"psnr": psnr, "mask_iou": inter.float() / union.float()})


@register("syncdreamer-guidance")
class SyncDreamerGuidance(MultiviewImagesGuidance):
    """The same reconstruction losses against SyncDreamer's 16 views (Liu et al., ICLR 2024), sampled once
    from ``image_path`` seen at ``input_elevation`` (or read from ``views_dir``). The views are drawn at
    elevation 30, azimuths every 22.5 degrees from the input view, on white (``data.pose_table: syncdreamer``)."""

    prior_family = "syncdreamer"
    generator_label = "SyncDreamer"

    @dataclass
    class Config(ViewLossConfig):
        guidance_scale: float = 2.0
        """Classifier-free guidance scale (the authors' 2.0; 1.5 also suggested)."""
        views_dir: Optional[str] = None
        """A views folder to reconstruct: nothing is sampled and no weights are needed. Null: sample."""
        pretrained_model_name_or_path: str = "ckpt/syncdreamer-pretrain.ckpt"
        """SyncDreamer's weights: syncdreamer-pretrain.ckpt (or a .safetensors of its keys, or a folder holding
        it), from the authors' release. Never downloaded."""
        input_elevation: float = 30.0
        """Elevation of the input view in degrees (SyncDreamer asks for it; a rough value in [-10, 40] is fine)."""
        image_path: Optional[str] = None
        """The input image (recipes: ``${image}``); null: the data module's reference image."""
        recenter: bool = True
        """Centre an RGBA input's object and scale it to ``foreground_ratio`` of the frame before sampling."""
        foreground_ratio: float = 0.78125
        """With ``recenter``: the object's longer side over the image side (the authors' crop_size 200 of 256)."""
        cache_dir: Optional[str] = None
        """Where sampled views are kept; null: ``<trial folder>/views`` from the data module."""
        num_inference_steps: int = 50
        """DDIM steps (the authors' 50)."""
        eta: float = 1.0
        """DDIM eta (the authors' sampler: 1, stochastic)."""
        view_batch: int = 8
        """Views per UNet call within a step (memory only; the authors' batch_view_num 8)."""
        seed: int = 0
        """Seed of the sampling noise."""
        torch_dtype: Optional[Literal["float16", "bfloat16", "float32", "float64"]] = None
        """dtype of the generator's weights; null: float16 on CUDA (with half_precision_weights), else float32."""
        half_precision_weights: bool = True
        """float16 weights on CUDA when torch_dtype is null."""
        background_color: tuple[float, float, float] = (1.0, 1.0, 1.0)
        """The views' background (SyncDreamer: white), for masks of RGB views."""

    cfg: Config

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        if cfg.views_dir:
            return None
        from lift3d.priors.syncdreamer.checkpoint import find_weights
        from lift3d.utils.hub import MissingWeightsError

        try:
            find_weights(cfg.pretrained_model_name_or_path, "system.guidance.pretrained_model_name_or_path")
        except MissingWeightsError as exc:
            return str(exc)
        return None

    def configure(self) -> None:
        c = self.cfg
        if c.num_inference_steps < 1 or c.view_batch < 1:
            raise ConfigError(f"{self._cfg_key}: num_inference_steps and view_batch must be positive")
        if c.recenter and not 0.0 < c.foreground_ratio <= 1.0:
            raise ConfigError(f"{self._cfg_key}.foreground_ratio must be in (0, 1], got {c.foreground_ratio}")
        self.configure_views()

    def record(self, image_bytes: bytes) -> dict[str, Any]:
        c = self.cfg
        return {"generator": "syncdreamer", "model": str(c.pretrained_model_name_or_path),
                "input_elevation": float(c.input_elevation), "steps": c.num_inference_steps, "eta": float(c.eta),
                "guidance_scale": float(C(c.guidance_scale, 0)), "seed": c.seed, "recenter": c.recenter,
                "foreground_ratio": c.foreground_ratio, "input_sha256": hashlib.sha256(image_bytes).hexdigest()}

    def _input(self, inp: Optional[GuidanceInput]) -> tuple[Tensor, bytes]:
        """The input image on white at full resolution (resized to the model's size when sampling)."""
        from lift3d.priors.syncdreamer.input import prepare_input, read_image

        c = self.cfg
        rgb, alpha, raw = self._input_image(inp, read_image)
        ratio = c.foreground_ratio if c.recenter else None
        return prepare_input(rgb, alpha, size=max(rgb.shape[0], rgb.shape[1]), foreground_ratio=ratio), raw

    def generate(self, image: Tensor, device: torch.device, distance: Optional[float], fovy: Optional[float]
                 ) -> tuple[Any, Tensor]:
        """Sample SyncDreamer's 16 views of ``image``: (a ViewSet, the views side by side [3, H, 16 W])."""
        from lift3d.priors.syncdreamer import checkpoint
        from lift3d.priors.syncdreamer.sampler import sample_views
        from lift3d.priors.zero123pp.views import ViewSet

        c = self.cfg
        key = f"{self._cfg_key}.pretrained_model_name_or_path"
        dtype = weights_dtype(c.torch_dtype, c.half_precision_weights, on_cuda=device.type == "cuda")
        model = checkpoint.load(c.pretrained_model_name_or_path, key, dtype=dtype).to(device)
        size = model.cfg.image_size
        if tuple(image.shape[-2:]) != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bicubic", align_corners=False,
                                  antialias=True).clamp(0, 1)
        try:
            with torch.autocast(device.type, enabled=False):
                res = sample_views(model, image.to(device), float(c.input_elevation), distance=distance,
                                   steps=c.num_inference_steps, guidance_scale=float(C(c.guidance_scale, 0)),
                                   eta=c.eta, seed=c.seed, view_batch=c.view_batch)
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        strip = torch.cat(list(res.views), -1)
        return ViewSet(rgb=res.views.permute(0, 2, 3, 1).contiguous(), cameras=res.cameras,
                       background=tuple(c.background_color)), strip


__all__ = ["MultiviewImagesGuidance", "SyncDreamerGuidance", "ViewLossConfig"]
