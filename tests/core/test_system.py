from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import tiny_system_config
from lift3d.config import ConfigError
from lift3d.data.random_cameras import RandomCameraDataModule
from lift3d.systems.base import NonFiniteLossError
from lift3d.systems.text_to_3d import TextTo3DSystem
from lift3d.utils.checkpoint import AtomicCheckpointIO, LastCheckpoint

DATA = {"height": 4, "width": 4, "eval_height": 4, "eval_width": 4, "n_val_views": 1, "n_test_views": 2}


def fit(system: TextTo3DSystem, steps: int, tmp: Path, ckpt: str | None = None, every: int = 0):
    plan = [(s, dict(st.data)) for s, st in zip(system.stage_starts(), system.cfg.stages)]
    dm = RandomCameraDataModule(DATA, seed=system.seed, stage_plan=plan)
    cb = LastCheckpoint(tmp / "ckpts", every_n_train_steps=every)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, check_val_every_n_epoch=None,
        num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()], callbacks=[cb], default_root_dir=str(tmp),
    )
    trainer.fit(system, datamodule=dm, ckpt_path=ckpt, weights_only=True)
    return trainer, cb


def params(system):
    return {k: v.detach().clone() for k, v in system.state_dict().items()}


def test_stage_switch_converts_geometry_and_applies_stage_settings(tmp_path):
    cfg = tiny_system_config(stages=[
        {"name": "coarse", "steps": 3},
        {"name": "fine", "steps": 3, "geometry_type": "test-param-geometry-b", "geometry": {"n_extra": 2},
         "loss": {"lambda_mse": 2.0}, "data": {"height": 8}},
    ])
    s = TextTo3DSystem(cfg)
    assert s.total_steps == 6 and s.stage_starts() == [0, 3]
    before_switch = {}

    orig_enter = s.enter_stage

    def spy(idx, convert=True):
        before_switch["color"] = s.geometry.color_logit.detach().clone()
        orig_enter(idx, convert)

    s.enter_stage = spy
    tr, _ = fit(s, 6, tmp_path)
    assert type(s.geometry).__name__ == "ParamGeometryB" and s.geometry.created_from == "ParamGeometry"
    assert s.geometry.extra.shape == (2,)
    assert s.stage.name == "fine" and s.loss_weights()["lambda_mse"] == 2.0
    # the new geometry is the one being optimized after the switch
    opt_params = {id(p) for g in tr.optimizers[0].param_groups for p in g["params"]}
    assert id(s.geometry.color_logit) in opt_params
    assert not torch.equal(s.geometry.color_logit.detach(), before_switch["color"])
    dm = RandomCameraDataModule(DATA, stage_plan=[(0, {}), (3, {"height": 8})])
    assert dm.cfg_at(2).height == 4 and dm.cfg_at(3).height == 8


def test_optimizer_groups_longest_path_wins_and_lr_schedules():
    cfg = tiny_system_config(optimizer={
        "name": "Adam", "args": {"lr": 0.1},
        "params": {"geometry": {"lr": 0.01}, "geometry.extra": {"lr": [0, 1.0, 0.0, 10]}},
    })
    s = TextTo3DSystem(cfg)
    opt = s.configure_optimizers()
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["geometry.extra"]["params"][0] is s.geometry.extra
    assert groups["geometry"]["params"] == [s.geometry.color_logit]
    assert groups["geometry"]["lr"] == 0.01 and groups["geometry.extra"]["lr"] == 1.0
    assert s._lr_schedules[1](5) == pytest.approx(0.5)


def test_unclaimed_parameters_without_default_lr_is_an_error():
    cfg = tiny_system_config(optimizer={"name": "Adam", "args": {}, "params": {"geometry.extra": {"lr": 0.1}}})
    with pytest.raises(ConfigError, match="geometry.color_logit belong to no group"):
        TextTo3DSystem(cfg).configure_optimizers()


def test_loss_term_without_weight_and_weight_without_term_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="'loss_mse' loss term has no weight: add system.loss.lambda_mse"):
        fit(TextTo3DSystem(tiny_system_config(loss={})), 1, tmp_path)
    with pytest.raises(ConfigError, match="lambda_typo is 1.0 .* no loss term 'loss_typo'"):
        fit(TextTo3DSystem(tiny_system_config(loss={"lambda_mse": 1.0, "lambda_typo": 1.0})), 1, tmp_path)


