"""PBR material and its environment lighting: energy, mirror reflection, BRDF table, maps, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lift3d.materials import envlight as E
from lift3d.registry import find

RES = 16  # environment height used by the tests: prefiltering stays in milliseconds


def _pbr(**cfg):
    cfg.setdefault("environment_resolution", RES)
    return find("pbr-material", "material")(cfg)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.fixture()
def white_env(tmp_path):
    path = tmp_path / "white.npy"
    np.save(path, np.ones((8, 16, 3), dtype=np.float32))
    return str(path)


@pytest.fixture()
def red_up_blue_down(tmp_path):
    import imageio.v3 as iio

    img = np.zeros((32, 64, 3), dtype=np.uint8)
    img[:16, :, 0] = 255  # rows 0..15: upper hemisphere (+z), red
    img[16:, :, 2] = 255
    path = tmp_path / "two.png"
    iio.imwrite(path, img)
    return str(path)


def test_registered_and_checks_feature_dims():
    cls = find("pbr-material", "material")
    assert cls.requires_normal is True
    with pytest.raises(ValueError, match="input_feature_dims >= 8"):
        _pbr(use_bump=True, input_feature_dims=5)
    with pytest.raises(ValueError, match="min_roughness"):
        _pbr(min_roughness=0.9, max_roughness=0.5)


def test_rough_dielectric_under_white_env_returns_albedo(white_env):
    mat = _pbr(environment_texture=white_env, min_roughness=1.0, max_roughness=1.0,
               min_metallic=0.0, max_metallic=0.0)
    g = torch.Generator().manual_seed(0)
    n = 64
    features = torch.randn(n, 5, generator=g)
    normals = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    viewdirs = -normals  # looking straight at each point
    albedo = torch.sigmoid(features[:, :3])
    comp = mat.shade_components(albedo, torch.ones(n, 1), torch.zeros(n, 1), normals, viewdirs)
    torch.testing.assert_close(comp["diffuse"], albedo, atol=2e-3, rtol=0)  # E / pi = 1 for L = 1
    rgb = mat(features, viewdirs=viewdirs, shading_normal=normals)
    spec = rgb - albedo.clamp(max=1.0)
    # Rough dielectric specular at normal incidence: F0 * A + B with F0 = 0.04, A ~ 0.36 at roughness 1.
    assert spec.min() > 0.005 and spec.max() < 0.03
    # Oblique views keep the total close to the albedo as well.
    oblique = torch.nn.functional.normalize(-normals + 0.8 * torch.randn(n, 3, generator=g), dim=-1)
    rgb2 = mat(features, viewdirs=oblique, shading_normal=normals)
    assert ((rgb2 - albedo).abs() < 0.08).all()


def test_environment_scale_is_scheduled(white_env):
    mat = _pbr(environment_texture=white_env, environment_scale=[0, 1.0, 0.5, 10], min_metallic=0.0,
               max_metallic=0.0, min_roughness=1.0)
    features = torch.zeros(1, 5)
    normals, viewdirs = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    before = mat(features, viewdirs=viewdirs, shading_normal=normals)
    mat.update_step(0, 10)
    after = mat(features, viewdirs=viewdirs, shading_normal=normals)
    torch.testing.assert_close(after, 0.5 * before)


def test_mirror_reflects_environment(red_up_blue_down):
    mat = _pbr(environment_texture=red_up_blue_down, environment_resolution=32, min_roughness=0.0,
               max_roughness=0.0, min_metallic=1.0, max_metallic=1.0, min_albedo=1.0, max_albedo=1.0)
    s = 1 / math.sqrt(2)
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0], [s, 0.0, s], [0.0, s, -s]])
    # Views: down onto a floor -> reflects up; up onto a ceiling -> down; along -x onto a 45-degree
    # slope -> straight up; along -y onto a downward slope -> straight down.
    viewdirs = torch.tensor([[s, 0.0, -s], [s, 0.0, s], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    rgb = mat(torch.zeros(4, 5), viewdirs=viewdirs, shading_normal=normals)
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(rgb, torch.stack([red, blue, red, blue]), atol=0.03, rtol=0)

    # Rough metal blurs the two colours together; the diffuse lobe is absent (metallic = 1).
    rough = _pbr(environment_texture=red_up_blue_down, environment_resolution=32, min_roughness=1.0,
                 max_roughness=1.0, min_metallic=1.0, max_metallic=1.0, min_albedo=1.0, max_albedo=1.0)
    rgb_rough = rough(torch.zeros(1, 5), viewdirs=viewdirs[:1], shading_normal=normals[:1])
    assert rgb_rough[0, 0] < 0.8 and rgb_rough[0, 2] > 0.02 and rgb_rough[0, 0] > rgb_rough[0, 2]


def test_gradients_reach_every_channel_and_the_normal():
    mat = _pbr(use_bump=True, input_feature_dims=8)
    g = torch.Generator().manual_seed(3)
    features = (0.5 * torch.randn(16, 8, generator=g)).requires_grad_(True)
    normals = torch.nn.functional.normalize(torch.randn(16, 3, generator=g), dim=-1)
    normals = normals.requires_grad_(True)
    viewdirs = torch.nn.functional.normalize(-normals.detach() + 0.3 * torch.randn(16, 3, generator=g), dim=-1)
    rgb = mat(features, viewdirs=viewdirs, shading_normal=normals)
    assert rgb.shape == (16, 3) and rgb.min() >= 0 and rgb.max() <= 1
    (rgb * torch.randn(16, 3, generator=g)).sum().backward()
    per_channel = features.grad.abs().sum(0)
    assert (per_channel > 0).all(), per_channel
    assert torch.isfinite(normals.grad).all() and normals.grad.abs().sum() > 0


def test_gradients_finite_at_the_poles():
    mat = _pbr()
    features = torch.zeros(2, 5, requires_grad=True)
    normals = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]], requires_grad=True)
    viewdirs = torch.tensor([[0.0, 0.0, -1.0], [0.0, 0.0, 1.0]])  # reflections point straight at the poles
    mat(features, viewdirs=viewdirs, shading_normal=normals).sum().backward()
    assert torch.isfinite(features.grad).all() and torch.isfinite(normals.grad).all()


def test_modes_export_and_missing_normals():
    mat = _pbr(use_bump=True, input_feature_dims=8, bump_scale=0.25)
    f = torch.randn(5, 8)
    torch.testing.assert_close(mat(f, shading="albedo"), torch.sigmoid(f[:, :3]))
    rough = 0.08 + 0.92 * torch.sigmoid(f[:, 3:4])
    torch.testing.assert_close(mat(f, shading="roughness"), rough.expand(5, 3))
    out = mat.export(f)
    assert set(out) == {"albedo", "roughness", "metallic", "bump"}
    assert out["roughness"].shape == (5, 1) and out["metallic"].shape == (5, 1) and out["bump"].shape == (5, 3)
    torch.testing.assert_close(out["roughness"], rough)
    assert out["bump"].abs().max() <= 0.25
    with pytest.raises(ValueError, match="renderer must compute normals"):
        mat(f, viewdirs=torch.randn(5, 3))
    with pytest.raises(ValueError, match="valid: pbr"):
        mat(f, shading="phong")
    # Textureless: white, non-metal; independent of the albedo features.
    n = torch.tensor([[0.0, 0.0, 1.0]]).expand(5, 3)
    v = torch.tensor([[0.0, 0.0, -1.0]]).expand(5, 3)
    f2 = f.clone()
    f2[:, :3] = torch.randn(5, 3)
    f2[:, 4] = torch.randn(5)
    f[:, 5:], f2[:, 5:] = 0.0, 0.0
    torch.testing.assert_close(mat(f, viewdirs=v, shading_normal=n, shading="textureless"),
                               mat(f2, viewdirs=v, shading_normal=n, shading="textureless"))


def test_srgb_color_space_keeps_albedo_under_white_light(white_env):
    mat = _pbr(environment_texture=white_env, min_roughness=1.0, min_metallic=0.0, max_metallic=0.0,
               color_space="srgb")
    features = torch.tensor([[_logit(0.2), _logit(0.5), _logit(0.8), 0.0, 0.0]])
    rgb = mat(features, viewdirs=torch.tensor([[0.0, 0.0, -1.0]]), shading_normal=torch.tensor([[0.0, 0.0, 1.0]]))
    assert ((rgb - torch.tensor([[0.2, 0.5, 0.8]])).abs() < 0.05).all()
    assert (rgb >= torch.tensor([[0.2, 0.5, 0.8]]) - 1e-3).all()


def _brute_force_split_sum(n_dot_v: float, roughness: float, n: int = 200) -> tuple[float, float]:
    """Integrate GGX/Smith/Schlick over the hemisphere on a grid: A = int f (1 - Fc) cos, B = int f Fc cos."""
    a = roughness * roughness
    k = a / 2
    th = (torch.arange(n, dtype=torch.float64) + 0.5) / n * math.pi / 2
    ph = (torch.arange(2 * n, dtype=torch.float64) + 0.5) / (2 * n) * 2 * math.pi
    T, P = torch.meshgrid(th, ph, indexing="ij")
    l = torch.stack([T.sin() * P.cos(), T.sin() * P.sin(), T.cos()], -1)
    d_omega = T.sin() * (math.pi / 2 / n) * (math.pi / n)
    v = torch.tensor([math.sqrt(1 - n_dot_v ** 2), 0.0, n_dot_v], dtype=torch.float64)
    h = torch.nn.functional.normalize(l + v, dim=-1)
    nh, nl, vh = h[..., 2], l[..., 2], (v * h).sum(-1)
    D = a * a / (math.pi * (nh * nh * (a * a - 1) + 1) ** 2)
    G = (n_dot_v / (n_dot_v * (1 - k) + k)) * (nl / (nl * (1 - k) + k))
    f = D * G / (4 * nl * n_dot_v)
    fc = (1 - vh) ** 5
    return float((f * (1 - fc) * nl * d_omega).sum()), float((f * fc * nl * d_omega).sum())


@pytest.mark.parametrize("n_dot_v,roughness", [(0.5, 0.3), (0.95, 0.95), (0.2, 0.6)])
def test_brdf_table_matches_direct_integration(n_dot_v, roughness):
    a, b = E.env_brdf(torch.tensor([[n_dot_v]]), torch.tensor([[roughness]]))
    ref_a, ref_b = _brute_force_split_sum(n_dot_v, roughness)
    # Bilinear lookup in a 32x32 table plus sampling noise.
    assert abs(a.item() - ref_a) < 0.02 and abs(b.item() - ref_b) < 0.01


def test_equirect_mapping_and_lookup():
    uv = E.dir_to_equirect_uv(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]]))
    torch.testing.assert_close(uv[:3], torch.tensor([[0.5, 0.5], [0.25, 0.5], [0.75, 0.5]]))
    assert uv[3, 1] < 1e-3 and uv[4, 1] > 1 - 1e-3
    H, W = 4, 8
    tex = torch.arange(H * W, dtype=torch.float32).reshape(1, H, W)
    dirs, _ = E.equirect_dirs(H, W)
    torch.testing.assert_close(E.sample_equirect(tex, dirs)[..., 0], tex[0])  # texel centres round-trip
    # -x sits on the seam: half the first column plus half the last one.
    d = torch.tensor([[-math.cos(math.radians(22.5)), 0.0, math.sin(math.radians(22.5))]])  # row 1 centre
    torch.testing.assert_close(E.sample_equirect(tex, d)[0, 0], 0.5 * (tex[0, 1, 0] + tex[0, 1, -1]))


def _write_rgbe(path, rgbe: np.ndarray, rle: bool) -> None:
    H, W, _ = rgbe.shape
    out = bytearray(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n" + f"-Y {H} +X {W}\n".encode())
    for row in rgbe:
        if not rle:
            out += row.tobytes()
            continue
        out += bytes([2, 2, W >> 8, W & 255])
        for ch in range(4):
            vals = row[:, ch]
            # A run for the first half (all equal in the test data), literals for the rest.
            half = W // 2
            out += bytes([128 + half, vals[0]])
            out += bytes([W - half]) + vals[half:].tobytes()
    path.write_bytes(bytes(out))


@pytest.mark.parametrize("rle", [False, True])
def test_radiance_hdr_reader(tmp_path, rle):
    H, W = 3, 10
    rgbe = np.zeros((H, W, 4), dtype=np.uint8)
    rgbe[..., 3] = 129  # values m * 2^(129 - 136) = m / 128
    rgbe[:, :5, :3] = 128  # 1.0 in the run
    rgbe[:, 5:, 0] = np.arange(5) * 20 + 10
    rgbe[:, 5:, 1] = 64
    rgbe[0, 9, 3] = 0  # zero exponent: black
    path = tmp_path / f"t{int(rle)}.hdr"
    _write_rgbe(path, rgbe, rle)
    img = E.load_environment(path)
    assert img.shape == (H, W, 3)
    torch.testing.assert_close(img[1, :5], torch.ones(5, 3))
    torch.testing.assert_close(img[1, 5:, 0], torch.tensor([10.0, 30, 50, 70, 90]) / 128)
    torch.testing.assert_close(img[1, 5:, 1], torch.full((5,), 0.5))
    torch.testing.assert_close(img[0, 9], torch.zeros(3))


def test_procedural_sky_and_light_lookups():
    light = E.EnvLight.procedural(height=RES, n_levels=4, sun_strength=0.5)
    up, down = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    assert (light.diffuse(up) > light.diffuse(down) + 0.3).all()
    e, a = math.radians(45.0), math.radians(30.0)
    sun = torch.tensor([[math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)]])
    away = torch.tensor([[math.cos(e) * math.cos(a + math.pi), math.cos(e) * math.sin(a + math.pi), math.sin(e)]])
    # Facing the sun adds about sun_strength (0.5) over facing away at the same elevation.
    gain = (light.diffuse(sun) - light.diffuse(away)).mean().item()
    assert 0.35 < gain < 0.65
    # Specular levels: the mirror sees the sun's high radiance, a rough lobe averages it down.
    assert light.specular(sun, torch.zeros(1, 1)).mean() > 5 * light.specular(sun, torch.ones(1, 1)).mean()
    # Second construction reuses the cached prefiltered maps.
    again = E.EnvLight.procedural(height=RES, n_levels=4, sun_strength=0.5)
    torch.testing.assert_close(again.level(2), light.level(2))
    assert len(again.state_dict()) == 0  # kept out of checkpoints


def test_pbr_gradcheck_float64():
    mat = _pbr(environment_resolution=16).double()
    g = torch.Generator().manual_seed(5)
    features = torch.randn(4, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    normals = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    viewdirs = torch.nn.functional.normalize(-normals + 0.3 * torch.randn(4, 3, generator=g, dtype=torch.float64),
                                             dim=-1)
    # Linear colour space and a dim environment keep the output away from the clamp at 1.
    mat.cfg.environment_scale = 0.3
    fn = lambda f: mat(f, viewdirs=viewdirs, shading_normal=normals)  # noqa: E731
    assert fn(features).max() < 1.0
    assert torch.autograd.gradcheck(fn, (features,), atol=1e-5)
