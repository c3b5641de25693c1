"""SyncDreamer: the key map both ways, the volume and depth-wise attention, the cameras, the sampler, the CLI."""

from __future__ import annotations

import argparse
import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.priors.syncdreamer import cameras as cams
from lift3d.utils.hub import MissingWeightsError

_TINY = runpy.run_path(str(Path(__file__).resolve().parents[1] / "guidance" / "tiny_syncdreamer.py"))
tiny_model, make_tiny_syncdreamer = _TINY["tiny_model"], _TINY["make_tiny_syncdreamer"]
VIEW = _TINY["VIEW_SIZE"]


@pytest.fixture(scope="module")
def model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_syncdreamer(tmp_path_factory.mktemp("sd") / "tiny")


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(1, 3, VIEW, VIEW, generator=g)
    n = model.cfg.latent_size
    x = torch.randn(1, cams.N_VIEWS, 4, n, n, generator=g)
    return x, model.input_latent(img, g), model.clip_embedding(img)


# ---------------------------------------------------------------------------------------------
# The key map


def test_the_original_layout_loads_into_the_same_network(model, folder):
    from lift3d.priors.syncdreamer import checkpoint

    loaded = checkpoint.load(folder)
    x, lat, clip = _inputs(model)
    t, elev = torch.tensor([700]), torch.tensor([20.0])
    a = model.predict(x, t, lat, clip, elev, guidance_scale=2.0)
    b = loaded.predict(x, t, lat, clip, elev, guidance_scale=2.0)
    assert torch.equal(a, b)
    sd = torch.load(folder / checkpoint.CKPT_NAME, weights_only=True)["state_dict"]
    # the original names, as the released file has them
    for key in ("model.diffusion_model.input_blocks.0.0.weight",
                "model.diffusion_model.middle_conditions.proj_in.0.weight",
                "model.diffusion_model.output_conditions.8.proj_out.5.weight",
                "spatial_volume.target_encoder.out_conv2.time_embed.weight",
                "spatial_volume.spatial_volume_feats.conv6_1.bn.weight",
                "spatial_volume.frustum_volume_feats.up2.v_conv.weight", "time_embed.2.bias", "cc_projection.weight",
                "first_stage_model.decoder.up.0.block.0.conv1.weight",
                "clip_image_encoder.model.visual.transformer.resblocks.1.attn.in_proj_weight"):
        assert key in sd, key
    # nine decoder depth transformers, as the released UNet's output_b2c places them
    assert {int(k.split(".")[3]) for k in sd if ".output_conditions." in k} == set(range(9))


def test_a_safetensors_copy_and_a_folder_load_the_same(model, folder, tmp_path):
    from safetensors.torch import save_file

    from lift3d.priors.syncdreamer import checkpoint

    sd = torch.load(folder / checkpoint.CKPT_NAME, weights_only=True)["state_dict"]
    out = tmp_path / "w"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "weights.safetensors"))
    (out / checkpoint.ARCHITECTURE_FILE).write_text((folder / checkpoint.ARCHITECTURE_FILE).read_text())
    for path in (out, out / "weights.safetensors"):
        m = checkpoint.load(path)
        assert torch.equal(m.unet.mid_condition.to_k.weight, model.unet.mid_condition.to_k.weight)
        assert torch.equal(m.image_encoder.visual_projection.weight, model.image_encoder.visual_projection.weight)


def _write(tmp_path, folder, edit):
    from lift3d.priors.syncdreamer import checkpoint

    sd = torch.load(folder / checkpoint.CKPT_NAME, weights_only=True)["state_dict"]
    edit(sd)
    out = tmp_path / "edited"
    out.mkdir()
    torch.save({"state_dict": sd}, out / checkpoint.CKPT_NAME)
    (out / checkpoint.ARCHITECTURE_FILE).write_text((folder / checkpoint.ARCHITECTURE_FILE).read_text())
    return out