def test_frozen_slot_is_not_optimized(tmp_path):
    cfg = tiny_system_config(renderer={"learn_tint": True},
                             stages=[{"name": "a", "steps": 2}, {"name": "b", "steps": 3, "freeze": ["geometry"]}])
    s = TextTo3DSystem(cfg)
    seen = {}
    orig = s.enter_stage

    def spy(idx, convert=True):
        orig(idx, convert)
        seen["geo"] = s.geometry.color_logit.detach().clone()
        seen["tint"] = s.renderer.tint.detach().clone()

    s.enter_stage = spy
    fit(s, 5, tmp_path)
    assert torch.equal(seen["geo"], s.geometry.color_logit.detach())  # frozen in stage b
    assert not torch.equal(seen["tint"], s.renderer.tint.detach())  # the rest still trains
    with pytest.raises(ConfigError, match="unknown slot 'geometri'"):
        TextTo3DSystem(tiny_system_config(stages=[{"name": "a", "steps": 1, "freeze": ["geometri"]}]))


def test_nan_loss_stops_with_step_term_and_last_checkpoint(tmp_path):
    cfg = tiny_system_config(guidance={"nan_at_step": 3})
    s = TextTo3DSystem(cfg)
    with pytest.raises(NonFiniteLossError) as err:
        fit(s, 10, tmp_path, every=2)
    msg = str(err.value)
    assert "step 3" in msg and "'loss_mse'" in msg and str(tmp_path / "ckpts" / "last.ckpt") in msg
    ck = torch.load(tmp_path / "ckpts" / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 2
    assert torch.isfinite(s.geometry.color_logit).all()


def test_resume_equals_uninterrupted_run_across_a_stage_switch(tmp_path):
    cfg = tiny_system_config(stages=[
        {"name": "a", "steps": 4},
        {"name": "b", "steps": 4, "geometry_type": "test-param-geometry-b", "loss": {"lambda_mse": 3.0}},
    ])
    pl.seed_everything(0)
    full = TextTo3DSystem(copy.deepcopy(cfg), seed=5)
    fit(full, 8, tmp_path / "full")
    for stop in (2, 5):
        pl.seed_everything(0)
        part = TextTo3DSystem(copy.deepcopy(cfg), seed=5)
        fit(part, stop, tmp_path / f"part{stop}")
        pl.seed_everything(123)  # a different process state must not matter
        resumed = TextTo3DSystem(copy.deepcopy(cfg), seed=5)
        fit(resumed, 8, tmp_path / f"res{stop}", ckpt=str(tmp_path / f"part{stop}" / "ckpts" / "last.ckpt"))
        a, b = params(full), params(resumed)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=f"{k} differs after resume at {stop}")
        assert type(resumed.geometry).__name__ == "ParamGeometryB"


def test_every_step_runs_once_across_stage_switches(tmp_path, monkeypatch):
    """The optimizer rebuilt at a switch still advances global_step: no step number runs twice."""
    cfg = tiny_system_config(stages=[
        {"name": "a", "steps": 3},
        {"name": "b", "steps": 3, "geometry_type": "test-param-geometry-b"},
        {"name": "c", "steps": 2, "loss": {"lambda_mse": 2.0}},
    ])
    system = TextTo3DSystem(cfg, seed=0)
    seen: list[tuple[int, str]] = []
    original = TextTo3DSystem.compute_losses

    def spy(self, batch):
        seen.append((self.global_step, self.stage.name))
        return original(self, batch)

    monkeypatch.setattr(TextTo3DSystem, "compute_losses", spy)
    trainer, _ = fit(system, 8, tmp_path)
    assert [s for s, _ in seen] == list(range(8))
    assert [n for _, n in seen] == ["a"] * 3 + ["b"] * 3 + ["c"] * 2
    assert trainer.global_step == 8


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"x": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"x": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoints_load_weights_only(tmp_path):
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, p)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        AtomicCheckpointIO().load_checkpoint(p)


@pytest.mark.parametrize("split", [0.5, 0.2, 0.8])
def test_opacity_term_pushes_away_from_its_split(split):
    s = TextTo3DSystem(tiny_system_config(opaque_split=split))
    reg = s.regularizer("opaque")
    o = torch.linspace(0.1, 0.95, 86, requires_grad=True)
    reg(s, {"opacity": o}, {}).backward()
    # Gradient descent moves each opacity away from the split: up above it, down below it.
    below, above = o.detach() < split - 0.02, o.detach() > split + 0.02
    assert (o.grad[below] > 0).all() and (o.grad[above] < 0).all()
    with torch.no_grad():  # the term is largest at the split
        per_value = torch.stack([reg(s, {"opacity": v.view(1)}, {}) for v in o])
    assert abs(float(o[per_value.argmax()]) - split) < 0.015


def test_opacity_split_out_of_range_is_an_error():
    s = TextTo3DSystem(tiny_system_config(opaque_split=1.0))
    with pytest.raises(ConfigError, match="opaque_split"):
        s.regularizer("opaque")(s, {"opacity": torch.rand(4)}, {})
