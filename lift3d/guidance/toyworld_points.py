"""3D score distillation from the toy point-cloud prior: GSGEN's Point-E guidance on the toy world.

``toyworld-point-e-guidance`` is ``point-e-guidance`` (:mod:`lift3d.guidance.point_e`: farthest-point
subsets of the geometry's points, 3D SDS with ``1 - a_t`` weighting, CFG against the all-zero
condition) with its prior swapped for the toy twin of Point-E
(:class:`lift3d.priors.toyworld.points.ToyPointPrior`), through the parent's ``build_prior`` hook:

* Weights: ``pretrained`` (default: ``lift3d/priors/toyworld/weights/toyworld-points.safetensors``,
  made by ``python -m lift3d.priors.toyworld train-points threads=2 --install``). There is no CLIP
  and no upsampler: the condition is the toy vocabulary's, so a prompt word outside it stops the run
  naming the word.
* Frame and size: the toy prior was trained in our world frame and units, so no turn
  (``point_e_frame`` false) and the points are scored as they are; the subset size is the toy's
  ``n_ctx`` (256).
* Initialisation (:meth:`sample_init_points`, what ``gaussian-splatting``'s ``init`` from a guidance
  asks for): ``init_clouds`` clouds sampled from the prior for the prompt, concatenated, kept at the
  size and place the prior drew them (``init_radius`` null), since the toy objects' sizes are known.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.point_e import DEFAULT_KEY, PointEGuidance
from lift3d.registry import register

#: Keys of point-e-guidance that mean nothing for the toy prior: they must keep their defaults.
_REAL_POINT_E_KEYS = ("pretrained_model_name_or_path", "upsampler_model_name_or_path", "clip_model_name_or_path")


@register("toyworld-point-e-guidance")
class ToyWorldPointEGuidance(PointEGuidance):
    """3D SDS of the geometry's points with the toy point-cloud prior; returns ``loss_sds``."""

    prior_family = "toyworld-points"

    @dataclass
    class Config(PointEGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a toy point prior safetensors file; null: ``weights/toyworld-points.safetensors`` in the
        package (made by ``python -m lift3d.priors.toyworld train-points threads=2 --install``)."""
        guidance_scale: Scheduled = 10.0
        """Classifier-free guidance scale (GSGEN gives Point-E 100; the toy prior's value is not tuned yet)."""
        point_e_frame: bool = False
        """Must stay false: the toy prior's clouds are in our frame (front +x)."""
        init_radius: Optional[float] = None
        """The initial cloud keeps the prior's size and place (null); a number centres it and scales its
        farthest point to that distance."""
        init_clouds: int = 8
        """Clouds of the prior's n_ctx points sampled and concatenated for the initial Gaussians."""

    cfg: Config

    @classmethod
    def weights_path(cls, cfg: Any) -> Path:
        from lift3d.priors.toyworld.points import DEFAULT_POINTS_WEIGHTS

        return Path(cfg.pretrained) if cfg.pretrained else DEFAULT_POINTS_WEIGHTS

    @classmethod
    def resolve(cls, cfg: Any, key: str = DEFAULT_KEY) -> dict[str, Any]:
        """The weights file, or a MissingWeightsError naming the key and the command that makes it."""
        from lift3d.priors.toyworld.points import POINTS_TRAIN_COMMAND
        from lift3d.utils.hub import MissingWeightsError

        path = cls.weights_path(cfg)
        if not path.is_file():
            raise MissingWeightsError(
                f"config key '{key}.pretrained': no toy point-cloud prior at {path}. `{POINTS_TRAIN_COMMAND}` trains "
                "it in minutes and writes lift3d/priors/toyworld/weights/toyworld-points.safetensors; or set "
                f"{key}.pretrained to a file you trained")
        return {"base": path}

    def configure(self) -> None:
        c, key = self.cfg, self._cfg_key
        defaults = {f.name: f.default for f in fields(PointEGuidance.Config)}
        for name in _REAL_POINT_E_KEYS:
            if getattr(c, name) != defaults[name]:
                raise ConfigError(f"{key}.{name}: {self.name()} has no Point-E files (no CLIP, no upsampler); "
                                  f"remove the key and set {key}.pretrained for its weights")
        if c.point_e_frame:
            raise ConfigError(f"{key}.point_e_frame must be false: the toy prior's clouds are in our frame")
        if c.init_clouds < 1:
            raise ConfigError(f"{key}.init_clouds must be >= 1, got {c.init_clouds}")
        super().configure()

    def build_prior(self) -> Any:
        from lift3d.priors.toyworld.points import ToyPointPrior

        files = self.resolve(self.cfg, self._cfg_key)
        return ToyPointPrior.load(files["base"])

    def _sample_cloud(self, prompt: str) -> tuple[Tensor, Tensor]:
        """``init_clouds`` samples of the toy prior for ``prompt``, concatenated: (xyz [n, 3], rgb [n, 3])."""
        from lift3d.priors.toyworld.points import sample_points

        k = self.cfg.init_clouds
        xyz, rgb = sample_points(self.prior, [prompt] * k, steps=self.cfg.init_steps,
                                 guidance_scale=self.cfg.init_guidance_scale)
        return xyz.reshape(-1, 3), rgb.reshape(-1, 3)


__all__ = ["ToyWorldPointEGuidance"]
