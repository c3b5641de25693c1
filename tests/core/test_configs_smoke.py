"""A 2-step CPU run of every recipe in configs/ and configs/tiny/ through launch.py's code path."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from lift3d.config import load_config
from lift3d.launch import run
from lift3d.registry import find

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "tiny").glob("*.yaml"))


def _tiny_toyworld_prior(tmp_path: Path) -> dict:
    from lift3d.priors.toyworld.model import ToyWorldPrior
    from lift3d.priors.toyworld.vocab import VOCAB

    path = ToyWorldPrior({"vocab_size": len(VOCAB), "block_out_channels": [16, 32], "attention": False,
                          "norm_num_groups": 8}).save(tmp_path / "tiny-toyworld.safetensors")
    return {"pretrained": str(path)}


#: A tiny random model per prior family: the config overrides that make a guidance of that family use it.
TINY_PRIORS = {
    "toyworld": _tiny_toyworld_prior,
    # loaded by path: tests/guidance is not on sys.path when this file runs alone
    "stable-diffusion": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_sd.py"))["smoke_overrides"](tmp),
    "deepfloyd": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_if.py"))["tiny_if_prior"](tmp),
    "zero123": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_zero123.py"))["smoke_overrides"](tmp),
    "toyworld-mv": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_toyworld_mv.py"))["smoke_overrides"](tmp),
    "mvdream": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_mvdream.py"))["smoke_overrides"](tmp),
    "zero123pp": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_zero123pp.py"))["smoke_overrides"](tmp),
    "syncdreamer": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_syncdreamer.py"))["smoke_overrides"](tmp),
    "viewdiff": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_viewdiff.py"))["smoke_overrides"](tmp),
    "toyworld-zero123": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_toyworld_zero123.py"))[
        "smoke_overrides"](tmp),
    "toyworld-viewdiff": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_toyworld_viewdiff.py"))[
        "smoke_overrides"](tmp),
    "point-e": lambda tmp: runpy.run_path(str(REPO / "tests/recipes/test_gsgen_recipe.py"))["smoke_overrides"](tmp),
    "toyworld-points": lambda tmp: runpy.run_path(str(REPO / "tests/guidance/tiny_toyworld_points.py"))[
        "smoke_overrides"](tmp),
}

#: ``${sd_model}``: a guidance setting taken from a top-level key of the recipe.
_TOP_KEY = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _guidance_slots(system: dict) -> list[dict]:
    """Every (guidance_type, guidance) pair of the recipe: the main one, named ones, in every stage."""
    slots = [system] + list(system.get("stages", []) or [])
    named = [g for s in slots for g in (s.get("guidances") or {}).values() if g]
    return [s for s in slots + named if s.get("guidance_type")]


def _tiny_models_where_weights_are_missing(raw: dict, tmp_path: Path) -> None:
    """A guidance whose prior weights are not on this machine runs on a tiny random model of its family,
    chosen by what the guidance declares (its prior family and missing_weights), not by its name."""
    from lift3d.config import parse_structured
    from lift3d.guidance.score_distillation import DiffusionGuidance

    for slot in _guidance_slots(raw.get("system", {})):
        cls = find(slot["guidance_type"], "guidance")
        if not issubclass(cls, DiffusionGuidance):
            continue
        conf = slot.get("guidance") or {}
        top = {k: m.group(1) for k, v in conf.items()
               if isinstance(v, str) and (m := _TOP_KEY.fullmatch(v)) and m.group(1) in raw}
        if any(isinstance(v, str) and "${" in v for k, v in conf.items() if k not in top):
            continue  # it names another slot's weights, which that slot's check covers
        seen = {**conf, **{k: raw[name] for k, name in top.items()}}
        if cls.missing_weights(parse_structured(cls.Config, seen)) is not None:
            tiny = TINY_PRIORS[cls.prior_family](tmp_path)
            raw.update({top[k]: v for k, v in tiny.items() if k in top})  # sd_model=: every reader follows
            slot["guidance"] = {**conf, **{k: v for k, v in tiny.items() if k not in top}}


def _input_image_if_needed(raw: dict, tmp_path: Path) -> None:
    """Data modules that read an input image get a small RGBA one."""
    if not getattr(find(raw.get("data_type", "random-camera-datamodule"), "data"), "provides_reference", False):
        return
    img = np.zeros((32, 32, 4), dtype=np.uint8)
    img[8:24, 10:22] = [200, 40, 40, 255]
    iio.imwrite(tmp_path / "input.png", img)
    raw["image"] = str(tmp_path / "input.png")
    raw["data"] = {**raw.get("data", {}), "ref_height": 16, "ref_width": 16}


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_two_step_smoke_run(config, tmp_path):
    raw_cfg, _ = load_config(config)
    raw = OmegaConf.to_container(raw_cfg, resolve=False)
    _tiny_models_where_weights_are_missing(raw, tmp_path)
    # Shrink the run: 1 step per stage (at least 2 in all), tiny images, few test frames.
    system = raw.setdefault("system", {})
    for st in system.get("stages", []) or []:
        st["steps"] = 1
        if st.get("data"):
            st["data"] = {k: v for k, v in st["data"].items() if k not in ("height", "width")}
    # Real-weight recipes mesh at 128+, distil textures for hundreds of steps, refine in 10 DDIM steps.
    for slot in [system] + list(system.get("stages", []) or []):
        geo, guide = slot.get("geometry") or {}, slot.get("guidance") or {}
        for conf, key, small in ((geo, "isosurface_resolution", 32), (geo, "feature_fit_steps", 2),
                                 (geo, "texture_size", 64), (guide, "n_steps", 2)):
            if isinstance(conf.get(key), int):
                conf[key] = min(conf[key], small)
    if len(system.get("stages", []) or []) == 1:
        system["stages"][0]["steps"] = 2
    raw["trainer"] = {**raw.get("trainer", {}), "max_steps": 2, "val_check_interval": 1, "enable_progress_bar": False}
    raw["data"] = {**raw.get("data", {}), "height": 16, "width": 16, "eval_height": 16, "eval_width": 16,
                   "n_val_views": 1, "n_test_views": 2, "batch_size": raw.get("data", {}).get("n_views", 1)}
    raw.setdefault("system", {}).setdefault("exporter", {})["texture_size"] = 64
    raw["exp_root_dir"] = str(tmp_path / "out")
    raw["prompt"] = raw.get("prompt") or "a red cube"  # recipes that take the prompt from the command line
    _input_image_if_needed(raw, tmp_path)
    small = tmp_path / config.name
    small.write_text(yaml.safe_dump(raw))
    assert run(["--config", str(small), "--train"]) == 0
    trial = next((tmp_path / "out").glob("*/*"))
    assert (trial / "ckpts" / "last.ckpt").is_file()
    assert list(trial.glob("save/it*-test.mp4"))
    exported = list(trial.glob("save/it*-export/*"))
    assert exported, "nothing was exported"


def test_guidances_without_their_weights_get_a_tiny_model_of_their_family(tmp_path):
    raw = {"system": {"guidance_type": "toyworld-guidance", "guidance": {"pretrained": str(tmp_path / "absent")},
                      "guidances": {"ref": {"guidance_type": "reference-image-guidance"}},
                      "stages": [{"guidance_type": "toyworld-vsd-guidance", "guidance": {}}]}}
    _tiny_models_where_weights_are_missing(raw, tmp_path)
    tiny = str(tmp_path / "tiny-toyworld.safetensors")
    assert raw["system"]["guidance"]["pretrained"] == tiny  # missing: replaced
    assert raw["system"]["stages"][0]["guidance"] == {}  # the shipped weights are there: kept
    assert raw["system"]["guidances"]["ref"] == {"guidance_type": "reference-image-guidance"}  # no prior at all


def test_a_recipe_level_model_key_moves_every_reader_to_the_tiny_model(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    raw = {"sd_model": "owner/absent", "system": {"guidance_type": "stable-diffusion-guidance",
           "guidance": {"pretrained_model_name_or_path": "${sd_model}"},
           "prompt_processor": {"pretrained_model_name_or_path": "${sd_model}"}}}
    _tiny_models_where_weights_are_missing(raw, tmp_path)
    assert raw["sd_model"] == str(tmp_path / "tiny-sd")
    assert raw["system"]["guidance"] == {"pretrained_model_name_or_path": "${sd_model}"}
