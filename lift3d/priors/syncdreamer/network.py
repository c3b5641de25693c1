"""SyncDreamer's denoiser: a Zero123-style UNet whose decoder also reads a shared 3D feature volume.

SyncDreamer (Liu et al., ICLR 2024, "SyncDreamer: Generating Multiview-consistent Images from a
Single-view Image") denoises the 16 views of an object together. At every step:

1. **Spatial volume** (:class:`SpatialVolume`). Each view's noisy latent is encoded to a few
   feature channels (:class:`ViewEncoder`, told the timestep and the view's relative camera), and
   every view's features are sampled at the projections of the points of one V^3 grid over the
   cube ``[-0.5, 0.5]^3``; the views' samples are stacked along channels and a 3D UNet
   (:class:`VolumeUNet`, timestep-conditioned) fuses them. This is the only place where views meet.
2. **Frustum volumes**. For the view being denoised, points along its pixels' rays (``depth``
   samples between distance 1.5 -/+ sqrt(3)/2, the camera's distance to the centre) read the
   spatial volume (trilinearly); a second 3D UNet (:class:`FrustumUNet`) turns that frustum into
   features at four resolutions, one per UNet level.
3. **Depth-wise attention** (:class:`DepthTransformer`). After the UNet's middle block and after
   each decoder block below the deepest level, every pixel attends over the depth samples of the
   frustum features at its resolution; the result is added back (a residual whose last
   convolution starts at zero in training).

The UNet itself is diffusers' ``UNet2DConditionModel`` (8 input channels: the noisy latent and the
input view's latent, Zero123's layout); :class:`SyncDreamerUNet` runs its blocks in order and
inserts the depth-wise attention between them. Nothing here is specific to the released sizes:
the volume and UNet widths come from :class:`VolumeConfig` and the UNet's diffusers config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

#: Groups of every group norm in the added layers (the original uses 8 throughout).
GROUPS = 8


@dataclass(frozen=True)
class VolumeConfig:
    """Sizes of the volume branch (defaults: the released model)."""

    view_num: int = 16
    time_dim: int = 256
    """Width of SyncDreamer's own timestep embedding (not the UNet's)."""
    view_dim: int = 4
    """The relative camera: (d_elevation, sin d_azimuth, cos d_azimuth, 0)."""
    view_channels: int = 16
    """Features per view unprojected into the spatial volume."""
    encoder_channels: int = 16
    """Working width of the per-view encoder."""
    dims: tuple[int, int, int, int] = (64, 128, 256, 512)
    """Widths of the 3D UNets' four levels; the UNet's depth-wise attention reads them."""
    image_size: int = 256
    """Pixel size of the views (the cameras' intrinsics are written for it)."""
    latent_factor: int = 8
    """Pixels per latent cell (the VAE's downsampling)."""
    volume_size: int = 32
    """Cells per side of the spatial volume."""
    volume_half_extent: float = 0.5
    """The spatial volume spans [-h, h]^3."""
    frustum_depth: int = 48
    """Depth samples per frustum."""
    frustum_half_length: float = 0.86603
    """Half of the depth range around the camera distance (sqrt(3)/2)."""
    camera_distance: float = 1.5
    """Distance of the views' cameras to the centre (the frustum's centre depth)."""

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_factor


# ---------------------------------------------------------------------------------------------
# Per-view encoder


class ViewResBlock(nn.Module):
    """A 2D residual block whose input is shifted by projections of the timestep and camera embeddings."""

    def __init__(self, dim: int, time_dim: int, view_dim: int):
        super().__init__()
        self.time_proj = nn.Conv2d(time_dim, dim, 1)
        self.view_proj = nn.Conv2d(view_dim, dim, 1)
        self.norm1 = nn.GroupNorm(GROUPS, dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.GroupNorm(GROUPS, dim)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        h = x + self.time_proj(t) + self.view_proj(v)
        h = self.conv1(F.silu(self.norm1(h)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class ViewEncoder(nn.Module):
    """One view's noisy latent [B, 4, h, w] -> features [B, view_channels, h, w]."""

    def __init__(self, cfg: VolumeConfig, latent_channels: int = 4):
        super().__init__()
        c = cfg.encoder_channels
        self.stem = nn.Conv2d(latent_channels, c, 3, padding=1)
        self.blocks = nn.ModuleList([ViewResBlock(c, cfg.time_dim, cfg.view_dim) for _ in range(3)])
        self.out_norm = nn.GroupNorm(GROUPS, c)
        self.out_conv = nn.Conv2d(c, cfg.view_channels, 3, padding=1)

    def forward(self, x: Tensor, t_embed: Float[Tensor, "B T"], v_embed: Float[Tensor, "B V"]) -> Tensor:
        t, v = t_embed[:, :, None, None], v_embed[:, :, None, None]
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, t, v)
        return self.out_conv(F.silu(self.out_norm(h)))


# ---------------------------------------------------------------------------------------------
# 3D UNets


class Conv3dStep(nn.Module):
    """Shift by the conditioning, normalise, SiLU, then a 3D convolution (strided) or a transposed one (x2 up)."""

    def __init__(self, dim: int, out: int, time_dim: int, view_dim: Optional[int], *, stride: int = 1,
                 up: bool = False):
        super().__init__()
        self.time_proj = nn.Conv3d(time_dim, dim, 1)
        self.view_proj = nn.Conv3d(view_dim, dim, 1) if view_dim else None
        self.norm = nn.GroupNorm(GROUPS, dim)
        self.conv = (nn.ConvTranspose3d(dim, out, 3, stride=2, padding=1, output_padding=1) if up
                     else nn.Conv3d(dim, out, 3, stride=stride, padding=1))

    def forward(self, x: Tensor, t: Tensor, v: Optional[Tensor] = None) -> Tensor:
        x = x + self.time_proj(t)
        if self.view_proj is not None:
            x = x + self.view_proj(v)
        return self.conv(F.silu(self.norm(x)))


class VolumeUNet(nn.Module):
    """The spatial volume's 3D UNet: stacked per-view features -> fused features [B, dims[0], V, V, V].

    Three levels below the input resolution, each entered by a stride-2 step followed by two plain
    steps (one at the top), and left by a transposed step added to the skip of the level above."""

    def __init__(self, in_channels: int, time_dim: int, dims: Sequence[int]):
        super().__init__()
        d = list(dims)
        self.stem = nn.Conv3d(in_channels, d[0], 3, padding=1)
        self.top = Conv3dStep(d[0], d[0], time_dim, None)
        self.down = nn.ModuleList()
        for lv in range(1, 4):
            self.down.append(nn.ModuleList([Conv3dStep(d[lv - 1], d[lv], time_dim, None, stride=2),
                                            Conv3dStep(d[lv], d[lv], time_dim, None),
                                            Conv3dStep(d[lv], d[lv], time_dim, None)]))
        self.up = nn.ModuleList([Conv3dStep(d[lv], d[lv - 1], time_dim, None, up=True) for lv in (3, 2, 1)])

    def forward(self, x: Tensor, t_embed: Float[Tensor, "B T"]) -> Tensor:
        t = t_embed[:, :, None, None, None]
        h = self.top(self.stem(x), t)
        skips = [h]
        for steps in self.down:
            for step in steps:
                h = step(h, t)
            skips.append(h)
        skips.pop()
        for step in self.up:
            h = skips.pop() + step(h, t)
        return h


class FrustumUNet(nn.Module):
    """A frustum's 3D UNet: sampled volume features -> features at four resolutions, keyed by width."""

    def __init__(self, in_channels: int, time_dim: int, view_dim: int, dims: Sequence[int]):
        super().__init__()
        d = list(dims)
        self.stem = nn.Conv3d(in_channels, d[0], 3, padding=1)
        self.down = nn.ModuleList([nn.ModuleList([Conv3dStep(d[lv - 1], d[lv], time_dim, view_dim, stride=2),
                                                  Conv3dStep(d[lv], d[lv], time_dim, view_dim)])
                                   for lv in range(1, 4)])
        self.up = nn.ModuleList([Conv3dStep(d[lv], d[lv - 1], time_dim, view_dim, up=True) for lv in (3, 2, 1)])

    def forward(self, x: Tensor, t_embed: Float[Tensor, "B T"], v_embed: Float[Tensor, "B V"]) -> dict[int, Tensor]:
        t, v = t_embed[:, :, None, None, None], v_embed[:, :, None, None, None]
        levels = [self.stem(x)]
        for first, second in self.down:
            levels.append(second(first(levels[-1], t, v), t, v))
        h = levels[3]
        for i, step in enumerate(self.up):  # back up: each level's output is its skip plus the upsampled one
            h = step(h, t, v) + levels[2 - i]
            levels[2 - i] = h
        return {int(f.shape[-1]): f for f in levels}


# ---------------------------------------------------------------------------------------------
# Cameras and sampling the volumes


def projection_matrices(K: Float[Tensor, "N 3 3"], w2c: Float[Tensor, "N 3 4"], scale: float) -> Tensor:
    """[N, 4, 4] world -> homogeneous pixel coordinates of an image ``scale`` times the intrinsics' size."""
    S = torch.diag(torch.tensor([scale, scale, 1.0], dtype=K.dtype, device=K.device))
    P = S @ K @ w2c
    bottom = torch.zeros(P.shape[0], 1, 4, dtype=P.dtype, device=P.device)
    bottom[:, :, 3] = 1.0
    return torch.cat([P, bottom], 1)


def grid_points(size: int, half_extent: float, device: torch.device) -> Float[Tensor, "3 V V V"]:
    """The spatial volume's cell centres: entry [:, d, h, w] is the point (x=w, y=h, z=d), which is how
    ``grid_sample`` indexes a volume with (x, y, z) coordinates."""
    lin = torch.linspace(-half_extent, half_extent, size, device=device)
    z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
    return torch.stack([x, y, z])


def project_to_grid(points: Float[Tensor, "B 3 P"], P: Float[Tensor, "B 4 4"], size: int) -> Tensor:
    """[B, P, 2] ``grid_sample`` coordinates (align_corners=True) of ``points`` in a ``size``-pixel image."""
    cam = P[:, :3, :3] @ points + P[:, :3, 3:]
    uv = cam[:, :2] / cam[:, 2:].clamp_min(1e-4)
    return (uv / ((size - 1) / 2) - 1).permute(0, 2, 1)


class SpatialVolume(nn.Module):
    """The volume branch: the spatial volume of all views, and each target view's frustum features."""

    def __init__(self, cfg: VolumeConfig, latent_channels: int = 4):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViewEncoder(cfg, latent_channels)
        self.volume_net = VolumeUNet(cfg.view_channels * cfg.view_num, cfg.time_dim, cfg.dims)
        self.frustum_net = FrustumUNet(cfg.dims[0], cfg.time_dim, cfg.view_dim, cfg.dims)

    def spatial(self, x: Float[Tensor, "B N C h w"], t_embed: Float[Tensor, "B T"], v_embed: Float[Tensor, "B N V"],
                K: Float[Tensor, "N 3 3"], w2c: Float[Tensor, "N 3 4"]) -> Float[Tensor, "B D0 S S S"]:
        """The fused volume from all ``N`` views' noisy latents."""
        cfg = self.cfg
        B, N = x.shape[:2]
        S = cfg.volume_size
        K, w2c = K.float(), w2c.float()  # geometry in float32 whatever the weights' dtype
        pts = grid_points(S, cfg.volume_half_extent, x.device).reshape(1, 3, -1).expand(B, 3, -1)
        feats = []
        for n in range(N):
            f = self.encoder(x[:, n], t_embed, v_embed[:, n])
            P = projection_matrices(K[n:n + 1], w2c[n:n + 1], f.shape[-1] / cfg.image_size).expand(B, 4, 4)
            uv = project_to_grid(pts, P, f.shape[-1]).reshape(B, S, S * S, 2).to(f.dtype)
            feats.append(F.grid_sample(f, uv, mode="bilinear", padding_mode="zeros", align_corners=True)
                         .reshape(B, -1, S, S, S))
        return self.volume_net(torch.cat(feats, 1), t_embed)

    def frustum_points(self, K: Float[Tensor, "M 3 3"], w2c: Float[Tensor, "M 3 4"]) -> Float[Tensor, "M 3 D h w"]:
        """World points along the rays of each latent pixel (integer pixel positions), ``frustum_depth`` depths."""
        cfg = self.cfg
        M, n, D = K.shape[0], cfg.latent_size, cfg.frustum_depth
        near = cfg.camera_distance - cfg.frustum_half_length
        far = cfg.camera_distance + cfg.frustum_half_length
        depth = torch.linspace(0, 1, D, device=K.device, dtype=K.dtype) * (far - near) + near  # [D]
        ys, xs = torch.meshgrid(torch.arange(n, device=K.device, dtype=K.dtype),
                                torch.arange(n, device=K.device, dtype=K.dtype), indexing="ij")
        pix = torch.stack([xs, ys, torch.ones_like(xs)]).reshape(3, 1, n * n) * depth.view(1, D, 1)  # [3, D, n*n]
        inv = torch.linalg.inv(projection_matrices(K, w2c, n / cfg.image_size))
        pts = inv[:, :3, :3] @ pix.reshape(1, 3, -1) + inv[:, :3, 3:]
        return pts.reshape(M, 3, D, n, n)

    def frustum(self, volume: Float[Tensor, "B D0 S S S"], t_embed: Float[Tensor, "B T"],
                v_embed: Float[Tensor, "B N V"], K: Float[Tensor, "N 3 3"], w2c: Float[Tensor, "N 3 4"],
                views: Float[Tensor, "B M"]) -> dict[int, Tensor]:
        """Frustum features of the target ``views`` (indices per batch element) -> {width: [B*M, C, D', w, w]}."""
        B, M = views.shape
        flat = views.reshape(-1)
        pts = self.frustum_points(K[flat].float(), w2c[flat].float())  # [B*M, 3, D, h, w], float32
        grid = (pts / self.cfg.volume_half_extent).permute(0, 2, 3, 4, 1).to(volume.dtype)
        vol = volume.unsqueeze(1).expand(B, M, *volume.shape[1:]).reshape(B * M, *volume.shape[1:])
        sampled = F.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        v = v_embed[torch.arange(B, device=views.device)[:, None], views].reshape(B * M, -1)
        t = t_embed.unsqueeze(1).expand(B, M, t_embed.shape[-1]).reshape(B * M, -1)
        return self.frustum_net(sampled, t, v)


# ---------------------------------------------------------------------------------------------
# Depth-wise attention


class DepthTransformer(nn.Module):
    """Each pixel of a 2D feature map attends over the depth samples of its frustum features.

    ``x`` [B, dim, h, w] is lifted to ``heads * head_dim`` channels (1x1 convolution, group norm,
    SiLU); the context [B, ctx, D, h, w] is projected (1x1x1 convolution without bias, group norm,
    ReLU, so that a zero volume gives a zero context); per pixel and head, one query attends over D
    keys; the result goes through two 3x3 convolutions back to ``dim`` and is added to ``x``.
    """

    def __init__(self, dim: int, context_dim: int, heads: int = 4, head_dim: Optional[int] = None):
        super().__init__()
        head_dim = head_dim or context_dim // 2
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.in_conv = nn.Conv2d(dim, inner, 1)
        self.in_norm = nn.GroupNorm(GROUPS, inner)
        self.ctx_conv = nn.Conv3d(context_dim, context_dim, 1, bias=False)
        self.ctx_norm = nn.GroupNorm(GROUPS, context_dim)
        self.to_q = nn.Conv2d(inner, inner, 1, bias=False)
        self.to_k = nn.Conv3d(context_dim, inner, 1, bias=False)
        self.to_v = nn.Conv3d(context_dim, inner, 1, bias=False)
        self.to_out = nn.Conv2d(inner, inner, 1, bias=False)
        self.out_norm1 = nn.GroupNorm(GROUPS, inner)
        self.out_conv1 = nn.Conv2d(inner, inner, 3, padding=1, bias=False)
        self.out_norm2 = nn.GroupNorm(GROUPS, inner)
        self.out_conv2 = nn.Conv2d(inner, dim, 3, padding=1, bias=False)

    def attend(self, x: Float[Tensor, "B I h w"], ctx: Float[Tensor, "B C D h w"]) -> Float[Tensor, "B I h w"]:
        B, _, h, w = x.shape
        D = ctx.shape[2]
        nh, hd = self.heads, self.head_dim
        # one query per (pixel, head), D keys: [B*h*w*heads, 1 or D, head_dim]
        q = self.to_q(x).reshape(B, nh, hd, h * w).permute(0, 3, 1, 2).reshape(-1, 1, hd)
        k = self.to_k(ctx).reshape(B, nh, hd, D, h * w).permute(0, 4, 1, 3, 2).reshape(-1, D, hd)
        v = self.to_v(ctx).reshape(B, nh, hd, D, h * w).permute(0, 4, 1, 3, 2).reshape(-1, D, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*h*w*nh, 1, hd]
        out = out.reshape(B, h * w, nh * hd).permute(0, 2, 1).reshape(B, nh * hd, h, w)
        return self.to_out(out)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = F.silu(self.in_norm(self.in_conv(x)))
        ctx = F.relu(self.ctx_norm(self.ctx_conv(context)))
        h = self.attend(h, ctx)
        h = self.out_conv1(F.relu(self.out_norm1(h)))
        h = self.out_conv2(F.relu(self.out_norm2(h)))
        return x + h


# ---------------------------------------------------------------------------------------------
# The UNet with depth-wise attention


def condition_layout(unet_config: dict, volume_dims: Sequence[int]) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(channels, context width) of the middle block's depth transformer, and of each decoder layer's that
    gets one: every layer of every up block but the deepest, after its upsampler where it has one."""
    chans = list(unet_config["block_out_channels"])
    L, n = len(chans), int(unet_config["layers_per_block"])
    if len(volume_dims) != L:
        raise ValueError(f"SyncDreamer: the UNet has {L} levels but the volume {len(volume_dims)} widths; "
                         "they must agree (one frustum resolution per level)")
    mid = (chans[-1], volume_dims[L - 1])
    ups = []
    for j in range(1, L):
        lv = L - 1 - j  # the level (from the top) this up block works at
        for r in range(n + 1):
            after = lv - 1 if (r == n and lv > 0) else lv
            ups.append((chans[lv], volume_dims[after]))
    return mid, ups


class SyncDreamerUNet(nn.Module):
    """diffusers' ``UNet2DConditionModel`` run block by block, with :class:`DepthTransformer` layers after
    the middle block and after each decoder layer below the deepest level (see :func:`condition_layout`)."""

    def __init__(self, unet: nn.Module, volume_dims: Sequence[int]):
        super().__init__()
        self.unet = unet
        (mc, mctx), ups = condition_layout(dict(unet.config), volume_dims)
        self.mid_condition = DepthTransformer(mc, mctx)
        self.up_conditions = nn.ModuleList([DepthTransformer(c, ctx) for c, ctx in ups])

    def forward(self, x: Float[Tensor, "B Cin h w"], t: Tensor, context: Float[Tensor, "B L E"],
                volume: Optional[dict[int, Tensor]]) -> Float[Tensor, "B 4 h w"]:
        """Noise prediction; ``volume`` maps a width to frustum features [B, C, D, w, w] (None: no depth-wise
        attention, the plain UNet)."""
        u = self.unet
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = u.time_embedding(u.time_proj(t).to(x.dtype))
        h = u.conv_in(x)
        skips: list[Tensor] = [h]
        for block in u.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(h, emb, encoder_hidden_states=context)
            else:
                h, res = block(h, emb)
            skips.extend(res)
        h = u.mid_block(h, emb, encoder_hidden_states=context)
        if volume is not None:
            h = self.mid_condition(h, volume[h.shape[-1]])
        k = 0
        for j, block in enumerate(u.up_blocks):
            attns = getattr(block, "attentions", None)
            n = len(block.resnets)
            for r, resnet in enumerate(block.resnets):
                h = resnet(torch.cat([h, skips.pop()], 1), emb)
                if attns is not None:
                    h = attns[r](h, encoder_hidden_states=context, return_dict=False)[0]
                if r == n - 1 and block.upsamplers is not None:
                    size = skips[-1].shape[2:] if skips else None
                    for up in block.upsamplers:
                        h = up(h, size)
                if j > 0:
                    if volume is not None:
                        h = self.up_conditions[k](h, volume[h.shape[-1]])
                    k += 1
        h = u.conv_out(F.silu(u.conv_norm_out(h)))
        return h


def timestep_features(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal features of timesteps, cosines first (latent diffusion's ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(a), torch.sin(a)], -1)


__all__ = ["VolumeConfig", "ViewEncoder", "VolumeUNet", "FrustumUNet", "SpatialVolume", "DepthTransformer",
           "SyncDreamerUNet", "condition_layout", "projection_matrices", "grid_points", "project_to_grid",
           "timestep_features", "GROUPS"]
