"""Farthest-point sampling against a brute-force reference."""

from __future__ import annotations

import pytest
import torch

from lift3d.utils.point_sampling import farthest_point_sample


def brute_force_fps(points: torch.Tensor, k: int, start: int) -> list[int]:
    """The definition, in float64: each pick maximises the distance to the nearest earlier pick
    (all pairwise distances recomputed every time; ties to the lowest index)."""
    p = points.double()
    picked = [start]
    for _ in range(1, k):
        d = torch.cdist(p, p[picked]).min(dim=1).values  # [N]
        d[picked] = -1.0
        picked.append(int(torch.argmax(d)))
    return picked


@pytest.mark.parametrize("n,k", [(50, 1), (50, 17), (64, 64), (300, 40)])
def test_matches_the_brute_force_reference_per_cloud_of_a_batch(n, k):
    g = torch.Generator().manual_seed(n + k)
    pts = torch.randn(3, n, 3, generator=g, dtype=torch.float64)
    start = torch.tensor([0, n // 2, n - 1])
    idx = farthest_point_sample(pts, k, start_idx=start)
    assert idx.shape == (3, k) and idx.dtype == torch.long
    for b in range(3):
        assert idx[b].tolist() == brute_force_fps(pts[b], k, int(start[b]))


def test_a_single_cloud_gives_a_single_row_and_float32_agrees():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(200, 3, generator=g)
    idx = farthest_point_sample(pts, 30, start_idx=5)
    assert idx.shape == (30,)
    assert idx.tolist() == brute_force_fps(pts, 30, 5)


def test_picks_are_distinct_and_spread():
    """All k picks differ, even with duplicated points, and the picked set covers the cloud better
    than random subsets of the same size (its covering radius is smaller)."""
    g = torch.Generator().manual_seed(2)
    base = torch.rand(100, 3, generator=g)
    pts = torch.cat([base, base, base])  # every point three times
    idx = farthest_point_sample(pts, 250, start_idx=0)
    assert len(set(idx.tolist())) == 250
    cloud = torch.rand(2000, 3, generator=g)
    fps = farthest_point_sample(cloud, 64, start_idx=0)
    radius = lambda sel: torch.cdist(cloud, cloud[sel]).min(1).values.max()  # noqa: E731
    rand = [radius(torch.randperm(2000, generator=g)[:64]) for _ in range(5)]
    assert radius(fps) < min(rand)


def test_random_start_follows_the_generator():
    pts = torch.rand(2, 80, 3, generator=torch.Generator().manual_seed(3))
    a = farthest_point_sample(pts, 10, generator=torch.Generator().manual_seed(9))
    b = farthest_point_sample(pts, 10, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    starts = {tuple(farthest_point_sample(pts, 1, generator=torch.Generator().manual_seed(s))[:, 0].tolist())
              for s in range(6)}
    assert len(starts) > 1
    for b_ in range(2):
        assert a[b_].tolist() == brute_force_fps(pts[b_], 10, int(a[b_, 0]))


def test_gradients_do_not_flow_through_and_bad_arguments_are_named():
    pts = torch.rand(40, 3, requires_grad=True)
    idx = farthest_point_sample(pts, 8, start_idx=0)
    assert not idx.requires_grad
    with pytest.raises(ValueError, match="k must be in"):
        farthest_point_sample(pts, 41)
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        farthest_point_sample(torch.rand(4, 40, 2), 3)
    with pytest.raises(ValueError, match="start_idx"):
        farthest_point_sample(pts, 3, start_idx=40)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    pts = torch.rand(4, 5000, 3, generator=torch.Generator().manual_seed(4))
    start = torch.tensor([0, 1, 2, 3])
    assert torch.equal(farthest_point_sample(pts.cuda(), 256, start_idx=start.cuda()).cpu(),
                       farthest_point_sample(pts, 256, start_idx=start))
