"""A 2-step CPU run of every recipe in configs/ and configs/tiny/ through launch.py's code path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from lift3d.config import load_config
from lift3d.launch import run

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "tiny").glob("*.yaml"))


def _use_tiny_prior_if_unshipped(raw: dict, tmp_path: Path) -> None:
    """Recipes on the toy-world prior run against a tiny random prior until its weights ship."""
    from lift3d.priors.toyworld.model import DEFAULT_WEIGHTS, ToyWorldPrior
    from lift3d.priors.toyworld.vocab import VOCAB

    system = raw.get("system", {})
    slots = [system] + list(system.get("stages", []) or [])
    prior_guidance = {"toyworld-guidance", "toyworld-vsd-guidance", "toyworld-refine-guidance"}
    users = [s for s in slots if s.get("guidance_type") in prior_guidance]
    if not users or DEFAULT_WEIGHTS.is_file():
        return
    path = ToyWorldPrior({"vocab_size": len(VOCAB), "block_out_channels": [16, 32], "attention": False,
                          "norm_num_groups": 8}).save(tmp_path / "tiny-prior.safetensors")
    for s in users:
        s.setdefault("guidance", {})["pretrained"] = str(path)


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_two_step_smoke_run(config, tmp_path):
    raw_cfg, _ = load_config(config)
    raw = OmegaConf.to_container(raw_cfg, resolve=False)
    _use_tiny_prior_if_unshipped(raw, tmp_path)
    # Shrink the run: 1 step per stage (at least 2 in all), tiny images, few test frames.
    system = raw.setdefault("system", {})
    for st in system.get("stages", []) or []:
        st["steps"] = 1
        if st.get("data"):
            st["data"] = {k: v for k, v in st["data"].items() if k not in ("height", "width")}
    if len(system.get("stages", []) or []) == 1:
        system["stages"][0]["steps"] = 2
    raw["trainer"] = {**raw.get("trainer", {}), "max_steps": 2, "val_check_interval": 1, "enable_progress_bar": False}
    raw["data"] = {**raw.get("data", {}), "height": 16, "width": 16, "eval_height": 16, "eval_width": 16,
                   "n_val_views": 1, "n_test_views": 2, "batch_size": 1}
    raw.setdefault("system", {}).setdefault("exporter", {})["texture_size"] = 64
    raw["exp_root_dir"] = str(tmp_path / "out")
    small = tmp_path / config.name
    small.write_text(yaml.safe_dump(raw))
    assert run(["--config", str(small), "--train"]) == 0
    trial = next((tmp_path / "out").glob("*/*"))
    assert (trial / "ckpts" / "last.ckpt").is_file()
    assert list(trial.glob("save/it*-test.mp4"))
    exported = list(trial.glob("save/it*-export/*"))
    assert exported, "nothing was exported"
