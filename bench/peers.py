"""Speed against peer projects' CPU/torch implementations of the same operations, interleaved in one process.

Four comparisons, each forward+backward (and forward alone where it matters), each peer timed
alternately with lift3d in the same process (the order flips every repetition), so a slow patch
of a shared machine hits both; the table gives the median of the repetitions and the ratio
peer / lift3d of the medians (above 1: lift3d is faster), with the range of the per-repetition
ratios.

* ``hashgrid``: lift3d's ``HashGridEncoding`` against nerfstudio's pure-torch ``HashEncoding``
  (``implementation="torch"``), 65,536 points, table 2^15, 2 features, 8 and 16 levels from
  resolution 16 at scale 1.447 per level. The two differ in convention (lift3d follows
  tiny-cuda-nn: positions ``x * (16 b^l - 1) + 0.5``, coarse levels stored densely; nerfstudio:
  ``x * floor(16 b^l)``, every level hashed), so the check is per hashed level: nerfstudio with
  that level's scale and table, given the points shifted by ``0.5 / scale``, must give the same
  features and table gradient in float64.
* ``raster``: lift3d's torch triangle rasterizer (``rasterize``: visible triangle, barycentrics and
  depth) against PyTorch3D's CPU ``rasterize_meshes`` (one face per pixel, its default bin size),
  an icosphere of 20,480 triangles, batch 4, 64 and 256 px; checked: the same visible triangle at
  (almost) every pixel.
* ``splat``: lift3d's ``project_gaussians`` against gsplat's torch reference
  (``_quat_scale_to_covar_preci`` + ``_fully_fused_projection``), 10,000 Gaussians, 4 views, 128 px;
  checked: the same pixel means and conics.
* ``composite``: lift3d's ``composite_weights`` against nerfacc's ``render_weight_from_density``
  (dense path), [4096 rays, 512 samples]; checked: the same weights.

A peer is found on ``sys.path`` (installed) or at the paths given (``os.pathsep``-separated: a
checkout, a build, the folder its extra dependencies went to); an absent one is skipped with the
reason. Nothing of a peer lives in this repository. One way to get them (outside the repo)::

    git clone https://github.com/nerfstudio-project/nerfstudio /tmp/peers/nerfstudio
    pip install --no-deps --target /tmp/peers/ns-deps viser msgspec websockets zstandard
    pip install --no-deps --target /tmp/peers/gsplat-pip gsplat      # 1.5.3 imports on a CPU
    pip install --no-deps nerfacc                                    # its dense path is pure torch
    # PyTorch3D: the CPU rasterizer needs its C++ extension; bench/README.md says how it was built.

    python bench/peers.py --nerfstudio /tmp/peers/nerfstudio:/tmp/peers/ns-deps \\
        --pytorch3d /tmp/peers/pytorch3d --gsplat /tmp/peers/gsplat-pip [--only hashgrid raster] \\
        [--threads 1] [--reps 15] [--raster-reps 5]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from typing import Any, Callable

PEERS = {"nerfstudio": "nerfstudio.field_components.encodings", "pytorch3d": "pytorch3d.renderer.mesh.rasterize_meshes",
         "gsplat": "gsplat.cuda._torch_impl", "nerfacc": "nerfacc"}
WHAT = {"hashgrid": "nerfstudio", "raster": "pytorch3d", "splat": "gsplat", "composite": "nerfacc"}


def load_peer(name: str, paths: str | None) -> tuple[Any, str]:
    """(module, where) or (None, why not)."""
    if paths:
        missing = [p for p in paths.split(os.pathsep) if not os.path.exists(p)]
        if missing:
            return None, f"path(s) not found: {', '.join(missing)}"
        sys.path[:0] = paths.split(os.pathsep)
    try:
        mod = importlib.import_module(PEERS[name])
    except Exception as exc:  # noqa: BLE001 - any import failure means "skip, and say why"
        how = f"at {paths}" if paths else f"installed (pass --{name} PATH)"
        return None, f"not importable {how}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    top = importlib.import_module(name)
    return mod, f"{getattr(top, '__version__', '?')} from {os.path.dirname(top.__file__)}"


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall time of each fn, ``reps`` times, alternating (order reversed every other repetition)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def row(case: str, times: dict[str, list[float]], peer: str, extra: str = "") -> str:
    ours, theirs = times["lift3d"], times[peer]
    per = sorted(b / a for a, b in zip(ours, theirs))
    mo, mt = statistics.median(ours), statistics.median(theirs)
    return (f"| {case} | {mo * 1e3:.2f} | {mt * 1e3:.2f} | **{mt / mo:.2f}x** | {per[0]:.2f}-{per[-1]:.2f} | "
            f"{extra} |")


HEADER = "| case | lift3d ms | {peer} ms | {peer} / lift3d | per-repetition range | check |\n|---|---|---|---|---|---|"


# ------------------------------------------------------------------------------------------------ hash grid
def bench_hashgrid(mod: Any, args: argparse.Namespace) -> None:
    import torch

    from lift3d.geometry.encodings import HashGridEncoding

    T, F, base, b = 15, 2, 16, 1.447269237440378
    print("\n### hash grid: lift3d HashGridEncoding vs nerfstudio HashEncoding(implementation='torch')\n")
    print(f"{args.points} points, table 2^{T}, {F} features per level, forward+backward unless stated, "
          f"{args.reps} repetitions\n")
    print(HEADER.format(peer="nerfstudio"))
    for levels in (8, 16):
        torch.manual_seed(0)
        ours = HashGridEncoding(n_levels=levels, n_features_per_level=F, log2_hashmap_size=T, base_resolution=base,
                                per_level_scale=b)
        theirs = mod.HashEncoding(num_levels=levels, min_res=base, max_res=base * b ** (levels - 1),
                                  log2_hashmap_size=T, features_per_level=F, implementation="torch")
        check = hashgrid_check(mod, levels, T, F, base, b)
        x = torch.rand(args.points, 3)
        g = torch.randn(args.points, levels * F)

        def fb(enc):
            def run():
                enc.zero_grad(set_to_none=True)
                enc(x).backward(g)
            return run

        def fwd(enc):
            def run():
                with torch.no_grad():
                    enc(x)
            return run

        t = interleaved({"lift3d": fwd(ours), "nerfstudio": fwd(theirs)}, args.reps)
        print(row(f"{levels} levels, forward", t, "nerfstudio"))
        t = interleaved({"lift3d": fb(ours), "nerfstudio": fb(theirs)}, args.reps)
        print(row(f"{levels} levels, forward+backward", t, "nerfstudio", check))


def hashgrid_check(mod: Any, levels: int, T: int, F: int, base: int, b: float) -> str:
    """Largest difference of features and table gradients over lift3d's hashed levels, float64."""
    import torch

    from lift3d.geometry.encodings import HashGridEncoding

    torch.manual_seed(1)
    ours = HashGridEncoding(n_levels=levels, n_features_per_level=F, log2_hashmap_size=T, base_resolution=base,
                            per_level_scale=b, init_scale=1.0).double()
    x = torch.rand(4096, 3, dtype=torch.float64)
    g = torch.randn(4096, levels * F, dtype=torch.float64)
    out = ours(x)
    out.backward(g)
    rows = 1 << T
    worst_f = worst_g = 0.0
    hashed = [lv for lv in range(levels) if int(ours.mults64[lv, 1, 0]) == 2654435761]  # the others are dense
    for lv in hashed:
        s = float(ours.scales[lv])
        off = int(ours.offsets64[lv])
        ns = mod.HashEncoding(num_levels=1, min_res=base, max_res=base, log2_hashmap_size=T, features_per_level=F,
                              implementation="torch").double()
        ns.scalings = torch.tensor([s], dtype=torch.float64)
        with torch.no_grad():
            ns.hash_table.copy_(ours.embeddings[:, off:off + rows].T)
        ref = ns(x + 0.5 / s)
        ref.backward(g[:, lv * F:(lv + 1) * F])
        worst_f = max(worst_f, float((ref - out[:, lv * F:(lv + 1) * F]).detach().abs().max()))
        worst_g = max(worst_g, float((ns.hash_table.grad - ours.embeddings.grad[:, off:off + rows].T).abs().max()))
    return (f"{len(hashed)} hashed levels, float64: features {worst_f:.1e}, table grad {worst_g:.1e}"
            if hashed else "no hashed level to compare")


