from __future__ import annotations

import pytest
import torch

from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, MissingWeightsError, ToyWorldPrior, sample
from lift3d.priors.toyworld.train import diffusion_loss, train
from lift3d.priors.toyworld.model import make_scheduler
from lift3d.priors.toyworld.vocab import VOCAB

TINY = {"vocab_size": len(VOCAB), "resolution": 16, "block_out_channels": [16, 32], "attention": False,
        "norm_num_groups": 8}


def _inputs(B=4, res=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, res, res, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    tokens = torch.tensor([[1, 7], [2, 8], [3, 9], [13, 0]])[:B]
    cam = torch.randn(B, 4, generator=g)
    return x, t, tokens, cam


def test_forward_keeps_image_shape_and_uses_text_and_camera():
    torch.manual_seed(0)
    m = ToyWorldPrior(TINY)
    for p in m.parameters():  # diffusers zero-initialises the output conv; wake everything up
        torch.nn.init.normal_(p, std=0.05)
    x, t, tok, cam = _inputs()
    out = m(x, t, tok, cam)
    assert out.shape == x.shape
    assert not torch.allclose(out, m(x, t, tok.flip(0), cam), atol=1e-6)
    assert not torch.allclose(out, m(x, t, tok, cam + 1.0), atol=1e-6)


def test_dropped_text_ignores_tokens():
    torch.manual_seed(0)
    m = ToyWorldPrior(TINY)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, tok, cam = _inputs()
    drop = torch.tensor([True, True, False, False])
    a = m(x, t, tok, cam, drop)
    b = m(x, t, tok.flip(0), cam, drop)
    torch.testing.assert_close(a[:2], b[:2])
    assert not torch.allclose(a[2:], b[2:], atol=1e-6)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(1)
    m = ToyWorldPrior(TINY)
    path = m.save(tmp_path / "w.safetensors", {"note": "hi"})
    m2 = ToyWorldPrior.load(path)
    assert m2.cfg == m.cfg and m2.metadata["note"] == "hi"
    x, t, tok, cam = _inputs()
    torch.testing.assert_close(m(x, t, tok, cam), m2(x, t, tok, cam))
    with pytest.raises(MissingWeightsError, match="python -m lift3d.priors.toyworld train"):
        ToyWorldPrior.load(tmp_path / "missing.safetensors")



def test_nhwc_layout_survives_load_and_computes_what_nchw_does(tmp_path):
    torch.manual_seed(2)
    m = ToyWorldPrior(TINY)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not m.unet.conv_in.weight.is_contiguous()  # really NHWC, not a 1x1 special case
    from safetensors.torch import load_file

    path = m.save(tmp_path / "w.safetensors")
    assert load_file(str(path))["unet.conv_in.weight"].is_contiguous()  # files stay plain NCHW
    m2 = ToyWorldPrior.load(path)
    assert m2.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    nchw = ToyWorldPrior(TINY).to(memory_format=torch.contiguous_format)
    nchw.load_state_dict(load_file(str(path)))
    assert nchw.unet.conv_in.weight.is_contiguous()
    x, t, tok, cam = _inputs()
    torch.testing.assert_close(m2(x, t, tok, cam), nchw(x, t, tok, cam), rtol=1e-4, atol=1e-5)

def _fixed_loss(model, batches):
    sched = make_scheduler(model.cfg)
    with torch.no_grad():
        return sum(float(diffusion_loss(model, sched, b, torch.Generator().manual_seed(i), None))
                   for i, b in enumerate(batches)) / len(batches)


def test_short_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    from lift3d.priors.toyworld.data import ToyWorldDataset

    base = {"steps": 60, "batch_size": 8, "num_samples": 64, "lr": 2e-3, "warmup_steps": 5, "sample_every": 0,
            "ckpt_every": 30, "cache_dir": str(tmp_path / "cache"), "model": TINY, "min_snr_gamma": None}
    ds = ToyWorldDataset(batch_size=8, seed=0, resolution=16, num_samples=64, cache_dir=str(tmp_path / "cache"))
    batches = [ds.batch(i) for i in range(4)]
    torch.manual_seed(0)
    init = ToyWorldPrior(TINY)
    before = _fixed_loss(init, batches)
    final = train({**base, "out_dir": str(tmp_path / "a")}, progress=False)
    after = _fixed_loss(ToyWorldPrior.load(final), batches)
    assert after < 0.7 * before, (before, after)
    # interrupted at 30 (its checkpoint), resumed to 60: same weights as the straight run
    partial = train({**base, "stop_after": 30, "out_dir": str(tmp_path / "b")}, progress=False)
    assert partial.name == "toyworld-step30.safetensors"
    resumed = train({**base, "out_dir": str(tmp_path / "b")}, progress=False)
    sa, sb = ToyWorldPrior.load(final).state_dict(), ToyWorldPrior.load(resumed).state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="toy-world weights not shipped yet (issue 4)")
