"""The guidance contract: what a guidance is given, what it returns, and what it declares it needs.

A guidance scores what the system rendered and returns loss terms. It is called as
``guidance(inp: GuidanceInput, t=None, noise=None) -> GuidanceOutput``:

* :class:`GuidanceInput` carries the renders (``rgb`` [B,H,W,3] in [0, 1], or ``latents``
  [B,h,w,C] for a prior that works in a latent space), their ``opacity`` and ``normal`` maps, the
  cameras as one :class:`CameraBatch` (B = groups x ``n_views``: consecutive views of a group were
  rendered together for a multi-view prior), the prompt processor's output, and optionally a
  conditioning image with its camera (image-to-3D) and points with colours taken from the geometry
  (a 3D prior).
* :class:`GuidanceOutput` holds ``losses`` (``loss_X``, weighted by the system's ``lambda_X``) and
  ``diagnostics`` (logged, never backpropagated).
* ``requires(cfg)`` names what the guidance reads beyond ``rgb`` and the cameras (see
  :data:`CAPABILITIES`); the system checks it against the renderer, geometry and data at start-up,
  so a normal-map guidance behind a renderer without normals fails before the first step.
* Given ``t`` and ``noise`` a guidance is deterministic. It never steps an optimizer it does not own,
  and the frozen weights of its prior never enter a checkpoint: only ``state_dict()`` of its
  trainable parts is saved (e.g. VSD's LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from lift3d.utils.base import BaseModule

#: What a guidance may require, and who provides it.
CAPABILITIES = {
    "normals": "the renderer's normal map (comp_normal)",
    "opacity": "the renderer's opacity",
    "prompt_embeddings": "a prompt processor with a text encoder",
    "cond_image": "a data module that yields a reference image (single-image-datamodule)",
    "points": "a geometry made of points (gaussian-splatting)",
}


@dataclass
class CameraBatch:
    """The cameras of a batch of renders, all [B] or [B, 4, 4]; angles in degrees.

    Views come in ``B // n_views`` consecutive groups of ``n_views``; a group was sampled together
    (same elevation, distance and fov; azimuths spread around the object) for a multi-view prior.
    """

    elevation: Tensor
    azimuth: Tensor
    distance: Tensor
    c2w: Tensor
    fovy: Tensor
    n_views: int = 1

    def __post_init__(self) -> None:
        B = self.elevation.shape[0]
        if self.n_views < 1 or B % self.n_views:
            raise ValueError(f"a camera batch of {B} views cannot be split into groups of n_views={self.n_views}")

    def __len__(self) -> int:
        return int(self.elevation.shape[0])

    @property
    def n_groups(self) -> int:
        return len(self) // self.n_views

    @classmethod
    def from_batch(cls, batch: dict[str, Any]) -> "CameraBatch":
        """From a data module's batch dict (``make_cameras`` keys plus ``n_views``)."""
        missing = [k for k in ("elevation", "azimuth", "camera_distances", "c2w", "fovy") if batch.get(k) is None]
        if missing:
            raise ValueError(f"the camera batch has no {', '.join(missing)}; data modules yield make_cameras() keys")
        B = batch["elevation"].shape[0]
        fovy = torch.as_tensor(batch["fovy"], dtype=batch["elevation"].dtype, device=batch["elevation"].device)
        return cls(batch["elevation"], batch["azimuth"], batch["camera_distances"], batch["c2w"],
                   fovy.expand(B) if fovy.dim() == 0 else fovy, int(batch.get("n_views", 1)))

    @classmethod
    def from_angles(cls, elevation: Any, azimuth: Any, distance: Any = 2.0, fovy: Any = 40.0,
                    n_views: int = 1) -> "CameraBatch":
        """Orbit cameras looking at the origin (the world's convention); scalars broadcast."""
        from lift3d.utils.cameras import camera_positions, look_at_c2w

        el = torch.as_tensor(elevation, dtype=torch.float32).reshape(-1)
        az = torch.as_tensor(azimuth, dtype=torch.float32).reshape(-1)
        B = max(el.numel(), az.numel())
        el, az = el.expand(B), az.expand(B)
        dist = torch.as_tensor(distance, dtype=torch.float32).reshape(-1).expand(B)
        fov = torch.as_tensor(fovy, dtype=torch.float32).reshape(-1).expand(B)
        return cls(el, az, dist, look_at_c2w(camera_positions(el, az, dist)), fov, n_views)

    def to(self, device: Any) -> "CameraBatch":
        return replace(self, **{k: getattr(self, k).to(device) for k in ("elevation", "azimuth", "distance", "c2w", "fovy")})


