"""Score distillation (SDS, DreamFusion, Poole et al. 2022) against the embedded toy-world prior.

The prior is conditioned on the camera, so the batch's elevation, azimuth and distance play the
role that view-dependent prompting plays for text-only priors. For a render ``x`` (in [-1, 1]),
timestep ``t`` and noise ``eps``::

    x_t  = sqrt(a_t) x + sqrt(1 - a_t) eps
    grad = w(t) (eps_cfg(x_t, t) - eps)          # d loss_sds / d x
         = w(t) sqrt(a_t / (1 - a_t)) (x - x0_cfg(x_t, t))

so the gradient vanishes exactly where the render equals the prior's (guided) denoised estimate.
``loss_sds = 0.5 * ||x - sg(x - grad)||^2 / B`` has that gradient. ``w(t)`` is ``1 - a_t``
(DreamFusion's choice, "sds"), ``1`` ("uniform"), or ``sqrt(a_t)(1 - a_t)`` ("fantasia3d").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lift3d.config import Scheduled
from lift3d.guidance.base import BaseGuidance
from lift3d.registry import register


@register("toyworld-guidance")
class ToyWorldGuidance(BaseGuidance):
    """SDS with the toy-world prior; returns ``loss_sds`` and diagnostics."""

    @dataclass
    class Config(BaseGuidance.Config):
        pretrained: Optional[str] = None
        """Path of a toy-world safetensors file; null: the weights shipped in lift3d."""
        guidance_scale: Scheduled = 7.5
        """Classifier-free guidance scale."""
        min_step_percent: Scheduled = 0.02
        """Lowest timestep sampled, as a fraction of the training steps."""
        max_step_percent: Scheduled = 0.98
        """Highest timestep sampled (anneal it down for detail late in training)."""
        weighting: Literal["sds", "uniform", "fantasia3d"] = "sds"
        """w(t) in the SDS gradient."""
        grad_clip: Optional[float] = None
        """Clamp each gradient element to [-grad_clip, grad_clip]."""
        image: Literal["rgb", "normal"] = "rgb"
        """What the prior scores: the shaded render, or the normal map ``(n + 1) / 2`` over black (the
        renderer's ``comp_normal``), as in Fantasia3D's geometry stage."""

    def configure(self) -> None:
        from lift3d.priors.toyworld.model import ToyWorldPrior, make_scheduler

        prior = ToyWorldPrior.load(self.cfg.pretrained)
        prior.requires_grad_(False).eval()
        # Frozen and not a submodule: it must stay out of the system's optimizer and checkpoints.
        self.__dict__["prior"] = prior
        sched = make_scheduler(prior.cfg, "ddpm")
        self.register_buffer("alphas_cumprod", sched.alphas_cumprod.clone().float(), persistent=False)
        self.num_train_timesteps = prior.cfg.num_train_timesteps

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "ToyWorldGuidance":
        self.prior._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def _tokens(self, text: str, batch: int, device: torch.device) -> Tensor:
        from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

        return pad_tokens([tokenize(text)] * batch).to(device)

    def weight(self, t: Tensor) -> Tensor:
        a = self.alphas_cumprod[t]
        if self.cfg.weighting == "sds":
            return 1 - a
        if self.cfg.weighting == "fantasia3d":
            return a.sqrt() * (1 - a)
        return torch.ones_like(a)

    # -- pieces every toy-world guidance shares -------------------------------------------------

    def _check_inputs(self, prompt_utils: Any, elevation: Any, azimuth: Any, camera_distances: Any) -> None:
        name = getattr(type(self), "registry_name", type(self).__name__)
        if prompt_utils is None or not getattr(prompt_utils, "prompt", ""):
            raise ValueError(f"{name} needs a prompt (set prompt=... on the command line)")
        if elevation is None or azimuth is None or camera_distances is None:
            raise ValueError(f"{name} needs the batch's elevation, azimuth and camera_distances")

    def _scored_image(self, rgb: Tensor, batch: dict[str, Any]) -> Tensor:
        """The render the prior scores ([B, H, W, 3] in [0, 1]): ``rgb`` or the normal map."""
        if getattr(self.cfg, "image", "rgb") != "normal":
            return rgb
        normal = batch.get("comp_normal")
        if normal is None:
            name = getattr(type(self), "registry_name", type(self).__name__)
            raise ValueError(f"{name} image: normal needs the render's comp_normal; use a renderer that returns "
                             "normals (mesh-rasterizer, or a volume renderer with normals)")
        return normal

    def _to_prior(self, rgb: Tensor) -> Tensor:
        """[B, H, W, 3] in [0, 1] -> [B, 3, res, res] in [-1, 1] at the prior's resolution."""
        res = self.prior.cfg.resolution
        x = rgb.permute(0, 3, 1, 2)
        if x.shape[-2:] != (res, res):
            x = F.interpolate(x, (res, res), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    def _step_range(self) -> tuple[int, int]:
        """(lo, hi) timesteps from the (scheduled) min/max step percentages, clamped to the schedule."""
        n = self.num_train_timesteps
        lo = int(self.C(self.cfg.min_step_percent) * n)
        hi = int(self.C(self.cfg.max_step_percent) * n)
        return max(0, min(lo, n - 1)), max(1, min(hi, n - 1))

    def _conditions(self, prompt_utils: Any, B: int, dev: torch.device, elevation: Tensor, azimuth: Tensor,
                    camera_distances: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(cond tokens, uncond tokens, uncond text-drop mask [B], camera vectors [B, 4]).

        The unconditional branch is the negative prompt when there is one, else the dropped text.
        """
        from lift3d.priors.toyworld.data import camera_vector

        cond = self._tokens(prompt_utils.prompt, B, dev)
        neg = getattr(prompt_utils, "negative_prompt", "")
        uncond = self._tokens(neg, B, dev) if neg else cond
        uncond_drop = torch.full((B,), not neg, dtype=torch.bool, device=dev)
        cam = camera_vector(elevation.float(), azimuth.float(), camera_distances.float()).to(dev)
        return cond, uncond, uncond_drop, cam

    def _prepare(self, rgb: Tensor, prompt_utils: Any, elevation: Any, azimuth: Any, camera_distances: Any,
                 t: Tensor | None, noise: Tensor | None, batch: dict[str, Any]) -> tuple:
        """Checked inputs of a score-distillation step: (x [B,3,res,res] in [-1,1], t [B], noise,
        lo, hi, conditions) with ``t`` drawn in [lo, hi) and ``noise`` drawn unless given."""
        self._check_inputs(prompt_utils, elevation, azimuth, camera_distances)
        x = self._to_prior(self._scored_image(rgb, batch))
        B, dev = x.shape[0], x.device
        lo, hi = self._step_range()
        if t is None:
            t = torch.randint(lo, max(hi, lo + 1), (B,), device=dev)
        if noise is None:
            noise = torch.randn_like(x)
        conds = self._conditions(prompt_utils, B, dev, elevation, azimuth, camera_distances)
        return x, t, noise, lo, hi, conds

    def forward(self, rgb: Tensor, prompt_utils: Any = None, elevation: Tensor | None = None,
                azimuth: Tensor | None = None, camera_distances: Tensor | None = None, t: Tensor | None = None,
                noise: Tensor | None = None, **batch: Any) -> dict[str, Any]:
        from lift3d.priors.toyworld.model import predict_eps_x0

        x, t, noise, lo, hi, (cond_tokens, uncond_tokens, uncond_drop, cam) = self._prepare(
            rgb, prompt_utils, elevation, azimuth, camera_distances, t, noise, batch)
        B = x.shape[0]
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        drop = torch.cat([torch.zeros_like(uncond_drop), uncond_drop])
        with torch.no_grad():
            x_t = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
            out = self.prior(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond_tokens, uncond_tokens]),
                             torch.cat([cam, cam]), drop)
            eps, x0 = predict_eps_x0(self.prior.cfg, out, torch.cat([x_t, x_t]), torch.cat([a.view(-1)] * 2))
            e_c, e_u = eps.chunk(2)
            scale = self.C(self.cfg.guidance_scale)
            eps_cfg = e_u + scale * (e_c - e_u)
            grad = self.weight(t).view(-1, 1, 1, 1) * (eps_cfg - noise)
            grad = torch.nan_to_num(grad)
            if self.cfg.grad_clip is not None:
                grad = grad.clamp(-self.cfg.grad_clip, self.cfg.grad_clip)
            denoised = (x_t - (1 - a).sqrt() * eps_cfg) / a.sqrt()
        target = (x - grad).detach()
        loss_sds = 0.5 * F.mse_loss(x, target, reduction="sum") / B
        return {
            "loss_sds": loss_sds,
            "grad_norm": grad.norm(),
            "min_step": torch.tensor(lo),
            "max_step": torch.tensor(hi),
            "denoised": ((denoised + 1) / 2).detach(),
            "t": t,
        }
