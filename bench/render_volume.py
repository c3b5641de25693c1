"""Volume rendering speed: occupancy pruning on/off, and our compositing vs nerfacc's dense path.

Table 1: rays/s rendering a 64x64 view of an ``implicit-volume`` field (blob initialisation,
hash grid 16 levels / 2^19 table) with ``nerf-volume-renderer``, evaluation (no grad) and training
(forward + backward), without and with occupancy-grid pruning; the speed-up is against the
unpruned row of the same mode, all in this process. Table 2: compositing weights for
[4096 rays, 512 samples] with ``lift3d.renderers.volume.composite_weights`` vs
``nerfacc.render_weight_from_density`` (dense path, runs on CPU), forward and forward+backward.
Medians of 5 runs; peak memory is the growth of peak RSS during the runs (Linux clear_refs/VmHWM)
over what the process already holds, so a row after a hungrier one can read 0.
Timings on a shared machine are indicative only.

    python bench/render_volume.py [--samples 128] [--res 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lift3d.backends import nerfacc_backend
from lift3d.backgrounds.base import BaseBackground
from lift3d.materials.base import BaseMaterial
from lift3d.registry import find
from lift3d.renderers.volume import composite_weights
from lift3d.utils.cameras import make_cameras


class _Sigmoid(BaseMaterial):
    def forward(self, features, **kwargs):
        return torch.sigmoid(features[..., :3])


class _White(BaseBackground):
    def forward(self, dirs):
        return torch.ones_like(dirs)


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(fn, runs: int = 5) -> tuple[float, float]:
    """(median seconds, peak RSS growth in MiB) of ``fn``."""
    fn()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    base = _status_kib("VmRSS")
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), max(0, _status_kib("VmHWM") - base) / 1024.0


def render_table(samples: int, res: int) -> None:
    torch.manual_seed(0)
    geo = find("implicit-volume")({"backend": "torch"})
    cam = make_cameras(torch.tensor([15.0]), torch.tensor([30.0]), torch.tensor([2.5]), torch.tensor([40.0]), res, res)
    n_rays = res * res
    print(f"nerf-volume-renderer, {res}x{res} rays, {samples} samples/ray, implicit-volume (16 levels, 2^19)")
    header = f"{'mode':>6} {'grid_prune':>10} {'rays/s':>10} {'samples run':>12} {'speed-up':>9} {'peak RSS +MiB':>14}"
    print(header)
    print("-" * len(header))
    for mode in ("eval", "train"):
        rows = []
        # Pruned first: peak-RSS growth is measured against memory the process already holds.
        for prune in (True, False):
            r = find("nerf-volume-renderer")(
                {"num_samples_per_ray": samples, "grid_prune": prune, "randomized": mode == "train"},
                geometry=geo, material=_Sigmoid(), background=_White(),
            )
            if prune:
                r.update_step(0, 0)
                frac = r.occupancy.occupied_fraction
            r.train(mode == "train")
            info = {}

            def run():
                if mode == "eval":
                    with torch.no_grad():
                        out = r(**cam)
                else:
                    out = r(**cam)
                    out["comp_rgb"].mean().backward()
                info["n"] = out["weights"].shape[0]

            sec, mem = timed(run)
            rows.append((prune, n_rays / sec, info["n"], mem))
        base_rate = rows[-1][1]
        for prune, rate, n, mem in reversed(rows):
            print(f"{mode:>6} {str(prune):>10} {rate:>10.0f} {n:>12d} {rate / base_rate:>8.2f}x {mem:>14.1f}")
    print(f"(occupied fraction of the grid after one warm-up update: {frac:.3f})\n")


def composite_table() -> None:
    torch.manual_seed(0)
    R, S = 4096, 512
    t = torch.sort(torch.rand(R, S + 1) * 4.0, dim=-1)[0]
    ts, te = t[:, :-1].contiguous(), t[:, 1:].contiguous()
    sig = torch.rand(R, S) * 10.0
    impls = [("lift3d", lambda s: composite_weights(s, ts, te))]
    if nerfacc_backend.importable():
        impls.append(("nerfacc", lambda s: nerfacc_backend.render_weights_dense(ts, te, s)))
    print(f"compositing weights, dense [{R}, {S}]")
    header = f"{'impl':>8} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs nerfacc fwd+bwd':>19} {'peak RSS +MiB':>14}"
    print(header)
    print("-" * len(header))
    rows = {}
    for name, fn in impls:
        def fwd():
            with torch.no_grad():
                fn(sig)

        def fwd_bwd():
            s = sig.clone().requires_grad_(True)
            w = fn(s)[0]
            w.sum().backward()

        f, _ = timed(fwd)
        fb, mem = timed(fwd_bwd)
        rows[name] = (f, fb, mem)
    ref = rows.get("nerfacc", rows["lift3d"])[1]
    for name, (f, fb, mem) in rows.items():
        print(f"{name:>8} {f * 1e3:>8.2f} {fb * 1e3:>11.2f} {ref / fb:>18.2f}x {mem:>14.1f}")
    if "nerfacc" in rows:
        diff = (composite_weights(sig, ts, te)[0] - nerfacc_backend.render_weights_dense(ts, te, sig)[0]).abs().max()
        print(f"max |w_lift3d - w_nerfacc| = {float(diff):.2e}")
    else:
        print("nerfacc not installed: no side-by-side row (pip install --no-deps nerfacc)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} torch thread(s); medians of 5 runs, indicative only on a shared machine\n")
    render_table(args.samples, args.res)
    composite_table()


if __name__ == "__main__":
    main()
