"""Input encodings for implicit fields: the multiresolution hash grid and frequency encodings.

The hash grid is the encoding of InstantNGP (Mueller et al., "Instant Neural Graphics Primitives
with a Multiresolution Hash Encoding", SIGGRAPH 2022): ``L`` grids of growing resolution, each
storing ``F`` trainable features per vertex (dense where the grid fits the table, spatially hashed
where it does not), trilinearly interpolated and concatenated over levels. The progressive-band
variant (Magic3D / threestudio recipes) unmasks finer levels as training goes on.

The torch implementation here is the reference and is written for speed on CPU:

* every level and all 8 cell corners are handled in one pass (no Python loop over levels); the
  per-level constants (scale, hash multipliers, masks, table offsets) are precomputed buffers;
* the table is laid out so that one integer formula covers dense and hashed levels: dense levels
  use power-of-two strides (so ``x + y*R + z*R^2`` equals ``x ^ y*R ^ z*R^2``) and every level's
  block starts at a multiple of its own power-of-two size, which lets the level offset be OR-ed in;
* points are laid out along the last axis (``[3, N]``, ``[L, 8, n]``) so every broadcast has a
  long contiguous inner loop, and index arithmetic is int32 (products wrap modulo 2^32, which
  leaves the masked low bits of the hash unchanged) to halve memory traffic;
* the table is stored ``[F, M]`` (one contiguous row per feature channel): gathers and
  ``index_add_`` run on 1D rows, much faster on CPU than on ``[M, F]`` rows;
* the default (parameter-gradient) path is a custom autograd Function that walks the points in
  cache-sized chunks (fresh ``N * L * 8`` temporaries cost page faults that dominated the naive
  version), keeps each chunk's corner rows and weights for backward while under a memory budget
  (recomputing them beyond it), and accumulates the table gradient with ``index_add_``; without
  gradients the same chunked lookup runs with no autograd bookkeeping;
* when the input positions need gradients (analytic normals, eikonal losses needing second order)
  an ordinary differentiable autograd graph of the same math is used instead.

tiny-cuda-nn replaces it on CUDA when installed (``lift3d.backends.tcnn_backend``); its table
layout differs, so checkpoints do not move between the two implementations.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

# Spatial hash primes of the InstantNGP paper (the first is 1 so a 1D walk stays coherent).
_PRIMES = (1, 2654435761, 805459861)

HASHGRID_KEYS = {
    "otype",
    "n_levels",
    "n_features_per_level",
    "log2_hashmap_size",
    "base_resolution",
    "per_level_scale",
    "interpolation",
    "start_level",
    "start_step",
    "update_steps",
    "chunk_size",
}
FREQUENCY_KEYS = {"otype", "n_frequencies", "n_masking_step", "include_input"}


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _lookup(xT: Tensor, table: Tensor, grid: "HashGridEncoding", saved: list | None) -> Tensor:
    """Interpolated features [L, F, N] of points xT [3, N]; appends each chunk's (rows, weights) to ``saved``."""
    N = xT.shape[1]
    L, F = grid.n_levels, grid.n_features_per_level
    out = torch.empty(L, F, N, dtype=table.dtype, device=table.device)
    cs = grid.chunk_size
    for s in range(0, N, cs):
        idx, w = grid._corners(xT[:, s : s + cs])  # [L, 8, n] each
        flat = idx.view(-1)
        for f in range(F):
            vals = table[f].index_select(0, flat).view_as(w)  # [L, 8, n]
            torch.sum(vals.mul_(w), dim=1, out=out[:, f, s : s + cs])
        if saved is not None:
            saved.append((flat, w))
    return out


