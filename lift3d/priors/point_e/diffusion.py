"""Point-E's Gaussian diffusion: noise schedules, channel scaling, learned-range variance and samplers.

Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts"
(arXiv:2212.08751), which reuses the diffusion of Nichol & Dhariwal 2021 ("Improved Denoising Diffusion
Probabilistic Models"): epsilon prediction, a learned interpolation between the two reference variances
("learned_range"), 1024 training steps; the base model uses the cosine schedule, the upsampler the
linear one (Ho et al.'s betas rescaled to 1024 steps).

The model works on *scaled* channels: a raw cloud (xyz, rgb in 0..255) times ``channel_scales`` plus
``channel_biases``, so xyz doubles and colours land in [-1, 1]. :meth:`PointDiffusionSchedule.to_model_space`
takes colours in [0, 1] (lift3d's convention) and multiplies them by 255 first, so the scales stay the
reference's numbers.

Sampling, as the reference's text-to-point-cloud example does by default: Karras et al. 2022's Heun
sampler (their Algorithm 2) on the sigma = sqrt(1/alpha_bar - 1) parameterisation, 64 steps, rho 7,
sigma in [1e-3, 120] with churn 3 for the base model and [1e-3, 160] without churn for the upsampler.
The Gaussian model is turned into a denoiser by scaling its input by 1/sqrt(1 + sigma^2), evaluating it at
the training timestep whose alpha_bar matches sigma (linear interpolation, truncated to an integer), and
taking its x0 prediction clamped to [-1, 1]. Classifier-free guidance mixes the conditional and
unconditional *x0 predictions*; the result is the last x0 prediction, not the last iterate.
A DDPM ancestral sampler with the learned variance (:func:`ddpm_sample`) is given as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "PointDiffusionSchedule", "named_betas", "karras_sigmas", "karras_heun_sample", "GaussianKarrasDenoiser",
    "ddpm_sample", "BASE_SAMPLER", "UPSAMPLER_SAMPLER", "KarrasSettings",
]


def named_betas(schedule: str, timesteps: int) -> np.ndarray:
    """Point-E's beta schedules (float64): ``cosine`` (Nichol & Dhariwal, s=0.008, beta <= 0.999) or ``linear``."""
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)
    if schedule == "cosine":
        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1.0 - abar((i + 1) / timesteps) / abar(i / timesteps), 0.999) for i in range(timesteps)],
                        dtype=np.float64)
    raise ValueError(f"unknown Point-E noise schedule {schedule!r}; valid: 'cosine', 'linear'")


