"""The toy-world sphere tracer (and the training-data sampler built on it)."""

from __future__ import annotations

import math

import pytest
import torch

from lift3d.priors.toyworld.render import render
from lift3d.priors.toyworld.shapes import CATALOGUE, COLOURS
from lift3d.utils.cameras import focal_from_fovy, make_cameras


def cams(elev, azim, dist=2.0, fovy=40.0, res=64):
    n = len(elev)
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return make_cameras(t(elev), t(azim), t([dist] * n) if not isinstance(dist, list) else t(dist), t([fovy] * n), res, res)


def test_render_outputs_shapes_and_determinism():
    c = cams([10.0, 40.0], [30.0, 200.0])
    light = torch.nn.functional.normalize(torch.tensor([[0.3, 0.2, 1.0], [-1.0, 0.5, 0.2]]), dim=-1)
    a = render(CATALOGUE["a chair"], c, light)
    b = render(CATALOGUE["a chair"], c, light)
    shapes = {"rgb": 3, "mask": 1, "depth": 1, "normal": 3, "albedo": 3, "feature_mask": 1}
    for k, ch in shapes.items():
        assert a[k].shape == (2, 64, 64, ch)
        assert torch.equal(a[k], b[k])
    assert 0 < a["mask"].mean() < 1 and a["rgb"].min() >= 0 and a["rgb"].max() <= 1
    assert torch.all(a["rgb"][a["mask"][..., 0] == 0] == 0)  # black background


@pytest.mark.parametrize("dist", [1.8, 2.2, 3.0])
def test_sphere_silhouette_matches_projected_disc(dist):
    res = 64
    out = render(CATALOGUE["a red sphere"], cams([0.0], [0.0], dist=dist, res=res))
    focal = focal_from_fovy(torch.tensor(40.0), res).item()
    r_px = focal * 0.5 / math.sqrt(dist**2 - 0.5**2)  # tangent cone of a ball of radius 0.5
    ii, jj = torch.meshgrid(torch.arange(res) + 0.5, torch.arange(res) + 0.5, indexing="ij")
    rho = torch.sqrt((ii - res / 2) ** 2 + (jj - res / 2) ** 2)
    m = out["mask"][0, ..., 0] > 0.5
    assert m[rho < r_px - 1].all() and not m[rho > r_px + 1].any()
    assert math.sqrt(m.sum().item() / math.pi) == pytest.approx(r_px, abs=0.5)


def test_headlight_centre_pixel_and_depth_normal():
    # Odd resolution: the centre pixel's ray is the optical axis, hitting the sphere head-on.
    c = cams([25.0], [70.0], dist=2.0, res=63)
    out = render(CATALOGUE["a green sphere"], c, light_dirs=torch.nn.functional.normalize(c["camera_positions"], dim=-1))
    alb = torch.tensor(COLOURS["green"])
    assert torch.allclose(out["rgb"][0, 31, 31], alb * (0.35 + 0.65), atol=1e-4)
    assert out["depth"][0, 31, 31, 0].item() == pytest.approx(1.5, abs=2e-4)
    # Normals of the sphere are the unit hit positions; light from behind leaves only ambient.
    hit = out["mask"][0, ..., 0] > 0
    p = c["rays_o"][0][hit] + out["depth"][0][hit] * c["rays_d"][0][hit]
    assert torch.allclose(out["normal"][0][hit], p / p.norm(dim=-1, keepdim=True), atol=2e-3)
    back = render(CATALOGUE["a green sphere"], c, light_dirs=-torch.nn.functional.normalize(c["camera_positions"], dim=-1))
    assert torch.allclose(back["rgb"][0][hit], (alb * 0.35).expand(int(hit.sum()), 3), atol=1e-5)


def test_albedo_shading_and_background_colour():
    c = cams([0.0], [0.0], res=33)
    out = render(CATALOGUE["a blue cube"], c, background=(0.2, 0.4, 0.6), shading="albedo")
    hit = out["mask"][0, ..., 0] > 0
    assert torch.allclose(out["rgb"][0][hit], torch.tensor(COLOURS["blue"]).expand(int(hit.sum()), 3))
    assert torch.allclose(out["rgb"][0][~hit], torch.tensor([0.2, 0.4, 0.6]).expand(int((~hit).sum()), 3))