# ------------------------------------------------------------------------------------------------ rasterizer
def bench_raster(mod: Any, args: argparse.Namespace) -> None:
    import torch
    import trimesh
    from pytorch3d.structures import Meshes

    from lift3d.utils.cameras import orbit
    from lift3d.utils.rasterize_ops import rasterize

    m = trimesh.creation.icosphere(5, radius=0.8)
    v = torch.tensor(m.vertices, dtype=torch.float32)
    f = torch.tensor(m.faces, dtype=torch.int64)
    B = 4
    print("\n### triangle rasterizer: lift3d rasterize (torch) vs PyTorch3D rasterize_meshes (CPU)\n")
    print(f"icosphere, {f.shape[0]} triangles, batch {B}, 1 face per pixel, {args.raster_reps} repetitions; forward "
          "is under no_grad, backward is of a random weighting of the barycentrics (PyTorch3D rasterizes naively on a "
          f"CPU: it has no binned CPU path); backward only up to {args.raster_backward_max} px\n")
    print(HEADER.format(peer="pytorch3d"))
    for res in args.raster_sizes:
        mvp = orbit(B, elevation_deg=20.0, distance=2.5, height=res, width=res)["mvp_mtx"]
        g = torch.randn(B, res, res, 2)

        def clip(vv):
            return torch.einsum("bij,vj->bvi", mvp, torch.cat([vv, torch.ones_like(vv[:, :1])], -1))

        def p3d_verts(pos):
            # Our NDC: x right, row 0 at y = -1; PyTorch3D's: +x left, row 0 at +y. Depth shifted positive.
            ndc = pos[..., :3] / pos[..., 3:]
            return torch.stack([-ndc[..., 0], -ndc[..., 1], ndc[..., 2] + 2.0], -1)

        def ours_run(grad: bool):
            def run():
                vv = v.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    rast = rasterize(clip(vv), f, (res, res), backend="torch")
                    if grad:
                        (rast[..., :2] * g).sum().backward()
                return rast
            return run

        def p3d_run(grad: bool):
            def run():
                vv = v.clone().requires_grad_(grad)
                with torch.set_grad_enabled(grad):
                    pv = p3d_verts(clip(vv))
                    meshes = Meshes(verts=list(pv), faces=[f] * B)
                    p2f, zbuf, bary, _ = mod.rasterize_meshes(meshes, image_size=res, blur_radius=0.0,
                                                              faces_per_pixel=1, perspective_correct=False)
                    if grad:
                        (bary[..., 0, :2] * g).sum().backward()
                return p2f
            return run

        rast = ours_run(False)()
        p2f = p3d_run(False)()[..., 0]
        ours_id = rast[..., 3].long() - 1
        theirs_id = torch.where(p2f >= 0, p2f - torch.arange(B)[:, None, None] * f.shape[0], p2f)
        agree = float((ours_id == theirs_id).float().mean())
        t = interleaved({"lift3d": ours_run(False), "pytorch3d": p3d_run(False)}, args.raster_reps, warmup=1)
        print(row(f"{res} px, forward", t, "pytorch3d", f"same visible triangle at {agree:.2%} of pixels"), flush=True)
        if res <= args.raster_backward_max:
            t = interleaved({"lift3d": ours_run(True), "pytorch3d": p3d_run(True)}, args.raster_reps, warmup=1)
            print(row(f"{res} px, forward+backward", t, "pytorch3d"), flush=True)


