"""One real, short text-to-3D run in the suite: the tiny DreamFusion recipe on the shipped toy-world
prior, with a reduced step count, must produce a mesh of "a red cube" (IoU >= 0.4 against the exact
shape). This is the end-to-end check that SDS, the prior, the renderer and the exporter agree on
frames, colours and scales; bench/toyworld_t23d.py measures the full recipes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trimesh
import yaml
from omegaconf import OmegaConf

from lift3d.config import load_config
from lift3d.launch import run
from lift3d.priors.toyworld.metrics import score_mesh
from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS
from lift3d.priors.toyworld.shapes import get_object

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "dreamfusion.yaml"
STEPS = 300  # the recipe's 600, with its schedules halved to match


def _halved(schedule):
    """A ``[start, v0, v1, end]`` schedule of the recipe, over half the steps (a constant stays)."""
    if not isinstance(schedule, list):
        return schedule
    start, v0, v1, end = schedule
    return [start // 2, v0, v1, end // 2]


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason=f"toy-world prior weights not shipped ({DEFAULT_WEIGHTS})")
def test_tiny_dreamfusion_reaches_red_cube(tmp_path):
    raw_cfg, _ = load_config(RECIPE)
    raw = OmegaConf.to_container(raw_cfg, resolve=False)
    raw["trainer"] = {**raw.get("trainer", {}), "max_steps": STEPS, "val_check_interval": None,
                      "enable_progress_bar": False}
    loss, guidance = raw["system"]["loss"], raw["system"]["guidance"]
    for key in ("lambda_orient", "lambda_opaque", "lambda_sparsity"):
        loss[key] = _halved(loss[key])
    guidance["max_step_percent"] = _halved(guidance["max_step_percent"])
    raw["data"] = {**raw.get("data", {}), "n_val_views": 1, "n_test_views": 2}
    raw["system"].setdefault("exporter", {}).update({"fmt": ["obj"], "texture_size": 128})
    raw["exp_root_dir"] = str(tmp_path / "out")
    raw["prompt"] = "a red cube"
    path = tmp_path / "dreamfusion.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert run(["--config", str(path), "--train"]) == 0
    obj = next((tmp_path / "out").glob("*/*/save/it*-export/model.obj"))
    score = score_mesh(trimesh.load(obj, process=False, force="mesh"), get_object("a red cube"))
    assert score.iou >= 0.4, score
    assert score.colour_error is not None and score.colour_error < 0.25, score
