"""Systems with several named guidances, the reference-view sub-step, and start-up checks."""

from __future__ import annotations

import json

import imageio.v3 as iio
import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from conftest import tiny_system_config
from lift3d.config import ConfigError
from lift3d.data.random_cameras import RandomCameraDataModule
from lift3d.data.single_image import SingleImageDataModule
from lift3d.launch import run
from lift3d.systems.text_to_3d import TextTo3DSystem
from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint

DATA = {"height": 4, "width": 4, "eval_height": 4, "eval_width": 4, "n_val_views": 1, "n_test_views": 2}
REF = {"guidances": {"ref": {"guidance_type": "reference-image-guidance", "views": "ref"}}}


@pytest.fixture
def red_png(tmp_path):
    """An RGBA image: a red square on a transparent background."""
    img = np.zeros((8, 8, 4), dtype=np.uint8)
    img[2:6, 2:6] = [230, 20, 20, 255]
    path = tmp_path / "red.png"
    iio.imwrite(path, img)
    return path


def fit(system, dm, steps, tmp):
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
                         callbacks=[LastCheckpoint(tmp / "ckpts", 0)], default_root_dir=str(tmp))
    trainer.fit(system, datamodule=dm, weights_only=True)
    return trainer


def test_reference_view_substep_pulls_towards_the_image_and_names_its_terms(tmp_path, red_png):
    cfg = tiny_system_config(**REF, loss={"lambda_mse": 0.0, "lambda_ref_rgb": 1.0, "lambda_ref_mask": 0.0},
                             optimizer={"name": "Adam", "args": {"lr": 0.1}})
    system = TextTo3DSystem(cfg, seed=0)
    seen = []
    original = system.renderer.forward

    def spy(**batch):
        seen.append(tuple(batch["rays_o"].shape[:3]))
        return original(**batch)

    system.renderer.forward = spy
    dm = SingleImageDataModule({**DATA, "batch_size": 2, "image_path": str(red_png), "recenter": False,
                                "ref_height": 8, "ref_width": 8}, seed=0)
    trainer = fit(system, dm, 30, tmp_path)
    # Each step renders the reference view (1 x 8 x 8) first, then the random views (2 x 4 x 4).
    assert seen[:2] == [(1, 8, 8), (2, 4, 4)] and len(seen) == 60
    assert {"train/loss_ref_rgb", "train/ref_psnr"} <= set(trainer.callback_metrics)
    # The flat colour moved to the image's mean colour (a quarter red, three quarters black).
    rgb, want = torch.sigmoid(system.geometry.color_logit.detach()), torch.tensor([230.0, 20.0, 20.0]) / 255 / 4
    assert (rgb - want).norm() < 0.3 * (torch.full((3,), 0.5) - want).norm()


def test_named_guidance_terms_need_their_own_weights(tmp_path, red_png):
    system = TextTo3DSystem(tiny_system_config(**REF), seed=0)
    dm = SingleImageDataModule({**DATA, "image_path": str(red_png), "recenter": False}, seed=0)
    with pytest.raises(ConfigError, match="'loss_ref_rgb' loss term has no weight: add system.loss.lambda_ref_rgb"):
        fit(system, dm, 1, tmp_path)


def test_reference_guidance_without_reference_data_fails_at_start_up():
    system = TextTo3DSystem(tiny_system_config(**REF), seed=0)
    with pytest.raises(ConfigError, match="system.guidances.ref.guidance: guidance 'reference-image-guidance' "
                                          "needs a reference image.*single-image-datamodule"):
        system.check_data(RandomCameraDataModule(DATA, seed=0))


def test_a_stage_can_add_change_and_remove_named_guidances():
    cfg = tiny_system_config(stages=[
        {"name": "a", "steps": 1},
        {"name": "b", "steps": 1, "guidances": {"extra": {"guidance_type": "test-target-guidance",
                                                          "guidance": {"target": [0.0, 1.0, 0.0]}}}},
        {"name": "c", "steps": 1, "guidances": {"extra": {"guidance": {"weight": 2.0}}}},
        {"name": "d", "steps": 1, "guidances": {"extra": None}},
    ])
    s = TextTo3DSystem(cfg)
    names = [sorted(s.guidance_specs(i)) for i in range(4)]
    assert names == [["guidance"], ["extra", "guidance"], ["extra", "guidance"], ["guidance"]]
    c = s.guidance_specs(2)["extra"]
    assert c.config == {"target": [0.0, 1.0, 0.0], "weight": 2.0} and c.loss_name("loss_mse") == "loss_extra_mse"