# ------------------------------------------------------------------------------------------------ splatting
def bench_splat(mod: Any, args: argparse.Namespace) -> None:
    import torch

    from lift3d.backends.gsplat_backend import camera_to_gsplat
    from lift3d.renderers.splatting import project_gaussians
    from lift3d.utils.cameras import focal_from_fovy, orbit

    n, B, res = args.gaussians, 4, 128
    gen = torch.Generator().manual_seed(0)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1)
    means = d * 0.6 * torch.rand(n, 1, generator=gen) ** (1 / 3)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    scales = 0.005 + 0.025 * torch.rand(n, 3, generator=gen)
    cams = orbit(B, elevation_deg=20.0, distance=2.5, height=res, width=res)
    c2w, fovy = cams["c2w"], cams["fovy"]
    w2c = torch.linalg.inv(c2w)
    focal = focal_from_fovy(fovy, res)
    viewmats, Ks = camera_to_gsplat(c2w, fovy, res, res)
    g2, g3 = torch.randn(B, n, 2, generator=gen), torch.randn(B, n, 3, generator=gen)
    print("\n### splatting projection: lift3d project_gaussians vs gsplat's torch reference\n")
    print(f"{n} Gaussians, {B} views, {res} px, EWA projection with the 2D covariance's inverse; backward of a random "
          f"weighting of the pixel means and conics; {args.reps} repetitions\n")
    print(HEADER.format(peer="gsplat"))

    def ours(grad: bool):
        def run():
            p = [t.clone().requires_grad_(grad) for t in (means, quats, scales)]
            with torch.set_grad_enabled(grad):
                out = project_gaussians(p[0], p[1], p[2], w2c, focal, res, res)
                if grad:
                    ((out["means2d"] * g2).sum() + (out["conics"] * g3).sum()).backward()
            return out
        return run

    def theirs(grad: bool):
        def run():
            p = [t.clone().requires_grad_(grad) for t in (means, quats, scales)]
            with torch.set_grad_enabled(grad):
                covars, _ = mod._quat_scale_to_covar_preci(p[1], p[2], compute_covar=True, compute_preci=False)
                radii, means2d, depths, conics, _ = mod._fully_fused_projection(p[0], covars, viewmats, Ks, res, res)
                if grad:
                    ((means2d * g2).sum() + (conics * g3).sum()).backward()
            return radii, means2d, conics
        return run

    a = ours(False)()
    radii, m2, co = theirs(False)()
    if radii.ndim == 3:  # gsplat >= 1.5: per-axis radii
        radii = radii.amax(-1)
    vis = (a["radii"] > 0) & (radii > 0)
    dm = float((a["means2d"] - m2)[vis].abs().max())
    dc = float(((a["conics"] - co).abs() / co.abs().clamp_min(1e-3))[vis].max())
    check = f"pixel means {dm:.1e} px, conics {dc:.1e} relative ({int(vis.sum())} visible)"
    t = interleaved({"lift3d": ours(False), "gsplat": theirs(False)}, args.reps)
    print(row("forward", t, "gsplat", check))
    t = interleaved({"lift3d": ours(True), "gsplat": theirs(True)}, args.reps)
    print(row("forward+backward", t, "gsplat"))