@dataclass
class GuidanceInput:
    """Everything a guidance may read for one batch of renders."""

    cameras: CameraBatch
    rgb: Optional[Tensor] = None
    """[B, H, W, 3] renders in [0, 1] (differentiable)."""
    opacity: Optional[Tensor] = None
    """[B, H, W, 1] rendered opacity."""
    normal: Optional[Tensor] = None
    """[B, H, W, 3] world normals mapped to [0, 1], composited over zero."""
    latents: Optional[Tensor] = None
    """[B, h, w, C] renders already in a prior's latent space (a latent-space NeRF feeds these)."""
    prompt: Any = None
    """The prompt processor's output (``lift3d.prompts.PromptUtils``)."""
    cond_image: Optional[Tensor] = None
    """[1 or B, H, W, 3] the conditioning image (image-to-3D), in [0, 1]."""
    cond_mask: Optional[Tensor] = None
    """[1 or B, H, W, 1] its foreground mask."""
    cond_cameras: Optional[CameraBatch] = None
    """The conditioning image's camera."""
    points: Optional[Tensor] = None
    """[N, 3] points of the geometry (Gaussian centres), differentiable."""
    point_colors: Optional[Tensor] = None
    """[N, 3] their colours in [0, 1]."""
    extras: dict[str, Any] = field(default_factory=dict)
    """The rest of the data batch (rays, lights, resolution) for guidances that need it."""

    @property
    def batch_size(self) -> int:
        return len(self.cameras)

    @classmethod
    def from_render(cls, out: dict[str, Any], batch: dict[str, Any], prompt: Any = None, **kw: Any) -> "GuidanceInput":
        """From a renderer's output dict and the data batch it rendered."""
        return cls(cameras=CameraBatch.from_batch(batch), rgb=out.get("comp_rgb"), opacity=out.get("opacity"),
                   normal=out.get("comp_normal"), latents=out.get("comp_latents"), prompt=prompt,
                   extras=batch, **kw)


@dataclass
class GuidanceOutput:
    """Loss terms (``loss_X``, backpropagated) and diagnostics (logged only)."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k in self.losses if not k.startswith("loss_")]
        if bad:
            raise ValueError(f"loss terms must be named loss_X, got {bad}")

    def __getitem__(self, key: str) -> Any:
        if key in self.losses:
            return self.losses[key]
        return self.diagnostics[key]

    def __contains__(self, key: str) -> bool:
        return key in self.losses or key in self.diagnostics

    def __iter__(self) -> Iterator[str]:
        yield from self.losses
        yield from self.diagnostics


class BaseGuidance(BaseModule):
    """A module that scores renders: ``forward(inp, t=None, noise=None) -> GuidanceOutput``."""

    category = "guidance"

    @dataclass
    class Config:
        pass

    @classmethod
    def requires(cls, cfg: Any) -> frozenset[str]:
        """Inputs beyond ``rgb`` and the cameras this guidance reads, for the parsed ``cfg``: a subset
        of :data:`CAPABILITIES`. The system checks them at start-up."""
        return frozenset()

    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def forward(self, inp: GuidanceInput, t: Tensor | None = None, noise: Tensor | None = None) -> GuidanceOutput:
        raise NotImplementedError



def check_view_groups(name: str, key: str, n_views: int, inp: "GuidanceInput") -> None:
    """A ValueError, naming the data keys to set, unless ``inp`` holds whole groups of ``n_views`` views
    sampled as groups by the data module (what a multi-view prior ``name``, configured at ``key``, scores)."""
    f, B = n_views, inp.batch_size
    if B % f:
        raise ValueError(
            f"{name} scores views in groups of n_views={f} ({key}.n_views), but the batch has {B} views, "
            f"which is not a multiple of {f}: set data.batch_size to {f}, {2 * f}, ... and data.n_views: {f}")
    if inp.cameras.n_views != f:
        raise ValueError(
            f"{name} scores groups of {f} views of one object, but the data module samples groups of "
            f"n_views={inp.cameras.n_views}: set data.n_views: {f} (each group then shares elevation, distance "
            f"and field of view, its azimuths {360 // f} degrees apart), or {key}.n_views: {inp.cameras.n_views}")

__all__ = ["BaseGuidance", "CameraBatch", "GuidanceInput", "GuidanceOutput", "CAPABILITIES", "check_view_groups"]
