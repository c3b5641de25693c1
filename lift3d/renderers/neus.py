"""NeuS volume renderer: signed distance fields rendered by unbiased, occlusion-aware opacity.

Implements the discrete opacity of NeuS (Wang et al., "NeuS: Learning Neural Implicit Surfaces by
Volume Rendering for Multi-view Reconstruction", NeurIPS 2021), as threestudio's
``neus-volume-renderer`` does for its ``implicit-sdf`` recipes.
Each ray is cut into sections ``[t_start, t_end]`` around its samples; with ``Phi_s(x) =
sigmoid(s x)`` and the learnable inverse deviation ``s = exp(10 * variance)``:

    alpha_i = clamp((Phi_s(f_prev) - Phi_s(f_next)) / Phi_s(f_prev), 0, 1),   w_i = T_i alpha_i,
    T_i = prod_{j<i} (1 - alpha_j)

where ``f_prev``/``f_next`` are the SDF at the section's ends, estimated to first order from the
SDF ``f`` at the sample and its slope along the ray ``cos = <grad f, d>``:
``f_prev = f + cos' (t_start - t)``, ``f_next = f + cos' (t_end - t)``. ``cos'`` is NeuS's
annealed slope: ``-(relu(0.5 - 0.5 cos) (1 - r) + relu(-cos) r)`` with ``r`` rising from 0 to 1
over ``cos_anneal_end_steps``; at ``r = 1`` it is ``min(cos, 0)``, the true slope on entering
rays. Early on (``r = 0``) it is ``(cos - 1) / 2``, zero only for rays leaving exactly along the
normal, so grazing sections and surfaces seen from behind still get opacity and gradients, which
keeps a young field from settling on inside-out surfaces.

We evaluate alpha in log space: ``1 - alpha = Phi_s(f_next) / Phi_s(f_prev)``, so the section's
optical thickness is ``tau = max(0, logsigmoid(s f_prev) - logsigmoid(s f_next))`` and
``alpha = 1 - exp(-tau)`` is the clamped NeuS alpha without the ``+1e-5`` guards NeuS needs
against 0/0 deep inside the shape. ``tau`` is exactly what the NeRF compositing
(:func:`lift3d.renderers.volume.composite_weights`, unit-length bins) consumes, so the
transmittance is shared with ``nerf-volume-renderer`` instead of re-derived.

Sampling (stratified bins between entry and exit of the scene box or sphere, jittered while
training, occupancy-pruned) and eval chunking are borrowed from ``NeRFVolumeRenderer``. The
optional occupancy grid (``lift3d.renderers.occupancy``) keeps cells whose random point has
``|sdf| < cell diagonal + occ_sdf_margin / s``. For a 1-Lipschitz SDF every cell holding a point
with ``|sdf| < occ_sdf_margin / s`` passes, wherever its random point falls, and that shell holds
all but ``~2 exp(-occ_sdf_margin)`` of the logistic density: pruning changes images negligibly
while ``s`` is small and tightens to a thin shell around the surface as ``s`` grows.

Outputs: the keys of ``nerf-volume-renderer`` (``comp_rgb``, ``comp_rgb_fg``, ``comp_rgb_bg``,
``opacity``, ``depth`` [B,H,W,*], ``comp_normal`` [B,H,W,3] always, since NeuS needs the SDF
gradient anyway; packed per sample ``weights``, ``points``, ``t_points``, ``t_intervals``,
``t_dirs``, ``ray_indices``, ``normal``, optionally ``normal_perturb``) and, per sample, ``sdf``
[Nv,1], ``alpha`` [Nv,1] and ``sdf_grad`` [Nv,3] (the unnormalised SDF gradient, when the
geometry returns one). Eikonal regulariser (Gropp et al. 2020, as in NeuS):
``loss_eikonal = ((sdf_grad.norm(dim=-1) - 1) ** 2).mean()`` over all evaluated samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from lift3d.registry import register
from lift3d.renderers.base import BaseRenderer
from lift3d.renderers.occupancy import OccupancyGrid
from lift3d.renderers.volume import NeRFVolumeRenderer, composite_weights

# ``inv_s`` is clamped so a runaway variance cannot overflow exp() or divide by zero.
INV_S_MIN, INV_S_MAX = 1e-6, 1e6


def annealed_cos(cos: Tensor, anneal_ratio: float) -> Tensor:
    """NeuS's slope of the SDF along the ray, [...] -> [...]: ``min(cos, 0)`` at ratio 1.

    At ratio 0 it is ``(cos - 1) / 2``: negative unless the ray leaves exactly along the normal,
    so back-facing surfaces still receive opacity early in training.
    """
    r = float(anneal_ratio)
    return -(F.relu(0.5 - 0.5 * cos) * (1.0 - r) + F.relu(-cos) * r)


def section_sdf(sdf: Tensor, slope: Tensor, t_starts: Tensor, t_ends: Tensor, t_mid: Tensor) -> tuple[Tensor, Tensor]:
    """First-order SDF at the ends of each section: all [...] -> (f_prev, f_next) [...].

    The sample sits at ``t_mid`` inside ``[t_starts, t_ends]`` (not necessarily the centre, since
    training jitters it), so each end is extrapolated by its own distance.
    """
    return sdf + slope * (t_starts - t_mid), sdf + slope * (t_ends - t_mid)


def neus_thickness(sdf_prev: Tensor, sdf_next: Tensor, inv_s: Tensor | float) -> Tensor:
    """Optical thickness ``-log(1 - alpha)`` of NeuS sections, [...] -> [...] (>= 0).

    ``1 - alpha = Phi_s(f_next) / Phi_s(f_prev)``; clamping alpha to [0, 1] is clamping the log
    ratio to <= 0. Log-sigmoids keep both tails exact where the plain ratio would be 0/0.
    """
    return (F.logsigmoid(sdf_prev * inv_s) - F.logsigmoid(sdf_next * inv_s)).clamp(min=0.0)


def neus_alpha(sdf_prev: Tensor, sdf_next: Tensor, inv_s: Tensor | float) -> Tensor:
    """NeuS's discrete opacity ``clamp((Phi_s(f_prev) - Phi_s(f_next)) / Phi_s(f_prev), 0, 1)``, [...]."""
    return -torch.expm1(-neus_thickness(sdf_prev, sdf_next, inv_s))