class _HashGridFunction(torch.autograd.Function):
    """Hash-grid lookup with gradients for the table only, walked in cache-sized chunks.

    Corner rows and weights of each chunk are kept for backward while they fit in
    ``SAVE_BUDGET_BYTES``; beyond that backward recomputes them (slower, constant memory).
    """

    SAVE_BUDGET_BYTES = 512 * 2**20

    @staticmethod
    def forward(ctx: Any, xT: Tensor, table: Tensor, grid: "HashGridEncoding") -> Tensor:  # type: ignore[override]
        # xT: [3, N] in [0, 1] (points along the fast axis); table: [F, M]
        N, L = xT.shape[1], grid.n_levels
        keep = N * L * 8 * (grid.mults.element_size() + table.element_size()) <= _HashGridFunction.SAVE_BUDGET_BYTES
        saved: list | None = [] if keep else None
        out = _lookup(xT, table, grid, saved)
        ctx.grid = grid
        ctx.n_rows = table.shape[1]
        ctx.saved_corners = saved
        ctx.save_for_backward(xT)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        (xT,) = ctx.saved_tensors
        grid: HashGridEncoding = ctx.grid
        F = grid.n_features_per_level
        grad_out = grad_out.contiguous()  # [L, F, N]
        grad_table = torch.zeros(F, ctx.n_rows, dtype=grad_out.dtype, device=grad_out.device)
        cs = grid.chunk_size
        saved = ctx.saved_corners
        for k, s in enumerate(range(0, xT.shape[1], cs)):
            if saved is not None:
                flat, w = saved[k]
            else:
                idx, w = grid._corners(xT[:, s : s + cs])
                flat = idx.view(-1)
            for f in range(F):
                contrib = w * grad_out[:, f, None, s : s + cs]  # [L, 8, n]
                # One channel at a time into a contiguous row: much faster than index_add_ on [M, F].
                grad_table[f].index_add_(0, flat, contrib.view(-1))
        ctx.saved_corners = None
        return None, grad_table, None


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding of points in [0, 1]^3 -> [..., n_levels * n_features_per_level].

    Level ``l`` has scale ``base_resolution * per_level_scale**l - 1`` (cells across the unit
    cube); positions are ``x * scale + 0.5`` so level grids are offset from each other. A level
    whose (power-of-two padded) vertex grid fits in ``2**log2_hashmap_size`` entries is stored
    densely, finer ones are hashed into that many entries.
    """

    def __init__(
        self,
        n_input_dims: int = 3,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.447269237440378,
        start_level: int | None = None,
        start_step: int = 0,
        update_steps: int = 1,
        chunk_size: int = 4096,
        init_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        if n_input_dims != 3:
            raise ValueError(f"the hash grid encodes 3D points; got n_input_dims={n_input_dims}")
        if n_levels < 1 or n_features_per_level < 1:
            raise ValueError("hash grid needs n_levels >= 1 and n_features_per_level >= 1")
        if not 4 <= log2_hashmap_size <= 26:
            raise ValueError(f"log2_hashmap_size must be within [4, 26], got {log2_hashmap_size}")
        self.n_input_dims = n_input_dims
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.n_output_dims = n_levels * n_features_per_level
        self.log2_hashmap_size = log2_hashmap_size
        self.chunk_size = int(chunk_size)
        self.start_level = n_levels if start_level is None else int(start_level)
        self.start_step = int(start_step)
        self.update_steps = max(1, int(update_steps))
        T = 1 << log2_hashmap_size

        scales, sizes, mults, masks = [], [], [], []
        for lv in range(n_levels):
            scale = base_resolution * per_level_scale**lv - 1.0
            # +2: corners of the last cell (floor(scale + 0.5) + 1) stay inside the grid.
            res = int(math.ceil(scale)) + 2
            rp = _next_pow2(res)
            if rp**3 <= T:
                sizes.append(rp**3)
                mults.append((1, rp, rp * rp))
                masks.append(rp**3 - 1)
            else:
                sizes.append(T)
                mults.append(_PRIMES)
                masks.append(T - 1)
            scales.append(scale)
        # Place blocks largest first: each offset is then a multiple of that level's size.
        order = sorted(range(n_levels), key=lambda i: -sizes[i])
        offsets = [0] * n_levels
        acc = 0
        for i in order:
            offsets[i] = acc
            acc += sizes[i]
        self.n_params_rows = acc
        self.level_sizes = sizes

        # Per-level constants shaped to broadcast against [L, 3, n] / [L, n].
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32).view(n_levels, 1, 1), persistent=False)
        self.register_buffer("half_offset", torch.full((n_levels, 1, 1), 0.5), persistent=False)
        idt = torch.int32 if acc < 2**31 else torch.int64
        # int32 products wrap modulo 2^32, which leaves the masked low bits of the hash unchanged.
        mults32 = [[m - (1 << 32) if m >= (1 << 31) else m for m in row] for row in mults]
        self.register_buffer("mults", torch.tensor(mults32 if idt == torch.int32 else mults, dtype=idt).view(n_levels, 3, 1), persistent=False)
        self.register_buffer("masks", torch.tensor(masks, dtype=idt).view(n_levels, 1, 1), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=idt).view(n_levels, 1), persistent=False)
        self.register_buffer("level_mask", torch.ones(n_levels), persistent=False)
        # [F, M]: one contiguous row per feature channel, so gathers and index_add_ run on 1D data.
        self.embeddings = nn.Parameter(torch.empty(n_features_per_level, acc).uniform_(-init_scale, init_scale))
        self.update_step(0, 0)

    # ------------------------------------------------------------------------------------------
    def _corners(self, xT: Tensor) -> tuple[Tensor, Tensor]:
        """Table columns and trilinear weights of the 8 cell corners per level: ([L, 8, n], [L, 8, n]).

        ``xT`` is [3, n]: points run along the last axis so every broadcast below has a long,
        contiguous inner loop (inner dims of size 2 or 8 make CPU kernels crawl).
        """
        n = xT.shape[1]
        L = self.n_levels
        pos = torch.addcmul(self.half_offset, self.scales, xT.unsqueeze(0))  # [L, 3, n]
        cell = pos.floor()
        frac = pos - cell
        h0 = (cell.to(self.mults.dtype) * self.mults) & self.masks  # [L, 3, n]
        # (c + 1) * m == c * m + m, and masking commutes with it (masks are 2^k - 1).
        h1 = (h0 + self.mults) & self.masks
        h0[:, 0] |= self.offsets
        h1[:, 0] |= self.offsets
        H = torch.stack([h0, h1], dim=2)  # [L, 3, 2, n]
        idx = (H[:, 0, :, None, None] ^ H[:, 1, None, :, None]) ^ H[:, 2, None, None, :]  # [L, 2, 2, 2, n]
        W = torch.stack([1.0 - frac, frac], dim=2)  # [L, 3, 2, n]
        w = (W[:, 0, :, None, None] * W[:, 1, None, :, None]) * W[:, 2, None, None, :]
        return idx.view(L, 8, n), w.view(L, 8, n)

    def _forward_autograd(self, xT: Tensor) -> Tensor:
        """Plain differentiable version (gradients for points too, any order): [L, F, N]."""
        idx, w = self._corners(xT)
        vals = self.embeddings[:, idx]  # [F, L, 8, N]
        return (vals * w).sum(2).transpose(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., 3] in [0, 1] -> [..., n_levels * n_features_per_level] (level-major)."""
        shape = x.shape[:-1]
        x = x.reshape(-1, 3)
        if x.dtype != self.embeddings.dtype:
            x = x.to(self.embeddings.dtype)
        xT = x.t().clamp(0.0, 1.0)  # [3, N]
        if not torch.is_grad_enabled() or not self.embeddings.requires_grad and not x.requires_grad:
            out = _lookup(xT.contiguous(), self.embeddings.detach(), self, None)
        elif x.requires_grad:
            out = self._forward_autograd(xT)
        else:
            out = _HashGridFunction.apply(xT.contiguous(), self.embeddings, self)
        out = out.permute(2, 0, 1).reshape(*shape, self.n_output_dims)  # [L, F, N] -> [..., L*F]
        if self.current_level < self.n_levels:
            out = out * self.level_mask.repeat_interleave(self.n_features_per_level)
        return out

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        """Progressive band: unmask one more level every ``update_steps`` after ``start_step``."""
        level = self.start_level + max(global_step - self.start_step, 0) // self.update_steps
        self.current_level = min(self.n_levels, level)
        self.level_mask.zero_()
        self.level_mask[: self.current_level] = 1.0


