"""Benchmark: the torch triangle rasterizer (rasterize + interpolate + antialias, forward+backward).

Renders an icosphere of 20,480 triangles (trimesh icosphere, 5 subdivisions) from a batch of orbit
cameras at 64x64 and 256x256 and prints frames/s (median of 5 runs) and the peak resident memory
of the process that ran each configuration. The baseline, in the same script, is a naive dense
rasterizer: every pixel against every triangle (in chunks of triangles), with a running z-buffer;
it is compared on the visibility pass alone (the part our binning replaces), since interpolate and
antialias are shared.

Usage: python bench/render_raster.py [--device cpu|cuda] [--batch 4] [--threads N] [--no-naive-256]
Each configuration runs in its own subprocess so its peak memory is its own. Timings on a
machine shared with other jobs are only indicative.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

N_RUNS = 5


def _setup(res: int, batch: int, device: str):
    import torch
    import trimesh

    from lift3d.utils.cameras import orbit

    m = trimesh.creation.icosphere(5, radius=0.8)  # 20,480 faces
    cams = orbit(batch, elevation_deg=20.0, distance=2.5, height=res, width=res)
    v = torch.tensor(m.vertices, dtype=torch.float32, device=device)
    f = torch.tensor(m.faces, dtype=torch.int32, device=device)
    mvp = cams["mvp_mtx"].to(device)
    return v, f, mvp


def _naive_visibility(pos, tri, H: int, W: int):
    """Dense baseline: all pixels x all triangles; returns [B, H, W] triangle index or -1."""
    import torch

    B = pos.shape[0]
    dev = pos.device
    tri = tri.long()
    ys = (torch.arange(H, device=dev) + 0.5) / H * 2 - 1
    xs = (torch.arange(W, device=dev) + 0.5) / W * 2 - 1
    Y, X = torch.meshgrid(ys, xs, indexing="ij")
    X, Y = X.reshape(1, 1, -1), Y.reshape(1, 1, -1)  # [1, 1, P]
    best = torch.full((B, H * W), float("inf"), device=dev)
    best_id = torch.full((B, H * W), -1, dtype=torch.long, device=dev)
    chunk = max(1, (1 << 16) // (B * H * W))  # small chunks: fastest for this baseline
    for s in range(0, tri.shape[0], chunk):
        t = tri[s:s + chunk]
        v = pos[:, t]  # [B, T, 3, 4]
        w_ok = (v[..., 3] > 1e-8).all(-1)[..., None]  # [B, T, 1]
        # Residual vectors of the pixel's reprojection, per vertex: [B, T, 3, P].
        rx = v[..., 0, None] - X[:, :, None, :] * v[..., 3, None]
        ry = v[..., 1, None] - Y[:, :, None, :] * v[..., 3, None]
        c0 = rx[:, :, 1] * ry[:, :, 2] - ry[:, :, 1] * rx[:, :, 2]
        c1 = rx[:, :, 2] * ry[:, :, 0] - ry[:, :, 2] * rx[:, :, 0]
        c2 = rx[:, :, 0] * ry[:, :, 1] - ry[:, :, 0] * rx[:, :, 1]
        ssum = c0 + c1 + c2
        inside = (c0 * ssum >= 0) & (c1 * ssum >= 0) & (c2 * ssum >= 0) & (ssum != 0) & w_ok
        z = (c0 * v[..., 0, 2, None] + c1 * v[..., 1, 2, None] + c2 * v[..., 2, 2, None]) / (
            c0 * v[..., 0, 3, None] + c1 * v[..., 1, 3, None] + c2 * v[..., 2, 3, None])
        inside &= (z >= -1) & (z <= 1)
        z = torch.where(inside, z, torch.full_like(z, float("inf")))
        zmin, arg = z.min(1)  # [B, P]
        better = zmin < best
        best = torch.where(better, zmin, best)
        best_id = torch.where(better, arg + s, best_id)
    return best_id.view(B, H, W)


def _time(fn, sync) -> float:
    ts = []
    fn()  # warm-up
    for _ in range(N_RUNS):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _worker(kind: str, res: int, batch: int, device: str, threads: int, q) -> None:
    import torch

    from lift3d.utils.rasterize_ops import _visible_triangle, antialias, interpolate, rasterize

    if threads > 0:
        torch.set_num_threads(threads)
    v, f, mvp = _setup(res, batch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    attr = torch.rand(v.shape[0], 3, device=device, requires_grad=True)
    vv = v.clone().requires_grad_(True)

    def clip():
        return torch.einsum("bij,vj->bvi", mvp, torch.cat([vv, torch.ones_like(vv[:, :1])], -1))

    if kind == "full":
        def fn():
            p = clip()
            rast = rasterize(p, f, (res, res), backend="torch")
            col = antialias(interpolate(attr, rast, f, backend="torch"), rast, p, f, backend="torch")
            col.square().sum().backward()
    elif kind == "visibility":
        def fn():
            with torch.no_grad():
                _visible_triangle(clip(), f.long(), res, res)
    else:
        def fn():
            with torch.no_grad():
                _naive_visibility(clip(), f, res, res)
    t = _time(fn, sync)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    q.put({"seconds": t, "peak_mb": peak_mb})


def run(kind: str, res: int, batch: int, device: str, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_worker, args=(kind, res, batch, device, threads, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-naive-256", action="store_true", help="skip the slow dense baseline at 256x256")
    args = ap.parse_args()
    B = args.batch
    rows = []
    for res in (64, 256):
        full = run("full", res, B, args.device, args.threads)
        vis = run("visibility", res, B, args.device, args.threads)
        rows.append((f"{res}x{res}", "ours: rasterize+interpolate+antialias, fwd+bwd", full, None))
        if res == 256 and args.no_naive_256:
            rows.append((f"{res}x{res}", "ours: visibility pass only", vis, None))
            continue
        naive = run("naive", res, 1, args.device, args.threads)  # batch 1: it is slow; frames/s normalises
        rows.append((f"{res}x{res}", "ours: visibility pass only", vis, naive["seconds"] * B / vis["seconds"]))
        rows.append((f"{res}x{res}", "naive dense: visibility pass only", naive, 1.0))
    print(f"20,480 triangles, batch {B}, device {args.device}, median of {N_RUNS} runs")
    print(f"{'res':>9} | {'what':<48} | {'frames/s':>9} | {'ms/frame':>9} | {'peak MB':>8} | speed-up vs naive")
    print("-" * 110)
    for res, what, r, ratio in rows:
        fps = (1 if what.startswith("naive") else B) / r["seconds"]
        ratio_s = f"{ratio:.1f}x" if ratio is not None else ""
        print(f"{res:>9} | {what:<48} | {fps:9.2f} | {1000 / fps:9.2f} | {r['peak_mb']:8.0f} | {ratio_s}")
    print(json.dumps({"note": "indicative: measured on a shared machine"}))


if __name__ == "__main__":
    main()
