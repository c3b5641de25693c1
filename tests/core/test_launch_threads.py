"""The launcher chooses torch's thread count and OpenMP's spin before torch loads, and the automatic
count follows the load."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lift3d.launch import main
from lift3d.utils import threads as threads_module
from lift3d.utils.threads import SPIN_COUNT

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny" / "dreamfusion.yaml")


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def test_the_command_line_sets_the_policy_before_torch_loads_and_applies_the_count(tmp_path):
    # A spy on prepare_threads records whether torch was already imported when the launcher chose;
    # the child then prints what torch ended up with.
    script = f"""
import os, sys
import lift3d.utils.threads as th
orig = th.prepare_threads
def spy(*a, **k):
    print("TORCH_BEFORE_PREPARE", "torch" in sys.modules, flush=True)
    return orig(*a, **k)
th.prepare_threads = spy
sys.argv = ["launch.py", "--config", {TINY!r}, "--train", "--dry-run", "--threads", "2", "exp_root_dir={tmp_path}"]
from lift3d.launch import main
from lift3d.utils import threads as threads_module
from lift3d.utils.threads import SPIN_COUNT
try:
    main()
except SystemExit as e:
    import torch
    print("RESULT", e.code, torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"), flush=True)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert "TORCH_BEFORE_PREPARE False" in out, out + proc.stderr
    assert f"RESULT 0 2 {SPIN_COUNT}" in out, out + proc.stderr
    assert f"threads: 2 (asked for); GOMP_SPINCOUNT={SPIN_COUNT}" in out
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"


def test_launch_py_defaults_to_auto_and_respects_the_environment(tmp_path):
    args = [sys.executable, str(REPO / "launch.py"), "--config", TINY, "--train", "--dry-run", f"exp_root_dir={tmp_path}"]
    # Nothing asked for: the count comes from the measured load and follows it; a policy the user set is kept.
    proc = subprocess.run(args, cwd=tmp_path, env=_env(OMP_WAIT_POLICY="ACTIVE"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"threads: \d \(auto: other processes keep \d+\.\d of \d+ cores busy, /proc/stat\); "
                     r"follows the load during the run; OMP_WAIT_POLICY=ACTIVE", proc.stdout), proc.stdout
    bad = subprocess.run(args + ["--threads", "two"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2
    assert "--threads 'two'" in bad.stderr and "positive integer or 'auto'" in bad.stderr


def test_in_process_calls_keep_the_callers_threads_unless_asked(tiny_recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    before = torch.get_num_threads()
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tiny_recipe), "--train", "--dry-run", f"exp_root_dir={tmp_path}"])
    assert exc.value.code == 0
    assert torch.get_num_threads() == before
    assert "GOMP_SPINCOUNT" not in os.environ
    assert "threads:" not in capsys.readouterr().out
    try:
        with pytest.raises(SystemExit) as exc:
            main(["--config", str(tiny_recipe), "--train", "--dry-run", "--threads", "2", f"exp_root_dir={tmp_path}"])
        assert exc.value.code == 0
        assert torch.get_num_threads() == 2
        # torch is loaded here, so the launcher does not pretend to set a spin it cannot change,
        # and an embedding program's thread count is not governed behind its back
        assert "GOMP_SPINCOUNT" not in os.environ and threads_module._GOVERNOR is None
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(tiny_recipe), "--train", "--threads", "-3"])
    assert exc.value.code == 2
    assert "--threads '-3'" in capsys.readouterr().err