@dataclass
class PointDiffusionSchedule:
    """Point-E's diffusion settings and the maths that follows from them (defaults: the base model)."""

    timesteps: int = 1024
    schedule: str = "cosine"
    """``cosine`` (base models) or ``linear`` (the upsampler)."""
    channel_scales: tuple = (2.0, 2.0, 2.0, 2.0 / 255.0, 2.0 / 255.0, 2.0 / 255.0)
    """Multiply the raw channels (xyz, rgb in 0..255) to get the model's space."""
    channel_biases: tuple = (0.0, 0.0, 0.0, -1.0, -1.0, -1.0)
    """Added after the scales."""

    def betas(self) -> Tensor:  # [T] float64
        return torch.from_numpy(named_betas(self.schedule, self.timesteps))

    def alphas_cumprod(self) -> Tensor:  # [T] float64
        return torch.cumprod(1.0 - self.betas(), dim=0)

    # --- channel scaling -------------------------------------------------------------------------
    def _affine(self, like: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.tensor(self.channel_scales, dtype=like.dtype, device=like.device)[None, :, None]
        b = torch.tensor(self.channel_biases, dtype=like.dtype, device=like.device)[None, :, None]
        return s, b

    def scale_channels(self, raw: Tensor) -> Tensor:
        """raw [B, C, N] (xyz, rgb in 0..255) -> the model's space."""
        s, b = self._affine(raw)
        return raw * s + b

    def unscale_channels(self, x: Tensor) -> Tensor:
        """The model's space [B, C, N] -> raw (xyz, rgb in 0..255)."""
        s, b = self._affine(x)
        return (x - b) / s

    def to_model_space(self, xyz: Tensor, rgb: Tensor) -> Tensor:
        """xyz [B, N, 3] (Point-E's frame), rgb [B, N, 3] in [0, 1] -> x [B, 6, N] as the model reads it."""
        raw = torch.cat([xyz, rgb * 255.0], dim=-1).transpose(1, 2)
        return self.scale_channels(raw)

    def from_model_space(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, 6, N] -> (xyz [B, N, 3], rgb [B, N, 3] in [0, 1], unclipped)."""
        raw = self.unscale_channels(x).transpose(1, 2)
        return raw[..., :3], raw[..., 3:] / 255.0

    # --- Gaussian diffusion maths (float64 tables, gathered at t) ------------------------------
    def _at(self, table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        return table.to(like.device)[t.long()].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        ab = self.alphas_cumprod()
        return self._at(ab.sqrt(), t, x0) * x0 + self._at((1 - ab).sqrt(), t, x0) * noise

    def pred_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        ab = self.alphas_cumprod()
        return self._at((1 / ab).sqrt(), t, x_t) * x_t - self._at((1 / ab - 1).sqrt(), t, x_t) * eps

    def p_mean_variance(self, model_out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool = True) -> dict:
        """From the model's output [B, 2C, N] (eps, then learned-range values in [-1, 1]) at (x_t, t):
        ``pred_x0`` (clamped to [-1, 1] if asked), the posterior ``mean`` and ``log_variance``.

        learned_range: log variance = frac * log(beta_t) + (1 - frac) * log(posterior variance_t), with
        frac = (v + 1) / 2; the posterior variance at t=0 is replaced by the one at t=1 (it is zero there).
        """
        c = x_t.shape[1]
        if model_out.shape[1] != 2 * c:
            raise ValueError(f"learned-range output needs {2 * c} channels for x with {c}, got {model_out.shape[1]}")
        eps, v = model_out[:, :c], model_out[:, c:]
        betas = self.betas()
        ab = torch.cumprod(1 - betas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post_var = betas * (1 - ab_prev) / (1 - ab)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        frac = (v + 1) / 2
        log_var = frac * self._at(betas.log(), t, x_t) + (1 - frac) * self._at(post_logvar, t, x_t)
        x0 = self.pred_x0(x_t, t, eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        coef1 = betas * ab_prev.sqrt() / (1 - ab)
        coef2 = (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
        mean = self._at(coef1, t, x_t) * x0 + self._at(coef2, t, x_t) * x_t
        return {"pred_x0": x0, "mean": mean, "log_variance": log_var, "eps": eps}


# --- Karras / Heun sampling ------------------------------------------------------------------------
@dataclass(frozen=True)
class KarrasSettings:
    """One stage's sampler settings (the reference's PointCloudSampler defaults)."""

    steps: int = 64
    sigma_min: float = 1e-3
    sigma_max: float = 120.0
    rho: float = 7.0
    s_churn: float = 3.0
    guidance_scale: float = 3.0


#: The text-to-point-cloud example's stages: the base model guided at 3, the upsampler unguided.
BASE_SAMPLER = KarrasSettings()
UPSAMPLER_SAMPLER = KarrasSettings(sigma_max=160.0, s_churn=0.0, guidance_scale=0.0)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al.'s noise levels, float32 (as the reference), with a final 0: [steps + 1]."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)])


class GaussianKarrasDenoiser:
    """A Point-E Gaussian model seen as a Karras denoiser: (x, sigma [B]) -> clamped x0 in model space.

    ``model_fn(x_vp, t_long) -> [B, 2C, N]`` (the network with its condition bound).
    """

    def __init__(self, model_fn: Callable[[Tensor, Tensor], Tensor], schedule: PointDiffusionSchedule,
                 clip_denoised: bool = True):
        self.model_fn = model_fn
        self.schedule = schedule
        self.clip_denoised = clip_denoised
        ab = schedule.alphas_cumprod().numpy()
        self._ab = ab

    def sigma_to_t(self, sigma: float) -> int:
        """The training timestep whose alpha_bar matches 1/(1 + sigma^2), interpolated then truncated."""
        ab = self._ab
        # float32, as the reference computes it from its float32 sigmas (this decides the truncation).
        a = float(np.float32(1.0) / (np.float32(sigma) ** 2 + np.float32(1.0)))
        if a > ab[0]:
            return 0
        if a <= ab[-1]:
            return len(ab) - 1
        # alpha_bar decreases with t: interpolate t over the reversed (increasing) table.
        return int(np.interp(a, ab[::-1], np.arange(len(ab))[::-1].astype(np.float64)))

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        t = torch.tensor([self.sigma_to_t(s) for s in sigma.float().cpu().numpy()], dtype=torch.long, device=x.device)
        c_in = (1.0 / (sigma.to(x.dtype) ** 2 + 1).sqrt()).view(-1, *([1] * (x.ndim - 1)))
        x_vp = x * c_in
        out = self.model_fn(x_vp, t)
        c = x.shape[1]
        x0 = self.schedule.pred_x0(x_vp, t, out[:, :c])
        return x0.clamp(-1, 1) if self.clip_denoised else x0


@torch.no_grad()
def karras_heun_sample(denoiser: Callable[[Tensor, Tensor], Tensor], shape: Sequence[int], settings: KarrasSettings,
                       generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                       ) -> Iterator[dict]:
    """Karras et al.'s Algorithm 2 (Heun steps, optional churn), as Point-E runs it.

    ``denoiser(x, sigma [B]) -> x0``, already guided if guidance is wanted. Yields one dict per step
    (``x``, ``sigma``, ``pred_x0``) and finally ``{"x": x, "pred_x0": last x0 prediction}``; Point-E's
    sample is that last ``pred_x0``. Noise is drawn at every step even without churn, so a seed gives the
    reference's random stream when ``generator`` is None and the global seed matches.
    """
    sigmas = karras_sigmas(settings.steps, settings.sigma_min, settings.sigma_max, settings.rho).to(device)
    x = torch.randn(*shape, generator=generator, device=device) * settings.sigma_max
    ones = x.new_ones(x.shape[0])
    n = len(sigmas) - 1
    denoised = x
    for i in range(n):
        gamma = min(settings.s_churn / n, 2 ** 0.5 - 1)
        eps = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = denoiser(x, sigma_hat * ones)
        d = (x - denoised) / sigma_hat
        yield {"x": x, "i": i, "sigma": sigmas[i], "pred_x0": denoised}
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sigmas[i + 1] * ones)) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    yield {"x": x, "pred_x0": denoised}


def guided(denoise_cond_uncond: Callable[[Tensor, Tensor], Tensor], scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Classifier-free guidance on x0 predictions: the wrapped function sees the batch twice
    (conditional half first, unconditional half second) and returns uncond + scale * (cond - uncond)."""
    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = denoise_cond_uncond(torch.cat([x, x]), torch.cat([sigma, sigma]))
        cond, uncond = x0.chunk(2)
        return uncond + scale * (cond - uncond)
    return fn


@torch.no_grad()
def ddpm_sample(model_fn: Callable[[Tensor, Tensor], Tensor], schedule: PointDiffusionSchedule, shape: Sequence[int],
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                clip_denoised: bool = True) -> Tensor:
    """Ancestral DDPM sampling over all ``schedule.timesteps`` steps with the learned variance.

    ``model_fn(x_t, t) -> [B, 2C, N]`` (guidance, if any, mixed into its eps half). Returns x0 in model space.
    """
    x = torch.randn(*shape, generator=generator, device=device)
    for i in reversed(range(schedule.timesteps)):
        t = torch.full((shape[0],), i, dtype=torch.long, device=device)
        out = schedule.p_mean_variance(model_fn(x, t), x, t, clip_denoised=clip_denoised)
        noise = torch.randn(x.shape, generator=generator, device=device)
        x = out["mean"] + (float(i > 0) * torch.exp(0.5 * out["log_variance"])) * noise
    return x
