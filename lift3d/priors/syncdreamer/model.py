"""SyncDreamer's networks together, and one denoising step over the 16 views with classifier-free guidance.

The input image reaches the denoiser three ways (Zero123's conditioning plus the volume):

* its VAE latent (a posterior sample, *without* the 0.18215 scaling: the original divides it out
  again before concatenating) is concatenated to each view's noisy latent (8 input channels);
* its CLIP ViT-L/14 image embedding, concatenated with the view's relative camera
  (:func:`~lift3d.priors.syncdreamer.cameras.view_embedding`, which is where the input elevation
  enters), goes through ``cc_projection`` (772 -> 768) to be the cross-attention context (one token);
* the noisy latents of all 16 views build the spatial volume, whose frustum features the UNet's
  depth-wise attention reads.

Classifier-free guidance: the unconditional branch has all three set to zero (the projected
embedding, the frustum features and the concatenated latent), and ``e = u + s (c - u)``; the
spatial volume is built once per step from the noisy views either way.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from lift3d.priors.syncdreamer import cameras as cams
from lift3d.priors.syncdreamer.network import SpatialVolume, SyncDreamerUNet, VolumeConfig, timestep_features


class SyncDreamer(nn.Module):
    """The frozen networks of SyncDreamer (see the module docstring). Attribute names are lift3d's; the
    original checkpoint's names are placed by :mod:`lift3d.priors.syncdreamer.checkpoint`."""

    def __init__(self, unet: SyncDreamerUNet, volume: SpatialVolume, time_embedding: nn.Module,
                 cc_projection: nn.Linear, vae: nn.Module, image_encoder: nn.Module, alphas_cumprod: Tensor, *,
                 scaling_factor: float = 0.18215, clip_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                 clip_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)):
        super().__init__()
        self.unet, self.volume, self.time_embedding = unet, volume, time_embedding
        self.cc_projection, self.vae, self.image_encoder = cc_projection, vae, image_encoder
        vc: VolumeConfig = volume.cfg
        K, w2c = cams.model_cameras(vc.image_size)
        if vc.view_num != cams.N_VIEWS:
            raise ValueError(f"SyncDreamer draws {cams.N_VIEWS} views; the volume is built for {vc.view_num}")
        self.register_buffer("K", K, persistent=False)
        self.register_buffer("w2c", w2c, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float().clone(), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(clip_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std).view(1, 3, 1, 1), persistent=False)
        self.scaling_factor = float(scaling_factor)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if self.vae_factor != vc.latent_factor:
            raise ValueError(f"SyncDreamer: the VAE downsamples {self.vae_factor}x, the volume expects "
                             f"{vc.latent_factor}x")

    @property
    def cfg(self) -> VolumeConfig:
        return self.volume.cfg

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cc_projection.weight.dtype

    # -- the input image ---------------------------------------------------------------------

    @torch.no_grad()
    def clip_embedding(self, image: Float[Tensor, "B 3 H W"]) -> Float[Tensor, "B 1 E"]:
        """CLIP's image embedding of ``image`` in [0, 1] (resized bicubically to CLIP's size, corners aligned,
        as the original does through kornia)."""
        size = int(self.image_encoder.config.image_size)
        x = F.interpolate(image.to(self.device, torch.float32) * 2 - 1, size=(size, size), mode="bicubic",
                          align_corners=True)
        x = ((x + 1) / 2 - self.clip_mean) / self.clip_std
        return self.image_encoder(pixel_values=x.to(self.dtype)).image_embeds.float()[:, None]

    @torch.no_grad()
    def input_latent(self, image: Float[Tensor, "B 3 H W"], generator: Optional[torch.Generator] = None
                     ) -> Float[Tensor, "B 4 h w"]:
        """A VAE posterior sample of ``image`` in [0, 1], unscaled (what the UNet is concatenated with)."""
        x = (image.to(self.device, torch.float32) * 2 - 1).to(self.dtype)
        dist = self.vae.encode(x).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else None).to(self.device)
        return dist.mean.float() + dist.std.float() * noise

    @torch.no_grad()
    def decode(self, z: Float[Tensor, "B 4 h w"]) -> Float[Tensor, "B 3 H W"]:
        """Latents (scaled) -> images in [0, 1]."""
        x = self.vae.decode((z.float() / self.scaling_factor).to(self.dtype)).sample.float()
        return ((x.clamp(-1, 1) + 1) / 2)

    # -- one step ----------------------------------------------------------------------------

    def embed_time(self, t: Tensor) -> Tensor:
        return self.time_embedding(timestep_features(t, self.cfg.time_dim).to(self.dtype))

    def predict(self, x_t: Float[Tensor, "B N 4 h w"], t: Tensor, latent: Float[Tensor, "B 4 h w"],
                clip: Float[Tensor, "B 1 E"], elevation: Float[Tensor, "B"], *, guidance_scale: float = 1.0,
                views: Optional[list[int]] = None, view_batch: int = 16, use_volume: bool = True
                ) -> Float[Tensor, "B M 4 h w"]:
        """The noise of the views ``views`` (default all N) at the integer timestep(s) ``t`` [B] (or a scalar),
        given the noisy latents of all N views. ``use_volume=False`` runs the plain UNet (no view sees another):
        for tests of what the volume does, not a mode of the model."""
        dt = self.dtype
        B, N = x_t.shape[:2]
        t = torch.as_tensor(t, device=x_t.device).long().reshape(-1).expand(B)
        views = list(range(N)) if views is None else list(views)
        v_embed = cams.view_embedding(elevation.to(x_t.device)).to(dt)  # [B, N, 4]
        t_embed = self.embed_time(t)
        volume = self.volume.spatial(x_t.to(dt), t_embed, v_embed, self.K, self.w2c) \
            if use_volume else None
        out = []
        for s in range(0, len(views), max(1, view_batch)):
            chunk = views[s:s + view_batch]
            M = len(chunk)
            idx = torch.tensor(chunk, device=x_t.device).expand(B, M)
            feats = self.volume.frustum(volume, t_embed, v_embed, self.K, self.w2c, idx) \
                if use_volume else None
            ctx = torch.cat([clip.to(dt)[:, None].expand(B, M, 1, clip.shape[-1]),
                             v_embed[:, chunk][:, :, None]], -1).reshape(B * M, 1, -1)
            ctx = self.cc_projection(ctx)
            lat = latent.to(dt)[:, None].expand(B, M, *latent.shape[1:]).reshape(B * M, *latent.shape[1:])
            x = x_t[:, chunk].to(dt).reshape(B * M, *x_t.shape[2:])
            tt = t[:, None].expand(B, M).reshape(-1)
            if guidance_scale != 1.0:
                zero_f = {k: torch.zeros_like(v) for k, v in feats.items()} if feats is not None else None
                both_f = {k: torch.cat([v, zero_f[k]]) for k, v in feats.items()} if feats is not None else None
                e = self.unet(torch.cat([torch.cat([x, lat], 1), torch.cat([x, torch.zeros_like(lat)], 1)]),
                              torch.cat([tt, tt]), torch.cat([ctx, torch.zeros_like(ctx)]), both_f)
                c, u = e.float().chunk(2)
                e = u + guidance_scale * (c - u)
            else:
                e = self.unet(torch.cat([x, lat], 1), tt, ctx, feats).float()
            out.append(e.reshape(B, M, *e.shape[1:]))
        return torch.cat(out, 1)


__all__ = ["SyncDreamer"]
