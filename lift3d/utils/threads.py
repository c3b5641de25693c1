"""How many torch threads to run, chosen so that a busy machine slows a run down gracefully.

Intra-op threads pay off only on cores nobody else wants. Beside other CPU-bound work, every
parallel region waits for its slowest thread, and that thread shares its core; with OpenMP's
default wait policy the waiting threads also spin at each barrier, taking the cycles the slow one
needs. On a 2-core machine with other jobs running, tiny dreamfusion took 120-162 s for 40 steps at
torch's default of two threads against 19-37 s at one (bench/README.md, "Threads on a busy machine").

Two things help, and both must happen at the right moment:

1. ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at barriers instead of spinning). torch's OpenMP
   runtime reads it once, when the library loads, so it must be in ``os.environ`` before the first
   ``import torch`` anywhere in the process. :func:`prepare_threads` sets it (unless the
   environment already says otherwise) and must run first.
2. A thread count that leaves out the cores other processes keep busy. :func:`prepare_threads`
   measures that: the CPU time of every core this process may run on, from ``/proc/stat``, over a
   short window (0.2 s), minus this process's own CPU time (so a process that calls it twice does
   not count itself). Where ``/proc/stat`` is missing, the 1-minute load average stands in.
   :func:`apply_threads` then gives the count to torch.

This module must not import torch at module level (that would defeat point 1). Usage::

    from lift3d.utils.threads import apply_threads, prepare_threads, requested_threads
    n = prepare_threads(requested_threads(sys.argv[1:]))   # before torch is imported
    import torch                     # (or anything that imports it)
    apply_threads(n)

A number asked for is used as it is; ``None``/``"auto"`` take ``OMP_NUM_THREADS`` when the
environment sets it, and otherwise measure the load. The thread count can change a run's numbers
in the last bits (parallel reductions split their work by thread), so the automatic choice makes a
run's result depend on the load unless a count is given.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, MutableMapping, Optional, Union

#: Seconds :func:`measure_other_load` watches the CPU counters for at start-up.
PROBE_SECONDS = 0.2

Requested = Union[int, str, None]


@dataclass(frozen=True)
class ThreadChoice:
    """What :func:`choose_threads` decided and why (``reason`` is one line for the log)."""

    threads: int
    cores: int
    other_load: Optional[float]
    reason: str


_LAST: Optional[ThreadChoice] = None


# ---------------------------------------------------------------------------------------------- reading the machine
def usable_cores(affinity: Optional[Iterable[int]] = None, cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    if affinity is None:
        try:
            affinity = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            affinity = range(os.cpu_count() or 1)
    cores = max(1, len(list(affinity)))
    quota = _cgroup_quota(Path(cgroup_root))
    if quota is not None:
        cores = max(1, min(cores, math.ceil(quota - 1e-9)))
    return cores


def physical_cores(cpus: Iterable[int], sysfs: str | Path = "/sys/devices/system/cpu") -> Optional[int]:
    """Distinct physical cores among logical ``cpus`` (SMT siblings count once, as torch's default
    thread count does); None where the topology cannot be read."""
    seen = set()
    for c in cpus:
        topo = Path(sysfs) / f"cpu{c}" / "topology"
        try:
            seen.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(seen) or None


def _cgroup_quota(root: Path) -> Optional[float]:
    """Cores allowed by a cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited or unknown."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def parse_proc_stat(text: str, cpus: Optional[Iterable[int]] = None) -> tuple[int, int]:
    """(busy, total) clock ticks summed over the ``cpuN`` lines of ``/proc/stat`` text (only the
    CPUs in ``cpus`` when given). Busy is user + nice + system + irq + softirq + steal (time the
    hypervisor gave to someone else is lost to us too); total adds idle and iowait."""
    wanted = None if cpus is None else {int(c) for c in cpus}
    busy = total = 0
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if wanted is not None and int(name[3:]) not in wanted:
            continue
        v = [int(x) for x in fields[:8]] + [0] * max(0, 8 - len(fields))
        user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
        b = user + nice + system + irq + softirq + steal
        busy += b
        total += b + idle + iowait
    return busy, total


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _read_proc_stat() -> str:
    return Path("/proc/stat").read_text()


def measure_other_load(seconds: float = PROBE_SECONDS, cpus: Optional[Iterable[int]] = None) -> Optional[float]:
    """Cores' worth of CPU time other processes used on ``cpus`` (default: this process's
    affinity) during the next ``seconds``; None where ``/proc/stat`` cannot be read."""
    if cpus is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = None
    try:
        hz = os.sysconf("SC_CLK_TCK")
        b0, _ = parse_proc_stat(_read_proc_stat(), cpus)
        own0, t0 = _own_cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        b1, _ = parse_proc_stat(_read_proc_stat(), cpus)
        own1, t1 = _own_cpu_seconds(), time.monotonic()
    except (OSError, ValueError, AttributeError):
        return None
    wall = max(t1 - t0, 1e-6)
    return max(0.0, ((b1 - b0) / hz - (own1 - own0)) / wall)


