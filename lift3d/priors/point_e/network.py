"""Point-E's point-cloud diffusion transformers, written with torch building blocks.

Nichol et al. 2022, "Point-E: A System for Generating 3D Point Clouds from Complex Prompts"
(arXiv:2212.08751). A point cloud of ``n_ctx`` points with ``input_channels`` values each (xyz plus
rgb) is one token per point: a linear projection in, a stack of pre-norm transformer blocks with no
positional encoding (the points are a set), a linear projection out. Conditions enter as extra tokens
placed before the points and dropped again before the output projection:

* the diffusion timestep, as a sinusoidal embedding passed through a two-layer MLP (``time_token_cond``);
* for the text-conditioned base model (``base40M-textvec``), one token from a CLIP ViT-L/14 feature
  vector through a linear layer. The reference orders the extra tokens *[condition, time, points...]*;
* for the upsampler (``upsample40M``), a token per low-resolution point (its own projection, after the
  diffusion's channel scaling of the raw low-res cloud) and a 16x16 grid of CLIP image-patch tokens.
  The reference orders them *[time, image grid (256), low-res points (1024), points (3072)...]*.

Attention follows the reference's fused layout: ``qkv`` produces, per token, ``heads`` groups of
``3 * head_dim`` values, each group holding that head's query, key and value in that order (not
the ``[all q | all k | all v]`` layout of ``nn.MultiheadAttention``); we split it the same way and
call :func:`torch.nn.functional.scaled_dot_product_attention`. The module names are ours; the
original names are mapped in :mod:`lift3d.priors.point_e.checkpoint`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PointTransformerConfig", "PointDiffusionTransformer", "PointUpsamplerConfig", "PointUpsampleTransformer",
    "timestep_embedding",
]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: t [B] -> [B, dim], cosines then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    # The reference multiplies in t's own dtype (integer timesteps become float here).
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class _MLP(nn.Module):
    def __init__(self, width: int, hidden: int, init_std: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        for layer in (self.fc1, self.fc2):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        # Exact (erf) GELU, as nn.GELU() in the reference.
        return self.fc2(F.gelu(self.fc1(x)))


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, init_std: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"Point-E transformer: width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        for layer in (self.qkv, self.proj):
            nn.init.normal_(layer.weight, std=init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:  # x [B, L, W]
        b, n, w = x.shape
        # Per-head interleaved layout: [B, L, H, 3*D] -> q, k, v each [B, H, L, D].
        q, k, v = self.qkv(x).view(b, n, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v, no mask
        return self.proj(out.transpose(1, 2).reshape(b, n, w))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, init_std: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads, init_std)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = _MLP(width, 4 * width, init_std)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@dataclass
class PointTransformerConfig:
    """Hyper-parameters of the base transformer; names and defaults are Point-E's ``base40M-textvec``."""

    input_channels: int = 6
    """Values per point the model reads: xyz + rgb."""
    output_channels: int = 12
    """Values per point it writes: eps for each input channel, then as many learned-variance values."""
    n_ctx: int = 1024
    """Points per cloud (the model is permutation-equivariant but the reference asserts this count)."""
    width: int = 512
    layers: int = 12
    heads: int = 8
    init_scale: float = 0.25
    """Initialisation scale (only matters for training from scratch; loaded weights replace it)."""
    time_token_cond: bool = True
    """The timestep is an extra token (True) or added to every point token (False)."""
    cond_dim: int | None = 768
    """Size of the conditioning vector (CLIP ViT-L/14 features); None for an unconditional model."""
    token_cond: bool = True
    """The condition is an extra token (True, Point-E's ``*vec`` models) or added to every point token."""


