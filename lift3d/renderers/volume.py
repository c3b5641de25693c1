"""NeRF volume renderer: stratified samples, occupancy-grid pruning, alpha compositing.

Implements the emission-absorption quadrature of NeRF (Mildenhall et al., ECCV 2020) with the
empty-space skipping of InstantNGP (Mueller et al., SIGGRAPH 2022) as popularised by nerfacc
(Li et al., ICCV 2023) and used by DreamFusion / Magic3D style text-to-3D:

    alpha_i = 1 - exp(-sigma_i * delta_i),   T_i = exp(-sum_{j<i} sigma_j * delta_j),   w_i = T_i * alpha_i

which is exactly what nerfacc's ``render_weight_from_density`` computes (the tests check it to 1e-5).

Torch path (the reference, any device): every ray gets ``num_samples_per_ray`` bins between its
entry and exit of the scene box (or sphere) of the geometry's radius, jittered inside the bin
while training. Samples falling in empty cells of the occupancy grid are dropped *before* the field
runs, so the network only sees occupied space; compositing is dense over ``[n_rays, n_samples]``
(pruned samples have zero density), which is cheap next to the field. With ``early_stop_eps`` the
samples behind an opaque surface go too: one gradient-free density pass gives each sample's
transmittance, and those below the threshold are dropped before the full pass (normals, features,
backward); with ``early_stop_adaptive`` that pass is skipped in training while it drops too
little to pay for itself (the initial blob, where no ray stops). CUDA path (rays on CUDA, nerfacc
importable, ``backend`` not ``torch``): nerfacc's ``OccGridEstimator`` marches the rays with the
same step (and the same early stop) and the packed CUDA scan composites.

Checkpoints: the occupancy grid's state (``occupancy.occs``, ``occupancy.binary``,
``occupancy.n_updates``) is in the renderer's state dict whichever path keeps it up to date, so a
resumed run prunes like the uninterrupted one, and a CUDA run resumes on CPU and back (see
``_estimator_for`` for how nerfacc's grid maps onto it).

Outputs (``B,H,W`` from the rays): ``comp_rgb`` [B,H,W,3] (over the background), ``comp_rgb_fg``
(over black), ``comp_rgb_bg``, ``opacity`` [B,H,W,1], ``depth`` [B,H,W,1] (expected ray distance,
composited over 0), ``comp_normal`` [B,H,W,3] (``sum_i w_i (n_i + 1) / 2``: world normals in
[0, 1] composited over 0) when normals were computed. Packed per evaluated sample, for
regularisers (``Nv`` samples, in ray order): ``weights`` [Nv,1], ``points`` [Nv,3], ``t_points``
[Nv,1] (distance of the sample along its ray), ``t_intervals`` [Nv,1] (bin length), ``t_dirs``
[Nv,3] (its ray direction), ``ray_indices`` [Nv] (long, into the flattened ``B*H*W`` rays),
``density`` [Nv,1], and with normals ``normal`` [Nv,3] (unit, outward; orientation loss:
``weights * relu(dot(normal, t_dirs))**2``), with ``return_normal_perturb`` ``normal_perturb``
[Nv,3] (normals at jittered points, for smoothness losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from lift3d.backends import nerfacc_backend
from lift3d.config import ConfigError
from lift3d.registry import register
from lift3d.renderers.base import BaseRenderer
from lift3d.renderers.occupancy import OccupancyGrid

PER_RAY_KEYS = ("comp_rgb_fg", "opacity", "depth", "comp_normal")
# Batch keys forwarded to the material when present (shading modes of the recipes).
MATERIAL_BATCH_KEYS = ("shading", "ambient_ratio")


def composite_weights(sigmas: Tensor, t_starts: Tensor, t_ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Dense compositing weights: sigmas, t_starts, t_ends [..., S] -> (weights, transmittance, alphas) [..., S].

    ``T_i = exp(-sum_{j<i} sigma_j delta_j)``, ``alpha_i = 1 - exp(-sigma_i delta_i)``,
    ``w_i = T_i alpha_i`` (nerfacc's ``render_weight_from_density`` on dense inputs).
    """
    sd = sigmas * (t_ends - t_starts)  # [..., S] optical thickness per bin
    # Exclusive prefix sum as inclusive minus self: one pass, no padded copy.
    trans = torch.exp(sd - torch.cumsum(sd, dim=-1))
    alphas = 1.0 - torch.exp(-sd)
    return trans * alphas, trans, alphas