def test_snowman_nose_visible_from_front_hidden_from_back():
    c = cams([0.0, 0.0, 0.0], [0.0, 180.0, 90.0], res=64)
    out = render(CATALOGUE["a snowman"], c)
    feat = out["feature_mask"][..., 0]
    # Front (azimuth 0): the nose points at the camera; its pixels sit on the centre column,
    # above the centre row, where the nose's centre (0.3, 0, 0.24) projects.
    front = feat[0] > 0
    assert front.sum() >= 10
    rows, cols = front.nonzero(as_tuple=True)
    assert cols.float().mean().item() == pytest.approx(31.5, abs=0.75)
    clip = c["mvp_mtx"][0] @ torch.tensor([0.3, 0.0, 0.24, 1.0])
    row_expected = (clip[1] / clip[3] + 1) * 32 - 0.5
    assert rows.float().mean().item() == pytest.approx(row_expected.item(), abs=1.5)
    assert rows.float().mean().item() < 31.5
    # Back (azimuth 180): the head hides the nose entirely.
    assert feat[1].sum() == 0
    # Side (azimuth 90, camera on +y): +x is image-left, so the nose points left.
    side_cols = (feat[2] > 0).nonzero(as_tuple=True)[1].float()
    assert side_cols.numel() > 0 and side_cols.max().item() < 31.5
    assert side_cols.min().item() < 31.5 - 0.2 * focal_from_fovy(torch.tensor(40.0), 64).item() / 2.0


def test_chair_back_and_mug_handle_sides():
    c = cams([20.0, 20.0, 0.0, 0.0], [0.0, 180.0, 90.0, 270.0])
    chair = render([CATALOGUE["a chair"]] * 2, {k: (v[:2] if torch.is_tensor(v) else v) for k, v in c.items()})
    # The chair faces +x: from the front (azimuth 0) its back is seen behind the seat, farther
    # than the rest of the chair; from behind (azimuth 180) it is the nearest part and covers more.
    f = chair["feature_mask"][..., 0] > 0
    rest = (chair["mask"][..., 0] > 0) & ~f
    depth = chair["depth"][..., 0]
    assert f[1].sum() > 1.3 * f[0].sum() > 0
    assert depth[0][f[0]].mean() > depth[0][rest[0]].mean() + 0.2
    assert depth[1][f[1]].mean() < depth[1][rest[1]].mean() - 0.2
    mug = render([CATALOGUE["a mug"]] * 2, {k: (v[2:] if torch.is_tensor(v) else v) for k, v in c.items()})
    h = mug["feature_mask"][..., 0].sum(dim=(1, 2))
    assert h[0] > 20 and h[1] == 0  # handle on +y: seen from azimuth 90, hidden from 270


def test_mixed_batch_equals_single_renders_and_float64():
    objs = [CATALOGUE["a red torus"], CATALOGUE["a mug"], CATALOGUE["a red torus"]]
    c = cams([30.0, 5.0, -10.0], [10.0, 100.0, 250.0], res=24)
    mixed = render(objs, c)
    for i, obj in enumerate(objs):
        single = render(obj, {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in c.items()})
        for k in mixed:
            assert torch.allclose(mixed[k][i], single[k][0])
    c64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in c.items()}
    out64 = render(objs, c64)
    assert out64["rgb"].dtype == torch.float64
    assert (out64["mask"] != mixed["mask"].double()).float().mean() < 0.01


def test_supersampling_gives_fractional_coverage_of_same_area():
    c = cams([0.0], [0.0], res=32)
    hard = render(CATALOGUE["a red sphere"], c)
    soft = render(CATALOGUE["a red sphere"], c, supersample=3)
    m = soft["mask"]
    assert ((m > 0) & (m < 1)).any() and m.min() >= 0 and m.max() <= 1
    assert soft["rgb"].shape == hard["rgb"].shape
    assert m.sum().item() == pytest.approx(hard["mask"].sum().item(), rel=0.05)


def test_wrong_object_count_is_an_error():
    with pytest.raises(ValueError, match="one per camera"):
        render([CATALOGUE["a mug"]] * 3, cams([0.0, 0.0], [0.0, 1.0], res=8))


# ---------------------------------------------------------------------------------------------
# Training data (lift3d.priors.toyworld.data)

from lift3d.priors.toyworld import data as tw_data  # noqa: E402
from lift3d.priors.toyworld.shapes import list_prompts  # noqa: E402
from lift3d.priors.toyworld.vocab import detokenize  # noqa: E402


def test_sample_cameras_distribution_and_determinism():
    e, a, d = tw_data.sample_cameras(20000, torch.Generator().manual_seed(0))
    e2, _, _ = tw_data.sample_cameras(20000, torch.Generator().manual_seed(0))
    assert torch.equal(e, e2)
    assert e.min() >= -10 and e.max() <= 60 and a.min() >= 0 and a.max() < 360 and d.min() >= 1.8 and d.max() <= 2.2
    assert e.mean().item() == pytest.approx(25.0, abs=1.0) and a.mean().item() == pytest.approx(180.0, abs=5.0)
    assert d.mean().item() == pytest.approx(2.0, abs=0.01)