class _TransformerTrunk(nn.Module):
    """Shared parts: time MLP, input/output projections, pre/post norms and the block stack."""

    def __init__(self, input_channels: int, output_channels: int, width: int, layers: int, heads: int,
                 init_scale: float):
        super().__init__()
        self.time_mlp = _MLP(width, 4 * width, init_scale * math.sqrt(1.0 / width))
        self.norm_in = nn.LayerNorm(width)
        block_std = init_scale * math.sqrt(1.0 / width)
        self.blocks = nn.ModuleList([_Block(width, heads, block_std) for _ in range(layers)])
        self.norm_out = nn.LayerNorm(width)
        self.point_in = nn.Linear(input_channels, width)
        self.point_out = nn.Linear(width, output_channels)
        # Zero output at initialisation, as the reference does.
        nn.init.zeros_(self.point_out.weight)
        nn.init.zeros_(self.point_out.bias)
        self.width = width

    def embed_time(self, t: Tensor) -> Tensor:
        return self.time_mlp(timestep_embedding(t, self.width).to(self.time_mlp.fc1.weight.dtype))

    def run(self, x: Tensor, prefix: list[Tensor], add: Tensor | None = None) -> Tensor:
        """x [B, C_in, N]; prefix: extra tokens [B, L_i, W], placed before the points in this order;
        add: [B, W] added to every point token (a condition not given as a token)."""
        out_dtype = x.dtype
        dtype = self.point_in.weight.dtype  # run in the weights' precision (half weights, float inputs)
        prefix = [p.to(dtype) for p in prefix]
        h = self.point_in(x.to(dtype).transpose(1, 2))  # [B, N, W]
        if add is not None:
            h = h + add.to(dtype)[:, None]
        n_prefix = sum(p.shape[1] for p in prefix)
        if prefix:
            h = torch.cat([*prefix, h], dim=1)
        h = self.norm_in(h)
        for block in self.blocks:
            h = block(h)
        h = self.norm_out(h[:, n_prefix:])
        return self.point_out(h).transpose(1, 2).to(out_dtype)  # [B, C_out, N]


