"""Texture refinement targets from the toy-world prior: DreamGaussian's "multi-step denoised renders".

DreamGaussian (Tang et al., ICLR 2024) refines the UV texture of its extracted mesh without SDS:
each render ``x`` is noised part of the way (a small timestep ``t_s = strength * T``), denoised back
to ``t = 0`` in a few DDIM steps of the prior with classifier-free guidance, and the texture is
fitted to that cleaner image by a plain MSE::

    x_ts   = sqrt(a_ts) x + sqrt(1 - a_ts) eps
    target = DDIM(x_ts; t_s -> 0, n_steps, CFG)        (no gradient)
    loss_refine = mean((x - target)^2)

A small strength keeps the layout and colours of the render and only sharpens them, so the texture
converges to a detail-preserving fixed point instead of SDS's oversaturated mode seeking.

The DDIM steps (eta = 0) visit ``t_k = round(t_s (n - k) / n)``, k = 0..n-1, then land on the clean
image (``a = 1``); the predicted clean image is clipped to [-1, 1] at every step and the noise
re-derived from the clipped image, as the prior's sampler (:func:`lift3d.priors.toyworld.model.sample`)
does. Renders are resized to the prior's
resolution for denoising and the target back to the render's size for the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import Scheduled
from lift3d.guidance.base import BaseGuidance
from lift3d.guidance.toyworld import ToyWorldGuidance
from lift3d.registry import register


@register("toyworld-refine-guidance")
class ToyWorldRefineGuidance(ToyWorldGuidance):
    """MSE to the multi-step denoised render; returns ``loss_refine`` and the target as ``denoised``."""

    @dataclass
    class Config(BaseGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a toy-world safetensors file; null: the weights shipped in lift3d."""
        guidance_scale: Scheduled = 7.5
        """Classifier-free guidance scale of the denoising steps."""
        strength: Scheduled = 0.3
        """How far the render is noised, as a fraction of the training timesteps (0: the target is the render
        itself; DreamGaussian uses small values so only details change)."""
        n_steps: int = 4
        """DDIM steps from the noised render back to a clean image (capped at the starting timestep)."""

    cfg: Config

    def configure(self) -> None:
        if self.cfg.n_steps < 1:
            raise ValueError(f"toyworld-refine-guidance: n_steps must be >= 1, got {self.cfg.n_steps}")
        super().configure()

    def timesteps(self, strength: float) -> list[int]:
        """The DDIM timesteps visited for ``strength`` (descending; empty when strength is 0)."""
        t_start = int(round(min(max(float(strength), 0.0), 1.0) * (self.num_train_timesteps - 1)))
        n = min(self.cfg.n_steps, t_start)
        return [int(round(t_start * (n - k) / n)) for k in range(n)]

    def forward(self, rgb: Tensor, prompt_utils: Any = None, elevation: Tensor | None = None,
                azimuth: Tensor | None = None, camera_distances: Tensor | None = None, noise: Tensor | None = None,
                **batch: Any) -> dict[str, Any]:
        from lift3d.priors.toyworld.model import predict_eps_x0

        self._check_inputs(prompt_utils, elevation, azimuth, camera_distances)
        B, H, W, _ = rgb.shape
        dev = rgb.device
        ts = self.timesteps(self.C(self.cfg.strength))
        if not ts:
            target = rgb.detach()
        else:
            with torch.no_grad():
                x = self._to_prior(rgb.detach())  # [B, 3, res, res]
                if noise is None:
                    noise = torch.randn_like(x)
                a0 = self.alphas_cumprod[ts[0]]
                x = a0.sqrt() * x + (1 - a0).sqrt() * noise.to(x)
                cond, uncond, uncond_drop, cam = self._conditions(
                    prompt_utils, B, dev, elevation, azimuth, camera_distances)
                tokens = torch.cat([cond, uncond])
                drop = torch.cat([torch.zeros_like(uncond_drop), uncond_drop])
                cam = torch.cat([cam, cam])
                scale = self.C(self.cfg.guidance_scale)
                for k, t in enumerate(ts):
                    out = self.prior(torch.cat([x, x]), torch.full((2 * B,), t, device=dev, dtype=torch.long),
                                     tokens, cam, drop)
                    out_c, out_u = out.chunk(2)
                    a = self.alphas_cumprod[t]
                    eps, x0 = predict_eps_x0(self.prior.cfg, out_u + scale * (out_c - out_u), x, a.expand(B))
                    # Clip the clean estimate and re-derive the noise from it: the unclipped noise
                    # would carry a guided overshoot into the next step's input.
                    x0 = x0.clamp(-1, 1)
                    eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
                    a_prev = self.alphas_cumprod[ts[k + 1]] if k + 1 < len(ts) else torch.ones_like(a)
                    x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
                target = ((x + 1) / 2).permute(0, 2, 3, 1)
                if target.shape[1:3] != (H, W):
                    target = F.interpolate(target.permute(0, 3, 1, 2), (H, W), mode="bilinear",
                                           align_corners=False).permute(0, 2, 3, 1)
                target = target.to(rgb.dtype).contiguous()
        return {
            "loss_refine": F.mse_loss(rgb, target),
            "denoised": target,
            "t_start": torch.tensor(ts[0] if ts else 0),
        }
