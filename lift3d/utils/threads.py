"""How many torch threads to run, chosen so that a busy machine slows a run down gracefully.

Intra-op threads pay off only on cores nobody else wants. Beside other CPU-bound work, every
parallel region waits for its slowest thread, and that thread shares its core; with OpenMP's
default wait policy the waiting threads also spin at each barrier, taking the cycles the slow one
needs. On a 2-core machine, tiny dreamfusion beside one busy process ran 12.6x slower at torch's
default two threads than at one thread (bench/README.md, "Threads on a busy machine").

Three things help, measured on that machine:

1. The thread count leaves out the cores other processes keep busy. :func:`prepare_threads`
   measures that at start-up: the CPU time of every core this process may run on, from
   ``/proc/stat``, over a short window (0.2 s), minus this process's own CPU time (so a process
   that asks twice does not count itself). Where ``/proc/stat`` is missing, the 1-minute load
   average stands in. :func:`apply_threads` gives the count to torch.
2. The count follows the load during the run: with the automatic choice, :func:`prepare_threads`
   starts a :class:`ThreadGovernor`, and :func:`poll_threads` (called by every training step)
   measures the load again every 0.25 s from the same counters, without sleeping; a process that
   arrives takes its core away from torch at the next poll, and the core comes back once it has
   been free for two polls in a row.
3. A bounded spin: waiting OpenMP threads spin ``GOMP_SPINCOUNT`` (30000) times, then sleep.
   Spinning keeps an idle machine fast (``OMP_WAIT_POLICY=PASSIVE``, no spinning, made two threads
   slower than one on the idle machine); the bound limits the damage in the second before the
   governor reacts. libgomp (torch's OpenMP runtime on Linux) reads it once, when torch loads, so
   :func:`prepare_threads` must run before the first ``import torch`` in the process. It is left
   alone where the environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.

This module must not import torch at module level (that would defeat point 3). Usage::

    from lift3d.utils.threads import apply_threads, prepare_threads, requested_threads
    n = prepare_threads(requested_threads(sys.argv[1:]))   # before torch is imported
    import torch                     # (or anything that imports it)
    apply_threads(n)

A number asked for is used as it is, for the whole run; ``None``/``"auto"`` take
``OMP_NUM_THREADS`` when the environment sets it, and otherwise measure the load (and govern).
The thread count can change a run's numbers in the last bits (parallel reductions split their work
by thread), so the automatic choice makes a run's result depend on the load unless a count is given.
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
#: ``GOMP_SPINCOUNT`` set by :func:`prepare_threads`: iterations a waiting OpenMP thread spins before it sleeps.
SPIN_COUNT = 30000
#: Seconds between two load measurements of the :class:`ThreadGovernor`.
GOVERN_SECONDS = 0.25

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


def parse_requested(requested: Requested) -> Optional[int]:
    """A thread count asked for, None for automatic (None, 0, "" or "auto"); ValueError otherwise."""
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
    n = parse_requested(requested)
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
                    wait_policy: Optional[str] = None, probe_seconds: float = PROBE_SECONDS,
                    spin_count: Optional[int] = SPIN_COUNT, govern: bool = True) -> int:
    """Choose the thread count and the OpenMP spin; call it before torch is imported.

    ``requested``: a positive int is used as given; None, 0 or "auto" choose (``OMP_NUM_THREADS``
    if the environment sets it, else from the measured load, and then, with ``govern``, a
    :class:`ThreadGovernor` keeps choosing during the run). Unless the environment has
    ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: ``wait_policy`` given goes into ``OMP_WAIT_POLICY``,
    else ``spin_count`` into ``GOMP_SPINCOUNT`` (None: leave both alone). Returns the count to pass
    to :func:`apply_threads`; :func:`thread_note` says how it was chosen.
    """
    global _LAST, _GOVERNOR
    env = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env and (wait_policy or spin_count is not None):
        if wait_policy:
            env["OMP_WAIT_POLICY"] = wait_policy
        else:
            env["GOMP_SPINCOUNT"] = str(int(spin_count))
        if environ is None and "torch" in sys.modules:
            warnings.warn("lift3d.utils.threads.prepare_threads ran after torch was imported: OpenMP read "
                          "its wait policy and spin count when torch loaded, so setting them has no effect "
                          "in this process", RuntimeWarning, stacklevel=2)
    _LAST = choose_threads(requested, env, probe_seconds=probe_seconds)
    _GOVERNOR = ThreadGovernor(_LAST.threads) if govern and _LAST.other_load is not None else None
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
    """One line for the log: the last choice of :func:`prepare_threads` and the OpenMP settings."""
    if _LAST is None:
        return "threads: not chosen by lift3d (torch's default)"
    omp = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    follows = "; follows the load during the run" if _GOVERNOR is not None else ""
    return f"threads: {_LAST.reason}{follows}; {omp or 'OpenMP defaults'}"


# ---------------------------------------------------------------------------------------------- during the run
class ThreadGovernor:
    """Re-chooses torch's thread count while a run goes on, from the load other processes put on
    this process's cores (the same policy as at start-up, :func:`threads_for_load`).

    :meth:`poll` is cheap when called often: it reads the CPU counters at most every ``interval``
    seconds and measures over the time since the last reading (nothing sleeps). Fewer threads take
    effect at once; more only after two readings in a row agree, so a short pause of another job
    does not flip the count back and forth.
    """

    def __init__(self, threads: int, cores: Optional[int] = None, physical: Optional[int] = None,
                 interval: float = GOVERN_SECONDS, cpus: Optional[Iterable[int]] = None):
        if cpus is None:
            try:
                cpus = sorted(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                cpus = None
        self.cpus = None if cpus is None else list(cpus)
        self.cores = cores or usable_cores()
        if physical is None and self.cpus is not None:
            physical = physical_cores(self.cpus)
        self.physical = physical
        self.interval = interval
        self.threads = threads
        self.changes: list[tuple[int, int, float]] = []
        """(from, to, other processes' load) of every change made."""
        self._pending: Optional[int] = None
        self._last: Optional[tuple[int, float, float]] = None

    def _reading(self) -> Optional[tuple[int, float, float]]:
        try:
            busy, _ = parse_proc_stat(_read_proc_stat(), self.cpus)
        except (OSError, ValueError):
            return None
        return busy, _own_cpu_seconds(), time.monotonic()

    def poll(self) -> Optional[int]:
        """Measure if ``interval`` has passed; returns the new count when it changed, else None."""
        now = time.monotonic()
        if self._last is not None and now - self._last[2] < self.interval:
            return None
        reading = self._reading()
        if reading is None:
            return None
        last, self._last = self._last, reading
        if last is None:
            return None
        try:
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, AttributeError):
            return None
        wall = max(reading[2] - last[2], 1e-6)
        other = max(0.0, ((reading[0] - last[0]) / hz - (reading[1] - last[1])) / wall)
        want = threads_for_load(self.cores, other, self.physical)
        if want == self.threads:
            self._pending = None
            return None
        if want > self.threads and self._pending != want:
            self._pending = want  # more threads: only when the next reading agrees
            return None
        self._pending = None
        self.changes.append((self.threads, want, other))
        self.threads = want
        return want


