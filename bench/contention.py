"""A recipe's training-step time on an idle machine and beside one CPU-bound process, per thread setting.

Each measurement is a child process that sets its threads the way the setting says *before* it
imports torch (the OpenMP wait policy is read when torch loads), builds the recipe as ``launch.py``
does and times ``--steps`` training steps after ``--warmup`` (``bench/train_step.py``'s
``run_variant``). The conditions alternate within each round: idle, then beside a busy process (a
Python busy loop, one core's worth, optionally pinned to one CPU), and the settings rotate their
order from round to round, so slow drifts of the machine hit every row alike. The table gives the
median over rounds of each child's median step time and the ratios the goal is stated in.

Settings:

* ``default``: what torch does by itself (as many threads as cores, OpenMP's default wait policy);
* ``1``: one thread (``OMP_NUM_THREADS=1``), the baseline;
* ``auto``: ``lift3d.utils.threads.prepare_threads(None)``: the count from the measured load and
  ``OMP_WAIT_POLICY=PASSIVE``;
* ``2-passive`` (any ``N-passive``): N threads with ``OMP_WAIT_POLICY=PASSIVE``;
* ``2-spin30000`` (any ``N-spinK``): N threads, no wait policy, ``GOMP_SPINCOUNT=K`` (libgomp, the
  OpenMP runtime of torch's Linux wheels: a waiting thread spins K times, then sleeps).

    python bench/contention.py [--configs configs/tiny/dreamfusion.yaml configs/tiny/dreamgaussian.yaml] \\
        [--settings default 1 auto 2-passive] [--rounds 3] [--warmup 3] [--steps 10] [--pin-busy CPU]

Conditions: ``idle`` (nothing added), ``busy`` (the busy process runs before the child starts, so
the automatic choice sees it), ``joins`` (it starts with the first timed step, after the count was
chosen: what a run that began alone meets when another job arrives). Run it with nothing else on
the machine: the "idle" rows assume it is. The table's heading says how
many cores other processes kept busy when each condition began (``/proc/stat``, 0.5 s), so a
machine that was not idle shows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OMP_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
BUSY_LOOP = "while True:\n    pass\n"


def child(setting: str, config: str, warmup: int, steps: int, join: bool = False) -> None:
    """Apply ``setting`` before torch loads, then time the recipe's steps; prints one CHILD line."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from lift3d.utils.threads import apply_threads, prepare_threads, thread_note

    n = None
    if setting == "auto":
        n = prepare_threads(None)
    elif setting.endswith("-passive"):
        n = prepare_threads(int(setting.split("-")[0]), wait_policy="PASSIVE")
    elif "-spin" in setting:
        count, spin = setting.split("-spin")
        n = prepare_threads(int(count), spin_count=int(spin))
    elif setting not in ("default",) and not setting.isdigit():
        raise SystemExit(f"unknown setting {setting!r}: default, auto, N, N-passive or N-spinK")
    import torch

    if n is not None:
        apply_threads(n)
    from train_step import run_variant

    callbacks = []
    if join:  # the busy process arrives with the first timed step
        import lightning.pytorch as pl

        class Join(pl.Callback):
            proc = None

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if batch_idx == warmup and self.proc is None:
                    self.proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])

            def on_train_end(self, trainer, module):
                if self.proc is not None:
                    stop(self.proc)

        callbacks.append(Join())
    r = run_variant(config, [], None, warmup, steps, callbacks=callbacks)
    note = thread_note() if n is not None else ""
    r.update(threads=torch.get_num_threads(), note=note,
             wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"))
    print("CHILD " + json.dumps(r), flush=True)


def run_child(setting: str, config: str, args: argparse.Namespace, join: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    if setting.isdigit():
        env["OMP_NUM_THREADS"] = setting
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", setting, "--configs", config,
           "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--join"] if join else [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("CHILD ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"{setting} on {config} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][6:])


def start_busy(pin: int | None) -> subprocess.Popen:
    """One CPU-bound process (a Python busy loop), pinned to CPU ``pin`` when given."""
    def preexec() -> None:
        if pin is not None:
            os.sched_setaffinity(0, {pin})

    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], preexec_fn=preexec)
    time.sleep(1.0)  # running before the child probes the load
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["configs/tiny/dreamfusion.yaml", "configs/tiny/dreamgaussian.yaml"])
    ap.add_argument("--settings", nargs="+", default=["default", "1", "auto", "2-passive"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pin-busy", type=int, default=None, help="pin the busy process to this CPU (default: not pinned)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--join", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--conditions", nargs="+", default=["idle", "busy", "joins"],
                    help="idle; busy (a busy process runs from before the child starts); joins (it starts "
                         "with the first timed step, after the thread count was chosen)")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.configs[0], args.warmup, args.steps, args.join)

    sys.path.insert(0, str(REPO))
    from lift3d.utils.threads import measure_other_load

    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} at start; {args.rounds} rounds, median of {args.steps} "
          f"steps after {args.warmup} per child; busy process: a Python loop"
          f"{f' pinned to CPU {args.pin_busy}' if args.pin_busy is not None else ', not pinned'}", flush=True)
    for config in args.configs:
        res: dict[tuple[str, str], list[dict]] = {}
        loads: dict[str, list[float | None]] = {}
        for rnd in range(args.rounds):
            k = rnd % len(args.settings)
            order = args.settings[k:] + args.settings[:k]
            for cond in args.conditions:
                busy = start_busy(args.pin_busy) if cond == "busy" else None
                seen = measure_other_load(0.5)
                loads.setdefault(cond, []).append(seen)
                try:
                    for s in order:
                        r = run_child(s, config, args, join=cond == "joins")
                        res.setdefault((s, cond), []).append(r)
                        print(f"  round {rnd + 1} {cond:>5} {s:>10}: {r['median_s']:.4f} s/step (mean "
                              f"{r['mean_s']:.4f}), {r['threads']} threads at the end; {r['note']}", flush=True)
                finally:
                    if busy is not None:
                        stop(busy)
                time.sleep(1.0)
        # Per (setting, condition): the median over rounds of each child's mean step time (the mean
        # keeps the slow steps before a thread count adapts) and of its median step time.
        mean = {key: statistics.median(r["mean_s"] for r in rs) for key, rs in res.items()}
        med = {key: statistics.median(r["median_s"] for r in rs) for key, rs in res.items()}
        threads = {key: "/".join(map(str, sorted({r["threads"] for r in rs}))) for key, rs in res.items()}
        seen = {c: ", ".join("?" if v is None else f"{v:.1f}" for v in vs) for c, vs in loads.items()}
        print(f"\n{config}: median over {args.rounds} rounds of each child's mean (median) s/step; cores kept busy "
              f"by other processes when each condition began (its rounds): "
              + "; ".join(f"{c} {seen.get(c)}" for c in args.conditions))
        others = [c for c in args.conditions if c != "idle"]
        head = ["setting", "threads at the end"] + [f"{c} s/step" for c in args.conditions]
        head += [f"{c} vs 1 thread" for c in args.conditions]
        head += [f"{c} / idle" for c in others] if "idle" in args.conditions else []
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for st in args.settings:
            row = [st, " ".join(f"{c}:{threads[(st, c)]}" for c in args.conditions)]
            row += [f"{mean[(st, c)]:.4f} ({med[(st, c)]:.4f})" for c in args.conditions]
            row += [f"{mean[(st, c)] / mean[('1', c)]:.2f}" if ("1", c) in mean else "-" for c in args.conditions]
            if "idle" in args.conditions:
                row += [f"{mean[(st, c)] / mean[(st, 'idle')]:.2f}" for c in others]
            print("| " + " | ".join(row) + " |")
        print("(ratios are time ratios: below 1 is faster than one thread)", flush=True)


if __name__ == "__main__":
    main()