def ray_box_intersect(rays_o: Tensor, rays_d: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays [N, 3] with [-radius, radius]^3: (t_near [N], t_far [N]); miss: far <= near."""
    safe_d = torch.where(rays_d.abs() < 1e-12, torch.full_like(rays_d, 1e-12), rays_d)
    inv = 1.0 / safe_d
    ta = (-radius - rays_o) * inv
    tb = (radius - rays_o) * inv
    t_near = torch.minimum(ta, tb).amax(-1)
    t_far = torch.maximum(ta, tb).amin(-1)
    return t_near, t_far


def ray_sphere_intersect(rays_o: Tensor, rays_d: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """Entry/exit distances of rays [N, 3] with the sphere |x| = radius: (t_near [N], t_far [N])."""
    a = (rays_d * rays_d).sum(-1)
    b = (rays_o * rays_d).sum(-1)
    c = (rays_o * rays_o).sum(-1) - radius**2
    disc = b * b - a * c
    root = torch.sqrt(disc.clamp(min=0.0))
    t_near = (-b - root) / a
    t_far = torch.where(disc > 0, (-b + root) / a, t_near - 1.0)
    return t_near, t_far


@register("nerf-volume-renderer")
class NeRFVolumeRenderer(BaseRenderer):
    """Volume renderer of density fields (``implicit-volume`` or any geometry returning ``density``)."""

    @classmethod
    def provides_normals(cls, cfg: Any, material_cls: type) -> bool:
        return bool(cfg.return_comp_normal or getattr(material_cls, "requires_normal", False))

    @dataclass
    class Config(BaseRenderer.Config):
        num_samples_per_ray: int = 512
        """Bins per ray between entry and exit of the scene bound (the CUDA path marches with the
        same step length, bound diagonal / num_samples_per_ray)."""
        randomized: bool = True
        """Jitter samples inside their bins while training (stratified sampling)."""
        eval_chunk_size: int = 160000
        """Rays per chunk when not training (bounds memory at test time)."""
        grid_prune: bool = True
        """Skip samples in empty cells of an occupancy grid updated from the field's density."""
        grid_resolution: int = 32
        """Cells per side of the occupancy grid."""
        occ_update_interval: int = 16
        """Update the occupancy grid every this many steps (in ``update_step``)."""
        occ_warmup_steps: int = 256
        """Steps during which every cell is refreshed at each update."""
        occ_ema_decay: float = 0.95
        """Decay of the per-cell running maximum."""
        occ_threshold: float = 0.01
        """A cell is occupied when its opacity (density * step) exceeds min(mean, this)."""
        occ_dilation: int = 1
        """Grow the occupied cells by this many cells (conservative pruning near surfaces)."""
        bounding: Literal["box", "sphere"] = "box"
        """Shape whose intersection with each ray gives near and far: the box or the sphere of radius
        ``geometry.cfg.radius``."""
        near_plane: float = 0.0
        """Samples start no closer than this to the ray origin."""
        early_stop_eps: float = 0.0
        """Drop the samples a ray reaches with transmittance below this (nerfacc's ``early_stop_eps``;
        0: keep all). Their densities come from one extra evaluation without gradients; a ray then
        loses at most this much opacity, and the expensive pass (normals, features, backward) skips
        what lies behind the surface."""
        early_stop_adaptive: bool = False
        """Run the early-stop density pass in training only while it pays: when a pass drops less
        than ``early_stop_min_drop`` of the samples (an initial blob drops none), skip it for the
        next 1, then 2, 4, ... up to 16 training renders before trying again; once one drops enough,
        run it every render. While it is skipped the samples it would have dropped are kept, which
        changes a ray by at most ``early_stop_eps`` of opacity (a pass that would have dropped
        nothing changes nothing). Evaluation renders always run it."""
        early_stop_min_drop: float = 0.1
        """Fraction of the samples a pass must drop to be worth its cost with ``early_stop_adaptive``
        (on dreamfusion's blob the pass took about 15% of a training render's time)."""
        return_comp_normal: bool = False
        """Compute normals (and ``comp_normal``) even if the material does not need them."""
        return_normal_perturb: bool = False
        """Also return ``normal_perturb``: normals at points jittered by ``normal_perturb_std``."""
        normal_perturb_std: float = 0.01
        """Std of the jitter of ``normal_perturb``, in world units."""
        backend: Literal["auto", "torch", "nerfacc"] = "auto"
        """``auto``: nerfacc's CUDA marching for CUDA rays when nerfacc imports, torch otherwise; ``torch``
        always; ``nerfacc`` insists (an error without it or off CUDA)."""

        # Old key names: the config check reports what they are called now.
        renamed_keys: ClassVar[dict[str, str]] = {"implementation": "backend"}

    cfg: Config

    def configure(self, geometry: Any = None, material: Any = None, background: Any = None, **kwargs: Any) -> None:
        super().configure(geometry=geometry, material=material, background=background, **kwargs)
        if not 0.0 <= self.cfg.early_stop_min_drop <= 1.0:
            raise ConfigError(f"{self.registry_name}.early_stop_min_drop must be a fraction in [0, 1], "
                              f"got {self.cfg.early_stop_min_drop}")
        radius = float(getattr(getattr(geometry, "cfg", None), "radius", 1.0))
        self.occupancy = OccupancyGrid(radius, self.cfg.grid_resolution, self.cfg.occ_dilation)
        self.__dict__["_estimator"] = None  # nerfacc's grid, built on first CUDA use
        # Early-stop pass bookkeeping (not checkpointed: a resumed run tries the pass at once).
        # runs/skipped count training renders; backoff is the current skip length, 0 while it pays.
        self.early_stop_stats = {"runs": 0, "skipped": 0, "last_drop": None, "backoff": 0, "skip_left": 0}

    def set_scene(self, geometry: Any = None, material: Any = None, background: Any = None) -> None:
        """Swap parts; a geometry with another radius gets a fresh occupancy grid (and nerfacc grid)."""
        super().set_scene(geometry=geometry, material=material, background=background)
        if geometry is not None and float(geometry.cfg.radius) != self.occupancy.radius:
            dev = self.occupancy.occs.device
            self.occupancy = OccupancyGrid(float(geometry.cfg.radius), self.cfg.grid_resolution,
                                           self.cfg.occ_dilation).to(dev)
            self.__dict__["_estimator"] = None

    # ------------------------------------------------------------------------------------------
    @property
    def radius(self) -> float:
        return float(self.geometry.cfg.radius)

    @property
    def step_size(self) -> float:
        """Nominal bin length: the bound's diagonal over num_samples_per_ray."""
        diag = 2.0 * math.sqrt(3.0) * self.radius if self.cfg.bounding == "box" else 2.0 * self.radius
        return diag / self.cfg.num_samples_per_ray

    def _use_nerfacc(self, device: torch.device) -> bool:
        if self.cfg.backend == "torch" or device.type != "cuda":
            return False
        if self.cfg.backend == "nerfacc" and not nerfacc_backend.available():
            raise RuntimeError("nerf-volume-renderer: backend 'nerfacc' needs nerfacc and CUDA; use backend: torch")
        return nerfacc_backend.available()

    def _estimator_for(self, device: torch.device) -> Any:
        """nerfacc's grid, built on first use from the state of ``self.occupancy``.

        The estimator lives outside the module tree (its buffers are not in checkpoints); the
        persistent copy is ``self.occupancy``, mirrored after every nerfacc update. With one level
        the state maps one to one: ``est.occs`` [R^3] <-> ``occupancy.occs`` [R^3] (both x-major,
        nerfacc's cells come from ``meshgrid(..., indexing="ij")`` like ours), ``est.binaries``
        [1, R, R, R] <-> ``occupancy.binary`` [R, R, R] (nerfacc does not dilate; the mirrored mask
        is nerfacc's own), ``est.aabbs`` / ``est.resolution`` <-> radius and grid_resolution from
        the config. nerfacc keeps no update counter (it decides warm-up from the step);
        ``occupancy.n_updates`` counts the updates of either path.
        """
        est = self.__dict__["_estimator"]
        if est is None:
            est = nerfacc_backend.make_estimator(self.radius, self.cfg.grid_resolution, device)
            with torch.no_grad():
                # A fresh grid is all-occupied (as the torch path), not nerfacc's all-empty start.
                est.occs.copy_(self.occupancy.occs.reshape(est.occs.shape).to(est.occs))
                est.binaries.copy_(self.occupancy.binary.reshape(est.binaries.shape).to(est.binaries))
            self.__dict__["_estimator"] = est
        return est

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Loaded grid state reaches nerfacc by rebuilding its estimator from self.occupancy.
        self.__dict__["_estimator"] = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _density_fn(self, points: Tensor) -> Tensor:
        geo = self.geometry
        if hasattr(geo, "forward_density"):
            return geo.forward_density(points)
        out = geo(points)
        if "density" not in out:
            raise TypeError(
                f"nerf-volume-renderer needs a geometry that returns 'density'; {type(geo).__name__} returns "
                f"{sorted(out)} (an SDF field needs an SDF renderer such as NeuS)"
            )
        return out["density"]

    # ------------------------------------------------------------------------------------------
    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Refresh the occupancy grid every ``occ_update_interval`` steps from the geometry's density."""
        super().update_step(epoch, global_step, on_load_weights)
        if not self.cfg.grid_prune or self.geometry is None or on_load_weights:
            return
        if global_step % self.cfg.occ_update_interval != 0:
            return
        step = self.step_size

        def occ_eval_fn(x: Tensor) -> Tensor:
            return self._density_fn(x) * step

        param = next(iter(self.geometry.parameters()), None)
        device = param.device if param is not None else self.occupancy.occs.device
        if self.occupancy.occs.device != device:
            self.occupancy.to(device)
        if self._use_nerfacc(device):
            est = self._estimator_for(device)
            # A grid with no updates yet (fresh, or restored without state) refreshes every cell.
            warmup_steps = self.cfg.occ_warmup_steps if int(self.occupancy.n_updates) > 0 else global_step + 1
            nerfacc_backend.update_estimator(
                est, global_step, occ_eval_fn, self.cfg.occ_threshold,
                self.cfg.occ_ema_decay, warmup_steps, self.cfg.occ_update_interval,
            )
            self.occupancy.adopt(est.occs, est.binaries)
        else:
            with torch.no_grad():
                self.occupancy.update(
                    occ_eval_fn, self.cfg.occ_threshold, self.cfg.occ_ema_decay,
                    warmup=global_step < self.cfg.occ_warmup_steps,
                )

    # ------------------------------------------------------------------------------------------
    def _samples_torch(self, rays_o: Tensor, rays_d: Tensor) -> dict[str, Tensor]:
        """Stratified bins, pruned: packed ray_indices [Nv], t_starts/t_ends/t_mid [Nv], plus dense layout."""
        N, S = rays_o.shape[0], self.cfg.num_samples_per_ray
        intersect = ray_box_intersect if self.cfg.bounding == "box" else ray_sphere_intersect
        t_near, t_far = intersect(rays_o, rays_d, self.radius)
        t_near = t_near.clamp(min=self.cfg.near_plane)
        hit = t_far > t_near  # [N]
        t_far = torch.where(hit, t_far, t_near)
        bin_len = ((t_far - t_near) / S).unsqueeze(-1)  # [N, 1]
        t_starts = t_near.unsqueeze(-1) + bin_len * torch.arange(S, device=rays_o.device, dtype=rays_o.dtype)
        t_ends = t_starts + bin_len  # [N, S]
        if self.cfg.randomized and self.training:
            u = torch.rand_like(t_starts)
        else:
            u = torch.full_like(t_starts, 0.5)
        t_mid = t_starts + u * bin_len  # [N, S]
        valid = hit.unsqueeze(-1).expand(N, S)
        if self.cfg.grid_prune:
            pts = rays_o.unsqueeze(1) + rays_d.unsqueeze(1) * t_mid.unsqueeze(-1)  # [N, S, 3]
            valid = valid & self.occupancy.occupied(pts)
        flat = torch.nonzero(valid.reshape(-1)).squeeze(-1)  # [Nv] into N*S
        return {"t_starts": t_starts, "t_ends": t_ends, "t_mid": t_mid, "flat": flat, "ray_indices": flat // S}

    #: Longest run of training renders that skip the early-stop pass with ``early_stop_adaptive``.
    EARLY_STOP_MAX_SKIP: ClassVar[int] = 16

    def _early_stop_due(self) -> bool:
        """Whether this render runs the early-stop pass (always, unless adaptive, training and backing off)."""
        st = self.early_stop_stats
        if not (self.cfg.early_stop_adaptive and self.training) or st["skip_left"] <= 0:
            return True
        st["skip_left"] -= 1
        st["skipped"] += 1
        return False

    def _early_stop_record(self, before: int, after: int) -> None:
        """Note what a pass dropped; with ``early_stop_adaptive`` back off when that was too little."""
        st = self.early_stop_stats
        drop = 1.0 - after / before if before else 0.0
        st["last_drop"] = drop
        if not (self.cfg.early_stop_adaptive and self.training):
            return
        st["runs"] += 1
        if drop >= self.cfg.early_stop_min_drop:
            st["backoff"] = 0
        else:
            st["backoff"] = min(max(1, 2 * st["backoff"]), self.EARLY_STOP_MAX_SKIP)
            st["skip_left"] = st["backoff"]

    def _early_stop(self, rays_o: Tensor, rays_d: Tensor, smp: dict[str, Tensor]) -> dict[str, Tensor]:
        """``smp`` of :meth:`_samples_torch` without the samples reached with transmittance below
        ``early_stop_eps`` (densities evaluated without gradients)."""
        N, S = smp["t_starts"].shape
        flat, ray = smp["flat"], smp["ray_indices"]
        with torch.no_grad():
            pts = rays_o[ray] + rays_d[ray] * smp["t_mid"].reshape(-1)[flat].unsqueeze(-1)
            dens = self._density_fn(pts).reshape(-1)
            sig = torch.zeros(N * S, dtype=dens.dtype, device=dens.device).index_put((flat,), dens)
            trans = composite_weights(sig.view(N, S), smp["t_starts"], smp["t_ends"])[1]
            keep = trans.reshape(-1)[flat] > self.cfg.early_stop_eps
        return {**smp, "flat": flat[keep], "ray_indices": ray[keep]}

    def _render_rays(self, rays_o: Tensor, rays_d: Tensor, light: Tensor, extra: dict[str, Any]) -> dict[str, Tensor]:
        """Flat rays [N, 3] -> per-ray [N, ...] and packed [Nv, ...] outputs."""
        N = rays_o.shape[0]
        material = self.material
        need_normal = bool(getattr(material, "requires_normal", False)) or self.cfg.return_comp_normal
        nerfacc_path = self._use_nerfacc(rays_o.device) and self.cfg.grid_prune
        if nerfacc_path:
            intersect = ray_box_intersect if self.cfg.bounding == "box" else ray_sphere_intersect
            t_near, t_far = intersect(rays_o, rays_d, self.radius)
            t_near = t_near.clamp(min=self.cfg.near_plane)
            t_far = torch.maximum(t_far, t_near)
            ray_idx, ts, te = nerfacc_backend.sample(
                self._estimator_for(rays_o.device), rays_o, rays_d, t_near, t_far, self.step_size,
                self.cfg.randomized and self.training, self._density_fn, self.cfg.early_stop_eps,
            )
            t_mid_v = 0.5 * (ts + te)
        else:
            smp = self._samples_torch(rays_o, rays_d)
            if self.cfg.early_stop_eps > 0 and self._early_stop_due():
                before = smp["flat"].numel()
                smp = self._early_stop(rays_o, rays_d, smp)
                self._early_stop_record(before, smp["flat"].numel())
            ray_idx, flat = smp["ray_indices"], smp["flat"]
            t_mid_v = smp["t_mid"].reshape(-1)[flat]
            ts = smp["t_starts"].reshape(-1)[flat]
            te = smp["t_ends"].reshape(-1)[flat]

        dirs_v = rays_d[ray_idx]  # [Nv, 3]
        pts_v = rays_o[ray_idx] + dirs_v * t_mid_v.unsqueeze(-1)  # [Nv, 3]
        geo = self.geometry(pts_v, output_normal=need_normal)
        if "density" not in geo:
            raise TypeError(
                f"nerf-volume-renderer needs a geometry that returns 'density'; {type(self.geometry).__name__} "
                f"returns {sorted(geo)} (an SDF field needs an SDF renderer such as NeuS)"
            )
        dens_v = geo["density"].reshape(-1)  # [Nv]

        if nerfacc_path:
            w_v = nerfacc_backend.render_weights_packed(ts, te, dens_v, ray_idx, N)
            opacity = torch.zeros(N, 1, dtype=w_v.dtype, device=w_v.device).index_add(0, ray_idx, w_v[:, None])
        else:
            S = self.cfg.num_samples_per_ray
            sig = torch.zeros(N * S, dtype=dens_v.dtype, device=dens_v.device).index_put((flat,), dens_v)
            w, _, _ = composite_weights(sig.view(N, S), smp["t_starts"], smp["t_ends"])  # [N, S]
            w_v = w.reshape(-1)[flat]
            opacity = w.sum(-1, keepdim=True)

        normal_v = geo.get("normal")
        mat_kw = dict(extra)
        rgb_v = material(
            features=geo["features"], viewdirs=dirs_v, positions=pts_v,
            shading_normal=geo.get("shading_normal", normal_v), light_positions=light[ray_idx], **mat_kw,
        )
        wv1 = w_v.unsqueeze(-1)  # [Nv, 1]
        zeros3 = torch.zeros(N, 3, dtype=w_v.dtype, device=w_v.device)
        out = {
            "comp_rgb_fg": zeros3.index_add(0, ray_idx, wv1 * rgb_v),
            "opacity": opacity,
            "depth": torch.zeros(N, 1, dtype=w_v.dtype, device=w_v.device).index_add(0, ray_idx, wv1 * t_mid_v[:, None]),
            "weights": wv1,
            "points": pts_v,
            "t_points": t_mid_v.unsqueeze(-1),
            "t_intervals": (te - ts).unsqueeze(-1),
            "t_dirs": dirs_v,
            "ray_indices": ray_idx,
            "density": dens_v.unsqueeze(-1),
        }
        if normal_v is not None:
            out["normal"] = normal_v
            out["comp_normal"] = zeros3.index_add(0, ray_idx, wv1 * (normal_v + 1.0) * 0.5)
            if self.cfg.return_normal_perturb:
                jitter = torch.randn_like(pts_v) * self.cfg.normal_perturb_std
                out["normal_perturb"] = self.geometry(pts_v + jitter, output_normal=True)["normal"]
        return out

    def forward(self, rays_o: Tensor, rays_d: Tensor, light_positions: Tensor | None = None,
                bg_color: Tensor | None = None, **batch: Any) -> dict[str, Tensor]:
        """Render rays [B, H, W, 3]; see the module docstring for the returned keys."""
        if self.geometry is None or self.material is None:
            raise RuntimeError(f"{self.registry_name} has no geometry/material; build it with them or call set_scene")
        B, H, W, _ = rays_o.shape
        N = B * H * W
        o = rays_o.reshape(N, 3)
        d = rays_d.reshape(N, 3)
        if light_positions is None:
            light = o  # headlight
        else:
            light = light_positions.reshape(B, 1, 3).expand(B, H * W, 3).reshape(N, 3)
        extra = {k: batch[k] for k in MATERIAL_BATCH_KEYS if k in batch}

        if self.training:
            flat = self._render_rays(o, d, light, extra)
        else:
            flat = self._render_chunked(o, d, light, extra)

        out: dict[str, Tensor] = {}
        for k, v in flat.items():
            out[k] = v.view(B, H, W, v.shape[-1]) if k in PER_RAY_KEYS else v
        if bg_color is None:
            if self.background is None:
                raise RuntimeError(f"{self.registry_name} has no background and no bg_color was given")
            bg = self.background(dirs=rays_d)
        else:
            bg = bg_color.to(out["comp_rgb_fg"])
            if bg.ndim == 1:
                bg = bg.view(1, 1, 1, -1)
            elif bg.ndim == 2:
                bg = bg.view(B, 1, 1, -1)
            bg = bg.expand(B, H, W, 3)
        out["comp_rgb_bg"] = bg
        out["comp_rgb"] = out["comp_rgb_fg"] + bg * (1.0 - out["opacity"])
        return out

    def _render_chunked(self, o: Tensor, d: Tensor, light: Tensor, extra: dict[str, Any]) -> dict[str, Tensor]:
        cs = max(1, self.cfg.eval_chunk_size)
        if o.shape[0] <= cs:
            return self._render_rays(o, d, light, extra)
        parts = []
        for s in range(0, o.shape[0], cs):
            part = self._render_rays(o[s : s + cs], d[s : s + cs], light[s : s + cs], extra)
            part["ray_indices"] = part["ray_indices"] + s
            parts.append(part)
        return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


__all__ = ["NeRFVolumeRenderer", "composite_weights", "ray_box_intersect", "ray_sphere_intersect"]
