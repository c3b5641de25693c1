"""ViewDiff's projection layer: a 3D feature volume built from the views and rendered back into them.

ViewDiff (Höllein et al., CVPR 2024, Sec. 3.3) gives the UNet an explicit 3D bottleneck: after
chosen UNet blocks, the feature maps of a group of views are lifted into one voxel grid, refined
in 3D and rendered back into every view. Ours, in plain torch (``grid_sample`` for every lookup):

1. **Reduce**: a 1x1 convolution maps the block's ``C`` channels to ``c`` (a few, e.g. 16).
2. **Unproject**: the centre of every voxel of a ``G^3`` grid over the box ``[-bound, bound]^3``
   is projected into each view with its camera (``c2w`` and normalised intrinsics, see
   :mod:`lift3d.priors.viewdiff.cameras`) and the view's feature map is sampled there
   (bilinearly); a voxel behind a camera or outside its image reads nothing from that view.
3. **Aggregate**: a small MLP scores each view's sample of a voxel from its features and its depth;
   the scores are soft-maxed over the views that see the voxel, and the features averaged with
   those weights. The fraction of views that see the voxel rides along as one more channel.
4. **Refine**: a small 3D CNN (two 3x3x3 convolutions, SiLU, then a 1x1x1 head) turns the grid
   into a density and ``c`` features per voxel.
5. **Render**: for every pixel of every view a ray is cast through the box (slab intersection)
   and ``n_samples`` evenly spaced points between its entry and exit are read from the grid
   (trilinearly); densities become opacities ``1 - exp(-softplus(sigma) * delta)`` and the features
   are alpha-composited front to back. Rays that miss the box render zero.
6. **Expand**: a 1x1 convolution maps ``c`` back to ``C`` and the result is *added* to the block's
   output. It starts at zero (weights and bias), so a new layer is the identity.

The grid and the rays follow the world's axes (+z up); the volume tensor is laid out
``[c, z, y, x]`` so ``grid_sample``'s (x, y, z) coordinates are the world's divided by ``bound``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.priors.viewdiff.cameras import pixel_rays, world_to_pixels


def voxel_centres(grid_size: int, bound: float, device: torch.device | None = None,
                  dtype: torch.dtype = torch.float32) -> Float[Tensor, "V 3"]:
    """World (x, y, z) of the ``grid_size^3`` voxel centres, in the volume's ``[z, y, x]`` order."""
    ticks = (torch.arange(grid_size, device=device, dtype=dtype) + 0.5) / grid_size * 2 - 1
    z, y, x = torch.meshgrid(ticks, ticks, ticks, indexing="ij")
    return torch.stack([x, y, z], dim=-1).reshape(-1, 3) * bound