class FrequencyEncoding(nn.Module):
    """NeRF positional encoding (Mildenhall et al., ECCV 2020): sin/cos of 2^k * pi * x.

    With ``n_masking_step > 0`` frequencies are eased in over that many steps (a BARF-style
    coarse-to-fine window), which the progressive-band recipes use.
    """

    def __init__(self, n_input_dims: int, n_frequencies: int = 6, n_masking_step: int = 0,
                 include_input: bool = False) -> None:
        super().__init__()
        self.n_input_dims = n_input_dims
        self.n_frequencies = n_frequencies
        self.n_masking_step = n_masking_step
        self.include_input = include_input
        self.n_output_dims = n_input_dims * n_frequencies * 2 + (n_input_dims if include_input else 0)
        self.register_buffer("freqs", (2.0 ** torch.arange(n_frequencies)) * math.pi, persistent=False)
        self.register_buffer("band_mask", torch.ones(n_frequencies), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.unsqueeze(-2) * self.freqs.unsqueeze(-1)  # [..., K, D]
        enc = torch.stack([torch.sin(xf), torch.cos(xf)], dim=-2) * self.band_mask[:, None, None]  # [..., K, 2, D]
        enc = enc.flatten(-3)
        return torch.cat([x, enc], dim=-1) if self.include_input else enc

    def update_step(self, epoch: int, global_step: int, on_load_weights: bool = False) -> None:
        if self.n_masking_step <= 0:
            return
        alpha = global_step / self.n_masking_step * self.n_frequencies
        k = torch.arange(self.n_frequencies, dtype=self.band_mask.dtype, device=self.band_mask.device)
        self.band_mask.copy_((1.0 - torch.cos(math.pi * (alpha - k).clamp(0.0, 1.0))) / 2.0)


def _check_keys(config: dict, allowed: set[str], what: str) -> None:
    extra = sorted(set(config) - allowed)
    if extra:
        raise ValueError(f"unknown {what} encoding key(s) {extra}; valid keys: {sorted(allowed)}")


def get_encoding(n_input_dims: int, config: dict, implementation: str = "auto") -> nn.Module:
    """Build an encoding from a threestudio / tiny-cuda-nn style dict.

    ``otype``: ``HashGrid`` | ``ProgressiveBandHashGrid`` | ``Frequency`` |
    ``ProgressiveBandFrequency``. ``implementation``: ``"torch"``, ``"tcnn"`` (error if
    tiny-cuda-nn or CUDA is missing) or ``"auto"`` (tcnn when usable). Every returned module has
    ``n_output_dims`` and an ``update_step(epoch, global_step)`` method.
    """
    config = dict(config)
    otype = config.get("otype", "HashGrid")
    if implementation not in ("auto", "torch", "tcnn"):
        raise ValueError(f"implementation must be 'auto', 'torch' or 'tcnn', got {implementation!r}")
    if otype in ("HashGrid", "ProgressiveBandHashGrid"):
        _check_keys(config, HASHGRID_KEYS, otype)
        if config.get("interpolation", "Linear") != "Linear":
            raise ValueError("only 'Linear' hash-grid interpolation is implemented")
        from lift3d.backends import tcnn_backend

        use_tcnn = implementation == "tcnn" or (implementation == "auto" and tcnn_backend.available())
        if use_tcnn:
            return tcnn_backend.make_encoding(n_input_dims, config)
        kw = {k: config[k] for k in ("n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution",
                                      "per_level_scale", "chunk_size") if k in config}
        if otype == "ProgressiveBandHashGrid":
            kw.update(start_level=config.get("start_level", 1), start_step=config.get("start_step", 0),
                      update_steps=config.get("update_steps", 1))
        return HashGridEncoding(n_input_dims, **kw)
    if otype in ("Frequency", "ProgressiveBandFrequency"):
        _check_keys(config, FREQUENCY_KEYS, otype)
        return FrequencyEncoding(
            n_input_dims,
            n_frequencies=config.get("n_frequencies", 6),
            n_masking_step=config.get("n_masking_step", 0) if otype == "ProgressiveBandFrequency" else 0,
            include_input=config.get("include_input", False),
        )
    raise ValueError(
        f"unknown encoding otype {otype!r}; valid: HashGrid, ProgressiveBandHashGrid, Frequency, ProgressiveBandFrequency"
    )


__all__ = ["HashGridEncoding", "FrequencyEncoding", "get_encoding"]
