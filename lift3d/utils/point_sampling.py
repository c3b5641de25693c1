"""Farthest-point sampling in plain torch: well-spread subsets of a point cloud.

Farthest-point sampling (the greedy k-centre heuristic; Eldar et al. 1997, used by PointNet++ and
by GSGEN to pick the 1024 Gaussian centres Point-E scores) starts from one point and repeatedly
adds the point farthest from everything chosen so far. Keeping, for every point, its squared
distance to the nearest chosen point and lowering it after each pick makes the whole run
O(N k) time and O(N) memory per cloud; clouds of a batch are sampled together, one vectorised
step per pick, so the loop has ``k`` iterations whatever the batch size.

Ties (equal distances) go to the lowest index, as ``torch.argmax`` resolves them.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["farthest_point_sample"]


def farthest_point_sample(
    points: Union[Float[Tensor, "B N 3"], Float[Tensor, "N 3"]],
    k: int,
    start_idx: Union[None, int, Int[Tensor, " B"]] = None,
    generator: Optional[torch.Generator] = None,
) -> Union[Int[Tensor, "B k"], Int[Tensor, " k"]]:
    """Indices of ``k`` farthest-point samples of each cloud.

    Args:
        points: [B, N, 3] clouds (or one [N, 3] cloud); any float dtype, any device. Only the
            coordinates are read (no gradient flows through indices).
        k: how many points to pick, 1 <= k <= N. Every pick is a distinct point.
        start_idx: the first pick of each cloud: an int (all clouds) or a [B] tensor. None draws it
            uniformly at random from ``generator`` (on the generator's device; the global generator
            when None).
        generator: the random source for a drawn start.

    Returns:
        [B, k] int64 indices into dimension N ([k] for an unbatched cloud), in pick order: the start
        first, then each point farthest (Euclidean) from the ones before it.
    """
    unbatched = points.dim() == 2
    if unbatched:
        points = points[None]
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample: points must be [B, N, 3] or [N, 3], got {tuple(points.shape)}")
    B, N, _ = points.shape
    if not 1 <= k <= N:
        raise ValueError(f"farthest_point_sample: k must be in [1, N={N}], got {k}")
    dev = points.device
    if start_idx is None:
        gdev = generator.device if generator is not None else torch.device("cpu")
        start = torch.randint(N, (B,), generator=generator, device=gdev).to(dev)
    else:
        start = torch.as_tensor(start_idx, dtype=torch.long, device=dev).reshape(-1).expand(B).clone()
        if bool(((start < 0) | (start >= N)).any()):
            raise ValueError(f"farthest_point_sample: start_idx {start.tolist()} out of range for N={N}")
    pts = points.detach()
    rows = torch.arange(B, device=dev)
    idx = torch.empty(B, k, dtype=torch.long, device=dev)
    idx[:, 0] = start
    # Squared distance of every point to its nearest pick so far. Picks are marked -1, below any
    # distance, so they are never picked again, even where duplicated points leave only zeros.
    min_d = torch.full((B, N), float("inf"), dtype=pts.dtype, device=dev)
    last = start
    for i in range(1, k):
        d = (pts - pts[rows, last][:, None, :]).square().sum(-1)  # [B, N]
        min_d = torch.minimum(min_d, d)
        min_d[rows, last] = -1.0
        last = min_d.argmax(dim=1)
        idx[:, i] = last
    return idx[0] if unbatched else idx
