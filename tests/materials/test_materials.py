"""Diffuse (DreamFusion shading modes) and neural-radiance materials: values, schedule, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.registry import find


def _diffuse(**cfg):
    return find("diffuse-with-point-light-material", "material")(cfg)


def _inputs(n: int = 4):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(n, 3, generator=g)
    positions = torch.zeros(n, 3)
    light = torch.tensor([[0.0, 0.0, 5.0]]).expand(n, 3)
    viewdirs = torch.tensor([[0.0, 0.0, -1.0]]).expand(n, 3)
    return features, positions, light, viewdirs


def test_registered_and_config_is_strict():
    cls = find("diffuse-with-point-light-material", "material")
    assert cls.requires_normal is True
    assert find("neural-radiance-material", "material").requires_normal is False
    with pytest.raises(ConfigError, match="ambient_light_colour"):
        cls({"ambient_light_colour": [0.1, 0.1, 0.1]})


def test_diffuse_facing_light_and_away():
    mat = _diffuse(ambient_light_color=[0.35] * 3, diffuse_light_color=[0.65] * 3).eval()
    features, positions, light, viewdirs = _inputs(3)
    # Facing the light, 60 degrees off it, facing away.
    normals = torch.tensor([[0.0, 0.0, 1.0], [math.sin(math.pi / 3), 0.0, 0.5], [0.0, 0.0, -1.0]])
    rgb = mat(features, viewdirs=viewdirs, positions=positions, shading_normal=normals, light_positions=light)
    albedo = torch.sigmoid(features)
    expected = albedo * torch.tensor([1.0, 0.35 + 0.65 * 0.5, 0.35])[:, None]
    torch.testing.assert_close(rgb, expected)
    # Eval mode defaults to "diffuse"; explicit mode gives the same.
    rgb2 = mat(features, positions=positions, shading_normal=normals, light_positions=light, shading="diffuse")
    torch.testing.assert_close(rgb, rgb2)


def test_point_vs_directional_light():
    features = torch.zeros(1, 3)  # albedo 0.5
    normal = torch.tensor([[1.0, 0.0, 0.0]])
    # A point light straight along +x of the point, but its position vector points along +z+x.
    positions = torch.tensor([[0.0, 0.0, 2.0]])
    light = torch.tensor([[3.0, 0.0, 2.0]])
    kw = dict(positions=positions, shading_normal=normal, light_positions=light, shading="diffuse")
    point = _diffuse(ambient_light_color=[0.0] * 3, diffuse_light_color=[1.0] * 3)(features, **kw)
    torch.testing.assert_close(point, torch.full((1, 3), 0.5))
    directional = _diffuse(ambient_light_color=[0.0] * 3, diffuse_light_color=[1.0] * 3,
                           light_type="directional")(features, **kw)
    expected = 0.5 * 3.0 / math.sqrt(13.0)  # cos between +x and normalize(3, 0, 2)
    torch.testing.assert_close(directional, torch.full((1, 3), expected))


def test_albedo_and_textureless_modes():
    mat = _diffuse(ambient_light_color=[0.2] * 3, diffuse_light_color=[0.7] * 3)
    features, positions, light, _ = _inputs(2)
    normals = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    kw = dict(positions=positions, light_positions=light)
    # Albedo mode needs no normals and equals sigmoid(features).
    torch.testing.assert_close(mat(features, shading="albedo", **kw), torch.sigmoid(features))
    tl = mat(features, shading_normal=normals, shading="textureless", **kw)
    torch.testing.assert_close(tl, torch.tensor([[0.9] * 3, [0.2] * 3]))  # gray, independent of features
    torch.testing.assert_close(mat(torch.randn(2, 3), shading_normal=normals, shading="textureless", **kw), tl)
    assert mat.export(features)["albedo"].shape == (2, 3)
    torch.testing.assert_close(mat.export(features)["albedo"], torch.sigmoid(features))


def test_missing_normals_is_a_clear_error():
    mat = _diffuse()
    features, positions, light, _ = _inputs(2)
    with pytest.raises(ValueError, match="renderer must compute normals"):
        mat(features, positions=positions, light_positions=light, shading="diffuse")
    with pytest.raises(ValueError, match="valid: diffuse, albedo, textureless"):
        mat(features, shading="phong")


def test_albedo_activation_none_clamps():
    mat = _diffuse(albedo_activation="none")
    f = torch.tensor([[-0.5, 0.3, 1.5]])
    torch.testing.assert_close(mat(f, shading="albedo"), torch.tensor([[0.0, 0.3, 1.0]]))


def test_random_mode_schedule():
    mat = _diffuse(ambient_only_steps=100, albedo_prob=0.2, textureless_prob=0.3).train()
    torch.manual_seed(0)
    mat.update_step(0, 50)
    assert {mat.pick_shading() for _ in range(200)} == {"albedo"}
    mat.update_step(0, 100)
    n = 4000
    modes = [mat.pick_shading() for _ in range(n)]
    frac = {m: modes.count(m) / n for m in ("albedo", "textureless", "diffuse")}
    # 4000 draws: standard error <= 0.008, so 0.03 is ~4 sigma.
    assert abs(frac["albedo"] - 0.2) < 0.03
    assert abs(frac["textureless"] - 0.3) < 0.03
    assert abs(frac["diffuse"] - 0.5) < 0.03
    mat.eval()
    assert mat.pick_shading() == "diffuse"


def test_random_mode_used_in_forward_and_probabilities_schedule():
    mat = _diffuse(ambient_only_steps=0, albedo_prob=[0, 1.0, 0.0, 10], textureless_prob=0.0).train()
    features, positions, light, _ = _inputs(2)
    normals = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, -1.0]])  # facing away: diffuse = albedo * 0.1
    kw = dict(positions=positions, light_positions=light, shading_normal=normals)
    mat.update_step(0, 0)  # albedo_prob 1.0 at step 0
    torch.testing.assert_close(mat(features, **kw), torch.sigmoid(features))
    mat.update_step(0, 10)  # albedo_prob 0.0: always diffuse
    torch.testing.assert_close(mat(features, **kw), torch.sigmoid(features) * 0.1)


def test_diffuse_gradients_reach_features_and_normals():
    mat = _diffuse()
    features, positions, light, _ = _inputs(3)
    features = features.clone().requires_grad_(True)
    normals = torch.nn.functional.normalize(torch.tensor([[0.2, 0.1, 1.0], [0.5, 0.0, 0.5], [1.0, 1.0, 0.3]]),
                                            dim=-1).requires_grad_(True)
    rgb = mat(features, positions=positions, shading_normal=normals, light_positions=light, shading="diffuse")
    rgb.sum().backward()
    assert features.grad.abs().min() > 0
    assert normals.grad.abs().sum() > 0


def test_diffuse_gradcheck_float64():
    mat = _diffuse().double()
    f = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    n = torch.nn.functional.normalize(torch.randn(3, 3, dtype=torch.float64), dim=-1)
    n[:, 2] = n[:, 2].abs() + 0.5  # keep n.l well away from the kink at 0
    n = n.requires_grad_(True)
    p = torch.zeros(3, 3, dtype=torch.float64)
    light = torch.tensor([[0.0, 0.0, 4.0]], dtype=torch.float64).expand(3, 3)
    fn = lambda f, n: mat(f, positions=p, shading_normal=n, light_positions=light, shading="diffuse")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (f, n))


def test_neural_radiance_is_sigmoid_of_features():
    mat = find("neural-radiance-material", "material")({"input_feature_dims": 5})
    f = torch.randn(6, 5, requires_grad=True)
    rgb = mat(f, viewdirs=torch.randn(6, 3), shading="diffuse")  # shading inputs are ignored
    torch.testing.assert_close(rgb, torch.sigmoid(f[:, :3]))
    torch.testing.assert_close(mat.export(f)["albedo"], torch.sigmoid(f[:, :3]))
    rgb.sum().backward()
    assert f.grad[:, :3].abs().min() > 0 and f.grad[:, 3:].abs().max() == 0