# ------------------------------------------------------------------------------------------------ compositing
def bench_composite(mod: Any, args: argparse.Namespace) -> None:
    import torch

    from lift3d.renderers.volume import composite_weights

    torch.manual_seed(0)
    R, S = 4096, 512
    t = torch.sort(torch.rand(R, S + 1) * 4.0, dim=-1)[0]
    ts, te = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    sig = torch.rand(R, S) * 10.0
    g = torch.randn(R, S)
    print("\n### compositing weights: lift3d composite_weights vs nerfacc render_weight_from_density (dense)\n")
    print(f"[{R} rays, {S} samples], {args.composite_reps} repetitions\n")
    print(HEADER.format(peer="nerfacc"))
    impls = {"lift3d": lambda s: composite_weights(s, ts, te)[0],
             "nerfacc": lambda s: mod.render_weight_from_density(ts, te, s)[0]}
    diff = float((impls["lift3d"](sig) - impls["nerfacc"](sig)).abs().max())

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(sig)
        return run

    def fb(fn):
        def run():
            s = sig.clone().requires_grad_(True)
            fn(s).backward(g)
        return run

    tt = interleaved({k: fwd(v) for k, v in impls.items()}, args.composite_reps)
    print(row("forward", tt, "nerfacc", f"weights differ by at most {diff:.1e}"))
    tt = interleaved({k: fb(v) for k, v in impls.items()}, args.composite_reps)
    print(row("forward+backward", tt, "nerfacc"))


BENCHES = {"hashgrid": bench_hashgrid, "raster": bench_raster, "splat": bench_splat, "composite": bench_composite}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in PEERS:
        ap.add_argument(f"--{name}", default=None, metavar="PATH",
                        help=f"{name}: checkout/build/dependency folders, {os.pathsep!r}-separated (default: installed)")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--composite-reps", type=int, default=31)
    ap.add_argument("--points", type=int, default=65536)
    ap.add_argument("--gaussians", type=int, default=10000)
    ap.add_argument("--raster-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--raster-reps", type=int, default=5, help="repetitions of the rasterizer rows (PyTorch3D's CPU "
                    "rasterizer takes about a minute per batch at 256 px)")
    ap.add_argument("--raster-backward-max", type=int, default=64, help="largest size with a forward+backward row")
    args = ap.parse_args()
    peers = {}
    for what in args.only:
        name = WHAT[what]
        peers[what] = load_peer(name, getattr(args, name))
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    for what in args.only:
        mod, where = peers[what]
        name = WHAT[what]
        if mod is None:
            print(f"\n### {what}: skipped, {name} {where}")
            continue
        print(f"\n({name} {where})")
        BENCHES[what](mod, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