class PointDiffusionTransformer(_TransformerTrunk):
    """The base model: a noisy cloud x [B, C_in, N], timesteps t [B] and a condition vector -> [B, C_out, N]."""

    def __init__(self, cfg: PointTransformerConfig | None = None, **overrides):
        cfg = cfg or PointTransformerConfig(**overrides)
        super().__init__(cfg.input_channels, cfg.output_channels, cfg.width, cfg.layers, cfg.heads, cfg.init_scale)
        self.cfg = cfg
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.width) if cfg.cond_dim is not None else None

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Predict at (x_t, t, cond).

        Args:
            x: [B, C_in, N] noisy points in the model's (channel-scaled) space.
            t: [B] timesteps, 0..T-1 (integers; fractional values are accepted as the embedding allows).
            cond: [B, cond_dim] the vector the reference feeds its condition projection: for Point-E text,
                CLIP text features L2-normalised then times sqrt(cond_dim) (see ``text.py``). An all-zero row
                is the unconditional input (what the reference's condition dropout and its guidance use).
                None is the same as all zeros. Must be None for an unconditional model.

        Returns:
            [B, C_out, N]: eps for the C_in channels, then the learned-range variance values.
        """
        b, c, n = x.shape
        if c != self.cfg.input_channels:
            raise ValueError(f"Point-E transformer reads {self.cfg.input_channels} channels per point, got x of shape "
                             f"{tuple(x.shape)} ([B, C, N] expected)")
        if t.ndim == 0:
            t = t.expand(b)
        t_emb = self.embed_time(t.to(x.device))
        prefix: list[Tensor] = []
        if self.cond_proj is not None:
            if cond is None:
                cond = x.new_zeros(b, self.cfg.cond_dim)
            if cond.shape != (b, self.cfg.cond_dim):
                raise ValueError(f"Point-E transformer: cond must be [{b}, {self.cfg.cond_dim}], got {tuple(cond.shape)}")
            c_emb = self.cond_proj(cond.to(self.cond_proj.weight.dtype))
        elif cond is not None:
            raise ValueError("this Point-E transformer is unconditional (cond_dim=None) but was given cond")
        else:
            c_emb = None
        add = None
        for emb, as_token in ((c_emb, self.cfg.token_cond), (t_emb, self.cfg.time_token_cond)):
            if emb is None:
                continue
            if as_token:
                prefix.append(emb[:, None])
            else:
                add = emb if add is None else add + emb
        return self.run(x, prefix, add=add)


@dataclass
class PointUpsamplerConfig:
    """Hyper-parameters of Point-E's upsampler (``upsample40M``, 1024 -> 4096 points)."""

    input_channels: int = 6
    output_channels: int = 12
    n_ctx: int = 3072
    """New points the model denoises; the output cloud is the low-res points followed by these."""
    cond_ctx: int = 1024
    """Low-resolution points it is conditioned on."""
    cond_input_channels: int = 6
    width: int = 512
    layers: int = 12
    heads: int = 8
    init_scale: float = 0.25
    time_token_cond: bool = True
    channel_scales: Sequence[float] = (2.0, 2.0, 2.0, 0.007843137255, 0.007843137255, 0.007843137255)
    """Applied to the raw low-res cloud (xyz, rgb in 0..255) before its projection, as the diffusion scales x."""
    channel_biases: Sequence[float] = (0.0, 0.0, 0.0, -1.0, -1.0, -1.0)
    grid_dim: int | None = 1024
    """Channels of the CLIP ViT-L/14 image-patch grid (image conditioning); None: no grid tokens."""
    grid_tokens: int = 256
    """Patches in the grid (16 x 16 for ViT-L/14 at 224 px)."""


class PointUpsampleTransformer(_TransformerTrunk):
    """The upsampler: x [B, C, n_ctx] new points given the low-res cloud [B, C, cond_ctx] -> [B, C_out, n_ctx].

    The text-to-point-cloud path of the reference does not condition the upsampler on text or images:
    the image grid is all zeros (``grid=None`` here), which through the grid's layer norm makes every
    grid token the same constant. Image conditioning is supported by passing a grid, but lift3d does
    not compute CLIP image grids (the text path does not need them).
    """

    def __init__(self, cfg: PointUpsamplerConfig | None = None, **overrides):
        cfg = cfg or PointUpsamplerConfig(**overrides)
        super().__init__(cfg.input_channels, cfg.output_channels, cfg.width, cfg.layers, cfg.heads, cfg.init_scale)
        self.cfg = cfg
        self.low_res_proj = nn.Linear(cfg.cond_input_channels, cfg.width)
        self.register_buffer("low_res_scales", torch.tensor(list(cfg.channel_scales), dtype=torch.float32))
        self.register_buffer("low_res_biases", torch.tensor(list(cfg.channel_biases), dtype=torch.float32))
        if cfg.grid_dim is not None:
            self.grid_norm = nn.LayerNorm(cfg.grid_dim)
            self.grid_proj = nn.Linear(cfg.grid_dim, cfg.width)
        else:
            self.grid_norm = self.grid_proj = None

    def forward(self, x: Tensor, t: Tensor, low_res: Tensor, grid: Tensor | None = None) -> Tensor:
        """Predict at (x_t, t) given the low-res cloud.

        Args:
            x: [B, C_in, n_ctx] noisy new points in the model's (channel-scaled) space.
            t: [B] timesteps.
            low_res: [B, C_cond, cond_ctx] the low-res cloud in RAW units (xyz, rgb in 0..255), as the
                reference's sampler passes it; the channel scales/biases are applied here.
            grid: [B, grid_dim, grid_tokens] CLIP image-patch features, or None for zeros (the text path).
        """
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        t_emb = self.embed_time(t.to(x.device))
        # Scale in float32 (raw colours reach 255), then project in the weights' precision.
        lr = low_res.float() * self.low_res_scales.float()[None, :, None] + self.low_res_biases.float()[None, :, None]
        lr = lr.to(self.low_res_proj.weight.dtype)
        lr_tokens = self.low_res_proj(lr.transpose(1, 2))
        prefix: list[Tensor] = []
        if self.cfg.time_token_cond:
            prefix.append(t_emb[:, None])
        if self.grid_proj is not None:
            if grid is None:
                grid = x.new_zeros(b, self.cfg.grid_dim, self.cfg.grid_tokens)
            prefix.append(self.grid_proj(self.grid_norm(grid.to(self.grid_proj.weight.dtype).transpose(1, 2))))
        prefix.append(lr_tokens)
        return self.run(x, prefix, add=None if self.cfg.time_token_cond else t_emb)
