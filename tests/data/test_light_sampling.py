"""Training lights: the toy world's upper hemisphere and DreamFusion's lights near the camera."""

from __future__ import annotations

import pytest
import torch

from lift3d.data.random_cameras import RandomCameraConfig, sample_light_positions
from lift3d.utils.cameras import make_cameras

N = 4096


def _cams(g: torch.Generator) -> dict:
    elev = torch.rand(N, generator=g) * 70 - 10
    azim = torch.rand(N, generator=g) * 360 - 180
    dist = torch.rand(N, generator=g) * 0.4 + 1.8
    return make_cameras(elev, azim, dist, torch.full((N,), 40.0), 2, 2)


def _lights(strategy: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(light positions [N, 3], their unit directions, cameras) for a strategy, on a fixed seed."""
    g = torch.Generator().manual_seed(0)
    cams = _cams(g)
    light = sample_light_positions(RandomCameraConfig(light_sample_strategy=strategy), cams, g)
    return light, torch.nn.functional.normalize(light, dim=-1), cams


def test_upper_hemisphere_lights_are_uniform_above_the_image_horizon():
    light, d, cams = _lights("upper-hemisphere")
    up = cams["c2w"][:, :3, 1]
    towards_camera = torch.nn.functional.normalize(cams["camera_positions"], dim=-1)
    cos_up = (d * up).sum(-1)
    assert (cos_up >= 0).all()
    # Uniform on a hemisphere: the cosine to its pole is uniform on [0, 1].
    assert abs(cos_up.mean().item() - 0.5) < 0.02
    assert abs((cos_up < 0.25).float().mean().item() - 0.25) < 0.03
    # Lights behind the object (facing away from the camera) are as common as in front.
    behind = ((d * towards_camera).sum(-1) < 0).float().mean().item()
    assert abs(behind - 0.5) < 0.03
    # Far away: the shading is that of the directional light the prior was trained with.
    assert (light.norm(dim=-1) > 5 * cams["camera_distances"]).all()


def test_dreamfusion_lights_stay_near_the_camera():
    _, d, cams = _lights("dreamfusion")
    towards_camera = torch.nn.functional.normalize(cams["camera_positions"], dim=-1)
    assert ((d * towards_camera).sum(-1) > 0).float().mean().item() > 0.75


def test_unknown_light_strategy_names_the_valid_ones():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="upper-hemisphere"):
        sample_light_positions(RandomCameraConfig(light_sample_strategy="sun"), _cams(g), g)
