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


def test_prepare_bounds_the_spin_unless_the_environment_sets_openmp_waiting():
    env: dict[str, str] = {"OMP_NUM_THREADS": "1"}
    assert threads.prepare_threads(None, environ=env) == 1
    assert env["GOMP_SPINCOUNT"] == str(threads.SPIN_COUNT) and "OMP_WAIT_POLICY" not in env
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(mine)
        assert threads.prepare_threads(2, environ=env) == 2
        assert env == mine
    env = {}
    threads.prepare_threads(2, environ=env, wait_policy="PASSIVE")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    env = {}
    threads.prepare_threads(1, environ=env, spin_count=None)
    assert env == {}
    assert "1 (asked for)" in threads.thread_note() and "follows the load" not in threads.thread_note()


def test_only_the_automatic_choice_follows_the_load(monkeypatch):
    monkeypatch.setattr(threads, "measure_other_load", lambda seconds=0.2, cpus=None: 0.0)
    try:
        threads.prepare_threads(None, environ={})
        assert threads._GOVERNOR is not None and "follows the load during the run" in threads.thread_note()
        threads.prepare_threads(None, environ={"OMP_NUM_THREADS": "2"})
        assert threads._GOVERNOR is None
        threads.prepare_threads(None, environ={}, govern=False)
        assert threads._GOVERNOR is None
    finally:
        threads.stop_governing()


class FakeMachine:
    """CPU counters of a 2-core machine at 100 Hz: each ``run(other, own)`` is one second in which
    other processes kept ``other`` cores busy and this one used ``own`` seconds of CPU."""

    def __init__(self, monkeypatch):
        self.t, self.busy, self.own, self.reads = 0.0, 0, 0.0, 0
        monkeypatch.setattr(threads, "_read_proc_stat", self.stat)
        monkeypatch.setattr(threads, "_own_cpu_seconds", lambda: self.own)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.t)
        monkeypatch.setattr(threads.os, "sysconf", lambda name: 100)

    def stat(self) -> str:
        self.reads += 1
        return f"cpu  0 0 0 0 0 0 0 0\ncpu0 {self.busy} 0 0 0 0 0 0 0\ncpu1 0 0 0 0 0 0 0 0\n"

    def run(self, other: float, own: float = 1.0, seconds: float = 1.0) -> None:
        self.t += seconds
        self.busy += round(100 * seconds * (other + own))
        self.own += own * seconds


def test_the_governor_gives_a_core_away_at_once_and_takes_it_back_when_it_stays_free(monkeypatch):
    m = FakeMachine(monkeypatch)
    g = threads.ThreadGovernor(2, cores=2, physical=2, interval=1.0, cpus=[0, 1])
    assert g.poll() is None  # the first reading only starts the clock
    m.run(other=1.0)
    assert g.poll() == 1  # a busy process arrived: one thread from now on
    m.run(other=1.0, seconds=0.5)
    reads = m.reads
    assert g.poll() is None and m.reads == reads  # within the interval nothing is read
    m.run(other=1.0, seconds=0.5)
    assert g.poll() is None  # still busy, still one thread
    m.run(other=0.0)
    assert g.poll() is None  # free for one reading: not yet
    m.run(other=0.0)
    assert g.poll() == 2
    m.run(other=1.0)
    assert g.poll() == 1
    m.run(other=0.0)
    assert g.poll() is None
    m.run(other=1.0)  # a one-second pause of the other job does not bring the thread back
    assert g.poll() is None
    m.run(other=0.0)
    assert g.poll() is None and g.threads == 1
    assert [c[:2] for c in g.changes] == [(2, 1), (1, 2), (2, 1)]


def test_poll_threads_applies_the_governors_choice_to_torch(monkeypatch, capsys):
    import torch

    m = FakeMachine(monkeypatch)
    monkeypatch.setattr(threads, "_GOVERNOR", threads.ThreadGovernor(1, cores=2, physical=2, cpus=[0, 1]))
    before = torch.get_num_threads()
    try:
        threads.poll_threads()
        for _ in range(2):
            m.run(other=0.0)
            threads.poll_threads()
        assert torch.get_num_threads() == 2
        assert "[lift3d] threads: 1 -> 2 (other processes keep 0.0 of 2 cores busy)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(threads, "_GOVERNOR", None)
    assert threads.poll_threads() is None


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
    # A sanity bound: the counters tick at 100 Hz and are read a few hundred microseconds apart from
    # the clock, so on a loaded machine a 0.2 s window can over-count by a fraction of the cores.
    load = threads.measure_other_load(0.2)
    assert load is not None and 0.0 <= load <= 1.5 * os.cpu_count()


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
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    code = ("import os, warnings\n"
            "warnings.simplefilter('error')\n"
            "from lift3d.utils.threads import apply_threads, prepare_threads\n"
            "n = prepare_threads(1)\n"
            "import torch\n"
            "print(os.environ['GOMP_SPINCOUNT'], n, apply_threads(n), torch.get_num_threads())")
    assert _python(code, env) == f"{threads.SPIN_COUNT} 1 1 1"


def test_prepare_after_torch_warns_that_the_wait_policy_is_lost():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import warnings, torch\n"
            "from lift3d.utils.threads import prepare_threads\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    prepare_threads(1)\n"
            "print(any('no effect' in str(x.message) for x in w))")
    assert _python(code, env) == "True"