def test_shipped_weights_load_and_sample():
    m = ToyWorldPrior.load()
    from lift3d.priors.toyworld.data import camera_vector
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize

    img = sample(m, pad_tokens([tokenize("a red cube")]), camera_vector(torch.tensor([20.0]), torch.tensor([0.0]),
                 torch.tensor([2.0])), steps=8, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert img.shape == (1, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    # the object is red and sits on a black background
    centre = img[0, :, 24:40, 24:40].mean(dim=(1, 2))
    assert centre[0] > centre[1] + 0.1 and float(img[0, :, :3, :3].max()) < 0.2


def test_shipped_weights_read_the_azimuth():
    # Version 1 scored -0.1..+0.3% here (blind to the azimuth, front check at chance); version 2
    # 7.5..14% on the snowman and chair but about 0 on the cube turned 45 degrees (its corners).
    from lift3d.priors.toyworld.evaluate import azimuth_use

    m = ToyWorldPrior.load().eval()
    assert azimuth_use(m, "a snowman", n=16, seed=0) > 0.03
    assert azimuth_use(m, "a chair", n=16, seed=0) > 0.03
    assert azimuth_use(m, "a red cube", n=16, seed=0, turn_deg=45.0) > 0.03


def test_ray_map_points_each_pixel_at_the_world():
    from lift3d.priors.toyworld.data import camera_from_vector, camera_vector, ray_map
    from lift3d.utils.cameras import camera_positions

    elev, azim, dist = torch.tensor([20.0, -5.0]), torch.tensor([30.0, -150.0]), torch.tensor([1.9, 2.2])
    cam = camera_vector(elev, azim, dist)
    for got, want in zip(camera_from_vector(cam), (elev, azim, dist)):
        torch.testing.assert_close(got, want)
    rays = ray_map(cam, resolution=16)
    d, m = rays[:, :3], rays[:, 3:]
    torch.testing.assert_close(d.norm(dim=1), torch.ones(2, 16, 16))
    # the centre rays look at the origin: their direction is minus the camera position, moment ~0
    centre = d[:, :, 7:9, 7:9].mean(dim=(2, 3))
    pos = camera_positions(elev, azim, dist)
    torch.testing.assert_close(centre, -pos / pos.norm(dim=-1, keepdim=True), atol=2e-3, rtol=0)
    assert m[:, :, 7:9, 7:9].abs().max() < 0.15 < m.abs().max()
    # the moment is the same for every point along the ray: o x d == (o + s d) x d
    o = pos[:, :, None, None].expand(-1, -1, 16, 16)
    torch.testing.assert_close(torch.cross(o + 0.7 * d, d, dim=1), m, atol=1e-5, rtol=0)


def test_ray_conditioned_model_starts_from_an_unconditioned_one(tmp_path):
    from lift3d.priors.toyworld.train import init_weights

    torch.manual_seed(0)
    plain = ToyWorldPrior(TINY)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = plain.save(tmp_path / "plain.safetensors")
    rays = ToyWorldPrior({**TINY, "ray_conditioning": True})
    init_weights(rays, str(path))
    x, t, tok, cam = _inputs()
    torch.testing.assert_close(rays(x, t, tok, cam), plain(x, t, tok, cam))  # zero-initialised new channels
    with torch.no_grad():
        rays.unet.conv_in.weight[:, 12:].normal_(std=0.05)
    out = rays(x, t, tok, cam)
    assert not torch.allclose(out, plain(x, t, tok, cam), atol=1e-4)
    # the ray channels carry the view on their own: with the camera MLP silenced, a camera turned
    # by 90 degrees still changes the output
    with torch.no_grad():
        rays.camera_mlp[-1].weight.zero_()
        rays.camera_mlp[-1].bias.zero_()
    out = rays(x, t, tok, cam)
    turned = cam.clone()
    turned[:, 1], turned[:, 2] = cam[:, 2], -cam[:, 1]
    assert not torch.allclose(out, rays(x, t, tok, turned), atol=1e-4)
    wrong = ToyWorldPrior({**TINY, "block_out_channels": [16, 16]})
    with pytest.raises(ValueError, match="has shape"):
        init_weights(wrong, str(path))


def test_focus_prompts_fill_their_share_of_each_batch(tmp_path):
    from lift3d.priors.toyworld.data import ToyWorldDataset
    from lift3d.priors.toyworld.shapes import list_prompts
    from lift3d.priors.toyworld.train import TrainConfig, focus_pool, with_focus

    ds = ToyWorldDataset(batch_size=8, seed=0, resolution=8, num_samples=96, cache_dir=str(tmp_path))
    cfg = TrainConfig(focus_prompts=["a snowman", "a chair"], focus_fraction=0.5, num_samples=96)
    pool = focus_pool(cfg, ds)
    wanted = {list_prompts().index("a snowman"), list_prompts().index("a chair")}
    assert len(pool) > 0 and set(ds._finite_data()["prompt_index"][pool].tolist()) <= wanted
    plain = ds.batch(0)
    a, b = with_focus(plain, ds, pool, cfg, step=3), with_focus(plain, ds, pool, cfg, step=3)
    assert set(a["prompt_index"][4:].tolist()) <= wanted
    torch.testing.assert_close(a["prompt_index"][:4], plain["prompt_index"][:4])
    torch.testing.assert_close(a["image"], b["image"])  # the draw is the step's: resumable
    assert focus_pool(TrainConfig(), ds) is None
    with pytest.raises(ValueError, match="not toy-world prompts"):
        focus_pool(TrainConfig(focus_prompts=["a red snowman"], focus_fraction=0.5), ds)


def test_random_backgrounds_recolour_only_the_background(tmp_path):
    from lift3d.priors.toyworld.data import ToyWorldDataset
    from lift3d.priors.toyworld.train import random_backgrounds

    ds = ToyWorldDataset(batch_size=8, seed=0, resolution=16, num_samples=8, cache_dir=str(tmp_path))
    batch = ds.batch(0)
    img, mask = batch["image"], batch["mask"]
    out = random_backgrounds(img, mask, 1.0, torch.Generator().manual_seed(0))
    obj, bg = mask.expand_as(img) > 0.5, mask.expand_as(img) < 0.5
    assert obj.any() and bg.any()
    torch.testing.assert_close(out[obj], img[obj])  # the object's pixels are untouched
    assert (img[bg] == -1.0).all()  # the renders are over black...
    per_image = [out[i][bg[i]].reshape(3, -1) for i in range(8)]
    for p in per_image:  # ...and now each over one colour of its own
        assert (p - p[:, :1]).abs().max() < 1e-6
    colours = torch.stack([p[:, 0] for p in per_image])
    assert colours.std(0).min() > 0.1
    again = random_backgrounds(img, mask, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, out)  # drawn from the step's generator: resumable
    kept = random_backgrounds(img, mask, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, img)
    half = random_backgrounds(img, mask, 0.5, torch.Generator().manual_seed(1))
    n_changed = sum(not torch.equal(half[i], img[i]) for i in range(8))
    assert 0 < n_changed < 8



def test_feature_regions_cover_the_feature_and_its_janus_twin():
    from lift3d.priors.toyworld.data import feature_regions
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import CATALOGUE, list_prompts
    from lift3d.utils.cameras import make_cameras

    P = list_prompts()
    params = {"prompt_index": torch.tensor([P.index("a snowman"), P.index("a red cube"), P.index("a snowman")]),
              "elevation": torch.tensor([10.0, 10.0, 10.0]), "azimuth": torch.tensor([0.0, 0.0, 90.0]),
              "distance": torch.tensor([2.0, 2.0, 2.0])}
    region = feature_regions(params, resolution=32) > 0
    assert region[1].sum() == 0  # a primitive has no front feature
    front = make_cameras(params["elevation"], params["azimuth"], params["distance"], torch.full((3,), 40.0), 32, 32)
    nose = render(CATALOGUE["a snowman"], front)["feature_mask"][..., 0] > 0.5
    assert nose[0].sum() >= 3 and (region[0] >= nose[0]).all()  # the nose seen from the front...
    assert nose[2].sum() >= 3 and (region[2] >= nose[2]).all()  # ...and from the side (image left)
    # From the side the twin's nose points the other way: the region holds both, left and right of centre.
    cols = region[2].nonzero(as_tuple=True)[1].float()
    assert cols.min() < 15.5 - 3 and cols.max() > 15.5 + 3
    assert region[2].sum() > nose[2].sum()


def test_feature_weight_scales_the_loss_on_the_feature_region():
    from lift3d.priors.toyworld.train import diffusion_loss

    model = ToyWorldPrior(TINY)
    sched = make_scheduler(model.cfg)
    x, _, tokens, cam = _inputs()
    batch = {"image": x.clamp(-1, 1), "tokens": tokens, "camera": cam, "feature_region": torch.zeros(4, 1, 16, 16)}
    loss = lambda b, w: diffusion_loss(model, sched, b, torch.Generator().manual_seed(0), 5.0,  # noqa: E731
                                       feature_weight=w)
    plain = loss(batch, 0.0)
    torch.testing.assert_close(loss(batch, 10.0), plain)  # no feature pixel: no change
    everywhere = {**batch, "feature_region": torch.ones(4, 1, 16, 16)}
    torch.testing.assert_close(loss(everywhere, 10.0), 11.0 * plain)
    half = {**batch, "feature_region": torch.zeros(4, 1, 16, 16)}
    half["feature_region"][..., :8] = 1.0
    assert plain < loss(half, 10.0) < 11.0 * plain
    with pytest.raises(ValueError, match="feature_region"):
        loss({k: v for k, v in batch.items() if k != "feature_region"}, 10.0)


def test_feature_weighted_training_data_carries_cached_regions(tmp_path):
    from lift3d.priors.toyworld.train import TrainConfig, build_dataset

    cfg = TrainConfig(feature_weight=10.0, num_samples=64, batch_size=64, cache_dir=str(tmp_path))
    batch = build_dataset(cfg, 16).batch(0)
    assert batch["feature_region"].shape == (64, 1, 16, 16)
    has = batch["feature_region"].flatten(1).amax(1) > 0
    assert has.any() and not has.all()
    assert len(list(tmp_path.glob("*_features.npz"))) == 1
    again = build_dataset(cfg, 16).batch(0)  # read back from the cache
    torch.testing.assert_close(again["feature_region"], batch["feature_region"])
    assert "feature_region" not in build_dataset(TrainConfig(num_samples=64, batch_size=64,
                                                             cache_dir=str(tmp_path)), 16).batch(0)


def test_azimuth_use_is_zero_for_a_camera_blind_model():
    from lift3d.priors.toyworld.evaluate import azimuth_use

    torch.manual_seed(0)
    model = ToyWorldPrior(TINY).eval()
    with torch.no_grad():  # a freshly built UNet zeroes its output conv: give it one that responds
        for p in model.unet.conv_out.parameters():
            p.normal_(0, 0.1)
    seeing = azimuth_use(model, "a snowman", n=4, seed=1)
    assert abs(seeing) > 1e-4
    assert azimuth_use(model, "a snowman", n=4, seed=1) == seeing  # deterministic for a seed
    with torch.no_grad():
        model.camera_mlp[2].weight.zero_()
        model.camera_mlp[2].bias.zero_()
    assert azimuth_use(model, "a snowman", n=4, seed=1) == pytest.approx(0.0, abs=1e-6)


def test_corner_regions_mark_where_a_cube_and_its_45_degree_turn_differ():
    from lift3d.priors.toyworld.data import corner_regions
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import CATALOGUE, list_prompts
    from lift3d.utils.cameras import make_cameras

    P = list_prompts()
    names = ["a red cube", "a red cube", "a blue cube", "a snowman", "a green sphere"]
    n = len(names)
    params = {"prompt_index": torch.tensor([P.index(p) for p in names]),
              "elevation": torch.full((n,), 10.0), "azimuth": torch.tensor([0.0, 45.0, 90.0, 0.0, 0.0]),
              "distance": torch.full((n,), 2.0)}
    region = corner_regions(params, resolution=32) > 0
    assert region[3].sum() == 0 and region[4].sum() == 0  # only the cubes have corners to place
    # Face-on (0 degrees), corner-on (45) and face-on again (90): the same pair of silhouettes each time.
    assert region[0].sum() > 20
    torch.testing.assert_close(region[0], region[1])
    torch.testing.assert_close(region[0], region[2])
    cams = make_cameras(params["elevation"][:1], params["azimuth"][:1], params["distance"][:1],
                        torch.full((1,), 40.0), 32, 32)
    face_on = render(CATALOGUE["a red cube"], cams)["mask"][0, ..., 0] > 0.5
    # Seen face-on, the region is mostly what the turned cube adds: its corners, left and right.
    assert (region[0] & face_on).sum() < 0.25 * region[0].sum()
    cols = region[0].nonzero(as_tuple=True)[1].float()
    assert cols.min() < 8 and cols.max() > 23


def test_corner_weight_adds_to_the_feature_weight():
    from lift3d.priors.toyworld.train import diffusion_loss

    model = ToyWorldPrior(TINY)
    sched = make_scheduler(model.cfg)
    x, _, tokens, cam = _inputs()
    zeros = torch.zeros(4, 1, 16, 16)
    batch = {"image": x.clamp(-1, 1), "tokens": tokens, "camera": cam, "feature_region": zeros,
             "corner_region": torch.ones(4, 1, 16, 16)}
    loss = lambda b, fw, cw: diffusion_loss(model, sched, b, torch.Generator().manual_seed(0), 5.0,  # noqa: E731
                                            feature_weight=fw, corner_weight=cw)
    plain = loss(batch, 0.0, 0.0)
    torch.testing.assert_close(loss(batch, 10.0, 0.0), plain)
    torch.testing.assert_close(loss(batch, 10.0, 3.0), 4.0 * plain)
    both = {**batch, "feature_region": torch.ones(4, 1, 16, 16)}
    torch.testing.assert_close(loss(both, 10.0, 3.0), 14.0 * plain)
    with pytest.raises(ValueError, match="corner_region"):
        loss({k: v for k, v in batch.items() if k != "corner_region"}, 0.0, 3.0)


def test_region_weights_decay_linearly_to_their_final_share(tmp_path):
    from lift3d.priors.toyworld.train import TrainConfig, build_dataset, region_scale

    cfg = TrainConfig(steps=101, region_weight_final=0.25)
    assert region_scale(cfg, 0) == 1.0
    assert region_scale(cfg, 50) == pytest.approx(0.625)
    assert region_scale(cfg, 100) == pytest.approx(0.25)
    assert region_scale(TrainConfig(steps=101), 100) == 1.0  # the default keeps the weights constant
    data = TrainConfig(corner_weight=3.0, num_samples=64, batch_size=64, cache_dir=str(tmp_path))
    batch = build_dataset(data, 16).batch(0)
    assert "feature_region" not in batch and batch["corner_region"].shape == (64, 1, 16, 16)
    from lift3d.priors.toyworld.shapes import list_prompts

    is_cube = torch.tensor(["cube" in list_prompts()[int(k)] for k in batch["prompt_index"]])
    has = batch["corner_region"].flatten(1).amax(1) > 0
    assert is_cube.any() and torch.equal(has, is_cube)
    assert len(list(tmp_path.glob("*_corners.npz"))) == 1


def test_camera_harmonics_give_the_mlp_the_cube_symmetry(tmp_path):
    m1 = ToyWorldPrior(TINY)
    cam = torch.tensor([[0.2, 0.0, 1.0, 0.0], [0.2, 1.0, 0.0, 0.0]])  # azimuth 0 and 90
    assert torch.equal(m1.camera_features(cam), cam)  # version 2's model: the vector as it is
    m4 = ToyWorldPrior({**TINY, "camera_harmonics": 4})
    f = m4.camera_features(cam)
    assert f.shape == (2, 10)
    # sin 2a, sin 3a, sin 4a, cos 2a, cos 3a, cos 4a at 0 and 90 degrees
    torch.testing.assert_close(f[:, 4:], torch.tensor([[0.0, 0, 0, 1, 1, 1], [0, -1, 0, -1, 0, 1]]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(f[0, [6, 9]], f[1, [6, 9]], atol=1e-6, rtol=0)  # sin 4a and cos 4a
    assert not torch.allclose(f[0, 4:], f[1, 4:])
    m4.save(tmp_path / "h.safetensors")
    assert ToyWorldPrior.load(tmp_path / "h.safetensors").cfg.camera_harmonics == 4
    with pytest.raises(ValueError, match="camera_harmonics"):
        ToyWorldPrior({**TINY, "camera_harmonics": 0})


def test_corner_check_tells_a_cube_from_the_cube_turned_45_degrees():
    from lift3d.priors.toyworld.evaluate import PromptScore, format_table, score_samples
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import CATALOGUE
    from lift3d.utils.cameras import make_cameras

    def at(az):
        cams = make_cameras(torch.full((2,), 15.0), torch.tensor([az, az + 30.0]), torch.full((2,), 2.0),
                            torch.full((2,), 40.0), 32, 32)
        return render(CATALOGUE["a red cube"], cams, None)

    gt, twin = at(0.0), at(45.0)
    right = score_samples(gt["rgb"], gt, twin, region="silhouette")
    wrong = score_samples(twin["rgb"], gt, twin, region="silhouette")
    assert right["front_counted"].all() and right["front_correct"].all()
    assert wrong["front_counted"].all() and not wrong["front_correct"].any()
    with pytest.raises(ValueError, match="silhouette"):
        score_samples(gt["rgb"], gt, twin, region="edges")
    table = format_table([PromptScore("a snowman", 0.8, 0.1, 3, 4, 0.1, "front"),
                          PromptScore("a red cube", 0.9, 0.1, 1, 4, 0.0, "corner")])
    assert "front check 3/4 = 75%" in table and "corner check (cubes) 1/4 = 25%" in table


def test_pull_from_x0_is_positive_for_the_target_shape_and_negative_for_the_source():
    from lift3d.priors.toyworld.evaluate import pull_from_x0
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import CATALOGUE
    from lift3d.utils.cameras import make_cameras

    cams = make_cameras(torch.full((2,), 20.0), torch.tensor([0.0, 90.0]), torch.full((2,), 2.0),
                        torch.full((2,), 40.0), 32, 32)
    cone, sphere = (render(CATALOGUE[p], cams, None) for p in ("a red cone", "a red sphere"))
    masks = [r["mask"][..., 0] > 0.5 for r in (cone, sphere)]
    gap = 1 - float(((masks[0] & masks[1]).sum((1, 2)).float() / (masks[0] | masks[1]).sum((1, 2))).mean())
    assert gap > 0.2
    as_x0 = [r["rgb"].permute(0, 3, 1, 2) * 2 - 1 for r in (cone, sphere)]
    assert pull_from_x0(as_x0[0], masks[0], masks[1]) == pytest.approx(gap, abs=1e-6)
    assert pull_from_x0(as_x0[1], masks[0], masks[1]) == pytest.approx(-gap, abs=1e-6)
    assert pull_from_x0(-torch.ones_like(as_x0[0]), masks[0], masks[1]) == 0.0  # an empty prediction
    from lift3d.priors.toyworld.evaluate import PromptScore, format_table

    table = format_table([PromptScore("a red cone", 0.8, 0.1, 0, 0, shape_pull=-0.1),
                          PromptScore("a red cube", 0.9, 0.1, 1, 4, 0.0, "corner", shape_pull=0.5)])
    assert "mean +0.200, lowest -0.100" in table and "-0.10" in table.splitlines()[1]


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights not present")
def test_shape_pull_of_shipped_weights_follows_the_image_at_low_noise_and_the_prompt_at_high():
    from lift3d.priors.toyworld.evaluate import shape_pull

    m = ToyWorldPrior.load().eval()
    low, high = shape_pull(m, "a yellow cube", t=300, n=4), shape_pull(m, "a yellow cube", t=900, n=4)
    assert low < -0.1  # barely noised: the denoised image is still the other shape
    assert high > 0.1 and high > low + 0.25  # mostly noise: the prompt decides the shape
    assert shape_pull(m, "a yellow cube", t=900, n=4) == high  # deterministic for a seed
    with pytest.raises(ValueError, match="not a primitive"):
        shape_pull(m, "a snowman")


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="shipped weights not present")
def test_guided_samples_of_shipped_weights_stay_on_the_object():
    # Each DDIM step clips the guided clean estimate; the noise it re-adds must be re-derived from
    # the clipped image. With the unclipped noise, guided sampling drifted into texture (these four
    # snowmen: mask IoU 0.18 at guidance 5; 0.83 with the re-derived noise).
    from lift3d.priors.toyworld.data import FOVY, RESOLUTION, camera_vector
    from lift3d.priors.toyworld.evaluate import score_samples
    from lift3d.priors.toyworld.render import render
    from lift3d.priors.toyworld.shapes import get_object
    from lift3d.priors.toyworld.vocab import pad_tokens, tokenize
    from lift3d.utils.cameras import make_cameras

    m = ToyWorldPrior.load().eval()
    elev, azim, dist = torch.tensor([10.0, 30.0, 20.0, 45.0]), torch.tensor([0.0, 70.0, 200.0, 300.0]), torch.full((4,), 2.0)
    cams = make_cameras(elev, azim, dist, torch.full((4,), FOVY), RESOLUTION, RESOLUTION)
    gt = render(get_object("a snowman"), cams, torch.tensor([[0.0, 0.0, 1.0]]).expand(4, 3))
    img = sample(m, pad_tokens([tokenize("a snowman")] * 4), camera_vector(elev, azim, dist), steps=20,
                 guidance_scale=5.0, generator=torch.Generator().manual_seed(0))
    iou = score_samples(img.permute(0, 2, 3, 1), gt)["iou"]
    assert float(iou.mean()) > 0.6, iou


def test_bf16_autocast_loss_tracks_float32_and_keeps_float32_gradients():
    torch.manual_seed(0)
    model = ToyWorldPrior(TINY)
    sched = make_scheduler(model.cfg)
    x, _, tokens, cam = _inputs()
    batch = {"image": x.clamp(-1, 1), "tokens": tokens, "camera": cam}

    def loss_and_grad(autocast):
        model.zero_grad(set_to_none=True)
        loss = diffusion_loss(model, sched, batch, torch.Generator().manual_seed(0), 5.0, autocast=autocast)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    l32, g32 = loss_and_grad(None)
    l16, g16 = loss_and_grad("bf16")
    assert l16.dtype == torch.float32 and g16.dtype == torch.float32
    assert l16 != l32  # the forward pass really ran in bfloat16 ...
    assert abs(l16 / l32 - 1) < 0.03, (l32, l16)  # ... and computes nearly the same loss
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.98
    with pytest.raises(ValueError, match="train.autocast.*'fp16'"):
        diffusion_loss(model, sched, batch, torch.Generator().manual_seed(0), 5.0, autocast="fp16")


def test_bf16_autocast_training_lowers_the_loss(tmp_path):
    from lift3d.priors.toyworld.data import ToyWorldDataset

    ds = ToyWorldDataset(batch_size=8, seed=0, resolution=16, num_samples=64, cache_dir=str(tmp_path / "cache"))
    batches = [ds.batch(i) for i in range(4)]
    torch.manual_seed(0)
    before = _fixed_loss(ToyWorldPrior(TINY), batches)
    final = train({"steps": 60, "batch_size": 8, "num_samples": 64, "lr": 2e-3, "warmup_steps": 5,
                   "sample_every": 0, "cache_dir": str(tmp_path / "cache"), "model": TINY, "min_snr_gamma": None,
                   "autocast": "bf16", "out_dir": str(tmp_path / "a")}, progress=False)
    after = _fixed_loss(ToyWorldPrior.load(final), batches)
    assert after < 0.7 * before, (before, after)
    with pytest.raises(ValueError, match="train.autocast"):
        train({"steps": 1, "autocast": "half", "out_dir": str(tmp_path / "b")}, progress=False)


_SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
_ZEN3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
_ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_bf16_hardware_is_read_off_the_cpu_flags():
    from lift3d.priors.toyworld.train import autocast_note, cpu_has_native_bf16

    assert cpu_has_native_bf16(_SAPPHIRE) is True
    assert cpu_has_native_bf16(_SAPPHIRE.replace(" amx_bf16", "")) is True  # AVX512-BF16 alone
    assert cpu_has_native_bf16(_ZEN3) is False
    assert cpu_has_native_bf16(_ARM) is True
    assert cpu_has_native_bf16(_ARM.replace(" bf16", "")) is False
    assert cpu_has_native_bf16("") is None
    # the note: only for bf16, only on a CPU known to lack the hardware, and it names the way out
    note = autocast_note("bf16", "cpu", _ZEN3)
    assert note is not None and "autocast=null" in note
    assert autocast_note("bf16", "cpu", _SAPPHIRE) is None
    assert autocast_note(None, "cpu", _ZEN3) is None
    assert autocast_note("bf16", "cpu", "") is None
    assert autocast_note("bf16", "cuda", _ZEN3) is None
    with pytest.raises(ValueError, match="train.autocast"):
        autocast_note("fp16", "cpu", _SAPPHIRE)
