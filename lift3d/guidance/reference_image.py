"""Reference-view losses of image-to-3D: the render at the input image's camera against the image.

Zero123, Magic123 and DreamGaussian's image mode all anchor the object to the input photo: each
training step renders the reference camera and compares it with the photo, while a prior scores
random views. This guidance is that comparison. A recipe adds it as a named guidance that scores
the reference view (``views: ref``) of a ``single-image-datamodule`` batch:

* ``loss_rgb``: mean squared error of the render against the photo (both composited over the
  same background), on every pixel or, with ``masked_rgb``, on the photo's foreground only;
* ``loss_mask``: the rendered opacity against the photo's mask (mean squared error, or binary
  cross-entropy).

Named ``ref``, the terms are ``loss_ref_rgb`` and ``loss_ref_mask`` (weights ``lambda_ref_rgb``,
``lambda_ref_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.guidance.base import BaseGuidance, GuidanceInput, GuidanceOutput
from lift3d.registry import register


@register("reference-image-guidance")
class ReferenceImageGuidance(BaseGuidance):
    """Photometric and silhouette losses of the reference render against the input image."""

    @dataclass
    class Config(BaseGuidance.Config):
        mask_loss: Literal["mse", "bce"] = "mse"
        """How ``loss_mask`` compares the rendered opacity with the image's mask."""
        masked_rgb: bool = False
        """Compare colours on the image's foreground only (the background then is free)."""

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"cond_image", "opacity"})

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        if inp.cond_image is None or inp.cond_mask is None:
            raise ValueError("reference-image-guidance needs the input image and its mask (a single-image-datamodule "
                             "batch scored with views: ref)")
        rgb, opacity = inp.rgb, inp.opacity
        if rgb.shape[1:3] != inp.cond_image.shape[1:3]:
            raise ValueError(f"reference-image-guidance: the render is {tuple(rgb.shape[1:3])} but the input image is "
                             f"{tuple(inp.cond_image.shape[1:3])}; render the reference view at the image's size")
        gt_rgb, gt_mask = inp.cond_image.to(rgb).expand_as(rgb), inp.cond_mask.to(rgb).expand_as(opacity)
        if self.cfg.masked_rgb:
            loss_rgb = ((rgb - gt_rgb) ** 2 * gt_mask).sum() / (gt_mask.sum() * 3).clamp_min(1.0)
        else:
            loss_rgb = F.mse_loss(rgb, gt_rgb)
        if self.cfg.mask_loss == "bce":
            # Written out (not F.binary_cross_entropy, which autocast refuses).
            op = opacity.float().clamp(1e-5, 1.0 - 1e-5)
            loss_mask = -(gt_mask * torch.log(op) + (1.0 - gt_mask) * torch.log1p(-op)).mean()
        else:
            loss_mask = F.mse_loss(opacity, gt_mask)
        with torch.no_grad():
            psnr = -10.0 * torch.log10(F.mse_loss(rgb, gt_rgb).clamp_min(1e-10))
            inter = ((opacity > 0.5) & (gt_mask > 0.5)).sum()
            union = ((opacity > 0.5) | (gt_mask > 0.5)).sum().clamp_min(1)
        return GuidanceOutput(losses={"loss_rgb": loss_rgb, "loss_mask": loss_mask},
                              diagnostics={"psnr": psnr, "mask_iou": inter.float() / union.float()})


__all__ = ["ReferenceImageGuidance"]
