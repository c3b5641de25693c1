"""Sampling Zero123++'s six views: Euler-ancestral or DDIM with classifier-free guidance.

Both samplers run on the training schedule's ``alphas_cumprod`` and convert the model's output (v
for the released models) to a clean estimate and a noise estimate, so one loop serves any
parameterisation. At each step the input image's reference latent is noised to the same timestep
(``sqrt(a_t) c + sqrt(1 - a_t) n``, fresh noise each step, as the original pipeline does through
its scheduler) and run through the UNet before the views (reference attention).

* ``euler_ancestral``: the sampler the Zero123++ authors recommend (diffusers'
  ``EulerAncestralDiscreteScheduler`` with ``timestep_spacing="trailing"``), written in the sigma
  parameterisation ``sigma_t = sqrt((1 - a_t) / a_t)``: a deterministic Euler step to ``sigma_down``,
  then fresh noise of size ``sigma_up``, ending at sigma 0.
  It matches diffusers' scheduler step for step (tested with the same draws).
* ``ddim``: deterministic DDIM (eta 0) from each timestep to the next one of the schedule, ending at
  the clean estimate (diffusers' ``DDIMScheduler`` steps to ``t - T / steps`` instead, one timestep
  off with trailing spacing).

Timesteps are spread ``trailing`` (from the last training timestep down, evenly) or ``linspace``.
Classifier-free guidance combines the two branches' outputs as ``u + s (c - u)``, for ``s > 1``
(at ``s <= 1`` only the conditional branch runs), like the original pipeline.

Everything random comes from one ``torch.Generator`` seeded by ``seed``: the same seed, steps and
model give the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from lift3d.priors.zero123pp.model import Zero123PlusPlus
from lift3d.priors.zero123pp.poses import GRID_COLS, GRID_ROWS, untile, view_cameras

Sampler = Literal["euler_ancestral", "ddim"]
Spacing = Literal["trailing", "linspace"]


def timesteps(n_train: int, steps: int, spacing: Spacing = "trailing") -> list[int]:
    """``steps`` integer timesteps, descending."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(n_train, 0, -n_train / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, n_train - 1, steps)).astype(np.int64)[::-1]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; valid: trailing, linspace")
    return [int(t) for t in ts]


def clean_and_noise(prediction_type: str, out: Tensor, x_t: Tensor, a: float) -> tuple[Tensor, Tensor]:
    """(x0, eps) from the model output ``out`` at the VP sample ``x_t`` with alphas_cumprod ``a``."""
    sa, so = math.sqrt(a), math.sqrt(1.0 - a)
    if prediction_type == "v_prediction":
        return sa * x_t - so * out, so * x_t + sa * out
    if prediction_type == "epsilon":
        return (x_t - so * out) / sa, out
    if prediction_type == "sample":
        return out, (x_t - sa * out) / so
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@dataclass
class SampleResult:
    views: Float[Tensor, "6 3 h w"]
    """The six views in [0, 1], row by row from the grid."""
    grid: Float[Tensor, "3 H W"]
    """The tiled image the model drew (3 rows, 2 columns)."""
    cameras: dict[str, Tensor]
    """``elevation``, ``azimuth``, ``distance``, ``fovy`` [6] in lift3d's convention (degrees)."""


@torch.no_grad()
def sample_latents(model: Zero123PlusPlus, image: Float[Tensor, "1 3 H W"], *, view_size: int = 320,
                   steps: int = 28, guidance_scale: float = 4.0, sampler: Sampler = "euler_ancestral",
                   spacing: Spacing = "trailing", seed: int = 0) -> Tensor:
    """The final latent grid [1, C, 3 h, 2 h] for the input ``image`` (RGB in [0, 1])."""
    dev = model.device
    g = torch.Generator(device="cpu").manual_seed(int(seed))

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(dev)

    if view_size % model.vae_factor:
        raise ValueError(f"view_size {view_size} is not a multiple of the VAE's factor {model.vae_factor}")
    h = view_size // model.vae_factor
    shape = (1, model.latent_channels, GRID_ROWS * h, GRID_COLS * h)
    cond_states, uncond_states = model.encoder_states(image)
    ref_c, ref_u = model.reference_latents(image, g)
    cfg = guidance_scale > 1.0
    states = torch.cat([uncond_states, cond_states]) if cfg else cond_states
    refs = torch.cat([ref_u, ref_c]) if cfg else ref_c
    a_all = model.alphas_cumprod.double().cpu()
    ts = timesteps(int(a_all.shape[0]), steps, spacing)

    def guided(x_vp: Tensor, t: int) -> tuple[Tensor, Tensor]:
        a = float(a_all[t])
        noisy_ref = math.sqrt(a) * refs + math.sqrt(1.0 - a) * randn(*refs.shape)
        x_in = torch.cat([x_vp, x_vp]) if cfg else x_vp
        tt = torch.full((x_in.shape[0],), t, device=dev, dtype=torch.long)
        out = model.predict(x_in, tt, states, noisy_ref)
        if cfg:
            u, c = out.chunk(2)
            out = u + guidance_scale * (c - u)
        return clean_and_noise(model.prediction_type, out, x_vp, a)

    if sampler == "ddim":
        x = randn(*shape)
        for i, t in enumerate(ts):
            x0, eps = guided(x, t)
            a_prev = float(a_all[ts[i + 1]]) if i + 1 < len(ts) else 1.0
            x = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        return x
    if sampler == "euler_ancestral":
        def sigma(t: int) -> float:
            a = float(a_all[t])
            return math.sqrt((1.0 - a) / a)

        x = randn(*shape) * sigma(ts[0])  # in the sigma parameterisation: x_vp * sqrt(1 + sigma^2)
        for i, t in enumerate(ts):
            s = sigma(t)
            x0, _ = guided(x / math.sqrt(s * s + 1.0), t)
            s_next = sigma(ts[i + 1]) if i + 1 < len(ts) else 0.0
            s_up = math.sqrt(max(s_next ** 2 * (s * s - s_next ** 2) / (s * s), 0.0))
            s_down = math.sqrt(max(s_next ** 2 - s_up ** 2, 0.0))
            x = x + (x - x0) / s * (s_down - s)
            if s_up > 0:
                x = x + randn(*shape) * s_up
        return x
    raise ValueError(f"unknown sampler {sampler!r}; valid: euler_ancestral, ddim")


@torch.no_grad()
def sample_views(model: Zero123PlusPlus, image: Float[Tensor, "1 3 H W"], *, version: str = "v1.2",
                 distance: Optional[float] = None, fovy_deg: Optional[float] = None, **kwargs) -> SampleResult:
    """Sample the six views for ``image`` (RGB in [0, 1], see :func:`~lift3d.priors.zero123pp.model.composite_input`)
    and return them with their cameras (``version``'s pose table; ``distance``, ``fovy_deg`` override it).
    Keyword arguments go to :func:`sample_latents`."""
    cams = view_cameras(version, distance, fovy_deg)  # fails early on a v1.1 table without a field of view
    z = sample_latents(model, image, **kwargs)
    grid = model.decode_latents(z)[0].cpu()
    return SampleResult(views=untile(grid), grid=grid, cameras=cams)


__all__ = ["sample_latents", "sample_views", "SampleResult", "timesteps", "clean_and_noise"]
