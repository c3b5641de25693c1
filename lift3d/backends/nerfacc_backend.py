"""nerfacc backend: CUDA occupancy-grid ray marching and packed volume rendering, used when importable.

nerfacc (Li et al., "NerfAcc: Efficient Sampling Accelerates NeRFs", ICCV 2023) marches rays through
its ``OccGridEstimator`` and composites packed samples with CUDA scans. The renderer in
``lift3d.renderers.volume`` is the torch reference; it switches to this backend only when the rays
live on CUDA and nerfacc imports. Importing this module never fails.

nerfacc's dense (``[n_rays, n_samples]``) functions are plain torch and also run on CPU; the tests
use them as the reference for our compositing.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

try:  # pragma: no cover - depends on the machine
    import nerfacc as _nerfacc  # type: ignore

    _IMPORT_ERROR: Exception | None = None
except Exception as exc:
    _nerfacc = None
    _IMPORT_ERROR = exc


def importable() -> bool:
    """True when the nerfacc package imports (its dense path works on CPU)."""
    return _nerfacc is not None


def available() -> bool:
    """True when nerfacc imports and a CUDA device is present (its packed path needs CUDA)."""
    return _nerfacc is not None and torch.cuda.is_available()


def module():
    """The nerfacc module (raises with the import error when missing)."""
    if _nerfacc is None:
        raise RuntimeError(f"nerfacc is not importable ({_IMPORT_ERROR}); install it or use the torch path")
    return _nerfacc


def make_estimator(radius: float, resolution: int, device: torch.device | str) -> torch.nn.Module:
    """An ``OccGridEstimator`` over [-radius, radius]^3 with one level."""
    nerfacc = module()
    aabb = torch.tensor([-radius, -radius, -radius, radius, radius, radius], dtype=torch.float32, device=device)
    return nerfacc.OccGridEstimator(roi_aabb=aabb, resolution=resolution, levels=1).to(device)


def update_estimator(estimator: torch.nn.Module, step: int, occ_eval_fn: Callable[[Tensor], Tensor],
                     occ_thre: float, ema_decay: float, warmup_steps: int, n: int) -> None:
    """nerfacc's EMA occupancy update every ``n`` steps (all cells during warm-up)."""
    estimator.update_every_n_steps(step=step, occ_eval_fn=occ_eval_fn, occ_thre=occ_thre, ema_decay=ema_decay,
                                   warmup_steps=warmup_steps, n=n)


def sample(estimator: torch.nn.Module, rays_o: Tensor, rays_d: Tensor, t_min: Tensor, t_max: Tensor,
           render_step_size: float, stratified: bool, density_fn: Callable[[Tensor], Tensor] | None = None,
           early_stop_eps: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Packed samples in occupied cells: (ray_indices [S] long, t_starts [S], t_ends [S]).

    With ``density_fn`` (points [S, 3] -> density) and ``early_stop_eps`` > 0, samples a ray reaches
    with transmittance below ``early_stop_eps`` are dropped (nerfacc evaluates the density without
    gradients for that).
    """
    sigma_fn = None
    if density_fn is not None and early_stop_eps > 0:
        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            t_mid = (0.5 * (t_starts + t_ends)).unsqueeze(-1)
            return density_fn(rays_o[ray_indices] + rays_d[ray_indices] * t_mid).reshape(-1)
    with torch.no_grad():
        ray_indices, t_starts, t_ends = estimator.sampling(
            rays_o, rays_d, sigma_fn=sigma_fn, t_min=t_min, t_max=t_max, render_step_size=render_step_size,
            stratified=stratified, early_stop_eps=early_stop_eps if sigma_fn is not None else 0.0, alpha_thre=0.0,
        )
    return ray_indices.long(), t_starts, t_ends


def render_weights_packed(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor, ray_indices: Tensor,
                          n_rays: int) -> Tensor:
    """Per-sample weights [S] of packed samples (CUDA scan)."""
    weights, _, _ = module().render_weight_from_density(t_starts, t_ends, sigmas, ray_indices=ray_indices,
                                                        n_rays=n_rays)
    return weights


def render_weights_dense(t_starts: Tensor, t_ends: Tensor, sigmas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """nerfacc's dense compositing ([n_rays, n_samples] inputs): (weights, transmittance, alphas)."""
    return module().render_weight_from_density(t_starts, t_ends, sigmas)


__all__ = [
    "importable",
    "available",
    "module",
    "make_estimator",
    "update_estimator",
    "sample",
    "render_weights_packed",
    "render_weights_dense",
]
