"""Score distillation from the toy Zero123: image-to-3D guidance on the toy world.

``toyworld-zero123-guidance`` is the core's SDS (:mod:`lift3d.guidance.score_distillation`) with an
adapter for :class:`lift3d.priors.toyworld.zero123.ToyZero123`: each random view is scored given
the input image (the data module's reference view, composited over its background, which must be
the toy world's black) and the camera change from the input view, with classifier-free guidance
that drops the input image, as ``zero123-guidance`` does with the real weights. The prompt is not
read.

Its weights are a toy Zero123 file (``pretrained``; default
``lift3d/priors/toyworld/weights/toyworld-zero123.safetensors``), made by fine-tuning the shipped
single-view prior: ``python -m lift3d.priors.toyworld train-zero123 threads=2 --install``.

``toyworld-zero123-views-guidance`` is generate-then-reconstruct on the same model: it draws the six
views of Zero123++'s layout (azimuths 30 + 60k from the input view, elevations of its v1.2 or v1.1
table) once, each sampled by the toy Zero123 from the input image and its camera change (one view
at a time, so nothing makes them agree with each other, unlike Zero123++'s joint sampling), and
then scores renders at those cameras with ``multiview-images-guidance``'s colour and silhouette
losses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.config import C, ConfigError
from lift3d.guidance.base import GuidanceInput
from lift3d.guidance.multiview_images import MultiviewImagesGuidance, ViewLossConfig
from lift3d.guidance.score_distillation import Cond, Conditioning, SDSGuidance
from lift3d.guidance.toyworld import ToyWorldPrior, autocast_dtype, warn_if_bf16_emulated
from lift3d.registry import register


class ToyZero123Prior(ToyWorldPrior):
    """The toy adapter (pixels in [-1, 1] at the network's resolution) around a ``ToyZero123``; a branch is
    ``image`` [B, 3, res, res] (the input view), ``camera`` [B, 4] (relative), ``input_cam`` [B, 2] and
    ``drop`` [B] (input view dropped)."""

    def __init__(self, model: nn.Module, name: str = "toyworld-zero123", autocast: Optional[str] = None):
        super().__init__(model, name, autocast)
        self._embedded: tuple[Tensor, Tensor] | None = None

    @classmethod
    def load(cls, path: str | None, name: str = "toyworld-zero123",  # type: ignore[override]
             autocast: Optional[str] = None) -> "ToyZero123Prior":
        from lift3d.priors.toyworld.zero123 import ToyZero123

        autocast_dtype(autocast, f"{name}.autocast")
        return cls(ToyZero123.load(path), name, autocast)

    def condition(self, inp: GuidanceInput, view_dependent_prompting: bool = True) -> Conditioning:
        from lift3d.priors.toyworld.zero123 import input_camera, relative_camera

        if inp.cond_image is None or inp.cond_cameras is None:
            raise ValueError(f"{self.guidance_name} needs the input image and its camera (cond_image, cond_cameras): "
                             "use data_type: single-image-datamodule with image=PATH")
        cams, ref = inp.cameras, inp.cond_cameras
        B, dev = len(cams), cams.elevation.device
        if inp.cond_image.shape[0] not in (1, B) or ref.elevation.shape[0] not in (1, B):
            raise ValueError(f"{self.guidance_name}: {inp.cond_image.shape[0]} input images and "
                             f"{ref.elevation.shape[0]} input cameras for {B} views; give one, or one per view")
        image = self.encode(inp.cond_image.detach().to(dev).float()).expand(B, -1, -1, -1)
        cam = relative_camera(cams.elevation.float(), cams.azimuth.float(), cams.distance.float(),
                              ref.azimuth.to(dev).float())
        icam = input_camera(ref.elevation.to(dev).float(), ref.distance.to(dev).float()).expand(B, -1)
        branch = {"image": image, "camera": cam, "input_cam": icam}
        return Conditioning(cond={**branch, "drop": torch.zeros(B, dtype=torch.bool, device=dev)},
                            uncond={**branch, "drop": torch.ones(B, dtype=torch.bool, device=dev)})

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        args = (x_t, t, cond["image"], cond["camera"], cond["input_cam"], cond["drop"])
        if self.autocast_dtype is None:
            return self.model(*args)
        with torch.autocast(x_t.device.type, dtype=self.autocast_dtype):
            out = self.model(*args)
        return out.to(x_t.dtype)

    def lora_copy(self, rank: int, alpha: float, targets: list[str]) -> "ToyZero123Prior":
        raise NotImplementedError("toyworld-zero123-guidance does not support VSD")


@register("toyworld-zero123-guidance")
class ToyWorldZero123Guidance(SDSGuidance):
    """SDS with the toy Zero123 given the input image and its camera; returns ``loss_sds``."""

    prior_family = "toyworld-zero123"
    prior_inputs = frozenset({"cond_image"})

    @dataclass
    class Config(SDSGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a toy Zero123 safetensors file; null: ``weights/toyworld-zero123.safetensors`` in the
        package (made by ``python -m lift3d.priors.toyworld train-zero123 --install``)."""
        autocast: Optional[str] = None
        """"bf16": the prior's network under bfloat16 autocast (faster on CPUs with AMX or
        AVX512-BF16, slower on others); null or "none": float32."""

    cfg: Config

    @classmethod
    def weights_path(cls, cfg: Any) -> Path:
        from lift3d.priors.toyworld.zero123 import DEFAULT_Z123_WEIGHTS

        return Path(cfg.pretrained) if cfg.pretrained else DEFAULT_Z123_WEIGHTS

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        from lift3d.priors.toyworld.zero123 import Z123_TRAIN_COMMAND

        path = cls.weights_path(cfg)
        if path.is_file():
            return None
        return (f"no toy Zero123 weights at {path}. They are made by fine-tuning the shipped single-view prior on "
                f"pairs of views: `{Z123_TRAIN_COMMAND}` writes them to "
                "lift3d/priors/toyworld/weights/toyworld-zero123.safetensors; or set the guidance's pretrained to a "
                "file you trained")

    def build_prior(self) -> ToyZero123Prior:
        msg = self.missing_weights(self.cfg)
        if msg is not None:
            from lift3d.priors.toyworld.model import MissingWeightsError

            raise MissingWeightsError(msg)
        prior = ToyZero123Prior.load(str(self.weights_path(self.cfg)), self.name(), self.cfg.autocast)
        warn_if_bf16_emulated(prior, self.name())
        return prior


@register("toyworld-zero123-views-guidance")
class ToyWorldZero123ViewsGuidance(MultiviewImagesGuidance):
    """Colour and silhouette losses against six views the toy Zero123 draws from the input image at
    Zero123++'s cameras (``data.pose_table: zero123pp-v1.2``, on the toy world's black)."""

    prior_family = "toyworld-zero123"
    generator_label = "toy Zero123"

    @dataclass
    class Config(ViewLossConfig):
        guidance_scale: float = 3.0
        """Classifier-free guidance scale of the sampling (dropping the input view)."""
        views_dir: Optional[str] = None
        """A views folder to reconstruct instead (nothing is sampled)."""
        pretrained: Optional[str] = None
        """Path of a toy Zero123 safetensors file; null: the shipped ``weights/toyworld-zero123.safetensors``."""
        version: Literal["v1.1", "v1.2"] = "v1.2"
        """Whose elevations the six views have (Zero123++ v1.2: 20 / -10; v1.1: 30 / -20)."""
        image_path: Optional[str] = None
        """The input image, RGBA or RGB on black (recipes: ``${image}``); null: the data module's reference image."""
        input_elevation: float = 0.0
        """Elevation of the input view in degrees (recipes: ``${data.ref_elevation_deg}``); the toy Zero123
        reads it with the input's distance (the views' distance)."""
        cache_dir: Optional[str] = None
        """Where sampled views are kept; null: ``<trial folder>/views`` from the data module."""
        num_inference_steps: int = 50
        """DDIM steps per view."""
        eta: float = 0.0
        """DDIM eta (0: deterministic given the seed)."""
        seed: int = 0
        """Seed of the sampling noise."""
        background_color: tuple[float, float, float] = (0.0, 0.0, 0.0)
        """The views' background (the toy world's black), for their masks."""
        mask_threshold: float = 0.15
        """Foreground threshold (the sampled black is noisy: at 0.03 a toy view's mask was about twice its
        object)."""

    cfg: Config

    @classmethod
    def missing_weights(cls, cfg: Any) -> str | None:
        if cfg.views_dir:
            return None
        return ToyWorldZero123Guidance.missing_weights(cfg)

    def configure(self) -> None:
        c = self.cfg
        if c.num_inference_steps < 1:
            raise ConfigError(f"{self._cfg_key}.num_inference_steps must be positive, got {c.num_inference_steps}")
        self.configure_views()

    def record(self, image_bytes: bytes) -> dict[str, Any]:
        c = self.cfg
        msg = self.missing_weights(c)
        if msg is not None:
            from lift3d.priors.toyworld.model import MissingWeightsError

            raise MissingWeightsError(msg)
        weights = ToyWorldZero123Guidance.weights_path(c)
        return {"generator": "toyworld-zero123", "model": str(weights), "model_bytes": weights.stat().st_size,
                "version": c.version, "input_elevation": float(c.input_elevation), "steps": c.num_inference_steps,
                "eta": float(c.eta), "guidance_scale": float(C(c.guidance_scale, 0)), "seed": c.seed,
                "input_sha256": hashlib.sha256(image_bytes).hexdigest()}

    def _input(self, inp: Optional[GuidanceInput]) -> tuple[Tensor, bytes]:
        """The input image over black, [1, 3, S, S] in [0, 1] at full size (resized when sampling)."""
        from lift3d.priors.zero123pp.input import prepare_input, read_image

        rgb, alpha, raw = self._input_image(inp, read_image)
        return prepare_input(rgb, alpha, recenter_ratio=None, background=0.0), raw

    def generate(self, image: Tensor, device: torch.device, distance: Optional[float], fovy: Optional[float]
                 ) -> tuple[Any, Tensor]:
        """The six views, each sampled given the input (a ViewSet with azimuths relative to the input, and
        the views side by side [3, S, 6 S])."""
        import torch.nn.functional as F

        from lift3d.priors.toyworld import zero123 as z123
        from lift3d.priors.zero123pp.poses import view_cameras
        from lift3d.priors.zero123pp.views import ViewSet

        c = self.cfg
        model = z123.ToyZero123.load(str(ToyWorldZero123Guidance.weights_path(c))).to(device).eval()
        res = model.cfg.resolution
        if tuple(image.shape[-2:]) != (res, res):
            image = F.interpolate(image, size=(res, res), mode="bilinear", align_corners=False,
                                  antialias=True).clamp(0, 1)
        cams = view_cameras(c.version, distance, fovy if fovy is not None else 40.0)
        n = len(cams["elevation"])
        g = torch.Generator().manual_seed(c.seed)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            views = z123.sample_novel_views(
                model, image.expand(n, -1, -1, -1), torch.full((n,), float(c.input_elevation)), torch.zeros(n),
                cams["distance"], cams["elevation"], cams["azimuth"], cams["distance"], steps=c.num_inference_steps,
                guidance_scale=float(C(c.guidance_scale, 0)), generator=g, eta=c.eta)
        views = views.float().cpu()
        strip = torch.cat(list(views), -1)
        return ViewSet(rgb=views.permute(0, 2, 3, 1).contiguous(), cameras=cams,
                       background=tuple(c.background_color)), strip


__all__ = ["ToyZero123Prior", "ToyWorldZero123Guidance", "ToyWorldZero123ViewsGuidance"]