def test_an_extra_key_is_an_error_that_names_it(folder, tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import SyncDreamerCheckpointError, load

    out = _write(tmp_path, folder, lambda sd: sd.__setitem__("spatial_volume.extra_layer.weight", torch.zeros(3)))
    with pytest.raises(SyncDreamerCheckpointError, match=r"does not place: spatial_volume\.extra_layer\.weight"):
        load(out)


def test_a_missing_key_is_an_error_that_names_it(folder, tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import SyncDreamerCheckpointError, load

    gone = "model.diffusion_model.output_conditions.3.depth_attn.to_v.weight"
    out = _write(tmp_path, folder, lambda sd: sd.pop(gone))
    want = r"unet\.up_conditions\.3\.to_v\.weight \(from " + gone.replace(".", r"\.")
    with pytest.raises(SyncDreamerCheckpointError, match=want):
        load(out)


def test_a_tensor_of_another_shape_is_an_error_that_names_it(folder, tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import SyncDreamerCheckpointError, load

    key = "spatial_volume.frustum_volume_feats.conv3.conv.weight"
    out = _write(tmp_path, folder, lambda sd: sd.__setitem__(key, sd[key][:, :-1]))
    with pytest.raises(SyncDreamerCheckpointError, match=r"other shapes.*" + key.replace(".", r"\.")):
        load(out)


def test_other_cameras_in_the_checkpoint_are_refused(folder, tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import SyncDreamerCheckpointError, load

    out = _write(tmp_path, folder, lambda sd: sd.__setitem__("poses", sd["poses"].roll(1, 0)))
    with pytest.raises(SyncDreamerCheckpointError, match="camera buffer 'poses'"):
        load(out)


def test_a_checkpoint_with_pickled_objects_is_refused_with_the_converter(folder, tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import CKPT_NAME, SyncDreamerCheckpointError, load

    sd = torch.load(folder / CKPT_NAME, weights_only=True)["state_dict"]
    bad = tmp_path / "pickled.ckpt"

    # a Lightning checkpoint's hyper-parameters: an object weights_only=True does not rebuild
    torch.save({"state_dict": sd, "hyper_parameters": argparse.Namespace(lr=1e-4)}, bad)
    with pytest.raises(SyncDreamerCheckpointError, match="python -m lift3d.priors.syncdreamer convert"):
        load(bad)


def test_missing_weights_name_the_file_and_where_to_get_it(tmp_path):
    from lift3d.priors.syncdreamer.checkpoint import find_weights

    with pytest.raises(MissingWeightsError, match=r"syncdreamer-pretrain\.ckpt.*drive\.google\.com.*never downloads"):
        find_weights(tmp_path / "ckpt" / "syncdreamer-pretrain.ckpt", "syncdreamer_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="holds no weights file"):
        find_weights(tmp_path / "empty", "syncdreamer_model")


def test_the_guidance_reports_missing_weights_before_building():
    from lift3d.config import parse_structured
    from lift3d.registry import find

    cls = find("syncdreamer-guidance", "guidance")
    msg = cls.missing_weights(parse_structured(cls.Config, {"pretrained_model_name_or_path": "/nowhere/sd.ckpt"}))
    assert msg and "/nowhere/sd.ckpt" in msg and "syncdreamer-pretrain.ckpt" in msg
    assert cls.missing_weights(parse_structured(cls.Config, {"views_dir": "/some/views"})) is None


# ---------------------------------------------------------------------------------------------
# Depth-wise attention and the volumes


def test_depth_transformer_keeps_the_shape_and_attends_over_depth():
    from lift3d.priors.syncdreamer.network import DepthTransformer

    torch.manual_seed(0)
    tf = DepthTransformer(dim=12, context_dim=16).eval()
    for p in tf.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x, ctx = torch.randn(2, 12, 5, 3), torch.randn(2, 16, 7, 5, 3)
    out = tf(x, ctx)
    assert out.shape == x.shape
    # the attention alone against a written-out softmax over the depth axis
    h = torch.randn(2, tf.heads * tf.head_dim, 5, 3)
    q = tf.to_q(h).reshape(2, tf.heads, tf.head_dim, 5, 3)
    k = tf.to_k(ctx).reshape(2, tf.heads, tf.head_dim, 7, 5, 3)
    v = tf.to_v(ctx).reshape(2, tf.heads, tf.head_dim, 7, 5, 3)
    w = ((q[:, :, :, None] * k).sum(2) / math.sqrt(tf.head_dim)).softmax(2)  # [B, heads, D, h, w]
    ref = tf.to_out((v * w[:, :, None]).sum(3).reshape(2, -1, 5, 3))
    assert torch.allclose(tf.attend(h, ctx), ref, atol=1e-5)
    # in the attention, a pixel reads only its own frustum column (the norms and 3x3 convolutions around it mix)
    ctx2 = ctx.clone()
    ctx2[:, :, :, 0, 0] += torch.randn(2, 16, 7)
    changed = (tf.attend(h, ctx2) - tf.attend(h, ctx)).abs().amax((0, 1)) > 1e-6
    assert changed[0, 0] and changed.sum() == 1


def test_the_published_layout_puts_the_depth_transformers_where_the_original_does():
    from lift3d.priors.syncdreamer.checkpoint import PUBLISHED
    from lift3d.priors.syncdreamer.network import condition_layout

    mid, ups = condition_layout(PUBLISHED["unet"], (64, 128, 256, 512))
    assert mid == (1280, 512)
    assert ups == [(1280, 256), (1280, 256), (1280, 128), (640, 128), (640, 128), (640, 64),
                   (320, 64), (320, 64), (320, 64)]


def test_volume_shapes(model):
    vc = model.cfg
    x, _, _ = _inputs(model)
    t = model.embed_time(torch.tensor([10]))
    v = cams.view_embedding(torch.tensor([30.0]))
    vol = model.volume.spatial(x, t, v, model.K, model.w2c)
    S = vc.volume_size
    assert vol.shape == (1, vc.dims[0], S, S, S)
    feats = model.volume.frustum(vol, t, v, model.K, model.w2c, torch.tensor([[0, 5, 9]]))
    n, D = vc.latent_size, vc.frustum_depth
    assert sorted(feats) == [n // 8, n // 4, n // 2, n]
    for i, w in enumerate((n, n // 2, n // 4, n // 8)):
        assert feats[w].shape == (3, vc.dims[i], D >> i, w, w)


def test_frustum_points_lie_on_the_views_rays(model):
    K, w2c = model.K, model.w2c
    pts = model.volume.frustum_points(K, w2c)  # [16, 3, D, n, n]
    n = model.cfg.latent_size
    centre = pts[:, :, :, n // 2, n // 2]  # the principal point's ray: through the origin
    cam = -(w2c[:, :, :3].transpose(1, 2) @ w2c[:, :, 3:])[..., 0]  # [16, 3]
    d = centre - cam[:, :, None]
    cross = torch.linalg.cross(d, (-cam)[:, :, None].expand_as(d), dim=1)
    assert cross.abs().max() < 1e-4
    depth = d.norm(dim=1)
    vc = model.cfg
    assert torch.allclose(depth[:, 0], torch.full((16,), vc.camera_distance - vc.frustum_half_length), atol=1e-4)
    assert torch.allclose(depth[:, -1], torch.full((16,), vc.camera_distance + vc.frustum_half_length), atol=1e-4)


def test_views_are_denoised_jointly_through_the_volume_only(model):
    x, lat, clip = _inputs(model)
    t, elev = torch.tensor([600]), torch.tensor([30.0])
    x2 = x.clone()
    x2[:, 7] += torch.randn_like(x2[:, 7])  # another view's input changes
    with_a = model.predict(x, t, lat, clip, elev, views=[0])
    with_b = model.predict(x2, t, lat, clip, elev, views=[0])
    assert (with_a - with_b).abs().max() > 1e-5  # view 0 saw view 7 through the spatial volume
    plain_a = model.predict(x, t, lat, clip, elev, views=[0], use_volume=False)
    plain_b = model.predict(x2, t, lat, clip, elev, views=[0], use_volume=False)
    assert torch.equal(plain_a, plain_b)  # without the volume no view sees another
    assert (with_a - plain_a).abs().max() > 1e-5


def test_guidance_scale_mixes_the_branches_and_view_batches_do_not_matter(model):
    x, lat, clip = _inputs(model)
    t, elev = torch.tensor([300]), torch.tensor([10.0])
    c = model.predict(x, t, lat, clip, elev, guidance_scale=1.0)
    g3 = model.predict(x, t, lat, clip, elev, guidance_scale=3.0, view_batch=5)
    g2 = model.predict(x, t, lat, clip, elev, guidance_scale=2.0, view_batch=16)
    # e(s) = u + s (c - u) is affine in s: e(3) = 2 e(2) - c
    assert torch.allclose(g3, 2 * g2 - c, atol=1e-4)
    assert (g3 - c).abs().max() > 1e-4


def test_half_precision_weights_keep_the_geometry_in_float32(folder):
    """bfloat16 here (CPU); the same path serves float16 on CUDA: the cameras, the frustum points and the
    schedule stay float32 (a matrix inverse has no half-precision kernel), the networks run in bfloat16."""
    from lift3d.priors.syncdreamer import checkpoint

    full = checkpoint.load(folder)
    half = checkpoint.load(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.alphas_cumprod.dtype == torch.float32
    assert half.K.dtype == torch.float32
    x, lat, clip = _inputs(full)
    a = full.predict(x, torch.tensor([400]), lat, clip, torch.tensor([30.0]), guidance_scale=2.0)
    b = half.predict(x, torch.tensor([400]), lat, clip, torch.tensor([30.0]), guidance_scale=2.0)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_the_input_elevation_reaches_the_network(model):
    x, lat, clip = _inputs(model)
    a = model.predict(x, torch.tensor([300]), lat, clip, torch.tensor([0.0]), views=[3])
    b = model.predict(x, torch.tensor([300]), lat, clip, torch.tensor([30.0]), views=[3])
    assert (a - b).abs().max() > 1e-5


# ---------------------------------------------------------------------------------------------
# Cameras


#: Two of the released meta_info/camera-16.pkl poses (world -> camera, OpenCV), views 0 and 4.
RELEASED = {0: [[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, -0.8660254, 0.0], [-0.8660254, 0.0, -0.5, 1.5]],
            4: [[-1.0, 0.0, 0.0, 0.0], [0.0, 0.5, -0.8660254, 0.0], [0.0, -0.8660254, -0.5, 1.5]]}


def test_the_camera_table_matches_the_released_poses():
    K, w2c = cams.model_cameras()
    for i, pose in RELEASED.items():
        assert torch.allclose(w2c[i], torch.tensor(pose), atol=1e-6)
    assert torch.equal(K[0], torch.tensor([[280.0, 0, 128], [0, 280.0, 128], [0, 0, 1]]))
    t = cams.view_table()
    assert torch.allclose(t["fovy"], torch.full((16,), 49.13434), atol=1e-4)
    assert t["azimuth"][4] == 90.0 and t["azimuth"][12] == -90.0 and t["azimuth"][8] == -180.0
    assert (t["elevation"] == 30.0).all() and (t["distance"] == 1.5).all()
    assert (cams.view_table(3.0)["distance"] == 3.0).all()


def test_lift3d_cameras_cast_the_same_rays_as_syncdreamers():
    """lift3d's renderer at the table's cameras and SyncDreamer's pinhole matrices agree ray for ray
    (lift3d samples pixel centres, i.e. OpenCV pixel j at j + 0.5)."""
    from lift3d.utils.cameras import make_cameras

    t = cams.view_table()
    b = make_cameras(t["elevation"], t["azimuth"], t["distance"], t["fovy"], 256, 256)
    K, w2c = cams.model_cameras()
    R, tr = w2c[:, :, :3], w2c[:, :, 3:]
    for i, j in ((0, 0), (10, 200), (128, 64), (255, 255)):
        pix = torch.tensor([j + 0.5, i + 0.5, 1.0])
        d = (R.transpose(1, 2) @ (torch.linalg.inv(K) @ pix)[..., None])[..., 0]
        d = d / d.norm(dim=-1, keepdim=True)
        assert torch.allclose(d, b["rays_d"][:, i, j], atol=1e-5)
        assert torch.allclose(-(R.transpose(1, 2) @ tr)[..., 0], b["rays_o"][:, i, j], atol=1e-5)


def test_view_embedding_is_relative_to_the_input_view():
    e = cams.view_embedding(torch.tensor([30.0, 0.0]))
    assert e.shape == (2, 16, 4)
    assert torch.allclose(e[0, :, 0], torch.zeros(16))  # same elevation as the views
    assert torch.allclose(e[1, :, 0], torch.full((16,), -math.radians(30)))  # zero123's sign
    assert torch.allclose(e[0, 4, 1:3], torch.tensor([1.0, 0.0]), atol=1e-6)  # azimuth 90: sin 1, cos 0
    assert (e[..., 3] == 0).all()


def test_the_data_module_yields_the_syncdreamer_table():
    from lift3d.data.multiview_images import MultiviewImagesConfig, MultiviewImagesDataModule

    dm = MultiviewImagesDataModule.__new__(MultiviewImagesDataModule)
    dm._tables = {}
    table = dm.view_table(MultiviewImagesConfig(pose_table="syncdreamer", views_distance=3.0))
    assert len(table["elevation"]) == 16 and torch.equal(table["azimuth"], cams.view_table()["azimuth"])
    assert (table["distance"] == 3.0).all()


# ---------------------------------------------------------------------------------------------
# Sampling


def test_ddim_timesteps_are_the_authors():
    from lift3d.priors.syncdreamer.sampler import ddim_timesteps

    ts = ddim_timesteps(1000, 50)
    assert ts[0] == 1 and ts[-1] == 981 and len(ts) == 50


def test_sampling_is_deterministic_given_a_seed(model):
    from lift3d.priors.syncdreamer.sampler import sample_views

    img = torch.rand(1, 3, VIEW, VIEW, generator=torch.Generator().manual_seed(3))
    a = sample_views(model, img, 30.0, steps=2, seed=7)
    b = sample_views(model, img, 30.0, steps=2, seed=7)
    c = sample_views(model, img, 30.0, steps=2, seed=8)
    assert a.views.shape == (16, 3, VIEW, VIEW)
    assert torch.equal(a.views, b.views)
    assert (a.views - c.views).abs().max() > 1e-4
    assert torch.equal(a.cameras["azimuth"], cams.view_table()["azimuth"])


def test_the_sample_command_writes_a_views_folder(folder, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from lift3d.priors.syncdreamer.__main__ import main
    from lift3d.priors.zero123pp.views import read_views

    img = np.zeros((40, 30, 4), dtype=np.uint8)
    img[10:30, 8:20] = [30, 200, 60, 255]
    iio.imwrite(tmp_path / "in.png", img)
    out = tmp_path / "views"
    rc = main(["sample", "--image", str(tmp_path / "in.png"), "--elevation", "20", "--out", str(out),
               "--model", str(folder), "--steps", "1", "--device", "cpu", "--distance", "3"])
    assert rc == 0
    vs = read_views(out)
    assert len(vs) == 16 and vs.rgb.shape[1:3] == (VIEW, VIEW) and vs.background == (1.0, 1.0, 1.0)
    assert torch.allclose(vs.cameras["fovy"], torch.full((16,), cams.FOVY)) and (vs.cameras["distance"] == 3).all()
    doc = json.loads((out / "cameras.json").read_text())
    assert doc["record"]["generator"] == "syncdreamer" and doc["record"]["input_elevation"] == 20.0
    assert (out / "input.png").is_file() and (out / "grid.png").is_file()


def test_the_sample_command_stops_on_missing_weights(tmp_path, capsys):
    import imageio.v3 as iio
    import numpy as np

    from lift3d.priors.syncdreamer.__main__ import main

    iio.imwrite(tmp_path / "in.png", np.full((8, 8, 3), 255, dtype=np.uint8))
    rc = main(["sample", "--image", str(tmp_path / "in.png"), "--elevation", "30", "--out", str(tmp_path / "o"),
               "--model", str(tmp_path / "absent.ckpt"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "absent.ckpt" in err and "syncdreamer-pretrain.ckpt" in err
    assert not (tmp_path / "o").exists()


def test_the_guidance_samples_once_and_reuses_its_cache(folder, tmp_path, monkeypatch):
    import imageio.v3 as iio
    import numpy as np

    from lift3d.config import parse_structured
    from lift3d.registry import find

    img = np.zeros((24, 24, 4), dtype=np.uint8)
    img[6:18, 6:18] = [200, 40, 40, 255]
    iio.imwrite(tmp_path / "in.png", img)
    cls = find("syncdreamer-guidance", "guidance")
    conf = {"pretrained_model_name_or_path": str(folder), "image_path": str(tmp_path / "in.png"),
            "num_inference_steps": 1, "cache_dir": str(tmp_path / "cache")}
    g = cls(parse_structured(cls.Config, conf), cfg_key="system.guidance")
    vs = g.prepare()
    assert len(vs) == 16 and (tmp_path / "cache" / "cameras.json").is_file()
    calls = []
    monkeypatch.setattr(cls, "generate", lambda *a, **k: calls.append(1))
    g2 = cls(parse_structured(cls.Config, conf), cfg_key="system.guidance")
    assert torch.allclose(g2.prepare().rgb, vs.rgb, atol=1 / 255) and not calls
    with pytest.raises(ConfigError, match="views_dir"):
        cls(parse_structured(cls.Config, {**conf, "views_dir": str(tmp_path / "nope")}), cfg_key="system.guidance")
