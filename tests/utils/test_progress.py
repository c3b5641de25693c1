"""lift3d.utils.progress: the logs/progress.json a watcher (the web app) reads."""

from __future__ import annotations

import json
from types import SimpleNamespace

from lift3d.utils.progress import ProgressFile


def _trainer(step: int) -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, callback_metrics={"train/loss": 1.5}, global_step=step,
                           max_steps=20, state=SimpleNamespace(fn="fit"))


def test_the_rate_is_known_when_fast_steps_end_in_a_validation(tmp_path):
    cb = ProgressFile(tmp_path / "progress.json", min_interval_s=60.0)  # no batch-end write comes through
    module = SimpleNamespace(stage=SimpleNamespace(name="coarse"), stages=[1, 2], stage_index=0)
    cb.on_train_start(_trainer(0), module)
    first = json.loads((tmp_path / "progress.json").read_text())
    assert first["step"] == 0 and first["steps_per_s"] is None
    for step in range(1, 11):
        cb.on_train_batch_end(_trainer(step), module, None, None, step - 1)
    assert json.loads((tmp_path / "progress.json").read_text())["step"] == 0  # throttled
    cb.on_validation_start(_trainer(10), module)
    rec = json.loads((tmp_path / "progress.json").read_text())
    assert rec["phase"] == "validate" and rec["step"] == 10
    assert rec["steps_per_s"] is not None and rec["steps_per_s"] > 0
    assert rec["stage"] == "coarse" and rec["n_stages"] == 2 and rec["losses"] == {"loss": 1.5}


def test_the_turntable_phase_keeps_the_last_training_losses(tmp_path):
    cb = ProgressFile(tmp_path / "progress.json", min_interval_s=0.0)
    module = SimpleNamespace(stage=SimpleNamespace(name="texture"), stages=[1, 2], stage_index=1)
    cb.on_train_start(_trainer(0), module)
    last = _trainer(20)
    last.callback_metrics = {"train/loss": 0.25, "train/loss_sds": 0.5, "val/psnr": 30.0}
    cb.on_train_batch_end(last, module, None, None, 19)
    cb.on_train_end(last, module)
    testing = SimpleNamespace(is_global_zero=True, callback_metrics={}, global_step=20, max_steps=20,
                              state=SimpleNamespace(fn="test"))  # the trainer resets its metrics for testing
    cb.on_test_start(testing, module)
    rec = json.loads((tmp_path / "progress.json").read_text())
    assert rec["phase"] == "test" and rec["losses"] == {"loss": 0.25, "loss_sds": 0.5}
    testing.callback_metrics = {"train/loss": 0.125}  # new training metrics replace the kept ones
    cb.on_test_end(testing, module)
    assert json.loads((tmp_path / "progress.json").read_text())["losses"] == {"loss": 0.125}