def test_light_is_uniform_on_camera_upper_hemisphere():
    g = torch.Generator().manual_seed(0)
    e, a, d = tw_data.sample_cameras(20000, g)
    c = make_cameras(e, a, d, torch.full((20000,), 40.0), 1, 1)
    light = tw_data.light_in_upper_hemisphere(c, g)
    cos_up = (light * c["c2w"][:, :3, 1]).sum(-1)
    assert torch.allclose(light.norm(dim=-1), torch.ones(20000), atol=1e-5)
    assert (cos_up > 0).all()
    # Uniform on a hemisphere: cos to its pole is uniform on [0, 1].
    assert cos_up.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (cos_up < 0.25).float().mean().item() == pytest.approx(0.25, abs=0.015)


def test_camera_vector_normalisation():
    v = tw_data.camera_vector(torch.tensor([45.0, -10.0]), torch.tensor([90.0, 180.0]), torch.tensor([2.2, 1.8]))
    assert torch.allclose(v, torch.tensor([[0.5, 1.0, 0.0, 1.0], [-1 / 9, 0.0, -1.0, -1.0]]), atol=1e-6)


def test_dataset_is_deterministic_and_batch_size_independent():
    ds = tw_data.ToyWorldDataset(batch_size=4, seed=3, resolution=16)
    b0 = next(iter(ds))
    again = next(iter(tw_data.ToyWorldDataset(batch_size=4, seed=3, resolution=16)))
    for k in b0:
        assert torch.equal(b0[k], again[k])
    small = tw_data.ToyWorldDataset(batch_size=2, seed=3, resolution=16)
    it = iter(small)
    halves = [next(it), next(it)]
    assert torch.equal(torch.cat([h["image"] for h in halves]), b0["image"])
    other = next(iter(tw_data.ToyWorldDataset(batch_size=4, seed=4, resolution=16)))
    assert not torch.equal(other["camera"], b0["camera"])
    # Batch contents are consistent with each other.
    assert b0["image"].shape == (4, 3, 16, 16) and b0["image"].min() >= -1 and b0["image"].max() <= 1
    assert torch.all(b0["image"].permute(0, 2, 3, 1)[b0["mask"][:, 0] == 0] == -1.0)  # black background
    for i in range(4):
        assert detokenize(b0["tokens"][i]) == list_prompts()[int(b0["prompt_index"][i])]
    assert torch.allclose(b0["camera"], tw_data.camera_vector(b0["elevation"], b0["azimuth"], b0["distance"]))


def test_cached_dataset_matches_stream(tmp_path):
    ds = tw_data.ToyWorldDataset(batch_size=3, seed=5, resolution=12, num_samples=5, cache_dir=tmp_path,
                                 image_range="zero_one")
    batches = list(ds)
    assert len(batches) == len(ds) == 2 and batches[1]["image"].shape[0] == 2
    assert tw_data.cache_path(tmp_path, 5, 5, 12).is_file()
    stream = next(iter(tw_data.ToyWorldDataset(batch_size=5, seed=5, resolution=12, image_range="zero_one")))
    cached = list(tw_data.ToyWorldDataset(batch_size=5, seed=5, resolution=12, num_samples=5, cache_dir=tmp_path,
                                          image_range="zero_one"))[0]
    for k in stream:
        assert torch.equal(torch.cat([b[k] for b in batches]), stream[k])
        assert torch.equal(cached[k], stream[k])
    assert 0 <= stream["image"].min() and stream["image"].max() <= 1
    shuffled = tw_data.ToyWorldDataset(batch_size=5, seed=5, resolution=12, num_samples=5, cache_dir=tmp_path,
                                       shuffle=True, image_range="zero_one")
    sb = list(shuffled)[0]
    assert sorted(sb["prompt_index"].tolist()) == sorted(stream["prompt_index"].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_render_on_cuda_matches_cpu():
    objs = [CATALOGUE["a snowman"], CATALOGUE["a green cone"], CATALOGUE["a mug"]]
    c = cams([30.0, 5.0, -10.0], [10.0, 100.0, 250.0], res=32)
    light = torch.nn.functional.normalize(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.3, -0.4, 0.5]]), dim=-1)
    cpu = render(objs, c, light)
    gpu = render(objs, {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in c.items()}, light.cuda())
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        # Hits may flip on a handful of silhouette pixels from float rounding; values agree elsewhere.
        same = (cpu["mask"] == gpu["mask"].cpu())[..., 0]
        assert same.float().mean() > 0.995
        assert torch.allclose(cpu[k][same], gpu[k].cpu()[same], atol=1e-4)
