"""configs/gsgen.yaml for 2 steps on tiny models: a tiny Stable Diffusion and a tiny Point-E in the
published file layout, through the same code path as tests/core/test_configs_smoke.py."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def smoke_overrides(tmp_path: Path) -> dict:
    """point-e-guidance settings that put a recipe on a tiny Point-E (the config smoke test's factory):
    a folder holding the tiny base model and upsampler under the published file names, its CLIP folder,
    and a 2-step sampler for the initial cloud."""
    folder = tmp_path / "tiny-point-e"
    if not (folder / "base_40m_textvec.pt").is_file():
        tiny = runpy.run_path(str(REPO / "tests" / "priors" / "tiny_point_e.py"))
        made = tiny["make_tiny_point_e"](tmp_path / "tiny-point-e-files")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(made / "base.pt", folder / "base_40m_textvec.pt")
        shutil.copy(made / "upsampler.pt", folder / "upsample_40m.pt")
        shutil.copytree(made / "clip", folder / "clip", dirs_exist_ok=True)
    return {"pretrained_model_name_or_path": str(folder), "upsampler_model_name_or_path": str(folder),
            "clip_model_name_or_path": str(folder / "clip"), "init_steps": 2}


def test_gsgen_two_step_run_starts_from_the_point_e_cloud_and_exports(tmp_path, monkeypatch):
    from lift3d.guidance.point_e import PointEGuidance

    scored = []
    forward = PointEGuidance.forward

    def counting(self, inp, t=None, noise=None):
        out = forward(self, inp, t, noise)
        scored.append((inp.points.shape[0], float(out["loss_sds"].detach())))
        return out

    monkeypatch.setattr(PointEGuidance, "forward", counting)
    smoke = runpy.run_path(str(REPO / "tests" / "core" / "test_configs_smoke.py"))
    smoke["TINY_PRIORS"].setdefault("point-e", smoke_overrides)
    smoke["test_two_step_smoke_run"](REPO / "configs" / "gsgen.yaml", tmp_path)
    trial = next((tmp_path / "out").glob("*/*"))
    ckpt = torch.load(trial / "ckpts" / "last.ckpt", weights_only=True, map_location="cpu")
    xyz = ckpt["state_dict"]["geometry.xyz"]
    # Point-E's base cloud (1024 points) plus the upsampler's 3072, scaled to radius 0.8, moved by 2 steps
    assert xyz.shape == (4096, 3)
    assert abs(float(xyz.norm(dim=-1).max()) - 0.8) < 0.05
    assert list(trial.glob("save/it*-export/*_gaussians.ply"))
    # the 3D prior scored the Gaussian centres at both steps (its weight is 0.01 until step 2000)
    assert [n for n, _ in scored] == [4096, 4096] and all(loss > 0 for _, loss in scored)
