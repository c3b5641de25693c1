"""View groups in random-camera-datamodule (MVDream-style n_views), and the n_views == 1 contract.

The n_views == 1 batches must stay bit-identical to those drawn before view groups existed: exact
resume and the published benchmark scores depend on it. ``_frozen_sample_cameras`` is the sampler
as it was, kept here verbatim as the reference.
"""

from __future__ import annotations

import pytest
import torch

from lift3d.config import C, ConfigError
from lift3d.data.random_cameras import (
    RandomCameraConfig,
    RandomCameraDataModule,
    _uniform,
    sample_cameras,
    sample_light_positions,
)
from lift3d.utils.cameras import make_cameras


def _frozen_sample_cameras(cfg: RandomCameraConfig, step: int, seed: int, rank: int = 0) -> dict:
    """The training sampler before view groups were added (do not edit: it is the reference)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    B = cfg.batch_size
    elevation = _uniform(cfg.elevation_range, B, g)
    if cfg.batch_uniform_azimuth:
        lo, hi = cfg.azimuth_range
        azimuth = lo + (hi - lo) * (torch.arange(B) + torch.rand(B, generator=g)) / B
    else:
        azimuth = _uniform(cfg.azimuth_range, B, g)
    distance = _uniform(cfg.camera_distance_range, B, g)
    fovy = _uniform(cfg.fovy_range, B, g)
    h, w = int(C(cfg.height, step)), int(C(cfg.width, step))
    cams = make_cameras(elevation, azimuth, distance, fovy, h, w)
    cams["light_positions"] = sample_light_positions(cfg, cams, g)
    return cams


def _assert_same(ref: dict, new: dict) -> None:
    assert set(new) == set(ref) | {"n_views"}
    assert new["n_views"] == 1
    for k, v in ref.items():
        if torch.is_tensor(v):
            assert new[k].dtype == v.dtype and new[k].shape == v.shape, k
            assert torch.equal(new[k], v), k
        else:
            assert new[k] == v, k


@pytest.mark.parametrize(
    "over",
    [
        {},
        {"batch_size": 4, "height": 8, "width": 6},
        {"batch_size": 3, "batch_uniform_azimuth": False, "fovy_range": [30.0, 50.0], "height": 4, "width": 4},
        {"batch_size": 2, "light_sample_strategy": "upper-hemisphere", "azimuth_range": [-90.0, 270.0]},
        {"batch_size": 2, "light_sample_strategy": "camera", "height": [0, 4, 12, 10], "width": 4},
    ],
)
def test_single_view_batches_are_bit_identical_to_the_frozen_sampler(over):
    dm = RandomCameraDataModule(over, seed=7)
    for seed, step, rank in [(7, 0, 0), (7, 5, 0), (7, 11, 1), (123, 3, 2)]:
        cfg = dm.cfg_at(step)
        _assert_same(_frozen_sample_cameras(cfg, step, seed, rank), sample_cameras(cfg, step, seed, rank))


def test_datamodule_stream_keeps_the_frozen_batches():
    dm = RandomCameraDataModule({"batch_size": 2, "height": 4, "width": 4}, seed=3)
    it = iter(dm.train_dataloader())
    for step in range(3):
        _assert_same(_frozen_sample_cameras(dm.cfg, step, 3), next(it))


def _groups(batch: dict, n: int) -> list[dict]:
    B = batch["c2w"].shape[0]
    return [{k: batch[k][i : i + n] for k in ("elevation", "azimuth", "camera_distances", "fovy")}
            for i in range(0, B, n)]


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("uniform", [True, False])
def test_groups_share_elevation_distance_fov_and_spread_azimuth(n, uniform):
    cfg = RandomCameraConfig(batch_size=3 * n, n_views=n, height=4, width=4, fovy_range=(30.0, 50.0),
                             batch_uniform_azimuth=uniform)
    for step in range(4):
        batch = sample_cameras(cfg, step, seed=1)
        assert batch["n_views"] == n
        assert batch["c2w"].shape == (3 * n, 4, 4) and batch["rays_o"].shape == (3 * n, 4, 4, 3)
        groups = _groups(batch, n)
        for g in groups:
            for k in ("elevation", "camera_distances", "fovy"):
                assert torch.equal(g[k], g[k][:1].expand(n)), k
            az = g["azimuth"]
            assert ((az >= -180.0) & (az < 180.0)).all()
            offset = torch.remainder(az - az[0], 360.0)
            # Values near 360 are offsets of 0 that wrapped the other way.
            offset = torch.where(offset > 360.0 - 1e-3, offset - 360.0, offset)
            assert torch.allclose(offset, torch.arange(n) * (360.0 / n), atol=1e-4)
        # Different groups are different draws.
        for a, b in zip(groups, groups[1:]):
            assert a["elevation"][0] != b["elevation"][0]
            assert a["camera_distances"][0] != b["camera_distances"][0]
            assert a["azimuth"][0] != b["azimuth"][0]


def test_group_cameras_sit_where_their_angles_say():
    cfg = RandomCameraConfig(batch_size=4, n_views=4, height=2, width=2)
    b = sample_cameras(cfg, 9, seed=0)
    e, a = torch.deg2rad(b["elevation"]), torch.deg2rad(b["azimuth"])
    pos = b["camera_distances"][:, None] * torch.stack([e.cos() * a.cos(), e.cos() * a.sin(), e.sin()], -1)
    assert torch.allclose(b["camera_positions"], pos, atol=1e-5)
    # Four views 90 degrees apart: consecutive horizontal directions are perpendicular.
    horiz = torch.nn.functional.normalize(pos[:, :2], dim=-1)
    assert torch.allclose((horiz[:-1] * horiz[1:]).sum(-1), torch.zeros(3), atol=1e-5)


def test_uniform_azimuth_stratifies_group_bases():
    n, G = 4, 8
    cfg = RandomCameraConfig(batch_size=n * G, n_views=n, height=2, width=2, azimuth_range=(-180.0, 180.0))
    for step in range(5):
        base = sample_cameras(cfg, step, seed=2)["azimuth"][::n]
        # Group g's base lies in the g-th of G equal slices of the range.
        slice_idx = torch.floor((base + 180.0) / (360.0 / G))
        assert torch.equal(slice_idx, torch.arange(G, dtype=slice_idx.dtype))


def test_group_batches_are_deterministic_per_step():
    dm = RandomCameraDataModule({"batch_size": 8, "n_views": 4, "height": 4, "width": 4}, seed=5)
    a = [next(iter(dm.train_dataloader())) for _ in range(2)]
    assert all(torch.equal(a[0][k], a[1][k]) for k in a[0] if torch.is_tensor(a[0][k]))
    s0, s1 = sample_cameras(dm.cfg, 0, 5), sample_cameras(dm.cfg, 1, 5)
    assert not torch.equal(s0["azimuth"], s1["azimuth"])


def test_batch_size_must_be_a_multiple_of_n_views():
    with pytest.raises(ConfigError, match=r"data\.batch_size.*data\.n_views|data\.n_views.*data\.batch_size"):
        RandomCameraDataModule({"batch_size": 6, "n_views": 4})
    with pytest.raises(ConfigError, match=r"data\.n_views"):
        RandomCameraDataModule({"batch_size": 4, "n_views": 0})


def test_stage_override_checked_at_construction():
    with pytest.raises(ConfigError, match=r"system\.stages\[1\]\.data\.batch_size"):
        RandomCameraDataModule({"batch_size": 4, "n_views": 4}, stage_plan=[(0, {}), (10, {"batch_size": 2})])
    dm = RandomCameraDataModule({"batch_size": 1}, stage_plan=[(0, {}), (10, {"batch_size": 8, "n_views": 4})])
    assert sample_cameras(dm.cfg_at(0), 0, 0)["n_views"] == 1
    assert sample_cameras(dm.cfg_at(10), 10, 0)["n_views"] == 4


def test_eval_orbits_unchanged_by_n_views():
    a = RandomCameraDataModule({"batch_size": 4, "n_views": 4, "eval_height": 4, "eval_width": 4})
    b = RandomCameraDataModule({"eval_height": 4, "eval_width": 4})
    for x, y in zip(a.val_dataloader(), b.val_dataloader()):
        assert set(x) == set(y)
        assert all(torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x)
