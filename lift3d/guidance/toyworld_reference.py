"""Reference ("oracle") guidance for the toy world: multi-view reconstruction against ground truth.

Instead of a learned prior, it renders the named catalogue object exactly (the toy world's
sphere tracer, ``lift3d.priors.toyworld.render``) at the very cameras of the batch and returns
a photometric loss to it, plus a silhouette loss when the system passes the render's opacity.
It is the upper bound that the toy-world diffusion prior (score distillation as in DreamFusion,
Poole et al. 2022) is compared with, and the guidance of the end-to-end demo until that prior
exists.

The ground truth is drawn over ``background`` with the same Lambertian constants as the
training images, lit from ``normalize(light_positions)`` (the direction from the origin towards
the light). Recipes using it should give the scene the matching background: a solid black
background for the default ``background: 0.0``; otherwise the silhouette colour disagrees and
the loss pulls density into empty space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.guidance.base import BaseGuidance, GuidanceInput, GuidanceOutput
from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import CATALOGUE
from lift3d.priors.toyworld.vocab import parse_prompt
from lift3d.registry import register
from lift3d.utils.cameras import get_rays


@register("toyworld-reference-guidance")
class ToyWorldReferenceGuidance(BaseGuidance):
    """Photometric (and optional silhouette) loss to the exact render of a catalogue object."""

    @dataclass
    class Config(BaseGuidance.Config):
        prompt: Optional[str] = None
        """Catalogue prompt to reconstruct; None reads ``prompt_utils.prompt`` at each call."""
        ambient: float = 0.35
        """Ambient term of the ground truth's Lambertian shading (the training data uses 0.35)."""
        diffuse: float = 0.65
        """Diffuse term of the ground truth's Lambertian shading (the training data uses 0.65)."""
        background: Union[float, list[float]] = 0.0
        """Ground-truth background: one grey level or 3 values in [0, 1]; match the scene's background."""
        shading: Literal["lambert", "albedo"] = "lambert"
        """'lambert' shades like the training data; 'albedo' compares with unshaded albedo."""
        mask_loss: Literal["bce", "mse"] = "bce"
        """How ``loss_mask`` compares the passed opacity with the ground-truth silhouette."""
        supersample: int = 1
        """Anti-aliasing of the ground truth: s x s samples per pixel (1 = hard edges, fastest)."""
        max_steps: int = 96
        """Sphere-tracing steps per ray at most."""

    def configure(self, **kwargs: Any) -> None:
        super().configure(**kwargs)
        if self.cfg.prompt is not None:
            parse_prompt(self.cfg.prompt)  # fail at start-up, listing the valid prompts
        bg = self.cfg.background
        if isinstance(bg, list) and len(bg) != 3:
            raise ValueError(f"toyworld-reference-guidance.background: expected 1 or 3 values, got {bg}")

    def _prompt(self, prompt_utils: Any) -> str:
        if self.cfg.prompt is not None:
            return self.cfg.prompt
        if isinstance(prompt_utils, str):
            return prompt_utils
        prompt = getattr(prompt_utils, "prompt", None)
        if prompt is None:
            raise ValueError(
                "toyworld-reference-guidance needs a prompt: set guidance.prompt or pass prompt_utils with .prompt"
            )
        return prompt

    @torch.no_grad()
    def ground_truth(
        self, prompt: str, batch: dict[str, Any], height: int, width: int, like: Tensor
    ) -> dict[str, Tensor]:
        """The exact render of ``prompt`` at the batch's cameras, at ``height x width``."""
        obj = CATALOGUE[parse_prompt(prompt).prompt]
        # Half-precision renders still get a float32 ground truth: sphere tracing needs the precision.
        dt = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        to = dict(device=like.device, dtype=dt)
        rays_o, rays_d = batch.get("rays_o"), batch.get("rays_d")
        cams: dict[str, Any] = {"height": height, "width": width}
        if rays_o is None or tuple(rays_o.shape[1:3]) != (height, width) or self.cfg.supersample > 1:
            # Rays of another resolution (or none): rebuild them at the render's from the cameras.
            c2w, fovy = batch["c2w"].to(**to), torch.as_tensor(batch["fovy"]).to(**to)
            cams.update(c2w=c2w, fovy=fovy)
            rays_o, rays_d = get_rays(c2w, fovy, height, width)
        cams.update(rays_o=rays_o.to(**to), rays_d=rays_d.to(**to))
        light = batch.get("light_positions", batch.get("camera_positions"))
        if light is None:
            light = batch["c2w"][:, :3, 3]
        return render(
            obj,
            cams,
            light_dirs=F.normalize(light.to(**to), dim=-1),
            ambient=self.cfg.ambient,
            diffuse=self.cfg.diffuse,
            background=self.cfg.background,
            supersample=self.cfg.supersample,
            shading=self.cfg.shading,
            max_steps=self.cfg.max_steps,
        )

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        return frozenset({"opacity"})

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        """``inp.rgb`` [B,H,W,3] in [0,1] at ``inp.extras``' cameras (rays, lights), ``inp.opacity``.

        Returns loss_rgb (MSE to the ground truth), loss_mask (when the render has an opacity), and the
        scalar diagnostic psnr (dB, of rgb against the ground truth). The ground-truth images come
        from :meth:`ground_truth` (kept out of the output so loggers only see scalars).
        """
        rgb = inp.rgb
        B, H, W, _ = rgb.shape
        batch = {**inp.extras, "c2w": inp.cameras.c2w, "fovy": inp.cameras.fovy}
        gt = self.ground_truth(self._prompt(inp.prompt), batch, H, W, rgb)
        loss_rgb = F.mse_loss(rgb, gt["rgb"].to(rgb.dtype))
        losses: dict[str, Tensor] = {"loss_rgb": loss_rgb}
        opacity = inp.opacity
        if opacity is not None:
            if self.cfg.mask_loss == "bce":
                # Written out (not F.binary_cross_entropy), which autocast refuses; float32 for the logs.
                op = opacity.float().clamp(1e-5, 1.0 - 1e-5)
                m = gt["mask"].to(op)
                losses["loss_mask"] = -(m * torch.log(op) + (1.0 - m) * torch.log1p(-op)).mean()
            else:
                losses["loss_mask"] = F.mse_loss(opacity, gt["mask"].to(opacity.dtype))
        with torch.no_grad():
            mse = loss_rgb.detach().clamp(min=1e-10)
            psnr = -10.0 * torch.log10(mse)
        return GuidanceOutput(losses, {"psnr": psnr})
