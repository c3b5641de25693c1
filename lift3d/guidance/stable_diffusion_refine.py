"""DreamGaussian's texture refinement on Stable Diffusion: ``stable-diffusion-refine-guidance``.

DreamGaussian (Tang et al., ICLR 2024) ends with a short stage on the mesh extracted from its
Gaussians: each render of the UV-textured mesh is encoded by SD's VAE, noised to a small
timestep, denoised back in a few DDIM steps under classifier-free guidance, decoded, and the
texture is fitted to that cleaner image by an MSE (``loss_refine``). The refinement maths is the
core's :class:`~lift3d.guidance.score_distillation.RefineGuidance`; the prior is
:class:`~lift3d.guidance.stable_diffusion.StableDiffusionPrior`, loaded as ``stable-diffusion-guidance``
loads it (same weight keys, dtype per device, offload).

One difference from the core loop: the clean estimate is not clipped to [-1, 1] between DDIM
steps. That clip suits pixel-space priors (the toy world, IF), whose images live in [-1, 1]; SD's
scaled latents have unit spread and routinely lie outside it, so clipping them would bend every
target (diffusers' SD schedulers ship with ``clip_sample: false`` for that reason, and
DreamGaussian steps a DDIM scheduler configured so). The decoded target is still clamped to
[0, 1] by the VAE decode.

Defaults follow DreamGaussian's text-to-3D texture stage: guidance scale 100 (it writes
``e_u + s (e_c - e_u)``, as we do) and a start near t = 0.2 T; its 50-step DDIM grid walks 10 steps
down from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import ConfigError, Scheduled
from lift3d.guidance.base import GuidanceInput, GuidanceOutput
from lift3d.guidance.score_distillation import RefineGuidance
from lift3d.guidance.stable_diffusion import StableDiffusionWeights, _StableDiffusionPrior
from lift3d.registry import register


class LatentRefineGuidance(RefineGuidance):
    """The refinement loop of a prior that denoises in a VAE latent space (Stable Diffusion, Zero123):
    no clip of the clean estimate between DDIM steps; the target is decoded and compared with the render.

    Diagnostics: ``denoised`` [B, H, W, 3], the target at the render's size, and ``t_start``.
    """

    def configure(self) -> None:
        if self.cfg.image == "latents":
            raise ConfigError(f"{self._cfg_key}.image: the refinement target is a decoded image compared with "
                              "the render; use image: rgb (or normal), not latents")
        super().configure()

    def refined(self, img: Tensor, inp: GuidanceInput, ts: list[int], noise: Tensor | None) -> Tensor:
        """The target for renders ``img`` [B, H, W, 3]: encoded, noised to ``ts[0]`` (``noise`` [B, C, h, w]
        or drawn), DDIM-denoised through ``ts`` under CFG, decoded and resized to [B, H, W, 3]."""
        B, H, W, _ = img.shape
        x = self.prior.encode(img)
        if noise is None:
            noise = torch.randn_like(x)
        ac = self.alphas_cumprod
        a0 = ac[ts[0]]
        x = a0.sqrt() * x + (1 - a0).sqrt() * noise.to(x)
        conds = self.prior.condition(inp, self.cfg.view_dependent_prompting)
        scale = self.C(self.cfg.guidance_scale)
        for k, tk in enumerate(ts):
            tt = torch.full((B,), tk, device=x.device, dtype=torch.long)
            out_c, out_u = self.prior.predict_branches(x, tt, [conds.cond, conds.uncond]).chunk(2)
            a = ac[tk]
            eps, x0 = self.prior.eps_x0(out_u + scale * (out_c - out_u), x, a.expand(B))
            a_prev = ac[ts[k + 1]] if k + 1 < len(ts) else torch.ones_like(a)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        target = self.prior.decode(x)
        if target.shape[1:3] != (H, W):
            target = F.interpolate(target.permute(0, 3, 1, 2), (H, W), mode="bilinear",
                                   align_corners=False).permute(0, 2, 3, 1)
        return target.to(img.dtype).contiguous()

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        what = self.cfg.image
        img = inp.normal if what == "normal" else inp.rgb
        if img is None:
            raise ValueError(f"{self.name()} image: {what} got no "
                             f"{'normal map (comp_normal)' if what == 'normal' else 'render'}")
        ts = self.timesteps(self.C(self.cfg.strength))
        if not ts:
            target = img.detach()
        else:
            with torch.no_grad():
                target = self.refined(img.detach(), inp, ts, noise)
        diagnostics: dict[str, Any] = {"denoised": target, "t_start": torch.tensor(ts[0] if ts else 0)}
        return GuidanceOutput(losses={"loss_refine": F.mse_loss(img, target)}, diagnostics=diagnostics)


@register("stable-diffusion-refine-guidance")
class StableDiffusionRefineGuidance(_StableDiffusionPrior, LatentRefineGuidance):
    """MSE to Stable Diffusion's multi-step denoised render; returns ``loss_refine``."""

    @dataclass
    class Config(RefineGuidance.Config, StableDiffusionWeights):
        guidance_scale: Scheduled = 100.0
        """Classifier-free guidance scale of the denoising steps, ``e_u + s (e_c - e_u)`` on the
        model's output (DreamGaussian's refine uses 100 in the same form)."""
        strength: Scheduled = 0.2
        """How far each render is noised, as a fraction of the timesteps (0: the target is the
        render). DreamGaussian's text recipe goes from about 0.18 to 0.04 over its texture stage."""
        n_steps: int = 10
        """DDIM steps from the noised render back to a clean latent (capped at the starting timestep)."""

    cfg: Config


__all__ = ["LatentRefineGuidance", "StableDiffusionRefineGuidance"]
