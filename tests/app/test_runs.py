"""The web app's run manager without a browser: start, progress, stop, reattach, queue, errors.

Most tests drive a stand-in run (``fake_run.py``: the same command line and files as a real run, in
milliseconds a step); the last ones run the real launcher: its checks in-process, and one tiny
training run stopped and continued, which is what the page's Stop and Continue do.
"""

from __future__ import annotations

import json
import re
import sys
import time
import zipfile
from pathlib import Path

import pytest

from lift3d.app.runs import RunInputError, RunManager, check_launch, validation_grid

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FAKE = [sys.executable, str(HERE / "fake_run.py")]
CONFIG = REPO / "configs" / "tiny" / "dreamgaussian.yaml"


def manager(root: Path, **kw) -> RunManager:
    kw.setdefault("entry", FAKE)
    kw.setdefault("check", None)
    kw.setdefault("poll_s", 0)  # the tests poll themselves: no timing races with a thread
    return RunManager(root, **kw)


def wait_for(m: RunManager, cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m.poll()
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; runs: {[(r.id, r.status, r.message) for r in m.runs()]}")


def step_of(m: RunManager, run_id: str) -> int:
    prog = m.snapshot(run_id)["progress"]
    return prog["step"] if prog else -1


def test_run_reports_progress_then_its_outputs(tmp_path):
    m = manager(tmp_path)
    run = m.submit(CONFIG, ["prompt=a red cube", "fake.steps=30"], label="cube")
    assert m.get(run.id).status == "running" and m.get(run.id).pid
    first = wait_for(m, lambda: step_of(m, run.id) if step_of(m, run.id) > 0 else None, what="a first step")
    later = wait_for(m, lambda: step_of(m, run.id) if step_of(m, run.id) > first else None, what="a later step")
    snap = m.snapshot(run.id)
    assert later > first and snap["phase"] == "training"
    assert snap["progress"]["stage"] in ("coarse", "fine") and snap["progress"]["losses"]["loss_sds"] > 0
    wait_for(m, lambda: m.get(run.id).status == "done", what="the end")
    snap = m.snapshot(run.id)
    trial = Path(snap["trial"])
    assert trial.parent.parent == tmp_path  # an ordinary trial under the root
    assert snap["glb"] == trial / "save" / "it30-export" / "model.glb"
    assert snap["video"] == trial / "save" / "it30-test.mp4"
    assert snap["val_dir"] == trial / "save" / "it30-val"  # the newest of it10, it20, it30
    with zipfile.ZipFile(snap["zip"]) as z:
        assert sorted(z.namelist()) == ["model.mtl", "model.obj", "texture_kd.png"]
    assert snap["gaussian_ply"] is None
    assert m.trials() == [trial]
    assert m.get(run.id).returncode == 0
    # The command a person would type for the same run.
    assert "launch.py --config" in snap["command"] and "'prompt=a red cube'" in snap["command"]


def test_validation_grid_stacks_the_views_and_is_redone_when_they_change(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    val = tmp_path / "it10-val"
    val.mkdir()
    for k in range(3):
        iio.imwrite(val / f"{k}.png", np.full((4, 12, 3), 50 * (k + 1), np.uint8))
    grid = iio.imread(validation_grid(val, tmp_path / "grid.png"))
    assert grid.shape == (12, 12, 3) and list(grid[::4, 0, 0]) == [50, 100, 150]
    time.sleep(0.01)
    iio.imwrite(val / "3.png", np.full((4, 12, 3), 200, np.uint8))  # a view written after the grid was made
    grid = iio.imread(validation_grid(val, tmp_path / "grid.png"))
    assert grid.shape == (16, 12, 3) and grid[-1, 0, 0] == 200


def test_stop_saves_a_checkpoint_and_continue_finishes_the_trial(tmp_path):
    m = manager(tmp_path)
    run = m.submit(CONFIG, ["prompt=a red cube", "fake.steps=40"])
    wait_for(m, lambda: step_of(m, run.id) >= 3, what="step 3")
    assert m.stop(run.id).status == "stopping"
    assert m.stop(run.id).status == "stopping"  # a second Stop sends nothing: a second SIGINT would abort
    wait_for(m, lambda: m.get(run.id).status == "stopped", what="the stop")
    stopped = m.get(run.id)
    ckpt = Path(stopped.trial) / "ckpts" / "last.ckpt"
    step = int(ckpt.read_text())
    assert 3 <= step < 40 and stopped.returncode == 130
    assert f"Continue with: python launch.py --config {Path(stopped.trial) / 'configs' / 'parsed.yaml'} --train " \
           f"resume={ckpt}" in stopped.message
    again = m.resume(run.id)
    assert again.overrides[0] == f"resume={ckpt}"
    wait_for(m, lambda: m.get(again.id).status == "done", what="the continued run")
    assert m.get(again.id).trial == stopped.trial and int(ckpt.read_text()) == 40


def test_one_run_per_device_first_come_first_served(tmp_path):
    m = manager(tmp_path, max_active=1)
    long = ["fake.steps=2000", "fake.step_s=0.02"]
    a = m.submit(CONFIG, ["prompt=a", *long])
    b = m.submit(CONFIG, ["prompt=b", *long])
    c = m.submit(CONFIG, ["prompt=c", "fake.steps=5"])
    other = m.submit(CONFIG, ["prompt=d", "fake.steps=5"], device="cpu")  # another device: not queued
    try:
        assert [r.status for r in (m.get(a.id), m.get(b.id), m.get(c.id))] == ["running", "queued", "queued"]
        assert m.get(other.id).status == "running"
        assert [r.id for r in m.queue()] == [b.id, c.id]
        assert m.snapshot(c.id)["phase"] == "queued (2 in line)"
        assert m.current().id == a.id
        assert m.stop(b.id).status == "cancelled" and m.get(b.id).pid is None
        wait_for(m, lambda: step_of(m, a.id) >= 1, what="a's first step")
        m.stop(a.id)
        wait_for(m, lambda: m.get(c.id).status != "queued", what="c to start")
        assert m.get(a.id).status == "stopped"  # c started only once a had ended
        assert m.get(a.id).ended <= m.get(c.id).started
        wait_for(m, lambda: m.get(c.id).status == "done", what="c to finish")
        assert m.get(b.id).status == "cancelled"
    finally:
        for r in m.runs():
            if r.status in ("running", "queued"):
                m.stop(r.id)
        wait_for(m, lambda: all(r.status not in ("running", "stopping") for r in m.runs()), what="clean-up")


def test_a_restarted_manager_reattaches_to_runs_in_progress_and_keeps_the_queue(tmp_path):
    first = manager(tmp_path, max_active=1)
    a = first.submit(CONFIG, ["prompt=a", "fake.steps=2000", "fake.step_s=0.02"])
    b = first.submit(CONFIG, ["prompt=b", "fake.steps=5"])
    wait_for(first, lambda: step_of(first, a.id) >= 1, what="a's first step")
    first.close()  # the server goes away; the run does not

    second = manager(tmp_path, max_active=1)
    assert second.get(a.id).status == "running" and second.get(b.id).status == "queued"
    assert second.current().id == a.id
    s0 = step_of(second, a.id)
    wait_for(second, lambda: step_of(second, a.id) > s0, what="progress seen by the new manager")
    second.stop(a.id)  # Stop works on a process this manager did not start
    wait_for(second, lambda: second.get(a.id).status == "stopped", what="the stop")
    assert (Path(second.get(a.id).trial) / "ckpts" / "last.ckpt").is_file()
    wait_for(second, lambda: second.get(b.id).status == "done", what="the queued run")


def test_two_managers_on_one_folder_start_a_queued_run_once(tmp_path):
    first = manager(tmp_path, max_active=1)
    a = first.submit(CONFIG, ["prompt=a", "fake.steps=2000", "fake.step_s=0.02"])
    b = first.submit(CONFIG, ["prompt=b", "fake.steps=3", "fake.step_s=0.01"])
    second = manager(tmp_path, max_active=1)  # sees b queued
    wait_for(first, lambda: step_of(first, a.id) > 0, what="a to train")  # a stop during start-up may be lost
    first.stop(a.id)
    wait_for(first, lambda: first.get(b.id).status != "queued", what="b to start")
    second._runs[a.id].status = "stopped"  # second now thinks the device is free too
    second.poll()
    assert second.get(b.id).pid == first.get(b.id).pid  # it took the state of the run, not a second process
    wait_for(first, lambda: first.get(b.id).status == "done", what="b to finish")


def test_a_run_that_ended_while_no_manager_watched_is_settled_from_its_exit_code(tmp_path):
    first = manager(tmp_path)
    run = first.submit(CONFIG, ["prompt=a", "fake.steps=3", "fake.step_s=0.01"])
    rc = first.run_dir(run.id) / "rc"
    deadline = time.monotonic() + 30
    while not rc.is_file() and time.monotonic() < deadline:  # no poll: this manager sees nothing
        time.sleep(0.05)
    assert json.loads((first.run_dir(run.id) / "state.json").read_text())["status"] == "running"
    first._procs[run.id].wait()
    later = manager(tmp_path)
    assert later.get(run.id).status == "done" and later.get(run.id).returncode == 0


def test_a_failed_run_shows_the_launchers_error_line(tmp_path):
    m = manager(tmp_path)
    run = m.submit(CONFIG, ["prompt=a", "fake.exit=2"])
    wait_for(m, lambda: m.get(run.id).status == "failed", what="the failure")
    assert m.get(run.id).message == "error: config key 'fake.exit': this run was told to fail"
    assert m.get(run.id).returncode == 2 and m.get(run.id).trial is None


def test_a_stop_that_lands_before_the_checkpoint_handler_is_still_a_stop(tmp_path):
    m = manager(tmp_path)
    run = m.submit(CONFIG, ["prompt=a", "fake.steps=2000", "fake.step_s=0.02", "fake.sigint_exit=1"])
    wait_for(m, lambda: step_of(m, run.id) >= 1, what="a first step")
    m.stop(run.id)
    wait_for(m, lambda: m.get(run.id).status != "stopping", what="the stop")
    assert m.get(run.id).status == "stopped" and m.get(run.id).returncode == 1
    assert m.get(run.id).message == "stopped before training began; nothing was saved"


def test_a_run_killed_without_an_exit_code_is_failed_not_running(tmp_path):
    import os
    import signal

    m = manager(tmp_path)
    run = m.submit(CONFIG, ["prompt=a", "fake.steps=2000", "fake.step_s=0.02"])
    wait_for(m, lambda: step_of(m, run.id) >= 1, what="a first step")
    os.kill(m.get(run.id).pid, signal.SIGKILL)
    wait_for(m, lambda: m.get(run.id).status == "failed", what="the kill to be noticed")
    assert m.get(run.id).message.startswith("the run's process was killed (SIGKILL)")


# -- the real launcher ------------------------------------------------------------------------------


def cli_error(argv: list[str], capsys) -> str:
    """What ``python launch.py ARGV`` prints on stderr and its exit code (run in-process)."""
    from lift3d.launch import main

    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("case", ["unknown word", "unreadable image", "missing weights"])
def test_refused_input_gets_the_command_lines_message(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    if case == "unknown word":
        args = ["--config", str(CONFIG), "--train", "prompt=a purple elephant"]
        expect = "unknown word(s) 'elephant'"
    elif case == "unreadable image":
        bad = tmp_path / "photo.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really" * 20)
        args = ["--config", str(REPO / "configs/tiny/image-to-3d.yaml"), "--train", f"image={bad}", "prompt=a mug"]
        expect = "cannot read"
    else:
        args = ["--config", str(REPO / "configs/magic3d.yaml"), "--train", "prompt=a hamburger"]
        expect = "hf download stabilityai/stable-diffusion-2-1-base"
    with pytest.raises(RunInputError) as info:
        check_launch(args)
    capsys.readouterr()
    assert str(info.value) == cli_error([*args, "--dry-run"], capsys)
    assert str(info.value).startswith("error: ") and expect in str(info.value)
    # Through the manager: refused before anything is queued or written, the upload removed.
    upload = tmp_path / "upload.png"
    upload.write_bytes(b"x")
    m = RunManager(tmp_path / "out", poll_s=0)
    with pytest.raises(RunInputError):
        m.submit(args[1], args[3:], input_file=upload)
    assert m.runs() == [] and not upload.exists()
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".app"] and not any(m.runs_dir.iterdir())


def test_the_real_launcher_stops_on_sigint_with_a_checkpoint_and_continues(tmp_path):
    """Stop is the launcher's own Ctrl-C: a real tiny run, stopped mid-training, then continued."""
    from lift3d.app.recipes import RecipeBook, step_overrides

    recipe = RecipeBook(REPO / "configs", check_real=False).get("tiny/dreamgaussian")
    m = RunManager(tmp_path, poll_s=0)
    try:
        stop_and_continue(m, recipe, step_overrides)
    finally:  # a failed check must not leave a training process behind
        for r in m.runs():
            if r.status == "running":
                m.stop(r.id)
        wait_for(m, lambda: all(r.status not in ("running", "stopping") for r in m.runs()), timeout=300,
                 what="clean-up")


def stop_and_continue(m: RunManager, recipe, step_overrides) -> None:
    run = m.submit(CONFIG, ["prompt=a red cube", *step_overrides(recipe, 40), "data.n_test_views=4"])
    wait_for(m, lambda: step_of(m, run.id) >= 2, timeout=400, what="training to start")
    m.stop(run.id)
    wait_for(m, lambda: m.get(run.id).status != "stopping", timeout=300, what="the stop")
    stopped = m.get(run.id)
    assert stopped.status == "stopped", (stopped.message, m.log_tail(run.id))
    ckpt = Path(stopped.trial) / "ckpts" / "last.ckpt"
    assert ckpt.is_file() and "Continue with: python launch.py" in stopped.message
    at = re.search(r"stopped at step (\d+)", stopped.message)
    assert at and 2 <= int(at.group(1)) < 40, stopped.message  # mid-training, where the stop landed
    again = m.resume(run.id)
    wait_for(m, lambda: m.get(again.id).status not in ("queued", "running"), timeout=400, what="the continued run")
    assert m.get(again.id).status == "done", m.log_tail(again.id)
    snap = m.snapshot(again.id)
    assert snap["trial"] == stopped.trial and snap["glb"] is not None
    assert snap["progress"]["step"] == 40 and snap["progress"]["phase"] == "tested"
    history = sorted((Path(stopped.trial) / "configs" / "history").iterdir())
    assert [p.name for p in history] == ["001-train.yaml", "002-train.yaml"]  # one trial, continued
