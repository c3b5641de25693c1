"""The thread policy: which count it picks for a load reading, and when it must run (before torch)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lift3d.utils import threads

REPO = Path(__file__).resolve().parents[2]

STAT = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 350 0 0 0 0 0 0
cpu1 200 0 50 250 0 0 0 0 0 0
intr 12345
ctxt 678
"""


@pytest.mark.parametrize("cores, other, expected", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 3.5, 1),
    (1, 0.0, 1), (16, 3.2, 13), (16, 0.49, 16), (4, -0.3, 4),
])
def test_threads_for_load_leaves_out_the_cores_others_keep_busy(cores, other, expected):
    assert threads.threads_for_load(cores, other) == expected


def test_smt_siblings_count_as_one_core(tmp_path):
    # 4 logical CPUs on 2 cores: at most 2 threads, fewer when others are busy.
    for cpu, core in enumerate([0, 0, 1, 1]):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert threads.physical_cores(range(4), sysfs=tmp_path) == 2
    assert threads.physical_cores([0, 1], sysfs=tmp_path) == 1
    assert threads.physical_cores([7], sysfs=tmp_path) is None
    assert threads.threads_for_load(4, 0.0, physical=2) == 2
    assert threads.threads_for_load(4, 3.0, physical=2) == 1


def test_beside_one_busy_process_two_cores_give_one_thread():
    choice = threads.choose_threads(None, environ={}, cores=2, other_load=1.02)
    assert choice.threads == 1 and "auto" in choice.reason
    assert threads.choose_threads("auto", environ={}, cores=2, other_load=0.05).threads == 2


def test_a_requested_count_wins_over_the_load_and_the_environment():
    env = {"OMP_NUM_THREADS": "3"}
    assert threads.choose_threads(2, environ=env, cores=2, other_load=2.0).threads == 2
    assert threads.choose_threads("4", environ=env, cores=2, other_load=2.0).threads == 4


def test_omp_num_threads_is_respected_when_nothing_is_asked_for():
    assert threads.choose_threads(None, environ={"OMP_NUM_THREADS": "3"}, cores=2, other_load=2.0).threads == 3
    assert threads.choose_threads(0, environ={"OMP_NUM_THREADS": "1"}, cores=8, other_load=0.0).threads == 1
    # A value OpenMP would not accept as a count falls back to the load.
    assert threads.choose_threads(None, environ={"OMP_NUM_THREADS": "x"}, cores=2, other_load=0.0).threads == 2


@pytest.mark.parametrize("bad", [-1, "two", 1.5, True])
def test_a_bad_request_says_what_is_valid(bad):
    with pytest.raises(ValueError, match="positive integer or 'auto'"):
        threads.choose_threads(bad, environ={}, cores=2, other_load=0.0)


def test_an_unreadable_load_uses_every_core(monkeypatch):
    monkeypatch.setattr(threads, "measure_other_load", lambda seconds=0.2, cpus=None: None)
    monkeypatch.setattr(threads, "load_average", lambda: None)
    choice = threads.choose_threads(None, environ={}, cores=4)
    assert choice.threads == 4 and choice.other_load is None


def test_the_load_average_stands_in_without_proc_stat(monkeypatch):
    monkeypatch.setattr(threads, "measure_other_load", lambda seconds=0.2, cpus=None: None)
    monkeypatch.setattr(threads, "load_average", lambda: 1.3)
    choice = threads.choose_threads(None, environ={}, cores=2)
    assert choice.threads == 1 and "load average" in choice.reason


def test_prepare_sets_the_wait_policy_unless_the_environment_has_one():
    env: dict[str, str] = {"OMP_NUM_THREADS": "1"}
    assert threads.prepare_threads(None, environ=env) == 1
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert threads.prepare_threads(2, environ=env) == 2
    assert env["OMP_WAIT_POLICY"] == "ACTIVE"
    env = {}
    threads.prepare_threads(1, environ=env, wait_policy=None)
    assert "OMP_WAIT_POLICY" not in env
    assert "1 (asked for)" in threads.thread_note()


def test_requested_threads_reads_the_flag_before_argparse_runs():
    assert threads.requested_threads(["--config", "x.yaml", "--train"]) is None
    assert threads.requested_threads(["--threads", "2", "--train"]) == "2"
    assert threads.requested_threads(["--train", "--threads=auto"]) == "auto"
    assert threads.requested_threads(["--threads", "1", "--threads=3"]) == "3"
    assert threads.requested_threads(["--", "--threads", "2"]) is None
    assert threads.requested_threads(["--threads"]) is None
    assert threads.choose_threads(threads.requested_threads(["--threads", "2"]), environ={}, cores=2,
                                  other_load=2.0).threads == 2


def test_parse_proc_stat_sums_the_cpus_asked_for():
    assert threads.parse_proc_stat(STAT) == (400, 1000)
    assert threads.parse_proc_stat(STAT, cpus=[1]) == (250, 500)
    assert threads.parse_proc_stat(STAT, cpus=[]) == (0, 0)


def test_measure_other_load_leaves_out_this_process(monkeypatch):
    # Between the two readings the CPUs did 150 busy ticks (1.5 s at 100 Hz) in 1 s of wall time,
    # 0.5 s of which was this process's own: others kept one core busy.
    stats = iter([STAT, STAT.replace("cpu0 100", "cpu0 250")])
    own = iter([10.0, 10.5])
    clock = iter([100.0, 101.0])
    monkeypatch.setattr(threads, "_read_proc_stat", lambda: next(stats))
    monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)
    assert threads.measure_other_load(1.0, cpus=[0, 1]) == pytest.approx(1.0)


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="no /proc/stat (not Linux)")
def test_measure_other_load_reads_this_machine():
    load = threads.measure_other_load(0.05)
    assert load is not None and 0.0 <= load <= os.cpu_count() + 0.5


def test_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.usable_cores(affinity=range(8), cgroup_root=tmp_path) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(affinity=range(8), cgroup_root=tmp_path) == 8
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert threads.usable_cores(affinity=range(4), cgroup_root=v1) == 1
    assert threads.usable_cores(affinity=range(3), cgroup_root=tmp_path / "absent") == 3


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**env, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_module_does_not_import_torch():
    code = "import sys, lift3d.utils.threads; print('torch' in sys.modules)"
    assert _python(code, dict(os.environ)) == "False"


def test_prepare_then_apply_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    code = ("import os, warnings\n"
            "warnings.simplefilter('error')\n"
            "from lift3d.utils.threads import apply_threads, prepare_threads\n"
            "n = prepare_threads(1)\n"
            "import torch\n"
            "print(os.environ['OMP_WAIT_POLICY'], n, apply_threads(n), torch.get_num_threads())")
    assert _python(code, env) == "PASSIVE 1 1 1"


def test_prepare_after_torch_warns_that_the_wait_policy_is_lost():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import warnings, torch\n"
            "from lift3d.utils.threads import prepare_threads\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    prepare_threads(1)\n"
            "print(any('no effect' in str(x.message) for x in w))")
    assert _python(code, env) == "True"