@pytest.mark.parametrize("where, over, match", [
    ("a later stage's guidance", {"stages": [{"name": "a", "steps": 1}, {"name": "b", "steps": 1,
                                                                       "guidance": {"targt": [0, 0, 0]}}]},
     r"system.stages\[1\].guidance.*targt"),
    ("the exporter", {"exporter": {"no_such_key": 1}}, "system.exporter.*no_such_key"),
    ("the prompt processor", {"prompt_processor": {"promt": "x"}}, "system.prompt_processor.*promt"),
    ("a named guidance", {"guidances": {"x": {"guidance_type": "test-target-guidance", "guidance": {"wieght": 1}}}},
     "system.guidances.x.guidance.*wieght"),
    ("a named guidance's slot", {"guidances": {"x": {"guidance_type": "test-target-guidance", "view": "ref"}}},
     "system.guidances.x.*view"),
    ("a later stage's prompt processor", {"stages": [{"name": "a", "steps": 1}, {
        "name": "b", "steps": 1, "prompt_processor": {"promt": "x"}}]}, r"system.stages\[1\].prompt_processor.*promt"),
    ("a later stage's renderer", {"stages": [{"name": "a", "steps": 1}, {"name": "b", "steps": 1,
                                                                       "renderer": {"opacty": 1.0}}]},
     r"system.stages\[1\].renderer.*opacty"),
])
def test_every_slot_of_every_stage_is_parsed_strictly_at_start_up(where, over, match):
    with pytest.raises(ConfigError, match=match):
        TextTo3DSystem(tiny_system_config(**over))


def test_a_missing_main_guidance_is_named():
    with pytest.raises(ConfigError, match="system.guidance_type is not set; registered guidance modules: .*toyworld-guidance"):
        TextTo3DSystem(tiny_system_config(guidance_type=""))


def test_a_normal_map_guidance_behind_a_renderer_without_normals_fails_at_start_up():
    with pytest.raises(ConfigError, match="guidance 'toyworld-guidance' scores normal maps, but renderer "
                                          "'test-flat-renderer' in stage 'main' returns none"):
        TextTo3DSystem(tiny_system_config(guidance_type="toyworld-guidance", guidance={"image": "normal"}))


def test_guidances_and_prompt_processor_are_built_only_for_training(tmp_path, tiny_recipe, monkeypatch):
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={tmp_path}", "trainer.max_steps=2"]) == 0
    (ckpt,) = tmp_path.glob("tiny-test/*/ckpts/last.ckpt")
    from conftest import TargetGuidance
    from lift3d.prompts.base import PlainPromptProcessor

    def refuse(*a, **k):
        raise AssertionError("built outside training")

    monkeypatch.setattr(TargetGuidance, "configure", refuse)
    monkeypatch.setattr(PlainPromptProcessor, "__call__", refuse)
    assert run(["--config", str(tiny_recipe), "--export", f"resume={ckpt}"]) == 0
    assert run(["--config", str(tiny_recipe), "--test", f"resume={ckpt}"]) == 0
    exported = list(tmp_path.glob("tiny-test/*/save/it2-export/model.json"))
    assert exported and len(json.loads(exported[0].read_text())["rgb"]) == 3


