"""Point-E as a lift3d prior: the text-conditioned point-cloud diffusion model a guidance scores points with.

Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts". A
:class:`PointEPrior` holds the frozen base transformer, its diffusion schedule, optionally the CLIP text
encoder and the upsampler, and offers what a 3D score-distillation guidance needs (``encode_text``,
``predict_eps``, ``schedule.alphas_cumprod()``, ``schedule.to_model_space``) plus the reference's
two-stage text-to-point-cloud sampler (:meth:`PointEPrior.sample`).

Coordinate frames. Point-E's clouds come from Blender renders of its training assets: +z up, and an
asset's front faces -y (Blender's front view; LucidDreamer's Point-E initialisation maps Point-E's -y to
its front axis for the same reason). lift3d's world is +z up with the front at +x. The two differ by a
quarter turn about z: ours = (-y, x, z) of Point-E's, Point-E's = (y, -x, z) of ours
(:func:`point_e_to_world`, :func:`world_to_point_e`). A guidance converts our points with
:meth:`PointEPrior.to_point_e_frame` before :meth:`PointDiffusionSchedule.to_model_space`; ``sample``
returns points in our frame. GSGEN feeds its points to Point-E unrotated; set ``rotate=False`` to match it.
Point-E's clouds are about 0.5 in radius (the reference plots them in [-0.75, 0.75]^3); no scaling is applied.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import load_base_model, load_upsampler_model
from .diffusion import (BASE_SAMPLER, UPSAMPLER_SAMPLER, GaussianKarrasDenoiser, KarrasSettings, PointDiffusionSchedule,
                        guided, karras_heun_sample)
from .network import PointDiffusionTransformer, PointUpsampleTransformer
from .text import null_condition

__all__ = ["PointEPrior", "point_e_to_world", "world_to_point_e", "POINT_E_TO_WORLD"]

#: Rows map Point-E coordinates to ours: ours = POINT_E_TO_WORLD @ point_e (a +90 degree turn about z).
POINT_E_TO_WORLD = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def point_e_to_world(xyz: Tensor) -> Tensor:
    """Point-E frame (+z up, front -y) -> ours (+z up, front +x): [..., 3] -> [..., 3]."""
    return torch.stack([-xyz[..., 1], xyz[..., 0], xyz[..., 2]], dim=-1)


def world_to_point_e(xyz: Tensor) -> Tensor:
    """Ours (+z up, front +x) -> Point-E frame (+z up, front -y): [..., 3] -> [..., 3]."""
    return torch.stack([xyz[..., 1], -xyz[..., 0], xyz[..., 2]], dim=-1)


class PointEPrior(nn.Module):
    """Frozen Point-E: base model + schedule (+ text encoder, + upsampler with its own schedule)."""

    def __init__(self, model: PointDiffusionTransformer, schedule: PointDiffusionSchedule | None = None,
                 text_encoder: nn.Module | None = None, upsampler: PointUpsampleTransformer | None = None,
                 upsampler_schedule: PointDiffusionSchedule | None = None, rotate: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.schedule = schedule or PointDiffusionSchedule()
        self.text_encoder = text_encoder
        self.upsampler = upsampler.eval().requires_grad_(False) if upsampler is not None else None
        self.upsampler_schedule = upsampler_schedule or PointDiffusionSchedule(schedule="linear")
        self.rotate = rotate

    @classmethod
    def from_pretrained(cls, base: str | Path, clip: str | Path | None = None, *, upsampler: str | Path | None = None,
                        dtype: torch.dtype = torch.float32, local_files_only: bool = True, heads: int | None = None,
                        n_ctx: int = 1024, upsampler_n_ctx: int = 3072, grid_tokens: int = 256,
                        rotate: bool = True) -> "PointEPrior":
        """Load the base model (``base_40m_textvec.pt`` in the original key layout, or our safetensors),
        the CLIP text encoder (folder or cached hub id; None: no text encoder, conditions must be given),
        and optionally the upsampler (``upsample_40m.pt``). Never downloads (``local_files_only`` must stay
        True; it is accepted for the diffusers-like signature). ``heads``, ``n_ctx`` (base points),
        ``upsampler_n_ctx`` (new points) and ``grid_tokens`` are not stored in the files; the defaults are
        Point-E's (width / 64 heads, 1024, 3072, 256); the upsampler's conditioning size is the base's n_ctx."""
        if not local_files_only:
            raise ValueError("PointEPrior.from_pretrained never downloads; fetch the files first (see docs)")
        model = load_base_model(base, key="base", heads=heads, n_ctx=n_ctx, dtype=dtype)
        text = None
        if clip is not None:
            from .text import PointETextEncoder
            text = PointETextEncoder.from_pretrained(clip, key="clip", dtype=dtype)
            if model.cfg.cond_dim is not None and text.dim != model.cfg.cond_dim:
                raise ValueError(f"CLIP model {clip} gives {text.dim}-d features but the Point-E model {base} reads "
                                 f"{model.cfg.cond_dim}-d conditions (Point-E text needs CLIP ViT-L/14)")
        up = None
        if upsampler is not None:
            up = load_upsampler_model(upsampler, key="upsampler", heads=heads, n_ctx=upsampler_n_ctx, cond_ctx=n_ctx,
                                      grid_tokens=grid_tokens, dtype=dtype)
        return cls(model, PointDiffusionSchedule(), text, up, PointDiffusionSchedule(schedule="linear"), rotate=rotate)

    # --- what a guidance uses --------------------------------------------------------------------
    def encode_text(self, prompts: list[str]) -> Tensor:
        """prompts -> [B, cond_dim] conditions (normalised CLIP text features times sqrt(dim))."""
        if self.text_encoder is None:
            raise RuntimeError("this PointEPrior has no text encoder: load it with clip=<CLIP ViT-L/14 folder or id>")
        return self.text_encoder(prompts).to(self._device())

    def null_cond(self, batch: int) -> Tensor:
        """The unconditional input of Point-E's classifier-free guidance: zeros [B, cond_dim]."""
        return null_condition(batch, self.model.cfg.cond_dim or 0, device=self._device())

    def predict_eps(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """x_t [B, C, N] in model space, t [B] integer timesteps, cond [B, D] -> eps [B, C, N]."""
        return self.model(x_t, t, cond)[:, : x_t.shape[1]]

    def to_point_e_frame(self, xyz: Tensor) -> Tensor:
        """Our world points [..., 3] -> Point-E's frame (identity when ``rotate`` is False)."""
        return world_to_point_e(xyz) if self.rotate else xyz

    def from_point_e_frame(self, xyz: Tensor) -> Tensor:
        """Point-E's frame [..., 3] -> our world (identity when ``rotate`` is False)."""
        return point_e_to_world(xyz) if self.rotate else xyz

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- sampling ------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts: list[str] | None = None, *, cond: Tensor | None = None, steps: int = BASE_SAMPLER.steps,
               guidance_scale: float = BASE_SAMPLER.guidance_scale, upsample: bool = True,
               upsampler_steps: int = UPSAMPLER_SAMPLER.steps, generator: torch.Generator | None = None,
               n_points: int | None = None) -> tuple[Tensor, Tensor]:
        """Text -> point clouds, as the reference's text-to-point-cloud example: Karras/Heun sampling of the
        base model with guidance on x0, then (if loaded and ``upsample``) the unguided upsampler conditioned
        on the base cloud only.

        Returns (xyz [B, N, 3] in our world frame, rgb [B, N, 3] in [0, 1], rounded to 8 bits as the
        reference does); N = n_ctx, plus the upsampler's points.
        """
        dev = self._device()
        if cond is None:
            if prompts is None:
                raise ValueError("PointEPrior.sample needs prompts or cond")
            cond = self.encode_text(list(prompts))
        cond = cond.to(dev)
        b = cond.shape[0]
        n = n_points or self.model.cfg.n_ctx
        c = self.model.cfg.input_channels
        settings = KarrasSettings(steps=steps, sigma_min=BASE_SAMPLER.sigma_min, sigma_max=BASE_SAMPLER.sigma_max,
                                  rho=BASE_SAMPLER.rho, s_churn=BASE_SAMPLER.s_churn, guidance_scale=guidance_scale)
        use_cfg = guidance_scale not in (0.0, 1.0)
        model_cond = torch.cat([cond, self.null_cond(b)]) if use_cfg else cond
        denoiser = GaussianKarrasDenoiser(lambda x, t: self.model(x, t, model_cond), self.schedule)
        fn = guided(denoiser, guidance_scale) if use_cfg else denoiser
        last = None
        for out in karras_heun_sample(fn, (b, c, n), settings, generator=generator, device=dev):
            last = out["pred_x0"]
        raw = self.schedule.unscale_channels(last)  # [B, C, N]: xyz, rgb 0..255

        if upsample and self.upsampler is not None:
            up = self.upsampler
            low_res = raw
            up_settings = KarrasSettings(steps=upsampler_steps, sigma_min=UPSAMPLER_SAMPLER.sigma_min,
                                         sigma_max=UPSAMPLER_SAMPLER.sigma_max, rho=UPSAMPLER_SAMPLER.rho,
                                         s_churn=UPSAMPLER_SAMPLER.s_churn, guidance_scale=0.0)
            up_denoiser = GaussianKarrasDenoiser(lambda x, t: up(x, t, low_res), self.upsampler_schedule)
            last_up = None
            for out in karras_heun_sample(up_denoiser, (b, up.cfg.input_channels, up.cfg.n_ctx), up_settings,
                                          generator=generator, device=dev):
                last_up = out["pred_x0"]
            raw = torch.cat([low_res, self.upsampler_schedule.unscale_channels(last_up)], dim=-1)

        raw = raw.transpose(1, 2).float()
        xyz = self.from_point_e_frame(raw[..., :3])
        rgb = raw[..., 3:6].clamp(0, 255).round() / 255.0
        return xyz, rgb
