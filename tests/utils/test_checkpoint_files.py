"""What ends up in ckpts/: only good parameters, whole files, no temporary files left by killed saves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_system_config
from lift3d.data.random_cameras import RandomCameraDataModule
from lift3d.systems.base import NonFiniteLossError
from lift3d.systems.text_to_3d import TextTo3DSystem
from lift3d.utils import checkpoint as ckpt_mod
from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint

DATA = {"height": 4, "width": 4, "eval_height": 4, "eval_width": 4, "n_val_views": 1, "n_test_views": 1}


def fit(system: TextTo3DSystem, steps: int, ckpts: Path, every: int = 1, keep_all: bool = False,
        resume: Path | None = None) -> tuple[pl.Trainer, LastCheckpoint]:
    dm = RandomCameraDataModule(DATA, seed=system.seed)
    cb = LastCheckpoint(ckpts, every_n_train_steps=every, keep_all=keep_all)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=[cb], default_root_dir=str(ckpts.parent),
    )
    trainer.fit(system, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    return trainer, cb


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def lr_jump(to: float, at: int) -> dict:
    """Adam whose learning rate for the colour jumps from 0.05 to ``to`` between steps ``at - 1`` and ``at``."""
    return {"name": "Adam", "args": {"lr": 0.05},
            "params": {"geometry.color_logit": {"lr": [at - 1, 0.05, to, at]}}}


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------------------------------------
# Diverged parameters never become "the last good checkpoint"


@pytest.mark.parametrize("lr", [float("inf"), 1e30], ids=["to-inf", "to-1e30"])
def test_a_learning_rate_jump_stops_before_last_ckpt_takes_the_diverged_parameters(tmp_path, lr):
    """Inf sends the colour to Inf and NaN; 1e30 leaves finite parameters of 1e30, whose gradients are NaN
    a step later in a real scene. Either way the error names the parameter and a checkpoint of good ones."""
    s = TextTo3DSystem(tiny_system_config(optimizer=lr_jump(lr, at=4)))
    ckpts = tmp_path / "ckpts"
    with pytest.raises(NonFiniteLossError) as err:
        fit(s, 10, ckpts, every=1)
    msg = str(err.value)
    assert "'geometry.color_logit'" in msg and "step 4" in msg
    assert f"Last good checkpoint: {ckpts / 'last.ckpt'} (step 4)" in msg
    saved = load(ckpts / "last.ckpt")
    assert saved["global_step"] == 4
    for k, v in saved["state_dict"].items():
        assert torch.isfinite(v).all() and v.abs().max() < 100, k


def test_last_checkpoint_refuses_to_overwrite_with_non_finite_parameters(tmp_path):
    s = TextTo3DSystem(tiny_system_config())
    ckpts = tmp_path / "ckpts"
    trainer, cb = fit(s, 2, ckpts, every=1)
    before = (ckpts / "last.ckpt").read_bytes()
    with torch.no_grad():
        s.geometry.extra[1] = float("nan")
    with pytest.raises(NonFiniteLossError) as err:
        cb.save(trainer, s)
    msg = str(err.value)
    assert "'geometry.extra'" in msg and "1 of 4 values NaN or Inf" in msg
    assert f"Last good checkpoint: {ckpts / 'last.ckpt'} (step 2)" in msg
    assert (ckpts / "last.ckpt").read_bytes() == before
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_of_the_parameters_that_gave_nan_is_not_called_good(tmp_path):
    """Resume is exact: last.ckpt taken right before the failing step would replay the same NaN."""
    ckpts = tmp_path / "ckpts"
    with pytest.raises(NonFiniteLossError) as err:
        fit(TextTo3DSystem(tiny_system_config(guidance={"nan_at_step": 4})), 10, ckpts, every=2)
    msg = str(err.value)
    assert load(ckpts / "last.ckpt")["global_step"] == 4
    assert f"Last good checkpoint: none: {ckpts / 'last.ckpt'} holds the parameters step 4 started from" in msg
    assert "keep_all" in msg

    kept = tmp_path / "kept"
    with pytest.raises(NonFiniteLossError) as err:
        fit(TextTo3DSystem(tiny_system_config(guidance={"nan_at_step": 4})), 10, kept, every=2, keep_all=True)
    assert f"Last good checkpoint: {kept / 'step=2.ckpt'} (step 2)" in str(err.value)


def test_the_checkpoint_resumed_from_is_named_until_a_new_one_is_saved(tmp_path):
    ckpts = tmp_path / "ckpts"
    fit(TextTo3DSystem(tiny_system_config()), 2, ckpts, every=0)
    resumed_from = tmp_path / "resume.ckpt"
    os.replace(ckpts / "last.ckpt", resumed_from)
    with pytest.raises(NonFiniteLossError) as err:
        fit(TextTo3DSystem(tiny_system_config(guidance={"nan_at_step": 4})), 10, ckpts, every=0, resume=resumed_from)
    assert f"Last good checkpoint: {resumed_from} (step 2)" in str(err.value)


def test_with_check_finite_off_a_diverged_save_is_skipped_not_written(tmp_path):
    s = TextTo3DSystem(tiny_system_config(optimizer=lr_jump(float("inf"), at=4), check_finite=False))
    ckpts = tmp_path / "ckpts"
    fit(s, 6, ckpts, every=1)  # the user asked not to stop
    assert not torch.isfinite(s.geometry.color_logit).all()
    assert load(ckpts / "last.ckpt")["global_step"] == 4


# ---------------------------------------------------------------------------------------------
# Whole files only, and no leftovers


def test_keep_all_links_each_save_and_later_saves_leave_it_alone(tmp_path):
    ckpts = tmp_path / "ckpts"
    fit(TextTo3DSystem(tiny_system_config()), 4, ckpts, every=2, keep_all=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    # A hard link: made in one atomic step, nothing to half-copy.
    assert os.stat(ckpts / "step=4.ckpt").st_ino == os.stat(ckpts / "last.ckpt").st_ino
    assert load(ckpts / "step=2.ckpt")["global_step"] == 2
    assert load(ckpts / "step=4.ckpt")["global_step"] == 4


def test_keep_all_copy_that_fails_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    """Where hard links are refused the copy goes through a temporary file: a failure mid-copy leaves
    neither a truncated step=N.ckpt nor the temporary file."""

    def no_links(src, dst, *a, **k):
        raise OSError("no hard links on this filesystem")

    def copy_half(fsrc, fdst, length=0):
        fdst.write(fsrc.read(100))
        raise OSError("killed mid-copy")

    def copyfile_half(src, dst, **k):  # what the copy did before: straight into the destination
        with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
            copy_half(fsrc, fdst)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(ckpt_mod.shutil, "copyfileobj", copy_half)
    monkeypatch.setattr(ckpt_mod.shutil, "copyfile", copyfile_half)
    ckpts = tmp_path / "ckpts"
    with pytest.raises(OSError, match="killed mid-copy"):
        fit(TextTo3DSystem(tiny_system_config()), 2, ckpts, every=2, keep_all=True)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert load(ckpts / "last.ckpt")["global_step"] == 2

    monkeypatch.undo()
    monkeypatch.setattr(os, "link", no_links)
    fresh = tmp_path / "fresh"
    fit(TextTo3DSystem(tiny_system_config()), 2, fresh, every=2, keep_all=True)
    assert os.stat(fresh / "step=2.ckpt").st_ino != os.stat(fresh / "last.ckpt").st_ino  # a real copy
    assert (fresh / "step=2.ckpt").read_bytes() == (fresh / "last.ckpt").read_bytes()


def test_a_save_that_fails_midway_keeps_last_ckpt_and_leaves_no_tmp_file(tmp_path, monkeypatch):
    ckpts = tmp_path / "ckpts"
    fit(TextTo3DSystem(tiny_system_config()), 2, ckpts, every=2)
    before = (ckpts / "last.ckpt").read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fit(TextTo3DSystem(tiny_system_config()), 4, ckpts, every=1, resume=ckpts / "last.ckpt")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt"]
    assert (ckpts / "last.ckpt").read_bytes() == before


def test_training_start_removes_what_killed_saves_left(tmp_path):
    """A SIGKILL mid-save runs no cleanup: its .NAME.tmp-PID stays until the next start removes it,
    unless its process still runs (another run may be saving into the same folder)."""
    ckpts = tmp_path / "ckpts"
    fit(TextTo3DSystem(tiny_system_config()), 2, ckpts, every=2)
    before = (ckpts / "last.ckpt").read_bytes()
    killed = [ckpts / f".last.ckpt.tmp-{dead_pid()}", ckpts / f".step=2.ckpt.tmp-{dead_pid()}",
              ckpts / f".last.ckpt.tmp-{os.getpid()}"]  # a container restarted often reuses our PID
    for p in killed:
        p.write_bytes(b"half a checkpoint")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    live = ckpts / f".last.ckpt.tmp-{writer.pid}"
    live.write_bytes(b"being written")
    unrelated = [ckpts / "notes.tmp-12", ckpts / ".hidden"]
    for p in unrelated:
        p.write_text("mine")
    try:
        fit(TextTo3DSystem(tiny_system_config()), 3, ckpts, every=0, resume=ckpts / "last.ckpt")
    finally:
        writer.kill()
        writer.wait()
    assert not any(p.exists() for p in killed)
    assert live.exists() and all(p.exists() for p in unrelated)
    assert load(ckpts / "last.ckpt")["global_step"] == 3
    assert (ckpts / "last.ckpt").read_bytes() != before

