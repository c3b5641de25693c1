from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lift3d.config import ConfigError
from lift3d.launch import run
from lift3d.registry import RegistryError, register

from conftest import TargetGuidance


def _trial(root: Path) -> Path:
    (trial,) = [p for p in (root / "tiny-test").iterdir() if p.is_dir()]
    return trial


def test_train_writes_the_trial_folder(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", 'prompt=a red cube', f"exp_root_dir={out}"]) == 0
    trial = _trial(out)
    assert trial.name.startswith("a_red_cube@")
    for p in ["configs/raw.yaml", "configs/parsed.yaml", "ckpts/last.ckpt", "save/it3-val/0.png",
              "save/it6-test/000.png", "save/it6-test/002.png", "save/it6-test.mp4", "save/it6-export/model.json"]:
        assert (trial / p).is_file(), p
    parsed = yaml.safe_load((trial / "configs/parsed.yaml").read_text())
    assert parsed["prompt"] == "a red cube" and parsed["resume"] is None
    assert torch.load(trial / "ckpts/last.ckpt", weights_only=True)["global_step"] == 6
    assert any((trial / "logs").iterdir())


def test_parsed_config_reproduces_the_run(tmp_path, tiny_recipe):
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out1}", "seed=11"]) == 0
    t1 = _trial(out1)
    assert run(["--config", str(t1 / "configs/parsed.yaml"), "--train", f"exp_root_dir={out2}"]) == 0
    a = torch.load(t1 / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(_trial(out2) / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_modes_that_load_need_a_checkpoint_and_then_work(tmp_path, tiny_recipe):
    with pytest.raises(ConfigError, match="resume=path/to/ckpts/last.ckpt"):
        run(["--config", str(tiny_recipe), "--export"])
    with pytest.raises(ConfigError, match="no such checkpoint"):
        run(["--config", str(tiny_recipe), "--test", "resume=/nonexistent/last.ckpt"])
    out = tmp_path / "out"
    run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}"])
    ckpt = _trial(out) / "ckpts" / "last.ckpt"
    (_trial(out) / "save" / "it6-export" / "model.json").unlink()
    assert run(["--config", str(tiny_recipe), "--export", f"resume={ckpt}"]) == 0
    assert (_trial(out) / "save" / "it6-export" / "model.json").is_file()


def test_export_from_a_checkpoint_after_a_stage_switch(tmp_path, tiny_recipe):
    stages = ("system.stages=[{name: a, steps: 3}, {name: b, steps: 3, geometry_type: test-param-geometry-b, "
              "geometry: {n_extra: 2}}]")
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", stages]) == 0
    trial = _trial(out)
    exported = trial / "save" / "it6-export" / "model.json"
    trained = exported.read_text()
    exported.unlink()
    assert run(["--config", str(trial / "configs" / "parsed.yaml"), "--export",
                f"resume={trial / 'ckpts' / 'last.ckpt'}"]) == 0
    assert exported.read_text() == trained


def test_bad_inputs_fail_with_clear_errors(tmp_path, tiny_recipe):
    with pytest.raises(ConfigError, match="unknown config key 'trainer.max_step'.*command line.*max_steps"):
        run(["--config", str(tiny_recipe), "--train", "trainer.max_step=3"])
    with pytest.raises(RegistryError, match="unknown module name 'test-flat-rendrer'.*Did you mean 'test-flat-renderer'"):
        run(["--config", str(tiny_recipe), "--train", "system.renderer_type=test-flat-rendrer",
             f"exp_root_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="unknown flag"):
        run(["--config", str(tiny_recipe), "--train", "--gpus", "0"])
    assert not (tmp_path / "tiny-test").exists()  # a bad config leaves no empty trial folder


def test_cli_main_exit_codes(tmp_path, tiny_recipe, capsys):
    from lift3d.launch import main

    with pytest.raises(SystemExit) as ex:
        main(["--config", str(tiny_recipe), "--train", "trainer.max_steps=oops"])
    assert ex.value.code == 2
    assert "expected an integer" in capsys.readouterr().err


@register("test-sigint-guidance")
class SigintGuidance(TargetGuidance):
    """Sends the process a Ctrl-C in the middle of a chosen step, as a user would."""

    @dataclass
    class Config(TargetGuidance.Config):
        sigint_at_step: int = 3

    def forward(self, inp: Any, t: Any = None, noise: Any = None) -> Any:
        if self.global_step == self.cfg.sigint_at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return super().forward(inp, t, noise)


def test_ctrl_c_saves_last_checkpoint_and_resume_finishes_like_a_clean_run(tmp_path, tiny_recipe):
    ref = tmp_path / "ref"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={ref}",
                "system.guidance_type=test-sigint-guidance", "system.guidance.sigint_at_step=-1"]) == 0
    out = tmp_path / "out"
    code = run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}",
                "system.guidance_type=test-sigint-guidance", "system.guidance.sigint_at_step=3"])
    assert code == 130
    ckpt = _trial(out) / "ckpts" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4  # stopped at the end of the step
    assert run(["--config", str(tiny_recipe), "--train", f"resume={ckpt}",
                "system.guidance_type=test-sigint-guidance", "system.guidance.sigint_at_step=-1"]) == 0
    a = torch.load(_trial(ref) / "ckpts/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(ckpt, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])
