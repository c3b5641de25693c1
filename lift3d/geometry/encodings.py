"""Input encodings for implicit fields: the multiresolution hash grid and frequency encodings.

The hash grid is the encoding of InstantNGP (Mueller et al., "Instant Neural Graphics Primitives
with a Multiresolution Hash Encoding", SIGGRAPH 2022): ``L`` grids of growing resolution, each
storing ``F`` trainable features per vertex (dense where the grid fits the table, spatially hashed
where it does not), trilinearly interpolated and concatenated over levels. The progressive-band
variant (Magic3D / threestudio recipes) unmasks finer levels as training goes on.

The torch implementation here is the reference and is written for speed on CPU, where eager
kernels are memory-bound and each Python-level op costs a few microseconds:

* every level and all 8 cell corners are handled in one pass (no Python loop over levels); the
  per-level constants (scale, hash multipliers, masks, table offsets) are precomputed buffers;
* the table is laid out so that one integer formula covers dense and hashed levels: dense levels
  use power-of-two strides (so ``x + y*R + z*R^2`` equals ``x ^ y*R ^ z*R^2``) and every level's
  block starts at a multiple of its own power-of-two size, which lets the level offset be OR-ed in;
* points are laid out along the last axis (``[3, n]``, ``[L, 2, 2, 2, n]``) so every broadcast
  has a long contiguous inner loop, and at most one operand is broadcast along it (two make
  TensorIterator fall back to its scalar loop); index arithmetic is int32 where the op allows it
  (products wrap modulo 2^32, which leaves the masked low bits of the hash unchanged);
* the table is stored ``[F, M]`` (checkpoint layout); on CPU, pairs of feature channels are
  packed into one complex row (``complex(f0, f1)``) for the lookup, so a single 1D
  ``index_select`` fetches both features of a corner and a single ``scatter_add_`` accumulates
  both gradients (complex addition is two independent real additions); this halves the random
  accesses, the largest single cost (``scatter_add_`` with int64 rows, which beat ``index_add_``
  on CPU). Odd ``F``, low-precision tables and non-CPU devices use one real row per
  channel;
* interpolation is three ``lerp`` passes (z, then y, then x) on the gathered corners, viewed as
  real numbers with the two packed features interleaved (``[L, ..., 2n]``), instead of forming
  the 8 trilinear weights; backward builds the 8 corner contributions the same way, one axis at a
  time (``g*f`` and ``g - g*f``);
* the default (parameter-gradient) path is a custom autograd Function that walks the points in
  cache-sized chunks through work buffers reused from chunk to chunk (so they stay in cache),
  and every view into them built once per chunk length (a slice costs microseconds, and the loop
  would take dozens per chunk); forward keeps each chunk's int32 corner rows and fractional
  positions for backward while under a memory budget (backward recomputes them beyond it);
  without gradients the same chunked lookup runs with no autograd bookkeeping;
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


def _lanes(table: Tensor) -> tuple[Tensor, int]:
    """Lookup rows of a [F, M] table: ([P, M] complex rows packing channel pairs, 2) or ([F, M], 1).

    Packing is a CPU memory-traffic optimisation; elsewhere (a CUDA fallback when tiny-cuda-nn
    is missing) the plain real rows are used.
    """
    F = table.shape[0]
    if F % 2 == 0 and table.dtype in (torch.float32, torch.float64) and table.device.type == "cpu":
        t = table.view(F // 2, 2, -1)
        return torch.complex(t[:, 0], t[:, 1]), 2
    return table, 1


class _Views:
    """Attribute bag: views into a ``_Buffers`` for one chunk length (built by ``_Buffers.views``)."""


class _Buffers:
    """Work buffers for chunks of up to ``cs`` points, reused from chunk to chunk (so they stay in
    cache), and views into them built once per chunk length (the full one and the tail): slicing
    costs microseconds per call, which the chunk loop would otherwise repeat dozens of times per
    chunk. ``backward`` selects the buffers of the gradient pass instead of those of the lookup."""

    def __init__(self, grid: "HashGridEncoding", cs: int, n_lanes: int, width: int, dtype: torch.dtype,
                 lane_dtype: torch.dtype, index_dtype: torch.dtype, device: torch.device, backward: bool) -> None:
        L, P, w = grid.n_levels, n_lanes, width
        self.L, self.P, self.width, self.backward = L, P, w, backward
        sizes = {"pos": (L * 3 * cs, dtype), "H": (L * 6 * cs, index_dtype), "xy": (L * 4 * cs, index_dtype),
                 "idx": (L * 8 * cs, index_dtype)}
        if w == 2:
            sizes["frac2"] = (L * 3 * cs, lane_dtype)
        if backward:
            sizes.update(g=(L * P * cs, lane_dtype), c1=(L * 2 * w * cs, dtype), c2=(L * 4 * w * cs, dtype),
                         c3=(L * 8 * w * cs, dtype))
        else:
            sizes.update(corners=(L * 8 * cs, lane_dtype), a=(L * 4 * w * cs, dtype), b=(L * 2 * w * cs, dtype),
                         rows=(L * P * cs, lane_dtype))
        self.bufs = {k: torch.empty(numel, dtype=dt, device=device) for k, (numel, dt) in sizes.items()}
        self._views: dict[int, _Views] = {}

    def _take(self, name: str, *shape: int) -> Tensor:
        return self.bufs[name][: math.prod(shape)].view(shape)

    def views(self, n: int) -> _Views:
        v = self._views.get(n)
        if v is not None:
            return v
        L, P, w = self.L, self.P, self.width
        wn = w * n
        v = self._views[n] = _Views()
        v.pos = self._take("pos", L, 3, n)
        v.H = H = self._take("H", L, 3, 2, n)  # per axis: hashed cell, hashed cell + 1
        v.h0, v.h1, v.hx = H[:, :, 0], H[:, :, 1], H[:, 0]
        v.xy = self._take("xy", L, 2, 2, n)
        v.xy_args = (H[:, 0, :, None], H[:, 1, None, :])
        v.idx_args = (v.xy[:, :, :, None], H[:, 2, None, None, :])
        v.idx = self._take("idx", L, 2, 2, 2, n)
        v.flat = v.idx.view(-1)
        if w == 2:
            v.frac2 = self._take("frac2", L, 3, n)
            f = torch.view_as_real(v.frac2).view(L, 3, wn)  # each fraction twice, interleaved
        else:
            f = v.pos
        v.fx, v.fy, v.fz = f[:, 0], f[:, None, 1], f[:, None, None, 2]
        if self.backward:
            v.g = self._take("g", L, P, n)
            v.g_rows = v.g.view(L * P, n)
            g_r = torch.view_as_real(v.g) if w == 2 else v.g.unsqueeze(-1)  # [L, P, n, w]
            v.g_lanes = [g_r[:, p].view(L, wn) for p in range(P)]
            # Corner contributions, one axis at a time: c1 [L, x, wn], c2 [L, x, y, wn], c3 [L, x, y, z, wn].
            v.c1, v.c2 = self._take("c1", L, 2, wn), self._take("c2", L, 2, 2, wn)
            v.c3 = self._take("c3", L, 2, 2, 2, wn)
            v.c1_, v.c2_ = (v.c1[:, 0], v.c1[:, 1]), (v.c2[:, :, 0], v.c2[:, :, 1])
            v.c3_ = (v.c3[:, :, :, 0], v.c3[:, :, :, 1])
            v.src = torch.view_as_complex(v.c3.view(-1, 2)) if w == 2 else v.c3.view(-1)
        else:
            v.corners = self._take("corners", L * 8 * n)
            c = (torch.view_as_real(v.corners) if w == 2 else v.corners).view(L, 2, 2, 2, wn)
            v.v_ = (c[:, :, :, 0], c[:, :, :, 1])
            v.a = self._take("a", L, 2, 2, wn)
            v.a_ = (v.a[:, :, 0], v.a[:, :, 1])
            v.b = self._take("b", L, 2, wn)
            v.b_ = (v.b[:, 0], v.b[:, 1])
            rows = self._take("rows", L, P, n)  # this chunk's result, level-major
            r = torch.view_as_real(rows) if w == 2 else rows.unsqueeze(-1)  # [L, P, n, w]
            v.rows_lanes = [r[:, p].view(L, wn) for p in range(P)]
            v.rows_t = rows.view(L * P, n).t()
        return v


def _positions(v: _Views, x_chunk: Tensor, scales: Tensor) -> Tensor:
    """Grid positions ``x * scale + 0.5`` [L, 3, n] of x_chunk [1, 3, n], into the work buffer."""
    # One broadcast operand per op (addcmul with two takes TensorIterator's scalar loop).
    return torch.mul(x_chunk, scales, out=v.pos).add_(0.5)


def _chunk_rows(v: _Views, x_chunk: Tensor, grid: "HashGridEncoding", consts: tuple[Tensor, Tensor, Tensor],
                rows_out: Tensor | None = None) -> Tensor:
    """Flat table rows [L * 8 * n] of the cell corners (order [L, x, y, z, n]) of x_chunk [1, 3, n].

    Leaves the positions in ``v.pos``. Rows go to ``rows_out`` ([L, 2, 2, 2, n]) when given.
    """
    mults, masks, offsets = consts
    pos = _positions(v, x_chunk, grid.scales)
    v.h0.copy_(pos)  # float -> int truncates, which is floor for the positive positions
    v.h0.mul_(mults)
    # (c + 1) * m == c * m + m; masking once afterwards is the same (masks are 2^k - 1).
    torch.add(v.h0, mults, out=v.h1)
    v.H.bitwise_and_(masks)
    v.hx.bitwise_or_(offsets)
    torch.bitwise_xor(*v.xy_args, out=v.xy)
    if rows_out is None:
        torch.bitwise_xor(*v.idx_args, out=v.idx)
        return v.flat
    return torch.bitwise_xor(*v.idx_args, out=rows_out).view(-1)


def _pack_fractions(v: _Views, frac: Tensor, width: int) -> None:
    """Put fractions [L, 3, n] where the lerp-weight views read them: ``frac2`` (each value twice,
    interleaved) for packed lanes, ``pos`` otherwise."""
    if width == 2:
        torch.complex(frac, frac, out=v.frac2)
    elif frac is not v.pos:
        v.pos.copy_(frac)


def _lookup(xT: Tensor, lanes: Tensor, width: int, grid: "HashGridEncoding", saved: list | None) -> Tensor:
    """Interpolated features [N, L * P] (lane dtype) of points xT [3, N], from lanes [P, M].

    With ``saved`` a list, each chunk's int32 rows and fractions go to fresh tensors appended to
    it for backward.
    """
    N = xT.shape[1]
    L, P = grid.n_levels, lanes.shape[0]
    cs = grid._chunk_points(N)
    dev, dtype = lanes.device, xT.dtype
    bufs = _Buffers(grid, cs, P, width, dtype, lanes.dtype, grid.mults.dtype, dev, backward=False)
    consts = (grid.mults, grid.masks, grid.offsets)
    out = torch.empty(N, L * P, dtype=lanes.dtype, device=dev)
    lane_rows = lanes.unbind(0)
    for x_chunk, out_chunk in zip(xT.unsqueeze(0).split(cs, dim=2), out.split(cs)):
        n = x_chunk.shape[2]
        v = bufs.views(n)
        if saved is None:
            flat = _chunk_rows(v, x_chunk, grid, consts)
            _pack_fractions(v, v.pos.frac_(), width)  # positions are > 0: frac == pos - floor(pos)
        else:
            flat = _chunk_rows(v, x_chunk, grid, consts, torch.empty(L, 2, 2, 2, n, dtype=grid.mults.dtype, device=dev))
            frac = torch.frac(v.pos, out=torch.empty(L, 3, n, dtype=dtype, device=dev))
            saved.append((flat, frac))
            _pack_fractions(v, frac, width)
        for lane, rows in zip(lane_rows, v.rows_lanes):
            torch.index_select(lane, 0, flat, out=v.corners)
            torch.lerp(*v.v_, v.fz, out=v.a)  # along z
            torch.lerp(*v.a_, v.fy, out=v.b)  # along y
            torch.lerp(*v.b_, v.fx, out=rows)  # along x
        out_chunk.copy_(v.rows_t)
    return out


def _as_features(out: Tensor, width: int) -> Tensor:
    """Lane-dtype [N, L * P] -> real [N, L * F]."""
    return torch.view_as_real(out).flatten(-2) if width == 2 else out


class _HashGridFunction(torch.autograd.Function):
    """Hash-grid lookup with gradients for the table only, walked in cache-sized chunks.

    Corner rows (int32) and fractions of each chunk are kept for backward while they fit in
    ``SAVE_BUDGET_BYTES``; beyond that backward recomputes them (slower, constant memory).
    """

    SAVE_BUDGET_BYTES = 512 * 2**20

    @staticmethod
    def forward(ctx: Any, xT: Tensor, table: Tensor, grid: "HashGridEncoding") -> Tensor:  # type: ignore[override]
        # xT: [3, N] in [0, 1] (points along the fast axis); table: [F, M]
        N, L = xT.shape[1], grid.n_levels
        lanes, width = _lanes(table)
        per_point = L * (8 * grid.mults.element_size() + 3 * xT.element_size())
        saved: list | None = [] if N * per_point <= _HashGridFunction.SAVE_BUDGET_BYTES else None
        out = _lookup(xT, lanes, width, grid, saved)
        ctx.grid = grid
        ctx.table_shape = table.shape
        ctx.lane_info = (lanes.shape[0], width, lanes.dtype)
        ctx.saved_corners = saved
        ctx.save_for_backward(xT)
        return _as_features(out, width)  # [N, L * F]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        (xT,) = ctx.saved_tensors
        grid: HashGridEncoding = ctx.grid
        P, width, lane_dtype = ctx.lane_info
        L, N = grid.n_levels, xT.shape[1]
        dev, dtype = grad_out.device, grad_out.dtype
        grad_out = grad_out.contiguous()  # [N, L * F]
        go = torch.view_as_complex(grad_out.view(N, L * P, 2)) if width == 2 else grad_out  # [N, L * P]
        grad_rows = torch.zeros(P, ctx.table_shape[1], dtype=lane_dtype, device=dev)
        grad_lanes = grad_rows.unbind(0)
        cs = grid._chunk_points(N)  # the forward's chunks: saved[k] is chunk k
        # scatter_add_ takes int64 rows only.
        bufs = _Buffers(grid, cs, P, width, dtype, lane_dtype, torch.int64, dev, backward=True)
        consts = (grid.mults64, grid.masks64, grid.offsets64)
        saved = ctx.saved_corners
        chunks = zip(xT.unsqueeze(0).split(cs, dim=2), go.t().split(cs, dim=1))
        for k, (x_chunk, go_chunk) in enumerate(chunks):
            v = bufs.views(x_chunk.shape[2])
            if saved is not None:
                rows32, frac = saved[k]
                flat = v.flat
                flat.copy_(rows32)
                _pack_fractions(v, frac, width)
            else:
                flat = _chunk_rows(v, x_chunk, grid, consts)
                _pack_fractions(v, v.pos.frac_(), width)
            v.g_rows.copy_(go_chunk)  # [L * P, n], transposed into level-major order
            for g, grad_lane in zip(v.g_lanes, grad_lanes):
                # Corner contributions g * w, one axis at a time: (g - g*f, g*f) along x, then y, then z.
                torch.mul(g, v.fx, out=v.c1_[1])
                torch.sub(g, v.c1_[1], out=v.c1_[0])
                torch.mul(v.c1, v.fy, out=v.c2_[1])
                torch.sub(v.c1, v.c2_[1], out=v.c2_[0])
                torch.mul(v.c2, v.fz, out=v.c3_[1])
                torch.sub(v.c2, v.c3_[1], out=v.c3_[0])
                grad_lane.scatter_add_(0, flat, v.src)
        ctx.saved_corners = None
        if width == 1:
            return None, grad_rows, None
        grad_table = torch.empty(ctx.table_shape, dtype=dtype, device=dev)
        for p in range(P):
            grad_table[2 * p].copy_(grad_rows[p].real)
            grad_table[2 * p + 1].copy_(grad_rows[p].imag)
        return None, grad_table, None


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding of points in [0, 1]^3 -> [..., n_levels * n_features_per_level].

    Level ``l`` has scale ``base_resolution * per_level_scale**l - 1`` (cells across the unit
    cube); positions are ``x * scale + 0.5`` so level grids are offset from each other. A level
    whose (power-of-two padded) vertex grid fits in ``2**log2_hashmap_size`` entries is stored
    densely, finer ones are hashed into that many entries.

    The torch path walks points in chunks of ``CHUNK_LEVEL_POINTS // n_levels`` points per torch
    thread, at most ``chunk_size``.
    """

    # Points x levels per chunk and thread: sized so each thread's share of a chunk's work buffers
    # stays in a core's L2 cache (bench/README.md has the sweeps that chose both).
    CHUNK_LEVEL_POINTS = 16384
    CHUNK_PER_THREAD = True

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

        # Per-level constants shaped to broadcast against [L, 3, n] / [L, 3, 2, n] / [L, 2, n].
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32).view(n_levels, 1, 1), persistent=False)
        idt = torch.int32 if acc < 2**31 else torch.int64
        # int32 products wrap modulo 2^32, which leaves the masked low bits of the hash unchanged.
        mults32 = [[m - (1 << 32) if m >= (1 << 31) else m for m in row] for row in mults]
        self.register_buffer("mults", torch.tensor(mults32 if idt == torch.int32 else mults, dtype=idt).view(n_levels, 3, 1), persistent=False)
        self.register_buffer("masks", torch.tensor(masks, dtype=idt).view(n_levels, 1, 1, 1), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=idt).view(n_levels, 1, 1), persistent=False)
        # int64 twins for the backward scatter (scatter_add_ takes int64 indices only).
        self.register_buffer("mults64", torch.tensor(mults, dtype=torch.int64).view(n_levels, 3, 1), persistent=False)
        self.register_buffer("masks64", self.masks.long(), persistent=False)
        self.register_buffer("offsets64", self.offsets.long(), persistent=False)
        self.register_buffer("level_mask", torch.ones(n_levels), persistent=False)
        # [F, M]: one contiguous row per feature channel (the checkpoint layout).
        self.embeddings = nn.Parameter(torch.empty(n_features_per_level, acc).uniform_(-init_scale, init_scale))
        self.update_step(0, 0)

    # ------------------------------------------------------------------------------------------
    def _chunk_points(self, n_points: int) -> int:
        budget = self.CHUNK_LEVEL_POINTS * (torch.get_num_threads() if self.CHUNK_PER_THREAD else 1)
        return max(1, min(self.chunk_size, budget // self.n_levels, n_points))

    def _corners(self, xT: Tensor) -> tuple[Tensor, Tensor]:
        """Table columns and trilinear weights of the 8 cell corners per level: ([L, 8, n], [L, 8, n]).

        Differentiable in ``xT`` [3, n] (the weights); the same positions, cells and rows as the
        chunked path.
        """
        n = xT.shape[1]
        L = self.n_levels
        pos = xT.unsqueeze(0) * self.scales + 0.5  # [L, 3, n]
        cell = pos.floor()
        frac = pos - cell
        h0 = cell.to(self.mults.dtype) * self.mults  # [L, 3, n]
        H = torch.stack([h0, h0 + self.mults], dim=2) & self.masks  # [L, 3, 2, n]
        H[:, 0] |= self.offsets
        idx = (H[:, 0, :, None, None] ^ H[:, 1, None, :, None]) ^ H[:, 2, None, None, :]  # [L, 2, 2, 2, n]
        W = torch.stack([1.0 - frac, frac], dim=2)  # [L, 3, 2, n]
        w = (W[:, 0, :, None, None] * W[:, 1, None, :, None]) * W[:, 2, None, None, :]
        return idx.view(L, 8, n), w.view(L, 8, n)

    def _forward_autograd(self, xT: Tensor) -> Tensor:
        """Plain differentiable version (gradients for points too, any order): [N, L * F]."""
        idx, w = self._corners(xT)
        vals = self.embeddings[:, idx]  # [F, L, 8, N]
        return (vals * w).sum(2).permute(2, 1, 0).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., 3] in [0, 1] -> [..., n_levels * n_features_per_level] (level-major)."""
        shape = x.shape[:-1]
        x = x.reshape(-1, 3)
        if x.dtype != self.embeddings.dtype:
            x = x.to(self.embeddings.dtype)
        xT = x.t().clamp(0.0, 1.0)  # [3, N]
        if not torch.is_grad_enabled() or not self.embeddings.requires_grad and not x.requires_grad:
            lanes, width = _lanes(self.embeddings.detach())
            out = _as_features(_lookup(xT.contiguous(), lanes, width, self, None), width)
        elif x.requires_grad:
            out = self._forward_autograd(xT)
        else:
            out = _HashGridFunction.apply(xT.contiguous(), self.embeddings, self)
        out = out.reshape(*shape, self.n_output_dims)  # [N, L*F] -> [..., L*F]
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


def get_encoding(n_input_dims: int, config: dict, backend: str = "auto") -> nn.Module:
    """Build an encoding from a threestudio / tiny-cuda-nn style dict.

    ``otype``: ``HashGrid`` | ``ProgressiveBandHashGrid`` | ``Frequency`` |
    ``ProgressiveBandFrequency``. ``backend``: ``"torch"``, ``"tcnn"`` (error if tiny-cuda-nn or
    CUDA is missing) or ``"auto"`` (tcnn when usable; frequency encodings are always torch). Every returned module has
    ``n_output_dims`` and an ``update_step(epoch, global_step)`` method.
    """
    config = dict(config)
    otype = config.get("otype", "HashGrid")
    if backend not in ("auto", "torch", "tcnn"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'tcnn', got {backend!r}")
    if otype in ("HashGrid", "ProgressiveBandHashGrid"):
        _check_keys(config, HASHGRID_KEYS, otype)
        if config.get("interpolation", "Linear") != "Linear":
            raise ValueError("only 'Linear' hash-grid interpolation is implemented")
        from lift3d.backends import tcnn_backend

        use_tcnn = backend == "tcnn" or (backend == "auto" and tcnn_backend.available())
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