_GOVERNOR: Optional[ThreadGovernor] = None


def poll_threads() -> Optional[int]:
    """Let the governor started by :func:`prepare_threads` re-choose torch's thread count (no-op
    without one: a count asked for, ``OMP_NUM_THREADS``, or lift3d used as a library). Returns the
    new count when it changed."""
    if _GOVERNOR is None:
        return None
    n = _GOVERNOR.poll()
    if n is not None:
        apply_threads(n)
        frm, to, other = _GOVERNOR.changes[-1]
        print(f"[lift3d] threads: {frm} -> {to} (other processes keep {other:.1f} of {_GOVERNOR.cores} cores busy)",
              flush=True)
    return n


def stop_governing() -> None:
    """Keep the current thread count from now on."""
    global _GOVERNOR
    _GOVERNOR = None


def last_choice() -> Optional[ThreadChoice]:
    """The :class:`ThreadChoice` of the last :func:`prepare_threads` call (None before it)."""
    return _LAST


__all__ = ["SPIN_COUNT", "ThreadChoice", "ThreadGovernor", "poll_threads", "stop_governing", "apply_threads", "choose_threads", "last_choice", "load_average", "measure_other_load", "parse_requested",
           "parse_proc_stat", "physical_cores", "prepare_threads", "requested_threads", "thread_note", "threads_for_load", "usable_cores"]
