"""The volume renderer's adaptive early-stop pass: skipped while it drops nothing, the image unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lift3d.backgrounds.base import BaseBackground
from lift3d.config import ConfigError
from lift3d.geometry.base import BaseImplicitGeometry
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras


class _Sigmoid(BaseMaterial):
    requires_normal = True

    def forward(self, features, shading_normal=None, **kwargs):
        return torch.sigmoid(features[..., :3]) * (0.5 + 0.5 * shading_normal[..., :1].abs())


class _White(BaseBackground):
    @dataclass
    class Config(BaseBackground.Config):
        pass

    def forward(self, dirs):
        return torch.ones_like(dirs)


class Ball(BaseImplicitGeometry):
    """A ball of radius 0.5 whose density (``scale`` times a soft step) is a trainable parameter:
    faint (scale 0.5: no ray ever falls below 1e-4 transmittance) or opaque (scale 60)."""

    def __init__(self, scale: float):
        super().__init__({})
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.tint = nn.Parameter(torch.tensor([0.3, -0.2, 0.1]))

    def forward(self, points, output_normal=False):
        r = points.norm(dim=-1, keepdim=True)
        density = self.scale * torch.sigmoid((0.5 - r) / 0.02)
        out = {"density": density, "features": self.tint + torch.tanh(2.0 * points)}
        if output_normal:
            out["normal"] = F.normalize(points, dim=-1)
        return out

    def forward_density(self, points):
        return self.forward(points)["density"]


def _renderer(geo, **cfg):
    base = {"num_samples_per_ray": 48, "randomized": True, "grid_prune": False, "early_stop_eps": 1e-4}
    base.update(cfg)
    return find("nerf-volume-renderer")(base, geometry=geo, material=_Sigmoid(), background=_White())


def _cams(res=12):
    one = lambda v: torch.tensor([float(v)])  # noqa: E731
    return make_cameras(one(15.0), one(30.0), one(2.0), one(40.0), res, res)


def _train_renders(r, n, seed=0):
    """``n`` training renders, each with its own seeded jitter; the outputs and the field's gradients."""
    r.train()
    outs, grads = [], []
    c = _cams()
    for i in range(n):
        torch.manual_seed(seed + i)
        r.geometry.zero_grad()
        out = r(**c)
        out["comp_rgb"].mean().backward()
        outs.append({k: out[k].detach() for k in ("comp_rgb", "opacity", "depth", "weights")})
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in r.geometry.parameters()]))
    return outs, grads


def test_off_by_default_and_the_pass_runs_every_render():
    r = _renderer(Ball(0.5))
    assert r.cfg.early_stop_adaptive is False
    r.train()
    calls = []
    orig = r._early_stop
    r._early_stop = lambda *a: calls.append(1) or orig(*a)
    for i in range(5):
        torch.manual_seed(i)
        r(**_cams())
    assert len(calls) == 5 and r.early_stop_stats["last_drop"] == 0.0


def test_a_pass_that_drops_nothing_is_skipped_with_the_same_result():
    always = _renderer(Ball(0.5))
    adaptive = _renderer(Ball(0.5), early_stop_adaptive=True)
    a, ga = _train_renders(always, 40)
    b, gb = _train_renders(adaptive, 40)
    for x, y, gx, gy in zip(a, b, ga, gb):
        for k in x:
            assert torch.equal(x[k], y[k]), k
        assert torch.equal(gx, gy)
    st = adaptive.early_stop_stats
    # Skips of 1, 2, 4, 8, 16, 16 renders after each pass that dropped nothing.
    assert (st["runs"], st["skipped"]) == (6, 34)
    assert st["last_drop"] == 0.0 and st["backoff"] == 16


def test_a_pass_that_pays_runs_every_render_and_matches():
    always = _renderer(Ball(60.0))
    adaptive = _renderer(Ball(60.0), early_stop_adaptive=True)
    a, ga = _train_renders(always, 6)
    b, gb = _train_renders(adaptive, 6)
    for x, y, gx, gy in zip(a, b, ga, gb):
        for k in x:
            assert torch.equal(x[k], y[k]), k
        assert torch.equal(gx, gy)
    st = adaptive.early_stop_stats
    assert (st["runs"], st["skipped"], st["backoff"]) == (6, 0, 0)
    assert st["last_drop"] > 0.2


def test_a_skipped_pass_changes_a_ray_by_at_most_eps():
    full = _renderer(Ball(60.0), early_stop_eps=0.0, randomized=False)
    adaptive = _renderer(Ball(60.0), early_stop_adaptive=True, early_stop_min_drop=1.0, randomized=False)
    adaptive.train(), full.train()
    c = _cams()
    adaptive(**c)  # a pass that drops samples, but not all: below min_drop 1.0, so the next render skips it
    assert adaptive.early_stop_stats["skip_left"] == 1
    skipped, ref = adaptive(**c), full(**c)
    assert adaptive.early_stop_stats["skipped"] == 1
    assert skipped["weights"].shape == ref["weights"].shape
    torch.testing.assert_close(skipped["comp_rgb"], ref["comp_rgb"], rtol=0, atol=1e-6)


def test_backing_off_ends_when_the_shape_becomes_opaque():
    geo = Ball(0.5)
    r = _renderer(geo, early_stop_adaptive=True)
    r.train()
    c = _cams()
    for _ in range(6):  # passes at renders 1, 3 and 6, each backing off for longer: 1, 2, then 4
        r(**c)
    assert r.early_stop_stats["backoff"] == 4
    with torch.no_grad():
        geo.scale.fill_(60.0)
    n_skip = r.early_stop_stats["skip_left"]
    for _ in range(n_skip + 1):
        r(**c)
    st = r.early_stop_stats
    assert st["backoff"] == 0 and st["skip_left"] == 0 and st["last_drop"] > 0.2
    runs = st["runs"]
    r(**c)
    assert st["runs"] == runs + 1


def test_evaluation_renders_always_run_the_pass():
    r = _renderer(Ball(0.5), early_stop_adaptive=True)
    r.eval()
    c = _cams()
    for _ in range(4):
        with torch.no_grad():
            r(**c)
    st = r.early_stop_stats
    assert st["skipped"] == 0 and st["skip_left"] == 0 and st["last_drop"] == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_min_drop_must_be_a_fraction(bad):
    with pytest.raises(ConfigError, match="early_stop_min_drop"):
        _renderer(Ball(0.5), early_stop_adaptive=True, early_stop_min_drop=bad)
