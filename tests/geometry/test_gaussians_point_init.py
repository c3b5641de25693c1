"""Gaussians initialised from point clouds: plain PLY files, and a cloud sampled in-run by a guidance
(``init: guidance:NAME``, GSGEN's Point-E initialisation), which a resumed run must not sample again."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lift3d.config import ConfigError
from lift3d.guidance.base import BaseGuidance, GuidanceOutput
from lift3d.registry import find, register
from lift3d.utils.gaussian_math import sh_to_rgb
from lift3d.utils.point_cloud_io import write_point_cloud_ply

GEO = "gaussian-splatting"


def gaussians(**cfg):
    return find(GEO, "geometry")({"init_opacity": 0.5, **cfg})


# -- PLY files -----------------------------------------------------------------------------------


def test_a_plain_point_cloud_ply_gives_one_gaussian_per_point_with_its_colour(tmp_path):
    g = torch.Generator().manual_seed(0)
    xyz, rgb = torch.rand(30, 3, generator=g) - 0.5, torch.rand(30, 3, generator=g)
    path = write_point_cloud_ply(tmp_path / "cloud.ply", xyz, rgb)
    geo = gaussians(init=f"ply:{path}")
    assert geo.num_points == 30
    torch.testing.assert_close(geo.xyz.detach(), xyz)
    torch.testing.assert_close(sh_to_rgb(geo.features_dc.detach()), rgb, atol=0.5 / 255 + 1e-5, rtol=0)
    assert geo.pending_init is None


def _write_ascii_ply(path, names_types, rows):
    header = ["ply", "format ascii 1.0", f"element vertex {len(rows)}"]
    header += [f"property {t} {n}" for n, t in names_types] + ["end_header"]
    path.write_text("\n".join(header + [" ".join(str(v) for v in r) for r in rows]) + "\n")
    return path


def test_float_colours_are_kept_and_a_cloud_without_colours_takes_init_color(tmp_path):
    p = _write_ascii_ply(tmp_path / "f.ply", [("x", "float"), ("y", "float"), ("z", "float"), ("red", "float"),
                                               ("green", "float"), ("blue", "float")],
                         [[0, 0, 0, 0.2, 0.4, 0.6], [0.1, 0, 0, 0.2, 0.4, 0.6]])
    geo = gaussians(init=f"ply:{p}", color_mode="rgb")
    torch.testing.assert_close(torch.sigmoid(geo.features_dc.detach()), torch.tensor([[0.2, 0.4, 0.6]] * 2))
    q = _write_ascii_ply(tmp_path / "plain.ply", [("x", "double"), ("y", "double"), ("z", "double")],
                         [[0, 0, 0], [0, 0.1, 0], [0, 0, 0.1]])
    geo = gaussians(init=f"ply:{q}", init_color=[0.25, 0.5, 0.75])
    assert geo.num_points == 3
    torch.testing.assert_close(sh_to_rgb(geo.features_dc.detach()), torch.tensor([[0.25, 0.5, 0.75]] * 3))


def test_a_ply_of_neither_layout_is_named_with_its_fields(tmp_path):
    p = _write_ascii_ply(tmp_path / "odd.ply", [("u", "float"), ("v", "float")], [[0, 1], [2, 3]])
    with pytest.raises(ConfigError) as info:
        gaussians(init=f"ply:{p}")
    msg = str(info.value)
    assert str(p) in msg and "fields: u, v" in msg and "red, green, blue" in msg and "f_dc_0" in msg
    with pytest.raises(ConfigError, match="does not exist"):
        gaussians(init=f"ply:{tmp_path / 'absent.ply'}")
    bad = tmp_path / "bad.ply"
    bad.write_text("not a ply\n")
    with pytest.raises(ConfigError, match=r"bad\.ply cannot be read"):
        gaussians(init=f"ply:{bad}")


def test_a_3dgs_ply_still_round_trips(tmp_path):
    geo = gaussians(init="ball:0.5", n_init=20, seed=0)
    geo.export_ply(tmp_path / "g.ply")
    back = gaussians(init=f"ply:{tmp_path / 'g.ply'}")
    for name in ("xyz", "features_dc", "scaling", "rotation", "opacity"):
        torch.testing.assert_close(getattr(back, name), getattr(geo, name))


# -- init: guidance:NAME ---------------------------------------------------------------------------


@register("test-cloud-sampling-guidance")
class CloudGuidance(BaseGuidance):
    """Samples a random cloud (from the global generator) and pulls the points to the origin."""

    @dataclass
    class Config:
        n: int = 64

    calls: list = []

    @classmethod
    def requires(cls, cfg):
        return frozenset({"points"})

    def sample_init_points(self, prompt):
        type(self).calls.append(prompt)
        return torch.rand(self.cfg.n, 3) - 0.5, torch.rand(self.cfg.n, 3)

    def forward(self, inp, t=None, noise=None):
        return GuidanceOutput(losses={"loss_cloud": inp.points.square().sum()})


@register("test-plain-guidance")
class PlainGuidance(BaseGuidance):
    def forward(self, inp, t=None, noise=None):
        return GuidanceOutput(losses={"loss_plain": inp.rgb.mean()})


def system_config(init="guidance:cloud", guidances=None) -> dict:
    return {
        "geometry_type": GEO, "geometry": {"init": init, "init_opacity": 0.5},
        "renderer_type": "gaussian-splatting-renderer", "material_type": "neural-radiance-material",
        "material": {"color_activation": "none"},
        "guidance_type": "test-plain-guidance",
        "guidances": guidances if guidances is not None else
        {"cloud": {"guidance_type": "test-cloud-sampling-guidance", "guidance": {"n": 64}}},
        "prompt_processor_type": "plain-prompt-processor", "prompt_processor": {"prompt": "a chair"},
        "loss": {"lambda_plain": 1.0, "lambda_cloud_cloud": 0.1},
    }


def build_system(seed=0, **kw):
    return find("text-to-3d-system")(system_config(**kw), seed=seed)


def test_the_geometry_waits_for_the_named_guidance_until_training_starts():
    geo = gaussians(init="guidance:point_e")
    assert geo.pending_init == "point_e" and geo.num_points == 0
    assert find(GEO).init_guidance(geo.cfg) == "point_e" and find(GEO).init_guidance(gaussians().cfg) is None
    geo.init_from_points(torch.rand(10, 3), torch.rand(10, 3))
    assert geo.pending_init is None and geo.num_points == 10
    given = find(GEO, "geometry")({"init": "guidance:x"}, init_points=torch.rand(7, 3))  # a builder's cloud wins
    assert given.pending_init is None and given.num_points == 7
    with pytest.raises(ConfigError, match="needs the name"):
        gaussians(init="guidance:")


def test_the_system_initialises_from_the_guidance_sample_from_the_seed_alone():
    CloudGuidance.calls.clear()
    a = build_system(seed=3)
    assert a.geometry.num_points == 0 and CloudGuidance.calls == []  # building samples nothing
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a.init_geometry_from_guidance()
    assert torch.equal(torch.get_rng_state(), before)  # the run's random stream is untouched
    assert CloudGuidance.calls == ["a chair"] and a.geometry.num_points == 64 and a.geometry.pending_init is None
    b = build_system(seed=3)
    torch.manual_seed(999)
    b.init_geometry_from_guidance()
    c = build_system(seed=4)
    c.init_geometry_from_guidance()
    assert torch.equal(a.geometry.xyz, b.geometry.xyz)
    assert not torch.equal(a.geometry.xyz, c.geometry.xyz)
    a.init_geometry_from_guidance()  # nothing pending: no second sample
    assert len(CloudGuidance.calls) == 3


def test_a_resumed_system_keeps_its_checkpoint_and_samples_nothing():
    CloudGuidance.calls.clear()
    a = build_system()
    a.init_geometry_from_guidance()
    with torch.no_grad():
        a.geometry.xyz.add_(0.25)  # "trained"
    state = a.state_dict()
    b = build_system()
    b.load_state_dict(state)
    assert b.geometry.pending_init is None
    b.init_geometry_from_guidance()
    assert CloudGuidance.calls == ["a chair"]  # only a's
    assert torch.equal(b.geometry.xyz, a.geometry.xyz)


def test_bad_init_guidances_fail_at_start_up():
    with pytest.raises(ConfigError, match=r"init: 'guidance:nope' names no guidance .*cloud"):
        build_system(init="guidance:nope")
    with pytest.raises(ConfigError, match=r"guidance 'guidance' \(test-plain-guidance\) cannot sample"):
        build_system(init="guidance:guidance")


def test_a_two_step_run_starts_from_the_sampled_cloud(tmp_path):
    """Through the launcher: the cloud is sampled at fit start, the optimizer steps the new Gaussians."""
    import yaml

    from lift3d.launch import run

    CloudGuidance.calls.clear()
    cfg = {
        "name": "cloud-init", "prompt": "a chair", "exp_root_dir": str(tmp_path / "out"), "seed": 1,
        "data": {"height": 16, "width": 16, "eval_height": 16, "eval_width": 16, "n_val_views": 1,
                 "n_test_views": 1, "batch_size": 1},
        "system": {**system_config(), "optimizer": {"name": "Adam", "args": {"lr": 0.01}},
                   "exporter": {"fmt": ["obj"]}},
        "trainer": {"max_steps": 2, "val_check_interval": None, "enable_progress_bar": False},
    }
    cfg["system"]["geometry"].update({"isosurface_resolution": 16, "density_thresh": 0.01})
    path = tmp_path / "cloud.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run(["--config", str(path), "--train"]) == 0
    assert CloudGuidance.calls == ["a chair"]
    trial = next((tmp_path / "out").glob("*/*"))
    ckpt = torch.load(trial / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    xyz = ckpt["state_dict"]["geometry.xyz"]
    assert xyz.shape == (64, 3)
    # the Gaussians that the optimizer stepped are the sampled ones (pulled towards the origin by loss_cloud)
    torch.manual_seed(1)
    start = torch.rand(64, 3) - 0.5
    assert float((xyz - start).abs().max()) < 0.05  # two Adam steps of lr 0.01 away from the sample
    assert not torch.equal(xyz, start) and float(xyz.norm(dim=-1).mean()) < float(start.norm(dim=-1).mean())
    # resuming continues from the checkpoint and samples nothing
    cfg2 = {**cfg, "resume": str(trial / "ckpts" / "last.ckpt"),
            "trainer": {**cfg["trainer"], "max_steps": 3}}
    path.write_text(yaml.safe_dump(cfg2))
    assert run(["--config", str(path), "--train"]) == 0
    assert CloudGuidance.calls == ["a chair"]
