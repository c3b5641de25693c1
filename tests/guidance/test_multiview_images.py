"""multiview-images-guidance and multiview-images-datamodule: reconstruction from generated views."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import CameraBatch, GuidanceInput
from lift3d.priors.zero123pp.poses import view_cameras
from lift3d.priors.zero123pp.views import read_record, read_views, write_views
from lift3d.registry import find
from lift3d.utils.cameras import make_cameras
from tiny_zero123pp import VIEW_SIZE, tiny_zero123pp  # noqa: F401

GREY = 128 / 255  # 8-bit exact, so a render can equal the written views
RED = torch.tensor([230.0, 26.0, 26.0]) / 255


def sphere_views(cams: dict, radius: float, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An analytic render of a red ball of ``radius`` at the origin over grey: rgb [N, H, W, 3] and
    opacity [N, H, W, 1]."""
    c = make_cameras(cams["elevation"], cams["azimuth"], cams["distance"], cams["fovy"], size, size)
    o, d = c["rays_o"], torch.nn.functional.normalize(c["rays_d"], dim=-1)
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - radius * radius)
    hit = (disc > 0).float()[..., None]
    return hit * RED + (1 - hit) * GREY, hit


def batch_for(cams: dict, idx: list[int], size: int) -> dict:
    i = torch.tensor(idx)
    b = make_cameras(cams["elevation"][i], cams["azimuth"][i], cams["distance"][i], cams["fovy"][i], size, size)
    b["view_index"] = i
    return b


@pytest.fixture
def sphere_folder(tmp_path) -> Path:
    cams = view_cameras("v1.2")
    rgb, _ = sphere_views(cams, 0.8, 24)
    return write_views(tmp_path / "views", rgb.permute(0, 3, 1, 2), cams, background=(GREY, GREY, GREY))


def guidance(**cfg):
    return find("multiview-images-guidance", "guidance")(cfg)


def test_losses_vanish_for_a_scene_that_renders_the_views_and_grow_otherwise(sphere_folder):
    g = guidance(views_dir=str(sphere_folder), mask_loss="bce")
    cams = view_cameras("v1.2")
    idx = [4, 1, 3]
    batch = batch_for(cams, idx, 24)
    cameras = CameraBatch.from_batch(batch)
    sub = {k: v[idx] for k, v in cams.items()}
    exact_rgb, exact_op = sphere_views(sub, 0.8, 24)
    out = g(GuidanceInput(cameras=cameras, rgb=exact_rgb, opacity=exact_op, extras=batch))
    assert float(out["loss_rgb"]) == 0.0
    assert float(out["loss_mask"]) < 1e-4  # bce of a hard 0/1 opacity clamped at 1e-5
    assert float(out["mask_iou"]) == 1.0
    # A smaller ball: both terms grow, and the silhouette no longer matches.
    small_rgb, small_op = sphere_views(sub, 0.6, 24)
    out2 = g(GuidanceInput(cameras=cameras, rgb=small_rgb, opacity=small_op, extras=batch))
    assert float(out2["loss_rgb"]) > 1e-3 and float(out2["loss_mask"]) > 0.1
    assert float(out2["mask_iou"]) < 0.9
    # The masks came from the grey background: the views are RGB.
    assert read_views(sphere_folder).alpha is None


def test_renders_at_another_resolution_are_compared_with_resized_views(sphere_folder):
    g = guidance(views_dir=str(sphere_folder))
    cams = view_cameras("v1.2")
    batch = batch_for(cams, [0, 5], 12)
    rgb = torch.full((2, 12, 12, 3), GREY, requires_grad=True)
    out = g(GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=rgb, opacity=torch.zeros(2, 12, 12, 1),
                          extras=batch))
    (out["loss_rgb"] + out["loss_mask"]).backward()
    assert rgb.grad is not None and rgb.grad.abs().sum() > 0
    targets, masks = g.targets(12, 12, torch.device("cpu"), torch.float32)
    assert targets.shape == (6, 12, 12, 3) and masks.shape == (6, 12, 12, 1)


def test_cameras_other_than_the_views_are_refused(sphere_folder):
    g = guidance(views_dir=str(sphere_folder))
    cams = view_cameras("v1.1", fovy_deg=30.0)  # other elevations
    batch = batch_for(cams, [0], 24)
    with pytest.raises(ConfigError, match="elevation"):
        g(GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=torch.zeros(1, 24, 24, 3),
                        opacity=torch.zeros(1, 24, 24, 1), extras=batch))
    batch.pop("view_index")
    with pytest.raises(ConfigError, match="none of the views"):
        g(GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=torch.zeros(1, 24, 24, 3),
                        opacity=torch.zeros(1, 24, 24, 1), extras=batch))