def test_a_point_guidance_needs_a_point_geometry_and_gets_its_points(tmp_path):
    """A guidance that requires points fails at start-up without them and gets the Gaussians' centres."""
    from dataclasses import dataclass as dc

    from lift3d.guidance.base import BaseGuidance, GuidanceOutput
    from lift3d.registry import register

    @register("test-points-guidance")
    class PointsGuidance(BaseGuidance):
        @dc
        class Config(BaseGuidance.Config):
            pass

        @classmethod
        def requires(cls, cfg):
            return frozenset({"points"})

        def forward(self, inp, t=None, noise=None):
            # pull every centre to the origin, and colours to white
            return GuidanceOutput({"loss_pts": inp.points.pow(2).sum(-1).mean() + (1 - inp.point_colors).mean()})

    with pytest.raises(ConfigError, match="scores the geometry's points, but geometry 'test-param-geometry'"):
        TextTo3DSystem(tiny_system_config(guidance_type="test-points-guidance", loss={"lambda_pts": 1.0}))
    cfg = tiny_system_config(guidance_type="test-points-guidance", loss={"lambda_pts": 1.0},
                             geometry_type="gaussian-splatting", geometry={"init": "ball:0.5", "n_init": 50, "seed": 0},
                             renderer_type="gaussian-splatting-renderer", renderer={},
                             material_type="neural-radiance-material", material={},
                             optimizer={"name": "Adam", "args": {"lr": 0.01}})
    system = TextTo3DSystem(cfg, seed=0)
    before = system.geometry.xyz.detach().norm(dim=-1).mean()
    fit(system, RandomCameraDataModule(DATA, seed=0), 10, tmp_path)
    assert system.geometry.xyz.detach().norm(dim=-1).mean() < before


def test_a_stage_can_swap_the_prompt_processor(tmp_path, monkeypatch):
    # IF's coarse stage reads T5 states, SD's fine stage CLIP states: each stage's guidance must get
    # its own processor's output, computed once per processor, also after a resume into the stage.
    from conftest import TargetGuidance
    from lift3d.prompts.base import PlainPromptProcessor

    seen, calls = [], []
    forward, call = TargetGuidance.forward, PlainPromptProcessor.__call__

    def spy_forward(self, inp, *a, **k):
        seen.append(inp.prompt.prompt)
        return forward(self, inp, *a, **k)

    def spy_call(self, *a, **k):
        calls.append(self.cfg.prompt)
        return call(self, *a, **k)

    monkeypatch.setattr(TargetGuidance, "forward", spy_forward)
    monkeypatch.setattr(PlainPromptProcessor, "__call__", spy_call)
    cfg = tiny_system_config(prompt_processor={"prompt": "a red cube"}, stages=[
        {"name": "a", "steps": 2},
        {"name": "b", "steps": 2, "prompt_processor": {"prompt": "a blue cube"}},
        {"name": "c", "steps": 2, "loss": {"lambda_mse": 0.5}},
    ])
    system = TextTo3DSystem(cfg, seed=0)
    assert sorted(system.slot_spec(1, "prompt_processor")[1].items()) == [
        ("prompt", "a blue cube")]
    fit(system, RandomCameraDataModule(DATA, seed=0), 6, tmp_path)
    assert seen == ["a red cube"] * 2 + ["a blue cube"] * 4
    assert calls == ["a red cube", "a blue cube"]  # stage c keeps stage b's processor and its output

    (ckpt,) = tmp_path.glob("ckpts/*.ckpt")
    seen.clear(), calls.clear()
    resumed = TextTo3DSystem(cfg, seed=0)
    state = torch.load(ckpt, weights_only=True)
    state["global_step"], state["lift3d"]["stage_index"] = 3, 1  # mid-stage b
    resumed.check_checkpoint(state, "test")
    assert resumed.prompt_utils.prompt == "a blue cube" and calls == ["a blue cube"]


def test_a_view_group_guidance_and_the_data_must_agree_on_the_group_size_at_start_up():
    cfg = tiny_system_config(guidance_type="toyworld-mv-guidance", guidance={"n_views": 4})
    system = TextTo3DSystem(cfg, seed=0)
    with pytest.raises(ConfigError, match=r"system.guidance.n_views: guidance 'toyworld-mv-guidance' scores views "
                                          r"in groups of 4, but the data module samples groups of data.n_views = 1"):
        system.check_data(RandomCameraDataModule(DATA, seed=0))
    system.check_data(RandomCameraDataModule({**DATA, "n_views": 4, "batch_size": 4}, seed=0))
