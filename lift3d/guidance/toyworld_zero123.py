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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn
from torch import Tensor

from lift3d.guidance.base import GuidanceInput
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


__all__ = ["ToyZero123Prior", "ToyWorldZero123Guidance"]