def test_a_batch_without_view_index_is_matched_to_the_views_by_camera(sphere_folder):
    g = guidance(views_dir=str(sphere_folder))
    cams = view_cameras("v1.2")
    batch = batch_for(cams, [5, 0, 2], 24)
    inp = GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=torch.zeros(3, 24, 24, 3),
                        opacity=torch.zeros(3, 24, 24, 1), extras={})
    g.prepare()
    assert g.match_cameras(inp).tolist() == [5, 0, 2]
    with_index = g(GuidanceInput(**{**vars(inp), "extras": batch}))
    without = g(inp)
    assert torch.equal(with_index["loss_rgb"], without["loss_rgb"])


def test_rgba_views_give_their_alpha_as_the_mask(tmp_path):
    cams = view_cameras("v1.2")
    rgba = torch.rand(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rgba[:, 3] = (rgba[:, 3] > 0.5).float()
    folder = write_views(tmp_path / "v", rgba, cams)
    vs = read_views(folder)
    assert vs.alpha is not None and torch.equal(vs.alpha, rgba[:, 3])
    g = guidance(views_dir=str(folder))
    g.prepare()
    _, masks = g.targets(8, 8, torch.device("cpu"), torch.float32)
    assert torch.equal(masks[..., 0], rgba[:, 3])


def test_a_views_folder_needs_no_weights_and_a_missing_one_is_named(tmp_path, sphere_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cls = find("multiview-images-guidance", "guidance")
    assert cls.missing_weights(cls.Config(views_dir=str(sphere_folder))) is None
    assert "hf download sudo-ai/zero123plus-v1.2" in cls.missing_weights(cls.Config())
    with pytest.raises(ConfigError, match="cameras.json"):
        guidance(views_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Sampling once, and the cache


def _input_png(tmp_path: Path) -> Path:
    img = np.zeros((24, 24, 4), dtype=np.uint8)
    img[6:18, 8:16] = [200, 40, 40, 255]
    iio.imwrite(tmp_path / "in.png", img)
    return tmp_path / "in.png"


def test_sampled_views_are_cached_and_reused(tiny_zero123pp, tmp_path, monkeypatch):
    cls = find("multiview-images-guidance", "guidance")
    cfg = dict(pretrained_model_name_or_path=str(tiny_zero123pp), image_path=str(_input_png(tmp_path)),
               view_size=VIEW_SIZE, num_inference_steps=2)
    cams = view_cameras("v1.2")
    batch = batch_for(cams, [2, 3], VIEW_SIZE)
    cache = tmp_path / "trial" / "views"
    batch["views_cache"] = str(cache)  # what multiview-images-datamodule adds inside a run

    def inp():
        return GuidanceInput(cameras=CameraBatch.from_batch(batch), rgb=torch.rand(2, VIEW_SIZE, VIEW_SIZE, 3),
                             opacity=torch.rand(2, VIEW_SIZE, VIEW_SIZE, 1), extras=batch)

    calls = []
    original = cls.generate
    monkeypatch.setattr(cls, "generate", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = cls(cfg)
    out1 = first(inp())
    assert calls == [1] and (cache / "cameras.json").is_file() and (cache / "grid.png").is_file()
    assert read_record(cache)["seed"] == 0
    # A new guidance (a resumed run) reads the folder: no sampling, the same views and losses.
    second = cls(cfg)
    x = inp()
    out2 = second(x)
    assert calls == [1]
    assert torch.equal(second.views.rgb, read_views(cache).rgb)
    assert torch.allclose(first.views.rgb, second.views.rgb, atol=1 / 255)  # 8-bit files
    assert torch.isfinite(out2["loss_rgb"]) and torch.isfinite(out1["loss_rgb"])
    # Other settings (a seed) do not match the folder's record: sampled again, and the record follows.
    third = cls({**cfg, "seed": 1})
    third(inp())
    assert calls == [1, 1] and read_record(cache)["seed"] == 1


# ---------------------------------------------------------------------------------------------
# The data module


def _data(tmp_path: Path, **over):
    cfg = {"image_path": str(_input_png(tmp_path)), "height": 16, "width": 16, "batch_size": 2, **over}
    return find("multiview-images-datamodule", "data")(cfg, seed=3)


def test_the_data_module_yields_the_views_cameras(tmp_path, sphere_folder):
    dm = _data(tmp_path)
    b = dm.training_batch(5)
    idx = b["view_index"]
    assert idx.shape == (2,) and len(set(idx.tolist())) == 2
    table = view_cameras("v1.2")
    for k, key in (("elevation", "elevation"), ("azimuth", "azimuth"), ("distance", "camera_distances")):
        assert torch.equal(b[key], table[k][idx])
    assert b["shading"] == "albedo" and "ref" in b and b["rays_o"].shape == (2, 16, 16, 3)
    assert torch.equal(dm.training_batch(5)["view_index"], idx)  # a pure function of (seed, step)
    seen = {int(i) for s in range(20) for i in dm.training_batch(s)["view_index"]}
    assert seen == set(range(6))
    folder_dm = _data(tmp_path, views_dir=str(sphere_folder), batch_size=6)
    assert sorted(folder_dm.training_batch(0)["view_index"].tolist()) == list(range(6))


def test_the_data_module_checks_its_views_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="only 6 views"):
        _data(tmp_path, batch_size=7)
    with pytest.raises(ConfigError, match="views_fovy_deg"):
        _data(tmp_path, pose_table="zero123pp-v1.1")
    dm = _data(tmp_path, pose_table="zero123pp-v1.1", views_fovy_deg=35.0)
    assert float(dm.training_batch(0)["fovy"][0]) == 35.0
    assert set(dm.view_table(dm.cfg)["elevation"].tolist()) == {30.0, -20.0}
    with pytest.raises(ConfigError, match="cameras.json"):
        _data(tmp_path, views_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The recipe: views sampled once into the trial folder, reused on resume


def test_the_recipe_samples_once_and_a_resumed_run_reuses_the_trials_views(tiny_zero123pp, tmp_path, monkeypatch):
    from lift3d.launch import run

    repo = Path(__file__).resolve().parents[2]
    cls = find("multiview-images-guidance", "guidance")
    over = [f"image={_input_png(tmp_path)}", f"exp_root_dir={tmp_path / 'out'}",
            f"system.guidance.pretrained_model_name_or_path={tiny_zero123pp}", f"system.guidance.view_size={VIEW_SIZE}",
            "system.guidance.num_inference_steps=2", "data.height=16", "data.width=16", "data.ref_height=16",
            "data.ref_width=16", "data.eval_height=16", "data.eval_width=16", "data.n_val_views=1",
            "data.n_test_views=2", "data.batch_size=2", "system.geometry.isosurface_resolution=32",
            "system.renderer.num_samples_per_ray=16", "system.exporter.texture_size=64",
            "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "checkpoint.every_n_train_steps=2"]
    assert run(["--config", str(repo / "configs/zero123pp.yaml"), "--train", "trainer.max_steps=2"] + over) == 0
    trial = next((tmp_path / "out").glob("*/*"))
    views = trial / "views"
    assert (views / "cameras.json").is_file() and len(list(views.glob("view_*.png"))) == 6
    before = read_views(views).rgb

    def no_sampling(self, *a, **k):
        raise AssertionError("sampled again on resume")

    monkeypatch.setattr(cls, "generate", no_sampling)
    assert run(["--config", str(repo / "configs/zero123pp.yaml"), "--train", "trainer.max_steps=3",
                f"resume={trial / 'ckpts' / 'last.ckpt'}"] + over) == 0
    assert torch.equal(read_views(views).rgb, before)
    assert list(trial.glob("save/it3-export/*"))


def test_pose_table_views_turn_with_the_input_view_and_a_folders_do_not(tmp_path, sphere_folder):
    table = view_cameras("v1.2")
    turned = _data(tmp_path, ref_azimuth_deg=30.0, batch_size=6)
    b = turned.training_batch(0)
    want = torch.remainder(table["azimuth"][b["view_index"]] + 30.0 + 180.0, 360.0) - 180.0
    assert torch.allclose(b["azimuth"], want) and b["input_azimuth"] == 30.0
    assert sorted(torch.round(b["azimuth"]).tolist()) == [-180.0, -120.0, -60.0, 0.0, 60.0, 120.0]
    # a folder's cameras.json holds where its views are: no turn, and nothing for the guidance to add
    folder = _data(tmp_path, views_dir=str(sphere_folder), ref_azimuth_deg=30.0, batch_size=6).training_batch(0)
    own = read_views(sphere_folder).cameras["azimuth"]
    assert torch.allclose(folder["azimuth"], own[folder["view_index"]]) and "input_azimuth" not in folder
