"""ViewDiff's network, training and sampling (lift3d.priors.viewdiff) on tiny random models.

References are built here from diffusers' own attention processor and the plain base UNet, and
from camera geometry worked out by hand (a pixel at the image centre sees the optical axis).
"""

from __future__ import annotations

import copy
import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from lift3d.config import ConfigError
from lift3d.priors.viewdiff.attention import CrossFrameAttnProcessor
from lift3d.priors.viewdiff.cameras import COND_DIM, intrinsics_from_fovy, orbit_c2w, pixel_rays, view_condition
from lift3d.priors.viewdiff.model import ViewDiffUNet, read_metadata, resolve_base, resolve_viewdiff_weights
from lift3d.priors.viewdiff.projection import ProjectionLayer, voxel_centres
from lift3d.utils.hub import MissingWeightsError

REPO = Path(__file__).resolve().parents[2]
# tests/guidance is not on sys.path here: load the tiny-model factory by path.
TINY = runpy.run_path(str(REPO / "tests/guidance/tiny_viewdiff.py"))
TINY_CONFIG = TINY["TINY_CONFIG"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tiny SD folder, random ViewDiff weights file)."""
    return TINY["make_tiny_viewdiff"](tmp_path_factory.mktemp("viewdiff"))


@pytest.fixture(scope="module")
def base_unet(tiny):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny[0], subfolder="unet", local_files_only=True).eval()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return TINY["write_tiny_dataset"](tmp_path_factory.mktemp("viewdiff-data"))


def attention_layer(seed=0):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(seed)
    attn = Attention(query_dim=8, heads=2, dim_head=4, bias=False).eval()
    attn.set_processor(AttnProcessor2_0())
    return attn


def cameras(n, elevation=20.0, distance=2.5, fovy=40.0, start=0.0):
    az = start + torch.arange(n, dtype=torch.float32) * 360.0 / n
    c2w = orbit_c2w(torch.full((n,), elevation), az, torch.full((n,), distance))
    return c2w, intrinsics_from_fovy(torch.full((n,), fovy))


def close(got, want, tol=1e-5):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


# -- cross-frame attention --------------------------------------------------------------------------


def test_one_view_is_diffusers_default_attention():
    attn = attention_layer()
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        want = attn(x)
        proc = CrossFrameAttnProcessor.for_layer(attn, rank=2, cond_hidden=8)
        attn.set_processor(proc)
        got = attn(x, n_views=1, view_cond=torch.randn(3, COND_DIM))
    close(got, want, 1e-6)


def test_identical_views_attend_as_one_and_different_views_mix():
    attn = attention_layer()
    proc = CrossFrameAttnProcessor.for_layer(attn, rank=2, cond_hidden=8)
    x = torch.randn(2, 10, 8)  # two groups' worth of distinct views
    with torch.no_grad():
        single = attn(x)  # diffusers' default, each view alone
        attn.set_processor(proc)
        copies = attn(x.repeat_interleave(3, dim=0), n_views=3)  # each view three times in its group
        mixed = attn(x, n_views=2)  # the two distinct views in one group
    close(copies, single.repeat_interleave(3, dim=0), 1e-5)
    assert (mixed - single).abs().max() > 1e-3  # each now reads the other view too


def test_the_pose_condition_acts_only_once_the_lora_is_nonzero():
    attn = attention_layer()
    proc = CrossFrameAttnProcessor.for_layer(attn, rank=2, cond_hidden=8)
    attn.set_processor(proc)
    x = torch.randn(4, 10, 8)
    c1 = torch.randn(4, COND_DIM)
    c2 = c1.clone()
    c2[:, 1:3] = torch.tensor([1.0, 0.0])  # another relative azimuth (sin, cos)
    with torch.no_grad():
        assert torch.equal(attn(x, n_views=2, view_cond=c1), attn(x, n_views=2, view_cond=c2))
        for layer in proc.up.values():
            layer.weight.normal_(0, 0.3)
        a, b = attn(x, n_views=2, view_cond=c1), attn(x, n_views=2, view_cond=c2)
    assert (a - b).abs().max() > 1e-4


def test_view_condition_is_relative_to_the_groups_first_view():
    c2w, K = cameras(4, start=30.0)
    cond = view_condition(c2w, K, torch.full((4,), 0.7), n_views=2)
    assert cond.shape == (4, COND_DIM)
    # first views of each group: no relative elevation, azimuth 0 -> (sin, cos) = (0, 1)
    close(cond[[0, 2], :3], torch.tensor([[0.0, 0.0, 1.0]] * 2), 1e-6)
    close(cond[1, 1:3], torch.tensor([1.0, 0.0]), 1e-5)  # a quarter turn later
    close(cond[:, 3], torch.full((4,), 2.5), 1e-6)  # distance
    close(cond[:, 8], torch.full((4,), 0.2), 1e-6)  # intensity - 0.5
    # the condition of a group does not depend on where it sits on the orbit
    c2w2, _ = cameras(4, start=100.0)
    close(view_condition(c2w2, K, torch.full((4,), 0.7), 2), cond, 1e-5)


# -- the whole network --------------------------------------------------------------------------------


def test_a_new_viewdiff_unet_predicts_what_the_base_unet_predicts_per_view(base_unet):
    torch.manual_seed(0)
    model = ViewDiffUNet(copy.deepcopy(base_unet), TINY_CONFIG).eval()
    x, text, t = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32), torch.tensor([100, 100, 700, 700])
    c2w, K = cameras(4)
    with torch.no_grad():
        want = base_unet(x, t, encoder_hidden_states=text).sample
        one = model(x, t, text, c2w, K, torch.full((4,), 0.5), n_views=1)
        c2w_b, _ = cameras(4, elevation=-10.0, distance=2.0)
        other = model(x, t, text, c2w_b, K, torch.full((4,), 0.9), n_views=1)
        # a group of copies of one view
        copies = model(x[:1].repeat(4, 1, 1, 1), t[:1].repeat(4), text[:1].repeat(4, 1, 1), c2w, K,
                       torch.full((4,), 0.5), n_views=4)
    close(one, want, 1e-5)
    close(other, want, 1e-5)  # cameras and intensity do nothing yet
    close(copies, want[:1].repeat(4, 1, 1, 1), 1e-5)


def test_trained_layers_make_views_and_cameras_matter(tiny, base_unet):
    model = ViewDiffUNet.from_weights(copy.deepcopy(base_unet), tiny[1]).eval()
    x, text, t = torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32), torch.full((4,), 500)
    c2w, K = cameras(4)
    I = torch.full((4,), 0.5)
    with torch.no_grad():
        base = model(x, t, text, c2w, K, I, n_views=4)
        moved = model(x, t, text, cameras(4, elevation=40.0)[0], K, I, n_views=4)
        brighter = model(x, t, text, c2w, K, torch.full((4,), 0.9), n_views=4)
        alone = model(x, t, text, c2w, K, I, n_views=1)
    for other in (moved, brighter, alone):
        assert (other - base).abs().max() > 1e-4


def test_a_deep_copy_runs_its_own_projection_layers(base_unet):
    model = ViewDiffUNet(copy.deepcopy(base_unet), TINY_CONFIG).eval()
    x, text, t = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32), torch.full((2,), 500)
    c2w, K = cameras(2)
    args = (x, t, text, c2w, K, torch.full((2,), 0.5))
    with torch.no_grad():
        before = model(*args, n_views=2)
        twin = copy.deepcopy(model)
        for layer in twin.projections.values():
            layer.expand.weight.normal_(0, 0.5)
        assert torch.equal(model(*args, n_views=2), before)  # the original's hooks run the original's layers
        assert (twin(*args, n_views=2) - before).abs().max() > 1e-4


def test_projection_layers_follow_the_chosen_blocks_only(base_unet):
    model = ViewDiffUNet(copy.deepcopy(base_unet), {**TINY_CONFIG, "projection_after": ["up_blocks.0"]})
    assert list(model.projections) == ["up_blocks_0"]
    for bad in (["up_blocks.1"], ["down_blocks.0"], ["mid_block", "mid_block"]):
        with pytest.raises(ConfigError, match="projection_after"):
            ViewDiffUNet(copy.deepcopy(base_unet), {**TINY_CONFIG, "projection_after": bad})
    with pytest.raises(ConfigError, match="grid_siez"):
        ViewDiffUNet(copy.deepcopy(base_unet), {"grid_siez": 8})


def test_added_weights_round_trip_and_refuse_another_base(tiny, base_unet, tmp_path):
    from diffusers import UNet2DConditionModel

    model = ViewDiffUNet.from_weights(copy.deepcopy(base_unet), tiny[1])
    path = model.save_added(tmp_path / "again.safetensors")
    again = ViewDiffUNet.from_weights(copy.deepcopy(base_unet), path)
    a, b = dict(model.added_parameters()), dict(again.added_parameters())
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("unet.") and ".processor." not in k for k in a)  # no base tensor saved
    meta = read_metadata(path)
    assert json.loads(meta["config"])["projection_after"] == ["mid_block", "up_blocks.0"]
    other = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=2, attention_head_dim=2, cross_attention_dim=32,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="base UNet"):
        ViewDiffUNet.from_weights(other, path)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(MissingWeightsError, match=r"system\.guidance\.weights.*python -m lift3d\.priors\.viewdiff train"):
        resolve_viewdiff_weights(str(plain), key="system.guidance.weights")


def test_missing_weights_fail_fast_naming_the_key(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match=r"'base_model' = 'someone/absent-sd'.*hf download someone/absent-sd"):
        resolve_base("someone/absent-sd", key="base_model")
    with pytest.raises(MissingWeightsError, match=r"'weights' = .*no such ViewDiff weights file.*train root="):
        resolve_viewdiff_weights(str(tmp_path / "none.safetensors"), key="weights")


# -- the projection layer ---------------------------------------------------------------------------


def test_the_projection_layer_starts_as_the_identity_and_then_reads_the_cameras():
    torch.manual_seed(0)
    layer = ProjectionLayer(8, feat_channels=4, grid_size=8, n_samples=8, hidden=8)
    x = torch.randn(4, 8, 6, 6)
    c2w, K = cameras(4)
    assert torch.equal(layer(x, c2w, K, 2), x)
    with torch.no_grad():
        layer.expand.weight.normal_(0, 0.5)
        a = layer(x, c2w, K, 2)
        b = layer(x, cameras(4, elevation=50.0)[0], K, 2)
    assert (a - x).abs().max() > 1e-4 and (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("position", [(2.0, 0.0, 0.0), (0.0, -2.0, 0.0)])
def test_a_pixel_at_the_image_centre_lands_on_the_optical_axis(position):
    """A camera looking at the origin sees its centre pixel along the line through the origin; with a
    16^3 grid over [-1, 1]^3 the axis runs between the four central voxel columns."""
    layer = ProjectionLayer(1, feat_channels=1, grid_size=16, bound=1.0)
    pos = torch.tensor([position])
    from lift3d.utils.cameras import look_at_c2w

    c2w = look_at_c2w(pos)
    K = intrinsics_from_fovy(torch.tensor([40.0]))
    feats = torch.zeros(1, 1, 9, 9)
    feats[0, 0, 4, 4] = 1.0  # the centre pixel of an odd-sized map
    samples, depth, seen = layer.unproject(feats, c2w, K)
    value = samples[0, 0]  # [V]
    centres = voxel_centres(16, 1.0)
    axis = torch.nn.functional.normalize(pos[0], dim=0)
    along = centres @ axis
    right, up = c2w[0, :3, 0], c2w[0, :3, 1]
    # bilinear sampling reads the centre pixel within one pixel of its centre: a lateral offset below
    # depth * (pixel width / focal length) = depth * (1 / 9) / fx along both image axes
    limit = depth[0] * (1 / 9) / K[0, 0, 0]
    inside = ((centres @ right).abs() < limit) & ((centres @ up).abs() < limit)
    assert bool(seen[0, inside].all())  # the axis is in view, in front of the camera
    assert float(value[~inside].abs().max()) == 0.0  # nothing lands off the axis
    off_axis = (centres - along[:, None] * axis).norm(dim=-1)
    central = (off_axis - 0.0625 * 2**0.5).abs() < 1e-4  # the four voxel columns around the axis
    assert int(central.sum()) == 4 * 16 and bool((value[central] > 0).all())
    close(depth[0, central], (pos[0].norm() - along[central]), 1e-5)  # depth along the viewing direction
    for d in along[central].unique():  # the four columns are symmetric about the axis
        ring = value[central & ((along - d).abs() < 1e-4)]
        close(ring, ring[:1].expand_as(ring), 1e-5)


def test_pixel_rays_match_the_renderers_rays():
    from lift3d.utils.cameras import get_rays

    c2w, _ = cameras(3, fovy=50.0)
    o_ref, d_ref = get_rays(c2w, torch.full((3,), 50.0), 5, 7)
    # square pixels on a 5x7 map: fx = fy * H / W
    Kw = intrinsics_from_fovy(torch.full((3,), 50.0), aspect=7 / 5)
    o, d = pixel_rays(c2w, Kw, 5, 7)
    close(d, d_ref.reshape(3, -1, 3), 1e-5)
    close(o, o_ref.reshape(3, -1, 3), 1e-6)


# -- training -----------------------------------------------------------------------------------------


def trainer(dataset, tiny, out, **over):
    from lift3d.priors.viewdiff.train import Trainer

    cfg = {"root": str(dataset), "base_model": str(tiny[0]), "out_dir": str(out), "n_views": 3, "batch_size": 2,
           "lr": 1e-2, "model": TINY_CONFIG, "log_every": 0, "save_every": 100, **over}
    return Trainer(cfg, progress=False)


def test_training_lowers_the_loss_on_a_fixed_batch(dataset, tiny, tmp_path):
    tr = trainer(dataset, tiny, tmp_path / "run", steps=20)
    held_out = tr.batch(10**6)
    with torch.no_grad():
        before = float(tr.loss(held_out))
    path = tr.run()
    with torch.no_grad():
        after = float(tr.loss(held_out))
    assert after < 0.97 * before, (before, after)
    assert path.name == "viewdiff.safetensors" and (tmp_path / "run" / "checkpoint.safetensors").is_file()
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tr.model.added_parameters()}  # the base UNet stays frozen


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(dataset, tiny, tmp_path):
    from safetensors.torch import load_file

    whole = trainer(dataset, tiny, tmp_path / "whole", steps=6, save_every=3).run()
    trainer(dataset, tiny, tmp_path / "parts", steps=3, save_every=3).run()
    assert read_metadata(tmp_path / "parts" / "checkpoint.safetensors")["step"] == "3"
    second = trainer(dataset, tiny, tmp_path / "parts", steps=6, save_every=3)
    assert second.step == 3
    parts = second.run()
    a, b = load_file(str(whole)), load_file(str(parts))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint of other settings is not silently continued
    with pytest.raises(ConfigError, match="new out_dir"):
        trainer(dataset, tiny, tmp_path / "parts", steps=9, n_views=2)


def test_the_train_command_parses_keys_strictly(dataset, tiny, tmp_path, capsys):
    from lift3d.priors.viewdiff.__main__ import main

    assert main(["train", f"root={dataset}", f"base_model={tiny[0]}", f"out_dir={tmp_path}", "stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "stepz" in err and "steps" in err
    assert main(["train", f"root={tmp_path / 'nothing'}", f"base_model={tiny[0]}", f"out_dir={tmp_path}"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_dataset_layout_is_read_back_and_checked(dataset, tmp_path):
    from lift3d.priors.viewdiff.data import read_object, scan_dataset

    objs = scan_dataset(dataset, min_views=3)
    assert [o.name for o in objs] == ["object00", "object01"] and objs[0].prompt == "a red cube"
    close(objs[0].intrinsics, intrinsics_from_fovy(torch.full((6,), 40.0)), 1e-6)
    bad = tmp_path / "bad"
    (bad / "images").mkdir(parents=True)
    (bad / "cameras.json").write_text(json.dumps({"frames": [{"file": "images/000.png", "c2w": [[1, 0], [0, 1]],
                                                               "fovy": 40}]}))
    with pytest.raises(ValueError, match="does not exist"):
        read_object(bad)
    from lift3d.utils.io import save_image

    save_image(bad / "images/000.png", np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"frames\[0\]\.c2w: expected a 4x4 matrix"):
        read_object(bad)


# -- sampling -----------------------------------------------------------------------------------------


def test_the_group_plan_conditions_on_the_nearest_generated_views():
    from lift3d.priors.viewdiff.sample import group_plan, orbit_cameras

    c2w, _, _ = orbit_cameras(8)
    plan = group_plan(8, 4, 2, c2w[:, :3, 3])
    assert plan[0] == ([], [0, 1, 2, 3])
    assert plan[1] == ([2, 3], [4, 5])  # at 90 and 135 degrees, next to 180 and 225
    assert plan[2] == ([0, 5], [6, 7])  # at 0 and 225 degrees, next to 315 and 270
    with pytest.raises(ValueError, match="known"):
        group_plan(8, 4, 4, c2w[:, :3, 3])


@pytest.mark.parametrize("mode", ["renoise", "clean"])
def test_autoregressive_sampling_keeps_the_first_group(tiny, mode):
    from lift3d.priors.viewdiff.sample import Components, orbit_cameras, sample_views

    comp = Components.load(str(tiny[0]), str(tiny[1]))
    c2w, K, _ = orbit_cameras(6)
    kw = dict(group=3, known=1, steps=3, guidance_scale=3.0, seed=4, mode=mode)
    full = sample_views(comp, "a red cube", c2w, K, **kw)
    first = sample_views(comp, "a red cube", c2w[:3], K[:3], **kw)
    # groups of 3: 3 new views, then 1 known + 2 new, then 2 known + the last one
    assert full["plan"] == [([], [0, 1, 2]), ([2], [3, 4]), ([0, 4], [5])]
    assert torch.equal(full["images"][:3], first["images"])  # later groups never touch earlier views
    imgs = full["images"]
    assert imgs.shape == (6, 16, 16, 3) and torch.isfinite(imgs).all()
    assert (imgs[3:] - imgs[:3]).abs().max() > 0  # the new views were generated, not copied


def test_the_sample_command_writes_the_grid_and_a_dataset_object(tiny, tmp_path, capsys):
    from lift3d.priors.viewdiff.__main__ import main
    from lift3d.priors.viewdiff.data import read_object

    out = tmp_path / "sample"
    assert main(["sample", "--prompt", "a red cube", "--views", "5", "--group", "3", "--steps", "2",
                 "--base-model", str(tiny[0]), "--weights", str(tiny[1]), "--out", str(out)]) == 0
    assert f"grid: {out / 'grid.png'}" in capsys.readouterr().out
    obj = read_object(out)
    assert len(obj) == 5 and obj.prompt == "a red cube"
    close(obj.c2w, orbit_c2w(torch.full((5,), 15.0), torch.remainder(torch.arange(5) * 72.0 + 180, 360) - 180,
                             torch.full((5,), 2.5)), 1e-5)
    import imageio.v3 as iio

    grid = iio.imread(out / "grid.png")
    assert grid.shape[:2] == (16, 5 * 16 + 4 * 2)
    assert np.array_equal(grid[:, :16], iio.imread(out / "images/000.png"))
    assert main(["sample", "--prompt", "x", "--views", "2", "--base-model", str(tiny[0]), "--weights",
                 str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "o2")]) == 2
    assert "python -m lift3d.priors.viewdiff train" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_gradients_and_autocast_trains(dataset, tiny, tmp_path):
    grads = []
    for i, over in enumerate(({}, {"gradient_checkpointing": True})):
        tr = trainer(dataset, tiny, tmp_path / f"run{i}", steps=1, **over)
        assert any(getattr(m, "gradient_checkpointing", False) for m in tr.model.unet.modules()) == bool(i)
        tr.loss(tr.batch(0)).backward()
        grads.append({n: p.grad.clone() for n, p in tr.params.items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(tr.params)
    for n in grads[0]:
        close(grads[1][n], grads[0][n], 1e-4)
    bf = trainer(dataset, tiny, tmp_path / "bf16", steps=2, autocast="bf16")
    assert all(np.isfinite(bf.train_step()) for _ in range(2))
    assert all(p.dtype == torch.float32 for p in bf.params.values())