@register("neus-volume-renderer")
class NeuSVolumeRenderer(BaseRenderer):
    """Volume renderer of signed distance fields (``implicit-sdf`` or any geometry returning ``sdf``)."""

    @classmethod
    def provides_normals(cls, cfg: Any, material_cls: type) -> bool:
        return True

    @dataclass
    class Config(BaseRenderer.Config):
        num_samples_per_ray: int = 512
        """Sections per ray between entry and exit of the scene bound (stratified bins)."""
        randomized: bool = True
        """Jitter samples inside their bins while training (stratified sampling)."""
        eval_chunk_size: int = 160000
        """Rays per chunk when not training (bounds memory at test time)."""
        variance: float = 0.3
        """Initial value of the learnable ``variance``; the inverse deviation of the logistic density
        is ``s = exp(10 * variance)`` (0.3, NeuS's default: s ~ 20, 90% of the density within |sdf| < 0.15)."""
        learn_variance: bool = True
        """Train ``variance`` (a renderer parameter, optimizer path ``renderer.variance``); false keeps s fixed."""
        cos_anneal_end_steps: int = 0
        """Steps over which the slope estimate anneals from NeuS's back-face-friendly ``(cos - 1) / 2``
        to the true ``min(cos, 0)``; 0 uses the true slope from the start."""
        grid_prune: bool = True
        """Skip samples in cells of an occupancy grid that hold no surface (``|sdf|`` above the band,
        see the module docstring)."""
        grid_resolution: int = 32
        """Cells per side of the occupancy grid."""
        occ_update_interval: int = 16
        """Update the occupancy grid every this many steps (in ``update_step``)."""
        occ_warmup_steps: int = 256
        """Steps during which every cell is refreshed at each update."""
        occ_sdf_margin: float = 8.0
        """A cell is occupied while ``|sdf|`` at a random point of it is below its diagonal plus
        ``occ_sdf_margin / s``: the logistic density mass left outside is ~``2 exp(-margin)``."""
        occ_dilation: int = 1
        """Grow the occupied cells by this many cells (conservative pruning near surfaces)."""
        bounding: Literal["box", "sphere"] = "box"
        """Shape whose intersection with each ray gives near and far: the box or the sphere of radius
        ``geometry.cfg.radius``."""
        near_plane: float = 0.0
        """Samples start no closer than this to the ray origin."""
        return_normal_perturb: bool = False
        """Also return ``normal_perturb``: normals at points jittered by ``normal_perturb_std``."""
        normal_perturb_std: float = 0.01
        """Std of the jitter of ``normal_perturb``, in world units."""

    cfg: Config

    # Stratified, occupancy-pruned bins and eval chunking are the NeRF renderer's, reused as they
    # are: they read only cfg.num_samples_per_ray / randomized / grid_prune / bounding / near_plane /
    # eval_chunk_size, self.radius, self.occupancy, self.training and self._render_rays, which this
    # class provides with the same meaning.
    _samples_torch = NeRFVolumeRenderer._samples_torch
    _render_chunked = NeRFVolumeRenderer._render_chunked
    # Per-image assembly (reshape, background, compositing) is the NeRF renderer's; only the
    # per-ray part (_render_rays) differs.
    forward = NeRFVolumeRenderer.forward

    def configure(self, geometry: Any = None, material: Any = None, background: Any = None, **kwargs: Any) -> None:
        super().configure(geometry=geometry, material=material, background=background, **kwargs)
        self.variance = nn.Parameter(torch.tensor(float(self.cfg.variance)), requires_grad=self.cfg.learn_variance)
        radius = float(getattr(getattr(geometry, "cfg", None), "radius", 1.0))
        self.occupancy = OccupancyGrid(radius, self.cfg.grid_resolution, self.cfg.occ_dilation)

    def set_scene(self, geometry: Any = None, material: Any = None, background: Any = None) -> None:
        """Swap parts; a geometry with another radius gets a fresh (all-occupied) occupancy grid."""
        super().set_scene(geometry=geometry, material=material, background=background)
        if geometry is not None and float(geometry.cfg.radius) != self.occupancy.radius:
            dev = self.occupancy.occs.device
            self.occupancy = OccupancyGrid(float(geometry.cfg.radius), self.cfg.grid_resolution,
                                           self.cfg.occ_dilation).to(dev)

    # ------------------------------------------------------------------------------------------
    @property
    def radius(self) -> float:
        return float(self.geometry.cfg.radius)

    @property
    def inv_s(self) -> Tensor:
        """The inverse deviation ``s = exp(10 * variance)`` (0-d, differentiable)."""
        return torch.exp(10.0 * self.variance).clamp(INV_S_MIN, INV_S_MAX)

    @property
    def cos_anneal_ratio(self) -> float:
        end = self.cfg.cos_anneal_end_steps
        return 1.0 if end <= 0 else min(1.0, self.global_step / end)

    def _sdf_fn(self, points: Tensor) -> Tensor:
        geo = self.geometry
        if hasattr(geo, "forward_sdf"):
            return geo.forward_sdf(points)
        return self._check_sdf(geo(points))["sdf"]

    def _check_sdf(self, out: dict[str, Tensor]) -> dict[str, Tensor]:
        if "sdf" not in out:
            raise TypeError(
                f"neus-volume-renderer needs a geometry that returns 'sdf'; {type(self.geometry).__name__} returns "
                f"{sorted(out)} (a density field needs nerf-volume-renderer)"
            )
        return out

    # ------------------------------------------------------------------------------------------
    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Refresh the occupancy grid every ``occ_update_interval`` steps from ``|sdf|`` (see Config)."""
        super().update_step(epoch, global_step, on_load_weights)
        if not self.cfg.grid_prune or self.geometry is None or on_load_weights:
            return
        if global_step % self.cfg.occ_update_interval != 0:
            return
        param = next(iter(self.geometry.parameters()), None)
        device = param.device if param is not None else self.occupancy.occs.device
        if self.occupancy.occs.device != device:
            self.occupancy.to(device)
        cell_diag = math.sqrt(3.0) * 2.0 * self.occupancy.radius / self.occupancy.resolution
        with torch.no_grad():
            band = cell_diag + self.cfg.occ_sdf_margin / float(self.inv_s)

            def occ_eval_fn(x: Tensor) -> Tensor:
                return (self._sdf_fn(x).abs() < band).float()

            # Indicator values with no running maximum (decay 0): for a cell the surface crosses the
            # band test passes at any point of it, so there is nothing to remember, and a memory
            # would keep cells long after the surface left (decayed indicators never fall below
            # the grid's min(mean, threshold)). The threshold 0.5 then keeps exactly the cells in the band.
            self.occupancy.update(occ_eval_fn, 0.5, 0.0, warmup=global_step < self.cfg.occ_warmup_steps)
            if not bool(self.occupancy.binary.any()):
                # No cell near a surface (a field that is positive everywhere): keep sampling
                # everywhere so the rendering loss can still pull a surface in.
                self.occupancy.binary.fill_(True)

    # ------------------------------------------------------------------------------------------
    def _render_rays(self, rays_o: Tensor, rays_d: Tensor, light: Tensor, extra: dict[str, Any]) -> dict[str, Tensor]:
        """Flat rays [N, 3] -> per-ray [N, ...] and packed [Nv, ...] outputs."""
        N, S = rays_o.shape[0], self.cfg.num_samples_per_ray
        smp = self._samples_torch(rays_o, rays_d)
        ray_idx, flat = smp["ray_indices"], smp["flat"]  # [Nv], [Nv] into N*S
        ts = smp["t_starts"].reshape(-1)[flat]  # [Nv]
        te = smp["t_ends"].reshape(-1)[flat]
        tm = smp["t_mid"].reshape(-1)[flat]

        dirs_v = rays_d[ray_idx]  # [Nv, 3]
        pts_v = rays_o[ray_idx] + dirs_v * tm.unsqueeze(-1)  # [Nv, 3]
        # NeuS needs the SDF's slope along the ray at every sample, so normals are always on.
        geo = self._check_sdf(self.geometry(pts_v, output_normal=True))
        sdf_v = geo["sdf"].reshape(-1)  # [Nv]
        normal_v = geo["normal"]  # [Nv, 3] unit, outward
        # The unnormalised gradient gives the true first-order change of the SDF along the ray;
        # a geometry without one (predicted normals) falls back to its unit normal.
        grad_v = geo.get("sdf_grad", normal_v)  # [Nv, 3]
        # Along t the SDF changes at <grad, d> per unit t, whatever the length of d.
        slope = annealed_cos((grad_v * dirs_v).sum(-1), self.cos_anneal_ratio)  # [Nv]
        f_prev, f_next = section_sdf(sdf_v, slope, ts, te, tm)
        tau_v = neus_thickness(f_prev, f_next, self.inv_s)  # [Nv]

        # Dense [N, S] compositing as in the NeRF renderer: pruned sections have zero thickness.
        tau = torch.zeros(N * S, dtype=tau_v.dtype, device=tau_v.device).index_put((flat,), tau_v).view(N, S)
        # tau is already a per-section optical thickness, so bins of unit length turn
        # composite_weights' sigma * delta into tau and its alphas into NeuS's alphas.
        w, _, alpha = composite_weights(tau, torch.zeros_like(tau), torch.ones_like(tau))  # [N, S]
        w_v = w.reshape(-1)[flat]  # [Nv]

        rgb_v = self.material(
            features=geo["features"], viewdirs=dirs_v, positions=pts_v,
            shading_normal=geo.get("shading_normal", normal_v), light_positions=light[ray_idx], **extra,
        )
        wv1 = w_v.unsqueeze(-1)  # [Nv, 1]
        zeros1 = torch.zeros(N, 1, dtype=w_v.dtype, device=w_v.device)
        zeros3 = torch.zeros(N, 3, dtype=w_v.dtype, device=w_v.device)
        out = {
            "comp_rgb_fg": zeros3.index_add(0, ray_idx, wv1 * rgb_v),
            "opacity": w.sum(-1, keepdim=True),
            "depth": zeros1.index_add(0, ray_idx, wv1 * tm.unsqueeze(-1)),
            "comp_normal": zeros3.index_add(0, ray_idx, wv1 * (normal_v + 1.0) * 0.5),
            "weights": wv1,
            "points": pts_v,
            "t_points": tm.unsqueeze(-1),
            "t_intervals": (te - ts).unsqueeze(-1),
            "t_dirs": dirs_v,
            "ray_indices": ray_idx,
            "sdf": sdf_v.unsqueeze(-1),
            "alpha": alpha.reshape(-1)[flat].unsqueeze(-1),
            "normal": normal_v,
        }
        if "sdf_grad" in geo:
            out["sdf_grad"] = geo["sdf_grad"]
        if self.cfg.return_normal_perturb:
            jitter = torch.randn_like(pts_v) * self.cfg.normal_perturb_std
            out["normal_perturb"] = self.geometry(pts_v + jitter, output_normal=True)["normal"]
        return out


__all__ = ["NeuSVolumeRenderer", "annealed_cos", "section_sdf", "neus_thickness", "neus_alpha"]
