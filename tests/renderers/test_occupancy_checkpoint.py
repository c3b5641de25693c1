"""The occupancy grid in checkpoints: round trip, resume, old checkpoints, nerfacc's grid mirrored."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lift3d.backends import nerfacc_backend
from lift3d.backgrounds.base import BaseBackground
from lift3d.geometry.base import BaseImplicitGeometry
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras

GRID_KEYS = {"occupancy.occs", "occupancy.binary", "occupancy.n_updates"}


class SigmoidMaterial(BaseMaterial):
    def forward(self, features, **kwargs):
        return torch.sigmoid(features[..., :3])


class BlackBackground(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        pass

    def forward(self, dirs):
        return torch.zeros_like(dirs)


class OffCentreBall(BaseImplicitGeometry):
    """A dense ball of radius 0.3 at (0.4, 0, 0): asymmetric, so a transposed grid would show."""

    centre = (0.4, 0.0, 0.0)

    def forward(self, points, output_normal=False):
        c = torch.tensor(self.centre, dtype=points.dtype, device=points.device)
        r = (points - c).norm(dim=-1, keepdim=True)
        density = 40.0 * torch.sigmoid((0.3 - r) / 0.02)
        return {"density": density, "features": points.expand(*points.shape[:-1], 3) * 2.0}

    def forward_density(self, points):
        return self.forward(points)["density"]


def make_renderer(**cfg):
    base = {"num_samples_per_ray": 48, "randomized": False, "grid_prune": True, "grid_resolution": 16,
            "occ_warmup_steps": 32, "occ_update_interval": 16}
    base.update(cfg)
    return find("nerf-volume-renderer")(base, geometry=OffCentreBall(), material=SigmoidMaterial(),
                                        background=BlackBackground())


def run_updates(r, steps, seed=0):
    for s in steps:
        torch.manual_seed(seed * 1000 + s)  # the system reseeds every step the same way
        r.update_step(0, s)


def grid_state(r):
    return {k: v.clone() for k, v in r.state_dict().items() if k in GRID_KEYS}


def render(r):
    c = make_cameras(torch.tensor([10.0, 40.0]), torch.tensor([0.0, 120.0]), torch.full((2,), 2.2),
                     torch.full((2,), 40.0), 12, 12)
    r.eval()
    with torch.no_grad():
        return r(**c)


def test_grid_round_trips_through_the_state_dict_and_resumes_identically():
    a = make_renderer()
    run_updates(a, range(0, 80, 16))  # warm-up updates, then partial random refreshes
    assert set(a.state_dict()) == GRID_KEYS
    assert int(a.occupancy.n_updates) == 5 and a.occupancy.occupied_fraction < 0.5

    b = make_renderer()
    b.load_state_dict(a.state_dict())
    for k, v in grid_state(a).items():
        assert torch.equal(v, grid_state(b)[k]), k
    ra, rb = render(a), render(b)
    assert ra["weights"].shape[0] < 0.6 * 2 * 12 * 12 * 48  # the grid really prunes these renders
    for k in ("comp_rgb", "opacity", "depth"):
        assert torch.equal(ra[k], rb[k]), k

    # Resuming: the next (random, partial) update gives the same grid as the uninterrupted run.
    run_updates(a, [80])
    run_updates(b, [80])
    for k, v in grid_state(a).items():
        assert torch.equal(v, grid_state(b)[k]), k
    # ...which a run that lost the grid does not reproduce (it re-warms from scratch).
    c = make_renderer()
    run_updates(c, [80])
    assert not torch.equal(c.occupancy.occs, a.occupancy.occs)


def test_checkpoint_without_grid_state_loads_with_a_warning_and_rewarms_fully():
    a = make_renderer()
    run_updates(a, range(0, 80, 16))
    old = {k: v for k, v in a.state_dict().items() if k not in GRID_KEYS}
    b = make_renderer()
    run_updates(b, [0])  # some state that the load must clear
    with pytest.warns(UserWarning, match=r"no occupancy grid state \(missing occupancy\.occs"):
        res = b.load_state_dict(old, strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert int(b.occupancy.n_updates) == 0 and b.occupancy.occupied_fraction == 1.0
    # Past warm-up, the first update of a restored-empty grid still refreshes every cell: it
    # equals a warm-up update, not a quarter-of-the-cells one.
    run_updates(b, [96])
    ref = make_renderer(occ_warmup_steps=1000)
    run_updates(ref, [96])
    assert torch.equal(b.occupancy.occs, ref.occupancy.occs)
    assert torch.equal(b.occupancy.binary, ref.occupancy.binary)
    assert bool((b.occupancy.occs > 0).float().mean() > 0.05)


def test_checkpoint_with_another_grid_resolution_warns_and_starts_fresh():
    a = make_renderer(grid_resolution=8)
    run_updates(a, [0])
    b = make_renderer(grid_resolution=16)
    with pytest.warns(UserWarning, match=r"8\^3 occupancy grid, this renderer's grid_resolution is 16"):
        b.load_state_dict(a.state_dict(), strict=True)
    assert b.occupancy.occs.shape == (16**3,) and b.occupancy.occupied_fraction == 1.0


@pytest.mark.skipif(not nerfacc_backend.importable(), reason="nerfacc is not installed")
def test_nerfacc_grid_is_mirrored_into_the_state_dict_and_restored(monkeypatch):
    # nerfacc's grid update is plain torch; only its marching needs CUDA. Force its update path on CPU.
    from lift3d.renderers.volume import NeRFVolumeRenderer

    monkeypatch.setattr(NeRFVolumeRenderer, "_use_nerfacc", lambda self, device: True)
    a = make_renderer()
    run_updates(a, range(0, 80, 16))
    est = a.__dict__["_estimator"]
    assert int(a.occupancy.n_updates) == 5
    assert torch.equal(a.occupancy.occs, est.occs)
    assert torch.equal(a.occupancy.binary, est.binaries[0])
    # Same cell order as the torch grid: the ball at +x is occupied, its mirror images are not.
    pts = torch.tensor([[0.4, 0.0, 0.0], [-0.4, 0.0, 0.0], [0.0, 0.4, 0.0], [0.0, 0.0, 0.4]])
    assert a.occupancy.occupied(pts).tolist() == [True, False, False, False]

    b = make_renderer()
    b.load_state_dict(a.state_dict())
    run_updates(b, [])
    est_b = b._estimator_for(torch.device("cpu"))
    assert est_b is not est
    assert torch.equal(est_b.occs, est.occs) and torch.equal(est_b.binaries, est.binaries)
    run_updates(a, [80])
    run_updates(b, [80])
    assert torch.equal(a.occupancy.occs, b.occupancy.occs) and torch.equal(est.binaries, est_b.binaries)

    # A fresh nerfacc grid starts all-occupied (as the torch grid) and its first update is full.
    c = make_renderer()
    assert bool(c._estimator_for(torch.device("cpu")).binaries.all())
    run_updates(c, [96])
    ref = make_renderer(occ_warmup_steps=1000)
    run_updates(ref, [96])
    assert torch.equal(c.occupancy.occs, ref.occupancy.occs)
