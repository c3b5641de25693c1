"""Hash-grid field throughput: lift3d's vectorised torch encoding vs a naive per-level reference.

Prints, for 8 and 16 levels (table 2^15, 2 features per level), forward and forward+backward
throughput in points/s (median of 5 runs) for both implementations, the speed-up, and the peak
resident-memory growth of each measured in a fresh subprocess. Timings on a shared machine are
indicative only.

    python bench/fields.py [--points 65536] [--threads 1] [--log2-table 15] [--no-memory] [--profile 15]

``--chunking`` instead compares, alternated in one process, forward+backward at one thread, at two
threads with one thread's chunk (``CHUNK_PER_THREAD`` off) and at two threads with chunks scaled by
the thread count (on): run it on an idle machine, once as it is and once with ``GOMP_SPINCOUNT`` or
``OMP_WAIT_POLICY`` set in the environment to see the OpenMP runtime's share.

``--profile N`` instead prints the N operators with the most self CPU time in lift3d's
forward+backward at 8 levels (torch.profiler, 5 runs after a warm-up), to see which ones a second
thread speeds up or slows down (run it at ``--threads 1`` and ``--threads 2``).

Peak memory is the growth of the process's peak RSS over one forward+backward (Linux
/proc/self/clear_refs + VmHWM), measured in a spawned subprocess per row.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import resource

import torch
import torch.nn as nn

from lift3d.geometry.encodings import HashGridEncoding
from timing import median_seconds

PRIMES = (1, 2654435761, 805459861)


class NaiveHashGrid(nn.Module):
    """The textbook version: a Python loop over levels, 8 corner lookups each, autograd backward."""

    def __init__(self, n_levels: int, n_features: int = 2, log2_table: int = 15, base_res: int = 16,
                 per_level_scale: float = 1.447269237440378) -> None:
        super().__init__()
        self.T = 1 << log2_table
        self.scales = [base_res * per_level_scale**lv - 1.0 for lv in range(n_levels)]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(self.T, n_features).uniform_(-1e-4, 1e-4)) for _ in range(n_levels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = []
        for scale, table in zip(self.scales, self.tables):
            pos = x * scale + 0.5
            cell = pos.floor()
            frac = pos - cell
            ci = cell.long()
            out = 0.0
            for corner in range(8):
                bits = [(corner >> d) & 1 for d in range(3)]
                c = [ci[:, d] + bits[d] for d in range(3)]
                idx = ((c[0] * PRIMES[0]) ^ (c[1] * PRIMES[1]) ^ (c[2] * PRIMES[2])) % self.T
                w = torch.ones_like(frac[:, 0])
                for d in range(3):
                    w = w * (frac[:, d] if bits[d] else 1.0 - frac[:, d])
                out = out + w[:, None] * table[idx]
            feats.append(out)
        return torch.cat(feats, dim=-1)


def build(kind: str, n_levels: int, log2_table: int) -> nn.Module:
    torch.manual_seed(0)
    if kind == "naive":
        return NaiveHashGrid(n_levels, log2_table=log2_table)
    return HashGridEncoding(n_levels=n_levels, log2_hashmap_size=log2_table)


def measure(enc: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    def fwd():
        with torch.no_grad():
            enc(x)

    def fwd_bwd():
        out = enc(x)
        out.backward(torch.ones_like(out))

    return x.shape[0] / median_seconds(fwd), x.shape[0] / median_seconds(fwd_bwd)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _memory_child(kind: str, n_levels: int, log2_table: int, n_points: int, threads: int, q) -> None:
    torch.set_num_threads(threads)
    enc = build(kind, n_levels, log2_table)
    x = torch.rand(n_points, 3)
    try:  # reset the peak-RSS mark so import-time peaks do not hide ours (Linux)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kib("VmRSS")
        out = enc(x)
        out.backward(torch.ones_like(out))
        q.put((_status_kib("VmHWM") - before) / 1024.0)
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = enc(x)
        out.backward(torch.ones_like(out))
        q.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0)


def peak_memory_mib(kind: str, n_levels: int, log2_table: int, n_points: int, threads: int) -> float:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(kind, n_levels, log2_table, n_points, threads, q))
    p.start()
    val = q.get()
    p.join()
    return val


def profile(n_top: int, n_points: int, log2_table: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    enc = build("lift3d", 8, log2_table)
    x = torch.rand(n_points, 3)

    def fwd_bwd():
        out = enc(x)
        out.backward(torch.ones_like(out))

    fwd_bwd()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fwd_bwd()
    print(f"lift3d hash grid, 8 levels, {n_points} points, {torch.get_num_threads()} thread(s), 5 x forward+backward")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n_top))


def chunking(n_points: int, log2_table: int, rounds: int = 7) -> None:
    """Mpts/s forward+backward: 1 thread, 2 threads with 1 thread's chunks, 2 threads with scaled chunks."""
    import os
    import statistics

    variants = [("1 thread", 1, False), ("2 threads, 1 thread's chunk", 2, False), ("2 threads, chunk x threads", 2, True)]
    x = torch.rand(n_points, 3)
    env = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ)
    print(f"hash grid forward+backward, {n_points} points, table 2^{log2_table}; {env or 'OpenMP defaults'}; "
          f"{rounds} rounds alternating the variants, each the median of 5 runs")
    print("| levels | variant | Mpts/s (median of rounds) | vs 1 thread | rounds |")
    print("|---|---|---|---|---|")
    for n_levels in (8, 16):
        enc = build("lift3d", n_levels, log2_table)
        got: dict[str, list[float]] = {name: [] for name, _, _ in variants}
        for _ in range(rounds):
            for name, threads, per_thread in variants:
                torch.set_num_threads(threads)
                HashGridEncoding.CHUNK_PER_THREAD = per_thread
                got[name].append(measure(enc, x)[1] / 1e6)
        HashGridEncoding.CHUNK_PER_THREAD = True
        base = statistics.median(got["1 thread"])
        for name, _, _ in variants:
            m = statistics.median(got[name])
            print(f"| {n_levels} | {name} | {m:.3f} | {m / base:.2f}x | {' '.join(f'{v:.2f}' for v in got[name])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (0: torch default); 1 by default because intra-op threads "
                         "collapse on a shared 2-core box")
    ap.add_argument("--log2-table", type=int, default=15)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest operators and stop")
    ap.add_argument("--chunking", action="store_true", help="compare chunk sizing at 1 and 2 threads and stop")
    args = ap.parse_args()
    if args.chunking:
        return chunking(args.points, args.log2_table)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.profile:
        return profile(args.profile, args.points, args.log2_table)
    threads = torch.get_num_threads()
    x = torch.rand(args.points, 3)
    print(f"hash grid, {args.points} points, table 2^{args.log2_table}, 2 features/level, {threads} torch thread(s)")
    print("timings are medians of 5 runs on a possibly shared machine: indicative only\n")
    header = f"{'levels':>6} {'impl':>8} {'fwd Mpts/s':>11} {'fwd+bwd Mpts/s':>15} {'speed-up':>9} {'peak RSS +MiB':>14}"
    print(header)
    print("-" * len(header))
    for n_levels in (8, 16):
        res = {}
        for kind in ("naive", "lift3d"):
            enc = build(kind, n_levels, args.log2_table)
            res[kind] = measure(enc, x)
            del enc
        for kind in ("naive", "lift3d"):
            f, fb = res[kind]
            speed = fb / res["naive"][1]
            mem = float("nan") if args.no_memory else peak_memory_mib(kind, n_levels, args.log2_table, args.points, threads)
            mem_s = "n/a" if math.isnan(mem) else f"{mem:.1f}"
            print(f"{n_levels:>6} {kind:>8} {f / 1e6:>11.3f} {fb / 1e6:>15.3f} {speed:>8.2f}x {mem_s:>14}")


if __name__ == "__main__":
    main()
