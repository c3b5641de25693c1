"""Runs are never lost or overwritten, and bad input stops a run before it writes anything.

Each test reproduces a failure found by probing a fresh clone as a new user would.
"""

from __future__ import annotations

import errno
import hashlib
import threading
from pathlib import Path

import pytest
import torch
import yaml

import lift3d.launch as launch
from lift3d.config import ConfigError
from lift3d.launch import RunIOError, create_trial_dir, main, run

REPO = Path(__file__).resolve().parents[2]


def _trials(root: Path) -> list[Path]:
    return sorted(p for p in (root / "tiny-test").iterdir() if p.is_dir()) if (root / "tiny-test").exists() else []


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ trial folders


def test_two_runs_started_in_the_same_second_keep_both_results(tmp_path, tiny_recipe, monkeypatch):
    monkeypatch.setattr(launch.time, "strftime", lambda fmt, *a: "20261207-120000")
    out = tmp_path / "out"
    for lr in (0.05, 0.1):
        assert run(["--config", str(tiny_recipe), "--train", "prompt=a red cube", f"exp_root_dir={out}",
                    f"system.optimizer.args.lr={lr}"]) == 0
    first, second = _trials(out)
    assert (first.name, second.name) == ("a_red_cube@20261207-120000", "a_red_cube@20261207-120000-2")
    lrs = [yaml.safe_load((t / "configs/parsed.yaml").read_text())["system"]["optimizer"]["args"]["lr"]
           for t in (first, second)]
    assert lrs == [0.05, 0.1]
    a, b = (torch.load(t / "ckpts/last.ckpt", weights_only=True)["state_dict"] for t in (first, second))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different runs, both kept


def test_trial_folders_are_unique_under_concurrency(tmp_path):
    wanted = tmp_path / "recipe" / "a_red_cube@20261207-120000"
    made: list[Path] = []
    barrier = threading.Barrier(12)

    def worker() -> None:
        barrier.wait()
        made.append(create_trial_dir(wanted))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 12 and all(p.is_dir() for p in made)
    assert wanted in made and wanted.with_name(wanted.name + "-12") in made


def test_use_timestamp_false_never_reuses_a_folder(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    for _ in range(2):
        assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "use_timestamp=false",
                    "trainer.max_steps=2"]) == 0
    assert [t.name for t in _trials(out)] == ["untitled", "untitled-2"]


def test_an_unusable_exp_root_dir_is_a_config_error(tmp_path, tiny_recipe):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="exp_root_dir"):
        run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={blocker}"])
    assert blocker.read_text() == "not a folder"


# ------------------------------------------------------------------ resuming never overwrites