def load_average() -> Optional[float]:
    """The 1-minute load average (runnable processes, this one included); None where unavailable."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# ---------------------------------------------------------------------------------------------- the policy
def threads_for_load(cores: int, other_load: float, physical: Optional[int] = None) -> int:
    """Threads for ``cores`` usable (logical) CPUs of which other processes keep ``other_load`` busy.

    Each CPU that is half or more in use elsewhere is left out (a thread that shares its core
    holds up every parallel region); at least one thread, at most ``cores`` and at most
    ``physical`` (the physical cores among them: SMT siblings share one core's arithmetic).
    """
    taken = math.floor(max(0.0, other_load) + 0.5)
    cap = cores if physical is None else max(1, min(cores, physical))
    return max(1, min(cap, cores - taken))


def _parse_requested(requested: Requested) -> Optional[int]:
    if requested is None:
        return None
    if isinstance(requested, str):
        text = requested.strip().lower()
        if text in ("", "auto"):
            return None
        try:
            requested = int(text)
        except ValueError:
            raise ValueError(f"threads must be a positive integer or 'auto', got {requested!r}") from None
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise ValueError(f"threads must be a positive integer or 'auto', got {requested!r}")
    return requested or None  # 0 means auto


def choose_threads(requested: Requested = None, environ: Optional[MutableMapping[str, str]] = None,
                   cores: Optional[int] = None, other_load: Optional[float] = None,
                   probe_seconds: float = PROBE_SECONDS) -> ThreadChoice:
    """The thread count :func:`prepare_threads` would use, without touching the environment.

    ``cores`` and ``other_load`` default to :func:`usable_cores` and a fresh measurement
    (:func:`measure_other_load`, else :func:`load_average`); tests pass them in.
    """
    env = os.environ if environ is None else environ
    n = _parse_requested(requested)
    if n is not None:
        return ThreadChoice(n, cores or usable_cores(), None, f"{n} (asked for)")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        try:
            n = int(omp.split(",")[0])
        except ValueError:
            n = 0
        if n > 0:
            return ThreadChoice(n, cores or usable_cores(), None, f"{n} (OMP_NUM_THREADS)")
    physical = None
    if cores is None:
        cores = usable_cores()
        try:
            physical = physical_cores(sorted(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            physical = None
    source = "given"
    if other_load is None:
        other_load, source = measure_other_load(probe_seconds), "/proc/stat"
        if other_load is None:
            other_load, source = load_average(), "load average"
    if other_load is None:
        n = threads_for_load(cores, 0.0, physical)
        return ThreadChoice(n, cores, None, f"{n} (all usable cores; the load could not be read)")
    n = threads_for_load(cores, other_load, physical)
    return ThreadChoice(n, cores, other_load,
                        f"{n} (auto: other processes keep {other_load:.1f} of {cores} cores busy, {source})")


def requested_threads(argv: Iterable[str]) -> Optional[str]:
    """The value of ``--threads N`` / ``--threads=N`` in a command line (the last one wins), None
    without one: for a launcher that must choose before it parses its arguments (and imports torch)."""
    args = list(argv)
    value = None
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--threads" and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith("--threads="):
            value = a.split("=", 1)[1]
    return value


# ---------------------------------------------------------------------------------------------- the two calls
def prepare_threads(requested: Requested = None, environ: Optional[MutableMapping[str, str]] = None,
                    wait_policy: Optional[str] = "PASSIVE", probe_seconds: float = PROBE_SECONDS) -> int:
    """Choose the thread count and set the OpenMP wait policy; call it before torch is imported.

    ``requested``: a positive int is used as given; None, 0 or "auto" choose (``OMP_NUM_THREADS``
    if the environment sets it, else from the measured load). ``wait_policy`` goes into
    ``OMP_WAIT_POLICY`` unless the environment already has one (None: leave it alone). Returns the
    count to pass to :func:`apply_threads`; :func:`thread_note` says how it was chosen.
    """
    global _LAST
    env = os.environ if environ is None else environ
    if wait_policy and "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = wait_policy
        if environ is None and "torch" in sys.modules:
            warnings.warn("lift3d.utils.threads.prepare_threads ran after torch was imported: OpenMP read "
                          "its wait policy when torch loaded, so OMP_WAIT_POLICY has no effect in this process",
                          RuntimeWarning, stacklevel=2)
    _LAST = choose_threads(requested, env, probe_seconds=probe_seconds)
    return _LAST.threads


def apply_threads(n: int) -> int:
    """Give torch ``n`` intra-op threads (imports torch); returns ``torch.get_num_threads()``."""
    import torch

    if n < 1:
        raise ValueError(f"apply_threads needs a positive thread count, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def thread_note() -> str:
    """One line for the log: the last choice of :func:`prepare_threads` and the wait policy."""
    if _LAST is None:
        return "threads: not chosen by lift3d (torch's default)"
    return f"threads: {_LAST.reason}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"


def last_choice() -> Optional[ThreadChoice]:
    """The :class:`ThreadChoice` of the last :func:`prepare_threads` call (None before it)."""
    return _LAST


__all__ = ["ThreadChoice", "apply_threads", "choose_threads", "last_choice", "load_average", "measure_other_load",
           "parse_proc_stat", "physical_cores", "prepare_threads", "requested_threads", "thread_note", "threads_for_load", "usable_cores"]
