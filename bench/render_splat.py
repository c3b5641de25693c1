"""Benchmark: Gaussian splatting forward+backward, tiled torch path vs the naive dense baseline.

Renders 10k random Gaussians (a ball of radius 0.6, scales 0.005-0.03, opacities 0.1-0.9) from
one camera at 64x64 and 128x128 and times forward + backward (median of 5 after a warm-up), in
one process so the ratio against the dense baseline (every pixel against every Gaussian, in
checkpointed chunks) is fair. Peak memory: on CUDA ``max_memory_allocated``; on CPU the rise of the
peak resident size over one iteration in a fresh child process run with a fixed glibc mmap threshold
(Linux), so freed blocks are not silently reused.
gsplat is timed too when it is importable and CUDA is present.

    python bench/render_splat.py [--n 10000] [--sizes 64 128] [--threads 1] [--repeats 5] [--dense-repeats N]
                                 [--no-dense] [--no-mem] [--device cpu]

The dense baseline takes tens of seconds per frame at 128x128 on a CPU, so it skips the warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from lift3d.backends import gsplat_backend
from lift3d.renderers.splatting import render_gaussians
from lift3d.utils.cameras import make_cameras


def scene(n: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = d * 0.6 * torch.rand(n, 1, generator=g) ** (1 / 3)
    quats = torch.randn(n, 4, generator=g)
    log_s = torch.log(0.005 + 0.025 * torch.rand(n, 3, generator=g))
    op = torch.logit(0.1 + 0.8 * torch.rand(n, generator=g))
    cols = torch.rand(n, 3, generator=g)
    return [t.to(device).requires_grad_() for t in (means, quats, log_s, op, cols)]


def step(method: str, params, cam, size: int) -> None:
    m, q, s, o, c = params
    if method == "gsplat":
        r = gsplat_backend.render(m, q, s.exp(), torch.sigmoid(o), c, cam["c2w"], cam["fovy"], size, size)
    else:
        kw = {"dense": True} if method == "dense" else {"tile_size": int(method.split("-")[1])}
        r = render_gaussians(m, q, s.exp(), torch.sigmoid(o), c, cam["c2w"], cam["fovy"], size, size, **kw)
    loss = r["rgb"].square().mean() + r["opacity"].mean() + 0.1 * r["depth"].mean()
    loss.backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(method, params, cam, size, repeats, device, warmup=True):
    if warmup:
        step(method, params, cam, size)
    ts = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        step(method, params, cam, size)
        sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_mem_mb(method, params, cam, size, device) -> float:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(method, params, cam, size)
        sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) of this process.
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kb("VmRSS")
        step(method, params, cam, size)
        return max(0, _status_kb("VmHWM") - before) / 1024
    except OSError:
        return float("nan")


def child_peak_mem_mb(args, method: str, size: int) -> float:
    """Peak memory of one iteration, measured in a fresh child process (CPU) or here (CUDA)."""
    if args.device == "cuda":
        return float("nan")  # filled in by the caller with max_memory_allocated
    # glibc keeps freed large blocks in its heap after raising its mmap threshold, so in a long-lived
    # process the peak RSS stops moving. A fixed threshold in a child makes every large tensor its own
    # mapping (too slow for timing, right for measuring).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--measure-mem", method, "--n", str(args.n), "--sizes", str(size),
           "--threads", str(args.threads or torch.get_num_threads())]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        return float(out.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, ValueError, IndexError):
        return float("nan")


def _camera(size: int, dev: str):
    cam = make_cameras(torch.tensor([20.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([40.0]), size, size)
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in cam.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-dense", action="store_true", help="skip the (slow) dense baseline")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory column")
    ap.add_argument("--measure-mem", default="", help=argparse.SUPPRESS)  # child mode: print one peak in MB
    ap.add_argument("--dense-repeats", type=int, default=0, help="timed runs of the dense baseline (0: --repeats)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    params = scene(args.n, dev)
    if args.measure_mem:
        print(peak_mem_mb(args.measure_mem, params, _camera(args.sizes[0], dev), args.sizes[0], dev))
        return
    methods = ["tiles-16", "tiles-8"] + ([] if args.no_dense else ["dense"])
    if dev == "cuda" and gsplat_backend.available():
        methods.append("gsplat")
    dense_reps = args.dense_repeats or args.repeats
    print(f"# {args.n} Gaussians, device={dev}, torch threads={torch.get_num_threads()}, median of {args.repeats} "
          f"(dense: {dense_reps}); fwd+bwd per frame. Indicative only on a shared machine.")
    print(f"{'size':>7} {'method':>9} {'ms/frame':>10} {'frames/s':>9} {'peak MB':>9} {'speed-up vs dense':>18}")
    for size in args.sizes:
        cam = _camera(size, dev)
        res = {}
        for m in methods:
            reps = args.dense_repeats if (m == "dense" and args.dense_repeats) else args.repeats
            t = time_it(m, params, cam, size, reps, dev, warmup=m != "dense")
            if args.no_mem:
                mem = float("nan")
            elif dev == "cuda":
                mem = peak_mem_mb(m, params, cam, size, dev)
            else:
                mem = child_peak_mem_mb(args, m, size)
            res[m] = (t, mem)
        base = res.get("dense", (float("nan"),))[0]
        for m, (t, mem) in res.items():
            print(f"{size:>4}^2 {m:>9} {1000 * t:>10.1f} {1 / t:>9.2f} {mem:>9.1f} {base / t:>17.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
