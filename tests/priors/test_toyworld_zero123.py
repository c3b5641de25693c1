"""The toy Zero123 (image-conditioned toy prior): start from the shipped prior, cameras, pair data, fine-tuning."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch

from lift3d.config import ConfigError, parse_structured
from lift3d.priors.toyworld.data import camera_vector
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, ToyWorldPrior, make_scheduler
from lift3d.priors.toyworld.vocab import VOCAB
from lift3d.priors.toyworld.zero123 import (Z123_META_KEY, PairDataset, ToyZero123, Zero123TrainConfig, initial_model,
                                            input_camera, load_z123_recipe, pair_loss, relative_camera,
                                            sample_novel_views, sample_pair_params, split_pairs, train_zero123)

_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_toyworld_zero123.py"))
TINY_ARCH = {"vocab_size": len(VOCAB), **_TINY["TINY_Z123_PRIOR"]}
make_tiny_zero123 = _TINY["make_tiny_zero123"]


def _inputs(B, res=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, res, res, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    image = torch.rand(B, 3, res, res, generator=g) * 2 - 1
    cam = camera_vector(torch.rand(B, generator=g) * 60, torch.rand(B, generator=g) * 360, torch.full((B,), 2.0))
    icam = input_camera(torch.rand(B, generator=g) * 60, torch.full((B,), 2.0))
    return x, t, image, cam, icam


def test_relative_camera_measures_azimuth_from_the_input_view():
    el, az, d = torch.tensor([20.0, 20.0]), torch.tensor([30.0, 390.0]), torch.tensor([2.0, 2.0])
    same = relative_camera(el, az, d, torch.tensor([30.0, 30.0]))
    assert torch.allclose(same, camera_vector(el, torch.zeros(2), d), atol=1e-6)  # the input's own view: azimuth 0
    turned = relative_camera(torch.tensor([0.0]), torch.tensor([120.0]), torch.tensor([2.0]), torch.tensor([30.0]))
    assert torch.allclose(turned[0, 1:3], torch.tensor([1.0, 0.0]), atol=1e-6)  # 90 degrees on: sin 1, cos 0
    assert torch.allclose(input_camera(torch.tensor([45.0]), torch.tensor([2.2])), torch.tensor([[0.5, 1.0]]))


def test_the_start_is_the_shipped_prior_with_its_text_dropped():
    model = ToyZero123.from_single_view().eval()
    src = ToyWorldPrior.load(DEFAULT_WEIGHTS).eval()
    x, t, image, cam, icam = _inputs(2, res=64)
    with torch.no_grad():
        a = model(x, t, image, cam, icam)
        b = src(x, t, torch.zeros(2, 4, dtype=torch.long), cam, torch.ones(2, dtype=torch.bool))
    assert torch.equal(a, b)


def test_the_input_view_and_its_drop_reach_the_output():
    model = make_tiny_zero123().eval()
    x, t, image, cam, icam = _inputs(2)
    with torch.no_grad():
        a = model(x, t, image, cam, icam)
        other = model(x, t, -image, cam, icam)
        dropped = model(x, t, image, cam, icam, torch.tensor([True, False]))
        zeros = model(x, t, torch.zeros_like(image), cam, icam)
        moved_input_cam = model(x, t, image, cam, icam + 0.5)
    assert (a - other).abs().amax() > 1e-3  # the pixels matter
    assert (a - moved_input_cam).abs().amax() > 1e-6  # the input view's camera matters (small weights: a small effect)
    # a dropped row sees neither the pixels nor the embedding: zeros as the image, no embedding
    null = model.text_proj(model.null_text)[None] + model.camera_mlp(model.camera_features(cam[:1]))
    with torch.no_grad():
        expected = model.denoise(x[:1], t[:1], null, cam[:1], extra=torch.zeros_like(image[:1]))
    assert torch.allclose(dropped[0], expected[0], atol=1e-6)
    assert torch.allclose(dropped[1], a[1], atol=1e-6)
    assert not torch.allclose(dropped[0], zeros[0], atol=1e-4)  # zero pixels alone still leave the embedding


def test_save_load_round_trip_and_refusals(tmp_path):
    model = make_tiny_zero123()
    path = model.save(tmp_path / "z.safetensors")
    back = ToyZero123.load(path)
    assert back.z_cfg == model.z_cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    single = ToyWorldPrior(TINY_ARCH).save(tmp_path / "single.safetensors")
    with pytest.raises(ValueError, match=Z123_META_KEY):
        ToyZero123.load(single)
    with pytest.raises(FileNotFoundError, match="train-zero123"):
        ToyZero123.load(tmp_path / "absent.safetensors")


def test_pair_groups_are_one_object_an_input_and_independent_targets():
    p = sample_pair_params(0, range(6), n_targets=4, input_headlight=1.0)
    assert p["prompt_index"].shape == (30,)
    groups = p["prompt_index"].view(6, 5)
    assert (groups == groups[:, :1]).all()
    # the input lit from its camera (input_headlight=1)
    from lift3d.utils.cameras import make_cameras

    cams = make_cameras(p["elevation"], p["azimuth"], p["distance"], torch.full((30,), 40.0), 1, 1)
    to_cam = torch.nn.functional.normalize(cams["camera_positions"], dim=-1)
    cos = (p["light_dirs"] * to_cam).sum(-1).view(6, 5)
    assert torch.allclose(cos[:, 0], torch.ones(6), atol=1e-5)
    assert (cos[:, 1:] < 0.999).all()
    # targets do not share the input's camera; group i depends on (seed, i) only
    assert (p["azimuth"].view(6, 5)[:, 1:] != p["azimuth"].view(6, 5)[:, :1]).all()
    again = sample_pair_params(0, [3], n_targets=4, input_headlight=1.0)
    assert torch.equal(again["azimuth"], p["azimuth"][15:20])


def test_split_pairs_gives_each_target_its_group_input():
    B = 10
    batch = {"image": torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, 4, 4),
             "elevation": torch.arange(B, dtype=torch.float32), "azimuth": torch.arange(B, dtype=torch.float32) * 10,
             "distance": torch.full((B,), 2.0)}
    p = split_pairs(batch, 4)
    assert p["target"][:, 0, 0, 0].tolist() == [1, 2, 3, 4, 6, 7, 8, 9]
    assert p["image"][:, 0, 0, 0].tolist() == [0, 0, 0, 0, 5, 5, 5, 5]
    expected = relative_camera(torch.tensor([1.0, 6.0]), torch.tensor([10.0, 60.0]), torch.full((2,), 2.0),
                               torch.tensor([0.0, 50.0]))
    assert torch.allclose(p["camera"][[0, 4]], expected)
    with pytest.raises(ValueError, match="whole groups"):
        split_pairs({k: v[:9] for k, v in batch.items()}, 4)


def test_the_loss_depends_on_the_input_view(tmp_path):
    model = make_tiny_zero123()
    ds = PairDataset(2, 0, 2, 4, 16, tmp_path / "cache")
    batch = ds.batch(0)
    sched = make_scheduler(model.cfg)
    a = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4)
    b = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4)
    assert torch.equal(a, b)
    swapped = dict(batch)
    img = batch["image"].clone()
    img[[0, 5]] = img[[5, 0]]  # each group gets the other object's input view
    swapped["image"] = img
    c = pair_loss(model, sched, swapped, torch.Generator().manual_seed(0), 4)
    assert not torch.equal(a, c)


def test_tiny_fine_tune_lowers_the_loss_and_resumes_exactly(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = ToyWorldPrior(TINY_ARCH).save(tmp_path / "single.safetensors")
    base = {"init_from": str(init), "steps": 40, "groups_per_batch": 2, "num_groups": 8, "lr": 2e-3,
            "warmup_steps": 5, "ckpt_every": 20, "log_every": 10, "cache_dir": str(tmp_path / "cache"),
            "model": {}, "new_lr_scale": 10.0}
    ds = PairDataset(2, 0, 8, 4, 16, str(tmp_path / "cache"))
    batches = [ds.batch(i) for i in range(4)]

    def fixed_loss(m):
        sched = make_scheduler(m.cfg)
        with torch.no_grad():
            return sum(float(pair_loss(m, sched, b, torch.Generator().manual_seed(i), 4)) for i, b in enumerate(batches))

    before = fixed_loss(ToyZero123.from_single_view(init))
    final = train_zero123({**base, "out_dir": str(tmp_path / "a")}, progress=False)
    assert final.name == "toyworld-zero123.safetensors"
    after = fixed_loss(ToyZero123.load(final))
    assert after < 0.8 * before, (before, after)
    partial = train_zero123({**base, "stop_after": 20, "out_dir": str(tmp_path / "b")}, progress=False)
    assert partial.name == "toyworld-zero123-step20.safetensors"
    resumed = train_zero123({**base, "out_dir": str(tmp_path / "b")}, progress=False)
    sa, sb = ToyZero123.load(final).state_dict(), ToyZero123.load(resumed).state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert initial_model(parse_structured(Zero123TrainConfig, {**base, "init_from": str(final)})).z_cfg is not None
    # the new layers learned at ten times the rate of the prior's own
    groups = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])
    model = ToyZero123.from_single_view(init)
    new = {id(p) for p in model.new_parameters()}
    assert id(model.unet.conv_in.view.weight) in new and id(model.unet.conv_in.base.weight) not in new
    assert sum(len(g["params"]) for g in model.lr_groups(base)) == len(list(model.parameters()))


def test_sampling_is_seeded_and_follows_the_input_view():
    model = make_tiny_zero123().eval()
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    cams = [torch.tensor([10.0, 10.0]), torch.tensor([30.0, 30.0]), torch.tensor([2.0, 2.0]),
            torch.tensor([20.0, 20.0]), torch.tensor([120.0, 200.0]), torch.tensor([2.0, 2.0])]
    a = sample_novel_views(model, image, *cams, steps=3, generator=torch.Generator().manual_seed(0))
    b = sample_novel_views(model, image, *cams, steps=3, generator=torch.Generator().manual_seed(0))
    c = sample_novel_views(model, 1 - image, *cams, steps=3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) <= 1
    assert not torch.allclose(a, c, atol=1e-4)


def test_packaged_recipe_fine_tunes_the_shipped_prior_and_bad_keys_fail():
    cfg = parse_structured(Zero123TrainConfig, load_z123_recipe())
    assert cfg.init_from == "shipped" and cfg.n_targets >= 1
    assert not Path(cfg.out_dir).is_absolute() and cfg.out_dir.startswith("outputs/")
    with pytest.raises(ConfigError, match="architecture is the file's"):
        initial_model(parse_structured(Zero123TrainConfig, {"model": {"attention": True}}))
    with pytest.raises(ConfigError, match="not toy-world prompts"):
        train_zero123({"focus_prompts": ["a teapot"], "out_dir": "/nonexistent/x"}, progress=False)


def test_the_alignment_term_pulls_the_image_embedding_to_the_prompts_text_embedding(tmp_path):
    model = make_tiny_zero123()
    ds = PairDataset(2, 0, 2, 4, 16, tmp_path / "cache")
    batch = ds.batch(0)
    sched = make_scheduler(model.cfg)
    plain = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4)
    aligned = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4, align_weight=2.0)
    first = torch.tensor([0, 5])
    with torch.no_grad():
        text = model.text_embedding(batch["tokens"][first]) - model.text_proj(model.null_text)[None]
        emb = model.image_embedding(batch["image"][first],
                                    input_camera(batch["elevation"][first], batch["distance"][first]))
    assert torch.allclose(aligned - plain, 2.0 * torch.nn.functional.mse_loss(emb, text), rtol=1e-5)


def test_a_flattened_encoder_keeps_where_the_features_are():
    from lift3d.priors.toyworld.zero123 import Zero123TwinConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ToyZero123(TINY_ARCH, {"encoder_channels": [8, 16], "encoder_pool": "flatten"})
        torch.nn.init.normal_(model.image_proj[-1].weight, std=0.1)
    assert model.image_proj[0].in_features == 16 * 4 * 4 + 2
    img = torch.zeros(1, 3, 16, 16)
    img[..., :, :4] = 1.0  # a bright bar on the left
    icam = torch.zeros(1, 2)
    left, right = model.image_embedding(img, icam), model.image_embedding(img.flip(-1), icam)
    assert (left - right).abs().amax() > 1e-4  # mirrored input, other embedding
    with pytest.raises(ConfigError):
        ToyZero123(TINY_ARCH, {"encoder_pool": "max"})
    assert Zero123TwinConfig().encoder_pool == "mean"


def test_object_frame_camera_turns_the_relative_azimuth_by_the_estimated_pose():
    from lift3d.priors.toyworld.zero123 import object_frame_camera

    el, d = torch.tensor([20.0, 5.0]), torch.tensor([2.0, 1.9])
    rel = camera_vector(el, torch.tensor([90.0, -30.0]), d)
    pose = torch.tensor([[1.0, 0.0], [-3.0, 3.0]])  # input at 90 degrees; at -45 (unnormalised)
    out = object_frame_camera(rel, pose)
    assert torch.allclose(out, camera_vector(el, torch.tensor([180.0, -75.0]), d), atol=1e-5)


def test_a_pose_head_starts_at_the_front_and_its_loss_supervises_the_input_azimuth(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ToyZero123(TINY_ARCH, {"encoder_channels": [8, 16], "pose_head": True})
        plain = ToyZero123(TINY_ARCH, {"encoder_channels": [8, 16]})
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("pose_head.")})
    x, t, image, cam, icam = _inputs(2)
    with torch.no_grad():  # at the start the input is taken as the front view: the model without a head
        assert torch.equal(model(x, t, image, cam, icam), plain(x, t, image, cam, icam))
        model.pose_head[-1].bias.copy_(torch.tensor([1.0, 0.0]))  # now: the input seen from azimuth 90
        turned = model(x, t, image, cam, icam)
        from lift3d.priors.toyworld.zero123 import object_frame_camera
        expected = plain(x, t, image, object_frame_camera(cam, torch.tensor([[1.0, 0.0]] * 2)), icam)
    assert torch.allclose(turned, expected, atol=1e-5)
    assert any(p is model.pose_head[-1].bias for p in model.new_parameters())

    ds = PairDataset(2, 0, 2, 4, 16, tmp_path / "cache")
    batch = ds.batch(0)
    sched = make_scheduler(model.cfg)
    base = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4)
    posed = pair_loss(model, sched, batch, torch.Generator().manual_seed(0), 4, pose_weight=3.0)
    az = torch.deg2rad(batch["azimuth"])
    with torch.no_grad():
        pose = model.input_pose(batch["image"], input_camera(batch["elevation"], batch["distance"]))
    want = torch.nn.functional.mse_loss(pose, torch.stack([torch.sin(az), torch.cos(az)], dim=-1))
    assert torch.allclose(posed - base, 3.0 * want, rtol=1e-5)
    with pytest.raises(ValueError, match="pose head"):
        plain.input_pose(image, icam)


def test_pose_weight_without_a_pose_head_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="pose_head"):
        train_zero123({"init_from": None, "model": _TINY["TINY_Z123_PRIOR"], "pose_weight": 1.0, "steps": 1,
                       "out_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache"), "num_groups": 2,
                       "groups_per_batch": 1}, progress=False)


def test_pose_pretraining_fits_the_head_once_and_a_resumed_run_matches(tmp_path):
    from lift3d.priors.toyworld.zero123 import pretrain_pose

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = ToyWorldPrior(TINY_ARCH).save(tmp_path / "single.safetensors")
    ds = PairDataset(2, 0, 8, 4, 16, str(tmp_path / "cache"))
    data = dict(ds.data())
    # views that show their azimuth plainly: a bright square whose place on the image follows it
    az = torch.deg2rad(data["azimuth"])
    image = torch.zeros_like(data["image"])
    for i, (row, col) in enumerate(zip(((az.sin() + 1) * 5.5).long(), ((az.cos() + 1) * 5.5).long())):
        image[i, row:row + 4, col:col + 4] = 255
    data["image"] = image
    model = ToyZero123.from_single_view(init, {"encoder_channels": [8, 16], "pose_head": True,
                                               "encoder_pool": "flatten"})
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    losses = pretrain_pose(model, data, 150, 16, 3e-3, seed=0)
    # 0.5 is the loss of knowing nothing
    assert sum(losses[-10:]) / 10 < 0.2 and sum(losses[:10]) / 10 > 0.4, losses
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in unet_before.items())  # the head alone

    base = {"init_from": str(init), "steps": 6, "groups_per_batch": 2, "num_groups": 8, "warmup_steps": 2,
            "ckpt_every": 3, "log_every": 3, "cache_dir": str(tmp_path / "cache"), "pose_weight": 1.0,
            "encoder": {"encoder_channels": [8, 16], "pose_head": True}, "pose_pretrain_steps": 4,
            "pose_pretrain_batch": 8}
    full = train_zero123({**base, "out_dir": str(tmp_path / "a")}, progress=False)
    assert (tmp_path / "a" / "pose_pretrain.csv").read_text().count("\n") == 5
    train_zero123({**base, "stop_after": 3, "out_dir": str(tmp_path / "b")}, progress=False)
    (tmp_path / "b" / "pose_pretrain.csv").unlink()
    resumed = train_zero123({**base, "out_dir": str(tmp_path / "b")}, progress=False)
    assert not (tmp_path / "b" / "pose_pretrain.csv").exists()  # a resumed run does not pre-train again
    sa, sb = ToyZero123.load(full).state_dict(), ToyZero123.load(resumed).state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with pytest.raises(ConfigError, match="pose head"):
        train_zero123({**base, "encoder": {}, "pose_weight": 0.0, "out_dir": str(tmp_path / "c")}, progress=False)