def test_resume_from_a_checkpoint_outside_a_trial_keeps_the_users_files(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=2"]) == 0
    (trial,) = _trials(out)
    downloaded = tmp_path / "downloads"
    (downloaded / "ckpts").mkdir(parents=True)
    (downloaded / "configs").mkdir()
    (downloaded / "ckpts" / "model.ckpt").write_bytes((trial / "ckpts" / "last.ckpt").read_bytes())
    (downloaded / "configs" / "raw.yaml").write_text("# my own notes\n")
    before = _tree_digest(downloaded)
    assert run(["--config", str(tiny_recipe), "--train", f"resume={downloaded / 'ckpts' / 'model.ckpt'}",
                f"exp_root_dir={out}"]) == 0
    assert _tree_digest(downloaded) == before
    assert len(_trials(out)) == 2  # the continued run got a trial folder of its own


def test_resume_with_another_recipe_fails_before_writing(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=2"]) == 0
    (trial,) = _trials(out)
    ckpt = trial / "ckpts" / "last.ckpt"
    before = _tree_digest(trial)
    # another geometry: parameters the checkpoint lacks
    with pytest.raises(ConfigError, match=r"does not fit this config.*geometry\.extra"):
        run(["--config", str(tiny_recipe), "--train", f"resume={ckpt}", "trainer.max_steps=4",
             "system.geometry_type=test-param-geometry-b", "system.geometry={n_extra: 2}"])
    # another stage layout
    with pytest.raises(ConfigError, match=r"has stages \['main'\] but the config has \['a', 'b'\]"):
        run(["--config", str(tiny_recipe), "--train", f"resume={ckpt}",
             "system.stages=[{name: a, steps: 3}, {name: b, steps: 3}]"])
    assert _tree_digest(trial) == before


def test_resume_records_its_overrides_without_touching_the_trials_configs(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=2"]) == 0
    (trial,) = _trials(out)
    raw, parsed = (trial / "configs/raw.yaml").read_bytes(), (trial / "configs/parsed.yaml").read_bytes()
    assert run(["--config", str(trial / "configs/parsed.yaml"), "--train", f"resume={trial / 'ckpts/last.ckpt'}",
                "trainer.max_steps=4"]) == 0
    assert (trial / "configs/raw.yaml").read_bytes() == raw
    assert (trial / "configs/parsed.yaml").read_bytes() == parsed
    history = sorted((trial / "configs/history").iterdir())
    assert [p.name for p in history] == ["001-train.yaml", "002-train.yaml"]
    rec = yaml.safe_load(history[1].read_text())
    assert rec["overrides"][-1] == "trainer.max_steps=4" and rec["resume_step"] == 2
    assert rec["parsed"]["trainer"]["max_steps"] == 4
    assert torch.load(trial / "ckpts/last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 50, "truncate"])
def test_unreadable_checkpoints_are_config_errors(tmp_path, tiny_recipe, content):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=2"]) == 0
    good = (_trials(out)[0] / "ckpts/last.ckpt").read_bytes()
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good[: len(good) // 2] if content == "truncate" else content)
    with pytest.raises(ConfigError, match=r"resume=.*bad\.ckpt"):
        run(["--config", str(tiny_recipe), "--export", f"resume={bad}"])
    raw_state_dict = tmp_path / "weights.ckpt"
    torch.save({"geometry.color_logit": torch.zeros(3)}, raw_state_dict)
    with pytest.raises(ConfigError, match="not a lift3d checkpoint.*state_dict"):
        run(["--config", str(tiny_recipe), "--train", f"resume={raw_state_dict}"])
    assert len(_trials(out)) == 1


def test_test_and_validate_from_a_checkpoint_use_its_step(tmp_path, tiny_recipe):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=4",
                "trainer.val_check_interval=null"]) == 0
    (trial,) = _trials(out)
    ckpt = trial / "ckpts/last.ckpt"
    assert run(["--config", str(tiny_recipe), "--validate", f"resume={ckpt}"]) == 0
    assert run(["--config", str(tiny_recipe), "--test", f"resume={ckpt}"]) == 0
    names = {p.name for p in (trial / "save").iterdir()}
    assert {"it4-val", "it4-test"} <= names and not {"it0-val", "it0-test"} & names


# ------------------------------------------------------------------ errors at start-up, before any folder


TINY_BAD = [
    ("trainer.precision=bogus", "trainer.precision.*bogus.*32-true"),
    ("trainer.max_steps=0", "trainer.max_steps.*at least 1 step"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("checkpoint.every_n_train_steps=-1", "checkpoint.every_n_train_steps"),
    ("system.exporter_type=test-json-exportr", "test-json-exportr"),
    ("system.stages=[{name: a, steps: 2}, {name: b, steps: 2, guidance_type: test-target-guidanc}]",
     "test-target-guidanc"),
]


@pytest.mark.parametrize("override,message", TINY_BAD, ids=[o.split("=")[0] for o, _ in TINY_BAD])
def test_bad_settings_fail_at_start_up_and_leave_nothing(tmp_path, tiny_recipe, override, message):
    out = tmp_path / "out"
    with pytest.raises(Exception, match=message):
        run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", override])
    assert not out.exists()


def test_a_prompt_outside_the_toy_vocabulary_stops_before_any_folder(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ex:
        main(["--config", str(REPO / "configs/tiny/dreamfusion.yaml"), "--train", "prompt=a hamburger",
              f"exp_root_dir={out}"])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown word(s) 'hamburger'" in err[0] and "Traceback" not in err[0]
    assert not out.exists()


def test_an_empty_config_file_is_named(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here yet\n\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml: the file is empty"):
        run(["--config", str(empty), "--train", f"exp_root_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_control_characters_in_an_override_are_refused(tmp_path, tiny_recipe):
    with pytest.raises(ConfigError, match=r"control character '\\x1b'"):
        run(["--config", str(tiny_recipe), "--train", "prompt=a red\x1b[31m cube", f"exp_root_dir={tmp_path}"])


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, tiny_recipe, capsys):
    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "--dry-run"]) == 0
    assert "[lift3d] dry run OK" in capsys.readouterr().out
    assert not out.exists()
    with pytest.raises(ConfigError, match="trainer.precision"):
        run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "--dry-run", "trainer.precision=x"])


def test_an_empty_prompt_is_refused_before_any_folder_is_made(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"needs a prompt, but config key 'system\.prompt_processor\.prompt'"):
        run(["--config", str(REPO / "configs/tiny/dreamfusion.yaml"), "--train", "prompt=' '", f"exp_root_dir={out}",
             "--dry-run"])
    assert not out.exists()


# ------------------------------------------------------------------ faults while running


def test_a_full_disk_names_the_intact_checkpoint(tmp_path, tiny_recipe, monkeypatch, capsys):
    import lift3d.utils.checkpoint as ckpt_mod

    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint lands, the second finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device", str(f.name if hasattr(f, "name") else f))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    out = tmp_path / "out"
    with pytest.raises(RunIOError, match=r"the disk is full.*last\.ckpt \(written .*\) is intact.*resume="):
        run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}"])
    (trial,) = _trials(out)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert torch.load(trial / "ckpts/last.ckpt", weights_only=True)["global_step"] == 2
    with pytest.raises(SystemExit) as ex:  # and the command line says it in one line, exit 1
        monkeypatch.setattr(ckpt_mod.torch, "save", save)
        calls["n"] = 0
        main(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}"])
    assert ex.value.code == 1 and capsys.readouterr().err.startswith("error: the disk is full")


def test_lightning_chatter_is_gone_from_a_plain_run(tmp_path, tiny_recipe, capfd):
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={tmp_path}", "trainer.max_steps=2"]) == 0
    out = capfd.readouterr()
    text = out.out + out.err
    assert "[lift3d] trial folder" in text
    for noise in ("Tip:", "GPU available", "LeafSpec", "limit_val_batches", "`Trainer.fit` stopped"):
        assert noise not in text, noise


@pytest.mark.parametrize("override,message", [
    ("system.stages.0.steps=", r"override 'system.stages.0.steps': 'system.stages' is not set in the config"),
    ("data.batch_size=0", r"'data.batch_size' \(set in the command line\) is 0"),
    ("prompt=a hamburger", r"toyworld-prior.yaml to \$\{prompt\}, which is set in the command line\).*'hamburger'"),
])
def test_errors_blame_the_layer_that_set_the_value(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run(["--config", str(REPO / "configs/tiny/dreamfusion.yaml"), "--train", "prompt=a red cube",
             f"exp_root_dir={tmp_path / 'out'}", override, "--dry-run"])
    assert not (tmp_path / "out").exists()


def test_export_of_an_empty_model_is_refused_and_leaves_no_folder(tmp_path, tiny_recipe, capsys):
    import shutil

    out = tmp_path / "out"
    assert run(["--config", str(tiny_recipe), "--train", f"exp_root_dir={out}", "trainer.max_steps=2"]) == 0
    (trial,) = _trials(out)
    export = trial / "save" / "it2-export"
    shutil.rmtree(export)
    with pytest.raises(SystemExit) as ex:
        main(["--config", str(tiny_recipe), "--export", f"resume={trial / 'ckpts/last.ckpt'}",
              "system.renderer.opacity=0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 1 and len(err) == 1 and "system.exporter.min_coverage" in err[0]
    assert not export.exists() and not [p for p in export.parent.iterdir() if p.name.startswith(".")]