def ray_box(origins: Tensor, dirs: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances of rays through the box ``[-bound, bound]^3`` (entry clamped to 0),
    and whether the ray meets the box in front of its origin."""
    safe = torch.where(dirs.abs() < 1e-9, torch.full_like(dirs, 1e-9), dirs)
    t0 = (-bound - origins) / safe
    t1 = (bound - origins) / safe
    near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return near, torch.where(hit, far, near), hit


class ProjectionLayer(nn.Module):
    """The projection layer (module docstring) for feature maps of ``channels`` channels.

    Args:
        channels: ``C``, the channels of the UNet block it follows.
        feat_channels: ``c``, the channels of the volume.
        grid_size: ``G``, voxels per side.
        bound: half the side of the box the grid covers, in world units.
        n_samples: points per ray when rendering.
        hidden: width of the 3D CNN and of the view-scoring MLP.
    """

    def __init__(self, channels: int, feat_channels: int = 16, grid_size: int = 16, bound: float = 1.0,
                 n_samples: int = 32, hidden: int = 32):
        super().__init__()
        self.channels, self.feat_channels = int(channels), int(feat_channels)
        self.grid_size, self.bound, self.n_samples = int(grid_size), float(bound), int(n_samples)
        c = self.feat_channels
        self.reduce = nn.Conv2d(channels, c, 1)
        self.score = nn.Sequential(nn.Linear(c + 1, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.cnn = nn.Sequential(nn.Conv3d(c + 1, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv3d(hidden, hidden, 3, padding=1), nn.SiLU(), nn.Conv3d(hidden, 1 + c, 1))
        self.expand = nn.Conv2d(c, channels, 1)
        nn.init.zeros_(self.expand.weight)
        nn.init.zeros_(self.expand.bias)

    # -- the steps ----------------------------------------------------------------------------------

    def unproject(self, feats: Float[Tensor, "N c H W"], c2w: Float[Tensor, "N 4 4"],
                  intrinsics: Float[Tensor, "N 3 3"]) -> tuple[Tensor, Tensor, Tensor]:
        """Each view's features at every voxel: (samples ``[N, c, V]``, depth ``[N, V]``, seen ``[N, V]``),
        V = G^3 in the volume's ``[z, y, x]`` order; unseen samples are zero."""
        N = feats.shape[0]
        centres = voxel_centres(self.grid_size, self.bound, feats.device, feats.dtype)
        uv, depth = world_to_pixels(centres.expand(N, -1, -1), c2w.to(feats.dtype), intrinsics.to(feats.dtype))
        seen = (depth > 1e-4) & (uv >= 0).all(-1) & (uv <= 1).all(-1)
        grid = (uv * 2 - 1).where(seen[..., None], torch.full_like(uv, -2.0))[:, None]  # [N, 1, V, 2]
        samples = F.grid_sample(feats, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, :, 0]
        return samples * seen[:, None].to(samples.dtype), depth, seen

    def aggregate(self, samples: Tensor, depth: Tensor, seen: Tensor, c2w: Tensor, n_views: int) -> Tensor:
        """One volume per group ``[b, c + 1, G, G, G]``: the view-weighted mean features and the fraction
        of views that see each voxel."""
        N, c, V = samples.shape
        b, f, G = N // n_views, n_views, self.grid_size
        dist = c2w[:, :3, 3].norm(dim=-1).to(depth.dtype)
        rel_depth = (depth - dist[:, None]) / self.bound  # about 0 at the object's centre
        x = torch.cat([samples.transpose(1, 2), rel_depth[..., None]], dim=-1)  # [N, V, c + 1]
        logits = self.score(x)[..., 0].view(b, f, V)
        seen_g = seen.view(b, f, V)
        logits = logits.masked_fill(~seen_g, -1e4)
        weights = torch.softmax(logits.float(), dim=1).to(samples.dtype) * seen_g.to(samples.dtype)
        mean = (weights[:, :, None] * samples.view(b, f, c, V)).sum(dim=1)  # [b, c, V]
        coverage = seen_g.to(samples.dtype).mean(dim=1, keepdim=True)  # [b, 1, V]
        return torch.cat([mean, coverage], dim=1).view(b, c + 1, G, G, G)

    def render(self, volume: Float[Tensor, "N C1 G G G"], c2w: Float[Tensor, "N 4 4"],
               intrinsics: Float[Tensor, "N 3 3"], height: int, width: int) -> Float[Tensor, "N c H W"]:
        """Alpha-composite the volume's features along each pixel's ray, per view."""
        N, S = volume.shape[0], self.n_samples
        origins, dirs = pixel_rays(c2w.to(volume.dtype), intrinsics.to(volume.dtype), height, width)
        near, far, hit = ray_box(origins, dirs, self.bound)  # [N, P]
        steps = (torch.arange(S, device=volume.device, dtype=volume.dtype) + 0.5) / S
        t = near[..., None] + (far - near)[..., None] * steps  # [N, P, S]
        pts = origins[:, :, None] + dirs[:, :, None] * t[..., None]  # [N, P, S, 3]
        grid = (pts / self.bound).reshape(N, 1, 1, -1, 3)
        vals = F.grid_sample(volume, grid, mode="bilinear", padding_mode="border", align_corners=False)
        vals = vals.reshape(N, volume.shape[1], -1, S)  # [N, 1 + c, P, S]
        sigma = F.softplus(vals[:, 0])
        delta = ((far - near) / S * hit.to(volume.dtype))[..., None]  # [N, P, 1]
        alpha = 1 - torch.exp(-sigma * delta)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha[..., :-1] + 1e-10], dim=-1), dim=-1)
        w = alpha * trans  # [N, P, S]
        feats = (vals[:, 1:] * w[:, None]).sum(dim=-1)  # [N, c, P]
        return feats.view(N, -1, height, width)

    # -- the layer ----------------------------------------------------------------------------------

    def forward(self, x: Float[Tensor, "N C H W"], c2w: Float[Tensor, "N 4 4"], intrinsics: Float[Tensor, "N 3 3"],
                n_views: int) -> Float[Tensor, "N C H W"]:
        N, _, H, W = x.shape
        if n_views < 1 or N % n_views:
            raise ValueError(f"a batch of {N} views cannot be split into groups of n_views={n_views}")
        feats = self.reduce(x)
        samples, depth, seen = self.unproject(feats, c2w, intrinsics)
        volume = self.cnn(self.aggregate(samples, depth, seen, c2w, n_views))
        rendered = self.render(volume.repeat_interleave(n_views, dim=0), c2w, intrinsics, H, W)
        return x + self.expand(rendered)


__all__ = ["ProjectionLayer", "voxel_centres", "ray_box"]
