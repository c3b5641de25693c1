"""Sampling SyncDreamer's 16 views: the authors' DDIM sampler (eta 1 by default) with classifier-free guidance.

The authors' ``generate.py`` samples with 50 DDIM steps, ``eta = 1`` (stochastic) and guidance
scale 2 (1.5 also suggested). Their timesteps are ``0, T/steps, 2 T/steps, ...`` plus one
(``1, 21, ..., 981`` for 50 steps of 1000), walked from the last; the previous alpha of the first
one is ``alphas_cumprod[0]``. Each step predicts the noise of all 16 views at once (the spatial
volume is built from all of them), then moves every view:
``x0 = (x - sqrt(1 - a) e) / sqrt(a)``,
``x' = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) e + s n``, with
``s = eta sqrt((1 - a_prev) / (1 - a) (1 - a / a_prev))`` and fresh noise ``n`` except at the last step.

Everything random (the initial noise, the input latent's posterior sample, the per-step noise)
comes from one ``torch.Generator`` seeded by ``seed``: the same seed, steps and model give the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.priors.syncdreamer import cameras as cams
from lift3d.priors.syncdreamer.model import SyncDreamer


def ddim_timesteps(n_train: int, steps: int) -> np.ndarray:
    """The authors' ``uniform`` DDIM timesteps, ascending."""
    if not 1 <= steps <= n_train:
        raise ValueError(f"sampling needs between 1 and {n_train} steps, got {steps}")
    return np.arange(0, n_train, n_train // steps) + 1


def ddim_schedule(alphas_cumprod: Tensor, steps: int, eta: float = 1.0) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
    """(timesteps, a, a_prev, sigma) of the authors' DDIM sampler, indexed like the timesteps (ascending)."""
    a_all = alphas_cumprod.float().cpu()
    ts = ddim_timesteps(int(a_all.shape[0]), steps)
    a = a_all[ts]
    a_prev = torch.cat([a_all[:1], a_all[ts[:-1]]])
    return ts, a, a_prev, eta * torch.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))


def ddim_update(x: Tensor, e: Tensor, a: float, a_prev: float, sigma: float, noise: Optional[Tensor] = None) -> Tensor:
    """One DDIM move from ``x`` with predicted noise ``e`` (``noise`` scaled by ``sigma`` added when given)."""
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma * sigma, 1e-7)) * e
    return x + sigma * noise if noise is not None and sigma > 0 else x


@dataclass
class SampleResult:
    views: Float[Tensor, "16 3 H W"]
    """The 16 views in [0, 1], azimuths 0, 22.5, ... from the input view."""
    cameras: dict[str, Tensor]
    """``elevation``, ``azimuth``, ``distance``, ``fovy`` [16] in lift3d's convention (degrees)."""


@torch.no_grad()
def sample_latents(model: SyncDreamer, image: Float[Tensor, "1 3 H W"], elevation: float, *, steps: int = 50,
                   guidance_scale: float = 2.0, eta: float = 1.0, seed: int = 0, view_batch: int = 16
                   ) -> Float[Tensor, "1 16 4 h w"]:
    """The final latents of the 16 views for ``image`` (RGB in [0, 1] at the model's size, on white) seen from
    ``elevation`` degrees."""
    dev = model.device
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    cfg = model.cfg
    size = cfg.image_size
    if tuple(image.shape[-2:]) != (size, size):
        raise ValueError(f"SyncDreamer's input image must be {size}x{size}, got {tuple(image.shape[-2:])}")
    latent = model.input_latent(image, g)
    clip = model.clip_embedding(image)
    elev = torch.tensor([float(elevation)], device=dev)
    ts, a, a_prev, sigma = ddim_schedule(model.alphas_cumprod, steps, eta)
    n = cfg.latent_size
    x = torch.randn(1, cams.N_VIEWS, int(model.vae.config.latent_channels), n, n, generator=g).to(dev)
    for i in reversed(range(len(ts))):
        e = model.predict(x, torch.tensor([int(ts[i])], device=dev), latent, clip, elev,
                          guidance_scale=guidance_scale, view_batch=view_batch)
        s = float(sigma[i])
        noise = torch.randn(x.shape, generator=g).to(dev) if i > 0 and s > 0 else None
        x = ddim_update(x, e, float(a[i]), float(a_prev[i]), s, noise)
    return x


@torch.no_grad()
def sample_views(model: SyncDreamer, image: Float[Tensor, "1 3 H W"], elevation: float, *,
                 distance: Optional[float] = None, **kwargs) -> SampleResult:
    """The 16 views of ``image`` and their cameras (``distance`` rescales the scene; default the model's 1.5).
    Keyword arguments go to :func:`sample_latents`."""
    z = sample_latents(model, image, elevation, **kwargs)[0]
    views = torch.cat([model.decode(z[i:i + 4]) for i in range(0, z.shape[0], 4)]).cpu()
    return SampleResult(views=views, cameras=cams.view_table(distance))


__all__ = ["ddim_timesteps", "ddim_schedule", "ddim_update", "sample_latents", "sample_views", "SampleResult"]
